"""Randomized smoothing (Cohen et al. 2019): the Clopper-Pearson bound, PREDICT and CERTIFY on
classifiers whose smoothed probabilities are known in closed form, seeding, Gaussian
augmentation's training step, and bin/certify end to end."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from conftest import linear_model, run_bin
from tfadv.certify import smoothing
from tfadv.certify.smoothing import ABSTAIN, Smooth, certified_accuracy, lower_confidence_bound
from tfadv.defenses import GaussianAugmentation


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _constant_model(d=4, logits=(0.0, 1.0, 0.0)):
    """Logits that ignore the input: f(x) = argmax(logits) everywhere."""
    return linear_model(np.zeros((d, len(logits)), "float32"), np.array(logits, "float32"))


def _halfspace_model(w, b):
    """Two classes: logits (0, w.x + b), so f(x) = 1 iff w.x + b > 0."""
    weights = np.stack([np.zeros_like(w), w], axis=1).astype("float32")
    return linear_model(weights, np.array([0.0, b], "float32"))


def _image(values):
    return np.asarray(values, "float32").reshape(1, -1, 1)


# --- the confidence bound ---------------------------------------------------------------------
@pytest.mark.parametrize("k, n, alpha", [(1, 10, 0.05), (37, 100, 0.001), (990, 1000, 0.001),
                                         (99_000, 100_000, 0.001), (5, 5, 0.01)])
def test_clopper_pearson_lower_bound_is_the_beta_quantile(k, n, alpha):
    bound = lower_confidence_bound(k, n, alpha)
    assert bound == pytest.approx(stats.beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    assert 0 < bound < k / n
    # The defining property of the exact (Clopper-Pearson) bound: at p = bound, seeing k or more
    # successes has probability exactly alpha.
    assert stats.binom.sf(k - 1, n, bound) == pytest.approx(alpha, rel=1e-6)


def test_clopper_pearson_edge_cases_and_errors():
    assert lower_confidence_bound(0, 50, 0.001) == 0.0
    assert lower_confidence_bound(200, 200, 0.001) == pytest.approx(0.001 ** (1 / 200))
    for alpha in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"alpha .* \(0, 1\)"):
            lower_confidence_bound(3, 10, alpha)
    with pytest.raises(ValueError, match="k must be"):
        lower_confidence_bound(11, 10, 0.01)


# --- closed-form classifiers -----------------------------------------------------------------
@pytest.mark.parametrize("n, sigma", [(100, 0.25), (1000, 0.5), (2500, 1.0)])
def test_constant_classifier_certifies_the_closed_form_radius(n, sigma):
    smooth = Smooth(_constant_model(), num_classes=3, sigma=sigma, batch_size=700)
    x = _image([0.1, 0.9, 0.5, 0.0])
    alpha = 0.001
    for seed in (0, 1, 2):
        prediction, radius = smooth.certify(x, n0=10, n=n, alpha=alpha, seed=seed)
        # k = n: p_A_lower = alpha^(1/n), radius = sigma * Phi^-1(alpha^(1/n)).
        assert prediction == 1
        assert radius == pytest.approx(sigma * stats.norm.ppf(alpha ** (1 / n)), rel=1e-9)
        assert smooth.predict(x, n=n, alpha=alpha, seed=seed) == 1


def test_fair_coin_classifier_abstains():
    # f(x) = 1 iff pixel 0 > 0.5, and pixel 0 sits on the boundary: P(f(x + eps) = 1) = 1/2.
    smooth = Smooth(_halfspace_model(np.array([1.0, 0, 0, 0]), -0.5), 2, sigma=0.25,
                    batch_size=1000)
    x = _image([0.5, 0.2, 0.7, 1.0])
    counts = smooth.sample_counts(x, 4000, seed=0)
    assert counts.sum() == 4000 and abs(counts[1] / 4000 - 0.5) < 0.04
    for seed in (0, 1, 2):
        assert smooth.certify(x, n0=100, n=4000, alpha=0.001, seed=seed) == (ABSTAIN, 0.0)
        assert smooth.predict(x, n=4000, alpha=0.001, seed=seed) == ABSTAIN


@pytest.mark.parametrize("target_radius, expected_class", [(0.6, 1), (0.3, 0)])
def test_linear_classifier_radius_is_close_to_the_true_one_and_never_above(target_radius,
                                                                          expected_class):
    # For f(x) = [w.x + b > 0], P(f(x + eps) = 1) = Phi((w.x + b) / (sigma ||w||)), so the
    # smoothed classifier's exact radius is |w.x + b| / ||w||.
    rng = np.random.RandomState(0)
    w = rng.randn(16)
    x = rng.rand(16)
    sign = 1 if expected_class == 1 else -1
    b = sign * target_radius * np.linalg.norm(w) - w @ x
    sigma, n, alpha = 0.5, 20000, 0.001
    smooth = Smooth(_halfspace_model(w, b), 2, sigma=sigma, batch_size=5000)
    margin = w @ x + b
    true_radius = abs(margin) / np.linalg.norm(w)
    p_top = stats.norm.cdf(true_radius / sigma)
    std = np.sqrt(p_top * (1 - p_top) / n)
    # Monte Carlo slack: the Clopper-Pearson bound sits ~3.1 std below the estimate, which is
    # within 4 std of the truth: 8 std in probability, mapped through sigma * Phi^-1.
    slack = sigma * (stats.norm.ppf(p_top) - stats.norm.ppf(p_top - 8 * std))
    counts = smooth.sample_counts(_image(x), n, seed=9)
    assert abs(counts[expected_class] / n - p_top) < 4 * std
    for seed in range(3):
        prediction, radius = smooth.certify(_image(x), n0=100, n=n, alpha=alpha, seed=seed)
        assert prediction == expected_class
        assert true_radius - slack < radius <= true_radius
        assert smooth.predict(_image(x), n=2000, alpha=alpha, seed=seed) == expected_class


# --- seeding and batching --------------------------------------------------------------------
@pytest.mark.parametrize("pixels", [16, 5])  # 5: not a whole number of Philox blocks
def test_seed_fixes_the_result_and_batch_size_does_not_change_it(pixels):
    rng = np.random.RandomState(1)
    w, x = rng.randn(pixels), _image(rng.rand(pixels))
    model = _halfspace_model(w, 0.05 * np.linalg.norm(w) - w @ x[0, :, 0])
    reference = Smooth(model, 2, sigma=0.5, batch_size=1000)
    counts = reference.sample_counts(x, 3001, seed=4)
    assert 0 < counts[0] < 3001  # not degenerate: the seed matters
    np.testing.assert_array_equal(reference.sample_counts(x, 3001, seed=4), counts)
    assert not np.array_equal(reference.sample_counts(x, 3001, seed=5), counts)
    for batch_size in (333, 5000):
        other = Smooth(model, 2, sigma=0.5, batch_size=batch_size)
        np.testing.assert_array_equal(other.sample_counts(x, 3001, seed=4), counts)
        assert other.certify(x, 50, 3001, 0.001, seed=2) == reference.certify(
            x, 50, 3001, 0.001, seed=2)
    for batch_size, num in ((1, 61), (7, 301)):  # many forward passes: shorter runs
        other = Smooth(model, 2, sigma=0.5, batch_size=batch_size)
        np.testing.assert_array_equal(other.sample_counts(x, num, seed=4),
                                      reference.sample_counts(x, num, seed=4))
    # One trace per image shape, whatever the batch sizes and sample counts.
    assert reference.trace_count == 1


def test_certify_dataset_records_and_per_example_seeds():
    rng = np.random.RandomState(2)
    w = rng.randn(8)
    smooth = Smooth(_halfspace_model(w, -0.5 * w.sum()), 2, sigma=0.25, batch_size=500)
    images = rng.rand(10, 1, 8, 1).astype("float32")
    labels = (images.reshape(10, 8) @ w > 0.5 * w.sum()).astype("int64")
    labels[:2] = 1 - labels[:2]  # two wrong labels
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    records = smoothing.certify_dataset(smooth, data, n0=20, n=500, alpha=0.01,
                                        max_examples=7, seed=3, verbose=0)
    assert [r["index"] for r in records] == list(range(7))
    assert [r["label"] for r in records] == labels[:7].tolist()
    for r, x in zip(records, images):
        assert r["correct"] == int(r["prediction"] == r["label"])
        expected = smooth.certify(x, 20, 500, 0.01, seed=(3, r["index"]))
        assert (r["prediction"], r["radius"]) == expected
    fewer = smoothing.certify_dataset(smooth, data, n0=20, n=500, alpha=0.01, max_examples=3,
                                      seed=3, verbose=0)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records[:3]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in fewer] == strip


def test_certified_accuracy_counts_abstentions_as_wrong():
    records = [{"prediction": 3, "label": 3, "radius": 0.3, "correct": 1},
               {"prediction": 1, "label": 1, "radius": 0.0, "correct": 1},
               {"prediction": 2, "label": 0, "radius": 0.5, "correct": 0},
               {"prediction": ABSTAIN, "label": 4, "radius": 0.0, "correct": 0}]
    assert certified_accuracy(records, [0, 0.25, 0.3, 0.31, 2]) == [0.5, 0.25, 0.25, 0, 0]
    summary = smoothing.summarize(records, [0, 0.25])
    assert summary["abstained"] == 1 and summary["certified_accuracy"] == {"0": 0.5,
                                                                           "0.25": 0.25}
    with pytest.raises(ValueError, match="radii"):
        certified_accuracy(records, [-0.1])


def test_bad_arguments_fail_with_clear_errors():
    model = _constant_model()
    for sigma in (0, -0.25, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="sigma"):
            Smooth(model, 3, sigma=sigma)
    with pytest.raises(ValueError, match="num_classes=4 but the model outputs 3"):
        Smooth(model, 4, sigma=0.25)
    with pytest.raises(ValueError, match="batch_size"):
        Smooth(model, 3, sigma=0.25, batch_size=0)
    smooth = Smooth(model, None, sigma=0.25)
    assert smooth.num_classes == 3
    x = _image([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="n0 must be an integer >= 1"):
        smooth.certify(x, n0=0, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        smooth.certify(x, n0=10, n=2.5, alpha=0.01)
    with pytest.raises(ValueError, match=r"alpha .* \(0, 1\)"):
        smooth.predict(x, n=10, alpha=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smooth.predict(x * 3, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="shape"):
        smooth.predict(x[None], n=10, alpha=0.01)
    with pytest.raises(ValueError, match="seed"):
        smooth.predict(x, n=10, alpha=0.01, seed=-1)
    assert smooth.trace_count == 0  # every error came before any sampling


# --- Gaussian augmentation ---------------------------------------------------------------------
def _expected_step(w, b, x_noisy, y, lr):
    z = x_noisy @ w + b
    g = (_softmax(z) - np.eye(w.shape[1])[y]) / len(y)
    return w - lr * x_noisy.T @ g, b - lr * g.sum(0), -np.log(_softmax(z)[np.arange(len(y)), y])


def test_gaussian_augmentation_step_matches_closed_form_with_unclipped_noise():
    rng = np.random.RandomState(0)
    w = rng.randn(6, 3).astype("float32")
    b = rng.randn(3).astype("float32")
    x = rng.choice([0.0, 0.05, 0.95, 1.0], size=(8, 6)).astype("float32")  # near the box edges
    y = np.arange(8) % 3
    sigma, lr, seed = 0.5, 0.3, 7
    noise = tf.random.stateless_normal((8, 1, 6, 1), seed=tf.constant([seed, 0], tf.int64))
    x_noisy = x + sigma * noise.numpy().reshape(8, 6)
    assert x_noisy.min() < 0 and x_noisy.max() > 1  # the noise leaves [0, 1]: not clipped
    w_new, b_new, losses = _expected_step(w, b, x_noisy, y, lr)

    model = GaussianAugmentation(linear_model(w, b), sigma=sigma, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    logs = model.fit(x.reshape(8, 1, 6, 1), y, batch_size=8, epochs=1, shuffle=False,
                     verbose=0).history
    got_w, got_b = model.base_model.get_weights()
    np.testing.assert_allclose(got_w, w_new, atol=1e-5)
    np.testing.assert_allclose(got_b, b_new, atol=1e-5)
    np.testing.assert_allclose(logs["loss"][0], losses.mean(), rtol=1e-5)
    # Clipping the noisy images would have given a different step (so the check above can fail).
    clipped_w, _, _ = _expected_step(w, b, np.clip(x_noisy, 0, 1), y, lr)
    assert np.abs(clipped_w - got_w).max() > 1e-3


def test_gaussian_augmentation_replicas_draw_independent_noise(two_replicas):
    rng = np.random.RandomState(1)
    w = rng.randn(6, 2).astype("float32")
    b = np.zeros(2, "float32")
    x = rng.rand(8, 6).astype("float32")
    y = np.arange(8) % 2
    sigma, lr, seed = 0.25, 0.5, 3
    # Replica r of step 0 draws with seed [seed, 0 * 2 + r] for its half of the global batch.
    noise = np.concatenate([tf.random.stateless_normal(
        (4, 1, 6, 1), seed=tf.constant([seed, r], tf.int64)).numpy().reshape(4, 6)
        for r in range(2)])
    w_new, b_new, _ = _expected_step(w, b, x + sigma * noise, y, lr)
    with two_replicas.scope():
        model = GaussianAugmentation(linear_model(w, b), sigma=sigma, seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(lr))
    ds = tf.data.Dataset.from_tensor_slices((x.reshape(8, 1, 6, 1), y)).batch(8)
    model.fit(ds, epochs=1, verbose=0)
    got_w, got_b = model.base_model.get_weights()
    np.testing.assert_allclose(got_w, w_new, atol=1e-5)
    np.testing.assert_allclose(got_b, b_new, atol=1e-5)


def test_gaussian_augmentation_rejects_bad_sigma_and_awp():
    base = linear_model(np.zeros((4, 2), "float32"))
    for sigma in (0, -1.0, float("inf"), float("nan"), "0.25", None):
        with pytest.raises(ValueError, match=r"sigma .* finite number > 0"):
            GaussianAugmentation(base, sigma=sigma)
    with pytest.raises(ValueError, match="seed"):
        GaussianAugmentation(base, sigma=0.25, seed=-3)
    assert GaussianAugmentation.supports_awp is False


# --- bin/certify ---------------------------------------------------------------------------------
def test_bin_certify_end_to_end(trained_digits_model, tmp_path):
    path = str(tmp_path / "model.keras")
    trained_digits_model.save(path)
    out = tmp_path / "out"
    result = run_bin("certify", f"--model={path}", "--sigma=0.25", "--n=200", "--n0=20",
                     "--max_examples=20", "--batch_size=128", "--radii=0,0.1,0.25,0.5",
                     f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "certified accuracy" in result.stdout
    report = json.loads((out / "certify.json").read_text())
    records = report["records"]
    assert report["num_examples"] == len(records) == 20
    assert report["settings"]["sigma"] == 0.25 and report["settings"]["n"] == 200
    radii = [0, 0.1, 0.25, 0.5]
    assert list(report["certified_accuracy"].values()) == certified_accuracy(records, radii)
    assert report["abstained"] == sum(r["prediction"] == ABSTAIN for r in records)
    # Each record is CERTIFY's arithmetic on its count.
    for r in records:
        p_lower = lower_confidence_bound(r["count"], 200, 0.001)
        assert r["p_lower"] == pytest.approx(p_lower)
        expected = 0.0 if p_lower < 0.5 else 0.25 * stats.norm.ppf(p_lower)
        assert r["radius"] == pytest.approx(expected)
        assert r["correct"] == int(r["prediction"] == r["label"])
    assert report["certified_accuracy"]["0"] > 0.5  # a 95% model, mild noise
    png = (out / "certified_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


@pytest.mark.parametrize("flag, name", [("--sigma=0", "--sigma"), ("--sigma=-0.5", "--sigma"),
                                        ("--alpha=0", "--alpha"), ("--alpha=1.5", "--alpha"),
                                        ("--n=0", "--n"), ("--radii=0,-1", "--radii")])
def test_bin_certify_rejects_bad_flags_before_loading(flag, name, tmp_path):
    args = ["--model=/nonexistent/model.keras", "--sigma=0.25", flag]
    result = run_bin("certify", *args, timeout=120)
    assert result.returncode != 0
    assert f"{name} must be" in result.stderr
    assert "tensorflow" not in result.stderr.lower()  # failed before TensorFlow was imported
