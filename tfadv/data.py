"""The one input pipeline of tfadv: `tf.data` of float32 NHWC images in [0, 1], int32 labels.

Datasets (``name``):

- ``digits`` (default, no network needed): the 1,797 8x8 handwritten digits bundled with
  scikit-learn (`sklearn.datasets.load_digits`), pixel values 0..16 divided by 16. The split is
  fixed and stratified by class with scikit-learn's ``train_test_split`` and ``random_state=0``:
  360 test images (20%), then 180 validation images (10% of the whole) carved from the rest,
  leaving 1,257 for training. No augmentation (the papers' 4-pixel crop is half a digit).
- TFDS datasets ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``, read
  from ``data_dir`` (TFDS' default when ``None``). The last ``validation_size`` training examples
  are held out as validation (Rice et al. hold out 1,000). Augmentation as in the papers' code:
  none for MNIST and Fashion-MNIST (Madry, TRADES), 4-pixel zero pad + random 32x32 crop for SVHN,
  the same plus random horizontal flip for CIFAR-10/100.

The validation split exists so that checkpoint selection (early stopping) never looks at test.
"""

import collections
import os

import gin
import numpy as np
import tensorflow as tf

TFDS_DATASETS = {
    # name: (augmentation, default validation size)
    "mnist": (None, 1000),
    "fashion_mnist": (None, 1000),
    "svhn_cropped": ("crop", 1000),
    "cifar10": ("crop_flip", 1000),
    "cifar100": ("crop_flip", 1000),
}
DATASETS = ("digits",) + tuple(TFDS_DATASETS)

DIGITS_TEST_SIZE = 360
DIGITS_VALIDATION_SIZE = 180

Data = collections.namedtuple(
    "Data", ["name", "train", "validation", "test", "image_shape", "num_classes", "sizes",
             "batch_size"]
)
Data.__doc__ = """Batched train/validation/test pipelines plus what a model builder needs."""


class DatasetNotAvailableError(FileNotFoundError):
    """A TFDS dataset is not prepared on disk and was not (or could not be) downloaded."""


def validate_arrays(images, labels=None, image_shape=None, num_classes=None):
    """Raises ValueError unless ``images`` are finite NHWC floats in [0, 1] of ``image_shape``
    and ``labels`` are integers in [0, num_classes)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be a 4-D NHWC array; got shape {images.shape}.")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"images must have shape (batch, {', '.join(map(str, image_shape))}) to match the "
            f"model; got {images.shape}."
        )
    if images.size and not (np.isfinite(images).all() and images.min() >= 0.0
                            and images.max() <= 1.0):
        raise ValueError(
            f"images must lie in [0, 1] (divide uint8 images by 255); got values in "
            f"[{np.nanmin(images):g}, {np.nanmax(images):g}]."
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must be integer class indices of shape ({images.shape[0]},); got shape "
                f"{labels.shape}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
        if num_classes is not None and labels.size and (labels.min() < 0
                                                        or labels.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); got values in "
                f"[{labels.min()}, {labels.max()}]."
            )


def digits_arrays():
    """The fixed digits split as numpy arrays: {'train'|'validation'|'test': (images, labels)}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype("float32")[..., None]
    labels = bunch.target.astype("int32")
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=DIGITS_VALIDATION_SIZE, stratify=y_rest, random_state=0)
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


def augment_fn(kind, image_shape, pad=4):
    """The papers' augmentation for ``kind`` in {None, 'crop', 'crop_flip'}, as a map function."""
    if kind is None:
        return None
    height, width, _ = image_shape

    def augment(image, label):
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.random_crop(padded, image_shape)
        if kind == "crop_flip":
            image = tf.image.random_flip_left_right(image)
        return image, label

    return augment


def _finish(ds, batch_size, training, augment, seed, shuffle_buffer):
    ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment is not None:
            ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _to_float(image, label):
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def _num_examples(info, split, dataset, held_out=0):
    """Examples in ``dataset``, which is TFDS ``split`` less ``held_out`` examples."""
    try:
        return info.splits[split].num_examples - held_out
    except KeyError:  # metadata without split sizes (e.g. tfds.testing.mock_data): count
        return int(dataset.reduce(0, lambda n, _: n + 1))


def _tfds_splits(name, data_dir, validation_size, download):
    import tensorflow_datasets as tfds

    searched = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")
    splits = ["train", "test"]
    if validation_size:
        splits = [f"train[:-{validation_size}]", f"train[-{validation_size}:]", "test"]
    try:
        datasets, info = tfds.load(name, split=splits, data_dir=data_dir, download=download,
                                   as_supervised=True, with_info=True)
    except Exception as err:  # tfds raises several types; all mean "not usable here".
        raise DatasetNotAvailableError(
            f"TFDS dataset {name!r} is not prepared in data_dir {searched!r} "
            f"(download={download}). Prepare it on a machine with network access, e.g. "
            f"`tfds build {name} --data_dir={searched}`, and copy that directory here, or bind "
            f"load_dataset.download = True where downloads work. ({type(err).__name__}: {err})"
        ) from err
    if validation_size:
        train, validation, test = datasets
    else:
        (train, test), validation = datasets, None
    shape = tuple(info.features["image"].shape)
    num_classes = info.features["label"].num_classes
    sizes = {"train": _num_examples(info, "train", train, held_out=validation_size or 0),
             "validation": validation_size or 0,
             "test": _num_examples(info, "test", test)}
    return train, validation, test, shape, num_classes, sizes


@gin.configurable
def load_dataset(name="digits", batch_size=128, validation_size=None, data_dir=None,
                 augment=True, download=False, shuffle_buffer=10000, seed=0):
    """Loads dataset ``name`` as batched `tf.data` pipelines (see the module docstring).

    Args:
      name: one of `DATASETS`.
      batch_size: the GLOBAL batch size (split across replicas by the distribution strategy).
      validation_size: examples held out from train; ``None`` means the dataset's default
        (180 for digits, 1000 for TFDS), 0 means no validation split (TFDS only).
      data_dir: TFDS data directory (TFDS' default when ``None``).
      augment: apply the papers' training augmentation.
      download: let TFDS download when the dataset is missing (off by default: fails fast).
      shuffle_buffer, seed: training shuffle buffer and seed.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {list(DATASETS)}; got {name!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    if validation_size is not None and (not isinstance(validation_size, int)
                                        or validation_size < 0):
        raise ValueError(f"validation_size must be None or an integer >= 0; got "
                         f"{validation_size!r}.")

    if name == "digits":
        if validation_size not in (None, DIGITS_VALIDATION_SIZE):
            raise ValueError(
                f"validation_size for digits is fixed at {DIGITS_VALIDATION_SIZE} (a documented "
                f"split); got {validation_size}.")
        arrays = digits_arrays()
        for images, labels in arrays.values():
            validate_arrays(images, labels, num_classes=10)
        pipes = {split: tf.data.Dataset.from_tensor_slices(arr) for split, arr in arrays.items()}
        shape, num_classes, kind = arrays["train"][0].shape[1:], 10, None
        sizes = {split: len(arr[1]) for split, arr in arrays.items()}
    else:
        kind, default_val = TFDS_DATASETS[name]
        val = default_val if validation_size is None else validation_size
        train, validation, test, shape, num_classes, sizes = _tfds_splits(
            name, data_dir, val, download)
        pipes = {"train": train.map(_to_float), "test": test.map(_to_float),
                 "validation": None if validation is None else validation.map(_to_float)}

    aug = augment_fn(kind, shape) if augment else None
    finished = {
        split: None if ds is None else _finish(ds, batch_size, split == "train", aug, seed,
                                               shuffle_buffer)
        for split, ds in pipes.items()
    }
    return Data(name=name, train=finished["train"], validation=finished["validation"],
                test=finished["test"], image_shape=tuple(int(d) for d in shape),
                num_classes=int(num_classes), sizes=sizes, batch_size=batch_size)
