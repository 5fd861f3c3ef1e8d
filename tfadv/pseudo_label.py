"""Pseudo-labels for robust self-training (Carmon et al. 2019), behind `bin/pseudo_label`.

Carmon, Raghunathan, Schmidt, Liang, Duchi, "Unlabeled Data Improves Adversarial Robustness",
NeurIPS 2019 (official code: yaircarmon/semisup-adv, ``generate_pseudolabels.py``). A standard,
non-robust teacher trained on the labelled data labels the unlabelled images with its argmax
prediction; robust training then uses labelled and pseudo-labelled data alike
(``load_dataset.pseudo_labeled``).

Unlabelled sources (``source``):

- ``'split'``: the unlabelled part of the configured labelled/unlabelled split
  (``load_dataset.labeled_fraction``), e.g. digits with 20% of the training labels kept;
- ``'tfds:NAME:SPLIT'``: the images of a TFDS split, labels ignored (e.g.
  ``tfds:svhn_cropped:extra``);
- a ``.npz`` path holding an ``images`` array (how users bring the 500K TinyImages set), uint8
  0..255 or floats in [0, 1].
"""

import time

import keras
import numpy as np
import tensorflow as tf

from tfadv import data as data_lib


def unlabeled_images(source, data):
    """``(dataset, uint8)``: a batched dataset of float32 images in [0, 1] from ``source``
    (module docstring), checked against ``data``'s image shape, and whether the source images
    are 8-bit (then they are stored as uint8, else as float32, without loss either way)."""
    if source == "split":
        if data.unlabeled is None:
            raise ValueError("source 'split' needs load_dataset.labeled_fraction set in gin "
                             "(the fraction of the training split kept labelled).")
        return data.unlabeled, data.name != "digits"
    if source.startswith("tfds:"):
        parts = source.split(":")
        if len(parts) != 3:
            raise ValueError(f"a TFDS source is 'tfds:NAME:SPLIT'; got {source!r}.")
        import tensorflow_datasets as tfds

        ds = tfds.load(parts[1], split=parts[2], data_dir=None, download=False)
        ds = ds.map(lambda ex: tf.cast(ex["image"], tf.float32) / 255.0)
        return ds.batch(data.batch_size), True
    if source.endswith(".npz"):
        with np.load(source) as f:
            if "images" not in f.files:
                raise ValueError(f"{source!r} must hold an 'images' array; it has {f.files}.")
            images = f["images"]
        uint8 = images.dtype == np.uint8
        images = images.astype("float32") / 255.0 if uint8 else images
        data_lib.validate_arrays(images, None, image_shape=data.image_shape)
        return tf.data.Dataset.from_tensor_slices(images.astype("float32")).batch(
            data.batch_size), uint8
    raise ValueError(f"source must be 'split', 'tfds:NAME:SPLIT' or a .npz path; got {source!r}.")


def _accuracy(model, dataset):
    correct = total = 0
    for x, y in dataset:
        correct += int(np.sum(np.argmax(model(x, training=False), -1) == y.numpy()))
        total += len(y)
    return correct / max(total, 1)


def pseudo_label(teacher, data, source, output, verbose=1):
    """Labels ``source`` with ``teacher`` and writes ``output`` (atomically).

    Args:
      teacher: the standard classifier (images in [0, 1] -> logits).
      data: the labelled `tfadv.data.Data` (its validation split measures the teacher).
      source: unlabelled images (module docstring).
      output: the ``.npz`` to write (images, labels, metadata).

    Returns:
      the metadata dict (also stored in the file): teacher accuracy on the held-out labelled
      validation split, counts, per-class counts, source, seconds.
    """
    start = time.perf_counter()
    images_ds, uint8 = unlabeled_images(source, data)
    val_accuracy = _accuracy(teacher, data.validation) if data.validation is not None else None
    predict = tf.function(lambda x: tf.argmax(teacher(x, training=False), -1, tf.int32))
    images, labels = [], []
    total = data.sizes.get("unlabeled") if source == "split" else None
    bar = keras.utils.Progbar(total, unit_name="image", verbose=verbose)
    for batch in images_ds:
        labels.append(predict(batch).numpy())
        batch = batch.numpy()
        images.append(np.round(batch * 255.0).astype("uint8") if uint8 else batch)
        bar.add(len(labels[-1]))
    images, labels = np.concatenate(images), np.concatenate(labels)
    metadata = {
        "source": source,
        "dataset": data.name,
        "num_examples": int(len(labels)),
        "class_counts": np.bincount(labels, minlength=data.num_classes).tolist(),
        "teacher": getattr(teacher, "name", "teacher"),
        "teacher_validation_accuracy": val_accuracy,
        "seconds": round(time.perf_counter() - start, 1),
    }
    data_lib.write_pseudo_labeled(output, images, labels, metadata)
    return metadata
