"""Per-epoch training checkpoints with resume, written atomically.

`tf.train.CheckpointManager` writes a checkpoint's data and index files first and only then
rewrites the small ``checkpoint`` state file (by writing a temporary file and renaming it), so the
latest checkpoint it names is always complete: a run killed mid-save resumes from the previous
epoch. The checkpoint holds the base model (weights and BatchNorm statistics), the optimizer
(slots, iteration count, hence the learning-rate schedule position) and the number of finished
epochs.
"""

import os
import tempfile

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
