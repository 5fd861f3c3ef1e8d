"""tfadv.evaluation and bin/evaluate: worst case, sanity checks that fire, artifacts, loading."""

import io
import json
import os
import subprocess
import sys
import time

import keras
import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

from tfadv import evaluation
from tfadv.attacks import FGSM, PGD
from tfadv.attacks.registry import build_attack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_test(digits, n=96):
    return digits.test.unbatch().take(n).batch(48)


def _wrap(base, fn):
    """A new model computing fn(base(x))."""
    inputs = keras.Input(base.input_shape[1:])
    return keras.Model(inputs, keras.layers.Lambda(fn)(base(inputs)))


def test_worst_case_and_artifacts(trained_digits_model, digits, tmp_path):
    attacks = {"fgsm": FGSM(eps=0.2), "pgd10": build_attack("pgd10", 0.2)}
    result = evaluation.evaluate(trained_digits_model, _small_test(digits), attacks=attacks,
                                 autoattack="fast", output_dir=str(tmp_path), verbose=0)
    n = result["num_examples"]
    assert n == 96
    worst = np.array(result["per_example"]["worst_case"])
    for name in attacks:
        per = np.array(result["per_example"][name])
        assert (worst <= per).all() and (per <= np.array(result["per_example"]["clean"])).all()
        assert result["robust_accuracy"][name] == pytest.approx(per.mean())
    assert result["worst_case_accuracy"] <= min(result["robust_accuracy"].values())
    assert result["robust_accuracy"]["pgd10"] <= result["robust_accuracy"]["fgsm"] + 1 / n
    assert {c["name"] for c in result["sanity_checks"]} == {
        "deterministic", "gradients", "iterative_vs_single_step", "monotone_in_eps",
        "pgd_vs_strongest"}
    assert result["headline"]["verdict"] == "reliable"
    assert all(c["passed"] for c in result["sanity_checks"]), result["sanity_checks"]
    eps_values = [c["eps"] for c in result["robustness_curve"]]
    assert eps_values[0] == 0 and eps_values[-1] == 1.0
    assert result["robustness_curve"][0]["accuracy"] == pytest.approx(result["clean_accuracy"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["robust_accuracy"] == result["robust_accuracy"]
    for png in ("robustness_curve.png", "examples.png"):
        image = matplotlib.image.imread(tmp_path / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.01


def test_probability_outputs_are_rejected(trained_digits_model, digits):
    softmax_model = _wrap(trained_digits_model, tf.nn.softmax)
    with pytest.raises(ValueError, match="outputs probabilities"):
        evaluation.evaluate(softmax_model, _small_test(digits), attacks={}, verbose=0)


def test_wrong_output_or_input_shape_is_rejected(digits):
    inputs = keras.Input((8, 8, 1))
    bad = keras.Model(inputs, keras.layers.Reshape((8, 8))(inputs))
    with pytest.raises(ValueError, match=r"\(batch, num_classes\)"):
        evaluation.evaluate(bad, _small_test(digits), verbose=0)
    other = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="dataset images have shape"):
        evaluation.evaluate(other, _small_test(digits), verbose=0)


def test_saturated_softmax_fails_the_gradient_check(trained_digits_model, digits):
    """Logits x 1e4: cross-entropy gradients underflow to zero, so CE attacks report robustness
    that is not there. The check must say so."""
    scaled = _wrap(trained_digits_model, lambda z: 1e4 * z)
    result = evaluation.evaluate(scaled, _small_test(digits), attacks={"fgsm": FGSM(eps=0.2)},
                                 autoattack=None, remedies=False, curve_fractions=(0.0, 1.0),
                                 verbose=0)
    check = {c["name"]: c for c in result["sanity_checks"]}["gradients"]
    assert check["passed"] is False and "saturated softmax" in check["verdict"]
    assert "WARNING" in evaluation.format_table(result)


def test_randomised_model_fails_the_determinism_check(trained_digits_model, digits):
    noisy = _wrap(trained_digits_model, lambda z: z + tf.random.normal(tf.shape(z)))
    result = evaluation.evaluate(noisy, _small_test(digits), attacks={}, verbose=0)
    check = {c["name"]: c for c in result["sanity_checks"]}["deterministic"]
    assert check["passed"] is False and "EOT" in check["verdict"]


def test_iterative_weaker_than_single_step_is_flagged(trained_digits_model, digits):
    # A "PGD" with a uselessly small step is weaker than FGSM: the check must notice.
    weak = PGD(eps=0.2, step_size=1e-5, steps=5, random_start=None)
    result = evaluation.evaluate(trained_digits_model, _small_test(digits),
                                 attacks={"fgsm": FGSM(eps=0.2), "weak": weak}, autoattack=None,
                                 curve_fractions=(0.0, 1.0), verbose=0)
    check = {c["name"]: c for c in result["sanity_checks"]}["iterative_vs_single_step"]
    assert check["passed"] is False


@pytest.mark.parametrize("kind", ["model_dir", "keras", "saved_model"])
def test_load_classifier_from_every_format(trained_digits_model, tmp_path, kind):
    x = np.random.RandomState(0).rand(5, 8, 8, 1).astype("float32")
    if kind == "model_dir":
        trained_digits_model.save(tmp_path / "model.keras")
        path = tmp_path
    elif kind == "keras":
        path = tmp_path / "m.keras"
        trained_digits_model.save(path)
    else:
        path = tmp_path / "sm"
        trained_digits_model.export(str(path), verbose=False)
    loaded = evaluation.load_classifier(str(path))
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(trained_digits_model(x)),
                               atol=1e-5)
    from tfadv.cli import UserError

    with pytest.raises(UserError, match="missing does not exist"):
        evaluation.load_classifier(str(tmp_path / "missing"))


def test_unknown_attack_name():
    with pytest.raises(ValueError, match="unknown attack name 'pgd-fancy'"):
        build_attack("pgd-fancy", 0.3)


def _evaluate_cmd(args):
    return [sys.executable, os.path.join(ROOT, "bin", "evaluate"), *args]


def _evaluate_cli(args):
    return subprocess.run(_evaluate_cmd(args), capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_bin_evaluate_end_to_end(trained_digits_model, tmp_path):
    trained_digits_model.save(tmp_path / "model.keras")
    # The default --attacks: --autoattack=fast replaces its standard AutoAttack.
    proc = _evaluate_cli([f"--model={tmp_path}", "--eps=0.2", "--max_examples=64",
                          "--autoattack=fast"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["num_examples"] == 64
    assert set(result["robust_accuracy"]) == {"fgsm", "pgd20", "autoattack-fast"}
    assert result["headline"]["autoattack"] == "fast"
    assert "worst case" in proc.stdout and "[PASS] gradients" in proc.stdout
    assert proc.stdout.splitlines()[-2].startswith("ROBUST ACCURACY")  # then "wrote ..."
    assert "[reliable]" in proc.stdout and "FAST" in proc.stdout
    assert (tmp_path / "eval" / "robustness_curve.png").exists()


BAD_INPUT = [
    (["--eps=-1"], "--eps must be >= 0"),
    (["--attacks=fgsm,boom"], "unknown attack name 'boom'"),
    ([], "--eps is required: "),  # a .keras file outside a bin/train run: no eps of its own
]


UNRELIABLE = {}  # flags -> the bin/evaluate run on a saturated-softmax model


def start_background(lane, tmp_path_factory):
    """The rejected command lines run on conftest's background lane (the end-to-end run above
    needs the session's trained model, so it stays in the foreground), and bin/evaluate on a
    model whose logits are scaled by 1e4 (a saturated softmax: the verdict is unreliable)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    from tfadv import models

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    saturated = keras.Model(inputs, keras.layers.Rescaling(1e4)(models.digits_cnn()(inputs)))
    path = tmp_path_factory.mktemp("saturated") / "saturated.keras"
    saturated.save(path)
    for args, _ in BAD_INPUT:  # on a model outside any bin/train run
        lane.submit(f"test_evaluation {args}", _evaluate_cmd([f"--model={path}", *args]), 600,
                    env)
    for extra in ([], ["--allow_unreliable"]):
        out = tmp_path_factory.mktemp("saturated_eval")
        UNRELIABLE[tuple(extra)] = out
        lane.submit(f"test_evaluation unreliable {extra}", _evaluate_cmd(
            [f"--model={path}", "--attacks=pgd10", "--eps=0.2", "--max_examples=16",
             "--autoattack=fast", "--remedies=false", f"--output_dir={out}", *extra]), 600, env)


@pytest.mark.parametrize("extra", [[], ["--allow_unreliable"]])
def test_bin_evaluate_exit_status_of_an_unreliable_headline(background_lane, extra):
    proc = background_lane.result(f"test_evaluation unreliable {extra}")
    expected = 0 if extra else evaluation.UNRELIABLE_EXIT_CODE
    assert proc.returncode == expected, proc.stderr[-3000:]
    result = json.loads((UNRELIABLE[tuple(extra)] / "eval.json").read_text())
    assert result["headline"]["verdict"].startswith("unreliable: gradients")
    head = [line for line in proc.stdout.splitlines() if line.startswith("ROBUST ACCURACY")]
    assert head and "[unreliable: gradients" in head[0]
    if not extra:
        assert "--allow_unreliable" in proc.stderr


@pytest.mark.parametrize("args, needle", BAD_INPUT)
def test_bin_evaluate_rejects_bad_input(background_lane, args, needle):
    proc = background_lane.result(f"test_evaluation {args}")
    assert proc.returncode == 2 and needle in proc.stderr
    if not args:
        assert "is not in a bin/train model_dir (whose threat model would be the default)" in \
            proc.stderr and not proc.stdout  # nothing written, not even the output directory


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_lines_on_a_terminal_and_elsewhere():
    """Not a terminal (a log, bin/train under a scheduler): a plain line per stage and then one
    every ``interval`` seconds, never a carriage return. A terminal: one line redrawn."""
    log = _Stream(tty=False)
    progress = evaluation.Progress(100, stream=log, interval=0.05)
    progress.set_stage("autoattack")
    progress.set_detail("apgd-t on 10 examples")
    time.sleep(0.4)
    progress.add(50)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\033" not in log.getvalue()
    periodic = [line for line in lines if "autoattack (apgd-t on 10 examples)" in line]
    assert len(periodic) >= 2, lines
    assert lines[0].startswith("evaluate [") and lines[-1].startswith("evaluate: done in")
    terminal = _Stream(tty=True)
    progress = evaluation.Progress(10, stream=terminal, interval=0.05)
    progress.set_stage("fgsm")
    progress.add(5)
    time.sleep(0.2)
    progress.close()
    text = terminal.getvalue()
    assert text.count("\r") >= 3 and " 50%  fgsm" in text  # redrawn, the clock too
    assert text.index("\n") > text.rindex("\r") and text.endswith("evaluate: done in 0:00\n")


def test_out_of_range_dataset_is_refused(trained_digits_model, digits):
    scaled = _small_test(digits).map(lambda x, y: (255 * x, y))
    with pytest.raises(ValueError, match=r"span \[0, 255\].*tfadv.evaluate\(model, x, y, "
                                         r"\.\.\., input_range=\(0, 255\)\)"):
        evaluation.evaluate(trained_digits_model, scaled, verbose=0)


def test_rescaled_logits_do_not_inflate_the_worst_case(trained_digits_model, digits):
    """Logits x 1e4 fool cross-entropy PGD (its gradients underflow), not the scale-invariant
    DLR attack, so the worst case stays at the level DLR finds on the unscaled model."""
    from tfadv.attacks import APGD

    def evaluate(model):
        attacks = {"pgd10": build_attack("pgd10", 0.2),
                   "apgd-dlr": APGD(0.2, steps=20, loss="dlr")}
        return evaluation.evaluate(model, _small_test(digits), attacks=attacks, sanity=False,
                                   autoattack=None, verbose=0)

    plain = evaluate(trained_digits_model)
    scaled = evaluate(_wrap(trained_digits_model, lambda z: 1e4 * z))
    summary = (plain["robust_accuracy"], scaled["robust_accuracy"])
    assert scaled["robust_accuracy"]["pgd10"] > plain["robust_accuracy"]["pgd10"] + 0.2, summary
    dlr = plain["robust_accuracy"]["apgd-dlr"]
    assert abs(scaled["robust_accuracy"]["apgd-dlr"] - dlr) <= 2 / 96, summary
    assert scaled["worst_case_accuracy"] <= dlr + 2 / 96, summary


def test_masked_gradients_are_caught_by_the_black_box_attack(trained_digits_model, digits):
    """Quantised inputs with a zero gradient: gradient attacks fail, Square does not, and the
    black-box check says so."""
    from tfadv.attacks import Square

    inputs = keras.Input((8, 8, 1))
    quantised = keras.layers.Lambda(lambda t: tf.stop_gradient(tf.round(t * 8) / 8))(inputs)
    masked = keras.Model(inputs, trained_digits_model(quantised))
    attacks = {"fgsm": FGSM(eps=0.3), "pgd10": build_attack("pgd10", 0.3),
               "square": Square(0.3, n_queries=300)}
    result = evaluation.evaluate(masked, _small_test(digits), attacks=attacks, autoattack=None,
                                 remedies=False, curve_fractions=(0.0, 1.0), verbose=0)
    checks = {c["name"]: c for c in result["sanity_checks"]}
    assert checks["gradients"]["passed"] is False
    assert checks["black_box_vs_white_box"]["passed"] is False
    assert "masked" in checks["black_box_vs_white_box"]["verdict"]
    assert result["worst_case_accuracy"] <= result["robust_accuracy"]["square"]
    assert result["robust_accuracy"]["square"] < result["robust_accuracy"]["pgd10"] - 0.3
