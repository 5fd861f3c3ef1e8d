"""PGD/FGSM: constraint properties, a closed-form step, tracing, BatchNorm mode, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import dataset_arrays
from tfadv import models
from tfadv.attacks import FGSM, PGD, cross_entropy, cw_margin, project


def _random_model(seed=0):
    keras.utils.set_random_seed(seed)
    return models.digits_cnn()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [None, "uniform", "normal"])
def test_stays_inside_eps_ball_and_box(norm, random_start):
    model = _random_model()
    rng = np.random.default_rng(0)
    # Pixels at the box edges included, where clipping and projection interact.
    x = rng.choice([0.0, 1.0, 0.5, 0.03, 0.97], size=(48, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=48)
    eps = 0.3 if norm == "linf" else 1.5
    attack = PGD(eps=eps, step_size=eps / 2, steps=7, norm=norm, random_start=random_start,
                 init_scale=0.1)
    x_adv = attack(model, x, y).numpy()
    assert x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert size.max() > 0.5 * eps  # the attack actually moved


def _linear_model(weights):
    inputs = keras.Input((1, 3, 1))
    flat = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(weights.shape[1], use_bias=False)
    model = keras.Model(inputs, dense(flat))
    dense.set_weights([weights])
    return model


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_step_matches_closed_form_on_linear_model(norm):
    w = np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], dtype="float32")
    model = _linear_model(w)
    x = np.array([[0.2, 0.5, 0.9], [0.6, 0.1, 0.4]], dtype="float32")
    y = np.array([0, 1])
    eps, alpha = 0.2, 0.15
    # d CE / d x = W (softmax(xW) - onehot(y))
    grad = (_softmax(x @ w) - np.eye(2)[y]) @ w.T
    if norm == "linf":
        step = alpha * np.sign(grad)
        expected = np.clip(x + np.clip(step, -eps, eps), 0, 1)
    else:
        step = alpha * grad / np.linalg.norm(grad, axis=1, keepdims=True)
        expected = np.clip(x + step, 0, 1)  # ||step|| = alpha < eps: no ball projection
    attack = PGD(eps=eps, step_size=alpha, steps=1, norm=norm, random_start=None)
    x_adv = attack(model, x.reshape(2, 1, 3, 1), y).numpy().reshape(2, 3)
    np.testing.assert_allclose(x_adv, expected, atol=1e-6)


def test_projection_closed_form():
    x = np.zeros((1, 1, 2, 1), "float32") + 0.5
    far = x + np.array([0.3, 0.4], "float32").reshape(1, 1, 2, 1)  # L2 distance 0.5
    np.testing.assert_allclose(project(far, x, 0.25, "l2").numpy().ravel(), [0.65, 0.7],
                               atol=1e-6)
    np.testing.assert_allclose(project(far, x, 0.1, "linf").numpy().ravel(), [0.6, 0.6],
                               atol=1e-6)


def test_traced_once_per_input_signature():
    model = _random_model()
    attack = PGD(eps=0.1, step_size=0.05, steps=3)
    for batch in (32, 32, 17, 5):
        attack(model, np.random.rand(batch, 8, 8, 1).astype("float32"), np.zeros(batch, "int32"))
    assert attack.trace_count == 1
    other = _random_model(1)
    attack(other, np.random.rand(4, 8, 8, 1).astype("float32"), np.zeros(4, "int32"))
    assert attack.trace_count == 2  # a new model is a new function


def test_batchnorm_mode_is_explicit():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.BatchNormalization()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    bn = model.layers[2]
    x = np.random.rand(16, 8, 8, 1).astype("float32") * 0.5 + 0.3
    y = np.zeros(16, "int32")
    before = bn.moving_mean.numpy().copy()
    PGD(eps=0.1, step_size=0.05, steps=3, training=False)(model, x, y)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)
    PGD(eps=0.1, step_size=0.05, steps=3, training=True)(model, x, y)
    assert not np.allclose(bn.moving_mean.numpy(), before)


def test_loss_ordering_on_trained_model(trained_digits_model, digits):
    x, y = dataset_arrays(digits.test)
    model = trained_digits_model
    eps = 0.2

    def mean_loss(images):
        return float(tf.reduce_mean(cross_entropy(y, model(images, training=False))))

    clean = mean_loss(x)
    fgsm = mean_loss(FGSM(eps=eps)(model, x, y))
    pgd = mean_loss(PGD(eps=eps, step_size=eps / 8, steps=20, random_start=None)(model, x, y))
    assert pgd >= fgsm >= clean
    assert pgd > clean + 1.0  # not a tie: the attack hurts a non-robust model


def test_cw_margin_closed_form():
    logits = tf.constant([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(cw_margin([0, 0], logits).numpy(), [-1.0, 3.0])
    np.testing.assert_allclose(cw_margin([0, 0], logits, confidence=2.0).numpy(), [-1.0, 2.0])
    # The gradient is alive for correctly classified examples (the attacker's starting point).
    z = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(cw_margin([0, 0], z))
    np.testing.assert_allclose(tape.gradient(value, z).numpy()[0], [-1.0, 1.0, 0.0])


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": -0.1}, "eps must be"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"step_size": 0.0}, "step_size must be a number > 0"),
    ({"norm": "l3"}, "norm must be 'linf' or 'l2'"),
    ({"random_start": "gaussian"}, "random_start must be one of"),
    ({"loss_fn": "hinge"}, "loss_fn must be a callable or one of"),
    ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min must be < clip_max"),
])
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PGD(**kwargs)


def test_dlr_losses_match_their_formulas():
    from tfadv.attacks import dlr, dlr_targeted

    logits = np.array([[4.0, 1.0, 3.0, -2.0], [0.5, 2.0, -1.0, 1.5]], "float32")
    y = np.array([0, 0])
    # sorted: [4, 3, 1, -2] and [2, 1.5, 0.5, -1]
    expected = [-(4.0 - 3.0) / (4.0 - 1.0), -(0.5 - 2.0) / (2.0 - 0.5)]
    np.testing.assert_allclose(dlr(y, logits).numpy(), expected, rtol=1e-6)
    t = np.array([2, 3])
    expected_t = [-(4.0 - 3.0) / (4.0 - 0.5 * (1.0 - 2.0)), -(0.5 - 1.5) / (2.0 - 0.5 * (0.5 - 1.0))]
    np.testing.assert_allclose(dlr_targeted(y, logits, t).numpy(), expected_t, rtol=1e-6)
    # Invariant to shift and positive scale of the logits.
    np.testing.assert_allclose(dlr(y, 1000.0 * logits + 7.0).numpy(), expected, rtol=1e-4)


def test_misclassified_selection_counts_every_iterate_and_restart():
    """A model that is fooled only at intermediate iterates: 'last' misses it, 'misclassified'
    keeps it. The logit of class 1 peaks where x is 0.15 above the clean point and the ascent
    overshoots it (step 0.2 with eps 0.3)."""
    inputs = keras.Input((1, 1, 1))
    flat = keras.layers.Flatten()(inputs)
    logits = keras.layers.Lambda(
        lambda t: tf.concat([tf.zeros_like(t) + 1.5, 2.0 - 40.0 * tf.square(t - 0.65)], -1))(flat)
    model = keras.Model(inputs, logits)
    x = np.full((1, 1, 1, 1), 0.5, "float32")
    y = np.array([0])
    # CE on class 0 grows with the bump logit: the ascent climbs towards 0.65, then sign steps
    # oscillate around it; iterates are 0.5 -> 0.7 -> 0.5 ... with step 0.2.
    last = PGD(eps=0.3, step_size=0.2, steps=2, random_start=None)(model, x, y).numpy()
    kept = PGD(eps=0.3, step_size=0.2, steps=2, random_start=None,
               select="misclassified")(model, x, y).numpy()
    assert np.argmax(model(last), -1)[0] == 0      # the final iterate is back at 0.5: robust
    assert np.argmax(model(kept), -1)[0] == 1      # an intermediate iterate fooled the model
    assert abs(float(kept.ravel()[0]) - 0.7) < 1e-6


def test_restarts_are_seeded_and_never_weaker(trained_digits_model, digits):
    x, y = dataset_arrays(digits.test)
    model = trained_digits_model

    def robust(attack):
        return float(np.mean(np.argmax(model(attack(model, x, y)), -1) == y))

    kwargs = dict(eps=0.1, step_size=0.02, steps=5, select="misclassified", seed=7)
    one = PGD(restarts=1, **kwargs)
    a, b = one(model, x, y).numpy(), one(model, x, y).numpy()
    np.testing.assert_array_equal(a, b)  # deterministic for a seed
    assert robust(PGD(restarts=3, **kwargs)) <= robust(one)
    with pytest.raises(ValueError, match="select='last' keeps one run"):
        PGD(restarts=2)


def _all_attacks():
    from tfadv.attacks import APGD, AutoAttack, Square

    return {"fgsm": FGSM(eps=0.1), "pgd": PGD(eps=0.1, step_size=0.05, steps=2),
            "apgd": APGD(0.1, steps=2), "square": Square(0.1, n_queries=3),
            "autoattack": AutoAttack(0.1, version="fast")}


@pytest.mark.parametrize("name", sorted(_all_attacks()))
def test_images_outside_the_box_are_refused_not_clipped(name):
    """0..255 images given to an attack on [0, 1]: one line naming the range found, the range
    expected and the fix, before any attack step (no trace)."""
    model = _random_model()
    attack = _all_attacks()[name]
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    y = np.zeros(4, "int64")
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\].*span \[.*, 2..\.?\d*\]"
                                         r".*x / 255.*input_range=\(0, 255\)") as error:
        attack(model, 255 * x, y)
    assert "\n" not in str(error.value)
    assert getattr(attack, "trace_count", 0) == 0
    with pytest.raises(ValueError, match=r"span \[-0\.9\d*, 0\.9\d*\].*input_range=\(-1, 1\)"):
        attack(model, 2 * x - 1, y)


def test_range_check_lets_float_rounding_pass():
    from tfadv.attacks.base import check_image_range

    check_image_range(np.full((2, 3), 1 + 1e-6, "float32"))  # rounding, not a wrong range
    check_image_range(tf.fill([2, 3], -1e-6))
    with pytest.raises(ValueError, match=r"span \[0, 1\.001\]"):
        check_image_range(np.array([0.0, 1.001], "float32"))
    with pytest.raises(ValueError, match="non-finite"):
        check_image_range(np.array([0.5, np.nan]))
