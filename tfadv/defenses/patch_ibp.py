"""Certified training against m x m patches by interval bound propagation.

Chiang, Ni, Abdelkader, Zhu, Studer, Goldstein, "Certified Defenses for Adversarial Patches",
ICLR 2020 (official code: Ping-C/certifiedpatchdefense, ``train.py``; attack types
``patch-all`` and ``patch-random``, bound type ``patch-interval``).

The loss is Gowal et al.'s IBP loss (`tfadv.defenses.IntervalBoundPropagation`, whose schedule
this class reuses) with the L-inf box replaced by the patch boxes of a set S of locations
(`tfadv.certify.patch`):

    L = kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(max_{l in S} zhat_l(x, eps_t), y)

where zhat_l is the vector of IBP upper bounds on z_j - z_y (0 at j = y) over the box of
location l with the patch pixels in [clip(x - eps_t), clip(x + eps_t)], and the max is
elementwise per class j (official: the minimum over locations of each margin's lower bound).
S is every location (``num_locations=None``, the paper's "all patch" training, its MNIST
models) or ``num_locations`` locations drawn uniformly per example and step ("random patch";
CIFAR-10 used 20), from every location including the last row and column.

Schedule (`IntervalBoundPropagation.schedule`, at optimizer step t): ``warmup_steps`` with
kappa = 1 (nominal training), then eps_t rises linearly from 0 to ``eps`` over
``rampup_steps`` while kappa goes from ``kappa_start`` to ``kappa_end``. The official code (per
batch, linearly within each epoch) keeps eps = 0 for ``schedule_start`` = 1 epoch, ramps it to
``epsilon`` = 1 (the whole [0, 1] pixel range) over the next 60 epochs, and its MNIST/CIFAR
configs use ``method: robust``, the verified loss alone: kappa_start = kappa_end = 0 (at eps = 0
the verified loss equals the nominal one, so the official first epoch is the warm-up here).
Its ``robust_natural`` method is kappa 1 -> ``final-kappa`` along the ramp: kappa_start = 1.

Deviations from the official code: random locations are drawn without replacement (official:
with); validation reports the certificate at the full [0, 1] patch box on the validation split
(``val_verified_accuracy``, the metric to select a checkpoint on); the official code selected
its best epoch by the error on the test set (at the ramped eps).
"""

import gin
import keras
import tensorflow as tf
from keras import layers

from tfadv.attacks.patch import check_patch_size
from tfadv.certify import ibp
from tfadv.certify import patch as patch_certificate
from tfadv.checks import check_number
from tfadv.defenses.ibp import IntervalBoundPropagation
from tfadv.models import _check_io, _normalize


@gin.configurable(denylist=["base_model"])
class CertifiedPatchTraining(IntervalBoundPropagation):
    """IBP training against m x m patches (Chiang et al. 2020; module docstring): minimises

        E[ kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(max_{l in S} zhat_l(x, eps_t), y) ]

    with S all locations or ``num_locations`` random ones per example, and the IBP schedule of
    `IntervalBoundPropagation` (warm-up, then eps_t 0 -> ``eps`` and kappa ``kappa_start`` ->
    ``kappa_end``). Validation (and `evaluate`) reports ``verified_accuracy``: the fraction of
    the batch certified against every ``patch_size`` patch at every location.

    Example (runs as is)::

        import keras, numpy as np, tfadv.defenses
        from tfadv.certify import patch
        from tfadv.defenses.patch_ibp import chiang_mlp
        base = chiang_mlp(input_shape=(8, 8, 1), num_classes=10, hidden=(64,))
        model = tfadv.defenses.CertifiedPatchTraining(
            base, patch_size=2, num_locations=4, warmup_steps=2, rampup_steps=10)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.rand(64, 8, 8, 1).astype("float32"); y = np.arange(64) % 10
        model.fit(x, y, batch_size=32, epochs=2)
        model.evaluate(x, y, return_dict=True)   # accuracy, verified_accuracy
        patch.certified_patch_accuracy(base, (x, y), patch_sizes=[1, 2])

    Args:
      base_model: classifier from images in [0, 1] to logits, built from
        `tfadv.certify.ibp.SUPPORTED_LAYERS` (checked here).
      patch_size: m, the side of the square patch trained and validated against (integer >= 1,
        at most the image side).
      num_locations: locations per example and step (integer >= 1), or None for all of them
        (official MNIST: all; CIFAR-10: 20 random).
      eps: the radius of the patch pixels' interval after the ramp (official 1: all of [0, 1]).
      warmup_steps, rampup_steps, kappa_start, kappa_end: the schedule of
        `IntervalBoundPropagation` (official ``method: robust``: kappa 0 -> 0).
      eval_patch_sizes: patch sizes of `certified_report` (default ``[patch_size]``).
      eval_attack: attack behind ``robust_accuracy`` in validation (default none: the
        certificate is the validation metric; e.g. a `tfadv.attacks.patch.PatchPGD`).
      max_batch: the most boxes per network call when certifying (validation, report).
      clip_min, clip_max: the image box.
    """

    def __init__(self, base_model, patch_size=2, num_locations=None, eps=1.0, warmup_steps=0,
                 rampup_steps=0, kappa_start=0.0, kappa_end=0.0, eval_patch_sizes=None,
                 eval_attack=None, max_batch=4096, clip_min=0.0, clip_max=1.0, **kwargs):
        check_number("patch_size", patch_size, 1, strict=False, integer=True)
        if num_locations is not None:
            check_number("num_locations", num_locations, 1, strict=False, integer=True)
        check_number("max_batch", max_batch, 1, strict=False, integer=True)
        # eval_eps = 0: the parent's L-inf certificate and PGD are not used for patches.
        super().__init__(base_model, eps=eps, warmup_steps=warmup_steps,
                         rampup_steps=rampup_steps, kappa_start=kappa_start,
                         kappa_end=kappa_end, eval_eps=0.0, eval_attack=eval_attack,
                         clip_min=clip_min, clip_max=clip_max, **kwargs)
        self.patch_size = int(patch_size)
        self.num_locations = None if num_locations is None else int(num_locations)
        self.eval_patch_sizes = [self.patch_size] if eval_patch_sizes is None else list(
            eval_patch_sizes)
        self.max_batch = int(max_batch)
        self._masks = None
        shape = getattr(base_model, "input_shape", None)
        if isinstance(shape, tuple) and len(shape) == 4 and None not in shape[1:3]:
            self._check_sizes(shape[1:])

    def _check_sizes(self, image_shape):
        check_patch_size(self.patch_size, image_shape)
        for m in self.eval_patch_sizes:
            check_patch_size(m, image_shape, name="eval_patch_sizes")

    def masks(self):
        """float32 (L, H, W, 1): every ``patch_size`` location of the base model's images."""
        if self._masks is None:
            image_shape = tuple(self.base_model.input_shape[1:])
            self._check_sizes(image_shape)
            with tf.init_scope():  # eager: a constant any later graph may capture
                self._masks = patch_certificate.all_patch_masks(image_shape, self.patch_size)
        return self._masks

    def training_masks(self, batch):
        """The locations S of this step: all masks (L, H, W, 1), or (B, k, H, W, 1) with k =
        ``num_locations`` distinct locations per example drawn uniformly (stateless, from
        `step_seed`)."""
        masks = self.masks()
        total = int(masks.shape[0])
        if self.num_locations is None or self.num_locations >= total:
            return masks
        keys = tf.random.stateless_uniform([batch, total], self.step_seed(salt=2))
        chosen = tf.math.top_k(keys, self.num_locations).indices  # distinct, uniform
        return tf.gather(masks, chosen)

    def worst_case_logits(self, state, x, y, eps):
        """max over the step's locations of the IBP upper bounds on z_j - z_y, the patch pixels
        in [clip(x - eps), clip(x + eps)], at the weights of ``state`` (module docstring)."""
        values = {id(v): t for v, t in zip(self.base_model.trainable_variables, state.trainable)}
        return patch_certificate.worst_case_over_locations(
            self.base_model, x, y, self.training_masks(tf.shape(x)[0]), eps=eps,
            clip_min=self.clip_min, clip_max=self.clip_max, values=values,
            batch_statistics=x if self._has_batch_norm else None)

    def test_step(self, data):
        """`Defense.test_step` plus ``verified_accuracy``: the fraction of the batch certified
        against a ``patch_size`` patch with any content in [clip_min, clip_max] at every
        location (moving BatchNorm statistics: the deployed model)."""
        # The Defense step (loss, accuracy, robust_accuracy), not the parent's L-inf certificate.
        results = super(IntervalBoundPropagation, self).test_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        worst = patch_certificate.worst_case_over_locations(
            self.base_model, x, y, self.masks(), max_batch=self.max_batch,
            clip_min=self.clip_min, clip_max=self.clip_max)
        ok = ibp.is_verified(worst, y)
        self.verified_tracker.update_state(tf.cast(ok, tf.float32), sample_weight=sample_weight)
        results["verified_accuracy"] = self.verified_tracker.result()
        return results

    def certified_report(self, base_model, dataset):
        """``{'patch_certificate': report}``: `tfadv.certify.patch.certified_patch_accuracy`
        of ``base_model`` on ``dataset`` at ``eval_patch_sizes`` without the per-example records
        (merged into ``report.json`` by `tfadv.train.train`)."""
        report = patch_certificate.certified_patch_accuracy(
            base_model, dataset, self.eval_patch_sizes, max_batch=self.max_batch)
        report.pop("records")
        report["patch_size_trained"] = self.patch_size
        return {"patch_certificate": report}


@gin.configurable
def chiang_mlp(input_shape=(28, 28, 1), num_classes=10, hidden=(255,), mean=0.0, std=1.0):
    """The MLP of Chiang et al.'s MNIST results (official ``model_mlp_any``, ``neurons: [255]``):
    flatten, then a ReLU Dense layer per entry of ``hidden``, then Dense ``num_classes``
    (named ``logits``, float32). ``mean``, ``std``: per-channel input normalisation as the first
    layer (official MNIST: none)."""
    input_shape, num_classes = _check_io(input_shape, num_classes)
    hidden = list(hidden)
    if not hidden:
        raise ValueError("hidden must list at least one layer width (official: [255]).")
    for width in hidden:
        check_number("hidden (layer width)", width, 1, strict=False, integer=True)
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    x = layers.Flatten()(x)
    for width in hidden:
        x = layers.Dense(int(width), activation="relu")(x)
    outputs = layers.Dense(int(num_classes), name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="chiang_mlp")
