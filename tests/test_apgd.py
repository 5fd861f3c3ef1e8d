"""APGD / APGD-T (Croce & Hein 2020): checkpoint schedule, step-size halving rule, constraints,
determinism, targets, strength against PGD on a trained model, scale invariance of DLR."""

import math

import keras
import numpy as np
import pytest

from conftest import dataset_arrays
from tfadv.attacks import PGD, dlr_targeted
from tfadv.attacks.apgd import APGD, APGDTargeted, checkpoints, halve_step_size

EPS = 0.1  # L-inf radius of the trained-model comparisons


def _dense_model(seed, num_classes=10, input_shape=(8, 8, 1)):
    """A small random ReLU net: cheap to trace, non-linear enough for the schedule to vary."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", kernel_initializer=keras.initializers.HeNormal()),
        keras.layers.Dense(num_classes)])


def _edge_images(n, seed=0):
    """Images with pixels at and near the box edges, where projection and clipping interact."""
    rng = np.random.default_rng(seed)
    return rng.choice([0.0, 1.0, 0.5, 0.03, 0.97, 0.2], size=(n, 8, 8, 1)).astype("float32")


def _predictions(model, x):
    return np.argmax(model(x, training=False), axis=1)


def _assert_in_threat_model(x_adv, x, eps, norm):
    x_adv = np.asarray(x_adv)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(x.shape[0], -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5)


def _expected_step_sizes(losses, eps, steps, rho=0.75):
    """Replays the step-size rule on recorded losses f(x^(0..steps)) (shape (steps+1, batch)):
    returns the step size of every update and the (halved, by condition 1, by condition 2)
    decisions taken at the checkpoints."""
    marks = checkpoints(steps)
    batch = losses.shape[1]
    eta = np.full(batch, 2 * eps)
    best = losses[0].copy()
    best_last, reduced_last, last = best.copy(), np.ones(batch, bool), 0
    sizes, decisions = np.empty((steps, batch)), []
    for k in range(steps):
        sizes[k] = eta
        best = np.maximum(best, losses[k + 1])
        if k + 1 in marks:
            window = k + 1 - last
            increased = (losses[last + 1:k + 2] > losses[last:k + 1]).sum(axis=0)
            cond1 = increased <= rho * window
            cond2 = ~reduced_last & (best <= best_last)
            halve = cond1 | cond2
            eta = np.where(halve, eta / 2, eta)
            decisions.append((halve, cond1, cond2))
            reduced_last, best_last, last = halve, best.copy(), k + 1
    return sizes, decisions


def test_checkpoints_match_hand_computed_schedule():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (steps of .22, .19, .16, .13, .10, .07, .06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # Paper's formula w_j = ceil(p_j * 100) gives the same for 100 steps.
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert [math.ceil(round(q * 100, 6)) for q in p[1:]] == checkpoints(100)
    # The reference's integer recursion for short runs: periods int(2.2)=2, then 1 each.
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        checkpoints(0)


def test_halving_conditions_closed_form():
    # columns: n_increased, window, reduced at last checkpoint, best loss, best loss at last one
    cases = np.array([
        # condition 1: at most rho * window increases -> halve (16.5 of 22; <= as in the code)
        [16, 22, 1, 2.0, 1.0],
        [17, 22, 1, 2.0, 1.0],
        [15, 20, 1, 2.0, 1.0],  # exactly rho * window: halve (the paper's strict < would not)
        [16, 20, 1, 2.0, 1.0],
        # condition 2: not halved last time and no improvement -> halve even when increasing
        [20, 20, 0, 1.0, 1.0],
        [20, 20, 0, 1.5, 1.0],  # improved: keep
        [20, 20, 1, 1.0, 1.0],  # halved last time: condition 2 off
    ])
    expected = [True, False, True, False, True, False, False]
    got = halve_step_size(cases[:, 0], cases[:, 1], 0.75, cases[:, 2].astype(bool), cases[:, 3],
                          cases[:, 4]).numpy()
    np.testing.assert_array_equal(got, expected)


def test_linear_model_halves_at_every_checkpoint_in_closed_form():
    """Two-class linear model, L-inf: the CE gradient sign is constant, so the first step (size
    2 eps) lands on the ball's best corner x + eps sign(w1 - w0) and every later iterate stays
    there. The loss never increases again, so condition 1 halves eta at every checkpoint."""
    w = np.array([[0.5, -1.0], [-0.3, 0.8], [1.2, 0.1], [0.0, -0.7]], "float32")
    model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, use_bias=False)])
    model.layers[-1].set_weights([w])
    x = np.array([0.5, 0.3, 0.6, 0.4, 0.25, 0.7, 0.5, 0.5], "float32").reshape(2, 2, 2, 1)
    y = np.array([0, 1])
    eps, steps = 0.1, 100
    trace = APGD(eps=eps, steps=steps, seed=3).trace(model, x, y)
    corner = x + eps * np.sign(w[:, 1] - w[:, 0]).reshape(1, 2, 2, 1) * np.array(
        [1, -1]).reshape(2, 1, 1, 1)  # ascent direction flips with the label
    iterates = trace["iterates"].numpy()
    np.testing.assert_allclose(iterates[1:], np.broadcast_to(corner, iterates[1:].shape),
                               atol=1e-6)
    expected = [2 * eps * 0.5 ** sum(w_ <= k for w_ in checkpoints(steps)) for k in range(steps)]
    np.testing.assert_allclose(trace["step_sizes"].numpy(), np.stack([expected] * 2, axis=1),
                               rtol=1e-6)
    np.testing.assert_allclose(trace["x_best"].numpy(), corner, atol=1e-6)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_step_size_schedule_and_constraints_along_iterates(norm, eps):
    """On a non-linear model the recorded step sizes follow exactly the rule replayed from the
    recorded losses; every iterate and the returned points lie in the eps-ball and the box.
    Under L2 both outcomes, and halvings by condition 2 alone, occur; under L-inf the iterates
    settle on corners of the ball, the loss stops increasing and condition 1 nearly always
    fires (the closed-form test above), so there only the halving is required."""
    model = _dense_model(0)
    x = _edge_images(32)
    y = _predictions(model, x)  # all correctly classified: every example is attacked
    steps = 100
    attack = APGD(eps=eps, norm=norm, steps=steps, loss="ce", seed=1)
    trace = attack.trace(model, x, y)
    losses = trace["losses"].numpy()
    sizes, decisions = _expected_step_sizes(losses, eps, steps)
    np.testing.assert_allclose(trace["step_sizes"].numpy(), sizes, rtol=1e-6)
    halve = np.stack([d[0] for d in decisions])
    only_cond2 = np.stack([d[2] & ~d[1] for d in decisions])
    assert halve.any()
    if norm == "l2":
        assert (~halve).any() and only_cond2.any()
    for iterate in trace["iterates"].numpy():
        _assert_in_threat_model(iterate, x, eps, norm)
    np.testing.assert_allclose(trace["loss_best"].numpy(), losses.max(axis=0), rtol=1e-6)

    x_adv = attack(model, x, y).numpy()
    _assert_in_threat_model(x_adv, x, eps, norm)
    fooled = _predictions(model, x_adv) != y
    assert fooled.mean() > 0.5
    # The attack's single run is the traced one: fooled examples come back at the misclassified
    # iterate it found, the others at their highest-loss iterate (up to float drift between the
    # two compiled graphs over 100 steps).
    np.testing.assert_array_equal(fooled, trace["fooled"].numpy())
    np.testing.assert_allclose(x_adv[fooled], trace["x_found"].numpy()[fooled], atol=1e-3)
    np.testing.assert_allclose(x_adv[~fooled], trace["x_best"].numpy()[~fooled], atol=1e-3)


def test_deterministic_for_a_seed_and_traced_once():
    """(APGDTargeted's determinism across instances is checked in the targets test.)"""

    def make(seed):
        return APGD(eps=0.05, steps=15, restarts=2, seed=seed)

    model = _dense_model(1)
    x = np.random.default_rng(2).random((40, 8, 8, 1)).astype("float32")
    y = _predictions(model, x)
    attack = make(5)
    first = attack(model, x, y).numpy()
    np.testing.assert_array_equal(attack(model, x, y).numpy(), first)
    np.testing.assert_array_equal(make(5)(model, x, y).numpy(), first)
    assert not np.array_equal(make(6)(model, x, y).numpy(), first)
    attack(model, x[:7], y[:7])
    assert attack.trace_count == 1  # one trace for all batch sizes


def test_targets_are_the_next_highest_clean_classes_capped_at_num_classes_minus_one():
    model = _dense_model(2, num_classes=5)
    x = np.random.default_rng(3).random((24, 8, 8, 1)).astype("float32")
    logits = model(x, training=False).numpy()
    y = logits.argmax(axis=1)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    attack = APGDTargeted(eps=0.05, steps=4, n_target_classes=9, seed=0)
    # Objective j targets the (j + 2)-th highest clean logit; j = 3 is the last (lowest) class.
    trace = attack.trace(model, x, y, objective=3)
    start = trace["iterates"].numpy()[0]
    expected = dlr_targeted(y, model(start, training=False), ranked[:, 4]).numpy()
    np.testing.assert_allclose(trace["losses"].numpy()[0], expected, rtol=1e-5, atol=1e-6)
    # 9 requested, 4 possible: the same runs (same seeds) as asking for exactly 4.
    capped = APGDTargeted(eps=0.05, steps=4, n_target_classes=4, seed=0)
    np.testing.assert_array_equal(attack(model, x, y).numpy(), capped(model, x, y).numpy())


@pytest.fixture(scope="module")
def digits_subset(digits):
    x, y = dataset_arrays(digits.test)
    return x[:100], y[:100]


def test_apgd_ce_at_least_as_strong_as_pgd20_and_apgd_t_works(trained_digits_model,
                                                              digits_subset):
    model = trained_digits_model
    x, y = digits_subset
    correct = _predictions(model, x) == y

    def robust(x_adv):
        _assert_in_threat_model(x_adv, x, EPS, "linf")
        return float(np.mean(_predictions(model, x_adv) == y))

    clean = float(correct.mean())
    pgd = robust(PGD(eps=EPS, step_size=EPS / 8, steps=20, select="misclassified",
                     seed=0)(model, x, y).numpy())
    apgd_ce = robust(APGD(eps=EPS, loss="ce")(model, x, y).numpy())
    x_t = APGDTargeted(eps=EPS, steps=50, n_target_classes=3)(model, x, y).numpy()
    apgd_t = robust(x_t)
    assert apgd_ce <= pgd < clean - 0.2
    assert apgd_t <= pgd
    # Misclassified clean inputs are already adversarial: returned unchanged.
    np.testing.assert_array_equal(x_t[~correct], x[~correct])


def test_dlr_is_scale_invariant_where_ce_saturates(trained_digits_model, digits_subset):
    base = trained_digits_model
    inputs = keras.Input(base.input_shape[1:])
    scaled = keras.Model(inputs, base(inputs) * 1e4)  # saturated softmax: CE gradients vanish
    x, y = digits_subset[0][:64], digits_subset[1][:64]
    clean = np.mean(_predictions(base, x) == y)
    robust = {}
    for name, model, loss in (("dlr", base, "dlr"), ("dlr_scaled", scaled, "dlr"),
                              ("ce_scaled", scaled, "ce")):
        x_adv = APGD(eps=EPS, loss=loss, steps=40)(model, x, y).numpy()
        robust[name] = np.mean(_predictions(model, x_adv) == y)
    assert robust["dlr"] < clean - 0.2
    assert abs(robust["dlr_scaled"] - robust["dlr"]) <= 2 / len(y)  # same attack, rescaled
    assert robust["ce_scaled"] > robust["dlr_scaled"] + 0.2  # CE gradients underflow to 0


def _tiny_model(num_classes):
    return _dense_model(0, num_classes=num_classes, input_shape=(2, 2, 1))


@pytest.mark.parametrize("make, needle", [
    (lambda: APGD(eps=-0.1), "eps must be a number >= 0"),
    (lambda: APGD(eps=0.1, norm="l1"), "norm must be 'linf' or 'l2'"),
    (lambda: APGD(eps=0.1, steps=0), "steps must be an integer >= 1"),
    (lambda: APGD(eps=0.1, steps=2.5), "steps must be an integer"),
    (lambda: APGD(eps=0.1, restarts=0), "restarts must be an integer >= 1"),
    (lambda: APGD(eps=0.1, loss="cw"), "loss must be one of"),
    (lambda: APGD(eps=0.1, rho=1.5), r"rho must be a number >= 0.0 and <= 1.0"),
    (lambda: APGD(eps=0.1, seed=-1), "seed must be an integer >= 0"),
    (lambda: APGD(eps=0.1, clip_min=1.0, clip_max=0.0), "clip_min must be < clip_max"),
    (lambda: APGDTargeted(eps=0.1, n_target_classes=0), "n_target_classes must be an integer"),
    (lambda: APGDTargeted(eps=0.1, rho=-0.1), "rho must be"),
    (lambda: APGD(eps=0.1, loss="dlr")(_tiny_model(2), np.zeros((1, 2, 2, 1)), [0]),
     "needs a model with >= 3 classes"),
    (lambda: APGDTargeted(eps=0.1)(_tiny_model(3), np.zeros((1, 2, 2, 1)), [0]),
     "needs a model with >= 4 classes"),
    (lambda: APGD(eps=0.1)(_tiny_model(3), np.zeros((1, 2, 2, 1)), [0.0]),
     "labels must be integer class indices"),
])
def test_bad_arguments_raise_clear_errors(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_repr_and_attributes():
    attack = APGD(eps=0.3, norm="l2", loss="dlr")
    assert attack.eps == 0.3 and attack.norm == 2
    assert repr(attack) == "APGD(eps=0.3, norm=l2, steps=100, loss=dlr, restarts=1)"
    targeted = APGDTargeted(eps=8 / 255)
    assert targeted.norm == np.inf and targeted.n_target_classes == 9
    assert repr(targeted).startswith("APGDTargeted(eps=0.0313725, norm=linf, steps=100")
