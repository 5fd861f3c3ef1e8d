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

Subsets and extra data (all from gin, all applied before batching):

- ``classes``: keep these classes only, relabelled 0..k-1 in the order given (e.g. digits 0-4 as
  a pre-training source task and 5-9 as the fine-tuning target).
- ``labeled_fraction``: keep this fraction of the training split labelled; the rest becomes
  `Data.unlabeled` (images without labels), e.g. for `bin/pseudo_label`. Digits: stratified by
  class with ``random_state=0``; TFDS: the first fraction of the training split.
- ``pseudo_labeled``: a ``.npz`` written by `bin/pseudo_label` (``images``, ``labels``,
  ``metadata``). Training batches then mix labelled and pseudo-labelled examples as robust
  self-training does (Carmon et al. 2019, ``datasets.py:SemiSupervisedSampler``): a fraction
  ``unsup_fraction`` of each batch is drawn from the pseudo-labelled set WITH replacement, the
  rest from the labelled set (reshuffled every pass), the two parts are shuffled together (without
  that, BatchNorm and per-replica batches see unmixed halves), and an epoch is as many batches as
  the labelled set alone would give. Augmentation applies to both parts. One difference: the
  labelled stream runs on across epoch boundaries, so every batch is full (the official sampler
  tops up the last labelled batch of a pass with extra unlabelled examples).
"""

import collections
import json
import math
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
             "batch_size", "unlabeled"], defaults=[None]
)
Data.__doc__ = """Batched train/validation/test pipelines plus what a model builder needs;
``unlabeled`` is a batched pipeline of images without labels (with ``labeled_fraction``)."""


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


def select_classes(images, labels, classes):
    """Keeps the examples of ``classes`` (numpy arrays), relabelled 0..k-1 in that order."""
    lookup = np.full(int(max(classes)) + 1, -1, dtype="int32")
    lookup[list(classes)] = np.arange(len(classes))
    keep = np.isin(labels, classes)
    return images[keep], lookup[labels[keep]]


def split_labeled(images, labels, fraction, seed=0):
    """Stratified split of a training set into a labelled part (``fraction``) and the rest."""
    from sklearn.model_selection import train_test_split

    x_lab, x_unl, y_lab, _ = train_test_split(images, labels, train_size=fraction,
                                              stratify=labels, random_state=seed)
    return (x_lab, y_lab), x_unl


def write_pseudo_labeled(path, images, labels, metadata):
    """Writes a pseudo-labelled set atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.npz")
    try:
        np.savez(tmp, images=images, labels=np.asarray(labels, dtype="int32"),
                 metadata=np.array(json.dumps(metadata)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_pseudo_labeled(path, image_shape, num_classes):
    """Reads and checks a file of `write_pseudo_labeled`: (images, labels, metadata dict).

    Images may be uint8 (0..255) or floats in [0, 1]."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"pseudo_labeled file {path!r} does not exist; create it with bin/pseudo_label "
            "(see gin/rst.gin for the command).")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"pseudo_labeled file {path!r} lacks arrays {sorted(missing)}.")
        images, labels = f["images"], f["labels"]
        metadata = json.loads(str(f["metadata"])) if "metadata" in f.files else {}
    if images.dtype == np.uint8:
        check = images[:1].astype("float32") / 255.0
    else:
        check = images
    validate_arrays(check, None, image_shape=image_shape)
    validate_arrays(images[:0].astype("float32").reshape(0, *image_shape), labels[:0])
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"pseudo_labeled labels must be {len(images)} integers in "
                         f"[0, {num_classes}); got shape {labels.shape}, dtype {labels.dtype}.")
    if not len(images):
        raise ValueError(f"pseudo_labeled file {path!r} holds no examples.")
    return images, labels.astype("int32"), metadata


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


def _mixed_batches(labeled, pseudo_images, pseudo_labels, batch_size, unsup_fraction, num_labeled,
                   augment, seed, shuffle_buffer):
    """RST batches (module docstring): ``labeled`` is an unbatched (image, label) dataset."""
    unsup_size = int(batch_size * unsup_fraction)
    sup_size = batch_size - unsup_size
    sup = labeled.cache().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    sup = sup.repeat()
    if augment is not None:
        sup = sup.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    sup = sup.batch(sup_size)
    count = len(pseudo_labels)
    to_float = pseudo_images.dtype == np.uint8

    def gather(indices):  # in NumPy, so the (possibly huge) set is never a graph constant
        images = pseudo_images[indices]
        return (images.astype("float32") / 255.0 if to_float else images.astype("float32"),
                pseudo_labels[indices])

    def lookup(indices):
        images, labels = tf.numpy_function(gather, [indices], [tf.float32, tf.int32])
        images.set_shape([unsup_size, *pseudo_images.shape[1:]])
        labels.set_shape([unsup_size])
        return images, labels

    unsup = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).map(
        lambda r: r % count).batch(unsup_size).map(lookup)
    if augment is not None:
        unsup = unsup.unbatch().map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(
            unsup_size)

    def mix(a, b):
        images = tf.concat([a[0], b[0]], axis=0)
        labels = tf.concat([a[1], b[1]], axis=0)
        order = tf.random.shuffle(tf.range(batch_size), seed=seed)
        return tf.gather(images, order), tf.gather(labels, order)

    batches = tf.data.Dataset.zip((sup, unsup)).map(mix).take(math.ceil(num_labeled / batch_size))
    return batches.prefetch(tf.data.AUTOTUNE)


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


def _check_options(classes, labeled_fraction, unsup_fraction):
    if classes is not None:
        if (not isinstance(classes, (list, tuple)) or len(classes) < 2
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                           for c in classes) or len(set(classes)) != len(classes)):
            raise ValueError(f"classes must be a list of >= 2 distinct class indices; got "
                             f"{classes!r}.")
    if labeled_fraction is not None and not (isinstance(labeled_fraction, (int, float))
                                             and 0 < labeled_fraction < 1):
        raise ValueError(f"labeled_fraction must be None or a number in (0, 1); got "
                         f"{labeled_fraction!r}.")
    if not (isinstance(unsup_fraction, (int, float)) and 0 < unsup_fraction < 1):
        raise ValueError(f"unsup_fraction must be a number in (0, 1); got {unsup_fraction!r}.")


def _tfds_select(ds, classes, num_classes):
    lookup = np.full(num_classes, -1, dtype="int32")
    lookup[list(classes)] = np.arange(len(classes))
    table = tf.constant(lookup)
    ds = ds.filter(lambda x, y: tf.gather(table, tf.cast(y, tf.int32)) >= 0)
    return ds.map(lambda x, y: (x, tf.gather(table, tf.cast(y, tf.int32))))


def _count(ds):
    return int(ds.reduce(0, lambda n, _: n + 1))


@gin.configurable
def load_dataset(name="digits", batch_size=128, validation_size=None, data_dir=None,
                 augment=True, download=False, shuffle_buffer=10000, seed=0, classes=None,
                 labeled_fraction=None, pseudo_labeled=None, unsup_fraction=0.5):
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
      classes: keep only these classes, relabelled 0..k-1 in this order (all splits).
      labeled_fraction: fraction of the training split kept labelled, in (0, 1); the rest is
        returned as ``Data.unlabeled``.
      pseudo_labeled: path of a pseudo-labelled ``.npz`` (`bin/pseudo_label`) to mix into the
        training batches.
      unsup_fraction: fraction of each training batch drawn from ``pseudo_labeled``, in (0, 1)
        (RST: 0.5).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {list(DATASETS)}; got {name!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    if validation_size is not None and (not isinstance(validation_size, int)
                                        or validation_size < 0):
        raise ValueError(f"validation_size must be None or an integer >= 0; got "
                         f"{validation_size!r}.")
    _check_options(classes, labeled_fraction, unsup_fraction)

    unlabeled = None
    if name == "digits":
        if validation_size not in (None, DIGITS_VALIDATION_SIZE):
            raise ValueError(
                f"validation_size for digits is fixed at {DIGITS_VALIDATION_SIZE} (a documented "
                f"split); got {validation_size}.")
        arrays = digits_arrays()
        num_classes = 10
        if classes is not None:
            if max(classes) >= num_classes:
                raise ValueError(f"classes must lie in [0, {num_classes}); got {classes!r}.")
            arrays = {k: select_classes(*v, classes) for k, v in arrays.items()}
            num_classes = len(classes)
        if labeled_fraction is not None:
            arrays["train"], unlabeled = split_labeled(*arrays["train"], labeled_fraction)
            unlabeled = tf.data.Dataset.from_tensor_slices(unlabeled)
        for images, labels in arrays.values():
            validate_arrays(images, labels, num_classes=num_classes)
        pipes = {split: tf.data.Dataset.from_tensor_slices(arr) for split, arr in arrays.items()}
        shape, kind = arrays["train"][0].shape[1:], None
        sizes = {split: len(arr[1]) for split, arr in arrays.items()}
    else:
        kind, default_val = TFDS_DATASETS[name]
        val = default_val if validation_size is None else validation_size
        train, validation, test, shape, num_classes, sizes = _tfds_splits(
            name, data_dir, val, download)
        pipes = {"train": train.map(_to_float), "test": test.map(_to_float),
                 "validation": None if validation is None else validation.map(_to_float)}
        if classes is not None:
            if max(classes) >= num_classes:
                raise ValueError(f"classes must lie in [0, {num_classes}); got {classes!r}.")
            pipes = {k: None if v is None else _tfds_select(v, classes, num_classes)
                     for k, v in pipes.items()}
            sizes = {k: 0 if v is None else _count(v) for k, v in pipes.items()}
            num_classes = len(classes)
        if labeled_fraction is not None:
            keep = int(sizes["train"] * labeled_fraction)
            unlabeled = pipes["train"].skip(keep).map(lambda x, y: x)
            pipes["train"] = pipes["train"].take(keep)
            sizes["train"] = keep

    aug = augment_fn(kind, shape) if augment else None
    finished = {
        split: None if ds is None else _finish(ds, batch_size, split == "train", aug, seed,
                                               shuffle_buffer)
        for split, ds in pipes.items()
    }
    if unlabeled is not None:
        sizes["unlabeled"] = _count(unlabeled)
        unlabeled = unlabeled.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    if pseudo_labeled is not None:
        images, labels, _ = read_pseudo_labeled(pseudo_labeled, tuple(shape), num_classes)
        finished["train"] = _mixed_batches(pipes["train"], images, labels, batch_size,
                                           unsup_fraction, sizes["train"], aug, seed,
                                           shuffle_buffer)
        sizes["pseudo_labeled"] = len(labels)
    return Data(name=name, train=finished["train"], validation=finished["validation"],
                test=finished["test"], image_shape=tuple(int(d) for d in shape),
                num_classes=int(num_classes), sizes=sizes, batch_size=batch_size,
                unlabeled=unlabeled)
