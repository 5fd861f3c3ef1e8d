"""bin/train end to end on digits: artifacts, TensorBoard read back, resume after kill, errors."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["test_attack/PGD.steps = 5", "test_attack/PGD.step_size = 0.1", "train.verbose = 2",
         "evaluate.autoattack = 'fast'"]


def _cmd(model_dir, params, gin_file="pgd_at_base.gin"):
    cmd = [sys.executable, os.path.join(ROOT, "bin", "train"), f"--gin_file={gin_file}",
           f"--model_dir={model_dir}"]
    return cmd + [f"--gin_param={p}" for p in params]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return env


def _run(model_dir, params, timeout=600, **kwargs):
    return subprocess.run(_cmd(model_dir, params, **kwargs), capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _scalars(directory):
    found = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))
                     if value.metadata.plugin_data.plugin_name == "scalars" else value))
    return found


BAD_CONFIGURATIONS = [
    ("train_attack/PGD.eps = -0.1", "eps must be a number >= 0"),
    ("train_attack/PGD.steps = 0", "steps must be an integer >= 1"),
    ("train.epochs = 0", "epochs must be an integer >= 1"),
    ("load_dataset.name = 'imagenet'", "dataset name must be one of"),
    ("train.model = 'resnet9000'", "model must be one of"),
    ("PGD.epsilon = 0.3", "epsilon"),
]
DIRS = {}  # key -> --model_dir of the runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    """The two-epoch run and the failing configurations (the run killed and resumed below stays
    in the foreground: it is timed against the checkpoints)."""
    DIRS["train"] = tmp_path_factory.mktemp("e2e") / "run"
    lane.submit("test_train_e2e train", _cmd(DIRS["train"], ["train.epochs = 2"] + QUICK), 600,
                _env())
    for i, (param, _) in enumerate(BAD_CONFIGURATIONS):
        DIRS[param] = tmp_path_factory.mktemp(f"bad{i}") / "run"
        lane.submit(f"test_train_e2e {param}", _cmd(DIRS[param], [param]), 120, _env())


def test_train_writes_report_model_config_and_tensorboard(background_lane):
    model_dir = DIRS["train"]
    proc = background_lane.result("test_train_e2e train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((model_dir / "report.json").read_text())
    assert 0.0 <= report["clean_accuracy"] <= 1.0
    # The headline: the worst case with AutoAttack (here its fast screen, QUICK) added, and
    # its verdict decides the exit status.
    assert set(report["robust_accuracy"]) == {"FGSM", "PGD-40", "autoattack-fast"}
    assert report["headline"]["accuracy"] == report["worst_case_accuracy"]
    assert report["headline"]["autoattack"] == "fast"
    assert report["headline"]["verdict"] in proc.stdout
    assert report["robust_accuracy"]["PGD-40"] <= report["clean_accuracy"]
    assert report["num_examples"] == 360 and report["epochs"] == 2
    assert "PGD-40" in proc.stdout and "clean" in proc.stdout  # the printed table
    # The final report is tfadv.evaluation's: sanity checks, per-example results, plots.
    assert {c["name"] for c in report["sanity_checks"]} >= {"deterministic", "gradients"}
    evaluated = json.loads((model_dir / "eval.json").read_text())
    assert len(evaluated["per_example"]["worst_case"]) == 360
    assert (model_dir / "robustness_curve.png").exists() and (model_dir / "examples.png").exists()

    # The saved model is the base classifier and reproduces the reported clean accuracy.
    from tfadv import data
    model = keras.models.load_model(model_dir / "model.keras")
    x = np.concatenate([b[0] for b in data.load_dataset().test])
    y = np.concatenate([b[1] for b in data.load_dataset().test])
    accuracy = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    assert abs(accuracy - report["clean_accuracy"]) < 1e-6

    assert "PGDAdversarialTraining.attack" in (model_dir / "config.gin").read_text()

    train = _scalars(model_dir / "tensorboard" / "train")
    val = _scalars(model_dir / "tensorboard" / "validation")
    for tag in ("epoch_loss", "epoch_adv_accuracy", "epoch_learning_rate"):
        assert [step for step, _ in train[tag]] == [0, 1], tag
    np.testing.assert_allclose([v for _, v in train["epoch_loss"]], report["history"]["loss"],
                               rtol=1e-5)
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_robust_accuracy"):
        assert len(val[tag]) == 2, tag
    assert all(v == pytest.approx(1e-3) for _, v in train["epoch_learning_rate"])
    config_events = _scalars(model_dir / "tensorboard" / "config")
    (step, value), = config_events["gin/operative_config"]
    assert value.metadata.plugin_data.plugin_name == "text"
    text = tf.make_ndarray(value.tensor).item().decode()
    assert "PGDAdversarialTraining.attack = @train_attack/PGD()" in text


def test_resume_after_kill_continues_from_last_finished_epoch(tmp_path):
    model_dir = tmp_path / "run"
    params = ["train.epochs = 6"] + QUICK
    proc = subprocess.Popen(_cmd(model_dir, params), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    committed = model_dir / "checkpoints" / "ckpt-2.json"  # the manifest commits epoch 2
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if committed.exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (model_dir / "report.json").exists()

    again = _run(model_dir, params)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((model_dir / "report.json").read_text())
    (resumed,) = report["resumes"]
    assert 2 <= resumed < 6
    assert f"resuming from the checkpoint after epoch {resumed}" in again.stdout
    assert len(report["history"]["loss"]) == 6  # the whole run's history, across the resume


@pytest.mark.parametrize("param, needle", BAD_CONFIGURATIONS)
def test_bad_configuration_fails_before_training(background_lane, param, needle):
    model_dir = DIRS[param]
    proc = background_lane.result(f"test_train_e2e {param}")
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (model_dir / "checkpoints").exists()
