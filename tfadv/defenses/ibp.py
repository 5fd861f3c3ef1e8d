"""Interval bound propagation training (IBP; Gowal et al. 2018).

Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli, "On the Effectiveness
of Interval Bound Propagation for Training Verifiably Robust Models", 2018 (arXiv:1810.12715).
Official code: deepmind/interval-bound-propagation (``src/loss.py``, ``src/utils.py``
``create_classification_losses`` / ``build_loss_schedule``, ``examples/train.py``).

The training loss (paper, Sec. 3) mixes the nominal cross-entropy with the cross-entropy of the
worst-case logits that interval bounds give over the eps-box (`tfadv.certify.ibp`):

    L = kappa * l(z_K(x), y) + (1 - kappa) * l(zhat_K(x, eps_t), y)

with l the softmax cross-entropy, z_K the logits and zhat_K the vector of upper bounds on
z_j - z_y (0 at j = y), the last layer elided into the specification. Symbols: kappa =
``kappa_start`` -> ``kappa_end``, eps_t -> ``eps`` (the paper's eps_train, a little larger than the
test radius ``eval_eps``).

Schedule (official ``build_loss_schedule`` / ``linear_schedule``), at optimizer step t:

    ramp(t)  = clip((t - warmup_steps) / rampup_steps, 0, 1)
    eps_t    = eps * ramp(t)
    kappa_t  = 1                                               for t < warmup_steps
             = kappa_start + (kappa_end - kappa_start) * ramp(t)   afterwards

i.e. ``warmup_steps`` of purely nominal training, then eps and kappa ramp linearly over
``rampup_steps``. (The official code's warm-up nominal weight is nominal_init + verified_init,
which is 1 with its defaults; tfadv fixes kappa = 1 in warm-up, the same thing. With
``rampup_steps = 0`` the values jump at ``warmup_steps``.) The step t is the optimizer's
iteration count read inside the compiled step, so the schedule never retraces.

MNIST defaults of the official ``examples/train.py``: 60,001 steps, warm-up 2,000, ramp-up
10,000, batch 200, eps_train 0.33 for test eps 0.3 (the paper's text and the released model names,
e.g. ``mnist_0.4_large_200``, use 0.4 for 0.3; tfadv follows the code), kappa 1 -> 0.5, Adam
1e-3 -> 1e-4 at step 15k -> 1e-5 at 25k, the 'large' CNN (`tfadv.models.gowal_cnn`).

BatchNorm: the nominal pass trains BatchNorm as usual (batch statistics, moving averages
updated); the bounds use the same clean-batch statistics (official ``BatchNormWrapper`` reads the
statistics of the most recent connection), computed by propagating the clean batch alongside the
box. Verification after training uses the moving statistics (inference mode), i.e. certifies the
deployed model. Dropout is applied in the nominal pass and is the identity in the bounds (they
bound the inference network).
"""

import gin
import keras
import tensorflow as tf
from keras import layers

from tfadv.attacks import PGD
from tfadv.checks import check_number
from tfadv.certify import ibp
from tfadv.defenses.base import Defense, replica_mean


@gin.configurable(denylist=["base_model"])
class IntervalBoundPropagation(Defense):
    """IBP training (Gowal et al. 2018) around a Keras classifier made of IBP-supported layers.
    It minimises (module docstring)

        E[ kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(zhat(x, eps_t), y) ]

    with z = ``base_model``'s logits and zhat the IBP upper bounds on z_j - z_y over the L-inf
    box of radius eps_t (`tfadv.certify.ibp.worst_case_logits`). kappa_t = 1 for the first
    ``warmup_steps`` optimizer steps; then, over ``rampup_steps``, kappa_t goes linearly from
    ``kappa_start`` to ``kappa_end`` while eps_t rises linearly from 0 to ``eps`` (`schedule`).

    Example (runs as is)::

        import keras, numpy as np, tfadv.models, tfadv.defenses
        from tfadv.certify import ibp
        base = tfadv.models.digits_cnn(input_shape=(8, 8, 1), num_classes=10)
        model = tfadv.defenses.IntervalBoundPropagation(
            base, eps=0.11, eval_eps=0.1, warmup_steps=20, rampup_steps=100)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.rand(64, 8, 8, 1).astype("float32"); y = np.arange(64) % 10
        model.fit(x, y, batch_size=32, epochs=2)
        model.evaluate(x, y, return_dict=True)   # accuracy, robust_accuracy, verified_accuracy
        ibp.verified_accuracy(base, (x, y), eps=0.1)

    Args:
      base_model: classifier from images in [0, 1] to logits, built from
        `tfadv.certify.ibp.SUPPORTED_LAYERS` (checked here).
      eps: eps_train, the L-inf radius the verified loss is trained at (after the ramp), >= 0.
      warmup_steps: optimizer steps of nominal training before the ramp (integer >= 0).
      rampup_steps: optimizer steps over which eps and kappa ramp linearly (integer >= 0).
      kappa_start, kappa_end: the nominal-loss weight kappa at the start and end of the ramp,
        in [0, 1] (paper: 1 -> 0.5).
      eval_eps: the radius of ``verified_accuracy`` (validation and `certified_report`) and of
        the default ``eval_attack``; default ``eps``.
      eval_attack: attack behind ``robust_accuracy`` (default: L-inf PGD-20 at ``eval_eps``,
        step eval_eps / 4, random start; the official README reports a 20-step PGD).
      clip_min, clip_max: the image box; boxes are [clip(x - eps), clip(x + eps)].
      margin: Hypersphere Embedding margin on the nominal cross-entropy (see `Defense`).
    """

    supports_awp = False  # AWP with a verified objective is not a published method

    def __init__(self, base_model, eps=0.33, warmup_steps=2000, rampup_steps=10000,
                 kappa_start=1.0, kappa_end=0.5, eval_eps=None, eval_attack=None,
                 clip_min=0.0, clip_max=1.0, **kwargs):
        check_number("eps", eps, 0, strict=False)
        check_number("warmup_steps", warmup_steps, 0, strict=False, integer=True)
        check_number("rampup_steps", rampup_steps, 0, strict=False, integer=True)
        check_number("kappa_start", kappa_start, 0, strict=False, high=1)
        check_number("kappa_end", kappa_end, 0, strict=False, high=1)
        if eval_eps is None:
            eval_eps = eps
        check_number("eval_eps", eval_eps, 0, strict=False)
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be < clip_max; got {clip_min} and {clip_max}.")
        ibp.check_supported(base_model)
        if eval_attack is None and eval_eps > 0:
            eval_attack = PGD(eps=eval_eps, step_size=eval_eps / 4, steps=20,
                              random_start="uniform", clip_min=clip_min, clip_max=clip_max)
        super().__init__(base_model, attack=None, eval_attack=eval_attack, **kwargs)
        self.eps = float(eps)
        self.warmup_steps = int(warmup_steps)
        self.rampup_steps = int(rampup_steps)
        self.kappa_start = float(kappa_start)
        self.kappa_end = float(kappa_end)
        self.eval_eps = float(eval_eps)
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self._has_batch_norm = any(isinstance(layer, layers.BatchNormalization)
                                   for layer in base_model._flatten_layers())
        self.verified_tracker = keras.metrics.Mean(name="verified_accuracy")

    @property
    def metrics(self):
        return [*super().metrics, self.verified_tracker]

    def schedule(self, step):
        """``(eps_t, kappa_t)`` at optimizer step ``step`` (float32 tensors; module docstring)."""
        step = tf.cast(step, tf.float32)
        warmup = float(self.warmup_steps)
        if self.rampup_steps > 0:
            ramp = tf.clip_by_value((step - warmup) / float(self.rampup_steps), 0.0, 1.0)
        else:
            ramp = tf.cast(step >= warmup, tf.float32)
        eps = self.eps * ramp
        kappa = tf.where(step < warmup, 1.0,
                         self.kappa_start + (self.kappa_end - self.kappa_start) * ramp)
        return eps, kappa

    def worst_case_logits(self, state, x, y, eps):
        """Upper bounds on z_j - z_y over the box of radius ``eps`` at the weights of ``state``
        (a `ModelState`), BatchNorm with the clean batch's statistics (module docstring)."""
        values = {id(v): t for v, t in zip(self.base_model.trainable_variables, state.trainable)}
        lower, upper = ibp.input_box(x, eps, self.clip_min, self.clip_max)
        return ibp.worst_case_logits(self.base_model, lower, upper, y, values=values,
                                     batch_statistics=x if self._has_batch_norm else None)

    def objective(self, state, x, y, sample_weight, batch):
        logits = state(x, training=True)
        nominal = self.classification_loss(y, logits)
        eps, kappa = self.schedule(self.optimizer.iterations)
        # In warm-up (kappa = 1) the bounds are skipped: the step is plain nominal training.
        verified = tf.cond(
            kappa < 1.0,
            lambda: ibp.verified_cross_entropy(y, self.worst_case_logits(state, x, y, eps)),
            lambda: tf.zeros_like(nominal))
        per_example = kappa * nominal + (1.0 - kappa) * verified
        return replica_mean(per_example, sample_weight), {"clean": logits}

    def test_step(self, data):
        """`Defense.test_step` plus ``verified_accuracy``: the fraction of the batch that IBP
        verifies at ``eval_eps`` (moving BatchNorm statistics: the deployed model)."""
        results = super().test_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        ok = ibp.verified(self.base_model, x, y, self.eval_eps, self.clip_min, self.clip_max)
        self.verified_tracker.update_state(tf.cast(ok, tf.float32), sample_weight=sample_weight)
        results["verified_accuracy"] = self.verified_tracker.result()
        return results

    def certified_report(self, base_model, dataset):
        """``{'verified_accuracy', 'verified_eps', 'verified_box'}`` of ``base_model`` on
        ``dataset`` at ``eval_eps`` (merged into ``report.json`` by `tfadv.train.train`)."""
        accuracy = ibp.verified_accuracy(base_model, dataset, self.eval_eps,
                                         clip_min=self.clip_min, clip_max=self.clip_max)
        return {"verified_accuracy": accuracy, "verified_eps": self.eval_eps,
                "verified_box": f"[clip(x - eps, {self.clip_min:g}, {self.clip_max:g}), "
                                f"clip(x + eps, {self.clip_min:g}, {self.clip_max:g})]"}
