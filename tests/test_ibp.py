"""Interval bound propagation: soundness, closed forms, the training objective and schedule,
verified <= attacked <= clean accuracy after a short IBP training, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import linear_model
from tfadv.attacks import PGD
from tfadv.certify import ibp
from tfadv.defenses import IntervalBoundPropagation, ModelState, StandardTraining

L = keras.layers
SHAPE = (6, 6, 2)


def _mlp():
    inputs = keras.Input(SHAPE)
    h = L.Flatten()(inputs)
    h = L.Dense(24, activation="relu")(h)
    h = L.Dense(16, activation="tanh")(h)
    return keras.Model(inputs, L.Dense(5)(h))


def _conv_maxpool():
    inputs = keras.Input(SHAPE)
    h = L.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    h = L.MaxPooling2D(2)(h)
    h = L.Conv2D(4, 2, strides=1, activation="relu")(h)
    return keras.Model(inputs, L.Dense(5)(L.Flatten()(h)))


def _avgpool():
    inputs = keras.Input(SHAPE)
    h = L.ZeroPadding2D(1)(inputs)
    h = L.Conv2D(5, 3)(h)
    h = L.AveragePooling2D(2, padding="same")(h)
    h = L.ReLU()(h)
    h = L.Reshape((-1,))(h)
    return keras.Model(inputs, L.Dense(5)(h))


def _normalization_first():
    inputs = keras.Input(SHAPE)
    h = L.Normalization(mean=[0.3, 0.6], variance=[0.04, 0.25])(inputs)
    h = L.Conv2D(4, 3, activation="sigmoid")(h)
    h = L.Flatten()(h)
    h = L.Dropout(0.5)(h)
    return keras.Model(inputs, L.Dense(5)(h))


def _batch_norm():
    inputs = keras.Input(SHAPE)
    h = L.Conv2D(6, 3, use_bias=False)(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Activation("relu")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, L.Dense(5)(h))


def _residual():
    inputs = keras.Input(SHAPE)
    a = L.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = L.Conv2D(4, 3, padding="same")(a)
    h = L.ReLU()(L.Add()([a, b]))
    h = L.Concatenate()([h, L.Subtract()([a, b])])
    return keras.Model(inputs, L.Dense(5)(L.Flatten()(h)))


def _sequential():
    return keras.Sequential([keras.Input(SHAPE), L.Rescaling(2.0, offset=-1.0),
                             L.Conv2D(4, 3, activation="relu"), L.Flatten(),
                             L.Dense(8, activation="elu"), L.Dense(5)])


def _nested():
    inner = keras.Sequential([keras.Input((6, 6, 4)), L.Conv2D(3, 3, activation="relu"),
                              L.Flatten(), L.Dense(5)])
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, inner(L.Conv2D(4, 1, activation="relu")(inputs)))


ARCHITECTURES = {"mlp": _mlp, "conv_maxpool": _conv_maxpool, "avgpool": _avgpool,
                 "normalization_first": _normalization_first, "batch_norm": _batch_norm,
                 "residual": _residual, "sequential": _sequential, "nested": _nested}


def _randomized(name, seed):
    keras.utils.set_random_seed(seed)
    model = ARCHITECTURES[name]()
    rng = np.random.RandomState(seed)
    # Random weights of either sign and non-trivial scale (biases too).
    model.set_weights([rng.normal(0, 0.6, w.shape).astype("float32")
                       for w in model.get_weights()])
    if name == "batch_norm":  # negative gammas, non-trivial moving statistics
        channels = 6
        gamma = rng.uniform(0.3, 2.0, channels) * np.where(np.arange(channels) % 2, -1, 1)
        model.get_layer("bn").set_weights([
            gamma.astype("float32"), rng.normal(0, 1, channels).astype("float32"),
            rng.normal(0, 1, channels).astype("float32"),
            rng.uniform(0.1, 3.0, channels).astype("float32")])
    return model, rng


def _points(rng, lower, upper, n):
    """n points per box: half uniform, half random vertices (where extremes tend to lie)."""
    lower, upper = np.asarray(lower), np.asarray(upper)
    u = rng.rand(len(lower), n, *lower.shape[1:]).astype("float32")
    u[:, n // 2:] = np.round(u[:, n // 2:])
    return lower[:, None] + u * (upper - lower)[:, None]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_bounds_contain_every_sampled_output(name):
    model, rng = _randomized(name, seed=len(name))
    x = rng.rand(3, *SHAPE).astype("float32")
    y = np.array([0, 2, 4])
    eps = np.float32(0.08)
    lower, upper = ibp.input_box(x, eps)
    zl, zu = (t.numpy() for t in ibp.logit_bounds(model, lower, upper))
    worst = ibp.worst_case_logits(model, lower, upper, y).numpy()
    points = _points(rng, lower, upper, 1500)
    z = model.predict(points.reshape(-1, *SHAPE), batch_size=4500, verbose=0).reshape(3, 1500, 5)
    tol = 1e-4 * (1 + np.abs(z).max())
    assert np.all(z >= zl[:, None] - tol) and np.all(z <= zu[:, None] + tol)
    margins = z - z[np.arange(3), :, y][:, :, None]
    assert np.all(margins <= worst[:, None] + tol)
    np.testing.assert_array_equal(worst[np.arange(3), y], 0.0)
    # Not vacuous: the sampled range reaches into the bounds.
    assert np.all(zu - zl > 0) and np.all(zu - zl < 1e4)
    # Elision is at least as tight as bounding the margins from the logit bounds.
    naive = zu - zl[np.arange(3), y][:, None]
    naive[np.arange(3), y] = 0.0
    assert np.all(worst <= naive + tol)
    # eps = 0: the bounds are the output itself.
    z0 = model(x).numpy()
    l0, u0 = (t.numpy() for t in ibp.logit_bounds(model, x, x))
    np.testing.assert_allclose(l0, z0, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(u0, z0, atol=1e-4, rtol=1e-4)
    w0 = ibp.worst_case_logits(model, x, x, y).numpy()
    np.testing.assert_allclose(w0, z0 - z0[np.arange(3), y][:, None], atol=1e-4, rtol=1e-4)


def test_elision_is_strictly_tighter_on_a_random_network():
    model, rng = _randomized("mlp", seed=3)
    x = rng.rand(8, *SHAPE).astype("float32")
    y = np.arange(8) % 5
    lower, upper = ibp.input_box(x, 0.05)
    zl, zu = (t.numpy() for t in ibp.logit_bounds(model, lower, upper))
    worst = ibp.worst_case_logits(model, lower, upper, y).numpy()
    naive = zu - zl[np.arange(8), y][:, None]
    off = np.arange(5)[None] != y[:, None]
    assert np.mean(worst[off] < naive[off] - 1e-3) > 0.9


def test_single_dense_layer_matches_closed_form():
    rng = np.random.RandomState(0)
    w = rng.normal(size=(7, 4)).astype("float32")
    b = rng.normal(size=4).astype("float32")
    model = linear_model(w, b)
    lower = rng.rand(5, 7).astype("float32")
    upper = lower + rng.rand(5, 7).astype("float32") * 0.3
    mu, r = (upper + lower) / 2, (upper - lower) / 2
    zl, zu = ibp.logit_bounds(model, lower.reshape(5, 1, 7, 1), upper.reshape(5, 1, 7, 1))
    np.testing.assert_allclose(zl.numpy(), mu @ w + b - r @ np.abs(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zu.numpy(), mu @ w + b + r @ np.abs(w), rtol=1e-5, atol=1e-5)
    # Elided: upper(z_j - z_y) = (w_j - w_y).mu + |w_j - w_y|.r + b_j - b_y.
    y = np.array([0, 1, 2, 3, 1])
    c = w[None] - w[:, y].T[:, :, None]
    expected = (np.einsum("bi,bik->bk", mu, c) + np.einsum("bi,bik->bk", r, np.abs(c))
                + b[None] - b[y][:, None])
    worst = ibp.worst_case_logits(model, lower.reshape(5, 1, 7, 1),
                                  upper.reshape(5, 1, 7, 1), y)
    np.testing.assert_allclose(worst.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_training_mode_batch_norm_uses_the_clean_batch_statistics():
    model, rng = _randomized("batch_norm", seed=1)
    x = rng.rand(6, *SHAPE).astype("float32")
    y = np.arange(6) % 5
    z = model(x, training=True).numpy()  # normalised with this batch's statistics
    worst = ibp.worst_case_logits(model, x, x, y, batch_statistics=x).numpy()
    np.testing.assert_allclose(worst, z - z[np.arange(6), y][:, None], atol=1e-4, rtol=1e-4)
    # At eps > 0 the bounds contain the margins of perturbed inputs through the network whose
    # BatchNorm normalises with the clean batch's statistics (the nominal pass's affine map).
    conv, bn, dense = model.layers[1], model.get_layer("bn"), model.layers[-1]
    h = conv(x).numpy()
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()

    def net(points):
        a = (conv(points).numpy() - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
        return dense(np.maximum(a, 0).mean(axis=(1, 2))).numpy()

    lower, upper = ibp.input_box(x, 0.05)
    worst = ibp.worst_case_logits(model, lower, upper, y, batch_statistics=x).numpy()
    z = net(_points(rng, lower, upper, 400).reshape(-1, *SHAPE)).reshape(6, 400, 5)
    margins = z - z[np.arange(6), :, y][:, :, None]
    assert np.all(margins <= worst[:, None] + 1e-4 * (1 + np.abs(z).max()))
    assert not np.allclose(worst, ibp.worst_case_logits(model, lower, upper, y).numpy())


def test_unsupported_layers_raise_naming_the_layer():
    inputs = keras.Input((5, 3))
    lstm = keras.Model(inputs, L.Dense(2)(L.LSTM(4, name="my_lstm")(inputs)))
    with pytest.raises(ValueError, match=r"'my_lstm' of class LSTM.*Supported: .*Conv2D"):
        ibp.check_supported(lstm)
    with pytest.raises(ValueError, match="my_lstm"):
        ibp.logit_bounds(lstm, np.zeros((1, 5, 3)), np.ones((1, 5, 3)))
    inputs = keras.Input(SHAPE)
    h = L.Lambda(lambda t: t * t, name="square")(L.Flatten()(inputs))
    lam = keras.Model(inputs, L.Dense(2)(h))
    with pytest.raises(ValueError, match="'square' of class Lambda"):
        IntervalBoundPropagation(lam)
    gelu = keras.Sequential([keras.Input((3,)), L.Dense(2, activation="gelu", name="g")])
    with pytest.raises(ValueError, match="'g' of class Dense.*'gelu'"):
        ibp.verified_accuracy(gelu, (np.zeros((2, 3)), np.zeros(2, "int32")), 0.1)


def _tiny_base(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 1))
    h = L.Dense(6, activation="relu")(L.Flatten()(inputs))
    return keras.Model(inputs, L.Dense(3)(h))


def _batch(n=12, seed=0):
    rng = np.random.RandomState(seed)
    return rng.rand(n, 4, 4, 1).astype("float32"), np.arange(n) % 3


def test_warmup_step_equals_clean_training():
    x, y = _batch()
    weights = _tiny_base().get_weights()
    results = []
    for make in (lambda b: StandardTraining(b),
                 lambda b: IntervalBoundPropagation(b, eps=0.2, warmup_steps=5,
                                                    rampup_steps=10)):
        base = _tiny_base()
        base.set_weights(weights)
        model = make(base)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)  # no tracing
        for _ in range(3):
            model.train_on_batch(x, y)
        results.append(base.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=0)
    assert not np.allclose(results[0][0], weights[0])


@pytest.mark.parametrize("rampup", [0, 400])
def test_schedule_matches_closed_form(rampup):
    model = IntervalBoundPropagation(_tiny_base(), eps=0.3, warmup_steps=100,
                                     rampup_steps=rampup, kappa_start=0.9, kappa_end=0.4)
    for step in [0, 1, 99, 100, 101, 250, 499, 500, 501, 10_000]:
        ramp = float(step >= 100) if rampup == 0 else min(max((step - 100) / rampup, 0.0), 1.0)
        eps, kappa = (float(t) for t in model.schedule(tf.constant(step, tf.int64)))
        assert eps == pytest.approx(0.3 * ramp, abs=1e-7)
        assert kappa == pytest.approx(1.0 if step < 100 else 0.9 - 0.5 * ramp, abs=1e-7)


def _numpy_objective(weights, x, y, eps, kappa):
    w1, b1, w2, b2 = weights
    flat = x.reshape(len(x), -1)
    lower, upper = np.clip(flat - eps, 0, 1), np.clip(flat + eps, 0, 1)
    mu, r = (upper + lower) / 2, (upper - lower) / 2
    c1, r1 = mu @ w1 + b1, r @ np.abs(w1)
    hl, hu = np.maximum(c1 - r1, 0), np.maximum(c1 + r1, 0)
    hm, hr = (hu + hl) / 2, (hu - hl) / 2
    worst = np.empty((len(x), w2.shape[1]))
    for i, label in enumerate(y):
        for j in range(w2.shape[1]):
            c = w2[:, j] - w2[:, label]
            worst[i, j] = c @ hm[i] + np.abs(c) @ hr[i] + b2[j] - b2[label]
    logits = np.maximum(flat @ w1 + b1, 0) @ w2 + b2

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]

    return np.mean(kappa * ce(logits) + (1 - kappa) * ce(worst)), np.mean(ce(worst))


def test_objective_matches_numpy_and_its_gradient_reaches_the_weights():
    x, y = _batch()
    base = _tiny_base()
    model = IntervalBoundPropagation(base, eps=0.15, warmup_steps=0, rampup_steps=0,
                                     kappa_start=0.3, kappa_end=0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with tf.GradientTape() as tape:
        loss, logits = model.objective(ModelState(base), x, y, None, None)
    expected, verified_ce = _numpy_objective(base.get_weights(), x, y, 0.15, 0.3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert verified_ce > 0.5  # the verified term is not negligible here
    worst = ibp.worst_case_logits(base, *ibp.input_box(x, 0.15), y)
    assert float(tf.reduce_mean(ibp.verified_cross_entropy(y, worst))) == pytest.approx(
        verified_ce, rel=1e-5)
    grads = tape.gradient(loss, base.trainable_variables)
    # kappa = 0.3: compare with the gradient of the verified term alone at kappa = 0.
    model0 = IntervalBoundPropagation(base, eps=0.15, warmup_steps=0, rampup_steps=0,
                                      kappa_start=0.0, kappa_end=0.0)
    model0.compile(optimizer=keras.optimizers.SGD(0.1))
    with tf.GradientTape() as tape:
        loss0, _ = model0.objective(ModelState(base), x, y, None, None)
    grads0 = tape.gradient(loss0, base.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads0)
    assert all(np.abs(g).sum() > 0 for g in grads0)
    assert not np.allclose(grads[0], grads0[0])


@pytest.fixture(scope="module")
def ibp_trained(digits):
    """An MLP trained with IBP on digits for a few seconds."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = L.Dense(128, activation="relu")(L.Flatten()(inputs))
    base = keras.Model(inputs, L.Dense(10)(h))
    model = IntervalBoundPropagation(
        base, eps=0.11, eval_eps=0.1, warmup_steps=10, rampup_steps=120,
        eval_attack=PGD(eps=0.1, step_size=0.025, steps=10, random_start="uniform"))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(digits.train, epochs=25, verbose=0)
    return model


def test_verified_accuracy_is_below_attacked_and_clean_accuracy(ibp_trained, digits):
    from conftest import dataset_arrays

    base = ibp_trained.base_model
    x, y = dataset_arrays(digits.test)
    accuracy, mask = ibp.verified_accuracy(base, (x, y), 0.1, return_mask=True)
    clean = np.argmax(base.predict(x, verbose=0), 1) == y
    pgd = PGD(eps=0.1, step_size=0.0125, steps=20, random_start="uniform")
    attacked = np.argmax(base.predict(pgd(base, x, y).numpy(), verbose=0), 1) == y
    # Per example: verified => correct under attack => correct.
    assert np.all(attacked[mask]) and np.all(clean[attacked])
    assert 0.3 < accuracy <= attacked.mean() <= clean.mean()
    # Larger eps certifies less; the same model trained normally certifies far less.
    assert ibp.verified_accuracy(base, digits.test, 0.2) < accuracy
    # The validation step reports the same verified accuracy.
    logs = ibp_trained.evaluate(digits.test, verbose=0, return_dict=True)
    assert logs["verified_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert logs["robust_accuracy"] <= logs["accuracy"]
    report = ibp_trained.certified_report(base, digits.test)
    assert report["verified_accuracy"] == pytest.approx(accuracy)
    assert report["verified_eps"] == 0.1


def test_standard_training_certifies_less(ibp_trained, digits):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    base = keras.Model(inputs, L.Dense(10)(L.Dense(128, activation="relu")(
        L.Flatten()(inputs))))
    model = StandardTraining(base)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(digits.train, epochs=8, verbose=0)
    assert model.evaluate(digits.test, verbose=0, return_dict=True)["accuracy"] > 0.85
    verified_ibp = ibp.verified_accuracy(ibp_trained.base_model, digits.test, 0.1)
    assert ibp.verified_accuracy(base, digits.test, 0.1) < verified_ibp / 2


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": -0.1}, "eps must be a number >= 0"),
    ({"eval_eps": -1.0}, "eval_eps must be a number >= 0"),
    ({"kappa_start": 1.5}, r"kappa_start must be a number >= 0 and <= 1"),
    ({"kappa_end": -0.1}, r"kappa_end must be a number >= 0 and <= 1"),
    ({"warmup_steps": 2.5}, "warmup_steps must be an integer >= 0"),
    ({"rampup_steps": -1}, "rampup_steps must be an integer >= 0"),
    ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min must be < clip_max"),
])
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        IntervalBoundPropagation(_tiny_base(), **kwargs)


def test_verified_accuracy_rejects_bad_input():
    base = _tiny_base()
    x, y = _batch()
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        ibp.verified_accuracy(base, (x, y), -0.1)
    with pytest.raises(ValueError, match="same length"):
        ibp.verified_accuracy(base, (x, y[:3]), 0.1)
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        ibp.verified_accuracy(base, (x, np.eye(3)[y]), 0.1)
