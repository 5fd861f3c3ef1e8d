"""De-randomized (column) smoothing: a deterministic certificate against m x m patches.

Levine & Feizi, "(De)Randomized Smoothing for Certifiable Defense against Patch Attacks",
NeurIPS 2020 (official code: alevine0/patchSmoothing, ``utils_band.py``,
``certify_{mnist,cifar}_band.py``, ``train_{mnist,cifar}_band.py``).

Band ablation. For an H x W x C image x and a band start s in {0, ..., W - 1}, the ablated image
keeps the b columns s, s + 1, ..., s + b - 1 (mod W: a band that runs past the right edge wraps
around to the first columns, as the official ``utils_band.py``) and ablates every other pixel.
Each pixel is encoded by 2C channels,

    kept pixel:     (x_1, ..., x_C, 1 - x_1, ..., 1 - x_C)
    ablated pixel:  (0, ..., 0)

so that an ablated pixel is distinguishable from any real colour (`ablate_band`; the official
code concatenates the x channels and then the 1 - x channels). The base classifier f maps these
H x W x 2C encodings to logits.

The smoothed classifier evaluates f on all W bands and counts votes (`DerandomizedSmoothing`):

    n_c(x) = sum_{s=0}^{W-1} 1[ softmax(f(ablate(x, s)))_c >= theta ],
    g(x)   = argmax_c n_c(x)            (ties: the smaller class index).

A patch of m x m pixels covers m consecutive columns, and a band intersects it only if one of its
b columns is one of those m: at most Delta = m + b - 1 bands see the patch (``patch_delta``;
at most W). Each of them can remove one vote from the top class c and add one to any other class
c', so the margin n_c - n_c' shrinks by at most 2 Delta, and g is certified for every patch when

    n_c > n_c' + 2 Delta,   or   n_c = n_c' + 2 Delta and c < c'

with c' the runner-up (the largest count among the other classes, ties to the smaller index)
(`certificate`). Symbols -> arguments: b = ``band_width``, theta = ``threshold``, m =
``patch_size``, Delta = ``patch_delta(m, b, W)``.

Where the official code is followed rather than a prose summary of the method:

- Voting: the official ``predict_and_certify`` adds a vote for EVERY class whose softmax score is
  >= theta, not only for the argmax; with theta < 0.5 a band can vote for several classes, with
  theta > 0.5 it votes for its argmax or abstains. The certificate above holds for both (a band
  changes the margin of any two classes by at most 2). Default theta = 0.2 (certify scripts).
- Tie rule: certified iff ``top - second > 2 Delta`` or ``top - second == 2 Delta`` and the top
  class has the smaller index (the code sorts counts with a stable sort).
- Band width: the code's default for MNIST and CIFAR-10 is b = 4.
- Delta: the code uses m + b - 1 without the cap at W; the cap only matters when m + b - 1 >= W,
  where no margin (at most W) can exceed 2 Delta either way.

Report schema. `certify_bands` and `certified_band_accuracy` return::

    {'method': 'derandomized',
     'clean_accuracy': float,                 # accuracy of the smoothed classifier g
     'certified_accuracy': {m: float},        # correct AND certified, per patch size m
     'num_examples': int,
     'seconds': float,
     'band_width': b, 'threshold': theta, 'num_bands': W,
     'records': [                             # one per example, in order
         {'label': int, 'prediction': int, 'correct': bool,
          'top_count': int, 'second_count': int, 'runner_up': int,
          'certified': {m: bool}}, ...]}      # certificate holds (whatever the label)
"""

import time

import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks.patch import check_patch_size
from tfadv.checks import check_number
from tfadv.data import validate_arrays

DEFAULT_THRESHOLD = 0.2  # official certify_{mnist,cifar}_band.py --threshhold


def check_band_width(band_width, width=None):
    """Returns ``band_width`` as an int; raises a one-line ValueError unless it is an integer
    b >= 1 (and b <= ``width``, the image width W, when given)."""
    check_number("band_width", band_width, 1, strict=False, integer=True,
                 high=None if width is None else int(width))
    return int(band_width)


def check_threshold(threshold):
    """Returns ``threshold`` as a float; raises a one-line ValueError unless it is a number in
    [0, 1] (a softmax score)."""
    check_number("threshold", threshold, 0, strict=False, high=1)
    return float(threshold)


def band_mask(width, start, band_width):
    """float32 (..., W) 0/1 mask of the columns kept by the band(s) starting at ``start`` (an int
    or an int tensor of any shape): column j is kept iff (j - start) mod W < ``band_width``."""
    start = tf.cast(tf.convert_to_tensor(start), tf.int32)
    columns = tf.range(width, dtype=tf.int32)
    offset = tf.math.floormod(columns - start[..., None], width)
    return tf.cast(offset < band_width, tf.float32)


def ablate_band(x, start, band_width):
    """The band-ablated encoding of images ``x`` (B, H, W, C) in [0, 1]: (B, H, W, 2C) with
    (x, 1 - x) on the ``band_width`` columns starting at ``start`` (wrapping around the right
    edge) and 0 on every other pixel (module docstring).

    Args:
      x: images, (B, H, W, C), float.
      start: band start column(s): an int (one band for the whole batch) or an int tensor of
        shape (B,) (one band per image), in [0, W).
      band_width: b, the number of kept columns, 1 <= b <= W.
    """
    x = tf.convert_to_tensor(x)
    width = x.shape[2]
    if width is not None:
        check_band_width(band_width, width)
    else:
        width = tf.shape(x)[2]
    mask = band_mask(width, start, band_width)  # (W,) or (B, W)
    mask = tf.cast(mask, x.dtype)
    mask = mask[None, None, :, None] if mask.shape.rank == 1 else mask[:, None, :, None]
    return tf.concat([x * mask, (1.0 - x) * mask], axis=-1)


def all_bands(x, band_width):
    """The encodings of ``x`` (B, H, W, C) under every band start 0..W-1, band-major:
    (W * B, H, W, 2C), rows [s * B, (s + 1) * B) being band s."""
    x = tf.convert_to_tensor(x)
    width = int(x.shape[2])
    check_band_width(band_width, width)
    masks = band_mask(width, tf.range(width), band_width)  # (W bands, W columns)
    masks = tf.cast(masks, x.dtype)[:, None, None, :, None]  # (W, 1, 1, W, 1)
    encoded = tf.concat([x[None] * masks, (1.0 - x[None]) * masks], axis=-1)
    return tf.reshape(encoded, [-1, *x.shape[1:3], 2 * x.shape[3]])


def patch_delta(patch_size, band_width, width):
    """Delta = min(m + b - 1, W): the number of band starts whose b columns (mod W) meet an m x m
    patch's m consecutive columns."""
    return int(min(int(patch_size) + int(band_width) - 1, int(width)))


def certificate(counts, delta):
    """The prediction and the certificate from vote counts (closed form, NumPy).

    Args:
      counts: (N, K) integer vote counts n_c.
      delta: Delta, the number of bands a patch can reach (`patch_delta`); an int or an (N,)
        array.

    Returns:
      dict of (N,) arrays: ``prediction`` (argmax, ties to the smaller index), ``top_count``,
      ``runner_up`` (the largest count among the other classes, ties to the smaller index),
      ``second_count`` and ``certified``: ``top - second > 2 Delta``, or ``== 2 Delta`` with
      ``prediction < runner_up`` (official tie rule, module docstring).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise ValueError(f"counts must have shape (N, K) with K >= 2; got {counts.shape}.")
    rows = np.arange(counts.shape[0])
    prediction = np.argmax(counts, axis=1)  # first maximum: the smaller index
    others = counts.astype(np.int64).copy()
    others[rows, prediction] = np.iinfo(np.int64).min
    runner_up = np.argmax(others, axis=1)
    top = counts[rows, prediction].astype(np.int64)
    second = counts[rows, runner_up].astype(np.int64)
    margin = top - second
    bound = 2 * np.asarray(delta, dtype=np.int64)
    certified = (margin > bound) | ((margin == bound) & (prediction < runner_up))
    return {"prediction": prediction, "top_count": top, "runner_up": runner_up,
            "second_count": second, "certified": certified}


@keras.saving.register_keras_serializable(package="tfadv")
class DerandomizedSmoothing(keras.Model):
    """The de-randomized column-smoothed classifier g of a base classifier f (module docstring).

    ``call(x)`` returns the vote counts n_c(x) of every class as float32 (B, K) "logits": their
    argmax (ties to the smaller index, as ``tf.argmax``) is g's prediction. Deterministic, one
    batched pass of f over all W bands (W * B images), exportable; not differentiable (counts are
    piecewise constant), hence ``non_differentiable = True`` and `bpda_approximation` for
    `tfadv.attacks.bpda` (use it through `smoothed_classifier`, a functional model whose top-level
    layer this is).

    Example (runs as is)::

        import numpy as np, tfadv.models
        from tfadv.certify.derandomized import DerandomizedSmoothing, certify_bands
        f = tfadv.models.digits_cnn(input_shape=(8, 8, 2), num_classes=10)  # 2C channels
        g = DerandomizedSmoothing(f, band_width=2, threshold=0.2)
        x = np.random.rand(4, 8, 8, 1).astype("float32")
        counts = g(x)                            # (4, 10) vote counts, each row sums to <= 8 * 10
        report = certify_bands(g, x, np.arange(4), patch_sizes=[1, 2])

    Args:
      classifier: the base classifier f, a Keras model from (B, H, W, 2C) band encodings to logits.
      band_width: b, the number of kept columns per band (official default 4).
      threshold: theta in [0, 1]: a band votes for every class with softmax score >= theta
        (official default 0.2).
    """

    non_differentiable = True

    def __init__(self, classifier, band_width, threshold=DEFAULT_THRESHOLD, **kwargs):
        if not isinstance(classifier, keras.Model):
            raise TypeError(f"classifier must be a keras.Model; got {type(classifier).__name__}.")
        inp = getattr(classifier, "input_shape", None)
        width = inp[2] if isinstance(inp, tuple) and len(inp) == 4 else None
        band_width = check_band_width(band_width, width)
        threshold = check_threshold(threshold)
        if isinstance(inp, tuple) and len(inp) == 4 and inp[3] is not None and inp[3] % 2:
            raise ValueError(f"classifier must take 2C channels (x and 1 - x per channel); its "
                             f"input has {inp[3]} channels.")
        kwargs.setdefault("name", "derandomized_smoothing")
        super().__init__(**kwargs)
        self.classifier = classifier
        self.band_width = band_width
        self.threshold = threshold

    def _check_input(self, x):
        inp = getattr(self.classifier, "input_shape", None)
        if isinstance(inp, tuple) and len(inp) == 4:
            want = (inp[1], inp[2], None if inp[3] is None else inp[3] // 2)
            got = tuple(x.shape[1:])
            if any(w is not None and g is not None and w != g for w, g in zip(want, got)):
                raise ValueError(f"images must have shape (H, W, C) = {want} for a classifier "
                                 f"of input {inp[1:]} (2C channels); got {got}.")
        check_band_width(self.band_width, x.shape[2])

    def band_probabilities(self, x, training=False):
        """float32 (W, B, K): the base classifier's softmax on each band s of each image."""
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        self._check_input(x)
        logits = self.classifier(all_bands(x, self.band_width), training=training)
        logits = tf.cast(logits, tf.float32)
        return tf.reshape(tf.nn.softmax(logits), [x.shape[2], -1, logits.shape[-1]])

    def call(self, inputs, training=False):
        """Vote counts n_c(x), float32 (B, K) (module docstring)."""
        votes = self.band_probabilities(inputs, training=training) >= self.threshold
        return tf.reduce_sum(tf.cast(votes, tf.float32), axis=0)

    def bpda_approximation(self, x):
        """A differentiable stand-in for the counts (BPDA's backward pass): the log of the mean
        over the W bands of the base classifier's softmax, (B, K) logits."""
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        self._check_input(x)
        logits = tf.cast(self.classifier(all_bands(x, self.band_width), training=False),
                         tf.float32)
        log_probs = tf.reshape(tf.nn.log_softmax(logits), [x.shape[2], -1, logits.shape[-1]])
        return tf.reduce_logsumexp(log_probs, axis=0) - tf.math.log(float(x.shape[2]))

    def compute_output_shape(self, input_shape):
        """(batch, K): one count per class of the base classifier."""
        return (input_shape[0], self.classifier.output_shape[-1])

    def get_config(self):
        """The classifier (serialized), ``band_width`` and ``threshold``."""
        return {"name": self.name, "trainable": self.trainable,
                "classifier": keras.saving.serialize_keras_object(self.classifier),
                "band_width": self.band_width, "threshold": self.threshold}

    @classmethod
    def from_config(cls, config):
        """Rebuilds the smoothed classifier from `get_config`'s dict."""
        config = dict(config)
        classifier = keras.saving.deserialize_keras_object(config.pop("classifier"))
        return cls(classifier, **config)


def smoothed_classifier(classifier, band_width, threshold=DEFAULT_THRESHOLD, input_shape=None,
                        name=None):
    """A functional `keras.Model` from (B, H, W, C) images in [0, 1] to the vote counts of
    `DerandomizedSmoothing` (its one top-level layer, so `tfadv.attacks.bpda` finds it).

    ``input_shape`` (H, W, C) defaults to the classifier's (H, W, 2C) halved in channels."""
    smoothing = DerandomizedSmoothing(classifier, band_width, threshold)
    if input_shape is None:
        inp = classifier.input_shape
        input_shape = (inp[1], inp[2], inp[3] // 2)
    inputs = keras.Input(tuple(input_shape), name="images")
    outputs = smoothing(inputs)
    return keras.Model(inputs, outputs, name=name or f"derandomized_{classifier.name}")


def find_smoothing(model):
    """The `DerandomizedSmoothing` of ``model`` (the model itself or a layer inside it), or
    ``None``."""
    if isinstance(model, DerandomizedSmoothing):
        return model
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, DerandomizedSmoothing):
            return layer
    return None


def _resolve(model, band_width, threshold):
    """The `DerandomizedSmoothing` to certify: the one inside ``model``, or a new one around the
    base classifier ``model`` (then ``band_width`` is required)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model; got {type(model).__name__}.")
    smoothing = find_smoothing(model)
    if smoothing is None:
        if band_width is None:
            raise ValueError("band_width is required when model is a base classifier (of 2C "
                             "input channels) rather than a DerandomizedSmoothing model.")
        return DerandomizedSmoothing(model, band_width,
                                     DEFAULT_THRESHOLD if threshold is None else threshold)
    for name, given, own in (("band_width", band_width, smoothing.band_width),
                             ("threshold", threshold, smoothing.threshold)):
        if given is not None and given != own:
            raise ValueError(f"{name}={given!r} differs from the model's own {name}={own!r}; "
                             f"pass None to use the model's.")
    return smoothing


def _patch_sizes(patch_sizes, image_shape):
    sizes = [patch_sizes] if isinstance(patch_sizes, (int, np.integer)) else list(patch_sizes)
    if not sizes:
        raise ValueError("patch_sizes must name at least one patch size m >= 1.")
    return [check_patch_size(m, image_shape, name="patch_sizes") for m in sizes]


def certify_bands(model, x, y, patch_sizes, band_width=None, threshold=None, max_batch=4096):
    """Clean and certified accuracy of the column-smoothed classifier on arrays (x, y).

    Args:
      model: a model holding a `DerandomizedSmoothing` (e.g. `smoothed_classifier`, or a
        ``model.keras`` trained with `tfadv.defenses.BandAblationTraining`), whose band width and
        threshold are used; or a base classifier of 2C input channels, smoothed here with
        ``band_width`` and ``threshold``.
      x: images (N, H, W, C) in [0, 1].
      y: integer labels (N,).
      patch_sizes: an int m or a list of them (m x m patches), each 1 <= m <= min(H, W).
      band_width: b (needed for a base classifier; else None or the model's own).
      threshold: theta (default 0.2 for a base classifier; else None or the model's own).
      max_batch: the most band images given to the base classifier in one call (a multiple of
        W is best; at least one image's W bands are always evaluated together).

    Returns:
      the report dict of the module docstring.
    """
    start_time = time.perf_counter()
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    validate_arrays(x, y)
    check_number("max_batch", max_batch, 1, strict=False, integer=True)
    sizes = _patch_sizes(patch_sizes, x.shape[1:])
    smoothing = _resolve(model, band_width, threshold)
    validate_arrays(x, y, num_classes=smoothing.classifier.output_shape[-1])
    width = x.shape[2]
    check_band_width(smoothing.band_width, width)
    per_call = max(1, int(max_batch) // width)
    counts_fn = tf.function(lambda images: smoothing(images, training=False),
                            reduce_retracing=True)
    counts = [np.asarray(counts_fn(tf.constant(x[i:i + per_call])))
              for i in range(0, len(x), per_call)]
    num_classes = smoothing.classifier.output_shape[-1]
    counts = (np.concatenate(counts) if counts else np.zeros((0, num_classes))).round()
    counts = counts.astype(np.int64)
    base = certificate(counts, 0) if len(x) else None
    correct = (base["prediction"] == y) if len(x) else np.zeros(0, bool)
    certified = {m: certificate(counts, patch_delta(m, smoothing.band_width, width))["certified"]
                 if len(x) else np.zeros(0, bool) for m in sizes}
    n = len(x)
    records = [{"label": int(y[i]), "prediction": int(base["prediction"][i]),
                "correct": bool(correct[i]), "top_count": int(base["top_count"][i]),
                "second_count": int(base["second_count"][i]),
                "runner_up": int(base["runner_up"][i]),
                "certified": {m: bool(certified[m][i]) for m in sizes}} for i in range(n)]
    return {
        "method": "derandomized",
        "clean_accuracy": float(correct.mean()) if n else float("nan"),
        "certified_accuracy": {m: float((certified[m] & correct).mean()) if n else float("nan")
                               for m in sizes},
        "num_examples": n,
        "seconds": round(time.perf_counter() - start_time, 3),
        "band_width": smoothing.band_width,
        "threshold": smoothing.threshold,
        "num_bands": int(width),
        "records": records,
    }


def _arrays(data, max_examples):
    """(x, y) NumPy arrays from a pair of arrays or from batches of (x, y)."""
    if (isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape")
            and len(np.shape(data[0])) == 4):
        x, y = np.asarray(data[0]), np.asarray(data[1])
        return (x, y) if max_examples is None else (x[:max_examples], y[:max_examples])
    xs, ys, n = [], [], 0
    for batch in data:
        bx, by = batch[0], batch[1]
        xs.append(np.asarray(bx))
        ys.append(np.asarray(by))
        n += len(xs[-1])
        if max_examples is not None and n >= max_examples:
            break
    if not xs:
        raise ValueError("the dataset to certify is empty.")
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x, y) if max_examples is None else (x[:max_examples], y[:max_examples])


def certified_band_accuracy(model, data, patch_sizes, band_width=None, threshold=None,
                            max_examples=None, max_batch=4096):
    """`certify_bands` on a dataset: ``data`` is a pair of arrays (x, y) or batches of (x, y) (a
    `tf.data` dataset, a list of pairs); the first ``max_examples`` examples (all if None).
    Returns the report dict of the module docstring."""
    if max_examples is not None:
        check_number("max_examples", max_examples, 1, strict=False, integer=True)
    x, y = _arrays(data, max_examples)
    return certify_bands(model, x, y, patch_sizes, band_width=band_width, threshold=threshold,
                         max_batch=max_batch)
