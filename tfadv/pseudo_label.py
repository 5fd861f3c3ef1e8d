"""Pseudo-labels for robust self-training (Carmon et al. 2019), behind `bin/pseudo_label`.

Carmon, Raghunathan, Schmidt, Liang, Duchi, "Unlabeled Data Improves Adversarial Robustness",
NeurIPS 2019 (official code: yaircarmon/semisup-adv, ``generate_pseudolabels.py``). A standard,
non-robust teacher trained on the labelled data labels the unlabelled images with its argmax
prediction; robust training then uses labelled and pseudo-labelled data alike
(``load_dataset.pseudo_labeled``). RST trains on a wrong pseudo-label as on a true one, so the
teacher's accuracy bounds the labels' quality (the paper's CIFAR-10 teacher was a standard
WRN-28-10 of about 95.5% accuracy): `check_teacher` warns about a weak teacher.

Unlabelled sources (``source``):

- ``'split'``: the unlabelled part of the configured labelled/unlabelled split
  (``load_dataset.labeled_fraction``), e.g. digits with 20% of the training labels kept;
- ``'tfds:NAME:SPLIT'``: the images of a TFDS split, labels ignored (e.g.
  ``tfds:svhn_cropped:extra``);
- a ``.npz`` path holding an ``images`` array (how users bring the 500K TinyImages set), uint8
  0..255 or floats in [0, 1].
"""

import sys
import time

import gin
import keras
import numpy as np
import tensorflow as tf

from tfadv import data as data_lib


def _unlabeled_images(source, data):
    """`unlabeled_images` plus the number of images (``None`` when unknown)."""
    if source == "split":
        if data.unlabeled is None:
            raise ValueError("source 'split' needs load_dataset.labeled_fraction set in gin "
                             "(the fraction of the training split kept labelled).")
        return data.unlabeled, None, data.sizes.get("unlabeled")
    if source.startswith("tfds:"):
        parts = source.split(":")
        if len(parts) != 3:
            raise ValueError(f"a TFDS source is 'tfds:NAME:SPLIT'; got {source!r}.")
        import tensorflow_datasets as tfds

        ds = tfds.load(parts[1], split=parts[2], data_dir=None, download=False)
        count = int(ds.cardinality())
        ds = ds.map(lambda ex: tf.cast(ex["image"], tf.float32) / 255.0)
        return ds.batch(data.batch_size), True, count if count >= 0 else None
    if source.endswith(".npz"):
        with np.load(data_lib.resolve_path(source)) as f:
            if "images" not in f.files:
                raise ValueError(f"{source!r} must hold an 'images' array; it has {f.files}.")
            images = f["images"]
        uint8 = images.dtype == np.uint8
        images = images.astype("float32") / 255.0 if uint8 else images
        data_lib.validate_arrays(images, None, image_shape=data.image_shape)
        return (tf.data.Dataset.from_tensor_slices(images.astype("float32")).batch(
            data.batch_size), uint8, len(images))
    raise ValueError(f"source must be 'split', 'tfds:NAME:SPLIT' or a .npz path; got {source!r}.")


def unlabeled_images(source, data):
    """``(dataset, uint8)``: a batched dataset of float32 images in [0, 1] from ``source``
    (module docstring), checked against ``data``'s image shape, and whether the source images
    are 8-bit (``None`` for ``'split'``, whose images `pseudo_label` checks batch by batch).
    8-bit images are stored as uint8, others as float32: without loss either way."""
    dataset, uint8, _ = _unlabeled_images(source, data)
    return dataset, uint8


def _accuracy(model, dataset):
    correct = total = 0
    for x, y in dataset:
        correct += int(np.sum(np.argmax(model(x, training=False), -1) == y.numpy()))
        total += len(y)
    return correct / max(total, 1)


def _as_uint8(batch):
    """``batch`` (floats in [0, 1]) as uint8 when every value is k/255 exactly, else ``None``."""
    scaled = np.round(batch * 255.0)
    if np.abs(scaled - batch * 255.0).max(initial=0.0) > 1e-3:
        return None
    return scaled.astype("uint8")


@gin.configurable(denylist=["accuracy", "baseline_accuracy"])
def check_teacher(accuracy, baseline_accuracy=None, min_accuracy=0.8, max_gap=0.05):
    """The warning (one line) for a weak RST teacher, or ``None``.

    A teacher is weak when its accuracy on the held-out labelled data (the validation split) is
    below ``min_accuracy``, or more than ``max_gap`` below ``baseline_accuracy``, the accuracy
    of a model trained on the labelled data only. Its errors become wrong pseudo-labels that RST
    trains on as on true labels (Carmon et al. 2019, whose CIFAR-10 teacher had about 95.5%
    accuracy). gin: ``check_teacher.min_accuracy = 0.9`` (bin/pseudo_label ``--gin_param``)."""
    for name, value in (("min_accuracy", min_accuracy), ("max_gap", max_gap)):
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"check_teacher.{name} must be a number in [0, 1]; got {value!r}.")
    if accuracy is None:
        return None
    reasons = []
    if accuracy < min_accuracy:
        reasons.append(f"below check_teacher.min_accuracy = {100 * min_accuracy:.0f}%")
    if baseline_accuracy is not None and accuracy < baseline_accuracy - max_gap:
        reasons.append(f"{100 * (baseline_accuracy - accuracy):.1f} points below the "
                       f"labelled-only baseline's {100 * baseline_accuracy:.2f}%")
    if not reasons:
        return None
    return (f"weak teacher: {100 * accuracy:.2f}% accuracy on the held-out labelled validation "
            f"split ({' and '.join(reasons)}), so about {100 * (1 - accuracy):.0f}% of its "
            f"pseudo-labels will be wrong; RST trains on them as on true labels, which lowers its "
            f"clean and robust accuracy, possibly below labelled-only training (Carmon et al. "
            f"2019's CIFAR-10 teacher had about 95.5%): train a stronger teacher first (more "
            f"epochs or labels, or --teacher).")


def _note(message, verbose):
    if verbose:
        print(f"tfadv: {message}", flush=True)


def pseudo_label(teacher, data, source, output, verbose=1, baseline=None):
    """Labels ``source`` with ``teacher`` and writes ``output`` (atomically).

    Args:
      teacher: the standard classifier (images in [0, 1] -> logits).
      data: the labelled `tfadv.data.Data` (its validation split measures the teacher).
      source: unlabelled images (module docstring).
      output: the ``.npz`` to write (images, labels, metadata).
      verbose: 1 for progress lines and a progress bar, 0 for silence (the weak-teacher warning
        is printed to stderr either way).
      baseline: a classifier trained on the labelled data only, or ``None``; the teacher is
        compared with its validation accuracy (`check_teacher`).

    Returns:
      the metadata dict (also stored in the file): teacher accuracy on the held-out labelled
      validation split, counts, per-class counts, source, seconds, and ``teacher_warning``
      (`check_teacher`'s line, or ``None``).
    """
    start = time.perf_counter()
    images_ds, _, total = _unlabeled_images(source, data)
    val_accuracy = baseline_accuracy = None
    if data.validation is not None:
        _note(f"measuring the teacher on the {data.sizes['validation']} held-out labelled "
              f"validation images", verbose)
        val_accuracy = _accuracy(teacher, data.validation)
        if baseline is not None:
            baseline_accuracy = _accuracy(baseline, data.validation)
    else:
        _note("the teacher's accuracy cannot be checked: no validation split "
              "(load_dataset.validation_size = 0)", verbose)
    warning = check_teacher(val_accuracy, baseline_accuracy)
    if warning:
        print(f"tfadv: warning: {warning}", file=sys.stderr, flush=True)
    _note(f"labelling {total if total is not None else 'the'} unlabelled images of {source}",
          verbose)
    predict = tf.function(lambda x: tf.argmax(teacher(x, training=False), -1, tf.int32))
    images, labels = [], []
    interactive = verbose and sys.stdout.isatty()  # a bar written to a file is escape codes
    bar = keras.utils.Progbar(total, unit_name="image", verbose=1 if interactive else 0)
    for batch in images_ds:
        labels.append(predict(batch).numpy())
        batch = batch.numpy()
        exact = _as_uint8(batch)
        images.append(batch if exact is None else exact)
        bar.add(len(labels[-1]))
    if any(batch.dtype != np.uint8 for batch in images):  # not all 8-bit: keep floats
        images = [b.astype("float32") / 255.0 if b.dtype == np.uint8 else b for b in images]
    images, labels = np.concatenate(images), np.concatenate(labels)
    metadata = {
        "source": source,
        "dataset": data.name,
        "num_examples": int(len(labels)),
        "class_counts": np.bincount(labels, minlength=data.num_classes).tolist(),
        "teacher": getattr(teacher, "name", "teacher"),
        "teacher_validation_accuracy": val_accuracy,
        "baseline_validation_accuracy": baseline_accuracy,
        "teacher_warning": warning,
        "seconds": round(time.perf_counter() - start, 1),
    }
    _note(f"writing {len(labels)} pseudo-labelled images to {output}", verbose)
    data_lib.write_pseudo_labeled(output, images, labels, metadata)
    return metadata
