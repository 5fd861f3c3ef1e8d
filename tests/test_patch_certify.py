"""The IBP patch certificate (tfadv.certify.patch), its training (tfadv.defenses.patch_ibp) and
bin/certify --method=patch: soundness against exhaustive patches, bounds, every location used,
training, errors (Chiang et al., ICLR 2020)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_bin
from tfadv.attacks.patch import PatchPGD, apply_patch, patch_box, patch_locations, patch_masks
from tfadv.certify import ibp
from tfadv.certify import patch as cert
from tfadv.defenses import CertifiedPatchTraining
from tfadv.defenses.patch_ibp import chiang_mlp

SHAPE = (8, 8, 1)


def _cnn(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(12, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))


def _mlp(seed):
    keras.utils.set_random_seed(seed)
    return chiang_mlp(input_shape=SHAPE, num_classes=3, hidden=(16, 8))


def _contents(rng, n):
    """Patch contents (n_c, n, H, W, C): all 0, all 1, uniform random, random in {0, 1}."""
    full = (n, *SHAPE)
    return np.stack([np.zeros(full), np.ones(full), *[rng.random(full) for _ in range(3)],
                     *[rng.integers(0, 2, full) for _ in range(3)]]).astype("float32")


def _per_location(x, size):
    """Every (example, location) pair: images (N * L, H, W, C) and masks (N * L, H, W, 1)."""
    masks = cert.all_patch_masks(SHAPE, size).numpy()
    n, count = len(x), len(masks)
    return np.repeat(x, count, axis=0), np.tile(masks, (n, 1, 1, 1)), count


@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_bounds_contain_the_logits_of_every_patched_image(build):
    model = build(0)
    rng = np.random.default_rng(0)
    x = rng.random((4, *SHAPE)).astype("float32")
    y = rng.integers(0, 3, 4)
    images, masks, count = _per_location(x, 2)
    labels = np.repeat(y, count)
    # One location per row (per-example masks (N * L, 1, H, W, 1)).
    bound = cert.worst_case_over_locations(model, images, labels, masks[:, None]).numpy()
    lower, upper = ibp.logit_bounds(model, *patch_box(images, masks))
    for content in _contents(rng, len(images)):
        logits = model(apply_patch(images, content, masks)).numpy()
        margins = logits - logits[np.arange(len(labels)), labels][:, None]
        assert np.all(margins <= bound + 1e-5)
        assert np.all((lower.numpy() - 1e-5 <= logits) & (logits <= upper.numpy() + 1e-5))
    # The chunked maximum over shared locations is the maximum of the per-location bounds.
    chunked = cert.worst_case_over_locations(model, x, y, cert.all_patch_masks(SHAPE, 2),
                                             max_batch=7).numpy()
    np.testing.assert_allclose(chunked, bound.reshape(4, count, 3).max(axis=1), atol=1e-5)


def _half_certified_model(seed, size, n):
    """A random CNN whose class-0 bias puts half of n random images (label 0) above the
    certificate's threshold at patch size ``size``."""
    model = _cnn(seed)
    rng = np.random.default_rng(seed)
    x = rng.random((n, *SHAPE)).astype("float32")
    y = np.zeros(n, np.int64)
    dense = model.get_layer("logits")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, np.zeros_like(bias)])
    worst = cert.worst_case_over_locations(model, x, y, cert.all_patch_masks(SHAPE, size))
    margin = np.sort(np.max(worst.numpy()[:, 1:], axis=1))
    dense.set_weights([kernel, np.array([margin[n // 2], 0, 0], "float32")])
    return model, x, y


@pytest.mark.parametrize("size", [1, 2])
def test_certified_examples_survive_every_patch_at_every_location(size):
    model, x, y = _half_certified_model(3, size, 16)
    certified = cert.certify_patch(model, x, y, size, max_batch=50)
    assert 0 < certified.sum() < len(x)  # a non-trivial split
    rng = np.random.default_rng(1)
    images, masks, count = _per_location(x[certified], size)
    for content in _contents(rng, len(images)):
        predictions = np.argmax(model(apply_patch(images, content, masks)).numpy(), axis=1)
        assert np.all(predictions == 0)
    # The strongest empirical attack: 150 steps of 0.05 (Chiang et al.) at every location.
    attack = PatchPGD(size, steps=150, step_size=0.05, locations="all", max_batch=512)
    x_adv = attack(model, tf.constant(x[certified]), tf.constant(y[certified])).numpy()
    assert np.all(np.argmax(model(x_adv).numpy(), axis=1) == 0)


def _one_pixel_model(row, col):
    """logits (0.5, x[row, col]): class 0 unless a patch brightens pixel (row, col)."""
    kernel = np.zeros((64, 2), "float32")
    kernel[row * 8 + col, 1] = 1.0
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model.layers[-1].set_weights([kernel, np.array([0.5, 0.0], "float32")])
    return model


@pytest.mark.parametrize("pixel", [(7, 3), (3, 7), (7, 7)])
@pytest.mark.parametrize("size", [1, 2])
def test_locations_in_the_last_row_and_column_are_certified(pixel, size):
    model = _one_pixel_model(*pixel)
    x, y = np.zeros((1, *SHAPE), "float32"), np.zeros(1, np.int64)
    assert not cert.certify_patch(model, x, y, size)[0]  # a patch on the pixel fools it
    # The only vulnerable locations are in the last row or column: without them (the official
    # PatchAttacker's grid) the example would pass.
    last = 8 - size
    inner = [loc for loc in patch_locations(SHAPE, size) if loc[0] < last and loc[1] < last]
    worst = cert.worst_case_over_locations(model, x, y, patch_masks(SHAPE, size, inner))
    assert ibp.is_verified(worst, y).numpy()[0]
    report = cert.certified_patch_accuracy(model, (x, y), [size])
    assert report["certified_accuracy"][size] == 0.0 and report["clean_accuracy"] == 1.0
    assert report["num_locations"][size] == (9 - size) ** 2


def _halves(n, seed):
    """Class 0: left half bright; class 1: right half bright (noisy)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.uniform(0.0, 0.2, (n, *SHAPE))
    for i in range(n):
        cols = slice(0, 4) if y[i] == 0 else slice(4, 8)
        x[i, :, cols] = rng.uniform(0.8, 1.0, (8, 4, 1))
    return x.astype("float32"), y


def _verified_loss(model, x, y, size):
    worst = cert.worst_case_over_locations(model, x, y, cert.all_patch_masks(SHAPE, size))
    return float(tf.reduce_mean(ibp.verified_cross_entropy(y, worst)))


def test_training_raises_certified_accuracy_and_lowers_the_verified_loss():
    x, y = _halves(128, 0)
    keras.utils.set_random_seed(0)
    base = chiang_mlp(input_shape=SHAPE, num_classes=2, hidden=(32,))
    before = cert.certify_patch(base, x, y, 2).mean(), _verified_loss(base, x, y, 2)
    model = CertifiedPatchTraining(base, patch_size=2, num_locations=8, warmup_steps=4,
                                   rampup_steps=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, y, batch_size=32, epochs=12, verbose=0)
    after = cert.certify_patch(base, x, y, 2).mean(), _verified_loss(base, x, y, 2)
    assert after[0] >= before[0] + 0.5 and after[0] >= 0.8, (before, after)
    assert after[1] < 0.5 * before[1], (before, after)
    # Validation reports the same certificate as certify_patch (all locations, [0, 1]).
    logs = model.evaluate(x, y, batch_size=50, return_dict=True, verbose=0)
    assert logs["verified_accuracy"] == pytest.approx(after[0])
    report = model.certified_report(base, (x, y))["patch_certificate"]
    assert report["method"] == "ibp-patch" and report["certified_accuracy"] == {2: after[0]}
    assert "records" not in report


def test_random_locations_are_distinct_and_reach_the_last_row_and_column():
    base = chiang_mlp(input_shape=SHAPE, num_classes=2, hidden=(4,))
    model = CertifiedPatchTraining(base, patch_size=3, num_locations=5)
    model.compile(optimizer="adam")
    all_masks = cert.all_patch_masks(SHAPE, 3).numpy().reshape(36, -1)
    seen = set()
    for step in range(40):
        model.optimizer.iterations.assign(step)
        masks = model.training_masks(4).numpy()
        assert masks.shape == (4, 5, 8, 8, 1)
        for row in masks.reshape(4, 5, -1):
            index = [int(np.argmax((all_masks == m).all(axis=1))) for m in row]
            assert len(set(index)) == 5
            seen.update(index)
    assert seen == set(range(36))  # every location, (5, 5) included, is drawn


def test_warmup_is_nominal_training_and_the_ramp_reaches_the_full_box():
    base = chiang_mlp(input_shape=SHAPE, num_classes=2, hidden=(4,))
    model = CertifiedPatchTraining(base, patch_size=2, warmup_steps=10, rampup_steps=20)
    eps, kappa = model.schedule(5)
    assert (float(eps), float(kappa)) == (0.0, 1.0)
    eps, kappa = model.schedule(20)
    assert (float(eps), float(kappa)) == (0.5, 0.0)
    assert float(model.schedule(1000)[0]) == 1.0


def test_clear_errors():
    model = _mlp(0)
    x, y = np.zeros((2, *SHAPE), "float32"), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="patch_size: a 9x9 patch does not fit a 8x8 image"):
        cert.certify_patch(model, x, y, 9)
    for sizes, needle in (([], "at least one"), ([0], "patch_sizes must be an integer >= 1"),
                          ([2.5], "patch_sizes must be an integer"), ([2, 9], "does not fit")):
        with pytest.raises(ValueError, match=needle):
            cert.certified_patch_accuracy(model, (x, y), sizes)
    with pytest.raises(ValueError, match=r"x must be images in \[0, 1\]"):
        cert.certify_patch(model, x + 2.0, y, 2)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        cert.certify_patch(model, x, y, 2, max_batch=0)
    with pytest.raises(ValueError, match="patch_size: a 9x9 patch does not fit"):
        CertifiedPatchTraining(model, patch_size=9)
    with pytest.raises(ValueError, match="num_locations must be an integer >= 1"):
        CertifiedPatchTraining(model, patch_size=2, num_locations=0)
    with pytest.raises(ValueError, match="eval_patch_sizes: a 10x10 patch does not fit"):
        CertifiedPatchTraining(model, patch_size=2, eval_patch_sizes=[2, 10])
    softmax = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                                keras.layers.Softmax()])
    with pytest.raises(ValueError, match="Softmax"):
        cert.certify_patch(softmax, x, y, 2)


# --- bin/certify --method=patch -----------------------------------------------------------------
def test_bin_certify_patch_end_to_end(tmp_path):
    from tfadv import data

    # A class-0 bias no 2x2 patch can overcome: certified exactly where the label is 0.
    keras.utils.set_random_seed(0)
    model = chiang_mlp(input_shape=SHAPE, num_classes=10, hidden=(8,))
    kernel, bias = model.get_layer("logits").get_weights()
    bias[0] = 100.0
    model.get_layer("logits").set_weights([kernel, bias])
    path = str(tmp_path / "model.keras")
    model.save(path)
    out = tmp_path / "out"
    result = run_bin("certify", f"--model={path}", "--method=patch", "--patch_sizes=1,2",
                     "--dataset=digits", "--max_examples=20", f"--output_dir={out}",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "certified accuracy" in result.stdout and "2x2" in result.stdout
    report = json.loads((out / "certify.json").read_text())
    _, labels = cert._arrays(data.load_dataset("digits", batch_size=256).test, 20)
    share = float(np.mean(labels == 0))
    assert report["method"] == "ibp-patch" and report["num_examples"] == 20
    assert report["certified_accuracy"] == {"1": share, "2": share}
    assert report["clean_accuracy"] == share
    assert report["num_locations"] == {"1": 64, "2": 49}
    assert [r["certified"]["2"] for r in report["records"]] == list(labels == 0)
    assert report["settings"]["patch_sizes"] == [1, 2]


@pytest.mark.parametrize("flags, needle", [
    (["--patch_sizes=0,x"], "--patch_sizes must be comma-separated integers >= 1"),
    (["--patch_sizes=2", "--batch_size=0"], "--batch_size must be an integer >= 1")])
def test_bin_certify_patch_rejects_bad_flags_before_loading(flags, needle):
    result = run_bin("certify", "--model=/nonexistent/model.keras", "--method=patch", *flags,
                     timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "tensorflow" not in result.stderr.lower()
