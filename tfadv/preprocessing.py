"""Input transformations against adversarial patches: local gradient smoothing and inpainting.

Both are Keras layers placed in front of a classifier (`with_preprocessing`, or trained with the
transform inside the model: `preprocessed_model`, gin ``train.model = @preprocessed_model``). Both
are marked for BPDA (``non_differentiable = True``, ``bpda_approximation(x) = x``;
`tfadv.attacks.bpda`): their gradients exist but mislead (LGS multiplies the patch's gradient
down, inpainting zeroes it), so an honest evaluation attacks them straight-through (Athalye,
Carlini, Wagner, ICML 2018, Sec. 4.1), as Chiang et al. (ICLR 2020, Sec. 3) did to break both.

LGS: `LocalGradientSmoothing`.
    Naseer, Khan, Porikli, "Local Gradients Smoothing: Defense against localized adversarial
    attacks", WACV 2019 (no official code; tfadv follows the paper and the reimplementation
    fabiobrau/local_gradients_smoothing, ``lgs/local_gradients_smoothing.py``). With g the
    first-order gradient magnitude of the grey image, min-max normalised per image to [0, 1]:

        g(x)   = sqrt((d/dx x)^2 + (d/dy x)^2),  g <- (g - min g) / (max g - min g + 1e-7)
        g~     = g on every pixel covered by a window h (size ``window_size``, step ``stride``)
                 whose mean normalised gradient exceeds gamma (``threshold``), 0 elsewhere
        LGS(x) = x * (1 - clip(lambda * g~, 0, 1))        lambda = ``smoothing_factor``

    Paper values (224 x 224 ImageNet): 15 x 15 windows, stride 10 (overlap 5), gamma = 0.1,
    lambda = 2.3. The window test is the MEAN of the normalised gradient over the window (the
    paper's normalised window sum; the reimplementation's ``torch.mean(...) > threshold``), and
    a pixel keeps its gradient when ANY window covering it passes (the reimplementation's
    fold-then-``>= 1``). Differences: derivatives are forward differences, zero in the last
    row/column (as the reimplementation's zero-padded [1, -1] kernels); the grey level of an RGB
    image uses the ITU-R 601 weights (torchvision ``Grayscale``, the reimplementation's second
    version); and the window grid always ends with a window flush with the bottom/right edge:
    the reimplementation's ``unfold`` drops the last (H - 15) mod 10 rows and columns (9 of 224)
    from every window, so a patch there is never smoothed.

Inpainting: `WatermarkDefense`.
    Hayes, "On Visible Adversarial Perturbations & Digital Watermarking", CVPR Workshops 2018
    (no public code; the paper's text was not available to us, so the pipeline follows its
    description by Chiang et al., ICLR 2020, Sec. 3: saliency maps of the network locate
    unusually dense regions of large gradient entries, which are masked and inpainted). The
    blind defense, in TF ops (exportable, no OpenCV):

        s(x) = max_c | d f_yhat(x) / d x_c |      saliency of the predicted logit (Simonyan et
                                                  al. 2014), min-max normalised per image
        M0   = s > tau                            tau = ``threshold``
        M    = dilate_k2(erode_k1(M0))            min/max pooling, k1 = ``erosion``,
                                                  k2 = ``dilation`` (odd sizes): erosion removes
                                                  isolated salient pixels, dilation covers the patch
        x'   = inpaint(x, M)                      M's pixels replaced, the others unchanged

    The saliency needs the classifier's gradient, so the layer holds a reference to the
    classifier it protects (`WatermarkDefense.attach`; `with_preprocessing` and
    `preprocessed_model` attach it and rebuild the link when a model is loaded).

    `inpaint` replaces OpenCV's ``cv2.inpaint`` (Telea 2004 fast marching, or Navier-Stokes,
    Bertalmio et al. 2001), which Hayes used: first the masked pixels are filled layer by layer
    from the mask's border inwards, each with the mean of its already known 4-neighbours (the
    order of Telea's fast marching, without its distance and level-set weights); then
    ``iterations`` Jacobi steps replace every masked pixel by the mean of its 4 neighbours. The
    steady state solves Laplace's equation inside the mask with the image as boundary values
    (harmonic interpolation: isotropic diffusion, the Navier-Stokes method without its transport
    along isophotes), so linear ramps are reproduced exactly and edges are blurred rather than
    continued. Image borders are reflecting (a pixel's missing neighbours are left out).
"""

import math
import numbers

import gin
import keras
import tensorflow as tf

from tfadv import models

# ITU-R 601 luma weights (PIL / torchvision Grayscale).
_GREY_WEIGHTS = (0.299, 0.587, 0.114)
_EPS = 1e-7  # the reimplementation's min-max denominator guard


def _check_int(name, value, low, odd=False):
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low
            or (odd and value % 2 == 0)):
        kind = "an odd integer" if odd else "an integer"
        raise ValueError(f"{name} must be {kind} >= {low}; got {value!r}.")
    return int(value)


def _check_real(name, value, low, high=None, strict_low=False):
    bad = (not isinstance(value, numbers.Real) or isinstance(value, bool)
           or not math.isfinite(value) or (value <= low if strict_low else value < low)
           or (high is not None and value > high))
    if bad:
        bound = f"> {low}" if strict_low else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.")
    return float(value)


# --- shared image operations --------------------------------------------------------------------
def grey_level(x):
    """(B, H, W) grey level of images (B, H, W, C): the single channel for C = 1, the ITU-R 601
    luma 0.299 R + 0.587 G + 0.114 B for C = 3, the channel mean otherwise."""
    x = tf.convert_to_tensor(x, tf.float32)
    channels = x.shape[-1]
    if channels == 1:
        return x[..., 0]
    if channels == 3:
        return tf.tensordot(x, tf.constant(_GREY_WEIGHTS, tf.float32), axes=[[-1], [0]])
    return tf.reduce_mean(x, axis=-1)


def gradient_magnitude(x):
    """(B, H, W) first-order gradient magnitude sqrt(dx^2 + dy^2) of the grey level of ``x``
    (B, H, W, C), with forward differences x[i, j+1] - x[i, j] and x[i+1, j] - x[i, j] (zero in
    the last column / row). Its own gradient is 0 where the magnitude is 0 (no NaN)."""
    grey = grey_level(x)
    dx = tf.pad(grey[:, :, 1:] - grey[:, :, :-1], [[0, 0], [0, 0], [0, 1]])
    dy = tf.pad(grey[:, 1:, :] - grey[:, :-1, :], [[0, 0], [0, 1], [0, 0]])
    squared = tf.square(dx) + tf.square(dy)
    positive = squared > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, squared, tf.ones_like(squared))), 0.0)


def normalize_per_image(m):
    """(m - min m) / (max m - min m + 1e-7) per image of a (B, H, W) map: values in [0, 1)."""
    low = tf.reduce_min(m, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(m, axis=[1, 2], keepdims=True)
    return (m - low) / (high - low + _EPS)


def _window_starts(extent, window_size, stride):
    """(extent - window_size + 1,) bool: True at every window start 0, s, 2s, ... and at the
    last start extent - window_size."""
    starts = tf.range(extent - window_size + 1)
    return tf.logical_or(starts % stride == 0, starts == extent - window_size)


def local_gradient_map(x, window_size=15, stride=10, threshold=0.1):
    """(B, H, W) normalised gradient magnitude of ``x`` kept on the windows whose mean exceeds
    ``threshold`` (0 elsewhere): the map g~ of `LocalGradientSmoothing` before lambda and the
    clip. Windows of ``window_size`` x ``window_size`` start every ``stride`` pixels, plus one
    flush with the bottom/right edge; a pixel is kept when any window covering it passes."""
    g = normalize_per_image(gradient_magnitude(x))
    shape = tf.shape(g)
    height, width = shape[1], shape[2]
    means = tf.nn.avg_pool2d(g[..., None], window_size, 1, "VALID")[..., 0]  # (B, H-w+1, W-w+1)
    rows = _window_starts(height, window_size, stride)
    cols = _window_starts(width, window_size, stride)
    passed = tf.logical_and(means > threshold,
                            tf.logical_and(rows[:, None], cols[None, :])[None])
    # "fold": pixel (i, j) is covered by a passed window starting in [i-w+1, i] x [j-w+1, j].
    pad = window_size - 1
    passed = tf.pad(tf.cast(passed, tf.float32)[..., None],
                    [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    covered = tf.nn.max_pool2d(passed, window_size, 1, "VALID")[..., 0]
    return g * covered


# --- the layers -----------------------------------------------------------------------------------
class InputTransform(keras.layers.Layer):
    """Base class of the patch pre-processing layers: images (B, H, W, C) in [0, 1] to images of
    the same shape, computed in float32, marked for BPDA (``non_differentiable = True``, with the
    identity as ``bpda_approximation``: `tfadv.attacks.bpda`). A transform that needs the
    classifier it protects overrides `attach`."""

    non_differentiable = True

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def attach(self, classifier):
        """Gives the transform the classifier it is placed in front of; a no-op here."""
        del classifier

    def bpda_approximation(self, x):
        """The identity: BPDA's straight-through backward pass (the transform is close to x)."""
        return x

    def compute_output_shape(self, input_shape):
        """The input shape: images in, images out."""
        return input_shape


@keras.saving.register_keras_serializable(package="tfadv")
class LocalGradientSmoothing(InputTransform):
    """LGS(x) = x * (1 - clip(lambda * g~(x), 0, 1)) (Naseer et al. 2019; module docstring).

    Args:
      window_size: side of the square windows (>= 1; paper: 15 on 224 x 224 images).
      stride: step between window starts (>= 1; paper: 10, i.e. an overlap of 5).
      threshold: gamma, the mean normalised gradient a window must exceed (in [0, 1];
        paper: 0.1).
      smoothing_factor: lambda (> 0; paper: 2.3).

    The image must be at least ``window_size`` pixels high and wide (checked when the layer is
    built). Constant images are returned unchanged; pixels of smooth regions far from any
    passing window are returned exactly.
    """

    def __init__(self, window_size=15, stride=10, threshold=0.1, smoothing_factor=2.3,
                 **kwargs):
        super().__init__(**kwargs)
        self.window_size = _check_int("window_size", window_size, 1)
        self.stride = _check_int("stride", stride, 1)
        self.threshold = _check_real("threshold", threshold, 0.0, 1.0)
        self.smoothing_factor = _check_real("smoothing_factor", smoothing_factor, 0.0,
                                            strict_low=True)

    def build(self, input_shape):
        """Checks that the images (H, W known) are at least ``window_size`` in both sides."""
        for side in input_shape[1:3]:
            if side is not None and side < self.window_size:
                raise ValueError(f"window_size must be <= the image's height and width "
                                 f"{tuple(input_shape[1:3])}; got {self.window_size}.")

    def smoothing_map(self, x):
        """(B, H, W, 1) clip(lambda * g~(x), 0, 1): the fraction of every pixel LGS removes."""
        g = local_gradient_map(tf.cast(x, tf.float32), self.window_size, self.stride,
                               self.threshold)
        return tf.clip_by_value(self.smoothing_factor * g, 0.0, 1.0)[..., None]

    def call(self, x):
        """``x * (1 - smoothing_map(x))`` for images (B, H, W, C) (all channels alike)."""
        x = tf.cast(x, tf.float32)
        return x * (1.0 - self.smoothing_map(x))

    def get_config(self):
        config = super().get_config()
        config.update(window_size=self.window_size, stride=self.stride,
                      threshold=self.threshold, smoothing_factor=self.smoothing_factor)
        return config


def model_saliency(classifier, x):
    """(B, H, W) saliency max_c |d f_yhat(x) / d x_c| of ``classifier`` (images -> logits) at
    ``x``: the gradient of each image's largest logit (Simonyan, Vedaldi, Zisserman 2014), in
    inference mode, with ``tf.stop_gradient`` (no second-order terms in an outer tape)."""
    x = tf.convert_to_tensor(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(classifier(x, training=False), tf.float32)
        top = tf.reduce_sum(tf.reduce_max(logits, axis=-1))
    grad = tape.gradient(top, x)
    if grad is None:  # a classifier that ignores its input
        grad = tf.zeros_like(x)
    return tf.stop_gradient(tf.reduce_max(tf.abs(grad), axis=-1))


def patch_mask(saliency, threshold=0.4, erosion=3, dilation=5):
    """(B, H, W, 1) float 0/1 mask of the patch region located in a (B, H, W) saliency map:
    min-max normalise per image, keep values > ``threshold``, erode with a ``erosion`` square
    (min pooling) and dilate with a ``dilation`` square (max pooling), stride 1 and SAME padding
    that ignores outside pixels (an eroded pixel at the image border needs only its in-image
    neighbours). Sizes are odd; 1 is the identity."""
    s = normalize_per_image(tf.cast(saliency, tf.float32))
    mask = tf.cast(s > threshold, tf.float32)[..., None]
    if erosion > 1:
        mask = -tf.nn.max_pool2d(-mask, erosion, 1, "SAME")
    if dilation > 1:
        mask = tf.nn.max_pool2d(mask, dilation, 1, "SAME")
    return tf.stop_gradient(mask)


def _neighbour_sum(v):
    """Sum of each pixel's 4 in-image neighbours, per channel, for (B, H, W, C) ``v``."""
    channels = v.shape[-1]
    cross = tf.constant([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    kernel = tf.tile(cross[:, :, None, None], [1, 1, channels, 1])
    return tf.nn.depthwise_conv2d(v, kernel, [1, 1, 1, 1], "SAME")


def inpaint(x, mask, iterations=100):
    """Images ``x`` (B, H, W, C) with the pixels where ``mask`` (B, H, W, 1; 1 = fill) is set
    replaced by a harmonic interpolation of their surroundings (module docstring): a
    border-inward fill with the mean of known 4-neighbours, then ``iterations`` Jacobi steps.
    Pixels outside the mask are returned exactly; a mask covering a whole image leaves it as it
    is. Graph-compatible (`tf.while_loop`)."""
    x = tf.convert_to_tensor(x, tf.float32)
    mask = tf.cast(mask > 0.5, tf.float32)
    # An image masked everywhere has no pixel to interpolate from: it is left as it is (without
    # this, its fill would start from x * (1 - mask) = 0 and return a black image).
    mask = mask * (1.0 - tf.reduce_min(mask, axis=[1, 2, 3], keepdims=True))
    ones = tf.ones_like(mask)
    neighbours = _neighbour_sum(ones)  # 2, 3 or 4: reflecting image borders

    def fill_cond(value, known, changed):
        del value, known
        return changed

    def fill_step(value, known, changed):
        del changed
        total = _neighbour_sum(value * known)
        count = _neighbour_sum(known)
        front = (1.0 - known) * tf.cast(count > 0, tf.float32)
        value = tf.where(front > 0, total / tf.maximum(count, 1.0), value)
        return value, known + front, tf.reduce_any(front > 0)

    value, _, _ = tf.while_loop(fill_cond, fill_step,
                                (x * (1.0 - mask), 1.0 - mask, tf.reduce_any(mask > 0)))

    def jacobi_step(i, value):
        return i + 1, tf.where(mask > 0, _neighbour_sum(value) / neighbours, x)

    _, value = tf.while_loop(lambda i, value: i < iterations, jacobi_step,
                             (tf.constant(0), value))
    return tf.where(mask > 0, value, x)


class _Reference:
    """Holds an object without Keras tracking it (no weights saved twice, no ownership)."""

    __slots__ = ("target",)

    def __init__(self, target):
        self.target = target


@keras.saving.register_keras_serializable(package="tfadv")
class WatermarkDefense(InputTransform):
    """Locate the patch with the classifier's saliency, then inpaint it (Hayes 2018; module
    docstring): ``inpaint(x, patch_mask(model_saliency(classifier, x)))``.

    Args:
      threshold: tau, the normalised saliency a pixel must exceed (in [0, 1)).
      erosion: side of the erosion square (odd, >= 1; 1 = none).
      dilation: side of the dilation square (odd, >= 1; 1 = none).
      iterations: Jacobi steps of the inpainting (>= 0).
      classifier: the classifier (images -> logits) whose saliency locates the patch; usually
        attached later by `with_preprocessing` / `preprocessed_model`. Not saved with the layer
        (the model around it saves it once).
    """

    def __init__(self, threshold=0.4, erosion=3, dilation=5, iterations=100, classifier=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.threshold = _check_real("threshold", threshold, 0.0, 1.0)
        if self.threshold >= 1.0:
            raise ValueError(f"threshold must be a finite number >= 0 and < 1; got {threshold!r}.")
        self.erosion = _check_int("erosion", erosion, 1, odd=True)
        self.dilation = _check_int("dilation", dilation, 1, odd=True)
        self.iterations = _check_int("iterations", iterations, 0)
        self._classifier = _Reference(None)
        if classifier is not None:
            self.attach(classifier)

    def attach(self, classifier):
        """Sets the classifier whose saliency locates the patch (a reference: its weights stay
        the classifier's, and are not saved with this layer)."""
        if not callable(classifier):
            raise ValueError(f"classifier must be a Keras model (images -> logits); got "
                             f"{classifier!r}.")
        self._classifier = _Reference(classifier)

    @property
    def classifier(self):
        """The attached classifier, or None."""
        return self._classifier.target

    def mask(self, x):
        """(B, H, W, 1) 0/1 mask of the located patch region of images ``x``."""
        if self.classifier is None:
            raise ValueError("WatermarkDefense needs the classifier it protects: use "
                             "with_preprocessing(classifier, layer) or layer.attach(classifier).")
        saliency = model_saliency(self.classifier, x)
        return patch_mask(saliency, self.threshold, self.erosion, self.dilation)

    def call(self, x):
        """``x`` with the located patch region inpainted (other pixels unchanged)."""
        x = tf.cast(x, tf.float32)
        return inpaint(x, self.mask(x), self.iterations)

    def get_config(self):
        config = super().get_config()
        config.update(threshold=self.threshold, erosion=self.erosion, dilation=self.dilation,
                      iterations=self.iterations)
        return config


# gin configures the layers through these two factories: Keras reads a layer's constructor
# arguments from its signature, which gin's wrapper of a decorated class hides.
@gin.configurable
def local_gradient_smoothing(window_size=15, stride=10, threshold=0.1, smoothing_factor=2.3):
    """A `LocalGradientSmoothing` layer (gin: ``local_gradient_smoothing.window_size = 5``);
    defaults are the paper's (224 x 224 ImageNet) values."""
    return LocalGradientSmoothing(window_size, stride, threshold, smoothing_factor)


@gin.configurable
def watermark_defense(threshold=0.4, erosion=3, dilation=5, iterations=100):
    """A `WatermarkDefense` layer, to be attached to its classifier (gin:
    ``watermark_defense.threshold = 0.4``); defaults are tfadv's for 28 x 28 MNIST and 5 x 5
    patches (gin/watermark.gin)."""
    return WatermarkDefense(threshold, erosion, dilation, iterations)


PREPROCESSING = {"lgs": local_gradient_smoothing, "watermark": watermark_defense}


def _transform(preprocessing):
    if isinstance(preprocessing, InputTransform):
        return preprocessing
    if isinstance(preprocessing, str) and preprocessing in PREPROCESSING:
        return PREPROCESSING[preprocessing]()
    raise ValueError(f"preprocessing must be one of {sorted(PREPROCESSING)} or an "
                     f"InputTransform layer; got {preprocessing!r}.")


@keras.saving.register_keras_serializable(package="tfadv")
class PreprocessedClassifier(keras.Model):
    """The functional model ``images -> preprocessing -> classifier`` (logits out), which saves
    to ``.keras`` and loads with the transform re-attached to its classifier.

    Args:
      classifier: a Keras classifier of images in [0, 1] (with a known input shape) to logits.
      preprocessing: an `InputTransform` layer (e.g. `LocalGradientSmoothing`,
        `WatermarkDefense`); it is attached to ``classifier``.
    """

    def __init__(self, classifier, preprocessing, name=None, **kwargs):
        if not isinstance(classifier, keras.Model):
            raise ValueError(f"classifier must be a keras.Model (images -> logits); got "
                             f"{type(classifier).__name__}.")
        if not isinstance(preprocessing, InputTransform):
            raise ValueError(f"preprocessing must be an InputTransform layer; got "
                             f"{type(preprocessing).__name__}.")
        preprocessing.attach(classifier)
        inputs = keras.Input(classifier.input_shape[1:], name="images")
        outputs = classifier(preprocessing(inputs))
        super().__init__(inputs=inputs, outputs=outputs,
                         name=name or f"{preprocessing.name}_{classifier.name}", **kwargs)

    @property
    def classifier(self):
        """The classifier behind the transform."""
        return self.layers[-1]

    @property
    def preprocessing(self):
        """The input transform."""
        return self.layers[1]

    def get_config(self):
        return {"name": self.name,
                "classifier": keras.saving.serialize_keras_object(self.classifier),
                "preprocessing": keras.saving.serialize_keras_object(self.preprocessing)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the model from `get_config` (the classifier and the transform)."""
        config = dict(config)
        classifier = keras.saving.deserialize_keras_object(config.pop("classifier"),
                                                           custom_objects=custom_objects)
        preprocessing = keras.saving.deserialize_keras_object(config.pop("preprocessing"),
                                                              custom_objects=custom_objects)
        return cls(classifier, preprocessing, name=config.get("name"))


def with_preprocessing(classifier, preprocessing):
    """``classifier`` (images -> logits, already trained) behind the input transform
    ``preprocessing`` (``'lgs'``, ``'watermark'`` with their gin/default arguments, or an
    `InputTransform` layer): the papers' protocol, a transform added at test time in front of a
    normally trained model. Returns a `PreprocessedClassifier` sharing ``classifier``'s
    weights. Raises ValueError for an unknown transform or a classifier that is no Keras
    model."""
    return PreprocessedClassifier(classifier, _transform(preprocessing))


@gin.configurable
def preprocessed_model(input_shape=None, num_classes=None, base="madry_mnist_cnn",
                       preprocessing="lgs"):
    """A `tfadv.models.MODELS` classifier trained and deployed with an input transform inside:
    ``images -> preprocessing -> base``; gin ``train.model = @preprocessed_model``.

    Args:
      input_shape, num_classes: the data's image shape and class count (from `tfadv.train`).
      base: a `tfadv.models.MODELS` name or a builder ``f(input_shape, num_classes)``.
      preprocessing: ``'lgs'``, ``'watermark'`` (built with their gin bindings) or an
        `InputTransform` layer (gin: ``@local_gradient_smoothing()``).

    Raises:
      ValueError: an unknown base or transform (before any weight is built).
    """
    transform = _transform(preprocessing)
    if callable(base):
        classifier = base(input_shape=input_shape, num_classes=num_classes)
    elif isinstance(base, str) and base in models.MODELS:
        classifier = models.build_model(base, input_shape, num_classes)
    else:
        raise ValueError(f"base must be one of {sorted(models.MODELS)} or a model builder "
                         f"f(input_shape, num_classes); got {base!r}.")
    return PreprocessedClassifier(classifier, transform)
