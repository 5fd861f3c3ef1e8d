"""Per-epoch training checkpoints with resume, written atomically.

`tf.train.CheckpointManager` writes a checkpoint's data and index files first and only then
rewrites the small ``checkpoint`` state file (by writing a temporary file and renaming it), so the
latest checkpoint it names is always complete: a run killed mid-save resumes from the previous
epoch. `RobustEarlyStopping` keeps the best checkpoint by robust validation accuracy. The
checkpoint holds the base model (weights and BatchNorm statistics), the optimizer
(slots, iteration count, hence the learning-rate schedule position) and the number of finished
epochs.
"""

import json
import os
import tempfile

import gin
import keras
import tensorflow as tf


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint after every epoch; `restore` returns the epoch to resume from."""

    def __init__(self, directory, base_model, optimizer, max_to_keep=2):
        super().__init__()
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self._checkpoint = tf.train.Checkpoint(model=base_model, optimizer=optimizer,
                                               epoch=self.epoch)
        self._manager = tf.train.CheckpointManager(self._checkpoint, directory,
                                                   max_to_keep=max_to_keep)

    def restore(self):
        """Restores the latest complete checkpoint, if any; returns the finished epoch count."""
        latest = self._manager.latest_checkpoint
        if latest is None:
            return 0
        self._checkpoint.restore(latest).assert_existing_objects_matched()
        return int(self.epoch.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self._manager.save(checkpoint_number=epoch + 1)


def atomic_write_text(path, text):
    """Writes ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save_model(model, path):
    """`model.save(path)` (a ``.keras`` file) via a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@gin.configurable
class RobustEarlyStopping(keras.callbacks.Callback):
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
    never). The state (best value, epoch, wait) is saved atomically with each evaluation, so a
    resumed run continues it. TensorBoard (``tensorboard/early_stopping``) gets the best value so
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

    def attach(self, model_dir, base_model, data=None):
        """Sets where the best model and the state go; restores the state of a resumed run."""
        self.model_dir = model_dir
        self.base_model = base_model
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.state = json.load(f)

    @property
    def best_path(self):
        return os.path.join(self.model_dir, "best.keras")

    @property
    def state_path(self):
        return os.path.join(self.model_dir, "early_stopping.json")

    def on_train_begin(self, logs=None):
        if self.model_dir is None:
            raise ValueError("RobustEarlyStopping needs attach(model_dir, base_model) first "
                             "(tfadv.train does it).")
        self._writer = tf.summary.create_file_writer(
            os.path.join(self.model_dir, "tensorboard", "early_stopping"))

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
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")
        with self._writer.as_default():
            tf.summary.scalar("best_" + self.monitor, self.state["best"], step=epoch)
            tf.summary.scalar("selected_epoch", self.state["best_epoch"], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
