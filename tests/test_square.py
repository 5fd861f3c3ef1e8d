"""Square Attack: query budget (counted independently), threat model, the L-inf and L2 update
rules, determinism, the p schedule, effect on a trained model, bad arguments."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import dataset_arrays
from tfadv import models
from tfadv.attacks.square import Square, p_selection


def _random_model(seed=0):
    keras.utils.set_random_seed(seed)
    return models.digits_cnn()


def _images(n, seed=0, values=None):
    rng = np.random.default_rng(seed)
    if values is None:
        return rng.random((n, 8, 8, 1)).astype("float32")
    return rng.choice(values, size=(n, 8, 8, 1)).astype("float32")


def _predictions(model, x):
    return np.argmax(model(x, training=False).numpy(), axis=1)


class CountingModel:
    """Wraps a model and counts, per clean example, the rows it is asked to classify.

    A row is attributed to the clean image nearest to it in L2, which is exact while the clean
    images are much farther apart than twice the attack's radius (checked by the tests)."""

    def __init__(self, model, clean):
        self.model = model
        self.clean = tf.constant(clean.reshape(len(clean), -1))
        self.counts = tf.Variable(tf.zeros([len(clean)], tf.int32))

    def __call__(self, x, training=False):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        distances = tf.reduce_sum(tf.square(flat[:, None, :] - self.clean[None]), axis=-1)
        owner = tf.argmin(distances, axis=1, output_type=tf.int32)
        self.counts.scatter_nd_add(owner[:, None], tf.ones_like(owner))
        return self.model(x, training=training)


def _min_pairwise_l2(x):
    flat = x.reshape(len(x), -1)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    return d[~np.eye(len(x), dtype=bool)].min()


@pytest.mark.parametrize("norm, eps, n_queries, restarts", [
    ("linf", 0.02, 60, 1), ("l2", 0.2, 60, 1), ("linf", 0.02, 51, 2)])
def test_query_budget_counted_independently(norm, eps, n_queries, restarts):
    model = _random_model()
    x = _images(16)
    y = _predictions(model, x)
    y[:3] = (y[:3] + 1) % 10  # already misclassified
    reach = eps if norm == "l2" else eps * np.sqrt(x[0].size)
    assert _min_pairwise_l2(x) > 4 * reach  # the row attribution below is unambiguous
    counter = CountingModel(model, x)
    attack = Square(eps, norm=norm, n_queries=n_queries, restarts=restarts, seed=3)
    x_adv, queries = attack.attack_with_queries(counter, x, y)
    queries, counted = queries.numpy(), counter.counts.numpy()
    np.testing.assert_array_equal(queries, counted)  # the reported count is the true count
    assert counted.max() <= n_queries
    np.testing.assert_array_equal(counted[:3], 1)  # clean query only
    np.testing.assert_array_equal(x_adv.numpy()[:3], x[:3])  # returned unchanged
    fooled = _predictions(model, x_adv.numpy()) != y
    # A small eps on a random model leaves examples unfooled: they spend the whole budget
    # (minus, with restarts, the remainder of (n_queries - 1) / restarts).
    assert (~fooled).sum() >= 5
    assert counted[~fooled].min() == 1 + restarts * (1 + attack.iterations_per_restart)
    assert counted[~fooled].min() >= n_queries - restarts
    # Fooled examples stop at their first success.
    assert counted[3:][fooled[3:]].max(initial=0) < n_queries


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.8)])
def test_stays_inside_eps_ball_and_box(norm, eps):
    model = _random_model()
    # Pixels at and near the box edges, where clipping and the projection interact.
    x = _images(16, values=[0.0, 1.0, 0.5, 0.03, 0.97, 0.25])
    y = _predictions(model, x)
    x_adv = Square(eps, norm=norm, n_queries=100)(model, x, y).numpy()
    assert x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert size.min() > 0.5 * eps  # every (correctly classified) example was perturbed
    if norm == "linf":
        # Every coordinate of an L-inf Square perturbation is +-eps, or clipped at the box.
        at_eps = np.isclose(np.abs(delta), eps, atol=1e-6)
        at_box = (x_adv == 0.0) | (x_adv == 1.0)
        assert np.all(at_eps | at_box.reshape(len(x), -1))
        assert (~at_eps).any()  # the box really clipped some coordinates (0 - eps, 1 + eps)


def test_linf_proposal_never_repeats_the_current_point():
    """attack.py's rule: a square whose signs would leave x_best unchanged is redrawn."""
    n, eps = 256, 0.1
    for channels in (1, 3):
        x = tf.constant(np.random.default_rng(0).random((n, 8, 8, channels)), tf.float32)
        attack = Square(eps, n_queries=100)
        # x_best at +eps everywhere: any square of + signs would be a no-op.
        x_best = attack._linf_target(x, tf.ones([1, 1, 1, channels]))
        for it, p in [(0, 0.8), (90, 0.8 / 512)]:
            cand = attack._proposal(x, x_best, tf.constant(p, tf.float64), 0, tf.constant(it),
                                    attack._geometry(x)).numpy()
            changed = np.any(cand != x_best.numpy(), axis=(1, 2, 3))
            assert changed.all()
            assert np.all(np.isclose(np.abs(cand - x.numpy()), eps, atol=1e-6)
                          | (cand == 0.0) | (cand == 1.0))
            side = max(int(round(np.sqrt(p * 64))), 1)
            assert np.all((cand != x_best.numpy()).any(axis=3).sum(axis=(1, 2)) <= side ** 2)


def test_l2_perturbation_stays_on_the_sphere_without_clipping():
    """The L2 update moves mass between windows but keeps ||delta||_2 = eps:
    with images in the box's interior nothing is clipped, so every returned point has norm eps."""
    model = _random_model()
    x = (0.5 + 0.05 * _images(16, seed=1)).astype("float32")  # in [0.5, 0.55]
    y = _predictions(model, x)
    eps = 0.4  # < 0.45: no coordinate can leave [0, 1]
    x_adv, queries = Square(eps, norm="l2", n_queries=100).attack_with_queries(model, x, y)
    norms = np.linalg.norm((x_adv.numpy() - x).reshape(len(x), -1), axis=1)
    np.testing.assert_allclose(norms, eps, rtol=1e-4)
    assert queries.numpy().max() > 2  # the square updates ran, not just the initialisation


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deterministic_for_a_seed(norm):
    model = _random_model()
    x = _images(16)
    y = _predictions(model, x)
    eps = 0.05 if norm == "linf" else 0.3

    attack = Square(eps, norm=norm, n_queries=30, seed=0)
    first = attack(model, x, y).numpy()
    np.testing.assert_array_equal(first, attack(model, x, y).numpy())  # no hidden RNG state
    other = Square(eps, norm=norm, n_queries=30, seed=1)(model, x, y).numpy()
    assert not np.array_equal(first, other)


def test_p_selection_matches_hand_computed_schedule():
    # On 10,000 queries: p_init up to it = 10, halved after 10, 50, 200, ..., 8000.
    cases = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 500: 0.1,
             501: 0.05, 1001: 0.025, 2001: 0.0125, 4000: 0.0125, 4001: 0.00625,
             6001: 0.003125, 8000: 0.003125, 8001: 0.0015625, 9999: 0.0015625}
    for it, p in cases.items():
        assert p_selection(0.8, it, 10000) == pytest.approx(p, rel=1e-12)
    # Rescaled to the budget: it -> int(it / n_queries * 10000).
    assert p_selection(0.8, 5, 5000) == 0.8  # int(10.0) = 10
    assert p_selection(0.8, 6, 5000) == 0.4  # 12
    assert p_selection(0.8, 26, 5000) == 0.2  # 52
    assert p_selection(0.8, 0, 300) == 0.8
    assert p_selection(0.8, 1, 300) == 0.4  # int(33.3) = 33
    assert p_selection(0.5, 299, 300) == pytest.approx(0.5 / 512)  # 9966
    # The graph version (tensor iteration) agrees everywhere on a short budget.
    its = [0, 1, 2, 3, 4, 5, 12, 13, 50, 51, 124, 125, 149, 150, 151, 199, 200, 201, 249]
    graph = [float(p_selection(0.8, tf.constant(i), 250)) for i in its]
    assert graph == [p_selection(0.8, i, 250) for i in its]


def test_trained_digits_model_loses_its_accuracy(trained_digits_model, digits):
    model = trained_digits_model
    x, y = dataset_arrays(digits.test)
    clean = np.mean(_predictions(model, x) == y)
    eps, n_queries = 0.3, 200
    attack = Square(eps, n_queries=n_queries)
    x_adv, queries = attack.attack_with_queries(model, x, y)
    robust = np.mean(_predictions(model, x_adv.numpy()) == y)
    assert clean > 0.9
    assert robust < 0.1 * clean
    assert queries.numpy().max() <= n_queries
    assert np.abs(x_adv.numpy() - x).max() <= eps + 1e-6

    # Black-box: a model without input gradients (quantised input) is attacked just as well.
    def quantised(images, training=False):
        return model(tf.round(images * 16.0) / 16.0, training=training)

    with tf.GradientTape() as tape:
        xt = tf.constant(x[:4])
        tape.watch(xt)
        total = tf.reduce_sum(quantised(xt))
    assert tape.gradient(total, xt) is None
    x_q = attack(quantised, x, y).numpy()
    assert np.mean(_predictions(quantised, x_q) == y) < 0.1 * clean


def test_traced_once_per_input_signature():
    model = _random_model()
    attack = Square(0.05, n_queries=10)
    for batch in (8, 8, 5):
        x = _images(batch, seed=batch)
        attack(model, x, np.zeros(batch, "int32"))
    assert attack.trace_count == 1
    x = _images(5, seed=5)
    x_adv, queries = attack.attack_with_queries(model, x, np.zeros(5, "int32"))
    attack.attack_with_queries(model, _images(6), np.zeros(6, "int32"))
    assert attack.trace_count == 2
    # Both entry points run the same search.
    np.testing.assert_array_equal(x_adv.numpy(), attack(model, x, np.zeros(5, "int32")).numpy())
    assert queries.dtype == tf.int32 and queries.shape == (5,)
    assert repr(attack) == "Square(eps=0.05, norm=linf, n_queries=10, p_init=0.8)"
    assert (attack.eps, attack.norm) == (0.05, np.inf)


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": -0.1}, "eps must be a number >= 0"),
    ({"eps": 0.1, "norm": "l3"}, "norm must be 'linf' or 'l2'"),
    ({"eps": 0.1, "n_queries": 1}, "n_queries must be an integer >= 2"),
    ({"eps": 0.1, "n_queries": 100.5}, "n_queries must be an integer"),
    ({"eps": 0.1, "n_queries": 3, "restarts": 3}, "n_queries must be an integer >= 4"),
    ({"eps": 0.1, "p_init": 0.0}, r"p_init must be a number > 0.0 and <= 1.0"),
    ({"eps": 0.1, "p_init": 1.5}, r"p_init must be a number > 0.0 and <= 1.0"),
    ({"eps": 0.1, "restarts": 0}, "restarts must be an integer >= 1"),
    ({"eps": 0.1, "clip_min": 1.0, "clip_max": 0.0}, "clip_min must be < clip_max"),
    ({"eps": 0.1, "seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Square(**kwargs)


def test_p_selection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_queries must be an integer >= 1"):
        p_selection(0.8, 3, 0)
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        p_selection(0.8, -1, 100)
