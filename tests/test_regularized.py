"""TRADES, MART, ALP and AWP: closed-form losses and steps, BatchNorm, replicas, bad input, gin."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import linear_model, quick_train
from tfadv.attacks import PGD, kl_divergence
from tfadv.defenses import (ALP, AWP, MART, TRADES, ModelState, PGDAdversarialTraining,
                            StandardTraining)
from tfadv.defenses.alp import alp_loss
from tfadv.defenses.mart import mart_loss


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_linear = linear_model


W = np.array([[1.0, -2.0, 0.5], [0.5, 0.0, -1.0], [-1.0, 3.0, 0.2]], dtype="float32")
X = np.array([[0.2, 0.5, 0.9], [0.6, 0.1, 0.4], [0.3, 0.3, 0.3], [0.9, 0.8, 0.1]],
             dtype="float32")
Y = np.array([0, 1, 2, 1])


def _ce(z, y):
    return -np.log(_softmax(z)[np.arange(len(y)), y])


def _kl(p, z):
    """KL(p || softmax(z)) per row, 0 log 0 = 0."""
    q = _softmax(z)
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0), axis=-1)


def _numeric_grad(f, w, h=1e-6):
    w = w.astype("float64")
    grad = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        up, down = w.copy(), w.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


# --- losses in closed form ----------------------------------------------------------------

def test_kl_divergence_matches_hand_computation():
    p = np.array([[0.2, 0.8, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype="float32")
    z = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]], dtype="float32")
    q = _softmax(z.astype("float64"))
    expected = [0.2 * np.log(0.2 / q[0, 0]) + 0.8 * np.log(0.8 / q[0, 1]),
                sum(np.log((1 / 3) / q[1, k]) / 3 for k in range(3))]
    np.testing.assert_allclose(kl_divergence(p, z).numpy(), expected, rtol=1e-5)
    assert np.allclose(kl_divergence(_softmax(z), z).numpy(), 0.0, atol=1e-6)


def test_trades_objective_equals_ce_plus_beta_kl():
    x_adv = np.clip(X + np.array([0.1, -0.1, 0.1], dtype="float32"), 0, 1)
    model = TRADES(_linear(W), beta=3.0,
                   attack=PGD(eps=0.1, step_size=0.1, steps=1, loss_fn="kl_divergence"))
    loss, logits = model.objective(ModelState(model.base_model), X.reshape(4, 1, 3, 1), Y, None,
                                   x_adv.reshape(4, 1, 3, 1))
    z, z_adv = X @ W, x_adv @ W
    expected = _ce(z, Y).mean() + 3.0 * _kl(_softmax(z), z_adv).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(logits["clean"].numpy(), z, rtol=1e-5)
    np.testing.assert_allclose(logits["adv"].numpy(), z_adv, rtol=1e-5)


def test_trades_training_step_matches_closed_form():
    """Attack (seeded 0.001-style Gaussian start, one sign step on the KL) and the SGD step on
    CE + beta * KL, each computed independently in NumPy (the step by finite differences)."""
    eps, lr, beta = 0.1, 0.5, 6.0
    attack = PGD(eps=eps, step_size=eps, steps=1, random_start="normal", init_scale=0.05,
                 loss_fn="kl_divergence", seed=7)
    x4 = X.reshape(4, 1, 3, 1)
    x0 = attack.initial_point(tf.constant(x4)).numpy().reshape(4, 3)
    p = _softmax(X @ W)
    grad_x = (_softmax(x0 @ W) - p) @ W.T  # d KL(p || softmax(x' W)) / d x'
    x_adv = np.clip(np.clip(x0 + eps * np.sign(grad_x), X - eps, X + eps), 0, 1)

    def loss(w):
        z = X.astype("float64") @ w
        return _ce(z, Y).mean() + beta * _kl(_softmax(z), x_adv @ w).mean()

    expected = W - lr * _numeric_grad(loss, W)
    model = TRADES(_linear(W), beta=beta, attack=attack)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    logs = model.fit(x4, Y, batch_size=4, epochs=1, verbose=0, shuffle=False).history
    np.testing.assert_allclose(model.base_model.get_weights()[0], expected, atol=2e-5)
    np.testing.assert_allclose(logs["loss"][0], loss(W.astype("float64")), rtol=1e-5)


def _small(seed, synchronized=False, dropout=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.BatchNormalization(synchronized=synchronized)(h)
    h = keras.layers.Flatten()(h)
    if dropout:
        h = keras.layers.Dropout(0.3)(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def _data(n=16):
    rng = np.random.RandomState(0)
    return rng.rand(n, 8, 8, 1).astype("float32"), np.arange(n) % 10


def test_trades_with_beta_zero_is_clean_training():
    x, y = _data(32)
    weights = []
    for make in (lambda b: TRADES(b, beta=0.0), StandardTraining):
        base = _small(1)
        model = make(base)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        weights.append([v.numpy() for v in base.variables])  # BatchNorm statistics included
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _np_mart(y, zc, za, beta):
    pa, pc = _softmax(za), _softmax(zc)
    rows = np.arange(len(y))
    order = np.argsort(pa, axis=1)
    other = np.where(order[:, -1] == y, order[:, -2], order[:, -1])
    bce = _ce(za, y) - np.log(1.0001 - pa[rows, other] + 1e-12)
    kl = np.sum(pc * (np.log(pc) - np.log(pa + 1e-12)), axis=1)
    return bce + beta * kl * (1.0000001 - pc[rows, y])


def test_mart_loss_matches_official_formula():
    rng = np.random.RandomState(0)
    zc = rng.randn(6, 4).astype("float32") * 2
    za = rng.randn(6, 4).astype("float32") * 2
    y = np.array([0, 1, 2, 3, 0, 1])
    za[0] = [5.0, 1.0, 0.0, -1.0]  # adversarial prediction still correct: margin on class 1
    za[1] = [3.0, 1.0, 0.0, -1.0]  # wrong under attack: margin on the predicted class 0
    for beta in (0.0, 6.0):
        np.testing.assert_allclose(mart_loss(y, zc, za, beta).numpy(),
                                   _np_mart(y, zc.astype("float64"), za.astype("float64"), beta),
                                   rtol=1e-5)


def test_alp_loss_matches_hand_computation():
    rng = np.random.RandomState(1)
    zc, za = rng.randn(5, 3).astype("float32"), rng.randn(5, 3).astype("float32")
    y = np.array([0, 1, 2, 0, 1])
    expected = 0.5 * _ce(zc, y) + 0.5 * _ce(za, y) + 2.0 * np.mean((zc - za) ** 2, axis=1)
    np.testing.assert_allclose(alp_loss(y, zc, za, 2.0).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda b: MART(b, attack=PGD(eps=0.1, step_size=0.1, steps=1, random_start=None)),
    lambda b: ALP(b, attack=PGD(eps=0.1, step_size=0.1, steps=1, random_start=None)),
], ids=["MART", "ALP"])
def test_logged_loss_is_the_objective_on_the_attacks_examples(make):
    b = np.array([0.1, -0.2, 0.05], dtype="float32")
    model = make(_linear(W, b))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    x4 = X.reshape(4, 1, 3, 1)
    grad_x = (_softmax(X @ W + b) - np.eye(3)[Y]) @ W.T
    x_adv = np.clip(X + 0.1 * np.sign(grad_x), 0, 1)
    loss = model.fit(x4, Y, batch_size=4, epochs=1, verbose=0, shuffle=False).history["loss"][0]
    zc, za = (X @ W + b).astype("float64"), (x_adv @ W + b).astype("float64")
    per_example = (_np_mart(Y, zc, za, 6.0) if isinstance(model, MART)
                   else 0.5 * _ce(zc, Y) + 0.5 * _ce(za, Y) + np.mean((zc - za) ** 2, axis=1))
    np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-5)


# --- AWP ----------------------------------------------------------------------------------

def test_awp_step_is_w_minus_lr_grad_at_w_plus_v():
    """PGD-AT + AWP on a linear model with bias, against NumPy: x_adv at w; d = grad of the
    adversarial CE at w; v = gamma ||W|| d / ||d|| on the kernel only (no bias perturbation);
    update w - lr * grad L(w + v)."""
    eps, lr, gamma = 0.1, 0.5, 0.2
    b = np.array([0.1, -0.2, 0.05], dtype="float32")
    onehot = np.eye(3)[Y]
    grad_x = (_softmax(X @ W + b) - onehot) @ W.T
    x_adv = np.clip(X + eps * np.sign(grad_x), 0, 1).astype("float64")
    d = x_adv.T @ (_softmax(x_adv @ W + b) - onehot) / len(X)
    v = gamma * np.linalg.norm(W) * d / np.linalg.norm(d)
    residual = _softmax(x_adv @ (W + v) + b) - onehot
    expected_w = W - lr * x_adv.T @ residual / len(X)
    expected_b = b - lr * residual.mean(axis=0)
    plain_w = W - lr * x_adv.T @ (_softmax(x_adv @ W + b) - onehot) / len(X)

    def step(awp, learning_rate):
        model = PGDAdversarialTraining(
            _linear(W, b), attack=PGD(eps=eps, step_size=eps, steps=1, random_start=None),
            awp=awp)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate))
        model.fit(X.reshape(4, 1, 3, 1), Y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        return model.base_model.get_weights()

    w_new, b_new = step(AWP(gamma=gamma), lr)
    np.testing.assert_allclose(w_new, expected_w, atol=1e-5)
    np.testing.assert_allclose(b_new, expected_b, atol=1e-5)
    assert np.abs(w_new - plain_w).max() > 1e-3  # the perturbation changed the update
    # No perturbation is left in the variables: a step of size 0 leaves them bit-identical.
    w_zero, b_zero = step(AWP(gamma=gamma), 0.0)
    assert np.array_equal(w_zero, W) and np.array_equal(b_zero, b)


def _awp_model(base, gamma, lr=0.1):
    model = PGDAdversarialTraining(
        base, attack=PGD(eps=0.2, step_size=0.05, steps=3, random_start=None),
        awp=None if gamma is None else AWP(gamma=gamma))
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model


def test_awp_perturbation_pass_leaves_batchnorm_statistics_alone():
    x, y = _data()
    base = _small(2, dropout=True)
    model = _awp_model(base, 0.05)
    x_adv = model.attack(base, x, y)
    before = [v.numpy() for v in base.variables]  # moving statistics and dropout seed too
    v = model.awp.perturbation(model, tf.constant(x), tf.constant(y), None, x_adv)
    for a, b in zip(before, base.variables):
        assert np.array_equal(a, b.numpy())
    # Kernels only, each of norm gamma * ||w||.
    for var, p in zip(base.trainable_variables, v):
        if len(var.shape) < 2:
            assert p is None
        else:
            np.testing.assert_allclose(np.linalg.norm(p), 0.05 * np.linalg.norm(var.numpy()),
                                       rtol=1e-5)


def test_awp_with_gamma_zero_equals_the_plain_step_including_batchnorm():
    x, y = _data()
    results = []
    for gamma in (None, 0.0):
        base = _small(3)
        _awp_model(base, gamma).fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        results.append([v.numpy() for v in base.variables])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_awp_step_updates_batchnorm_from_the_pass_at_perturbed_weights():
    x, y = _data()
    base = _small(4)
    model = _awp_model(base, 0.1)
    x_adv = model.attack(base, x, y)
    v = model.awp.perturbation(model, tf.constant(x), tf.constant(y), None, x_adv)
    perturbed = [w.numpy() if p is None else w.numpy() + p.numpy()
                 for w, p in zip(base.trainable_variables, v)]
    _, expected = base.stateless_call(perturbed, [w.numpy() for w in base.non_trainable_variables],
                                      x_adv, training=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for var, value in zip(base.non_trainable_variables, expected):
        np.testing.assert_allclose(var.numpy(), np.asarray(value), rtol=1e-5, atol=1e-6)


def test_awp_warmup_trains_plainly_then_switches_on():
    x, y = _data(32)
    after_first = {}

    def record(epoch, logs):
        if epoch == 0:
            after_first["weights"] = [v.numpy() for v in base.variables]

    base = _small(5)
    model = PGDAdversarialTraining(
        base, attack=PGD(eps=0.2, step_size=0.05, steps=3, random_start=None),
        awp=AWP(gamma=0.05, warmup_epochs=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=record)])
    assert model.awp_active
    final_awp = [v.numpy() for v in base.variables]

    base = _small(5)
    plain = _awp_model(base, None)
    plain.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(after_first["weights"], base.variables):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-7)
    plain.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert max(np.abs(a - b.numpy()).max() for a, b in zip(final_awp, base.variables)) > 1e-4


# --- distribution -------------------------------------------------------------------------

def _attack(loss_fn="cross_entropy", eps=0.2):
    return PGD(eps=eps, step_size=0.05, steps=3, random_start=None, loss_fn=loss_fn)


DISTRIBUTED = {
    "AT-AWP": lambda b: PGDAdversarialTraining(b, attack=_attack(), awp=AWP(0.05)),
    # TRADES' attack needs a random start (its KL gradient vanishes at x), which differs
    # between one and two replicas; eps = 0 keeps the two-forward-pass objective deterministic.
    "TRADES-AWP": lambda b: TRADES(b, attack=_attack("kl_divergence", eps=0.0), awp=AWP(0.05)),
    "MART-AWP": lambda b: MART(b, attack=_attack(), awp=AWP(0.05)),
    "ALP": lambda b: ALP(b, attack=_attack()),
}


def _two_steps(strategy, make, initial):
    x, y = _data()
    with strategy.scope():
        base = _small(0, synchronized=True)
        base.set_weights(initial)
        model = make(base)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    logs = model.fit(ds, epochs=2, verbose=0).history
    return [w.numpy() for w in base.weights], logs["loss"]


@pytest.mark.parametrize("name", sorted(DISTRIBUTED))
def test_two_replicas_match_one_device(two_replicas, name):
    """Two steps on two logical devices equal one device: replica-scaled losses and an
    all-reduced AWP direction (per-replica directions would differ)."""
    initial = _small(6, synchronized=True).get_weights()
    one, loss_one = _two_steps(tf.distribute.OneDeviceStrategy("/cpu:0"), DISTRIBUTED[name],
                               initial)
    two, loss_two = _two_steps(two_replicas, DISTRIBUTED[name], initial)
    assert not np.allclose(one[0], initial[0])
    # Synchronized BatchNorm sums its statistics in a different order on two replicas (about
    # 2e-6 apart after two steps); per-replica AWP directions are ~0.3 apart.
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(loss_one, loss_two, rtol=2e-5)


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("build, needle", [
    (lambda b: TRADES(b, beta=-1.0), "beta must be a finite number >= 0"),
    (lambda b: MART(b, beta=float("nan")), "beta must be a finite number >= 0"),
    (lambda b: ALP(b, beta="1"), "beta must be a finite number >= 0"),
    (lambda b: PGDAdversarialTraining(b, awp=AWP(gamma=-0.01)), "AWP.gamma must be"),
    (lambda b: PGDAdversarialTraining(b, awp=AWP(warmup_epochs=1.5)), "warmup_epochs must be"),
    (lambda b: StandardTraining(b, awp=AWP()), "StandardTraining does not support AWP"),
    (lambda b: TRADES(b, attack=PGD(eps=0.3)), "loss_fn='kl_divergence'"),
    (lambda b: TRADES(b, eval_attack=PGD(loss_fn="kl_divergence")), "integer labels"),
])
def test_bad_hyperparameters_fail_at_construction(build, needle):
    with pytest.raises(ValueError, match=needle):
        build(_small(0))


def test_warmup_longer_than_training_fails_before_any_step():
    x, y = _data()
    base = _small(7)
    model = PGDAdversarialTraining(base, awp=AWP(warmup_epochs=3))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [v.numpy() for v in base.variables]
    with pytest.raises(ValueError, match=r"warmup_epochs=3 must be smaller than .* \(3\)"):
        model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    for a, b in zip(before, base.variables):
        assert np.array_equal(a, b.numpy())


DIRS = {}  # the directories of the bin/train runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    DIRS["tmp"] = tmp = tmp_path_factory.mktemp("regularized")
    lane.submit_bin("test_regularized warmup", "train", "--gin_file=trades_awp.gin",
                    f"--model_dir={tmp / 'run'}", "--gin_param=train.epochs = 5")
    # The user's example command, shortened to 2 epochs (AWP from the second).
    lane.submit_bin("test_regularized awp", "train", "--gin_file=awp.gin",
                    f"--model_dir={tmp / 'awp'}",
                    *quick_train("train.epochs = 2", "AWP.warmup_epochs = 1"))


def test_bin_train_rejects_a_warmup_longer_than_training_before_writing(background_lane):
    proc = background_lane.result("test_regularized warmup")
    assert proc.returncode != 0
    assert "AWP.warmup_epochs=10 must be smaller than the number of training epochs (5)" in (
        proc.stderr)
    assert not (DIRS["tmp"] / "run").exists()


def test_bin_train_awp_gin_writes_the_pgd_at_artifacts(background_lane):
    """The user's example command, shortened to 2 epochs (AWP from the second)."""
    model_dir = DIRS["tmp"] / "awp"
    proc = background_lane.result("test_regularized awp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((model_dir / "report.json").read_text())
    assert report["defense"] == "PGDAdversarialTraining" and report["epochs"] == 2
    assert set(report["robust_accuracy"]) == {"FGSM", "PGD-40", "autoattack-fast"}
    assert len(report["history"]["val_robust_accuracy"]) == 2
    config_text = (model_dir / "config.gin").read_text()
    assert "AWP.gamma = 0.01" in config_text and "PGDAdversarialTraining.awp = @AWP()" in (
        config_text)
    assert list((model_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((model_dir / "checkpoints").glob("ckpt-2*"))
    restored = keras.models.load_model(model_dir / "model.keras")
    assert restored.output_shape == (None, 10)
