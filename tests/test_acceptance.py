"""Acceptance on the embedded digits: the shipped configs, run exactly as the README runs them,
then attacked by bin/evaluate with PGD-20 and AutoAttack on the first 100-120 test digits.

- PGD-AT (gin/pgd_at.gin): clean accuracy >= 94% and PGD-40 robust accuracy >= 45% at L-inf
  eps = 0.3 on the test split; the AutoAttack ensemble's robust accuracy <= PGD-20's.
- Standard training (gin/standard.gin): PGD-40 < 5%; AutoAttack <= 1%.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _train_cmd(gin_file, model_dir):
    return [sys.executable, os.path.join(ROOT, "bin", "train"), f"--gin_file={gin_file}",
            f"--model_dir={model_dir}", "--gin_param=train.verbose = 2"]


def _evaluate_cmd(model_dir, max_examples):
    # The sanity checks already ran in bin/train's report; here the attacks alone, on a prefix of
    # the test split (AutoAttack costs about 0.35 s per digit on 2 cores).
    return [sys.executable, os.path.join(ROOT, "bin", "evaluate"), f"--model={model_dir}",
            "--eps=0.3", "--attacks=pgd20,autoattack", "--sanity=false",
            f"--max_examples={max_examples}"]


MODEL_DIRS = {}  # "pgd_at", "standard" -> its --model_dir
BACKGROUND_LAST = True  # the longest runs: the other modules' tests run while they train


def start_background(lane, tmp_path_factory):
    """The README's commands, run on conftest's background lane while the rest of the suite runs
    (these tests run last): both trainings, then bin/evaluate on each trained model."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("pgd_at", "standard")}
    for name in dirs:
        # The timeout only guards against a hang (the run shares the CPU with the other tests).
        lane.submit(f"train {name}", _train_cmd(f"{name}.gin", dirs[name]), timeout=1800,
                    env=ENV)
    lane.submit("evaluate pgd_at", _evaluate_cmd(dirs["pgd_at"], 120), timeout=1200, env=ENV)
    lane.submit("evaluate standard", _evaluate_cmd(dirs["standard"], 100), timeout=1200, env=ENV)
    MODEL_DIRS.update(dirs)


def _train(lane, name):
    proc = lane.result(f"train {name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(MODEL_DIRS[name], "report.json")) as f:
        return json.load(f)


def _evaluate(lane, model_dir):
    name = next(n for n, d in MODEL_DIRS.items() if d == model_dir)
    proc = lane.result(f"evaluate {name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(model_dir, "eval", "eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pgd_at_run(background_lane):
    return MODEL_DIRS["pgd_at"], _train(background_lane, "pgd_at")


@pytest.fixture(scope="module")
def standard_run(background_lane):
    return MODEL_DIRS["standard"], _train(background_lane, "standard")


def test_pgd_at_default_config_is_robust(pgd_at_run):
    _, report = pgd_at_run
    assert report["clean_accuracy"] >= 0.94
    assert report["robust_accuracy"]["PGD-40"] >= 0.45
    assert report["robust_accuracy"]["PGD-40"] <= report["robust_accuracy"]["FGSM"] + 0.01
    assert all(c["passed"] for c in report["sanity_checks"]), report["sanity_checks"]


def test_standard_training_baseline_is_not_robust(standard_run):
    _, report = standard_run
    assert report["clean_accuracy"] >= 0.94
    assert report["robust_accuracy"]["PGD-40"] < 0.05


def test_autoattack_is_at_least_as_strong_as_pgd20_on_the_robust_model(pgd_at_run,
                                                                          background_lane):
    model_dir, _ = pgd_at_run
    result = _evaluate(background_lane, model_dir)  # max_examples=120
    assert result["robust_accuracy"]["autoattack"] <= result["robust_accuracy"]["pgd20"]
    assert result["worst_case_accuracy"] <= result["robust_accuracy"]["autoattack"]
    assert result["robust_accuracy"]["autoattack"] > 0.3  # PGD-AT is robust, not broken


def test_autoattack_breaks_the_standard_model(standard_run, background_lane):
    model_dir, _ = standard_run
    result = _evaluate(background_lane, model_dir)  # max_examples=100
    assert result["robust_accuracy"]["autoattack"] <= 0.01
