"""Every user error of the bin/ tools is one line ``tfadv: error: ...`` (plus at most one
``tfadv: hint: ...``) on stderr, exit status 2, before any work and without writing anything.

Each case runs its tool in a subprocess (the flag cases stop before TensorFlow is imported, the
others import it: about 6 s each), two at a time from a module-scoped pool, in a fresh directory
(the working directory of the run, so a relative default output would show up too) holding the
bad files the cases point at. The listing of that directory must be the same afterwards.
"""

import concurrent.futures
import os
import re
import subprocess
import zipfile

import gin
import numpy as np
import pytest

from conftest import bin_command, bin_env
from tfadv import cli, config

GIN_DIR = config.GIN_DIR
GIN_FILES = ", ".join(sorted(f for f in os.listdir(GIN_DIR) if f.endswith(".gin")))
DATASETS = "digits, mnist_5k, mnist, fashion_mnist, svhn_cropped, cifar10, cifar100"
MODELS = ("['digits_cnn', 'gowal_cnn', 'madry_mnist_cnn', 'preact_resnet18', 'small_cnn', "
          "'wide_resnet']")
PGD_PARAMS = ("clip_max, clip_min, eps, init_scale, loss_fn, norm, random_start, restarts, seed, "
              "select, step_size, steps, training")
ATTACKS = ("fgsm, pgdK, pgdK-cw, mim, cw-l2, apgd-ce, apgd-dlr, apgd-t, fab-t, square, "
           "autoattack, autoattack-rand, autoattack-fast, patch, patch-fast, patch-random80, upatch "
           "(K = number of PGD steps, e.g. pgd20)")
TRAIN = ("--gin_file=pgd_at_base.gin", "--model_dir={tmp}/run")
E = "tfadv: error: "
H = "tfadv: hint: "


def case(id, tool, args, *lines):
    """A row of the table: ``bin/<tool> args`` must print exactly ``lines`` on stderr (format
    fields: ``tmp``, the case's directory; ``gin_dir``; ``gin_files``) and exit with 2."""
    return pytest.param(tool, tuple(args), lines, id=id)


CASES = [
    # --- flags (absl parsing, then the scripts' own range checks): no TensorFlow -------------
    case("evaluate-missing-required-flag", "evaluate", [],
         E + "--model is required (bin/train model_dir, .keras file or SavedModel directory)."),
    case("evaluate-autoattack-twice", "evaluate",
         ["--model={tmp}/empty.keras", "--attacks=fgsm,autoattack", "--autoattack=fast"],
         E + "--attacks names autoattack (the standard ensemble) and --autoattack=fast asks for "
             "another headline: drop autoattack from --attacks, or --autoattack."),
    case("evaluate-unknown-flag", "evaluate", ["--model={tmp}/empty.keras", "--bogus=1"],
         E + "unknown flag --bogus.", H + "bin/evaluate --helpshort lists its flags."),
    case("evaluate-misspelt-flag", "evaluate", ["--model={tmp}/empty.keras", "--max_exmples=3"],
         E + "unknown flag --max_exmples; did you mean --max_examples?",
         H + "bin/evaluate --helpshort lists its flags."),
    case("evaluate-float-flag-not-a-number", "evaluate",
         ["--model={tmp}/empty.keras", "--eps=abc"], E + "--eps must be a float; got 'abc'."),
    case("evaluate-enum-flag", "evaluate", ["--model={tmp}/empty.keras", "--norm=l3"],
         E + "--norm must be one of linf, l2, patch; got 'l3'."),
    case("evaluate-bool-flag", "evaluate", ["--model={tmp}/empty.keras", "--sanity=maybe"],
         E + "--sanity is a boolean flag (--sanity, --nosanity, --sanity=true|false); got "
             "'maybe'."),
    case("evaluate-flag-without-value", "evaluate", ["--model={tmp}/empty.keras",
                                                     "--max_examples"],
         E + "--max_examples needs a value (--max_examples=...): evaluate on the first N "
             "examples only."),
    case("evaluate-negative-eps", "evaluate", ["--model={tmp}/empty.keras", "--eps=-0.1"],
         E + "--eps must be >= 0 and <= 1 for --norm=linf ([0, 1] pixel units); got -0.1."),
    case("evaluate-max-examples-0", "evaluate", ["--model={tmp}/empty.keras",
                                                 "--max_examples=0"],
         E + "--max_examples must be an integer >= 1 (or unset for all examples); got 0."),
    case("evaluate-batch-size-0", "evaluate", ["--model={tmp}/empty.keras", "--batch_size=0"],
         E + "--batch_size must be an integer >= 1; got 0."),
    case("evaluate-positional-argument", "evaluate", ["--model={tmp}/empty.keras", "extra"],
         E + "unexpected positional arguments ['extra']: bin/evaluate takes only flags "
             "(--name=value)."),
    case("evaluate-model-does-not-exist", "evaluate", ["--model={tmp}/missing.keras"],
         E + "--model {tmp}/missing.keras does not exist."),
    case("certify-missing-sigma", "certify", ["--model={tmp}/empty.keras"],
         E + "--sigma is required (noise standard deviation, [0, 1] pixel units; the sigma the "
             "model was trained with)."),
    case("certify-sigma-0", "certify", ["--model={tmp}/empty.keras", "--sigma=0"],
         E + "--sigma must be a finite number > 0 (the noise level the model was trained with); "
             "got 0."),
    case("certify-alpha-out-of-range", "certify",
         ["--model={tmp}/empty.keras", "--sigma=0.25", "--alpha=1.5"],
         E + "--alpha must be in (0, 1); got 1.5."),
    case("certify-radii-not-numbers", "certify",
         ["--model={tmp}/empty.keras", "--sigma=0.25", "--radii=0,x"],
         E + "--radii must be comma-separated numbers; got '0,x'."),
    case("certify-model-does-not-exist", "certify", ["--model={tmp}/missing", "--sigma=0.25"],
         E + "--model {tmp}/missing does not exist."),
    case("export-version-0", "export", ["--model={tmp}/empty.keras", "--version=0"],
         E + "--version must be an integer >= 1 (or unset for the next free one); got 0."),
    case("export-model-does-not-exist", "export", ["--model={tmp}/missing.keras"],
         E + "--model {tmp}/missing.keras does not exist."),
    case("export-model-not-a-keras-file", "export", ["--model={tmp}/random.bin"],
         E + "--model must be a bin/train model_dir (with model.keras) or a .keras file; got "
             "{tmp}/random.bin."),
    case("pseudo-label-missing-gin-file", "pseudo_label", [],
         E + "--gin_file is required: give the teacher's gin config, e.g. "
             "--gin_file=rst_teacher.gin."),
    case("pseudo-label-teacher-does-not-exist", "pseudo_label",
         ["--gin_file=rst_teacher.gin", "--teacher={tmp}/missing"],
         E + "--teacher {tmp}/missing does not exist."),
    case("pseudo-label-bad-source", "pseudo_label", ["--gin_file=rst_teacher.gin",
                                                     "--source=images.txt"],
         E + "--source must be 'split', 'tfds:NAME:SPLIT' or a .npz path; got 'images.txt'."),
    case("pseudo-label-truncated-source", "pseudo_label",
         ["--gin_file=rst_teacher.gin", "--source={tmp}/truncated.npz"],
         E + "--source {tmp}/truncated.npz is truncated or corrupt: not a valid .npz (zip) "
             "archive."),
    case("train-unknown-flag", "train", [*TRAIN, "--epochs=3"],
         E + "unknown flag --epochs.", H + "bin/train --helpshort lists its flags."),
    case("train-bool-flag", "train", [*TRAIN, "--allow_unreliable=maybe"],
         E + "--allow_unreliable is a boolean flag (--allow_unreliable, --noallow_unreliable, "
             "--allow_unreliable=true|false); got 'maybe'."),
    case("train-no-gin-file", "train", ["--model_dir={tmp}/run"],
         E + "give at least one --gin_file (e.g. --gin_file=pgd_at.gin)."),
    case("train-positional-argument", "train", [*TRAIN, "extra"],
         E + "unexpected arguments: ['extra']"),
    # --- gin (TensorFlow imported; every case fails while the run is set up) -----------------
    case("train-gin-file-does-not-exist", "train",
         ["--gin_file=pgd_at_bse.gin", "--model_dir={tmp}/run"],
         E + "gin file 'pgd_at_bse.gin' not found as a path or in {gin_dir}; available: "
             "{gin_files}.", H + "did you mean pgd_at_base.gin?"),
    case("train-gin-syntax-error", "train", [*TRAIN, "--gin_param=train.epochs = = 3"],
         E + "gin syntax error: Unable to parse value (bindings string line 1: train.epochs = = "
             "3)."),
    case("train-gin-unknown-configurable", "train", [*TRAIN, "--gin_param=PDG.eps = 0.1"],
         E + "No configurable matching 'PDG' (bindings string line 1: PDG.eps = 0.1).",
         H + "did you mean PGD?"),
    case("train-gin-unknown-parameter-in-file", "train",
         ["--gin_file={tmp}/typo.gin", "--model_dir={tmp}/run"],
         E + "Configurable 'PGD' doesn't have a parameter named 'epsilon' ({tmp}/typo.gin, line "
             "2: PGD.epsilon = 0.3).",
         H + f"did you mean PGD.eps? parameters of PGD: {PGD_PARAMS}."),
    case("train-epochs-0", "train", [*TRAIN, "--gin_param=train.epochs = 0"],
         E + "train.epochs must be an integer >= 1; got 0."),
    case("train-batch-size-negative", "train",
         [*TRAIN, "--gin_param=load_dataset.batch_size = -1"],
         E + "load_dataset.batch_size must be an integer >= 1; got -1."),
    case("train-awp-warmup-not-below-epochs", "train",
         [*TRAIN, "--gin_param=PGDAdversarialTraining.awp = @AWP()",
          "--gin_param=AWP.warmup_epochs = 80"],
         E + "AWP.warmup_epochs=80 must be smaller than the number of training epochs (80): AWP "
             "would never start."),
    case("train-unknown-dataset", "train", [*TRAIN, "--gin_param=load_dataset.name = 'imagenet'"],
         E + f"load_dataset.name: dataset name must be one of {DATASETS} or your own data as "
             "'npz:FILE', 'folder:DIR' or 'tfds:NAME'; got 'imagenet'."),
    case("train-unknown-model", "train", [*TRAIN, "--gin_param=train.model = 'resnet9000'"],
         E + f"train.model must be one of {MODELS}; got 'resnet9000'."),
    case("train-tfds-dataset-not-prepared", "train",
         [*TRAIN, "--gin_param=load_dataset.name = 'cifar10'",
          "--gin_param=load_dataset.data_dir = '{tmp}/tfds'"],
         E + "TFDS dataset 'cifar10' is not prepared in data_dir '{tmp}/tfds' "
             "(load_dataset.download = False).",
         H + "prepare it on a machine with network access, e.g. `tfds build cifar10 "
             "--data_dir={tmp}/tfds`, and copy that directory here, or bind "
             "load_dataset.download = True where downloads work."),
    case("train-pseudo-labels-hold-nan", "train",
         [*TRAIN, "--gin_param=load_dataset.pseudo_labeled = '{tmp}/nan.npz'"],
         E + "load_dataset.pseudo_labeled file '{tmp}/nan.npz' holds NaN values (1 of 256) in "
             "'images'; images must be finite numbers in [0, 1]."),
    case("train-pseudo-labels-truncated", "train",
         [*TRAIN, "--gin_param=load_dataset.pseudo_labeled = '{tmp}/truncated.npz'"],
         E + "load_dataset.pseudo_labeled file '{tmp}/truncated.npz' is truncated or corrupt: "
             "not a valid .npz (zip) archive."),
    case("train-initial-weights-missing", "train",
         [*TRAIN, "--gin_param=train.initial_weights = '{tmp}/missing.keras'"],
         E + "train.initial_weights {tmp}/missing.keras does not exist.",
         H + "train the source model first, e.g. bin/train --gin_file=pretrain.gin."),
    # --- bad inputs of bin/evaluate, bin/export and bin/pseudo_label (TensorFlow imported) ---
    case("evaluate-unknown-attack", "evaluate", ["--model={tmp}/empty.keras",
                                                 "--attacks=fgsm,boom"],
         E + f"--attacks: unknown attack name 'boom'; known: {ATTACKS}."),
    case("evaluate-unknown-dataset", "evaluate", ["--model={tmp}/empty.keras",
                                                  "--dataset=imagenet"],
         E + f"--dataset: dataset name must be one of {DATASETS} or your own data as "
             "'npz:FILE', 'folder:DIR' or 'tfds:NAME'; got 'imagenet'."),
    case("evaluate-zero-byte-keras-file", "evaluate", ["--model={tmp}/empty.keras"],
         E + "{tmp}/empty.keras is not a valid .keras file (truncated or corrupt: not a zip "
             "archive)."),
    case("evaluate-random-bytes-file", "evaluate", ["--model={tmp}/random.bin"],
         E + "{tmp}/random.bin is not a SavedModel, a .keras file or a bin/train model_dir."),
    case("pseudo-label-source-holds-nan", "pseudo_label",
         ["--gin_file=rst_teacher.gin", "--teacher={tmp}/empty.keras",
          "--source={tmp}/nan.npz", "--output={tmp}/out.npz"],
         E + "--source {tmp}/nan.npz holds NaN values (1 of 256) in 'images'; images must be "
             "finite numbers in [0, 1]."),
]

# The C++ log lines TensorFlow prints at import whatever TF_CPP_MIN_LOG_LEVEL says (the CUDA
# stub of the CPU machine): dropped before the comparison. Anything else (a Python traceback, a
# warning) is compared, and fails the case.
TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called "
                      r"are written to STDERR|[IWEF]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] .*)$")


def _make_files(directory):
    """The bad inputs the cases point at."""
    rng = np.random.default_rng(0)
    (directory / "empty.keras").write_bytes(b"")
    (directory / "random.bin").write_bytes(rng.bytes(4096))
    (directory / "empty_dir").mkdir()
    with zipfile.ZipFile(directory / "whole.keras", "w") as archive:
        archive.writestr("config.json", '{"class_name": "Functional"}')
        archive.writestr("model.weights.h5", rng.bytes(4096))
    whole = (directory / "whole.keras").read_bytes()
    (directory / "whole.keras").unlink()
    (directory / "truncated.keras").write_bytes(whole[:len(whole) // 2])
    images = rng.uniform(size=(4, 8, 8, 1)).astype("float32")
    images[1, 2, 3, 0] = np.nan
    np.savez(directory / "nan.npz", images=images, labels=np.zeros(4, "int32"))
    np.savez(directory / "whole.npz", images=rng.uniform(size=(64, 8, 8, 1)).astype("float32"),
             labels=np.zeros(64, "int32"))
    whole = (directory / "whole.npz").read_bytes()
    (directory / "whole.npz").unlink()
    (directory / "truncated.npz").write_bytes(whole[:len(whole) // 2])
    (directory / "typo.gin").write_text("include 'pgd_at_base.gin'\nPGD.epsilon = 0.3\n")


def _listing(directory):
    return sorted((os.path.relpath(os.path.join(root, name), directory),
                   os.path.getsize(os.path.join(root, name)))
                  for root, dirs, files in os.walk(directory) for name in dirs + files)


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=bin_env())


DEBUG_CASE = ("evaluate", ("--model={tmp}/missing.keras", "--debug"))


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """``id -> (directory, listing before, future of the CompletedProcess)`` of the selected
    cases, run two at a time in the background while the tests wait for theirs."""
    mine = [item for item in request.session.items if item.module is request.module]
    selected = {item.callspec.id for item in mine if hasattr(item, "callspec")}
    if any(item.name == "test_debug_flag_gives_the_traceback" for item in mine):
        selected.add("debug")
    rows = {"debug": DEBUG_CASE, **{p.id: p.values[:2] for p in CASES}}
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="user_errors")
    started = {}
    # The table ends with the TensorFlow cases: they start first, the fast flag cases fill in.
    for key in reversed(list(rows)):
        if key not in selected:
            continue
        tool, args = rows[key]
        directory = tmp_path_factory.mktemp(key)
        _make_files(directory)
        cmd = bin_command(tool, *(a.format(tmp=directory) for a in args))
        started[key] = (directory, _listing(directory), pool.submit(_run, cmd, directory))
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


def _stderr_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not TF_NOISE.match(line)]


@pytest.mark.parametrize("tool, args, lines", CASES)
def test_user_error_is_one_line_and_exit_status_2(outcomes, request, tool, args, lines):
    directory, before, future = outcomes[request.node.callspec.id]
    proc = future.result()
    fields = {"tmp": directory, "gin_dir": GIN_DIR, "gin_files": GIN_FILES}
    expected = [line.format(**fields) for line in lines]
    assert _stderr_lines(proc.stderr) == expected, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _listing(directory) == before  # nothing written (model_dir, outputs, ...)


def test_debug_flag_gives_the_traceback(outcomes):
    directory, before, future = outcomes["debug"]
    proc = future.result()
    assert proc.returncode != 0
    assert "Traceback (most recent call last):" in proc.stderr
    assert _stderr_lines(proc.stderr)[-1] == (
        f"tfadv.cli.UserError: --model {directory}/missing.keras does not exist.")
    assert "tfadv: error:" not in proc.stderr
    assert _listing(directory) == before


# --- tfadv.cli in process ------------------------------------------------------------------------

@pytest.fixture
def fresh_phase():
    cli.reset()
    yield
    cli.reset()


def test_only_user_errors_are_the_users_once_setup_is_done(fresh_phase):
    assert cli.is_user_error(ValueError("x")) and cli.is_user_error(FileNotFoundError("x"))
    assert not cli.is_user_error(RuntimeError("x"))
    cli.setup_done()
    assert not cli.is_user_error(ValueError("x"))
    assert cli.is_user_error(cli.UserError("x", hint="y"))
    err = cli.UserError("bad value", hint="do this")
    assert cli.describe(err) == ("bad value", "do this") and err.exit_code == 2


@gin.configurable("user_errors_probe")
def _probe(steps=1):
    if steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps}.")


def test_gin_errors_from_configurables_name_the_parameter_and_keep_one_line(fresh_phase):
    with gin.unlock_config():
        gin.bind_parameter("user_errors_probe.steps", 0)
    with pytest.raises(ValueError) as err:
        _probe()
    assert "\n" in str(err.value)  # gin appended "In call to configurable ..."
    assert cli.describe(err.value) == (
        "user_errors_probe.steps must be an integer >= 1; got 0.", None)
    assert cli.is_user_error(err.value)


@pytest.mark.parametrize("bindings, message", [
    (["train.epochs = [1,"], "gin syntax error: EOF in multi-line statement (an unclosed "
                             "bracket, brace or string in a binding)."),
    (["train.epochs = %EPOCHS"], "gin macro %EPOCHS is used but never bound (bind it: EPOCHS "
                                 "= ...)."),
    (["train.epochs = 3 x"], "gin syntax error: Expected newline (bindings string line 1: "
                             "train.epochs = 3 x)."),
])
def test_gin_parse_errors_in_one_line(fresh_phase, bindings, message):
    with pytest.raises(Exception) as err:
        config.parse(["pgd_at_base.gin"], bindings)
    assert cli.is_user_error(err.value)
    assert cli.describe(err.value) == (message, None)


def test_scoped_configurable_errors_name_the_scope(fresh_phase):
    from tfadv.attacks import PGD

    config.parse(["pgd_at_base.gin"], ["train_attack/PGD.eps = -0.1"])
    with pytest.raises(ValueError) as err, gin.config_scope("train_attack"):
        PGD()
    assert cli.describe(err.value) == (
        "train_attack/PGD.eps must be a number >= 0.0; got -0.1.", None)


def test_missing_pseudo_labels_give_a_hint(fresh_phase, tmp_path):
    from tfadv import data

    config.parse(["pgd_at_base.gin"], [f"load_dataset.pseudo_labeled = '{tmp_path}/none.npz'"])
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset()
    assert cli.describe(err.value) == (
        f"load_dataset.pseudo_labeled file '{tmp_path}/none.npz' does not exist.",
        "create it with bin/pseudo_label (bin/pseudo_label --gin_file=rst_teacher.gin writes "
        "runs/rst_teacher/pseudo_labeled.npz), or bind load_dataset.pseudo_labeled to the file it "
        "wrote.")


def test_corrupt_models_are_user_errors(tmp_path):
    """The messages of the other corrupt-model inputs (the subprocess table has one of each)."""
    from tfadv import rundir

    _make_files(tmp_path)
    for name, message in [
        ("truncated.keras", f"{tmp_path}/truncated.keras is not a valid .keras file (truncated "
                            f"or corrupt: not a zip archive)."),
        ("empty_dir", f"{tmp_path}/empty_dir is not a SavedModel, a .keras file or a bin/train "
                      f"model_dir."),
    ]:
        with pytest.raises(cli.UserError) as err:
            rundir.load_classifier(str(tmp_path / name), name="--model")
        assert cli.describe(err.value) == (message, None)
