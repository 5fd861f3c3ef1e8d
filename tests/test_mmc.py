"""MMC (Pang et al. 2020): centres, head, loss and SGD step in closed form, the random-target
attack, saving, replicas, a short digits run, bad input and the gin file."""

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv import config, data, evaluation, models
from tfadv import train as train_lib
from tfadv.attacks import PGD
from tfadv.defenses import ModelState
from tfadv.defenses.mmc import MMC, RandomTargetPGD, mmc_loss, targeted_cross_entropy
from tfadv.heads import MMCHead, find_mmc_head, mmc_centers, mmc_model


def _head_model(weights, bias, num_classes, c_mm, image_shape):
    """z = flatten(x) @ weights + bias, then the MMC head: -||z - mu_k||^2."""
    inputs = keras.Input(image_shape)
    dense = keras.layers.Dense(weights.shape[1], name="mmc_features")
    outputs = MMCHead(num_classes, c_mm=c_mm, name="logits")(
        dense(keras.layers.Flatten()(inputs)))
    model = keras.Model(inputs, outputs)
    dense.set_weights([weights, bias])
    return model


def _np_logits(z, mu):
    return -np.sum((z[:, None, :] - mu[None]) ** 2, axis=-1)


# Three classes in a 3-d feature space; images of shape (1, 3, 1).
W = np.array([[1.0, -2.0, 0.5], [0.5, 0.0, -1.0], [-1.0, 3.0, 0.2]], dtype="float32")
B = np.array([0.1, -0.2, 0.3], dtype="float32")
X = np.array([[0.2, 0.5, 0.9], [0.6, 0.1, 0.4], [0.3, 0.3, 0.3], [0.9, 0.8, 0.1]],
             dtype="float32")
Y = np.array([0, 1, 2, 1])
C_MM = 2.0


# --- centres --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, dim", [(2, 2), (3, 5), (10, 10), (10, 256), (100, 256)])
@pytest.mark.parametrize("c_mm", [1.0, 10.0, 100.0])
def test_centres_have_norm_c_mm_and_equal_inner_products(num_classes, dim, c_mm):
    mu = mmc_centers(num_classes, dim, c_mm)
    assert mu.shape == (num_classes, dim)
    gram = mu @ mu.T
    np.testing.assert_allclose(np.diag(gram), c_mm ** 2, rtol=1e-9)
    off = gram[~np.eye(num_classes, dtype=bool)]
    np.testing.assert_allclose(off, -c_mm ** 2 / (num_classes - 1), rtol=1e-7,
                               atol=1e-9 * c_mm ** 2)
    # The construction: mu_1 = C_MM e_1, lower-triangular, positive diagonal up to L - 1.
    np.testing.assert_allclose(mu[0], c_mm * np.eye(dim)[0])
    assert np.all(np.triu(mu, 1) == 0) and np.all(np.diag(mu)[:num_classes - 1] > 0)


@pytest.mark.parametrize("args, needle", [
    ((10, 9, 10.0), "dim=9 must be >= num_classes=10"),
    ((10, 256, 0.0), "c_mm"), ((10, 256, -1.0), "c_mm"), ((10, 256, float("nan")), "c_mm"),
    ((1, 256, 10.0), "num_classes must be an integer >= 2"),
])
def test_centres_reject_bad_arguments(args, needle):
    with pytest.raises(ValueError, match=needle):
        mmc_centers(*args)


# --- head -----------------------------------------------------------------------------------

def test_head_outputs_negative_squared_distances_and_predicts_the_nearest_centre():
    rng = np.random.RandomState(0)
    z = (rng.randn(20, 6) * 3).astype("float32")
    head = MMCHead(4, c_mm=3.0)
    out = head(z).numpy()
    mu = mmc_centers(4, 6, 3.0)
    np.testing.assert_allclose(head.centers.numpy(), mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, _np_logits(z.astype("float64"), mu), rtol=1e-5, atol=1e-4)
    distances = np.linalg.norm(z[:, None, :] - mu[None], axis=-1)
    np.testing.assert_array_equal(out.argmax(-1), distances.argmin(-1))
    assert head.trainable_weights == [] and len(head.non_trainable_weights) == 1


def test_mmc_model_keeps_the_tfadv_model_contract():
    model = mmc_model((8, 8, 1), 10, backbone="digits_cnn", dim=16, c_mm=10.0)
    assert model.layers[-1].name == "logits" and isinstance(model.layers[-1], MMCHead)
    assert model.get_layer("mmc_features").units == 16
    assert model.output_shape == (None, 10) and find_mmc_head(model) is model.layers[-1]
    evaluation.check_logits_model(model, (8, 8, 1))
    out = model(np.random.RandomState(0).rand(5, 8, 8, 1).astype("float32")).numpy()
    assert np.all(out <= 0) and not evaluation.looks_like_probabilities(out)


# --- loss and step in closed form -----------------------------------------------------------

def test_mmc_loss_on_fixed_features_matches_hand_computation():
    rng = np.random.RandomState(1)
    z = rng.randn(6, 5).astype("float32")
    y = np.array([0, 3, 1, 2, 3, 0])
    inputs = keras.Input((5,))
    base = keras.Model(inputs, MMCHead(4, c_mm=C_MM)(inputs))
    mu = mmc_centers(4, 5, C_MM)
    per_example = np.sum((z - mu[y]) ** 2, axis=1)  # ||z - mu_y||^2, no 1/2 (official code)
    logits = base(z)
    np.testing.assert_allclose(mmc_loss(y, logits).numpy(), per_example, rtol=1e-5)
    model = MMC(base)
    loss, out = model.objective(ModelState(base), z, y, None, None)
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-5)
    assert list(out) == ["clean"]
    weights = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 0.0], dtype="float32")
    loss, _ = model.objective(ModelState(base), z, y, weights, None)
    np.testing.assert_allclose(float(loss), np.sum(weights * per_example) / len(y), rtol=1e-5)


def test_one_sgd_step_matches_the_closed_form_gradient():
    """loss = (1/B) sum_i ||x_i W + b - mu_{y_i}||^2, so dW = (2/B) X^T (Z - M_y) and
    db = (2/B) sum_i (z_i - mu_{y_i})."""
    lr = 0.05
    mu = mmc_centers(3, 3, C_MM)
    z = X.astype("float64") @ W + B
    residual = z - mu[Y]
    expected_w = W - lr * 2.0 / len(Y) * X.T @ residual
    expected_b = B - lr * 2.0 / len(Y) * residual.sum(0)
    base = _head_model(W, B, 3, C_MM, (1, 3, 1))
    model = MMC(base)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    logs = model.fit(X.reshape(4, 1, 3, 1), Y, batch_size=4, epochs=1, verbose=0,
                     shuffle=False).history
    new_w, new_b = base.get_layer("mmc_features").get_weights()
    np.testing.assert_allclose(new_w, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_b, expected_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logs["loss"][0], np.mean(np.sum(residual ** 2, 1)), rtol=1e-5)
    np.testing.assert_allclose(base.layers[-1].centers.numpy(), mu, atol=1e-6)  # fixed


def test_adversarial_objective_uses_the_attack_examples():
    attack = RandomTargetPGD(eps=0.1, step_size=0.05, steps=2, seed=0)
    base = _head_model(W, B, 3, C_MM, (1, 3, 1))
    model = MMC(base, attack=attack)
    x4 = X.reshape(4, 1, 3, 1)
    x_adv = model.prepare(x4, Y).numpy()
    assert np.abs(x_adv - x4).max() <= 0.1 + 1e-6
    loss, out = model.objective(ModelState(base), x4, Y, None, x_adv)
    mu = mmc_centers(3, 3, C_MM)
    z_adv = x_adv.reshape(4, 3).astype("float64") @ W + B
    np.testing.assert_allclose(float(loss), np.mean(np.sum((z_adv - mu[Y]) ** 2, 1)), rtol=1e-5)
    assert list(out) == ["adv"]
    # The default evaluation attack: PGD on the (non-saturating) CW margin, same budget.
    assert isinstance(model.eval_attack, PGD) and not isinstance(model.eval_attack,
                                                                 RandomTargetPGD)
    assert model.eval_attack.eps == attack.eps and model.eval_attack.steps == attack.steps
    assert model.eval_attack.loss_fn.__name__ == "cw_margin"


# --- the random-target attack ---------------------------------------------------------------

def test_random_target_attack_stays_in_the_ball_and_moves_towards_the_targets():
    rng = np.random.RandomState(0)
    x = rng.rand(64, 8, 8, 1).astype("float32")
    y = rng.randint(0, 10, 64)
    model = _head_model(rng.randn(64, 10).astype("float32"), np.zeros(10, "float32"), 10, 1.0,
                        (8, 8, 1))
    eps = 0.3
    attack = RandomTargetPGD(eps=eps, step_size=0.03, steps=20, training=False, seed=3)
    x_adv = attack(model, x, y).numpy()
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # The true labels are discarded: other labels give the same (seeded) result.
    np.testing.assert_array_equal(attack(model, x, (y + 1) % 10).numpy(), x_adv)
    targets = attack.random_targets(model, tf.constant(x)).numpy()
    assert len(np.unique(targets)) >= 8 and targets.min() >= 0 and targets.max() <= 9
    ce_clean = -targeted_cross_entropy(targets, model(x)).numpy()
    ce_adv = -targeted_cross_entropy(targets, model(x_adv)).numpy()
    assert np.all(ce_adv <= ce_clean + 1e-4) and ce_adv.mean() < 0.5 * ce_clean.mean()
    hit_clean = np.mean(model(x).numpy().argmax(-1) == targets)
    hit_adv = np.mean(model(x_adv).numpy().argmax(-1) == targets)
    assert hit_adv > 0.9 and hit_clean < 0.3


def test_random_targets_are_uniform_and_fresh_without_a_seed():
    model = _head_model(W, B, 3, C_MM, (1, 3, 1))
    x = tf.zeros([3000, 1, 3, 1])
    counts = np.bincount(RandomTargetPGD(seed=1).random_targets(model, x).numpy(), minlength=3)
    assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.04)
    unseeded = RandomTargetPGD(seed=None)
    assert not np.array_equal(unseeded.random_targets(model, x).numpy(),
                              unseeded.random_targets(model, x).numpy())


# --- saving, replicas, training -------------------------------------------------------------

def test_model_saves_and_loads_with_identical_outputs(tmp_path):
    model = mmc_model((8, 8, 1), 10, dim=16, c_mm=100.0)
    path = str(tmp_path / "mmc.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.RandomState(0).rand(8, 8, 8, 1).astype("float32")
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    head = find_mmc_head(loaded)
    assert isinstance(head, MMCHead) and head.c_mm == 100.0 and head.num_classes == 10
    np.testing.assert_allclose(head.centers.numpy(), mmc_centers(10, 16, 100.0), atol=1e-4)


def test_two_replicas_match_one_device(two_replicas):
    x = np.random.RandomState(0).rand(16, 1, 3, 1).astype("float32")
    y = np.arange(16) % 3
    results = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), two_replicas):
        with strategy.scope():
            base = _head_model(W, B, 3, C_MM, (1, 3, 1))
            model = MMC(base)
            model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        logs = model.fit(ds, epochs=2, verbose=0).history
        results.append((base.get_weights(), logs["loss"]))
    (one, loss_one), (two, loss_two) = results
    assert not np.allclose(one[0], W)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_one, loss_two, rtol=1e-5)


def test_short_mmc_training_on_digits_is_well_above_chance():
    digits = data.load_dataset("digits", batch_size=64)
    keras.utils.set_random_seed(0)
    base = mmc_model((8, 8, 1), 10, backbone="digits_cnn", dim=32, c_mm=10.0)
    model = MMC(base)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(digits.train, epochs=3, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    results = model.evaluate(digits.test, verbose=0, return_dict=True)
    assert results["accuracy"] > 0.6  # chance: 0.1


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("build, needle", [
    (lambda: mmc_model((8, 8, 1), 10, dim=8), "dim=8 must be >= num_classes=10"),
    (lambda: mmc_model((8, 8, 1), 10, c_mm=0.0), "c_mm"),
    (lambda: mmc_model((8, 8, 1), 10, c_mm=-10.0), "c_mm"),
    (lambda: mmc_model((8, 8, 1), 10, backbone="resnet"), "backbone must be one of"),
    (lambda: MMCHead(10, c_mm=0.0), "c_mm"),
    (lambda: MMC(models.digits_cnn()), "MMC needs a base model ending in an MMCHead"),
    (lambda: RandomTargetPGD(select="misclassified"), "select='last' or 'max_loss'"),
])
def test_bad_inputs_fail_before_training(build, needle):
    with pytest.raises(ValueError, match=needle):
        build()


# --- gin ------------------------------------------------------------------------------------

def test_gin_file_builds_at_mmc():
    try:
        config.parse(["mmc.gin"], ["train.epochs = 1"])
        built = train_lib.train("/nonexistent-mmc-dir", dry_run=True)
    finally:
        gin.clear_config()
    defense = built["defense"]
    assert isinstance(defense, MMC) and isinstance(find_mmc_head(defense.base_model), MMCHead)
    assert isinstance(defense.attack, RandomTargetPGD) and defense.attack.eps == 0.3
    assert defense.attack.training
    assert defense.eval_attack.loss_fn.__name__ == "cw_margin"
    x, y = next(iter(built["data"].test))
    x_adv = defense.attack(defense.base_model, x[:4], y[:4]).numpy()
    assert np.abs(x_adv - x[:4].numpy()).max() <= 0.3 + 1e-6
