"""De-randomized column smoothing (Levine & Feizi 2020): the band encoding in closed form, the
count of bands a patch reaches, the certificate's arithmetic and tie rule, soundness against
every patch location on hand-built base classifiers (one of them the certificate's exact worst
case), band-ablation training and its seeding, and the argument errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv import models
from tfadv.certify import derandomized as dr
from tfadv.defenses import BandAblationTraining, band_ablation_model
from tfadv.defenses.band_ablation import sample_band_starts

H = W = 8
K = 3


def _expected_band(x, start, band_width):
    """NumPy reference: (x, 1 - x) on columns start .. start + b - 1 (mod W), 0 elsewhere."""
    out = np.zeros((*x.shape[:3], 2 * x.shape[3]), np.float32)
    for j in range(band_width):
        col = (start + j) % x.shape[2]
        out[:, :, col, :x.shape[3]] = x[:, :, col]
        out[:, :, col, x.shape[3]:] = 1.0 - x[:, :, col]
    return out


# --- the band encoding -------------------------------------------------------------------------
def test_ablate_band_keeps_x_and_one_minus_x_on_the_band_and_zero_elsewhere():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 5, 6, 2)).astype("float32")
    got = dr.ablate_band(x, 1, 3).numpy()
    assert got.shape == (2, 5, 6, 4)
    np.testing.assert_allclose(got[:, :, 1:4, :2], x[:, :, 1:4])
    np.testing.assert_allclose(got[:, :, 1:4, 2:], 1.0 - x[:, :, 1:4])
    assert not got[:, :, [0, 4, 5]].any()
    # A band past the right edge wraps around to the first columns (official utils_band.py).
    wrapped = dr.ablate_band(x, 4, 3).numpy()
    np.testing.assert_allclose(wrapped, _expected_band(x, 4, 3))
    assert not wrapped[:, :, 1:4].any() and wrapped[:, :, [4, 5, 0], 2:].min() > 0
    # One start per image.
    per_image = dr.ablate_band(x, tf.constant([0, 5]), 2).numpy()
    np.testing.assert_allclose(per_image[0], _expected_band(x[:1], 0, 2)[0])
    np.testing.assert_allclose(per_image[1], _expected_band(x[1:], 5, 2)[0])
    # An ablated pixel differs from every real colour: kept pixels' two channels sum to 1.
    np.testing.assert_allclose(got[..., :2] + got[..., 2:], dr.band_mask(6, 1, 3).numpy()[
        None, None, :, None] * np.ones_like(x))


def test_all_bands_is_ablate_band_for_every_start_band_major():
    x = np.random.default_rng(1).uniform(size=(3, 4, 5, 1)).astype("float32")
    bands = dr.all_bands(x, 2).numpy()
    assert bands.shape == (5 * 3, 4, 5, 2)
    for s in range(5):
        np.testing.assert_allclose(bands[s * 3:(s + 1) * 3], _expected_band(x, s, 2))


@pytest.mark.parametrize("width, band_width", [(8, 1), (8, 3), (8, 8), (28, 4), (5, 4)])
def test_patch_delta_counts_the_bands_that_meet_a_patch_at_every_position(width, band_width):
    masks = dr.band_mask(width, tf.range(width), band_width).numpy().astype(bool)  # (start, col)
    for m in range(1, width + 1):
        reached = {masks[:, p:p + m].any(axis=1).sum() for p in range(width - m + 1)}
        assert reached == {dr.patch_delta(m, band_width, width)}


# --- the certificate ---------------------------------------------------------------------------
def test_certificate_margin_and_official_tie_rule():
    counts = np.array([
        [10, 4, 0],   # margin 6 == 2 Delta, top class has the smaller index: certified
        [4, 10, 0],   # margin 6 == 2 Delta, runner-up 0 < top 1: not certified
        [11, 4, 0],   # margin 7 > 6: certified
        [9, 4, 0],    # margin 5 < 6: not certified
        [5, 5, 1],    # tie at the top: class 0 predicted, margin 0
        [4, 10, 4],   # runner-up among equal counts: the smaller index (0)
        [10, 4, 4],   # runner-up 1, margin 6 == 2 Delta, 0 < 1: certified
        [0, 0, 0],    # every band abstains
    ])
    out = dr.certificate(counts, 3)
    np.testing.assert_array_equal(out["prediction"], [0, 1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(out["runner_up"], [1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(out["top_count"], [10, 10, 11, 9, 5, 10, 10, 0])
    np.testing.assert_array_equal(out["second_count"], [4, 4, 4, 4, 5, 4, 4, 0])
    np.testing.assert_array_equal(out["certified"],
                                  [True, False, True, False, False, False, True, False])
    # Delta per example.
    np.testing.assert_array_equal(dr.certificate(counts[:4], [3, 2, 4, 3])["certified"],
                                  [True, True, False, False])
    with pytest.raises(ValueError, match="counts must have shape"):
        dr.certificate(np.zeros((3, 1)), 1)


def test_certificate_matches_the_official_stable_sort_rule_on_random_counts():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 12, size=(2000, 4))
    for delta in (1, 2, 3):
        out = dr.certificate(counts, delta)
        order = np.argsort(-counts, axis=1, kind="stable")  # utils_band.predict_and_certify
        top, second = order[:, 0], order[:, 1]
        rows = np.arange(len(counts))
        margin = counts[rows, top] - counts[rows, second]
        official = (margin > 2 * delta) | ((margin == 2 * delta) & (top < second))
        np.testing.assert_array_equal(out["prediction"], top)
        np.testing.assert_array_equal(out["runner_up"], second)
        np.testing.assert_array_equal(out["certified"], official)


# --- soundness against every patch -------------------------------------------------------------
def _functional(fn, channels=2):
    inputs = keras.Input((H, W, channels))
    outputs = keras.layers.Lambda(fn, output_shape=(K,))(inputs)
    return keras.Model(inputs, outputs)


def _column_vote_model(band_class, target):
    """A base classifier that reads its band start from the encoding (the kept columns have
    channels summing to 1) and votes ``band_class[start]`` with certainty, unless its band holds
    a pixel >= 0.95 (the patch marker): then it votes ``target``. Clean images stay below 0.9,
    so an all-one patch flips EVERY band that sees it to ``target``: the certificate's worst
    case."""
    table = tf.one_hot(band_class, K)  # (W starts, K)

    def fn(enc):
        kept = tf.reduce_max(enc[..., 0] + enc[..., 1], axis=1)  # (B, W) 0/1
        start = kept * (1.0 - tf.roll(kept, 1, axis=1))  # the kept column after an ablated one
        trigger = tf.cast(tf.reduce_max(enc[..., 0], axis=[1, 2]) >= 0.95, tf.float32)[:, None]
        votes = (1.0 - trigger) * tf.matmul(start, table) + trigger * tf.one_hot([target], K)
        return 20.0 * votes

    return _functional(fn)


def _patched(x, size, contents):
    """Every m x m patch location of every image with every content: (N, L * P, H, W, 1)."""
    out = []
    for image in x:
        variants = []
        for r in range(H - size + 1):
            for c in range(W - size + 1):
                for content in contents:
                    adv = image.copy()
                    adv[r:r + size, c:c + size, 0] = content
                    variants.append(adv)
        out.append(variants)
    return np.asarray(out, np.float32)


def _predictions(smoothing, images):
    return np.argmax(smoothing(images.reshape(-1, H, W, 1)).numpy(), axis=1).reshape(
        images.shape[:2])


def test_certificate_is_exact_for_the_worst_case_classifier_and_holds_at_every_patch():
    band_width, size = 2, 1  # Delta = 2: a margin of 4 is certified only with the tie rule
    delta = dr.patch_delta(size, band_width, W)
    x = np.full((1, H, W, 1), 0.5, np.float32)
    contents = [np.ones((size, size)), np.zeros((size, size))]
    cases = [  # (votes per band start, target of the flipped bands, expect certified)
        ([0, 0, 0, 0, 0, 0, 1, 1], 1, True),    # 6 - 2 = 4 = 2 Delta, 0 < 1: certified
        ([1, 1, 1, 1, 1, 1, 0, 0], 0, False),   # 4 = 2 Delta, but 1 > 0: not certified
        ([0, 0, 0, 0, 0, 1, 1, 1], 1, False),   # 5 - 3 = 2 < 4
        ([0, 0, 0, 0, 0, 0, 0, 1], 1, True),    # 6 > 4
        ([2, 2, 2, 2, 2, 2, 0, 0], 0, False),
    ]
    for band_class, target, expect in cases:
        smoothing = dr.DerandomizedSmoothing(_column_vote_model(band_class, target), band_width)
        counts = smoothing(x).numpy()
        np.testing.assert_array_equal(counts[0], np.bincount(band_class, minlength=K))
        cert = dr.certificate(counts.astype(int), delta)
        assert bool(cert["certified"][0]) == expect, band_class
        clean = cert["prediction"][0]
        flipped = _predictions(smoothing, _patched(x, size, contents))
        if expect:
            assert (flipped == clean).all(), band_class
        else:  # the certificate is tight: some patch location changes the prediction
            assert (flipped != clean).any(), band_class
    # The worst case reaches a band across the right edge: a patch in column 0 flips the bands
    # starting at 7 (columns 7, 0) and 0 (columns 0, 1).
    smoothing = dr.DerandomizedSmoothing(_column_vote_model([0] * W, 1), band_width)
    patched = x.copy()
    patched[0, 3, 0, 0] = 1.0
    np.testing.assert_array_equal(smoothing(patched).numpy()[0], [W - 2, 2, 0])


def _linear_model(seed):
    """A random linear base classifier on the (x, 1 - x) encoding, biased to class 0."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.45, size=(H * W * 2, K)).astype("float32")
    bias = np.array([2.5, 0.0, 0.0], np.float32)

    def fn(enc):
        return tf.matmul(tf.reshape(enc, [-1, H * W * 2]), weights) + bias

    return _functional(fn), weights


def test_certified_predictions_survive_every_patch_location_and_content():
    band_width, threshold = 2, 0.3
    model, weights = _linear_model(3)
    smoothing = dr.DerandomizedSmoothing(model, band_width, threshold)
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(40, H, W, 1)).astype("float32")
    counts = smoothing(x).numpy().astype(int)
    # The strongest patch against a linear base classifier: on each band that keeps a pixel,
    # the pixel adds x * (w_x[c'] - w_x[c]) + (1 - x) * (w_1-x[c'] - w_1-x[c]) to the logit gap
    # of c' over c, the same in every band; set it to 1 where that slope is positive.
    w_x, w_inv = weights.reshape(H, W, 2, K)[:, :, 0], weights.reshape(H, W, 2, K)[:, :, 1]
    checked = changed = 0
    for size in (1, 2, 3):
        cert = dr.certificate(counts, dr.patch_delta(size, band_width, W))
        for i in np.flatnonzero(cert["certified"]):
            c = cert["prediction"][i]
            adversarial = []
            for r in range(H - size + 1):
                for col in range(W - size + 1):
                    for other in range(K):
                        if other == c:
                            continue
                        slope = (w_x[..., other] - w_x[..., c]) - (w_inv[..., other]
                                                                    - w_inv[..., c])
                        adv = x[i].copy()
                        adv[r:r + size, col:col + size, 0] = (
                            slope[r:r + size, col:col + size] > 0)
                        adversarial.append(adv)
            generic = _patched(x[i:i + 1], size, [0.0, 1.0, rng.uniform(size=(size, size)),
                                                  rng.uniform(size=(size, size))])[0]
            images = np.concatenate([generic, np.asarray(adversarial, np.float32)])
            patched_counts = smoothing(images).numpy()
            assert (np.argmax(patched_counts, axis=1) == c).all(), (size, i)
            checked += 1
            changed += int((np.abs(patched_counts - counts[i]) > 0).any())
    # Not vacuous: several examples were certified, and the patches did move their votes.
    assert checked >= 10 and changed >= 5, (checked, changed)


# --- certify_bands -----------------------------------------------------------------------------
def test_certify_bands_report_matches_the_certificate_of_the_counts():
    model, _ = _linear_model(5)
    x = np.random.default_rng(6).uniform(size=(12, H, W, 1)).astype("float32")
    y = np.arange(12) % K
    smoothed = dr.smoothed_classifier(model, band_width=3, threshold=0.25)
    report = dr.certify_bands(smoothed, x, y, patch_sizes=[1, 2], max_batch=3 * W)
    counts = dr.DerandomizedSmoothing(model, 3, 0.25)(x).numpy().astype(int)
    base = dr.certificate(counts, 0)
    assert report["num_examples"] == 12 and report["num_bands"] == W
    assert report["clean_accuracy"] == pytest.approx(np.mean(base["prediction"] == y))
    for m in (1, 2):
        cert = dr.certificate(counts, m + 2)["certified"]
        assert report["certified_accuracy"][m] == pytest.approx(
            np.mean(cert & (base["prediction"] == y)))
        assert [r["certified"][m] for r in report["records"]] == list(cert)
    # The base classifier with band_width gives the same report; a conflicting one is refused.
    again = dr.certify_bands(model, x, y, [1, 2], band_width=3, threshold=0.25)
    assert again["certified_accuracy"] == report["certified_accuracy"]
    with pytest.raises(ValueError, match="band_width=2 differs"):
        dr.certify_bands(smoothed, x, y, [1], band_width=2)


# --- band-ablation training --------------------------------------------------------------------
def test_band_starts_are_reproducible_from_the_seed_and_cover_every_column():
    a = sample_band_starts(16, 28, tf.constant([7, 3], tf.int64)).numpy()
    b = sample_band_starts(16, 28, tf.constant([7, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert len(set(a)) == 1  # official: one band per batch
    per_image = sample_band_starts(4096, 28, tf.constant([7, 3], tf.int64), per_example=True)
    assert set(per_image.numpy()) == set(range(28))
    steps = {int(sample_band_starts(1, 28, tf.constant([7, t], tf.int64))[0]) for t in range(400)}
    assert steps == set(range(28))


def _tiny_defense(seed=11, **kwargs):
    keras.utils.set_random_seed(0)
    base = band_ablation_model((H, W, 1), K, base="digits_cnn", band_width=3)
    model = BandAblationTraining(base, seed=seed, certify_patch_sizes=(1, 2), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    return model


def test_training_bands_follow_the_seed_and_the_step():
    x = np.random.default_rng(7).uniform(size=(6, H, W, 1)).astype("float32")
    first, other = _tiny_defense(), _tiny_defense()
    np.testing.assert_array_equal(first.prepare(x, None), other.prepare(x, None))
    kept = first.prepare(x, None).numpy()[..., 0] + first.prepare(x, None).numpy()[..., 1]
    assert kept.max(axis=1).sum(axis=1).tolist() == [3] * 6  # 3 columns, same band per batch
    assert len({tuple(row) for row in kept.max(axis=1)}) == 1
    starts = set()
    for step in range(40):
        first.optimizer.iterations.assign(step)
        kept = first.prepare(x, None).numpy()[0, ..., 0:2].sum(axis=-1).max(axis=0)
        starts.add(int(np.flatnonzero(kept * (1 - np.roll(kept, 1)))[0]))
    assert len(starts) > W // 2
    first.optimizer.iterations.assign(0)
    draws = [_tiny_defense(seed=s).prepare(x, None).numpy() for s in range(12, 16)]
    assert any(not np.array_equal(d, first.prepare(x, None).numpy()) for d in draws)


def test_band_ablation_training_reduces_the_loss_and_saves_the_smoothed_classifier(tmp_path):
    rng = np.random.default_rng(8)
    y = np.arange(96) % K
    # Class c: pixels in [0.3 c, 0.3 c + 0.4]: every band sees the class.
    x = (0.3 * y[:, None, None, None] + rng.uniform(0, 0.4, size=(96, H, W, 1))).astype("float32")
    model = _tiny_defense()
    history = model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    report = model.certified_report(model.base_model, (x, y))["patch_certificate"]
    assert report["clean_accuracy"] > 0.9 and set(report["certified_accuracy"]) == {"1", "2"}
    path = str(tmp_path / "g.keras")
    model.base_model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored(x[:8]).numpy(), model.base_model(x[:8]).numpy())
    assert dr.find_smoothing(restored).band_width == 3


def _bn_cnn(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1.0))(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(h))


def test_training_step_updates_batchnorm_statistics_and_includes_weight_decay():
    keras.utils.set_random_seed(0)
    base = band_ablation_model((H, W, 1), K, base=_bn_cnn, band_width=3)
    model = BandAblationTraining(base, seed=1, certify_patch_sizes=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # no update: the loss is checkable
    x = np.random.default_rng(9).uniform(size=(16, H, W, 1)).astype("float32")
    y = np.arange(16) % K
    f = dr.find_smoothing(base).classifier
    moving_mean = [v for v in f.non_trainable_variables if "mean" in v.path][0]
    before = moving_mean.numpy().copy()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.abs(moving_mean.numpy() - before).max() > 1e-4  # the statistics were written back
    model.optimizer.iterations.assign(0)  # the step's bands again
    expected = float(np.mean(keras.losses.sparse_categorical_crossentropy(
        y, f(model.prepare(x, y), training=True), from_logits=True)))
    decay = float(np.sum(np.square(f.layers[1].kernel.numpy())))
    assert decay > 0.5 * expected
    assert logs["loss"] == pytest.approx(expected + decay, rel=1e-4)


# --- argument errors ---------------------------------------------------------------------------
def test_clear_errors_for_band_width_threshold_and_patch_size():
    f = models.digits_cnn(input_shape=(H, W, 2), num_classes=K)
    with pytest.raises(ValueError, match=r"band_width must be an integer >= 1 and <= 8; got 9"):
        dr.DerandomizedSmoothing(f, band_width=9)
    with pytest.raises(ValueError, match=r"band_width must be an integer >= 1"):
        dr.ablate_band(np.zeros((1, H, W, 1), np.float32), 0, 0)
    with pytest.raises(ValueError, match=r"band_width must be an integer >= 1 and <= 28"):
        band_ablation_model((28, 28, 1), 10, band_width=29)
    for threshold in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be a number >= 0 and <= 1"):
            dr.DerandomizedSmoothing(f, band_width=2, threshold=threshold)
    with pytest.raises(ValueError, match=r"2C channels"):
        dr.DerandomizedSmoothing(models.digits_cnn(input_shape=(H, W, 1), num_classes=K), 2)
    x, y = np.zeros((2, H, W, 1), np.float32), np.zeros(2, int)
    with pytest.raises(ValueError, match=r"a 9x9 patch does not fit a 8x8 image"):
        dr.certify_bands(f, x, y, patch_sizes=[9], band_width=2)
    with pytest.raises(ValueError, match=r"certify_patch_sizes: a 9x9 patch does not fit"):
        BandAblationTraining(dr.smoothed_classifier(f, 2), certify_patch_sizes=(2, 9))
    with pytest.raises(ValueError, match="holding a DerandomizedSmoothing"):
        BandAblationTraining(f)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        dr.certify_bands(f, x + 2, y, [1], band_width=2)


def test_bin_certify_loads_a_saved_smoothed_classifier_in_a_fresh_process(tmp_path):
    import json

    from conftest import run_bin
    from tfadv import data

    keras.utils.set_random_seed(3)
    smoothed = band_ablation_model((8, 8, 1), 10, base="digits_cnn", band_width=2)
    path = str(tmp_path / "model.keras")
    smoothed.save(path)
    out = tmp_path / "out"
    result = run_bin("certify", f"--model={path}", "--method=patch", "--patch_sizes=1,2",
                     "--dataset=digits", "--max_examples=20", f"--output_dir={out}",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "de-randomized column smoothing" in result.stdout
    report = json.loads((out / "certify.json").read_text())
    expected = dr.certified_band_accuracy(smoothed, data.load_dataset("digits").test, [1, 2],
                                          max_examples=20)
    assert report["method"] == "derandomized"
    assert report["certified_accuracy"] == {str(m): a for m, a in
                                            expected["certified_accuracy"].items()}
    assert report["clean_accuracy"] == expected["clean_accuracy"]
