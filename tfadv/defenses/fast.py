"""Fast adversarial training: FGSM with a random start and "free" adversarial training.

- FGSM-RS: Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR
  2020 (official code: locuslab/fast_adversarial). One FGSM step from a uniform random start,

      delta_0 ~ U(-eps, eps),  delta = Pi_eps(delta_0 + alpha * sign(grad_x L(x + delta_0, y))),

  alpha = 1.25 eps, then an ordinary step on L(x + delta, y). This is `PGDAdversarialTraining`
  with ``PGD(steps=1, step_size=1.25 * eps, random_start='uniform')`` (gin: ``fast_at.gin``); it
  needs no class of its own.
- Free AT: Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor, Goldstein, "Adversarial
  Training for Free!", NeurIPS 2019 (official code: mahyarnajibi/FreeAdversarialTraining). Each
  minibatch is replayed ``replays`` (m) times; every replay computes ONE backward pass that gives
  both the weight gradient (applied at once) and the input gradient, which updates the
  perturbation carried to the next replay and on to the next minibatch:

      for each minibatch, m times:
          g_theta, g_delta = grad L(theta, clip(x + delta, 0, 1), y)
          theta <- optimizer step with g_theta
          delta <- clip(delta + eps * sign(g_delta), -eps, eps)

  (paper, Algorithm 1; step size eps as in the official code). The perturbation is per replica
  (each replica keeps its own for its share of the batch) and is not checkpointed: a resumed run
  restarts it at zero. The perturbation is float32 under every precision policy; with
  ``mixed_float16`` the replay's one backward pass is of the scaled loss (`Defense` docstring),
  which `keras.optimizers.LossScaleOptimizer.apply` unscales for the weights and which leaves the
  sign of the input gradient unchanged. One Keras step is ``replays`` optimizer updates, so the paper's budget is
  ``epochs / m`` passes over the data (the official code divides the epochs by m likewise).

Catastrophic overfitting (Wong et al., Sec. 5.2): FGSM training can suddenly lose all PGD
robustness while FGSM accuracy rises. `CatastrophicOverfittingMonitor` measures both on a fixed
validation batch after every epoch, logs them, and can stop the run and restore the weights of
the last epoch before the collapse (the official ``--early-stop`` check on a training batch).
"""

import json
import os

import gin
import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks import FGSM, PGD
from tfadv.attacks.base import check_number
from tfadv.checkpoint import atomic_write_text
from tfadv.defenses.base import Defense, ModelState, replica_mean


@gin.configurable(denylist=["base_model"])
class FreeAdversarialTraining(Defense):
    """Free adversarial training (Shafahi et al. 2019); see the module docstring.

    Args:
      base_model: classifier from images in [0, 1] to logits.
      eps: L-inf radius of the perturbation (and its step size, as in the official code).
      replays: m, the number of times each minibatch is replayed (paper: 4 to 10; CIFAR 8).
      batch_size: the largest GLOBAL batch the defense will see (the carried perturbation has
        this many rows; smaller last batches use the first rows).
      eval_attack: attack behind ``robust_accuracy`` in validation.
      margin: Hypersphere Embedding margin (FreeAT+HE, Pang et al. 2020; see `Defense`).
    """

    supports_awp = False  # each replay is already an optimizer step

    def __init__(self, base_model, eps=0.3, replays=8, batch_size=128, eval_attack=None,
                 **kwargs):
        check_number("eps", eps, 0.0, strict=True)
        check_number("replays", replays, 1, strict=False, integer=True)
        check_number("batch_size", batch_size, 1, strict=False, integer=True)
        super().__init__(base_model, attack=None, eval_attack=eval_attack, **kwargs)
        self.eps = float(eps)
        self.replays = replays
        # Per replica (ON_READ): every replica carries the perturbation of its own examples.
        shape = (batch_size, *base_model.input_shape[1:])
        self.delta = tf.Variable(tf.zeros(shape), trainable=False, name="free_at_delta",
                                 synchronization=tf.VariableSynchronization.ON_READ,
                                 aggregation=tf.VariableAggregation.NONE)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.cast(x, tf.float32)
        n = tf.shape(x)[0]
        message = (f"FreeAdversarialTraining.batch_size ({self.delta.shape[0]}) must be at least "
                   f"the (per-replica) batch size")
        if x.shape[0] is not None and x.shape[0] > self.delta.shape[0]:
            raise ValueError(f"{message} ({x.shape[0]}).")
        tf.debugging.assert_less_equal(n, self.delta.shape[0], message=message)
        variables = self.base_model.trainable_variables
        # A Python loop, unrolled `replays` times in the graph, not a tf.while_loop: each replay
        # is an optimizer step, and Keras' optimizer aggregates gradients across replicas with
        # a merge_call, which tf.distribute does not allow inside a while loop's body.
        for _ in range(self.replays):
            delta = self.delta[:n]
            with tf.GradientTape() as tape:
                tape.watch(delta)
                state = ModelState(self.base_model)
                logits = state(tf.clip_by_value(x + delta, 0.0, 1.0), training=True)
                loss = replica_mean(self.classification_loss(y, logits), sample_weight)
                loss = loss + state.regularization_loss()
                scaled_loss = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled_loss, [*variables, delta])
            self.optimizer.apply(grads[:-1], variables)
            state.commit()
            # The input gradient is of the scaled loss (mixed_float16): its sign is that of the
            # true gradient, except where the scaling overflowed (inf/NaN; the optimizer skips
            # that step): those pixels take no step rather than poisoning the carried delta.
            g_delta = tf.cast(grads[-1], tf.float32)
            g_delta = tf.where(tf.math.is_finite(g_delta), g_delta, tf.zeros_like(g_delta))
            delta = tf.clip_by_value(delta + self.eps * tf.sign(g_delta), -self.eps, self.eps)
            self.delta.assign(tf.concat([delta, self.delta[n:]], axis=0))
        self.track_loss(loss, x)
        self.adv_accuracy.update_state(y, logits, sample_weight=sample_weight)
        return {"loss": self.loss_tracker.result(), "adv_accuracy": self.adv_accuracy.result()}


@gin.configurable
class CatastrophicOverfittingMonitor(keras.callbacks.Callback):
    """Detects catastrophic overfitting of fast adversarial training (Wong et al. 2020).

    After every epoch, PGD and FGSM accuracy are measured on a fixed batch of ``num_examples``
    validation images. A collapse is declared when PGD accuracy falls more than ``drop`` below
    its best so far while FGSM accuracy does not fall (the signature of a model that learned to
    defeat the single-step attack only). It is logged (TensorBoard ``catastrophic_overfitting``:
    ``pgd_accuracy``, ``fgsm_accuracy``, ``detected``; and ``catastrophic_overfitting.json``),
    and with ``stop=True`` training stops with the weights of the epoch before the collapse
    restored (the official code's ``--early-stop``).

    Args:
      eps: threat model radius of both attacks.
      pgd_steps: PGD steps (step 2.5 * eps / steps, uniform start, seeded).
      num_examples: validation images used.
      drop: PGD accuracy drop that counts as a collapse, in (0, 1].
      stop: stop and restore on detection.
    """

    def __init__(self, eps=0.3, pgd_steps=10, num_examples=256, drop=0.2, stop=False):
        super().__init__()
        check_number("drop", drop, 0.0, strict=True, high=1.0)
        check_number("num_examples", num_examples, 1, strict=False, integer=True)
        self.pgd = PGD(eps=eps, step_size=2.5 * eps / pgd_steps, steps=pgd_steps, seed=0)
        self.fgsm = FGSM(eps=eps)
        self.num_examples = num_examples
        self.drop = float(drop)
        self.stop = stop
        self.history = []
        self.detected_epoch = None
        self._batch = None
        self._previous = None
        self._writer = None

    def attach(self, model_dir, base_model, data):
        """Called by `tfadv.train`: where to log, what to check, on which data."""
        self.model_dir = model_dir
        self.base_model = base_model
        images, labels = [], []
        for x, y in data.validation if data.validation is not None else data.test:
            images.append(np.asarray(x))
            labels.append(np.asarray(y))
        self._batch = (np.concatenate(images)[:self.num_examples],
                       np.concatenate(labels)[:self.num_examples])
        self._writer = tf.summary.create_file_writer(
            os.path.join(model_dir, "tensorboard", "catastrophic_overfitting"))

    def _accuracy(self, attack):
        x, y = self._batch
        x_adv = attack(self.base_model, x, y)
        return float(np.mean(np.argmax(self.base_model(x_adv, training=False), -1) == y))

    def on_epoch_begin(self, epoch, logs=None):
        if self.stop:
            self._previous = self.base_model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        if self._batch is None:
            raise ValueError("CatastrophicOverfittingMonitor needs attach(model_dir, base_model, "
                             "data) first (tfadv.train does it).")
        pgd, fgsm = self._accuracy(self.pgd), self._accuracy(self.fgsm)
        best = max((h["pgd_accuracy"] for h in self.history), default=pgd)
        last_fgsm = self.history[-1]["fgsm_accuracy"] if self.history else fgsm
        collapsed = pgd < best - self.drop and fgsm >= last_fgsm
        self.history.append({"epoch": epoch + 1, "pgd_accuracy": pgd, "fgsm_accuracy": fgsm,
                             "detected": collapsed})
        with self._writer.as_default():
            tf.summary.scalar("pgd_accuracy", pgd, step=epoch)
            tf.summary.scalar("fgsm_accuracy", fgsm, step=epoch)
            tf.summary.scalar("detected", float(collapsed), step=epoch)
        self._writer.flush()
        if collapsed and self.detected_epoch is None:
            self.detected_epoch = epoch + 1
            print(f"\ntfadv: catastrophic overfitting at epoch {epoch + 1}: PGD accuracy {pgd:.3f}"
                  f" (best {best:.3f}), FGSM accuracy {fgsm:.3f}")
            if self.stop:
                self.base_model.set_weights(self._previous)
                self.model.stop_training = True
        atomic_write_text(os.path.join(self.model_dir, "catastrophic_overfitting.json"),
                          json.dumps({"detected_epoch": self.detected_epoch,
                                      "history": self.history}, indent=2) + "\n")
