"""Patch pre-processing defenses (tfadv.preprocessing): LGS against an independent
NumPy computation of x * (1 - clip(lambda * g~, 0, 1)), harmonic inpainting on linear ramps,
the saliency mask's erosion and dilation, the watermark defense on a linear classifier whose
saliency is known in closed form, saving / loading / export, argument errors, and BPDA through
the transforms."""

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv import export
from tfadv.attacks import bpda
from tfadv import preprocessing as pp
from tfadv.preprocessing import (LocalGradientSmoothing, PreprocessedClassifier,
                                                WatermarkDefense, inpaint, patch_mask,
                                                preprocessed_model, with_preprocessing)


# --- an independent NumPy LGS --------------------------------------------------------------------
def _starts(extent, window, stride):
    starts = list(range(0, extent - window + 1, stride))
    if starts[-1] != extent - window:
        starts.append(extent - window)
    return starts


def _lgs_numpy(grey, window, stride, threshold, lam, flush=True):
    """LGS of one grey image (H, W) written out loop by loop; ``flush=False`` uses only the
    windows 0, s, 2s, ... (the reimplementation's unfold, which drops the last rows/columns)."""
    grey = grey.astype(np.float64)
    height, width = grey.shape
    dx = np.zeros_like(grey)
    dy = np.zeros_like(grey)
    dx[:, :-1] = grey[:, 1:] - grey[:, :-1]
    dy[:-1, :] = grey[1:, :] - grey[:-1, :]
    g = np.sqrt(dx ** 2 + dy ** 2)
    g = (g - g.min()) / (g.max() - g.min() + 1e-7)
    keep = np.zeros_like(g, dtype=bool)
    rows = _starts(height, window, stride) if flush else list(
        range(0, height - window + 1, stride))
    cols = _starts(width, window, stride) if flush else list(range(0, width - window + 1, stride))
    for i in rows:
        for j in cols:
            if g[i:i + window, j:j + window].mean() > threshold:
                keep[i:i + window, j:j + window] = True
    return grey * (1.0 - np.clip(lam * np.where(keep, g, 0.0), 0.0, 1.0))


def _lgs(image, **kwargs):
    layer = LocalGradientSmoothing(**kwargs)
    return np.asarray(layer(image[None, ..., None].astype("float32")))[0, ..., 0]


def test_lgs_leaves_a_constant_image_unchanged():
    image = np.full((12, 12), 0.6, "float32")
    np.testing.assert_array_equal(_lgs(image, window_size=3, stride=2), image)


def test_lgs_matches_the_closed_form_on_a_square():
    image = np.full((16, 16), 0.2, "float32")
    image[4:8, 4:8] = 1.0                   # sharp high-contrast square
    image[12:, :3] = 0.22                   # a faint step: g > 0, but its windows fail gamma
    kwargs = dict(window_size=3, stride=2, threshold=0.1, smoothing_factor=2.3)
    out = _lgs(image, **kwargs)
    expected = _lgs_numpy(image, 3, 2, 0.1, 2.3)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # The square's edges are suppressed (its top-left outer ring has the largest gradient)...
    assert out[3, 4] < 0.5 * image[3, 4] and out[4, 7] < 0.5 * image[4, 7]
    # ... the faint step has a gradient but no passing window, so it is returned exactly, as is
    # everything far from the square.
    np.testing.assert_array_equal(out[10:, :6], image[10:, :6])
    np.testing.assert_array_equal(out[:2, 10:], image[:2, 10:])


def test_lgs_smooths_all_channels_alike_with_the_luma_of_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(size=(1, 10, 10, 3)).astype("float32")
    layer = LocalGradientSmoothing(window_size=3, stride=2)
    grey = rgb @ np.array([0.299, 0.587, 0.114], "float32")
    expected_fraction = 1.0 - _lgs_numpy(grey[0], 3, 2, 0.1, 2.3) / grey[0]
    out = np.asarray(layer(rgb))
    np.testing.assert_allclose(out, rgb * (1.0 - expected_fraction[None, ..., None]), atol=1e-5)


def test_lgs_covers_the_last_rows_and_columns():
    # 12 x 12, windows of 5 with stride 4: starts 0, 4 and the flush one at 7. Without it, rows
    # and columns 9..11 are in no window, and a textured patch there would never be smoothed.
    image = np.full((12, 12), 0.3, "float32")
    image[9:, 9:] = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    out = _lgs(image, window_size=5, stride=4)
    np.testing.assert_allclose(out, _lgs_numpy(image, 5, 4, 0.1, 2.3), atol=1e-6)
    assert np.abs(out[9:, 9:] - image[9:, 9:]).max() > 0.5
    unfold_only = _lgs_numpy(image, 5, 4, 0.1, 2.3, flush=False)
    np.testing.assert_array_equal(unfold_only[9:, 9:], image[9:, 9:])


# --- inpainting ----------------------------------------------------------------------------------
def _ramp(height=16, width=16):
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([0.1 + 0.03 * i + 0.02 * j, 0.9 - 0.01 * i - 0.04 * j], -1).astype(
        "float32")[None]


def test_inpaint_keeps_unmasked_pixels_exactly():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(2, 9, 11, 3)).astype("float32")
    mask = (rng.uniform(size=(2, 9, 11, 1)) < 0.3).astype("float32")
    out = np.asarray(inpaint(x, mask, iterations=5))
    keep = np.broadcast_to(mask == 0, x.shape)
    np.testing.assert_array_equal(out[keep], x[keep])
    assert np.abs(out - x).max() > 0.05  # the masked pixels did change


def test_inpaint_reproduces_a_linear_ramp():
    x = _ramp()
    mask = np.zeros((1, 16, 16, 1), "float32")
    mask[:, 5:10, 6:11] = 1.0
    corrupted = x.copy()
    corrupted[:, 5:10, 6:11] = np.random.default_rng(2).uniform(size=(1, 5, 5, 2))
    out = np.asarray(inpaint(corrupted, mask, iterations=150))
    np.testing.assert_allclose(out, x, atol=1e-3)
    # The border-inward fill alone is not harmonic: the Jacobi steps do the work.
    assert np.abs(np.asarray(inpaint(corrupted, mask, iterations=0)) - x).max() > 2e-3


def test_inpaint_leaves_a_fully_masked_image_unchanged():
    x = np.concatenate([_ramp(), _ramp()[:, ::-1]])
    mask = np.zeros((2, 16, 16, 1), "float32")
    mask[0] = 1.0                           # image 0: everything masked, nothing to fill from
    mask[1, 5:10, 6:11] = 1.0
    corrupted = x.copy()
    corrupted[1, 5:10, 6:11] = 0.0
    out = np.asarray(inpaint(corrupted, mask, iterations=150))
    np.testing.assert_array_equal(out[0], x[0])
    np.testing.assert_allclose(out[1], x[1], atol=1e-3)


# --- the saliency mask ---------------------------------------------------------------------------
def _saliency():
    s = np.zeros((1, 14, 14), "float32")
    s[0, 2, 2] = 1.0                        # an isolated salient pixel
    s[0, 5:10, 5:10] = 0.9                  # a dense salient 5 x 5 block
    return s


def _square(top, left, size, shape=(14, 14)):
    m = np.zeros(shape, "float32")
    m[top:top + size, left:left + size] = 1.0
    return m


def test_patch_mask_erosion_and_dilation():
    s = _saliency()
    eroded = np.asarray(patch_mask(s, 0.4, erosion=3, dilation=1))[0, ..., 0]
    np.testing.assert_array_equal(eroded, _square(6, 6, 3))       # pixel gone, block's core
    opened = np.asarray(patch_mask(s, 0.4, erosion=3, dilation=3))[0, ..., 0]
    np.testing.assert_array_equal(opened, _square(5, 5, 5))       # opening keeps the block
    grown = np.asarray(patch_mask(s, 0.4, erosion=3, dilation=5))[0, ..., 0]
    np.testing.assert_array_equal(grown, _square(4, 4, 7))
    raw = np.asarray(patch_mask(s, 0.4, erosion=1, dilation=1))[0, ..., 0]
    assert raw[2, 2] == 1.0 and raw.sum() == 26.0
    # The threshold acts on the min-max normalised saliency: invariant to scale and offset.
    np.testing.assert_array_equal(np.asarray(patch_mask(7.0 * s + 3.0, 0.4, 3, 5))[0, ..., 0],
                                  grown)


# --- the watermark defense on a classifier with known saliency -----------------------------------
SIDE = 16
PATCH = (slice(5, 10), slice(6, 11))        # rows 5..9, columns 6..10


def _linear_classifier():
    """Logits (w . x, 0) on (16, 16, 1) images, with w = 1 on the 5 x 5 PATCH region and 0.01
    elsewhere: for positive images class 0 wins, and the saliency |w| singles out the region."""
    w = np.full((SIDE, SIDE), 0.01, "float32")
    w[PATCH] = 1.0
    weights = np.stack([w.ravel(), np.zeros(SIDE * SIDE, "float32")], axis=1)
    inputs = keras.Input((SIDE, SIDE, 1))
    dense = keras.layers.Dense(2, use_bias=False, name="logits")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)), name="linear")
    dense.set_weights([weights])
    return model


def _patched_ramp():
    clean = _ramp(SIDE, SIDE)[..., :1]
    patched = clean.copy()
    patched[0][PATCH] = np.random.default_rng(3).uniform(size=(5, 5, 1))
    return clean, patched


def test_watermark_locates_and_removes_the_patch():
    clean, patched = _patched_ramp()
    layer = WatermarkDefense(threshold=0.4, erosion=3, dilation=5, iterations=150,
                             classifier=_linear_classifier())
    mask = np.asarray(layer.mask(patched))[0, ..., 0]
    np.testing.assert_array_equal(mask, _square(4, 5, 7, (SIDE, SIDE)))  # PATCH grown by 1
    out = np.asarray(layer(patched))
    np.testing.assert_allclose(out, clean, atol=1e-3)      # patch replaced by the ramp
    outside = mask[None, ..., None] == 0
    np.testing.assert_array_equal(out[outside], patched[outside])


# --- layers, models, saving ----------------------------------------------------------------------
@pytest.mark.parametrize("layer", [LocalGradientSmoothing(3, 2), WatermarkDefense()])
def test_transforms_are_marked_for_bpda(layer):
    assert type(layer).non_differentiable is True and layer.non_differentiable is True
    x = tf.random.stateless_uniform((2, 8, 8, 1), seed=[0, 4])
    assert layer.bpda_approximation(x) is x


def _small_cnn():
    inputs = keras.Input((SIDE, SIDE, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name="cnn")
    model.set_weights([np.asarray(w) + 0.05 for w in model.get_weights()])
    return model


@pytest.mark.parametrize("make", [lambda: LocalGradientSmoothing(3, 2, smoothing_factor=1.5),
                                  lambda: WatermarkDefense(0.4, 3, 3, iterations=20)])
def test_saved_model_loads_with_the_transform_reattached(make, tmp_path):
    keras.utils.set_random_seed(0)
    classifier = _small_cnn()
    model = with_preprocessing(classifier, make())
    assert isinstance(model, PreprocessedClassifier)
    if isinstance(model.preprocessing, WatermarkDefense):
        assert model.preprocessing.classifier is classifier is model.classifier
    _, x = _patched_ramp()
    x = np.concatenate([x, x[:, ::-1]])
    expected = np.asarray(model(x))
    assert np.abs(expected - np.asarray(classifier(x))).max() > 1e-4  # the transform acts
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is PreprocessedClassifier
    assert type(loaded.preprocessing) is type(model.preprocessing)
    assert loaded.preprocessing.get_config() == model.preprocessing.get_config()
    if isinstance(loaded.preprocessing, WatermarkDefense):
        assert loaded.preprocessing.classifier is loaded.classifier
        assert loaded.preprocessing.classifier is not classifier
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, atol=1e-6)


def test_watermark_model_exports_as_a_saved_model(tmp_path):
    model = with_preprocessing(_linear_classifier(), WatermarkDefense(iterations=20))
    _, x = _patched_ramp()
    version_dir = export.export_saved_model(model, tmp_path / "serving", version=1)  # verifies
    served = tf.saved_model.load(version_dir).signatures[export.SIGNATURE_KEY]
    logits = served(images=tf.constant(x))["logits"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), atol=1e-5)
    assert np.abs(np.asarray(logits) - np.asarray(model.classifier(x))).max() > 1e-3


def test_gin_bindings_reach_the_named_transforms():
    with gin.unlock_config():
        gin.parse_config(["local_gradient_smoothing.window_size = 5",
                          "watermark_defense.erosion = 1"])
    try:
        lgs = with_preprocessing(_small_cnn(), "lgs").preprocessing
        watermark = with_preprocessing(_small_cnn(), "watermark").preprocessing
    finally:
        gin.clear_config()
    assert isinstance(lgs, LocalGradientSmoothing) and lgs.window_size == 5
    assert lgs.stride == 10 and lgs.smoothing_factor == 2.3
    assert isinstance(watermark, WatermarkDefense) and watermark.erosion == 1


# --- errors --------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="window_size must be <= the image's height"):
        LocalGradientSmoothing(window_size=17)(np.zeros((1, 16, 16, 1), "float32"))
    with pytest.raises(ValueError, match="window_size must be <= the image's height"):
        with_preprocessing(_small_cnn(), LocalGradientSmoothing(window_size=17))
    with pytest.raises(ValueError, match="erosion must be an odd integer >= 1"):
        WatermarkDefense(erosion=2)
    with pytest.raises(ValueError, match="dilation must be an odd integer >= 1"):
        WatermarkDefense(dilation=4)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            WatermarkDefense(threshold=bad)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        LocalGradientSmoothing(threshold=1.5)
    with pytest.raises(ValueError, match="smoothing_factor must be a finite number > 0"):
        LocalGradientSmoothing(smoothing_factor=0.0)
    with pytest.raises(ValueError, match=r"preprocessing must be one of \['lgs', 'watermark'\]"):
        with_preprocessing(_small_cnn(), "jpeg")
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        preprocessed_model((SIDE, SIDE, 1), 3, preprocessing="median")
    for base in ("resnet_7", 3):
        with pytest.raises(ValueError, match=r"base must be one of \['digits_cnn'"):
            preprocessed_model((SIDE, SIDE, 1), 3, base=base)
    with pytest.raises(ValueError, match="needs the classifier it protects"):
        WatermarkDefense()(np.zeros((1, 8, 8, 1), "float32"))
    assert set(pp.PREPROCESSING) == {"lgs", "watermark"}


# --- BPDA ----------------------------------------------------------------------------------------
def _input_gradient(model, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logit = tf.reduce_sum(model(x)[:, 0])
    return np.asarray(tape.gradient(logit, x))[0, ..., 0]


def test_bpda_straight_through_the_watermark_defense():
    model = with_preprocessing(_linear_classifier(), WatermarkDefense(iterations=30))
    assert bpda.marked_layers(model) == [model.preprocessing]
    _, x = _patched_ramp()
    attacked = bpda.bpda_model(model, bpda.marked_layers(model))
    np.testing.assert_allclose(np.asarray(attacked(x)), np.asarray(model(x)), atol=1e-6)
    mask = np.asarray(model.preprocessing.mask(x))[0, ..., 0] > 0
    raw = _input_gradient(model, x)
    straight = _input_gradient(attacked, x)
    assert mask.sum() == 49
    np.testing.assert_array_equal(raw[mask], 0.0)      # inpainting hides the patch's pixels
    # Straight-through: the classifier's own gradient w (1 on the patch, 0.01 around it).
    np.testing.assert_allclose(straight[PATCH], 1.0, atol=1e-6)
    assert np.all(straight[mask] > 0.005)


def test_preprocessed_model_marks_its_transform():
    by_builder = preprocessed_model((SIDE, SIDE, 1), 3, base=lambda input_shape, num_classes:
                                    _small_cnn(), preprocessing=LocalGradientSmoothing(3, 2))
    assert bpda.marked_layers(by_builder) == [by_builder.preprocessing]
    assert by_builder.preprocessing in bpda.find_gradient_blockers(by_builder,
                                                                   _patched_ramp()[1])
    by_name = preprocessed_model((8, 8, 1), 4, base="digits_cnn", preprocessing="watermark")
    assert by_name.output_shape == (None, 4)
    assert by_name.preprocessing.classifier is by_name.classifier
    assert [type(layer) for layer in bpda.marked_layers(by_name)] == [WatermarkDefense]
