"""PGDAdversarialTraining: closed-form step, distribution, saving, Python use, bad input."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import linear_model
from tfadv import models
from tfadv.attacks import PGD
from tfadv.defenses import PGDAdversarialTraining, StandardTraining


_linear = linear_model


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_training_step_matches_closed_form_on_linear_model():
    w = np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], dtype="float32")
    x = np.array([[0.2, 0.5, 0.9], [0.6, 0.1, 0.4], [0.3, 0.3, 0.3]], dtype="float32")
    y = np.array([0, 1, 1])
    eps, lr = 0.1, 0.5
    # Attack: one sign step of size eps from x (closed form of the input gradient).
    grad_x = (_softmax(x @ w) - np.eye(2)[y]) @ w.T
    x_adv = np.clip(x + eps * np.sign(grad_x), 0, 1)
    # Training step: w <- w - lr * mean_i x_adv_i^T (softmax(x_adv_i w) - onehot(y_i)).
    grad_w = x_adv.T @ (_softmax(x_adv @ w) - np.eye(2)[y]) / len(x)
    expected = w - lr * grad_w

    model = PGDAdversarialTraining(
        _linear(w), attack=PGD(eps=eps, step_size=eps, steps=1, random_start=None))
    model.compile(optimizer=keras.optimizers.SGD(lr))
    logs = model.fit(x.reshape(3, 1, 3, 1), y, batch_size=3, epochs=1, verbose=0,
                     shuffle=False).history
    np.testing.assert_allclose(model.base_model.get_weights()[0], expected, atol=1e-6)
    p = _softmax(x_adv @ w)[np.arange(3), y]
    np.testing.assert_allclose(logs["loss"][0], -np.log(p).mean(), rtol=1e-5)


def _build_small(initial=None, synchronized=True):
    # BatchNorm in train mode normalises with the replica's own batch unless synchronized, so
    # only synchronized BatchNorm can match one device exactly (PyTorch DataParallel, used by
    # the papers' multi-GPU runs, also keeps per-device statistics).
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.BatchNormalization(synchronized=synchronized)(h)
    base = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    if initial is not None:
        base.set_weights(initial)
    return base


def _one_step_weights(strategy, initial, attack_training=False):
    x = np.random.RandomState(0).rand(16, 8, 8, 1).astype("float32")
    y = np.arange(16) % 10
    with strategy.scope():
        base = _build_small(initial)
        model = PGDAdversarialTraining(
            base, attack=PGD(eps=0.2, step_size=0.05, steps=3, random_start=None,
                             training=attack_training))
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    logs = model.fit(ds, epochs=2, verbose=0).history
    return [w.numpy() for w in base.weights], logs["loss"]


def test_two_replicas_match_one_device(two_replicas, attack_training=False):
    """Two optimizer steps (momentum included) on two logical devices equal one device."""
    keras.utils.set_random_seed(3)
    initial = _build_small().get_weights()
    one, loss_one = _one_step_weights(tf.distribute.OneDeviceStrategy("/cpu:0"), initial,
                                      attack_training)
    two, loss_two = _one_step_weights(two_replicas, initial, attack_training)
    assert len(one) == len(two)
    assert not np.allclose(one[0], initial[0])  # the weights did move
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The logged loss is the global mean, not the per-replica share.
    np.testing.assert_allclose(loss_one, loss_two, rtol=1e-5)


def test_train_mode_attack_runs_on_two_replicas_with_per_replica_batchnorm(two_replicas):
    keras.utils.set_random_seed(3)
    initial = _build_small(synchronized=False).get_weights()
    strategy = two_replicas
    x = np.random.RandomState(0).rand(16, 8, 8, 1).astype("float32")
    y = np.arange(16) % 10
    with strategy.scope():
        base = _build_small(initial, synchronized=False)
        model = PGDAdversarialTraining(
            base, attack=PGD(eps=0.2, step_size=0.05, steps=3, training=True))
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    loss = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)
    bn = [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)  # the train-mode attack updated it
    # Synchronized BatchNorm cannot all-reduce inside the attack loop: a clear error instead.
    with strategy.scope():
        synced = PGDAdversarialTraining(
            _build_small(initial), attack=PGD(eps=0.2, step_size=0.05, steps=3, training=True))
        synced.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="synchronized BatchNorm"):
        synced.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_save_writes_the_base_model_only(tmp_path):
    base = models.digits_cnn()
    model = PGDAdversarialTraining(base, attack=PGD(eps=0.1, step_size=0.05, steps=2))
    model.compile(optimizer="adam")
    path = str(tmp_path / "robust.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.name == base.name
    assert len(loaded.weights) == len(base.weights)
    x = np.random.rand(4, 8, 8, 1).astype("float32")
    np.testing.assert_allclose(loaded(x), base(x), atol=1e-6)


def test_docstring_example_runs(tmp_path, monkeypatch):
    doc = PGDAdversarialTraining.__doc__
    code = doc[doc.index("Example (runs as is)::") + len("Example (runs as is)::"):
               doc.index("Args:")]
    code = "\n".join(line[8:] for line in code.splitlines())
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "docstring", "exec"), namespace)
    result = namespace["model"].evaluate(namespace["x"], namespace["y"], return_dict=True,
                                         verbose=0)
    assert set(result) == {"loss", "accuracy", "robust_accuracy"}
    assert result["robust_accuracy"] <= result["accuracy"] + 1e-6
    assert (tmp_path / "robust.keras").exists()


def test_standard_training_reports_robust_accuracy(digits):
    model = StandardTraining(models.digits_cnn(),
                             eval_attack=PGD(eps=0.3, step_size=0.05, steps=10))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(digits.train, epochs=3, verbose=0)
    result = model.evaluate(digits.test, return_dict=True, verbose=0)
    assert result["accuracy"] > 0.8
    assert result["robust_accuracy"] < result["accuracy"]


@pytest.mark.parametrize("images, labels, needle", [
    (np.full((4, 8, 8, 1), 2.0, "float32"), np.zeros(4, "int64"), "images must lie in [0, 1]"),
    (np.zeros((4, 8, 8, 3), "float32"), np.zeros(4, "int64"), "images must have shape"),
    (np.zeros((4, 8, 8, 1), "float32"), np.array([0, 1, 10, 2]), "labels must lie in [0, 10)"),
    (np.zeros((4, 8, 8, 1), "float32"), np.array([0, 1, -1, 2]), "labels must lie in [0, 10)"),
])
def test_fit_rejects_bad_arrays_before_training(images, labels, needle):
    base = models.digits_cnn()
    before = [w.copy() for w in base.get_weights()]
    model = PGDAdversarialTraining(base, attack=PGD(eps=0.1, step_size=0.05, steps=2))
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match=re.escape(needle)):
        model.fit(images, labels, epochs=1, verbose=0)
    for a, b in zip(before, base.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_compile_rejects_a_loss():
    model = PGDAdversarialTraining(models.digits_cnn())
    with pytest.raises(ValueError, match="defines its own training loss"):
        model.compile(optimizer="adam", loss="mse")


def test_defense_weights_files_keep_the_whole_training_state(tmp_path):
    """`save_weights`/`load_weights` (what keras.callbacks.BackupAndRestore uses) cover the base
    model, the optimizer and the defense's own variables (Free AT's carried perturbation), and a
    defense works around a `keras.Sequential` that has no input shape yet."""
    from tfadv.defenses import FreeAdversarialTraining

    x = np.random.RandomState(0).rand(64, 8, 8, 1).astype("float32")
    y = np.arange(64) % 10

    def make():
        base = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(10)])  # unbuilt
        model = FreeAdversarialTraining(base, eps=0.1, replays=2, batch_size=32)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        return model

    model = make()
    assert model.predict(x[:4], verbose=0).shape == (4, 10)
    assert set(model.evaluate(x, y, return_dict=True, verbose=0)) >= {"loss", "accuracy"}
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.summary(print_fn=lambda *args, **kwargs: None)
    path = str(tmp_path / "state.weights.h5")
    model.save_weights(path)
    restored = make()
    restored.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)  # other values everywhere
    restored.load_weights(path)
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 4
    for a, b in [(model.delta, restored.delta),
                 *zip(model.optimizer.variables, restored.optimizer.variables),
                 *zip(model.base_model.weights, restored.base_model.weights)]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(model.delta)).max() > 0  # the perturbation was carried
