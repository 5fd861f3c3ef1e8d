"""Acceptance on the embedded digits: the shipped configs, run exactly as the README runs them.

The final report of every bin/train run is headed by the worst case over every attack with the
standard AutoAttack ensemble included, and its verdict (tfadv.evaluation):

- PGD-AT (gin/pgd_at.gin): clean accuracy >= 94%, the headline (AutoAttack) robust accuracy at
  L-inf eps = 0.3 on the whole test split >= 36% (measured: 38.89%, BUILD.md), verdict
  `reliable`, exit status 0; AutoAttack below PGD-40.
- Standard training (gin/standard.gin): PGD-40 < 5%; the headline <= 1%.
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


MODEL_DIRS = {}  # "pgd_at", "standard" -> its --model_dir
BACKGROUND_LAST = True  # the longest runs: the other modules' tests run while they train


def start_background(lane, tmp_path_factory):
    """The README's commands, run on conftest's background lane while the rest of the suite runs
    (these tests run last)."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("pgd_at", "standard")}
    for name in dirs:
        # The timeout only guards against a hang (the run shares the CPU with the other tests).
        lane.submit(f"train {name}", _train_cmd(f"{name}.gin", dirs[name]), timeout=1800,
                    env=ENV)
    MODEL_DIRS.update(dirs)


def _train(lane, name):
    proc = lane.result(f"train {name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(MODEL_DIRS[name], "report.json")) as f:
        return json.load(f), proc.stdout


@pytest.fixture(scope="module")
def pgd_at_run(background_lane):
    return _train(background_lane, "pgd_at")


@pytest.fixture(scope="module")
def standard_run(background_lane):
    return _train(background_lane, "standard")


def test_pgd_at_default_config_is_robust_under_autoattack(pgd_at_run):
    report, stdout = pgd_at_run
    head = report["headline"]
    assert report["clean_accuracy"] >= 0.94
    assert head["autoattack"] == "standard" and head["verdict"] == "reliable", head
    assert head["accuracy"] >= 0.36, head
    accs = report["robust_accuracy"]
    assert head["accuracy"] == report["worst_case_accuracy"] <= accs["autoattack"]
    assert accs["autoattack"] <= accs["PGD-40"] <= accs["FGSM"] + 0.01
    failed = [c for c in report["sanity_checks"]
              if c["passed"] is False and c["affects_headline"]]
    assert not failed, report["sanity_checks"]
    # The headline and its verdict are printed on one line, first and last of the table.
    lines = [line for line in stdout.splitlines() if line.startswith("ROBUST ACCURACY")]
    assert len(lines) == 2 and f"{100 * head['accuracy']:.2f}%  [reliable]" in lines[0]


def test_standard_training_baseline_is_not_robust(standard_run):
    report, _ = standard_run
    assert report["clean_accuracy"] >= 0.94
    assert report["robust_accuracy"]["PGD-40"] < 0.05
    assert report["headline"]["accuracy"] <= 0.01
    assert report["robust_accuracy"]["autoattack"] <= 0.01
