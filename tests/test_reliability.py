"""Runs that never lose work: fault injection on the real `bin/train` (BUILD.md, "Reliability").

Every scenario below is a sequence of `bin/train` processes on one model_dir, with faults
injected through `tfadv.faults` (``TFADV_FAULT``: SIGKILL or a full disk at a named point) and
files truncated between them. The scenarios run on the background lane (this file is also the
script that runs them: ``python tests/test_reliability.py <scenario> <dir>``); the tests then
check what the processes printed and left on disk:

- a run killed at any of 13 points (mid-epoch, mid-checkpoint, before a checkpoint's manifest,
  after it, while writing best.keras, model.keras, report.json) across four defenses (PGD-AT,
  TRADES+AWP, early stopping, Free AT with its catastrophic-overfitting monitor) and resumed
  ends with the uninterrupted run's weights (within 1e-6) and report;
- a truncated checkpoint data file or manifest makes the resume fall back to the previous
  checkpoint with one warning line;
- a full disk while writing a checkpoint: a one-line error, the previous checkpoint intact;
- a resume with other bindings, a second writer (a live lock), a rerun of a finished run: each
  refused with one line and exit status 2, nothing changed;
- a diverging run (learning rate 1e30): exit status 4 naming the epoch and step, no model,
  report or export; --restart then keeps it under previous/;
- --extend trains a finished run on, keeping the old report under previous/;
- every file a run writes has the mode the umask gives.
"""

import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "results.json"

# Small and fast: 3 digit classes (380 training images, 6 steps of 64), 4 epochs, a 2-step
# test PGD and no AutoAttack in the final report (its verdict is then unreliable, hence
# --allow_unreliable: these tests are about the run, not the number).
COMMON = ["load_dataset.classes = [0, 1, 2]", "train.epochs = 4", "train.verbose = 2",
          "val_attack/PGD.steps = 2", "test_attack/PGD.steps = 2", "evaluate.sanity = False",
          "evaluate.autoattack = None"]
DEFENSES = {
    "pgd_at": ("pgd_at_base.gin", []),
    "trades_awp": ("trades_awp.gin", ["AWP.warmup_epochs = 1"]),
    "early_stopping": ("early_stopping.gin", ["train.validation_freq = 1",
                                              "load_dataset.labeled_fraction = None"]),
    "free_at": ("free_at.gin", ["FreeAdversarialTraining.replays = 2",
                                "CatastrophicOverfittingMonitor.num_examples = 32"]),
}

# Scenario steps: ("run", fault or None, extra bindings, extra flags) or ("truncate", glob).
KILL = "{}:kill"
CHAINS = {
    "pgd_at": [
        ("run", KILL.format("train_batch@9"), [], []),            # 1: mid epoch 2
        ("run", KILL.format("checkpoint.data@1"), [], []),        # 2: data written, no manifest
        ("run", KILL.format("write:ckpt-2.json@1"), [], []),      # 3: manifest not renamed yet
        ("run", None, ["train.learning_rate = 0.5"], []),         # other bindings: refused
        ("run", KILL.format("checkpoint.committed@2"), [], []),   # 4: right after epoch 3
        ("truncate", "checkpoints/ckpt-3.data-*"),                # -> falls back to epoch 2
        ("run", "checkpoint.data@1:enospc", [], []),              # full disk at epoch 3
        ("run", KILL.format("write:model.keras@1"), [], []),      # 5: final model not renamed
        ("run", KILL.format("write:report.json@1"), [], []),      # 6: evaluated, no report
        ("run", None, [], []),
        ("run", None, [], []),                                    # rerun: refused
        ("run", None, ["train.epochs = 5"], ["--extend"]),
    ],
    "trades_awp": [
        ("run", KILL.format("train_batch@4"), [], []),            # 7: mid epoch 1
        ("run", KILL.format("checkpoint.committed@2"), [], []),   # 8: after epoch 2
        ("truncate", "checkpoints/ckpt-2.json"),                  # manifest -> epoch 1
        ("run", KILL.format("train_batch@8"), [], []),            # 9: mid epoch 3 (AWP on)
        ("run", None, [], []),
    ],
    "early_stopping": [
        ("run", KILL.format("write:best.keras@2"), [], []),       # 10: best.keras of epoch 2
        ("run", KILL.format("checkpoint.committed@2"), [], []),   # 11: after epoch 3
        ("run", None, [], []),
    ],
    "free_at": [
        ("run", KILL.format("train_batch@5"), [], []),            # 12: mid epoch 1
        ("run", KILL.format("checkpoint.begin@2"), [], []),       # 13: before checkpoint 2
        ("run", None, [], []),
    ],
    "diverge": [
        ("run", None, ["train.learning_rate = 1e30"], []),
        ("run", None, [], ["--restart"]),
    ],
}


# The other families, interrupted (KeyboardInterrupt after the checkpoint of epoch 1) and
# resumed in one process each: cheaper than a kill (no TensorFlow start per run), the same
# restore path. 2 epochs.
FAMILIES = {
    "fast_at": ("fast_at.gin", ["CatastrophicOverfittingMonitor.num_examples = 32"]),
    "mmc": ("mmc.gin", []),
    "ibp": ("ibp.gin", ["IntervalBoundPropagation.warmup_steps = 3",
                        "IntervalBoundPropagation.rampup_steps = 6"]),
    "smoothing": ("smoothing.gin", []),
    "rst": ("rst.gin", ["train.validation_freq = 1"]),
}


def run_families(directory):
    """Each of `FAMILIES` uninterrupted, then interrupted after epoch 1 and resumed; writes the
    largest weight difference and the resumed report's ``resumes`` per family."""
    os.environ.pop("TFADV_FAULT", None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np

    from tfadv import config, data, faults, rundir
    from tfadv import train as train_lib

    arrays = data.digits_arrays()["train"]
    pseudo = os.path.join(directory, "pseudo_labeled.npz")
    data.write_pseudo_labeled(pseudo, arrays[0][:90], np.arange(90) % 3, {"note": "test"})
    results = {}
    for family, (gin_file, extra) in FAMILIES.items():
        bindings = [*COMMON, "train.epochs = 2", *extra,
                    f"load_dataset.pseudo_labeled = {pseudo!r}" if family == "rst" else ""]
        dirs = {"reference": os.path.join(directory, family, "reference"),
                "run": os.path.join(directory, family, "run")}
        interrupted = False
        for name, fault in (("reference", None), ("run", "checkpoint.committed@1:interrupt"),
                            ("run", None)):
            faults.reset()
            os.environ.pop("TFADV_FAULT", None)
            if fault:
                os.environ["TFADV_FAULT"] = fault
            config.parse([gin_file], [b for b in bindings if b])
            try:
                train_lib.train(dirs[name])
            except KeyboardInterrupt:
                interrupted = True
        os.environ.pop("TFADV_FAULT", None)
        weights = [_weights(d) for d in dirs.values()]
        report = rundir.read_json(os.path.join(dirs["run"], "report.json"))
        results[family] = {
            "interrupted": interrupted, "resumes": report["resumes"],
            "max_difference": max(float(np.abs(a - b).max())
                                  for a, b in zip(*weights, strict=True))}
    with open(os.path.join(directory, RESULTS), "w") as f:
        json.dump(results, f)


def command(defense, bindings=(), flags=(), model_dir=None):
    gin_file, extra = DEFENSES[defense]
    params = [*COMMON, *extra, *bindings]
    return [sys.executable, os.path.join(ROOT, "bin", "train"), f"--gin_file={gin_file}",
            f"--model_dir={model_dir}", "--allow_unreliable", *flags,
            *[f"--gin_param={p}" for p in params]]


def run_scenario(name, directory):
    """Runs the reference run and the chain of ``name`` under ``directory``; writes what every
    process returned to ``directory/results.json``."""
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env.pop("TFADV_FAULT", None)
    defense = "pgd_at" if name == "diverge" else name
    steps = []
    if name != "diverge":
        proc = subprocess.run(command(defense, model_dir=os.path.join(directory, "reference")),
                              capture_output=True, text=True, env=env, timeout=600)
        steps.append({"step": "reference", "rc": proc.returncode, "stdout": proc.stdout,
                      "stderr": proc.stderr})
    model_dir = os.path.join(directory, "run")
    for step in CHAINS[name]:
        if step[0] == "truncate":
            for file in glob.glob(os.path.join(model_dir, step[1])):
                size = os.path.getsize(file)
                with open(file, "r+b") as f:
                    f.truncate(size // 2)
            steps.append({"step": f"truncate {step[1]}"})
            continue
        _, fault, bindings, flags = step
        step_env = dict(env, **({"TFADV_FAULT": fault} if fault else {}))
        proc = subprocess.run(command(defense, bindings, flags, model_dir), capture_output=True,
                              text=True, env=step_env, timeout=600)
        steps.append({"step": f"run {fault} {bindings} {flags}", "rc": proc.returncode,
                      "stdout": proc.stdout, "stderr": proc.stderr,
                      "report": _read(os.path.join(model_dir, "report.json"))})
    with open(os.path.join(directory, RESULTS), "w") as f:
        json.dump(steps, f)


def _read(file):
    try:
        with open(file, "rb") as f:
            return f.read().decode()
    except OSError:
        return None


def _weights(model_dir, name="model.keras"):
    import keras

    return keras.models.load_model(os.path.join(model_dir, name)).get_weights()


if __name__ == "__main__":
    if sys.argv[1] == "families":
        run_families(sys.argv[2])
    else:
        run_scenario(sys.argv[1], sys.argv[2])
    sys.exit(0)

# --- the tests ----------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DIRS = {}


def start_background(lane, tmp_path_factory):
    for name in [*CHAINS, "families"]:
        DIRS[name] = str(tmp_path_factory.mktemp(f"reliability_{name}"))
        lane.submit(f"test_reliability {name}",
                    [sys.executable, os.path.abspath(__file__), name, DIRS[name]], 1500)


def _scenario(lane, name):
    proc = lane.result(f"test_reliability {name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(DIRS[name], RESULTS)) as f:
        return json.load(f)


STALE = "tfadv: warning: taking over the stale lock of process "


def _errors(stderr):
    """The lines tfadv printed to stderr (TF's own C++ log lines and the takeover of the lock a
    killed run left, checked separately, dropped)."""
    return [line for line in stderr.splitlines()
            if line.startswith("tfadv:") and not line.startswith(STALE)]


def _assert_same_history(got, expected):
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6, err_msg=key)


def _assert_same_run(directory):
    reference, run = os.path.join(directory, "reference"), os.path.join(directory, "run")
    for a, b in zip(_weights(reference), _weights(run), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    ref = json.load(open(os.path.join(reference, "report.json")))
    got = json.load(open(os.path.join(run, "report.json")))
    for key in ("clean_accuracy", "robust_accuracy", "worst_case_accuracy", "headline"):
        assert got[key] == ref[key], key
    _assert_same_history(got["history"], ref["history"])  # the whole run's, across resumes
    assert got["resumes"] and not ref["resumes"]
    return ref, got


def test_pgd_at_killed_six_times_ends_as_the_uninterrupted_run(background_lane):
    steps = _scenario(background_lane, "pgd_at")
    assert steps[0]["rc"] == 0, steps[0]["stderr"][-2000:]
    rc = [s.get("rc") for s in steps[1:]]
    # kill, kill, kill, refused, kill, (truncate), disk full, kill, kill, done, refused, extend
    assert rc == [-9, -9, -9, 2, -9, None, 1, -9, -9, 0, 2, 0], [s["step"] for s in steps]
    # Every kill leaves its lock behind; the next run takes it over with one warning line.
    taken = [line for line in steps[2]["stderr"].splitlines() if line.startswith(STALE)]
    assert len(taken) == 1 and taken[0].endswith(
        f"(no longer running) on {os.path.join(DIRS['pgd_at'], 'run')}"), taken
    refused = _errors(steps[4]["stderr"])
    assert refused[0].startswith("tfadv: error: model_dir ") and "other gin bindings" in (
        refused[0])
    assert "train.learning_rate: @PiecewiseConstant() in the run, 0.5 now" in refused[0]
    disk = _errors(steps[7]["stderr"])
    assert any("checkpoint after epoch 3 is unusable (ckpt-3.data-00000-of-00001 is truncated"
               in line for line in disk), disk
    assert disk[-1] == ("tfadv: error: could not write the checkpoint after epoch 3 ([Errno 28] "
                        "No space left on device (injected at checkpoint.data)); the checkpoint "
                        "after epoch 2 is intact and a rerun resumes from it."), disk
    assert "resuming from the checkpoint after epoch 2" in steps[8]["stdout"]
    assert "resuming from the checkpoint after epoch 4" in steps[9]["stdout"]  # nothing to train


def test_pgd_at_final_state_and_refusals(background_lane):
    steps = _scenario(background_lane, "pgd_at")
    directory = DIRS["pgd_at"]
    run = os.path.join(directory, "run")
    # The finished run, before --extend moved its outputs aside, equals the reference.
    finished_report = steps[10]["report"]
    aside = glob.glob(os.path.join(run, "previous", "*"))
    assert len(aside) == 1 and open(os.path.join(aside[0], "report.json")).read() == (
        finished_report)
    ref_weights = _weights(os.path.join(directory, "reference"))
    for a, b in zip(ref_weights, _weights(aside[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    ref = json.load(open(os.path.join(directory, "reference", "report.json")))
    old = json.loads(finished_report)
    assert old["headline"] == ref["headline"]
    _assert_same_history(old["history"], ref["history"])
    # The resumes that led to the final checkpoints (those of killed attempts that committed
    # nothing left no trace): after epoch 1 (kills 1-4), 2 (the truncated and the full-disk
    # epoch 3) and 4 (the kill while writing model.keras; the report kill repeats it).
    assert old["resumes"] == [1, 2, 4]
    # The rerun on the finished run changed nothing.
    rerun = _errors(steps[11]["stderr"])
    assert rerun[0].startswith("tfadv: error: model_dir ") and "holds a finished run (4 epochs" in (
        rerun[0])
    assert rerun[1].startswith("tfadv: hint: to train it further, raise train.epochs and pass "
                               "--extend")
    assert steps[11]["report"] == finished_report
    # --extend trained epoch 5 on from the checkpoint of epoch 4.
    new = json.load(open(os.path.join(run, "report.json")))
    assert new["epochs"] == 5 and len(new["history"]["loss"]) == 5
    assert new["history"]["loss"][:4] == pytest.approx(old["history"]["loss"])
    # No temporary file, lock or stale checkpoint is left; files follow the umask (0644/0755).
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(run):
        for name in files:
            assert not name.startswith(".tmp-"), name
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            assert mode == 0o666 & ~mask, (os.path.join(root, name), oct(mode))
        for name in dirs:
            assert not name.endswith("_temp"), name
    assert not os.path.exists(os.path.join(run, "lock"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        f"ckpt-{e}.{ext}" for e in (4, 5) for ext in ("data-00000-of-00001", "index", "json")]


@pytest.mark.parametrize("name", ["trades_awp", "early_stopping", "free_at"])
def test_other_defenses_killed_and_resumed_end_as_the_uninterrupted_run(background_lane, name):
    steps = _scenario(background_lane, name)
    assert steps[0]["rc"] == 0, steps[0]["stderr"][-2000:]
    assert steps[-1]["rc"] == 0, steps[-1]["stderr"][-3000:]
    assert all(s.get("rc") in (None, -9) for s in steps[1:-1]), [s.get("rc") for s in steps]
    ref, got = _assert_same_run(DIRS[name])
    if name == "trades_awp":
        # The truncated manifest of epoch 2: one warning, then the checkpoint of epoch 1.
        warned = _errors(steps[4]["stderr"])
        assert warned == ["tfadv: warning: checkpoint after epoch 2 is unusable (its manifest "
                          "is unreadable (Expecting ',' delimiter: line 1 column 2 (char 1)));"
                          " falling back to the previous one"] or (
            len(warned) == 1 and "checkpoint after epoch 2 is unusable (its manifest" in
            warned[0]), warned
        assert "resuming from the checkpoint after epoch 1" in steps[4]["stdout"]
    if name == "early_stopping":
        assert got["early_stopping"] == ref["early_stopping"]
        for a, b in zip(_weights(os.path.join(DIRS[name], "reference"), "best.keras"),
                        _weights(os.path.join(DIRS[name], "run"), "best.keras"), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    if name == "free_at":
        logs = [json.load(open(os.path.join(DIRS[name], d, "catastrophic_overfitting.json")))
                for d in ("reference", "run")]
        assert logs[0] == logs[1]


def test_a_diverging_run_stops_at_once_and_restart_keeps_it(background_lane):
    steps = _scenario(background_lane, "diverge")
    run = os.path.join(DIRS["diverge"], "run")
    diverged = steps[0]
    assert diverged["rc"] == 4, diverged["stderr"][-2000:]
    lines = _errors(diverged["stderr"])
    assert len(lines) == 2, lines
    # Either the step's loss is already non-finite, or (on CPUs where it stays finite one step
    # longer) the weights are caught at the end of the epoch: both stop before any checkpoint.
    if lines[0].startswith("tfadv: error: training diverged at epoch 1, step "):
        assert "the loss is nan" in lines[0] or "the loss is inf" in lines[0]
        assert lines[0].endswith("no checkpoint had been written, and nothing was evaluated or "
                                 "exported.")
        assert lines[1].startswith("tfadv: hint: the likely cause is a learning rate 1e+30 too "
                                   "high")
    else:
        assert re.match(r"tfadv: error: training diverged in epoch 1: weight \S+ is not finite; "
                        r"the last good checkpoint is kept and nothing was evaluated or "
                        r"exported\.$", lines[0]), lines[0]
        assert lines[1] == ("tfadv: hint: lower the learning rate (or use float32 instead of "
                            "mixed precision)."), lines[1]
    # Nothing was evaluated, reported or exported; --restart moved the diverged run aside.
    aside = glob.glob(os.path.join(run, "previous", "*"))
    assert len(aside) == 1
    assert not any(os.path.exists(os.path.join(aside[0], f))
                   for f in ("model.keras", "report.json", "eval.json"))
    assert os.path.exists(os.path.join(aside[0], "run.json"))
    assert steps[1]["rc"] == 0, steps[1]["stderr"][-2000:]
    assert "restarting; the previous run is kept in" in steps[1]["stdout"]
    assert json.load(open(os.path.join(run, "report.json")))["epochs"] == 4


def test_a_second_writer_is_refused(tmp_path):
    """A lock held by a live process (this one) refuses the run; a stale lock was taken over in
    the scenarios above (every kill leaves one)."""
    from conftest import run_bin

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname()[1],
                                                "since": "2026-12-02T00:00:00Z"}))
    proc = run_bin("train", *command("pgd_at", model_dir=str(model_dir))[2:])
    assert proc.returncode == 2
    assert _errors(proc.stderr) == [
        f"tfadv: error: model_dir {model_dir} is in use by process {os.getpid()} (since "
        f"2026-12-02T00:00:00Z): one run writes a model_dir at a time.",
        "tfadv: hint: wait for it to finish, or choose another --model_dir."]
    assert sorted(os.listdir(model_dir)) == ["lock"]


def test_the_other_families_resume_bit_identically(background_lane):
    """FGSM-RS (with its monitor), MMC (random targets), IBP (its eps/kappa schedule), Gaussian
    noise training (smoothing) and RST (pseudo-labelled batches) interrupted after epoch 1."""
    results = _scenario(background_lane, "families")
    assert sorted(results) == sorted(FAMILIES)
    for family, result in results.items():
        assert result["interrupted"] and result["resumes"] == [1], (family, result)
        assert result["max_difference"] <= 1e-6, (family, result)
