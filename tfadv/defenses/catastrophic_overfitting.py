"""Catastrophic overfitting of fast (single-step) adversarial training, and its monitor.

FGSM-RS: Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR
2020 (official code: locuslab/fast_adversarial). One FGSM step from a uniform random start,

    delta_0 ~ U(-eps, eps),  delta = Pi_eps(delta_0 + alpha * sign(grad_x L(x + delta_0, y))),

alpha = 1.25 eps, then an ordinary step on L(x + delta, y). This is `PGDAdversarialTraining`
with ``PGD(steps=1, step_size=1.25 * eps, random_start='uniform')`` (gin: ``fast_at.gin``); it
needs no class of its own.

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
from tfadv.checks import check_number
from tfadv.checkpoint import RunCallback
from tfadv.rundir import atomic_write_text


@gin.configurable
class CatastrophicOverfittingMonitor(RunCallback):
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

    state_key = "catastrophic_overfitting"

    def get_state(self):
        """``{'history', 'detected_epoch'}``: one record per finished epoch (``epoch``,
        ``pgd_accuracy``, ``fgsm_accuracy``, ``detected``) and the first epoch a collapse was
        detected at (None), saved in every checkpoint so a resumed run keeps its best PGD
        accuracy."""
        return {"history": self.history, "detected_epoch": self.detected_epoch}

    def set_state(self, state):
        """Restores the history and detected epoch `get_state` saved (resume)."""
        self.history = list(state["history"])
        self.detected_epoch = state["detected_epoch"]

    def attach(self, model_dir, base_model, data):
        """Called by `tfadv.train`: where to log (``model_dir``), what to check (``base_model``,
        the classifier without its defense) and on which data (the first ``num_examples`` images
        of ``data.validation``, or of ``data.test`` when there is no validation split)."""
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
