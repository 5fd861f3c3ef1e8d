"""Band-ablation training: the base classifier of de-randomized (column) smoothing.

Levine & Feizi, "(De)Randomized Smoothing for Certifiable Defense against Patch Attacks",
NeurIPS 2020 (official code: alevine0/patchSmoothing, ``train_mnist_band.py``,
``train_cifar_band.py``, ``utils_band.py``). The smoothed classifier g counts the votes of a base
classifier f over every band of b columns of the image (`tfadv.certify.derandomized`); f is
trained on single random bands:

    loss = (1/B) sum_i CE( f(ablate(x_i, s_i)), y_i ),    s_i ~ U{0, ..., W - 1},

with ablate the (x, 1 - x) / (0, 0) band encoding of `tfadv.certify.derandomized.ablate_band`
(b = ``band_width``, wrapping around the right edge). As in the official code
(``random_mask_batch_one_sample(..., reuse_noise=True)``) one band start is drawn per BATCH and
shared by its images; ``per_example=True`` draws one per image instead (tfadv's option). There is
no clean term and no attack; the optimiser is the code's SGD (momentum 0.9, weight decay 5e-4),
set in the gin files.

The model `tfadv.train` builds (`band_ablation_model`) is the smoothed classifier g itself: a
functional model from (H, W, C) images to vote counts around a `DerandomizedSmoothing` that holds
f (2C input channels). So ``model.keras`` is g (deterministic, exportable; f is
``model.layers[1].classifier``), the final report's clean accuracy is g's, and
`BandAblationTraining.certified_report` adds the certified accuracy against m x m patches.

Band seeding (as `tfadv.defenses.gaussian.add_training_noise`): the starts of training step t on
replica r are drawn with ``tf.random.stateless_uniform(seed=[seed, t * R + r])`` (R replicas),
so a run is reproducible, resumes with the same bands and replicas draw independently.
"""

import gin
import keras
import tensorflow as tf

from tfadv import models
from tfadv.attacks import cross_entropy
from tfadv.attacks.patch import check_patch_size
from tfadv.certify import derandomized
from tfadv.checks import check_number
from tfadv.defenses.base import Defense, replica_mean
from tfadv.defenses.gaussian import check_noise_seed


def sample_band_starts(batch_size, width, seed, per_example=False):
    """int32 (batch_size,) band starts, uniform on {0, ..., width - 1}, drawn statelessly from
    ``seed`` (shape [2]); with ``per_example=False`` (official) one start repeated for the batch."""
    seed = tf.cast(seed, tf.int64)
    if per_example:
        return tf.random.stateless_uniform([batch_size], seed=seed, minval=0, maxval=width,
                                           dtype=tf.int32)
    start = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=width, dtype=tf.int32)
    return tf.fill([batch_size], start)


@gin.configurable
def levine_mnist_cnn(input_shape=(28, 28, 2), num_classes=10, weight_decay=0.0):
    """The official MNIST base classifier of band smoothing (``train_mnist_band.py``): conv
    4x4x64 stride 2, conv 4x4x128 stride 2 (padding 1, i.e. ``same`` on even sizes), fc 500,
    fc 100, fc ``num_classes`` (ReLU). Arguments and output as `tfadv.models.digits_cnn` (no
    input normalisation: the official code uses none)."""
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels); got {input_shape}.")
    check_number("num_classes", num_classes, 2, strict=False, integer=True)
    check_number("weight_decay", weight_decay, 0, strict=False)
    reg = keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None
    layers = keras.layers
    inputs = keras.Input(input_shape, name="images")
    x = layers.Conv2D(64, 4, strides=2, padding="same", activation="relu",
                      kernel_regularizer=reg)(inputs)
    x = layers.Conv2D(128, 4, strides=2, padding="same", activation="relu",
                      kernel_regularizer=reg)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(500, activation="relu", kernel_regularizer=reg)(x)
    x = layers.Dense(100, activation="relu", kernel_regularizer=reg)(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits",
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name="levine_mnist_cnn")


@gin.configurable
def band_ablation_model(input_shape, num_classes, base="madry_mnist_cnn", band_width=4,
                        threshold=derandomized.DEFAULT_THRESHOLD):
    """The smoothed classifier g for `tfadv.train` (gin: ``train.model = @band_ablation_model``).

    Builds the base classifier f with ``base`` (a `tfadv.models.MODELS` name or a builder
    ``f(input_shape, num_classes)``; its other arguments from its own gin bindings) for 2C input
    channels, and returns `tfadv.certify.derandomized.smoothed_classifier` of it: a functional
    model from (B, H, W, C) images in [0, 1] to (B, K) vote counts.

    Args:
      input_shape: (H, W, C) of the images.
      num_classes: K.
      base: the base classifier's builder (official: `levine_mnist_cnn` for MNIST, ResNet-18
        for CIFAR-10, both on 2C channels).
      band_width: b, kept columns per band (official default 4), 1 <= b <= W.
      threshold: theta, the softmax score a class needs for a band's vote (official 0.2).
    """
    height, width, channels = (int(d) for d in input_shape)
    derandomized.check_band_width(band_width, width)
    derandomized.check_threshold(threshold)
    builders = {**models.MODELS, "levine_mnist_cnn": levine_mnist_cnn}
    if isinstance(base, str):
        if base not in builders:
            raise ValueError(f"base must be one of {sorted(builders)} or a builder; got "
                             f"{base!r}.")
        base = builders[base]
    elif not callable(base):
        raise ValueError(f"base must be a model name or a builder; got {base!r}.")
    classifier = base(input_shape=(height, width, 2 * channels), num_classes=num_classes)
    return derandomized.smoothed_classifier(classifier, band_width, threshold,
                                            input_shape=(height, width, channels))


@gin.configurable(denylist=["base_model"])
class BandAblationTraining(Defense):
    """Trains the base classifier of de-randomized column smoothing (Levine & Feizi 2020) on
    random single bands (module docstring):

        min  E_s[ CE( f(ablate(x, s)), y ) ],    s ~ U{0, ..., W - 1}.

    Example (runs as is)::

        import keras, numpy as np, tfadv.models
        from tfadv.certify.derandomized import smoothed_classifier, certify_bands
        from tfadv.defenses.band_ablation import BandAblationTraining
        f = tfadv.models.digits_cnn(input_shape=(8, 8, 2), num_classes=10)
        model = BandAblationTraining(smoothed_classifier(f, band_width=2))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.rand(64, 8, 8, 1).astype("float32"); y = np.arange(64) % 10
        model.fit(x, y, batch_size=32, epochs=1)
        report = certify_bands(model.base_model, x, y, patch_sizes=[1, 2])

    Args:
      base_model: the smoothed classifier g (`band_ablation_model`,
        `tfadv.certify.derandomized.smoothed_classifier`): a model from (H, W, C) images to vote
        counts holding a `DerandomizedSmoothing`, whose base classifier is trained and whose
        band width and threshold are used.
      per_example: draw a band start per image (tfadv) instead of one per batch (official).
      validate_smoothed: validation ``accuracy`` is the smoothed classifier's (W base calls per
        image); else only ``band_accuracy`` (the base on one random band per image, as the
        official ``test_nominal``, but with a band per image) is validated.
      certify_patch_sizes: the patch sizes m whose certified accuracy `certified_report` adds to
        the final report (official: 5 for MNIST and CIFAR-10).
      seed: seed of the band draws; ``None`` draws one from NumPy's global generator (which
        `tfadv.train` seeds with ``train.seed``).
      **kwargs: passed to `Defense` (e.g. ``margin``).

    Logged metrics: ``adv_accuracy`` is the training accuracy on the ablated inputs the loss
    sees; validation ``band_accuracy`` is the base classifier's accuracy on one random band per
    image and ``accuracy`` the smoothed classifier's clean accuracy.
    """

    supports_awp = False  # AWP perturbs the weights against an adversarial objective

    def __init__(self, base_model, per_example=False, validate_smoothed=True,
                 certify_patch_sizes=(5,), seed=None, **kwargs):
        if not isinstance(base_model, keras.Model):
            raise TypeError(f"base_model must be a keras.Model; got {type(base_model).__name__}.")
        smoothing = derandomized.find_smoothing(base_model)
        if smoothing is None or smoothing is base_model:
            raise ValueError(
                "base_model must be a smoothed classifier holding a DerandomizedSmoothing layer "
                "(tfadv.defenses.band_ablation.band_ablation_model, or "
                "tfadv.certify.derandomized.smoothed_classifier(f, band_width)).")
        sizes = ([certify_patch_sizes] if isinstance(certify_patch_sizes, int)
                 else list(certify_patch_sizes))
        width = base_model.input_shape[2]
        for m in sizes:
            check_patch_size(m, base_model.input_shape[1:], name="certify_patch_sizes")
        seed = check_noise_seed(seed)
        for kind in ("trainable_variables", "non_trainable_variables"):
            if ([id(v) for v in getattr(base_model, kind)]
                    != [id(v) for v in getattr(smoothing.classifier, kind)]):
                raise ValueError("base_model must hold no weights besides its smoothing's base "
                                 "classifier (the smoothed classifier g of f, nothing more).")
        super().__init__(base_model, attack=None, eval_attack=None, **kwargs)
        self.smoothing = smoothing
        self.classifier = smoothing.classifier
        self.band_width = derandomized.check_band_width(smoothing.band_width, width)
        self.per_example = bool(per_example)
        self.validate_smoothed = bool(validate_smoothed)
        self.certify_patch_sizes = [int(m) for m in sizes]
        self.seed = seed
        self.band_accuracy = keras.metrics.SparseCategoricalAccuracy(name="band_accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.adv_accuracy, self.clean_accuracy, self.band_accuracy]

    def ablate(self, x, seed, per_example=None):
        """The band encodings of ``x`` under starts drawn from ``seed`` (`sample_band_starts`;
        one per image if ``per_example``, default the defense's ``per_example``)."""
        x = tf.cast(x, tf.float32)
        per_example = self.per_example if per_example is None else per_example
        starts = sample_band_starts(tf.shape(x)[0], x.shape[2], seed, per_example)
        return derandomized.ablate_band(x, starts, self.band_width)

    def band_seed(self):
        """``[seed, t * R + r]`` (int64): the stateless seed of the training bands of step t on
        replica r of R (the step part of `Defense.step_seed`; module docstring)."""
        step = tf.cast(self.step_seed()[1], tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64), step])

    def prepare(self, x, y):
        """The training band encodings of ``x``: starts drawn from `band_seed`."""
        return self.ablate(x, self.band_seed())

    def objective(self, state, x, y, sample_weight, batch):
        """Cross-entropy of the base classifier f on the band encodings ``batch``. ``state``
        holds the weights of the smoothed model g, which are f's (checked in ``__init__``), so f
        runs at them directly and its BatchNorm statistics flow back into ``state``."""
        logits, state.non_trainable = self.classifier.stateless_call(
            state.trainable, state.non_trainable, batch, training=True)
        return replica_mean(self.classification_loss(y, logits), sample_weight), {"adv": logits}

    def _test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # One band per image: every validation batch is drawn at the same training step.
        logits = self.classifier(self.ablate(x, self.step_seed(salt=1), per_example=True),
                                 training=False)
        loss = (replica_mean(cross_entropy(y, logits), sample_weight)
                + self.regularization_loss())
        self.track_loss(loss, x)
        self.band_accuracy.update_state(y, logits, sample_weight=sample_weight)
        results = {"loss": self.loss_tracker.result(),
                   "band_accuracy": self.band_accuracy.result()}
        if self.validate_smoothed:
            self.clean_accuracy.update_state(y, self.base_model(x, training=False),
                                             sample_weight=sample_weight)
            results["accuracy"] = self.clean_accuracy.result()
        return results

    def certified_report(self, base_model, dataset):
        """``{'patch_certificate': ...}``: the report of
        `tfadv.certify.derandomized.certified_band_accuracy` (without per-example records) for
        ``certify_patch_sizes`` on ``dataset``, merged into ``report.json`` by `tfadv.train`."""
        report = derandomized.certified_band_accuracy(base_model, dataset,
                                                      self.certify_patch_sizes)
        report.pop("records")
        report["certified_accuracy"] = {str(m): a
                                        for m, a in report["certified_accuracy"].items()}
        return {"patch_certificate": report}
