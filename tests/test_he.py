"""Hypersphere Embedding: the head's logits, the margin in the loss only, composition, saving."""

import keras
import numpy as np
import pytest

from tfadv.attacks import PGD
from tfadv.defenses import ALP, TRADES, FreeAdversarialTraining, ModelState, PGDAdversarialTraining
from tfadv.heads import HypersphereHead, he_model


def _head_model(scale=10.0, classes=3, dim=4):
    inputs = keras.Input((dim,))
    return keras.Model(inputs, HypersphereHead(classes, scale=scale, name="logits")(inputs))


def test_logits_are_scale_times_cosine_with_unit_class_weights():
    model = _head_model(scale=7.0)
    kernel = model.get_layer("logits").kernel.numpy()
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)
    h = np.random.RandomState(0).randn(5, 4).astype("float32")
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ kernel
    np.testing.assert_allclose(model(h).numpy(), 7.0 * cos, rtol=1e-5, atol=1e-6)
    # Invariant to the feature norm (feature normalisation).
    np.testing.assert_allclose(model(3.0 * h).numpy(), model(h).numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_steps_keep_the_class_weights_on_the_sphere():
    model = _head_model()
    h = np.random.RandomState(1).randn(8, 4).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(h, np.arange(8) % 3, epochs=3, verbose=0)
    np.testing.assert_allclose(np.linalg.norm(model.get_layer("logits").kernel.numpy(), axis=0),
                               1.0, rtol=1e-5)


def test_margin_lowers_the_true_logit_by_s_m_in_the_training_loss_only():
    base = _head_model(scale=10.0)
    model = PGDAdversarialTraining(base, attack=PGD(eps=0.1, steps=1, step_size=0.1),
                                   margin=0.2)
    h = np.random.RandomState(2).randn(4, 4).astype("float32")
    y = np.array([0, 1, 2, 1])
    z = base(h).numpy().astype("float64")
    shifted = z - 10.0 * 0.2 * np.eye(3)[y]
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected = -log_p[np.arange(4), y]
    np.testing.assert_allclose(model.classification_loss(y, z).numpy(), expected, rtol=1e-5,
                               atol=1e-5)
    loss, _ = model.objective(ModelState(base), h, y, None, h)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
    # The attack and the deployed model see s * cos(theta) without the margin.
    plain = PGDAdversarialTraining(base, attack=PGD(eps=0.1, steps=1, step_size=0.1))
    assert not np.allclose(plain.classification_loss(y, z).numpy(), expected)
    np.testing.assert_allclose(base(h).numpy(), z, rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda b: TRADES(b, margin=0.2),
    lambda b: ALP(b, beta=0.5, margin=0.3),
    lambda b: FreeAdversarialTraining(b, eps=0.3, replays=2, batch_size=128, margin=0.2),
    lambda b: PGDAdversarialTraining(b, attack=PGD(eps=0.3, steps=1, step_size=0.375),
                                     margin=0.2),  # FGSM-RS + HE
], ids=["TRADES+HE", "ALP+HE", "FreeAT+HE", "FGSM-RS+HE"])
def test_he_composes_with_the_defenses_and_trains(make, digits):
    base = he_model(input_shape=(8, 8, 1), num_classes=10, scale=15.0)
    model = make(base)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = model.fit(digits.train.take(3), epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    kernel = base.get_layer("logits").kernel.numpy()
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-5)


def test_margin_needs_a_hypersphere_head_and_a_sane_value():
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="HypersphereHead"):
        PGDAdversarialTraining(plain, margin=0.2)
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 2\)"):
        PGDAdversarialTraining(_head_model(), margin=-0.1)
    with pytest.raises(ValueError, match="scale"):
        HypersphereHead(3, scale=0.0)


def test_he_model_saves_and_loads(tmp_path):
    model = he_model(input_shape=(8, 8, 1), num_classes=10, scale=10.0)
    x = np.random.RandomState(3).rand(2, 8, 8, 1).astype("float32")
    model.save(tmp_path / "he.keras")
    restored = keras.models.load_model(tmp_path / "he.keras")
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), rtol=1e-6)
