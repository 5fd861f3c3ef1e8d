"""Feature Scattering: log-domain Sinkhorn, the OT attack, label-smoothed loss, replicas, gin."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy.optimize import linprog

from conftest import linear_model
from tfadv import sinkhorn
from tfadv.attacks import PGD, cross_entropy
from tfadv.defenses import ModelState
from tfadv.defenses.feature_scatter import (FeatureScatterAttack, FeatureScattering,
                                            label_smoothing)

# --- NumPy references (float64) ---------------------------------------------------------------


def _np_cost(x, y):
    """max(0, 1 - cos(x_i, y_j))."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    yn = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-6)
    return np.maximum(1.0 - xn @ yn.T, 0.0)


def _np_official_plan_and_rounds(cost, reg=0.01, max_iter=100, tol=0.1):
    """The official ot.py loop, transcribed to NumPy: log(sum exp + 1e-6), break on the L1
    change of u after both updates. Returns the plan and the number of rounds run."""
    m, n = cost.shape
    u, v = np.zeros(m), np.zeros(n)

    def modified(u, v):
        return (-cost + u[:, None] + v[None, :]) / reg

    for rounds in range(1, max_iter + 1):
        u_prev = u
        u = reg * (np.log(1 / m) - np.log(np.exp(modified(u, v)).sum(1) + 1e-6)) + u
        v = reg * (np.log(1 / n) - np.log(np.exp(modified(u, v)).sum(0) + 1e-6)) + v
        if np.abs(u - u_prev).sum() < tol:
            break
    return np.exp(modified(u, v)), rounds


def _np_official_sinkhorn(cost, **kwargs):
    return _np_official_plan_and_rounds(cost, **kwargs)[0]


def _np_scaling_sinkhorn(cost, reg, rounds=20000):
    """Textbook Sinkhorn-Knopp matrix scaling (no log domain, no offset) to convergence."""
    m, n = cost.shape
    kernel = np.exp(-cost / reg)
    a, b = np.ones(m), np.ones(n)
    for _ in range(rounds):
        a = (1 / m) / (kernel @ b)
        b = (1 / n) / (kernel.T @ a)
    return a[:, None] * kernel * b[None, :]


def _np_distance(x, y, **kwargs):
    cost = _np_cost(x, y)
    return float(np.sum(_np_official_sinkhorn(cost, **kwargs) * cost))


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _logits_pair(seed, batch=6, classes=10, noise=0.3):
    """Clean logits and a perturbed copy, like the attack sees them."""
    rng = np.random.RandomState(seed)
    clean = rng.randn(batch, classes) * 2
    return clean, clean + noise * rng.randn(batch, classes)


# Long Sinkhorn runs as one graph (an eager tf.while_loop dispatches op by op).
_sinkhorn = tf.function(sinkhorn.sinkhorn, autograph=False)
_potentials = tf.function(sinkhorn.sinkhorn_potentials, autograph=False)


# --- optimal transport ------------------------------------------------------------------------

def test_cosine_cost_matches_numpy_including_clamp_and_zero_vectors():
    rng = np.random.RandomState(0)
    x, y = rng.randn(4, 5), rng.randn(3, 5)
    y[1] = x[2]           # cos = 1: cost 0 (clamped if rounding goes negative)
    y[2] = 0.0            # zero vector: cos = 0, cost 1
    cost = sinkhorn.cosine_cost(x, y).numpy()
    np.testing.assert_allclose(cost, _np_cost(x, y), atol=1e-12)
    assert cost.min() >= 0 and cost[2, 1] < 1e-12
    np.testing.assert_allclose(cost[:, 2], 1.0)


@pytest.mark.parametrize("seed, noise", [(0, 0.3), (1, 3.0), (2, 100.0)])
def test_sinkhorn_follows_the_official_loop(seed, noise):
    """Default settings (reg 0.01, <= 100 rounds, tol 0.1): the same plan, stopping round
    included, as the official algorithm transcribed to NumPy; float32 like the attack."""
    clean, adv = _logits_pair(seed, batch=8, noise=noise)
    cost = _np_cost(clean, adv)
    expected, rounds = _np_official_plan_and_rounds(cost)
    np.testing.assert_allclose(_sinkhorn(tf.constant(cost, tf.float32)).numpy(), expected,
                               rtol=2e-3, atol=1e-6)
    assert int(_potentials(tf.constant(cost, tf.float32))[2]) == rounds


@pytest.mark.parametrize("seed, noise", [(0, 0.3), (3, 100.0)])
def test_sinkhorn_marginals_within_the_stopping_rule(seed, noise):
    """After the last round the columns sum to 1/n (the v update came last), but for the official
    1e-6 offset: the update maps a column sum s to s / (s + 1e-6) / n. The rows are off by at
    most what the stopping rule allows: the next u update, reg * sum_i |log(1/m) -
    log(row_i + 1e-6)|, is below tol."""
    clean, adv = _logits_pair(seed, batch=12, noise=noise)
    cost = tf.constant(_np_cost(clean, adv))
    rounds = _potentials(cost)[2]
    assert 1 <= int(rounds) < 100  # stopped by the tolerance
    plan = _sinkhorn(cost).numpy()
    assert np.all(plan.sum(0) <= 1 / 12) and np.all(plan.sum(0) >= 0.99 / 12)
    next_change = 0.01 * np.abs(np.log(1 / 12) - np.log(plan.sum(1) + 1e-6)).sum()
    assert next_change < 0.1


@pytest.mark.parametrize("reg", [0.01, 0.3])
def test_sinkhorn_iterated_to_convergence_has_exact_marginals(reg):
    """Far below the official tolerance, rows and columns both sum to 1/n - 1e-6 (the fixed
    point of the offset update s -> s / (s + 1e-6) / n)."""
    clean, adv = _logits_pair(0, batch=12, noise=0.3)
    tight = _sinkhorn(tf.constant(_np_cost(clean, adv)), reg=reg, max_iter=5000,
                      tol=1e-12).numpy()
    np.testing.assert_allclose(tight.sum(1), 1 / 12 - 1e-6, atol=1e-9)
    np.testing.assert_allclose(tight.sum(0), 1 / 12 - 1e-6, atol=1e-9)


def test_converged_plan_matches_textbook_sinkhorn_knopp():
    rng = np.random.RandomState(4)
    cost = rng.uniform(0, 2, size=(5, 7))
    plan = _sinkhorn(cost, reg=0.05, max_iter=5000, tol=1e-13).numpy()
    # The offset 1e-6 against marginals 1/5, 1/7 moves the plan by ~1e-5 relatively.
    np.testing.assert_allclose(plan, _np_scaling_sinkhorn(cost, 0.05), rtol=2e-5, atol=1e-12)


def test_entropic_cost_is_within_reg_log_n_of_the_exact_transport_cost():
    """0 <= <T_reg, C> - OT(C) <= reg * log(m n) - reg * H_min, bounded by reg * log(m n); the
    exact OT from scipy's linear program, on a rectangular problem (marginals 1/4 and 1/6)."""
    rng = np.random.RandomState(5)
    m, n, reg = 4, 6, 0.01
    cost = _np_cost(rng.randn(m, 3), rng.randn(n, 3))
    rows = np.kron(np.eye(m), np.ones(n))     # sum_j T_ij = 1/m
    cols = np.kron(np.ones(m), np.eye(n))     # sum_i T_ij = 1/n
    exact = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                    b_eq=np.r_[np.full(m, 1 / m), np.full(n, 1 / n)], bounds=(0, None),
                    method="highs")
    assert exact.status == 0
    plan = _sinkhorn(cost, reg=reg, max_iter=5000, tol=1e-12).numpy()
    gap = float(np.sum(plan * cost)) - exact.fun
    assert -1e-5 <= gap <= reg * np.log(m * n)
    # A smaller regularisation gets closer.
    plan = _sinkhorn(cost, reg=0.002, max_iter=20000, tol=1e-12).numpy()
    assert abs(float(np.sum(plan * cost)) - exact.fun) <= 0.002 * np.log(m * n)


@pytest.mark.parametrize("reg, tol", [(0.05, 0.0), (0.01, 0.1)])
def test_gradient_flows_through_the_sinkhorn_iterations(reg, tol):
    """d sum(T * C) / d(x, y) by autodiff equals central differences of the float64 NumPy
    transcription of the official loop. With reg 0.05 it differs from the gradient with the plan
    frozen (nothing is detached); at the official 0.01 this near-diagonal plan is saturated
    (almost a permutation), its derivative vanishes and the two agree to ~1e-11."""
    clean, adv = _logits_pair(6, batch=3, classes=4, noise=0.5)
    kwargs = dict(reg=reg, max_iter=50 if tol == 0 else 100, tol=tol)
    x, y = tf.Variable(clean), tf.Variable(adv)
    with tf.GradientTape(persistent=True) as tape:
        cost = sinkhorn.cosine_cost(x, y)
        distance = tf.reduce_sum(_sinkhorn(cost, **kwargs) * cost)
        frozen = tf.reduce_sum(tf.stop_gradient(_sinkhorn(cost, **kwargs)) * cost)
    np.testing.assert_allclose(float(distance), _np_distance(clean, adv, **kwargs), rtol=1e-9)
    for var, value, first in ((x, clean, True), (y, adv, False)):
        grad = tape.gradient(distance, var).numpy()
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[idx] += 1e-6
            down[idx] -= 1e-6
            args_up = (up, adv) if first else (clean, up)
            args_down = (down, adv) if first else (clean, down)
            numeric[idx] = (_np_distance(*args_up, **kwargs)
                            - _np_distance(*args_down, **kwargs)) / 2e-6
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-3
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)
        through_plan = np.abs(grad - tape.gradient(frozen, var).numpy()).max()
        assert through_plan > 1e-3 * np.abs(grad).max() if reg == 0.05 else through_plan < 1e-8


def test_sinkhorn_distance_is_graph_compatible_with_an_unknown_batch():
    clean, adv = _logits_pair(7)
    fn = tf.function(lambda a, b: sinkhorn.sinkhorn_distance(a, b), input_signature=[
        tf.TensorSpec([None, 10], tf.float32)] * 2, autograph=False)
    np.testing.assert_allclose(float(fn(clean.astype("float32"), adv.astype("float32"))),
                               _np_distance(clean, adv), rtol=1e-4)


# --- the attack -------------------------------------------------------------------------------

W = np.array([[1.0, -2.0, 0.5], [0.5, 0.0, -1.0], [-1.0, 3.0, 0.2]], dtype="float32")
X = np.array([[0.2, 0.5, 0.9], [0.6, 0.1, 0.4], [0.3, 0.3, 0.3], [0.9, 0.8, 0.1]],
             dtype="float32")
Y = np.array([0, 1, 2, 1])


_linear = linear_model


def test_attack_step_matches_the_official_algorithm_in_numpy():
    """Seeded uniform start x0 (not clipped); x' = clip(proj(x0 + eps sign(grad D(x0)))), with
    the gradient by central differences of the NumPy transcription of the official OT loss."""
    eps = 0.15
    attack = FeatureScatterAttack(eps=eps, seed=11)
    x4 = X.reshape(4, 1, 3, 1)
    x0 = attack.initial_point(tf.constant(x4)).numpy().reshape(4, 3).astype("float64")
    assert np.abs(x0 - X).max() <= eps + 1e-7 and np.abs(x0 - X).max() > eps / 2
    clean = X.astype("float64") @ W

    def distance(xp):
        return _np_distance(clean, xp @ W)

    grad = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        up, down = x0.copy(), x0.copy()
        up[idx] += 1e-7
        down[idx] -= 1e-7
        grad[idx] = (distance(up) - distance(down)) / 2e-7
    assert np.abs(grad).min() > 1e-4  # no sign is ambiguous
    expected = np.clip(np.clip(x0 + eps * np.sign(grad), X - eps, X + eps), 0, 1)
    x_adv = attack(_linear(W), x4, Y).numpy().reshape(4, 3)
    np.testing.assert_allclose(x_adv, expected, atol=1e-6)
    assert distance(x_adv) > distance(x0)


def _small(seed, synchronized=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.BatchNormalization(synchronized=synchronized)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def _data(n=16, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 8, 8, 1).astype("float32")
    x[:, :2] = np.round(x[:, :2])  # pixels at the box edges: the clip must act
    return x, np.arange(n) % 10


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.8)])
def test_attack_stays_in_the_ball_and_box_and_ignores_labels(norm, eps):
    x, y = _data()
    base = _small(1)
    attack = FeatureScatterAttack(eps=eps, norm=norm, seed=3)
    x_adv = attack(base, x, y).numpy()
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps + 1e-5 and size.min() > eps / 4
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    start = attack.initial_point(tf.constant(x)).numpy()
    assert start.min() < 0 or start.max() > 1  # the start is not clipped (official)
    np.testing.assert_array_equal(attack(base, x, (y + 3) % 10).numpy(), x_adv)
    np.testing.assert_array_equal(attack(base, x, np.zeros_like(y)).numpy(), x_adv)
    # BatchNorm runs in eval mode: the attack leaves its statistics alone.
    for var in base.non_trainable_variables:
        assert np.all(var.numpy() == (0.0 if "mean" in var.path else 1.0))


def test_attack_increases_the_ot_distance_on_a_small_model():
    base = _small(2)
    attack = FeatureScatterAttack(eps=0.1, seed=0)
    gains = []
    for seed in range(3):
        x, y = _data(32, seed=seed)
        clean = base(x, training=False)
        before = attack.distance(clean, base(attack.initial_point(tf.constant(x))))
        after = attack.distance(clean, base(attack(base, x, y)))
        gains.append(float(after - before))
    assert min(gains) > 0, gains


# --- training loss ------------------------------------------------------------------------

def test_label_smoothing_is_the_official_formula():
    targets = label_smoothing(np.array([3, 0]), 10, 0.5).numpy()
    assert np.allclose(targets[0, 3], 0.5) and np.allclose(targets[1, 0], 0.5)
    np.testing.assert_allclose(np.delete(targets[0], 3), 0.5 / 9)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(label_smoothing([1], 3, 0.0).numpy(), [[0, 1, 0]])


def test_objective_is_label_smoothed_soft_cross_entropy_on_the_adversarial_logits():
    x_adv = np.clip(X + np.array([0.1, -0.1, 0.1], dtype="float32"), 0, 1).reshape(4, 1, 3, 1)
    for ls in (0.5, 0.2):
        model = FeatureScattering(_linear(W), ls_factor=ls, attack=FeatureScatterAttack(eps=0.1))
        loss, logits = model.objective(ModelState(model.base_model), X.reshape(4, 1, 3, 1), Y,
                                       None, x_adv)
        z = x_adv.reshape(4, 3).astype("float64") @ W
        log_p = np.log(_softmax(z))
        # K = 3: 1 - ls on the true class, ls / 2 on each of the two others.
        targets = np.where(np.eye(3)[Y] == 1, 1 - ls, ls / 2)
        np.testing.assert_allclose(float(loss), -(targets * log_p).sum(1).mean(), rtol=1e-6)
        np.testing.assert_allclose(logits["adv"].numpy(), z, rtol=1e-5)
        assert set(logits) == {"adv"}  # only adversarial examples are trained on
    # ls_factor = 0 is the plain cross-entropy; sample weights weigh the per-example losses.
    model = FeatureScattering(_linear(W), ls_factor=0.0, attack=FeatureScatterAttack(eps=0.1))
    weights = np.array([1.0, 0.0, 2.0, 1.0], dtype="float32")
    loss, _ = model.objective(ModelState(model.base_model), None, Y, weights, x_adv)
    ce = cross_entropy(Y, x_adv.reshape(4, 3) @ W).numpy()
    np.testing.assert_allclose(float(loss), (weights * ce).sum() / 4, rtol=1e-6)


def test_defaults_follow_the_official_code():
    model = FeatureScattering(_small(0))
    attack = model.attack
    assert isinstance(attack, FeatureScatterAttack) and model.ls_factor == 0.5
    assert attack.eps == pytest.approx(8 / 255) and attack.step_size == attack.eps
    assert attack.steps == 1 and (attack.sinkhorn_reg, attack.sinkhorn_iters,
                                  attack.sinkhorn_tol) == (0.01, 100, 0.1)
    pgd = model.eval_attack  # fs_eval.py: PGD-20, step 2/255 at eps 8/255, random start
    assert isinstance(pgd, PGD) and pgd.steps == 20 and pgd.random_start == "uniform"
    assert pgd.step_size == pytest.approx(2 / 255) and pgd.eps == attack.eps


def test_training_on_digits_runs_and_reports_robust_accuracy():
    from tfadv import data, models

    digits = data.load_dataset("digits", batch_size=64)
    keras.utils.set_random_seed(0)
    base = models.digits_cnn()
    model = FeatureScattering(
        base, attack=FeatureScatterAttack(eps=0.3),
        eval_attack=PGD(eps=0.3, step_size=0.1, steps=3, seed=0))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = [v.numpy() for v in base.trainable_variables]
    logs = model.fit(digits.train.take(6), epochs=2, verbose=0).history
    assert all(np.isfinite(logs["loss"])) and logs["loss"][1] < logs["loss"][0]
    assert set(logs) >= {"loss", "adv_accuracy"} and "accuracy" not in logs
    assert any(np.abs(a - v.numpy()).max() > 0 for a, v in zip(before, base.trainable_variables))
    result = model.evaluate(digits.test.take(2), return_dict=True, verbose=0)
    assert 0 <= result["robust_accuracy"] <= result["accuracy"] + 0.1


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("build, needle", [
    (lambda: FeatureScatterAttack(eps=-0.1), "eps must be a number >= 0"),
    (lambda: FeatureScatterAttack(step_size=0.0), "step_size must be a number > 0"),
    (lambda: FeatureScatterAttack(steps=0), "steps must be an integer >= 1"),
    (lambda: FeatureScatterAttack(steps=1.5), "steps must be an integer >= 1"),
    (lambda: FeatureScatterAttack(norm="l1"), "norm must be 'linf' or 'l2'"),
    (lambda: FeatureScatterAttack(sinkhorn_reg=0.0), "sinkhorn_reg must be a number > 0"),
    (lambda: FeatureScatterAttack(sinkhorn_iters=0), "sinkhorn_iters must be an integer >= 1"),
    (lambda: FeatureScatterAttack(sinkhorn_tol=-1.0), "sinkhorn_tol must be a number >= 0"),
    (lambda: FeatureScatterAttack(clip_min=1.0, clip_max=0.0), "clip_min must be < clip_max"),
    (lambda: FeatureScattering(_small(0), ls_factor=1.0), "ls_factor must be a number >= 0 and"),
    (lambda: FeatureScattering(_small(0), ls_factor=-0.1), "ls_factor must be a number >= 0"),
    (lambda: FeatureScattering(_small(0), ls_factor=True), "ls_factor must be a number >= 0"),
    (lambda: FeatureScattering(_small(0), ls_factor="0.5"), "ls_factor must be a number >= 0"),
    (lambda: FeatureScattering(_small(0), margin=0.2), "margin must be 0"),
    (lambda: sinkhorn.sinkhorn(np.ones((2, 2)), reg=-1.0), "reg must be a number > 0"),
    (lambda: sinkhorn.sinkhorn(np.ones((2, 2)), max_iter=0), "max_iter must be an integer >= 1"),
    (lambda: sinkhorn.sinkhorn(np.ones((2, 2)), tol=-0.1), "tol must be a number >= 0"),
    (lambda: label_smoothing([0], 1, 0.5), "at least 2 classes"),
])
def test_bad_hyperparameters_raise_clear_errors(build, needle):
    with pytest.raises(ValueError, match=needle):
        build()


# --- distribution -------------------------------------------------------------------------

class ChunkedPlans(FeatureScattering):
    """One device attacking each half of the batch on its own: the documented meaning of a
    two-replica step (per-replica transport plans)."""

    def prepare(self, x, y):
        half = tf.shape(x)[0] // 2
        return tf.concat([self.attack(self.base_model, x[:half], y[:half]),
                          self.attack(self.base_model, x[half:], y[half:])], 0)


def _attack_for_replicas():
    # A smooth plan (reg 0.5): at 0.01 the plan is nearly the identity coupling on this model,
    # so per-replica and global plans would barely differ.
    return FeatureScatterAttack(eps=0.1, sinkhorn_reg=0.5, seed=5)


def _one_step(strategy, cls, initial):
    x, y = _data()
    with strategy.scope():
        base = _small(0, synchronized=True)
        base.set_weights(initial)
        model = cls(base, attack=_attack_for_replicas())
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    loss = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
    return [w.numpy() for w in base.weights], loss


def test_two_replicas_train_with_per_replica_plans(two_replicas):
    """A step on two replicas (8 examples each, same seed) equals one device attacking each
    half of the batch separately; one plan over the whole batch, from the same starts, would
    give other adversarial examples."""
    initial = _small(6, synchronized=True).get_weights()
    chunked, loss_chunked = _one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), ChunkedPlans,
                                      initial)
    two, loss_two = _one_step(two_replicas, FeatureScattering, initial)
    assert not np.allclose(chunked[0], initial[0])
    # Synchronized BatchNorm sums its statistics in another order on two replicas.
    for a, b in zip(chunked, two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(loss_chunked, loss_two, rtol=2e-5)

    x, _ = _data()
    base = _small(0, synchronized=True)
    base.set_weights(initial)
    attack = _attack_for_replicas()
    starts = [attack.initial_point(tf.constant(x[:8])), attack.initial_point(tf.constant(x[8:]))]

    def ascend(images, start):
        images = tf.constant(images)
        return attack.ascend(base, images, attack.targets(base, images), start).numpy()

    per_half = np.concatenate([ascend(x[:8], starts[0]), ascend(x[8:], starts[1])])
    joint = ascend(x, tf.concat(starts, 0))
    assert np.mean(np.abs(per_half - joint) > 0.1) > 0.05  # sign flips: 2 eps apart


# --- gin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, eps", [("feature_scatter.gin", 0.3),
                                       ("paper/feature_scatter_cifar10.gin", 8 / 255)])
def test_gin_files_build_the_official_setting(name, eps):
    from tfadv import config
    from tfadv import train as train_lib

    # mock_data's 4 TFDS examples per split: the CIFAR-10 validation split must leave some.
    mock = ["load_dataset.validation_size = 2"] if name.startswith("paper/") else []
    config.parse([name], ["train.epochs = 1", "wide_resnet.depth = 10", "wide_resnet.width = 1",
                          *mock])
    with tfds.testing.mock_data(num_examples=4):
        built = train_lib.train("/nonexistent-model-dir", dry_run=True)
        x, y = next(iter(built["data"].test))
    defense = built["defense"]
    assert isinstance(defense, FeatureScattering) and defense.ls_factor == 0.5
    attack = defense.attack
    assert isinstance(attack, FeatureScatterAttack) and attack.eps == pytest.approx(eps)
    assert attack.step_size == attack.eps and attack.steps == 1
    assert isinstance(defense.eval_attack, PGD) and defense.eval_attack.eps == attack.eps
    x_adv = attack(defense.base_model, x[:3], y[:3]).numpy()
    assert np.abs(x_adv - x[:3].numpy()).max() <= eps + 1e-6
    if name.startswith("paper"):
        assert set(built["eval_attacks"]) == {"PGD-20", "CW-20"}
        assert built["eval_attacks"]["CW-20"].loss_fn.__name__ == "cw_margin"
