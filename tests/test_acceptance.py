"""Acceptance on the embedded digits: the shipped configs, run exactly as the README runs them.

PGD-AT (gin/pgd_at.gin): clean accuracy >= 94% and PGD-40 robust accuracy >= 45% at L-inf
eps = 0.3 on the test split. The standard-training baseline (gin/standard.gin): PGD-40 < 5%.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(gin_file, model_dir):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "train"), f"--gin_file={gin_file}",
         f"--model_dir={model_dir}", "--gin_param=train.verbose = 2"],
        capture_output=True, text=True, timeout=900,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(model_dir, "report.json")) as f:
        return json.load(f)


def test_pgd_at_default_config_is_robust(tmp_path):
    report = _train("pgd_at.gin", tmp_path / "pgd_at")
    assert report["clean_accuracy"] >= 0.94
    assert report["robust_accuracy"]["PGD-40"] >= 0.45
    assert report["robust_accuracy"]["PGD-40"] <= report["robust_accuracy"]["FGSM"] + 0.02


def test_standard_training_baseline_is_not_robust(tmp_path):
    report = _train("standard.gin", tmp_path / "standard")
    assert report["clean_accuracy"] >= 0.94
    assert report["robust_accuracy"]["PGD-40"] < 0.05
