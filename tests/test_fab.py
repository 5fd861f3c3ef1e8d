"""FAB-T: closed-form minimal perturbations of an affine classifier, the box-constrained projection
against scipy's solvers, the eps threshold, target selection, determinism, a trained model, and
argument checks."""

import gin
import keras
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from conftest import dataset_arrays
from tfadv import models
from tfadv.attacks.fab import FABTargeted, hyperplane_box_step

# An affine 4-class classifier on 2x2x1 images, logits = flatten(x) @ W + B. Relative to class 0
# (flat), classes 1, 2 and 3 rise along mutually orthogonal directions.
W = np.array([[0.0, 0.2, 2.0, -0.5],
              [0.0, 0.2, -2.0, -0.5],
              [0.0, 0.2, 2.0, 0.5],
              [0.0, 0.2, -2.0, 0.5]], "float32")
B = np.array([0.0, -0.5, -0.3, -0.6], "float32")
DUAL = {"linf": 1, "l2": 2}
# Points well inside [0, 1]: four around 0.5 (class 0), one of class 3, one of class 1.
INTERIOR = np.concatenate([0.5 + np.random.default_rng(0).uniform(-0.03, 0.03, (4, 4)),
                           [[0.1, 0.1, 0.9, 0.9], [0.8, 0.7, 0.7, 0.8]]]).astype("float32")
# Points next to the box edges, where the unconstrained closest point would leave [0, 1].
AT_EDGES = np.array([[0.99, 0.01, 0.05, 0.95], [0.02, 0.98, 0.5, 0.5]], "float32")


def _affine_model():
    inputs = keras.Input((2, 2, 1))
    dense = keras.layers.Dense(4)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([W, B])
    return model


@pytest.fixture(scope="module")
def affine():
    """The affine model and one unbounded (eps=10) FAB-T per norm, shared to trace once."""
    return _affine_model(), {norm: FABTargeted(eps=10.0, norm=norm) for norm in DUAL}


def _run(attack, model, x):
    logits = x @ W + B
    y = logits.argmax(1)
    x_adv = attack(model, x.reshape(-1, 2, 2, 1), y).numpy().reshape(len(x), -1)
    return y, x_adv, (x_adv @ W + B).argmax(1)


def _size(delta, norm):
    return np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)


def _hyperplane_distances(x, norm):
    """|f_y - f_t| / ||w_y - w_t||_q per example and class t (inf at t = y), q the dual norm."""
    logits = (x @ W + B).astype("float64")
    y = logits.argmax(1)
    gaps = logits[np.arange(len(x)), y][:, None] - logits
    normals = W.T[None, :, :] - W.T[y][:, None, :]                  # w_t - w_y
    dist = gaps / np.maximum(np.linalg.norm(normals, DUAL[norm], axis=2), 1e-30)
    dist[np.arange(len(x)), y] = np.inf
    return dist, normals, gaps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_perturbation_matches_closed_form(affine, norm):
    model, attacks = affine
    dist, normals, gaps = _hyperplane_distances(INTERIOR, norm)
    nearest = dist.argmin(1)
    expected = dist.min(1)
    # Precondition: the closest point of each nearest hyperplane lies inside the box.
    n = normals[np.arange(len(INTERIOR)), nearest]
    step = (np.sign(n) * expected[:, None] if norm == "linf"
            else n * (gaps[np.arange(len(INTERIOR)), nearest] / np.sum(n * n, 1))[:, None])
    assert np.all((INTERIOR + step > 0.01) & (INTERIOR + step < 0.99))
    y, x_adv, pred = _run(attacks[norm], model, INTERIOR)
    found = _size(x_adv - INTERIOR, norm)
    # No adversarial point is closer than the nearest hyperplane; FAB gets within its overshoot.
    np.testing.assert_array_less(expected * (1 - 1e-4), found)
    np.testing.assert_array_less(found, expected * 1.03)
    assert np.all(pred != y)
    assert np.all(pred == nearest)              # here the nearest class wins at that point
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def _linf_box_optimum(x, v, need):
    """min ||d||_inf s.t. v.d >= need and 0 <= x + d <= 1 (LP over (d, lam))."""
    d = len(x)
    eye = np.eye(d)
    a_ub = np.block([[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))],
                     [-v[None, :], np.zeros((1, 1))]])
    b_ub = np.concatenate([np.zeros(2 * d), [-need]])
    bounds = [(-xi, 1.0 - xi) for xi in x] + [(0, None)]
    res = linprog(np.r_[np.zeros(d), 1.0], A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    return res.fun if res.success else np.inf


def _l2_box_optimum(x, v, need, equality=False):
    """min ||d||_2 s.t. v.d >= need (or == need) and 0 <= x + d <= 1 (SLSQP)."""
    cons = {"type": "eq" if equality else "ineq", "fun": lambda d: v @ d - need,
            "jac": lambda d: v}
    start = np.clip(v * need / (v @ v), -x, 1.0 - x)
    res = minimize(lambda d: 0.5 * d @ d, start, jac=lambda d: d, constraints=[cons],
                   bounds=[(-xi, 1.0 - xi) for xi in x], method="SLSQP",
                   options={"ftol": 1e-14, "maxiter": 500})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_perturbation_with_active_box_matches_scipy(affine, norm):
    model, attacks = affine
    x = AT_EDGES.astype("float64")
    _, normals, gaps = _hyperplane_distances(AT_EDGES, norm)
    expected = np.full(len(x), np.inf)
    for i in range(len(x)):
        for t in range(W.shape[1]):
            if gaps[i, t] <= 0:
                continue                          # t = y
            v = normals[i, t]
            best = (_linf_box_optimum(x[i], v, gaps[i, t]) if norm == "linf"
                    else np.linalg.norm(_l2_box_optimum(x[i], v, gaps[i, t])))
            expected[i] = min(expected[i], best)
    unconstrained = _hyperplane_distances(AT_EDGES, norm)[0].min(1)
    assert np.all(expected > unconstrained * 1.05)  # precondition: the box really binds
    y, x_adv, pred = _run(attacks[norm], model, AT_EDGES)
    found = _size(x_adv - AT_EDGES, norm)
    np.testing.assert_array_less(expected * (1 - 1e-4), found)
    np.testing.assert_array_less(found, expected * 1.03)
    assert np.all(pred != y)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_box_step_matches_scipy(norm):
    rng = np.random.default_rng(1)
    rows = 12
    points = rng.uniform(0, 1, (rows, 6))
    points[:, 0] = 1.0                                   # pixels on the box faces
    points[:, 1] = 0.0
    normal = rng.normal(size=(rows, 6))
    normal[::3, 2] = 0.0                                 # some zero components
    sign = np.where(rng.random(rows) < 0.5, -1.0, 1.0)
    room = np.where(normal * sign[:, None] > 0, 1 - points, points)
    reach = np.sum(np.abs(normal) * room, 1)           # the largest change the box allows
    # Needed change of <normal, .>: easy, box-binding, almost the full reach, and out of reach.
    fraction = np.tile([0.02, 0.5, 0.95, 1.5], rows // 4)
    need = sign * fraction * reach
    offset = np.sum(normal * points, 1) + need
    delta = hyperplane_box_step(points.astype("float32"), normal.astype("float32"),
                                offset.astype("float32"), np.inf if norm == "linf" else 2).numpy()
    assert np.all(points + delta >= -1e-6) and np.all(points + delta <= 1 + 1e-6)
    for i in range(rows):
        if fraction[i] > 1:                            # infeasible: the box corner nearest to it
            corner = np.where(normal[i] * sign[i] > 0, 1 - points[i], -points[i])
            np.testing.assert_allclose(delta[i], np.where(normal[i] == 0, 0, corner), atol=1e-6)
            continue
        assert abs(normal[i] @ delta[i] - need[i]) <= 1e-5 * (1 + abs(need[i]))
        if norm == "linf":
            best = _linf_box_optimum(points[i], normal[i] * sign[i], need[i] * sign[i])
            np.testing.assert_allclose(np.abs(delta[i]).max(), best, rtol=1e-5, atol=1e-7)
        else:                                          # the L2 minimiser is unique
            best = _l2_box_optimum(points[i], normal[i], need[i], equality=True)
            np.testing.assert_allclose(delta[i], best, atol=2e-5)


def test_targets_are_the_runner_up_classes(affine):
    model, _ = affine
    dist = _hyperplane_distances(INTERIOR, "linf")[0]
    ranked = np.argsort(-(INTERIOR @ W + B), axis=1)
    second = ranked[:, 1]
    expected = dist[np.arange(len(INTERIOR)), second]
    assert np.all(second != dist.argmin(1))   # precondition: runner-up is not the nearest class
    attack = FABTargeted(eps=10.0, norm="linf", n_target_classes=1)
    _, x_adv, pred = _run(attack, model, INTERIOR)
    found = _size(x_adv - INTERIOR, "linf")
    np.testing.assert_array_less(expected * (1 - 1e-4), found)
    np.testing.assert_array_less(found, expected * 1.03)
    np.testing.assert_array_equal(pred, second)


@pytest.mark.parametrize("norm, eps", [("linf", 0.045), ("l2", 0.09)])
def test_eps_decides_between_smallest_adversarial_and_clean_input(affine, norm, eps):
    model, _ = affine
    minimal = _hyperplane_distances(INTERIOR, norm)[0].min(1)
    reachable = minimal * 1.03 < eps
    assert reachable.any() and (~reachable).any() and np.all(reachable | (minimal > eps))
    y, x_adv, pred = _run(FABTargeted(eps=eps, norm=norm), model, INTERIOR)
    size = _size(x_adv - INTERIOR, norm)
    assert size.max() <= eps * (1 + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.all(pred[reachable] != y[reachable])
    np.testing.assert_allclose(size[reachable], minimal[reachable], rtol=0.03)
    # Beyond eps: the example comes back unchanged and is still classified correctly (robust).
    np.testing.assert_array_equal(x_adv[~reachable], INTERIOR[~reachable])
    np.testing.assert_array_equal(pred[~reachable], y[~reachable])


def test_traced_once_for_any_batch_size(affine):
    model, attacks = affine
    attack = attacks["linf"]
    for rows in (1, 3, 6):
        _run(attack, model, INTERIOR[:rows])
    assert attack.trace_count == 1


def test_same_seed_same_result_with_random_restarts():
    keras.utils.set_random_seed(0)
    model = models.digits_cnn()
    x = np.random.default_rng(2).uniform(0, 1, (12, 8, 8, 1)).astype("float32")
    y = model(x, training=False).numpy().argmax(1)     # correctly classified by definition
    kwargs = dict(eps=0.6, norm="l2", steps=4, n_target_classes=2, restarts=2, seed=3)
    attack = FABTargeted(**kwargs)
    first = attack(model, x, y).numpy()
    np.testing.assert_array_equal(attack(model, x, y).numpy(), first)
    np.testing.assert_array_equal(FABTargeted(**kwargs)(model, x, y).numpy(), first)
    size = np.linalg.norm((first - x).reshape(len(x), -1), axis=1)
    assert size.max() <= 0.6 * (1 + 1e-5) and size.max() > 0
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_trained_model_loses_most_accuracy_at_eps_0_3(trained_digits_model, digits):
    model = trained_digits_model
    x, y = dataset_arrays(digits.test)
    x, y = x[:120], y[:120]
    # Fewer steps and targets than AutoAttack's 100 x 9, to keep the test fast.
    attack = FABTargeted(eps=0.3, norm="linf", steps=10, n_target_classes=3)
    x_adv = attack(model, x, y).numpy()
    assert np.abs(x_adv - x).max() <= 0.3 * (1 + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    clean = np.mean(model(x, training=False).numpy().argmax(1) == y)
    robust = np.mean(model(x_adv, training=False).numpy().argmax(1) == y)
    assert clean > 0.9
    assert robust < 0.1


def test_repr_and_gin_binding():
    assert repr(FABTargeted(0.3)) == (
        "FABTargeted(eps=0.3, norm=linf, steps=100, n_target_classes=9)")
    gin.bind_parameter("FABTargeted.steps", 7)
    try:
        assert FABTargeted(eps=0.1).steps == 7
    finally:
        gin.clear_config()


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": -0.1}, "eps must be a number >= 0"),
    ({"eps": "0.3"}, "eps must be a number"),
    ({"norm": "l1"}, "norm must be 'linf' or 'l2'"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"n_target_classes": 0}, "n_target_classes must be an integer >= 1"),
    ({"restarts": 0}, "restarts must be an integer >= 1"),
    ({"alpha_max": 1.5}, r"alpha_max must be a number >= 0.0 and <= 1.0"),
    ({"eta": 0.9}, "eta must be a number >= 1"),
    ({"beta": 0.0}, "beta must be a number > 0"),
    ({"beta": 1.5}, "beta must be a number > 0.0 and <= 1.0"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min must be < clip_max"),
])
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FABTargeted(**{"eps": 0.3, **kwargs})
