"""Per-epoch training checkpoints that a run can always resume from, bit for bit.

A checkpoint after epoch N is ``checkpoints/ckpt-N.*`` (`tf.train.Checkpoint.write`: the base
model's weights and BatchNorm statistics, the optimizer's slots and iteration count, hence the
learning-rate schedule and every step-keyed random draw, and the defense's own variables) plus
its manifest ``ckpt-N.json``, written last and atomically: the size and SHA-256 of every file and
the run's state after epoch N (history, training seconds, every `RunCallback`'s state). The
manifest is the commit point: a checkpoint without one does not exist. `EpochCheckpoint.restore`
takes the newest checkpoint whose files match their manifest and falls back to the previous one,
with one warning line, when a file is truncated or corrupt. Together with the epoch-keyed data
(`tfadv.data.TrainingEpochs`) and the step-keyed attack and noise seeds, a run killed at any point
and resumed ends with the weights of the uninterrupted run; a kill loses at most the current
epoch. The newest ``keep`` checkpoints are kept, and those `protect` names (early stopping's
best). Before a checkpoint is written the weights are checked to be finite (`TrainingDiverged`).
"""

import hashlib
import json
import math
import os
import re
import sys

import gin
import keras
import numpy as np
import tensorflow as tf

from tfadv import rundir
from tfadv.cli import UserError
from tfadv.faults import failpoint
from tfadv.rundir import atomic_save_model, atomic_write_json

DIVERGED_EXIT_CODE = 4
_MANIFEST = re.compile(r"^ckpt-(\d+)\.json$")


class TrainingDiverged(UserError):
    """The loss or the weights became non-finite; the last good checkpoint is kept."""

    exit_code = DIVERGED_EXIT_CODE


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""

    exit_code = 1


class RunCallback(keras.callbacks.Callback):
    """A callback that is part of a `tfadv.train` run: `attach` gets the run directory, the base
    model and the data before training; `get_state`/`set_state` put its state (JSON-able) into
    every checkpoint's manifest and take it back on resume."""

    state_key = None  # a unique name; None: nothing to save

    def attach(self, model_dir, base_model, data):
        """Called by `tfadv.train.train` once before training (and before `set_state` on a
        resume). Default: nothing.

        Args:
          model_dir: the run directory this task writes to (`tfadv.rundir` layout).
          base_model: the classifier being trained (images in [0, 1] -> logits), not the
            defense that wraps it.
          data: the run's `tfadv.data.Data` (batched ``train``, ``validation``, ``test``).
        """

    def get_state(self):
        """The callback's state after a finished epoch, saved under `state_key` in that
        epoch's checkpoint manifest: JSON-serialisable, or ``None`` (default) for none."""
        return None

    def set_state(self, state):
        """Takes back what `get_state` returned, from the checkpoint a run resumes from (called
        only when the manifest holds a state under `state_key`). Default: nothing."""


def _sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite_weights(model, epoch):
    """Raises `TrainingDiverged` if a weight of ``model`` is NaN or infinite."""
    for variable in model.weights:
        if not np.all(np.isfinite(np.asarray(variable))):
            raise TrainingDiverged(
                f"training diverged in epoch {epoch}: weight {variable.path} is not finite; "
                f"the last good checkpoint is kept and nothing was evaluated or exported.",
                hint="lower the learning rate (or use float32 instead of mixed precision).")


class FiniteGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss is NaN or infinite (`TrainingDiverged`)."""

    def __init__(self, learning_rate=None, saver=None):
        super().__init__()
        self.learning_rate = learning_rate
        self.saver = saver  # the run's EpochCheckpoint: names the checkpoint that is kept
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        failpoint("train_batch")
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            rate = "" if self.learning_rate is None else f" {self.learning_rate}"
            kept = self.saver.epochs() if self.saver is not None else []
            kept = (f"the checkpoint after epoch {kept[-1]} is kept" if kept
                    else "no checkpoint had been written")
            raise TrainingDiverged(
                f"training diverged at epoch {self.epoch + 1}, step {batch + 1}: the loss is "
                f"{float(loss)}; {kept}, and nothing was evaluated or exported.",
                hint=f"the likely cause is a learning rate{rate} too high for this model; "
                     f"lower it (or use float32 instead of mixed precision).")


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint after every epoch (module docstring); `restore` resumes from one.

    Args:
      directory: the run's ``checkpoints/``.
      trackables: the objects to save, by name (the defense, its optimizer).
      state_fn: ``f(epoch, logs) -> dict``, the run's state after a finished epoch (JSON-able),
        saved in the manifest.
      keep: how many of the newest checkpoints to keep (>= 1).
    """

    def __init__(self, directory, trackables, state_fn=None, keep=2):
        super().__init__()
        self.directory = os.fspath(directory)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self._checkpoint = tf.train.Checkpoint(**trackables, epoch=self.epoch)
        self._objects = trackables
        self.state_fn = state_fn
        self.keep = keep
        self.protected = set()

    def prefix(self, epoch):
        """The path prefix ``<directory>/ckpt-<epoch>`` of the checkpoint after ``epoch``
        (1-based): its TF files are ``<prefix>.index`` and ``<prefix>.data-*``."""
        return os.path.join(self.directory, f"ckpt-{epoch}")

    def manifest(self, epoch):
        """The path of ``ckpt-<epoch>.json``, the manifest that commits the checkpoint after
        ``epoch`` (module docstring)."""
        return self.prefix(epoch) + ".json"

    def epochs(self):
        """The epochs with a manifest, ascending."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(m.group(1)) for m in map(_MANIFEST.match, os.listdir(self.directory))
                      if m)

    def _files(self, epoch):
        name = f"ckpt-{epoch}."
        return sorted(f for f in os.listdir(self.directory)
                      if f.startswith(name) and not f.endswith(".json"))

    def verify(self, epoch):
        """The manifest of ``epoch`` if its files are intact, else raises ValueError saying what
        is wrong."""
        try:
            manifest = rundir.read_json(self.manifest(epoch))
        except (OSError, ValueError) as err:
            raise ValueError(f"its manifest is unreadable ({err})") from None
        for name, expected in manifest.get("files", {}).items():
            file = os.path.join(self.directory, name)
            if not os.path.exists(file):
                raise ValueError(f"{name} is missing")
            if os.path.getsize(file) != expected["size"]:
                raise ValueError(f"{name} is truncated ({os.path.getsize(file)} of "
                                 f"{expected['size']} bytes)")
            if _sha256(file) != expected["sha256"]:
                raise ValueError(f"{name} is corrupt (checksum mismatch)")
        if not manifest.get("files"):
            raise ValueError("its manifest lists no files")
        return manifest

    def restore(self):
        """Restores the newest intact checkpoint; returns ``(epoch, state)``, or ``(0, None)``
        when there is none. Corrupt or truncated checkpoints are skipped with one warning line
        each (and left on disk for inspection)."""
        for epoch in reversed(self.epochs()):
            try:
                manifest = self.verify(epoch)
                self._checkpoint.read(self.prefix(epoch)).assert_existing_objects_matched()
            except (ValueError, tf.errors.OpError, AssertionError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err)
                print(f"tfadv: warning: checkpoint after epoch {epoch} is unusable ({reason}); "
                      f"falling back to the previous one", file=sys.stderr)
                continue
            return int(self.epoch.numpy()), manifest.get("state")
        return 0, None

    def restore_epoch(self, epoch):
        """Restores the verified checkpoint after ``epoch`` in full (early stopping's selection,
        once training is over); raises ValueError if it is not intact."""
        self.verify(epoch)
        self._checkpoint.read(self.prefix(epoch)).assert_existing_objects_matched()

    def save(self, epoch, state):
        """Writes the checkpoint after ``epoch`` (module docstring), then prunes old ones. A
        failed write (a full disk) raises `CheckpointWriteError`; what it wrote is removed and
        the previous checkpoint stays the newest."""
        try:
            self._save(epoch, state)
        except (OSError, tf.errors.OpError) as err:
            for partial in self._files(epoch):
                os.remove(os.path.join(self.directory, partial))
            rundir.remove_stale_temporaries(self.directory)
            previous = [e for e in self.epochs() if e < epoch]
            kept = f"the checkpoint after epoch {previous[-1]}" if previous else "no checkpoint"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointWriteError(
                f"could not write the checkpoint after epoch {epoch} ({reason}); {kept} is "
                f"intact and a rerun resumes from it.") from err

    def _save(self, epoch, state):
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self.manifest(epoch)):  # an unusable earlier one: uncommit it first
            os.remove(self.manifest(epoch))
        for stale in self._files(epoch):  # an uncommitted attempt at this epoch
            os.remove(os.path.join(self.directory, stale))
        failpoint("checkpoint.begin")
        self._checkpoint.write(self.prefix(epoch))
        failpoint("checkpoint.data")
        files = {f: {"size": os.path.getsize(os.path.join(self.directory, f)),
                     "sha256": _sha256(os.path.join(self.directory, f))}
                 for f in self._files(epoch)}
        atomic_write_json(self.manifest(epoch), {"epoch": epoch, "files": files,
                                                 "state": state})
        failpoint("checkpoint.committed")
        self._prune()

    def _prune(self):
        epochs = self.epochs()
        keep = set(epochs[-self.keep:]) | self.protected
        for epoch in epochs:
            if epoch not in keep:
                os.remove(self.manifest(epoch))  # uncommit first
                for f in self._files(epoch):
                    os.remove(os.path.join(self.directory, f))

    def on_epoch_end(self, epoch, logs=None):
        base = self._objects.get("defense")
        check_finite_weights(getattr(base, "base_model", base), epoch + 1)
        self.epoch.assign(epoch + 1)
        state = self.state_fn(epoch, logs or {}) if self.state_fn is not None else None
        self.save(epoch + 1, state)


@gin.configurable
class RobustEarlyStopping(RunCallback):
    """Keeps the checkpoint with the best robust validation accuracy (Rice et al. 2020).

    Rice, Wong, Kolter, "Overfitting in adversarially robust deep learning", ICML 2020 (official
    code: locuslab/robust_overfitting). Robust test accuracy peaks shortly after the first
    learning-rate decay and then falls while training robust accuracy keeps rising; keeping the
    checkpoint with the best PGD accuracy on held-out data recovers the peak. The official code
    keeps the best-validation checkpoint (``model_val.pth``, 1,000 held-out training images)
    and evaluates PGD-10 after every epoch.

    The callback reads ``monitor`` from the epoch logs: the defense's ``val_robust_accuracy``
    (its ``eval_attack``, PGD, on the validation split), computed every ``train.validation_freq``
    epochs. When it improves, the base model is saved atomically to ``best.keras`` in the
    model_dir. After ``patience`` evaluations without improvement training stops (``None``:
    never). The state (best value, epoch, wait) is part of every checkpoint (`RunCallback`), so
    a resumed run continues it, and ``early_stopping.json`` shows it. The checkpoint of the best
    epoch is kept (`EpochCheckpoint.protected`), so the selection survives a lost
    ``best.keras``. TensorBoard (``tensorboard/early_stopping``) gets the best value so
    far and the selected epoch; the validation curve itself is the TensorBoard callback's
    ``epoch_robust_accuracy`` under ``validation``.

    Args:
      monitor: log key to maximise.
      patience: evaluations without improvement before stopping (integer >= 1) or None.
      min_delta: improvement needed to count as better.
    """

    def __init__(self, monitor="val_robust_accuracy", patience=None, min_delta=0.0):
        super().__init__()
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be None or an integer >= 1; got {patience!r}.")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.model_dir = None
        self.base_model = None
        self.state = {"best": None, "best_epoch": None, "wait": 0, "stopped_epoch": None}
        self._writer = None

    state_key = "early_stopping"

    def attach(self, model_dir, base_model, data=None):
        """Sets where the best model and the state go (``model_dir``) and which model is saved
        when the monitored value improves (``base_model``, the classifier without its defense).
        ``data`` is not used."""
        self.model_dir = model_dir
        self.base_model = base_model

    def get_state(self):
        """A copy of the state: ``best`` (the best ``monitor`` value so far, or None),
        ``best_epoch`` (its 1-based epoch), ``wait`` (validation epochs since it improved) and
        ``stopped_epoch`` (the epoch ``patience`` stopped training at, or None)."""
        return dict(self.state)

    def set_state(self, state):
        """Restores the state `get_state` saved (resume): the search continues where it was."""
        self.state = dict(state)

    @property
    def best_path(self):
        """``<model_dir>/best.keras``: the base model at the best epoch so far."""
        return rundir.path(self.model_dir, rundir.BEST)

    @property
    def state_path(self):
        """``<model_dir>/early_stopping.json``: the state, rewritten after every validation
        epoch."""
        return os.path.join(self.model_dir, "early_stopping.json")

    def on_train_begin(self, logs=None):
        if self.model_dir is None:
            raise ValueError("RobustEarlyStopping needs attach(model_dir, base_model) first "
                             "(tfadv.train does it).")
        self._writer = tf.summary.create_file_writer(
            rundir.path(self.model_dir, rundir.TENSORBOARD, "early_stopping"))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            return  # not a validation epoch
        value = float(logs[self.monitor])
        best = self.state["best"]
        if best is None or value > best + self.min_delta:
            atomic_save_model(self.base_model, self.best_path)
            self.state.update(best=value, best_epoch=epoch + 1, wait=0)
        else:
            self.state["wait"] += 1
            if self.patience is not None and self.state["wait"] >= self.patience:
                self.model.stop_training = True
                self.state["stopped_epoch"] = epoch + 1
        atomic_write_json(self.state_path, self.state)
        with self._writer.as_default():
            tf.summary.scalar("best_" + self.monitor, self.state["best"], step=epoch)
            tf.summary.scalar("selected_epoch", self.state["best_epoch"], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
