"""Fast adversarial training: Free AT in closed form, catastrophic-overfitting detection."""

import glob
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import linear_model, quick_train
from tfadv import data
from tfadv.defenses import CatastrophicOverfittingMonitor, FreeAdversarialTraining

W = np.array([[1.0, -2.0, 0.5], [0.5, 0.0, -1.0], [-1.0, 3.0, 0.2]], dtype="float32")
X = np.array([[0.2, 0.5, 0.9], [0.6, 0.1, 0.4], [0.3, 0.3, 0.3], [0.9, 0.8, 0.1]],
             dtype="float32")
Y = np.array([0, 1, 2, 1])


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _linear():
    return linear_model(W)


def test_free_at_replays_update_weights_and_carry_the_perturbation():
    eps, lr, m = 0.1, 0.5, 3
    w, delta = W.astype("float64"), np.zeros_like(X, dtype="float64")
    onehot = np.eye(3)[Y]
    for batch in range(2):  # the perturbation carries over to the next minibatch
        for _ in range(m):
            x_adv = np.clip(X + delta, 0, 1)
            residual = (_softmax(x_adv @ w) - onehot) / len(X)
            grad_w, grad_x = x_adv.T @ residual, residual @ w.T  # one backward pass for both
            w = w - lr * grad_w
            delta = np.clip(delta + eps * np.sign(grad_x), -eps, eps)
        if batch == 0:
            after_first = (w.copy(), delta.copy())
    model = FreeAdversarialTraining(_linear(), eps=eps, replays=m, batch_size=6)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    x4 = X.reshape(4, 1, 3, 1)
    model.fit(x4, Y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(model.base_model.get_weights()[0], after_first[0], atol=1e-5)
    np.testing.assert_allclose(model.delta.numpy()[:4].reshape(4, 3), after_first[1], atol=1e-6)
    assert np.all(model.delta.numpy()[4:] == 0)  # rows beyond the batch untouched
    model.fit(x4, Y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(model.base_model.get_weights()[0], w, atol=1e-5)
    assert model.optimizer.iterations.numpy() == 2 * m  # one optimizer update per replay


def test_free_at_rejects_bad_settings():
    for kwargs, needle in [({"eps": 0.0}, "eps must be"), ({"replays": 0}, "replays must be"),
                           ({"batch_size": 0}, "batch_size must be")]:
        with pytest.raises(ValueError, match=needle):
            FreeAdversarialTraining(_linear(), **kwargs)
    model = FreeAdversarialTraining(_linear(), eps=0.1, replays=1, batch_size=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=r"batch_size \(2\) must be at least"):
        model.fit(X.reshape(4, 1, 3, 1), Y, batch_size=4, epochs=1, verbose=0)


class _Scripted(CatastrophicOverfittingMonitor):
    """The detection rule fed with a scripted accuracy sequence (the attacks are exercised by
    the end-to-end test below)."""

    def __init__(self, sequence, **kwargs):
        super().__init__(**kwargs)
        self.sequence = iter(sequence)
        self.current = None

    def on_epoch_end(self, epoch, logs=None):
        self.current = next(self.sequence)
        super().on_epoch_end(epoch, logs)

    def _accuracy(self, attack):
        return self.current[0] if attack is self.pgd else self.current[1]


def test_collapse_is_detected_logged_and_optionally_reverted(tmp_path):
    digits = data.load_dataset("digits", batch_size=64)
    base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10)])
    holder = keras.Model(base.inputs, base.outputs)
    monitor = _Scripted([(0.5, 0.6), (0.55, 0.65), (0.1, 0.9), (0.05, 0.95)], stop=True)
    monitor.attach(str(tmp_path), base, digits)
    monitor.set_model(holder)
    holder.stop_training = False
    weights = []
    for epoch in range(4):
        monitor.on_epoch_begin(epoch)
        weights.append([w + epoch + 1 for w in base.get_weights()])
        base.set_weights(weights[-1])
        monitor.on_epoch_end(epoch)
        if holder.stop_training:
            break
    assert monitor.detected_epoch == 3 and holder.stop_training
    # The weights are those from before epoch 3 (index 2) began, i.e. after epoch 2.
    for restored, expected in zip(base.get_weights(), weights[1]):
        np.testing.assert_array_equal(restored, expected)
    log = json.loads((tmp_path / "catastrophic_overfitting.json").read_text())
    assert log["detected_epoch"] == 3 and [h["detected"] for h in log["history"]] == [
        False, False, True]
    # No collapse when FGSM accuracy falls together with PGD accuracy (a model getting worse).
    quiet = _Scripted([(0.5, 0.6), (0.2, 0.3)])
    (tmp_path / "q").mkdir()
    quiet.attach(str(tmp_path / "q"), base, digits)
    quiet.set_model(holder)
    for epoch in range(2):
        quiet.on_epoch_end(epoch)
    assert quiet.detected_epoch is None


RUNS = {}  # name -> model_dir of the bin/train runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    RUNS["fast"] = tmp_path_factory.mktemp("fast_at") / "fast"
    lane.submit_bin("test_fast fast", "train", "--gin_file=fast_at.gin",
                    f"--model_dir={RUNS['fast']}", *quick_train("train.epochs = 3"))


def test_bin_train_fast_at_logs_pgd_and_fgsm_accuracy(background_lane):
    model_dir = RUNS["fast"]
    proc = background_lane.result("test_fast fast")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((model_dir / "catastrophic_overfitting.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2, 3]
    for h in log["history"]:
        assert 0 <= h["pgd_accuracy"] <= h["fgsm_accuracy"] + 0.05 <= 1.05
    tags = set()
    for path in glob.glob(str(model_dir / "tensorboard" / "catastrophic_overfitting" / "*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert {"pgd_accuracy", "fgsm_accuracy", "detected"} <= tags
