"""RobustEarlyStopping (Rice et al. 2020): best checkpoint, patience, resume, bin/train report."""

import glob
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import quick_train
from tfadv.checkpoint import RobustEarlyStopping


def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


def _drive(callback, model, values, start=0):
    """Feeds ``values`` as the monitored log of epochs start, start+1, ...; before each epoch end
    the model's weights are set to the epoch number, so saved checkpoints are identifiable."""
    callback.set_model(model)
    model.stop_training = getattr(model, "stop_training", False)
    callback.on_train_begin()
    for epoch, value in enumerate(values, start=start):
        model.set_weights([np.full(w.shape, epoch, "float32") for w in model.get_weights()])
        logs = {} if value is None else {"val_robust_accuracy": value}
        callback.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback.on_train_end()


def test_keeps_the_best_checkpoint_and_skips_epochs_without_validation(tmp_path):
    base = _model()
    callback = RobustEarlyStopping()
    callback.attach(str(tmp_path), base)
    _drive(callback, base, [0.1, None, 0.4, 0.3, 0.35])
    assert callback.state["best"] == 0.4 and callback.state["best_epoch"] == 3
    best = keras.models.load_model(tmp_path / "best.keras")
    assert np.all(best.get_weights()[0] == 2)  # saved at epoch index 2 (epoch 3)
    state = json.loads((tmp_path / "early_stopping.json").read_text())
    assert state == {"best": 0.4, "best_epoch": 3, "wait": 2, "stopped_epoch": None}
    # The TensorBoard curves of the best value and the selected epoch.
    tags = {}
    for path in glob.glob(str(tmp_path / "tensorboard" / "early_stopping" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append(float(tf.make_ndarray(v.tensor)))
    assert tags["best_val_robust_accuracy"] == pytest.approx([0.1, 0.4, 0.4, 0.4])
    assert tags["selected_epoch"] == [1, 3, 3, 3]


def test_patience_stops_and_a_resumed_run_continues_the_state(tmp_path):
    base = _model()
    callback = RobustEarlyStopping(patience=2)
    callback.attach(str(tmp_path), base)
    _drive(callback, base, [0.5, 0.6])  # interrupted after two epochs
    # tfadv.train keeps the state in every checkpoint and hands it back on resume.
    saved = json.loads(json.dumps(callback.get_state()))
    resumed = RobustEarlyStopping(patience=2)
    resumed.attach(str(tmp_path), base)
    assert resumed.state["best"] is None
    resumed.set_state(saved)
    assert resumed.state["best"] == 0.6 and resumed.state["best_epoch"] == 2
    base.stop_training = False
    _drive(resumed, base, [0.55, 0.58, 0.9], start=2)
    assert base.stop_training and resumed.state["stopped_epoch"] == 4
    assert resumed.state["best_epoch"] == 2  # 0.9 came after the stop and was never seen


def test_bad_patience_and_missing_attach():
    with pytest.raises(ValueError, match="patience must be None or an integer >= 1"):
        RobustEarlyStopping(patience=0)
    callback = RobustEarlyStopping()
    with pytest.raises(ValueError, match="attach"):
        callback.on_train_begin()


RUNS = {}  # name -> model_dir of the bin/train runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    RUNS["es"] = tmp_path_factory.mktemp("early_stopping") / "es"
    lane.submit_bin("test_early_stopping es", "train", "--gin_file=early_stopping.gin",
                    f"--model_dir={RUNS['es']}",
                    *quick_train("train.epochs = 6", "train.validation_freq = 2"))


def test_bin_train_reports_selected_and_last_epoch(background_lane):
    model_dir = RUNS["es"]
    proc = background_lane.result("test_early_stopping es")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((model_dir / "report.json").read_text())
    stopping = report["early_stopping"]
    assert stopping["selected_epoch"] in (2, 4, 6)
    history = report["history"]["val_robust_accuracy"]
    assert len(history) == 3 and stopping["selected_value"] == pytest.approx(max(history))
    assert history.index(max(history)) == stopping["selected_epoch"] // 2 - 1
    assert set(report["last"]["robust_accuracy"]) == {"FGSM", "PGD-40", "autoattack-fast"}
    # model.keras is the selected checkpoint; the last epoch's model is kept next to it.
    chosen = keras.models.load_model(model_dir / "model.keras").get_weights()
    best = keras.models.load_model(model_dir / "best.keras").get_weights()
    last = keras.models.load_model(model_dir / "model_last.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(chosen, best))
    if stopping["selected_epoch"] != 6:
        assert not all(np.array_equal(a, b) for a, b in zip(chosen, last))
    assert f"selected the checkpoint of epoch {stopping['selected_epoch']}" in proc.stdout
