"""Mixed precision: custom train steps with loss scaling, float32 attacks, `train.precision`."""

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv import models
from tfadv.attacks import PGD
from tfadv.defenses import TRADES, FreeAdversarialTraining, PGDAdversarialTraining
from tfadv.train import train

HALF = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


@pytest.fixture
def policy():
    """Sets the Keras global dtype policy for one test; restores the previous one after it."""
    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n)


def _attack(defense, eps=0.3):
    if defense is TRADES:
        return PGD(eps=eps, step_size=0.1, steps=2, loss_fn="kl_divergence",
                   random_start="normal", seed=0)
    return PGD(eps=eps, step_size=0.1, steps=2, seed=0)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("defense", [PGDAdversarialTraining, TRADES])
def test_mixed_precision_step_is_finite_and_keeps_float32_variables(policy, precision, defense):
    policy(precision)
    keras.utils.set_random_seed(0)
    base = models.digits_cnn()
    assert base.layers[1].compute_dtype == HALF[precision]  # the body computes in half
    assert base.get_layer("logits").compute_dtype == "float32"  # logits stay float32
    model = defense(base, attack=_attack(defense))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = _batch()
    before = [v.numpy() for v in base.trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    # compile wraps the optimizer for float16 only (bfloat16 has float32's exponent range).
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        precision == "mixed_float16")
    assert {v.dtype for v in base.weights} == {"float32"}
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, base.trainable_variables)]
    assert all(changed)  # the step was applied, not skipped as non-finite
    assert all(np.isfinite(v.numpy()).all() for v in base.trainable_variables)


def _one_sgd_update(precision, weights, x, y):
    keras.mixed_precision.set_global_policy(precision)
    base = models.digits_cnn()
    base.set_weights(weights)
    # eps = 0: the adversarial batch is the clean batch, so both runs see the same inputs.
    model = PGDAdversarialTraining(base, attack=PGD(eps=0.0, step_size=0.1, steps=1,
                                                    random_start=None))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.train_on_batch(x, y)
    scale = float(getattr(model.optimizer, "dynamic_scale", 1.0))
    return [w1 - w0 for w0, w1 in zip(weights, base.get_weights())], scale


def test_loss_scaled_gradients_are_unscaled_before_the_update(policy):
    keras.utils.set_random_seed(1)
    weights = models.digits_cnn().get_weights()
    x, y = _batch(seed=1)
    ref, _ = _one_sgd_update("float32", weights, x, y)
    mixed, scale = _one_sgd_update("mixed_float16", weights, x, y)
    policy("float32")
    assert scale >= 2 ** 10  # the LossScaleOptimizer scales the loss by this much ...
    for r, m in zip(ref, mixed):  # ... and the update is the float32 one, not `scale` times it
        # (up to float16 rounding of the activations: a few percent per tensor)
        assert np.linalg.norm(m - r) <= 0.1 * np.linalg.norm(r) + 1e-7


def _float16_model():
    """A model whose every layer, output included, computes in float16."""
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("input_dtype", [np.float32, np.float16])
def test_attack_output_is_float32_inside_the_ball_for_a_float16_model(policy, norm, input_dtype):
    policy("mixed_float16")
    keras.utils.set_random_seed(2)
    model = _float16_model()
    x, y = _batch(16, seed=2)
    assert model(x).dtype == tf.float16  # the premise: float16 logits
    x = x.astype(input_dtype)
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = PGD(eps=eps, step_size=eps / 4, steps=5, norm=norm, seed=0)(model, x, y)
    assert x_adv.dtype == tf.float32
    delta = x_adv.numpy() - x.astype(np.float32)
    size = (np.abs(delta).max(axis=(1, 2, 3)) if norm == "linf"
            else np.sqrt((delta ** 2).sum(axis=(1, 2, 3))))
    assert size.max() <= eps * (1 + 1e-5)
    assert size.min() > eps / 4  # the steps moved every example
    assert 0.0 <= x_adv.numpy().min() and x_adv.numpy().max() <= 1.0


def test_free_at_step_under_mixed_float16(policy):
    policy("mixed_float16")
    keras.utils.set_random_seed(3)
    base = models.digits_cnn()
    model = FreeAdversarialTraining(base, eps=0.1, replays=2, batch_size=32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = _batch()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    delta = model.delta.numpy()
    assert model.delta.dtype == tf.float32 and np.isfinite(delta).all()
    assert np.abs(delta).max() == pytest.approx(0.1)  # a sign step of eps was taken
    assert {v.dtype for v in base.weights} == {"float32"}


def test_bad_precision_fails_before_any_work(tmp_path):
    model_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"precision must be one of \('float32', "
                                         r"'mixed_float16', 'mixed_bfloat16'\); got 'float16'"):
        train(str(model_dir), precision="float16")
    assert not model_dir.exists()
    assert keras.mixed_precision.global_policy().name == "float32"


def test_precision_from_gin_applies_before_building_and_is_restored(tmp_path):
    gin.parse_config("train.precision = 'mixed_bfloat16'")
    built = train(str(tmp_path / "run"), strategy="default", dry_run=True)
    base = built["defense"].base_model
    assert base.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert base.get_layer("logits").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    # Restored after an error inside train too.
    with pytest.raises(ValueError, match="model must be one of"):
        train(str(tmp_path / "run"), model="nope", precision="mixed_float16")
    assert keras.mixed_precision.global_policy().name == "float32"
