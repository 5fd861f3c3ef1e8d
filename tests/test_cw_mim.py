"""Carlini-Wagner L2 and MIM: closed forms on affine models, threat-model contracts, strength on
the trained digits model, bad arguments."""

import keras
import numpy as np
import pytest

from conftest import dataset_arrays
from tfadv import models
from tfadv.attacks import FGSM
from tfadv.attacks.cw import CarliniWagnerL2
from tfadv.attacks.mim import MIM

IMAGE = (2, 3, 1)  # six pixels
DIM = 6


def _affine_model(weights, bias=None):
    """Flatten -> Dense on (2, 3, 1) images: logits = x W (+ b)."""
    inputs = keras.Input(IMAGE)
    dense = keras.layers.Dense(weights.shape[1], use_bias=bias is not None)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights] if bias is None else [weights, bias])
    return model


def _affine_problem(n=12, k=3, seed=0):
    """An affine classifier, inputs well inside [0, 1] and their (clean) predicted labels."""
    rng = np.random.default_rng(seed)
    w = (2.0 * rng.normal(size=(DIM, k))).astype("float32")
    b = (0.3 * rng.normal(size=k)).astype("float32")
    x = rng.uniform(0.4, 0.6, size=(4 * n, DIM)).astype("float32")
    y = np.argmax(x @ w + b, axis=1)
    # Not too close to a boundary, so that a 5% tolerance is not below float32 resolution.
    keep = np.flatnonzero(_nearest_misclassified(w, b, x, y)[0] > 0.03)[:n]
    assert len(keep) == n
    return w, b, x[keep], y[keep]


def _nearest_misclassified(w, b, x, y, kappa=0.0):
    """Closed-form L2 distance from each x to {x' : max_{t != y} z_t(x') > z_y(x') + kappa}, and
    the nearest such point. The set is a union of half-spaces, one per wrong class t, at distance
    (z_y - z_t + kappa) / ||w_y - w_t||_2, the point being x moved straight along w_t - w_y."""
    z = x @ w + b
    dist = np.full(len(x), np.inf)
    point = np.array(x)
    for t in range(w.shape[1]):
        direction = (w[:, [t]] - w[:, y]).T  # (n, d)
        norm = np.linalg.norm(direction, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_t = np.where(y == t, np.inf, (z[np.arange(len(x)), y] - z[:, t] + kappa) / norm)
        closer = d_t < dist
        dist = np.where(closer, d_t, dist)
        point[closer] = x[closer] + (d_t / norm)[closer, None] * direction[closer]
    return dist, point


def _l2(a, b):
    return np.linalg.norm((np.asarray(a) - np.asarray(b)).reshape(len(a), -1), axis=1)


@pytest.mark.parametrize("confidence, abort_early", [(0.0, True), (0.5, False)])
def test_cw_reaches_closed_form_minimal_distance_on_affine_model(confidence, abort_early):
    w, b, x, y = _affine_problem()
    dist, nearest = _nearest_misclassified(w, b, x, y, confidence)
    # Precondition: the unconstrained minimiser lies inside the box, so the box does not bind.
    assert nearest.min() > 0.02 and nearest.max() < 0.98 and dist.min() > 0.02
    attack = CarliniWagnerL2(confidence=confidence, learning_rate=0.01, binary_search_steps=6,
                             max_iterations=300, abort_early=abort_early)
    x_adv = attack(_affine_model(w, b), x.reshape(-1, *IMAGE), y).numpy().reshape(-1, DIM)
    assert x_adv.dtype == np.float32 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    size = _l2(x_adv, x)
    assert np.all(size >= dist * (1 - 1e-3))  # nothing beats the closed form (sanity)
    assert np.all(size <= dist * 1.05), size / dist
    z = x_adv @ w + b
    true = z[np.arange(len(x)), y]
    other = np.where(np.eye(w.shape[1], dtype=bool)[y], -np.inf, z).max(axis=1)
    assert np.all(other > true + confidence)  # misclassified, with margin kappa


def test_cw_eps_returns_clean_example_when_nearest_adversarial_is_too_far():
    w, b, x, y = _affine_problem(n=16, seed=1)
    dist, _ = _nearest_misclassified(w, b, x, y)
    eps = float(np.median(dist))
    far = dist > eps
    near = dist * 1.05 < eps  # CW (within 5% of the minimum) surely gets inside eps
    assert far.sum() >= 4 and near.sum() >= 4
    attack = CarliniWagnerL2(eps=eps, binary_search_steps=6, max_iterations=300)
    model = _affine_model(w, b)
    x_adv = attack(model, x.reshape(-1, *IMAGE), y).numpy().reshape(-1, DIM)
    np.testing.assert_array_equal(x_adv[far], x[far])  # robust within eps: returned unchanged
    assert np.all(_l2(x_adv, x) <= eps * (1 + 1e-6))
    assert np.all(np.argmax(x_adv[near] @ w + b, axis=1) != y[near])
    # One trace serves every batch size.
    attack(model, x[:5].reshape(-1, *IMAGE), y[:5])
    assert attack.trace_count == 1


def test_cw_finds_smaller_perturbations_than_fgsm_l2_on_trained_digits(trained_digits_model,
                                                                       digits):
    x, y = dataset_arrays(digits.test)
    x, y = x[:48], y[:48]
    model = trained_digits_model

    def fooled(images):
        return np.argmax(model(images, training=False), axis=1) != y

    x_fgsm = FGSM(eps=1.0, norm="l2")(model, x, y).numpy()
    # Few, large Adam steps and a high first c keep this fast; still far below FGSM.
    cw = CarliniWagnerL2(learning_rate=0.1, binary_search_steps=4, max_iterations=40,
                         initial_const=1.0)
    x_cw = cw(model, x, y).numpy()
    assert x_cw.min() >= 0.0 and x_cw.max() <= 1.0
    clean_right = ~fooled(x)
    cw_fooled, fgsm_fooled = fooled(x_cw) & clean_right, fooled(x_fgsm) & clean_right
    assert cw_fooled.sum() >= fgsm_fooled.sum() >= 10
    both = cw_fooled & fgsm_fooled
    cw_size, fgsm_size = _l2(x_cw, x)[both], _l2(x_fgsm, x)[both]
    assert np.median(cw_size) < 0.85 * np.median(fgsm_size), (cw_size, fgsm_size)
    # Where CW fails it returns x itself.
    np.testing.assert_array_equal(x_cw[~fooled(x_cw)], x[~fooled(x_cw)])


# ----------------------------------------------------------------------------------------------
# MIM


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_mim_stays_inside_eps_ball_and_box(norm):
    keras.utils.set_random_seed(0)
    model = models.digits_cnn()
    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 1.0, 0.5, 0.03, 0.97], size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=32)
    eps = 0.3 if norm == "linf" else 1.5
    attack = MIM(eps=eps, step_size=eps / 3, steps=5, norm=norm)
    x_adv = attack(model, x, y).numpy()
    assert x_adv.dtype == np.float32 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert size.max() > 0.5 * eps  # the attack actually moved
    attack(model, x[:7], y[:7])
    assert attack.trace_count == 1


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ce_grad(w, x, y):
    """d/dx of the softmax cross-entropy of logits x W: W (softmax(x W) - onehot(y))."""
    return (_softmax(x @ w) - np.eye(w.shape[1])[y]) @ w.T


# Example 1 is predicted class 0 but labelled 1: attacking predictions (y=None) would differ.
_W = np.array([[1.0, -2.0, 0.5], [0.5, 0.0, -1.0], [-1.0, 3.0, 0.0], [0.3, 0.2, 2.0],
               [0.0, -0.5, 1.0], [2.0, 1.0, -1.5]], "float32")
_X = np.array([[0.2, 0.5, 0.9, 0.4, 0.6, 0.5], [0.6, 0.1, 0.4, 0.5, 0.5, 0.7]], "float32")
_Y = np.array([1, 1])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_mim_one_step_matches_closed_form_on_linear_model(norm):
    assert np.argmax(_X[1] @ _W) != _Y[1]
    eps, alpha = 0.2, 0.15
    grad = _ce_grad(_W, _X, _Y)
    if norm == "linf":
        expected = np.clip(_X + np.clip(alpha * np.sign(grad), -eps, eps), 0, 1)
    else:  # ||step|| = alpha < eps: no ball projection
        expected = np.clip(_X + alpha * grad / np.linalg.norm(grad, axis=1, keepdims=True), 0, 1)
    attack = MIM(eps=eps, step_size=alpha, steps=1, norm=norm)
    x_adv = attack(_affine_model(_W), _X.reshape(-1, *IMAGE), _Y).numpy().reshape(-1, DIM)
    np.testing.assert_allclose(x_adv, expected, atol=1e-6)


def test_mim_momentum_matches_paper_update_on_linear_model():
    """Three L2 steps of g <- mu g + grad / ||grad||_1, x <- x + alpha g / ||g||_2: the momentum
    (and the paper's L1 normalisation) changes the direction of steps 2 and 3."""
    eps, alpha, mu = 1.0, 0.1, 0.6
    x, g = _X.astype("float64"), np.zeros_like(_X, dtype="float64")
    for _ in range(3):
        grad = _ce_grad(_W, x, _Y)
        g = mu * g + grad / np.abs(grad).sum(axis=1, keepdims=True)
        x = x + alpha * g / np.linalg.norm(g, axis=1, keepdims=True)
    assert _l2(x, _X).max() < eps and 0 < x.min() and x.max() < 1  # no projection in play
    attack = MIM(eps=eps, step_size=alpha, steps=3, decay_factor=mu, norm="l2")
    x_adv = attack(_affine_model(_W), _X.reshape(-1, *IMAGE), _Y).numpy().reshape(-1, DIM)
    np.testing.assert_allclose(x_adv, x, atol=1e-5)
    no_momentum = MIM(eps=eps, step_size=alpha, steps=3, decay_factor=0.0, norm="l2")
    x_plain = no_momentum(_affine_model(_W), _X.reshape(-1, *IMAGE), _Y).numpy()
    assert np.abs(x_plain.reshape(-1, DIM) - x).max() > 1e-3  # mu matters


def test_mim_lowers_accuracy_of_trained_digits_model(trained_digits_model, digits):
    x, y = dataset_arrays(digits.test)
    model = trained_digits_model

    def accuracy(images):
        return float(np.mean(np.argmax(model(images, training=False), axis=1) == y))

    clean = accuracy(x)
    mim = accuracy(MIM(eps=0.3, step_size=0.03, steps=10)(model, x, y))
    assert clean > 0.9
    assert mim < 0.2 and mim < clean - 0.7, (clean, mim)


# ----------------------------------------------------------------------------------------------
# Arguments


def test_attributes_and_repr():
    cw = CarliniWagnerL2(eps=1.5)
    assert cw.eps == 1.5 and cw.norm == 2 and CarliniWagnerL2().eps is None
    assert repr(cw).startswith("CarliniWagnerL2(eps=1.5")
    mim = MIM(eps=0.1, step_size=0.01, norm="l2")
    assert mim.eps == 0.1 and mim.norm == 2 and repr(mim).startswith("MIM(eps=0.1")


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": -1.0}, "eps must be a number >= 0"),
    ({"confidence": -0.1}, "confidence must be a number >= 0"),
    ({"learning_rate": 0.0}, "learning_rate must be a number > 0"),
    ({"binary_search_steps": 0}, "binary_search_steps must be an integer >= 1"),
    ({"max_iterations": 10.5}, "max_iterations must be an integer"),
    ({"initial_const": 0}, "initial_const must be a number > 0"),
    ({"abort_early": "yes"}, "abort_early must be True or False"),
    ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min must be < clip_max"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_cw_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        CarliniWagnerL2(**kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": -0.1}, "eps must be a number >= 0"),
    ({"eps": None}, "eps must be a number"),
    ({"step_size": 0.0}, "step_size must be a number > 0"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"decay_factor": -1.0}, "decay_factor must be a number >= 0"),
    ({"norm": "l1"}, "norm must be 'linf' or 'l2'"),
    ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min must be < clip_max"),
])
def test_mim_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MIM(**{"eps": 0.3, "step_size": 0.03, **kwargs})
