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
  rest from the labelled set (reshuffled every epoch), the two parts are shuffled together (without
  that, BatchNorm and per-replica batches see unmixed halves), and an epoch is as many batches as
  the labelled set alone would give. Augmentation applies to both parts. One difference: the
  last batch of an epoch is topped up with labelled examples from the start of the epoch's
  order, so every batch is full (the official sampler tops it up with extra unlabelled
  examples).

Every random choice of training epoch e (order, augmentation, pseudo-label draws) derives from
`epoch_key` (``seed``, e) (`TrainingEpochs`), so a run resumed at epoch e sees the batches the
uninterrupted run saw.
"""

import collections
import json
import logging
import math
import os
import zipfile

import gin
import numpy as np
import tensorflow as tf

from tfadv.cli import UserError

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
             "batch_size", "unlabeled", "training"], defaults=[None, None]
)
Data.__doc__ = """Batched train/validation/test pipelines plus what a model builder needs;
``unlabeled`` is a batched pipeline of images without labels (with ``labeled_fraction``)."""


class DatasetNotAvailableError(FileNotFoundError, UserError):
    """A TFDS dataset is not prepared on disk and was not (or could not be) downloaded.

    A `tfadv.cli.UserError`: the bin/ tools print ``message`` and ``hint`` as two lines;
    ``str()`` is both, for callers that print it themselves."""

    def __init__(self, message, hint=None):
        FileNotFoundError.__init__(self, message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return self.message + (f" {self.hint}" if self.hint else "")


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
    if images.size and not np.isfinite(images).all():
        raise ValueError(f"images hold {describe_non_finite(images)}; they must be finite "
                         f"numbers in [0, 1].")
    if images.size and not (images.min() >= 0.0 and images.max() <= 1.0):
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


def describe_non_finite(array):
    """'NaN values (k of n)' / 'infinite values (k of n)' / both, for a non-finite ``array``."""
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    kinds = [k for k, count in (("NaN", nan), ("infinite", inf)) if count]
    return f"{' and '.join(kinds)} values ({nan + inf} of {array.size})"


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
        hint = "create it with bin/pseudo_label (see gin/rst.gin for the command)."
        err = FileNotFoundError(f"pseudo_labeled file {path!r} does not exist; {hint}")
        err.hint = hint  # tfadv.cli prints it on its own line
        raise err
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise ValueError(f"pseudo_labeled file {path!r} is truncated or corrupt: not a valid "
                         f".npz (zip) archive.")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files)
            if not missing:
                images, labels = f["images"], f["labels"]
                metadata = json.loads(str(f["metadata"])) if "metadata" in f.files else {}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:  # a damaged member
        raise ValueError(f"pseudo_labeled file {path!r} is truncated or corrupt "
                         f"({type(err).__name__}: {err}).") from err
    if missing:
        raise ValueError(f"pseudo_labeled file {path!r} lacks arrays {sorted(missing)}.")
    if images.dtype == np.uint8:
        check = images[:1].astype("float32") / 255.0
    else:
        check = images
        if np.issubdtype(images.dtype, np.number) and not np.isfinite(images).all():
            raise ValueError(f"pseudo_labeled file {path!r} holds "
                             f"{describe_non_finite(images)} in 'images'; images must be finite "
                             f"numbers in [0, 1].")
    try:
        validate_arrays(check, None, image_shape=image_shape)
    except ValueError as err:
        raise ValueError(f"pseudo_labeled file {path!r}: {err}") from err
    validate_arrays(images[:0].astype("float32").reshape(0, *image_shape), labels[:0])
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"pseudo_labeled labels must be {len(images)} integers in "
                         f"[0, {num_classes}); got shape {labels.shape}, dtype {labels.dtype}.")
    if not len(images):
        raise ValueError(f"pseudo_labeled file {path!r} holds no examples.")
    return images, labels.astype("int32"), metadata


def augment_fn(kind, image_shape, pad=4):
    """The papers' augmentation for ``kind`` in {None, 'crop', 'crop_flip'}, as a map function
    ``augment(image, label, seed=None)``: stateless ops seeded by ``seed`` (shape [2]; a fresh
    random seed when ``None``), so a pipeline that passes per-example seeds is reproducible."""
    if kind is None:
        return None

    def augment(image, label, seed=None):
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
        seed = tf.cast(seed, tf.int64)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(padded, image_shape, seed=seed)
        if kind == "crop_flip":
            image = tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 1])
        return image, label

    return augment


def epoch_key(seed, epoch):
    """The int64 key of training epoch ``epoch`` (0-based) of a run seeded with ``seed``: every
    random choice of that epoch's batches (order, augmentation, pseudo-label draws) derives
    from it, so epoch e has the same batches whether or not the run was resumed before it."""
    return tf.cast(seed, tf.int64) * 1000003 + tf.cast(epoch, tf.int64)


def _augmented(ds, augment, key, salt=0):
    """``ds`` (image, label) with ``augment`` seeded per example by (key, salt, position)."""
    if augment is None:
        return ds
    return ds.enumerate().map(
        lambda i, ex: augment(*ex, seed=tf.stack([key + salt, i])),
        num_parallel_calls=tf.data.AUTOTUNE)


def _shuffled(cached, size, shuffle_buffer, key):
    """``cached`` (``size`` examples) in an order fixed by ``key``: the examples are cut into
    blocks of ``shuffle_buffer``, the blocks are visited in a random order and each block is
    permuted as a whole (`tf.data.Dataset.shuffle` takes no tensor seed, so it cannot be keyed
    by the epoch). With ``shuffle_buffer >= size`` (digits) it is one uniform permutation."""
    blocks = max(1, math.ceil(size / shuffle_buffer))
    order = tf.random.experimental.stateless_shuffle(
        tf.range(blocks, dtype=tf.int64), tf.stack([key, tf.constant(-1, tf.int64)]))

    def permute(block, examples):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(tf.nest.flatten(examples)[0])[0]), tf.stack([key, block]))
        return tf.nest.map_structure(lambda t: tf.gather(t, perm), examples)

    def block(b):
        examples = cached.skip(b * shuffle_buffer).take(shuffle_buffer).batch(shuffle_buffer)
        return examples.map(lambda *ex: permute(b, ex if len(ex) > 1 else ex[0])).unbatch()

    return tf.data.Dataset.from_tensor_slices(order).flat_map(block)


def _epoch_batches(cached, size, batch_size, augment, shuffle_buffer):
    """``key -> batches of one training epoch`` over the unbatched, cached ``cached``."""
    def batches(key):
        ds = _augmented(_shuffled(cached, size, shuffle_buffer, key), augment, key)
        return ds.batch(batch_size)

    return batches


def _mixed_epoch_batches(labeled, pseudo_images, pseudo_labels, batch_size, unsup_fraction,
                         num_labeled, augment, shuffle_buffer):
    """``key -> one epoch of RST batches`` (module docstring); ``labeled`` is unbatched."""
    unsup_size = int(batch_size * unsup_fraction)
    sup_size = batch_size - unsup_size
    steps = math.ceil(num_labeled / batch_size)
    labeled = labeled.cache()
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

    def batches(key):
        sup = _augmented(_shuffled(labeled, num_labeled, shuffle_buffer, key).repeat(), augment,
                         key)
        sup = sup.batch(sup_size)
        # With replacement: draw i of the epoch is uniform over the pseudo-labelled set.
        unsup = tf.data.Dataset.range(steps * unsup_size).map(
            lambda i: tf.random.stateless_uniform([], tf.stack([key + 1, i]), maxval=count,
                                                  dtype=tf.int64))
        unsup = unsup.batch(unsup_size).map(lookup)
        if augment is not None:
            unsup = _augmented(unsup.unbatch(), augment, key, salt=2).batch(unsup_size)

        def mix(step, pair):
            (xs, ys), (xu, yu) = pair
            order = tf.random.experimental.stateless_shuffle(
                tf.range(batch_size), tf.stack([key + 3, step]))
            return (tf.gather(tf.concat([xs, xu], 0), order),
                    tf.gather(tf.concat([ys, yu], 0), order))

        return tf.data.Dataset.zip((sup, unsup)).take(steps).enumerate().map(mix)

    return batches


class TrainingEpochs:
    """The training split as a function of the epoch: `epochs` gives the batches of epochs
    ``first .. last - 1`` in one stream (what `tfadv.train` fits on, with ``steps_per_epoch``),
    each epoch's batches fixed by `epoch_key` (``seed``, epoch); `reshuffled` gives one epoch
    with a fresh key per pass (``Data.train``)."""

    def __init__(self, batches, seed, steps):
        self._batches = batches
        self.seed = seed
        self.steps = steps

    def epochs(self, first, last):
        ds = tf.data.Dataset.range(first, last).flat_map(
            lambda e: self._batches(epoch_key(self.seed, e)))
        # flat_map hides the length; Keras needs it to run every epoch on a fresh pass.
        ds = ds.apply(tf.data.experimental.assert_cardinality((last - first) * self.steps))
        return ds.prefetch(tf.data.AUTOTUNE)

    def reshuffled(self):
        keys = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).take(1)
        ds = keys.flat_map(self._batches)
        ds = ds.apply(tf.data.experimental.assert_cardinality(self.steps))
        return ds.prefetch(tf.data.AUTOTUNE)


def _finish(ds, batch_size):
    return ds.cache().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _to_float(image, label):
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def _num_examples(info, split, dataset, held_out=0):
    """Examples in ``dataset``, which is TFDS ``split`` less ``held_out`` examples."""
    try:
        return info.splits[split].num_examples - held_out
    except KeyError:  # metadata without split sizes (e.g. tfds.testing.mock_data): count
        return int(dataset.reduce(0, lambda n, _: n + 1))


class _DropMessages(logging.Filter):
    """Drops log records whose message contains ``needle``."""

    def __init__(self, needle):
        super().__init__()
        self.needle = needle

    def filter(self, record):
        return self.needle not in record.getMessage()


def _tfds_splits(name, data_dir, validation_size, download):
    import tensorflow_datasets as tfds

    searched = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")
    splits = ["train", "test"]
    if validation_size:
        splits = [f"train[:-{validation_size}]", f"train[-{validation_size}:]", "test"]
    quiet = _DropMessages("has no dataset_info.json")  # tfds' warning before it fails
    logging.getLogger("absl").addFilter(quiet)
    try:
        datasets, info = tfds.load(name, split=splits, data_dir=data_dir, download=download,
                                   as_supervised=True, with_info=True)
    except Exception as err:  # tfds raises several types; all mean "not usable here".
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        not_found = isinstance(err, AssertionError) and "could not find data" in detail
        raise DatasetNotAvailableError(
            f"TFDS dataset {name!r} is not prepared in data_dir {searched!r} "
            f"(load_dataset.download = {download})"
            + ("." if not_found else f" ({type(err).__name__}: {detail[:200]})."),
            hint=f"prepare it on a machine with network access, e.g. `tfds build {name} "
                 f"--data_dir={searched}`, and copy that directory here, or bind "
                 f"load_dataset.download = True where downloads work.") from err
    finally:
        logging.getLogger("absl").removeFilter(quiet)
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
        raise ValueError(f"load_dataset.name: dataset name must be one of "
                         f"{', '.join(DATASETS)}; got {name!r}.")
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
    finished = {split: None if ds is None else _finish(ds, batch_size)
                for split, ds in pipes.items() if split != "train"}
    batches = _epoch_batches(pipes["train"].cache(), sizes["train"], batch_size, aug,
                             shuffle_buffer)
    if unlabeled is not None:
        sizes["unlabeled"] = _count(unlabeled)
        unlabeled = unlabeled.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    if pseudo_labeled is not None:
        images, labels, _ = read_pseudo_labeled(pseudo_labeled, tuple(shape), num_classes)
        batches = _mixed_epoch_batches(pipes["train"], images, labels, batch_size,
                                       unsup_fraction, sizes["train"], aug, shuffle_buffer)
        sizes["pseudo_labeled"] = len(labels)
    training = TrainingEpochs(batches, seed, math.ceil(sizes["train"] / batch_size))
    finished["train"] = training.reshuffled()
    return Data(name=name, train=finished["train"], validation=finished["validation"],
                test=finished["test"], image_shape=tuple(int(d) for d in shape),
                num_classes=int(num_classes), sizes=sizes, batch_size=batch_size,
                unlabeled=unlabeled, training=training)
