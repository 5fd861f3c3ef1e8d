"""Your own data through the one pipeline: npz files, image folders and any TFDS dataset load
with the documented splits and are checked before any work; each trains end to end. Also the
weak-teacher warning of bin/pseudo_label and relative paths in gin files."""

import json
import os
import time

import gin
import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import QUICK_TRAIN, dataset_arrays, quick_train
from tfadv import cli, config, data, models, pseudo_label
from tfadv import train as train_lib


def _digits(n=200):
    """The first ``n`` scikit-learn digits as uint8 0..255 images (N, 8, 8) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (np.round(bunch.images[:n] * 255 / 16).astype("uint8"),
            bunch.target[:n].astype("int64"))


def _write_folder(root, images, labels):
    """One PNG per image, ``root/<label>/<index>.png`` (zero-padded: sorted = index order)."""
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, str(label), f"{i:04d}.png"))


def _split(n, n_test, n_val, seed=0):
    """The documented split: indices of test, validation and training examples."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]


def _rows(x):
    return sorted(row.tobytes() for row in np.asarray(x))


def _check_splits(d, x, y, test, val, train):
    """``d``'s splits are exactly the documented ones of float images ``x`` and labels ``y``
    (train compared as a multiset: it is reshuffled)."""
    assert d.sizes == {"train": len(train), "validation": len(val), "test": len(test)}
    for split, index in (("test", test), ("validation", val)):
        xs, ys = dataset_arrays(getattr(d, split))
        assert xs.dtype == np.float32 and ys.dtype == np.int32
        np.testing.assert_array_equal(xs, x[index])
        np.testing.assert_array_equal(ys, y[index])
    xs, ys = dataset_arrays(d.train)
    assert _rows(xs) == _rows(x[train]) and sorted(ys) == sorted(y[train])
    assert 0.0 <= xs.min() and xs.max() <= 1.0


# --- npz -------------------------------------------------------------------------------------
def test_npz_uint8_one_hot_loads_with_the_documented_split(tmp_path, monkeypatch):
    images, labels = _digits()
    np.savez(tmp_path / "digits.npz", x=images, y=np.eye(10, dtype="float32")[labels],
             class_names=np.array([f"digit {k}" for k in range(10)]))
    d = data.load_dataset(f"npz:{tmp_path / 'digits.npz'}", batch_size=32)
    assert d.name == f"npz:{tmp_path / 'digits.npz'}"
    assert d.image_shape == (8, 8, 1) and d.num_classes == 10
    assert d.class_names == [f"digit {k}" for k in range(10)]
    # uint8 0..255 -> float32 k / 255 exactly; 20% test, then 10% of the rest validation.
    x = images[..., None].astype("float32") / np.float32(255)
    _check_splits(d, x, labels, *_split(200, 40, 16))
    # The same file by a bare relative path from its directory (no prefix: ends in .npz).
    monkeypatch.chdir(tmp_path)
    again = data.load_dataset("digits.npz", batch_size=32, split_seed=1)
    assert again.name == d.name
    np.testing.assert_array_equal(dataset_arrays(again.test)[0],
                                  x[_split(200, 40, 16, seed=1)[0]])


def test_npz_with_a_test_set_float_images_and_augmentation(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.uniform(size=(30, 12, 12, 3)).astype("float32"), rng.integers(0, 3, 30)
    x_test, y_test = rng.uniform(size=(7, 12, 12, 3)).astype("float32"), rng.integers(0, 3, 7)
    np.savez(tmp_path / "own.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    d = data.load_dataset(str(tmp_path / "own.npz"), batch_size=8, validation_size=5,
                          augment=False)
    assert d.image_shape == (12, 12, 3) and d.num_classes == 3 and d.class_names is None
    order = np.random.default_rng(0).permutation(30)
    assert d.sizes == {"train": 25, "validation": 5, "test": 7}
    np.testing.assert_array_equal(dataset_arrays(d.test)[0], x_test)
    np.testing.assert_array_equal(dataset_arrays(d.validation)[0], x[order[:5]])
    assert _rows(dataset_arrays(d.train)[0]) == _rows(x[order[5:]])
    # Augmentation is chosen by name for your own data: pad + crop + flip keeps the shape and
    # moves pixels (zeros enter at the border).
    crop = data.load_dataset(str(tmp_path / "own.npz"), batch_size=25, validation_size=5,
                             augment="crop_flip")
    xa, _ = next(iter(crop.train))
    assert xa.shape == (25, 12, 12, 3) and _rows(xa) != _rows(x[order[5:]])


BAD_NPZ = [
    ("nan", lambda x, y: ({"x": np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan,
                                         x / 255.0), "y": y}),
     "array 'x' holds NaN values (1 of 640); images must be finite numbers in [0, 1]."),
    ("float out of [0, 1]", lambda x, y: ({"x": x.astype("float32"), "y": y}),
     "array 'x' must lie in [0, 1] (float images); got values in [0, 255]: divide by 255, or "
     "store uint8."),
    ("labels out of range", lambda x, y: ({"x": x, "y": np.where(y == 9, 11, y),
                                           "class_names": np.array(list("abcdefghij"))}),
     "array 'y' must lie in [0, 10); got values in [0, 11]."),
    ("negative labels", lambda x, y: ({"x": x, "y": y - 1}),
     "array 'y' must lie in [0, num_classes); got values in [-1, 8]."),
    ("lengths differ", lambda x, y: ({"x": x, "y": y[:9]}),
     "array 'y' holds 9 labels for 10 images; give one label per image."),
    ("wrong rank", lambda x, y: ({"x": x.reshape(10, 64), "y": y}),
     "array 'x' must hold images of shape (N, height, width, channels) or (N, height, width); "
     "got shape (10, 64)."),
    ("channels first", lambda x, y: ({"x": x.reshape(10, 1, 8, 8), "y": y}),
     "array 'x' has shape (10, 1, 8, 8), channels first; store the images channels last: "
     "x.transpose(0, 2, 3, 1)."),
    ("float labels", lambda x, y: ({"x": x, "y": y.astype("float32")}),
     "array 'y' must be integer class indices; got dtype float32 (store y.astype('int64') if "
     "they are whole numbers)."),
    ("not one-hot", lambda x, y: ({"x": x, "y": np.ones((10, 3))}),
     "array 'y' has shape (10, 3) but is not one-hot"),
    ("int64 images", lambda x, y: ({"x": x.astype("int64"), "y": y}),
     "array 'x' must be uint8 (0..255) or floats in [0, 1]; got dtype int64 (convert with "
     "x.astype('uint8'))."),
    ("test shape differs", lambda x, y: ({"x": x, "y": y, "x_test": x[:, :4], "y_test": y}),
     "array 'x_test' holds images of shape (4, 8, 1), array 'x' of shape (8, 8, 1)"),
    ("missing labels", lambda x, y: ({"images": x, "labels": y}),
     "lacks arrays ['x', 'y']; it has ['images', 'labels']"),
]


@pytest.mark.parametrize("arrays, message", [b[1:] for b in BAD_NPZ], ids=[b[0] for b in BAD_NPZ])
def test_npz_errors_are_one_line_naming_file_and_array(tmp_path, arrays, message):
    images, labels = _digits(10)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays(images, labels))
    with pytest.raises(data.InvalidDatasetError) as err:
        data.load_dataset(f"npz:{path}")
    assert isinstance(err.value, cli.UserError)
    line, hint = cli.describe(err.value)  # what the bin/ tools print after `tfadv: error: `
    assert line.startswith(f"npz file {path}") and message in line and hint is None


def test_npz_file_missing_or_not_an_archive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DatasetNotAvailableError, match=f"npz file {tmp_path}/none.npz "
                                                            f"does not exist"):
        data.load_dataset("npz:none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(data.InvalidDatasetError, match="is not a valid .npz"):
        data.load_dataset("junk.npz")


# --- image folders ---------------------------------------------------------------------------
def test_image_folder_of_pngs_loads_like_the_source_arrays(tmp_path):
    images, labels = _digits(100)
    _write_folder(tmp_path / "flat", images, labels)
    d = data.load_dataset(f"folder:{tmp_path / 'flat'}", batch_size=32)
    assert d.class_names == [str(k) for k in range(10)] and d.num_classes == 10
    assert d.image_shape == (8, 8, 1)  # their own size; all grayscale -> one channel
    # The loader's order: class by class, files sorted (= index order); then the split.
    order = np.concatenate([np.flatnonzero(labels == k) for k in range(10)])
    x = images[order][..., None].astype("float32") / np.float32(255)
    _check_splits(d, x, labels[order], *_split(100, 20, 8))

    # train/ and test/ sub-folders; image size and color mode from gin.
    _write_folder(tmp_path / "split" / "train", images[:80], labels[:80])
    _write_folder(tmp_path / "split" / "test", images[80:], labels[80:])
    gin.bind_parameter("read_image_folder.image_size", (16, 12))
    gin.bind_parameter("read_image_folder.color_mode", "rgb")
    d = data.load_dataset(f"{tmp_path / 'split'}/", batch_size=32)  # a bare path with a '/'
    assert d.sizes == {"train": 72, "validation": 8, "test": 20}
    assert d.image_shape == (16, 12, 3)
    xt, yt = dataset_arrays(d.test)
    test_order = np.concatenate([80 + np.flatnonzero(labels[80:] == k) for k in range(10)])
    np.testing.assert_array_equal(yt, labels[test_order])
    assert np.all(xt[..., 0] == xt[..., 2]) and 0.0 <= xt.min() and xt.max() <= 1.0


def test_image_folder_errors(tmp_path):
    images, labels = _digits(6)
    _write_folder(tmp_path / "one", images[:2], [0, 0])
    with pytest.raises(data.InvalidDatasetError, match=r"one sub-folder per class \(at least "
                                                       r"2\); found \['0'\]"):
        data.load_dataset(f"folder:{tmp_path / 'one'}")
    _write_folder(tmp_path / "mixed", images[:4], [0, 0, 1, 1])
    Image.fromarray(np.zeros((9, 8), "uint8")).save(tmp_path / "mixed" / "1" / "big.png")
    with pytest.raises(data.InvalidDatasetError,
                       match=r"2 different sizes \(8x8 in 0/0000.png; 9x8 in 1/big.png\): bind "
                             r"read_image_folder.image_size = \(height, width\)"):
        data.load_dataset(f"folder:{tmp_path / 'mixed'}")
    os.makedirs(tmp_path / "empty" / "a")
    _write_folder(tmp_path / "empty", images[:2], ["b", "b"])
    with pytest.raises(data.InvalidDatasetError, match="empty/a holds no images"):
        data.load_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(data.DatasetNotAvailableError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="read_image_folder.color_mode must be"):
        data.read_image_folder(str(tmp_path / "mixed"), color_mode="cmyk")


# --- TFDS ------------------------------------------------------------------------------------
def test_any_tfds_dataset_with_explicit_splits():
    with tfds.testing.mock_data(num_examples=30):
        d = data.load_dataset("tfds:kmnist", batch_size=8, train_split="train[:90%]",
                              test_split="test", validation_size=5)
        # The last 5 examples of the train split as TFDS reads it (in a fixed order).
        source = tfds.load("kmnist", split="train[:90%]", as_supervised=True)
        expected = np.stack([x.numpy() for x, _ in source])[-5:] / np.float32(255)
        xv, yv = dataset_arrays(d.validation)
        xt, yt = dataset_arrays(d.test)
        train_count = sum(len(y) for _, y in d.train)
        with pytest.raises(data.InvalidDatasetError, match="fixed-size uint8 images"):
            data.load_dataset("tfds:cats_vs_dogs")  # images of any size
    # (mock data ignores the slice: the split has 30 examples)
    assert d.sizes == {"train": 25, "validation": 5, "test": 30} and train_count == 25
    assert d.image_shape == (28, 28, 1) and d.num_classes == 10 and len(d.class_names) == 10
    np.testing.assert_array_equal(xv, expected)
    assert xt.dtype == np.float32 and yt.dtype == np.int32 and 0 <= yt.min() and yt.max() < 10
    assert 0.0 <= xt.min() and xt.max() <= 1.0 and len(yt) == 30


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": "imagenet"}, "or your own data as 'npz:FILE', 'folder:DIR' or 'tfds:NAME'; got "
                           "'imagenet'"),
    ({"name": "tfds:mnist", "train_split": "train[:90%"}, "must be a TFDS split spec"),
    ({"name": "digits", "test_split": "test"}, "'digits' is not a TFDS dataset"),
    ({"augment": "rotate"}, "augment must be True"),
    ({"test_fraction": 1.0}, "test_fraction must be a number in"),
])
def test_bad_own_data_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        data.load_dataset(**kwargs)


def test_dataset_kind_of_each_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.dataset_kind("digits") == ("digits", None)
    assert data.dataset_kind("mnist") == data.dataset_kind("tfds:mnist") == ("tfds", "mnist")
    assert data.dataset_kind("tfds:kmnist") == ("tfds", "kmnist")
    assert data.dataset_kind("npz:a.npz") == data.dataset_kind("a.npz") == (
        "npz", str(tmp_path / "a.npz"))
    assert data.dataset_kind("folder:imgs") == data.dataset_kind("./imgs") == (
        "folder", str(tmp_path / "imgs"))
    for name in ("imgs", "npz:", "tfds:", ""):
        with pytest.raises(ValueError, match="dataset name must be one of"):
            data.dataset_kind(name)


def test_model_for_other_images_is_a_one_line_error(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", x=rng.integers(0, 256, (20, 12, 12), dtype="uint8"),
             y=np.arange(20) % 2)
    gin.bind_parameter("load_dataset.name", f"npz:{tmp_path / 'big.npz'}")

    def for_8x8(input_shape, num_classes):
        return models.digits_cnn((8, 8, 1), num_classes)

    with pytest.raises(ValueError) as err:
        train_lib.train(str(tmp_path / "run"), model=for_8x8, dry_run=True)
    assert cli.describe(err.value) == ("dataset images have shape (12, 12, 1) but the model "
                                       "expects (8, 8, 1).", None)


# --- bin/pseudo_label: a weak teacher is flagged ---------------------------------------------
def _constant_teacher(label, num_classes=10):
    """A classifier that predicts ``label`` for every 8x8 image."""
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(num_classes, kernel_initializer="zeros")])
    model.layers[-1].bias.assign(np.eye(num_classes, dtype="float32")[label])
    return model


def test_weak_teacher_is_flagged_on_stderr_and_in_the_metadata(tmp_path, capsys):
    d = data.load_dataset("digits", batch_size=256, labeled_fraction=0.2)
    _, y_val = dataset_arrays(d.validation)
    out = str(tmp_path / "pseudo.npz")
    metadata = pseudo_label.pseudo_label(_constant_teacher(3), d, "split", out, verbose=0)
    accuracy = float(np.mean(y_val == 3))  # closed form: the share of 3s in validation
    assert metadata["teacher_validation_accuracy"] == pytest.approx(accuracy)
    warning = metadata["teacher_warning"]
    assert warning.startswith(f"weak teacher: {100 * accuracy:.2f}% accuracy on the held-out "
                              f"labelled validation split (below check_teacher.min_accuracy = "
                              f"80%), so about {100 * (1 - accuracy):.0f}% of its pseudo-labels "
                              f"will be wrong; RST trains on them as on true labels")
    assert "Carmon et al. 2019" in warning and "\n" not in warning
    assert capsys.readouterr().err == f"tfadv: warning: {warning}\n"
    with np.load(out) as f:
        stored = json.loads(str(f["metadata"]))
        assert stored["teacher_warning"] == warning and set(f["labels"]) == {3}
        # digits are not 8-bit: stored as float32, exactly the unlabelled images
        assert f["images"].dtype == np.float32
        assert _rows(f["images"]) == _rows(np.concatenate([b.numpy() for b in d.unlabeled]))
    # gin: a lower threshold accepts the same teacher.
    gin.bind_parameter("check_teacher.min_accuracy", 0.05)
    metadata = pseudo_label.pseudo_label(_constant_teacher(3), d, "split", out, verbose=0)
    assert metadata["teacher_warning"] is None and capsys.readouterr().err == ""


def test_check_teacher_thresholds():
    assert pseudo_label.check_teacher(0.8) is None
    assert "below check_teacher.min_accuracy = 80%" in pseudo_label.check_teacher(0.79)
    assert pseudo_label.check_teacher(0.93, baseline_accuracy=0.95) is None
    far = pseudo_label.check_teacher(0.85, baseline_accuracy=0.95)
    assert "10.0 points below the labelled-only baseline's 95.00%" in far
    assert "min_accuracy" not in far and pseudo_label.check_teacher(None) is None
    with pytest.raises(ValueError, match="check_teacher.max_gap must be a number in"):
        pseudo_label.check_teacher(0.9, max_gap=2)


# --- relative paths in gin files -------------------------------------------------------------
def test_relative_paths_resolve_like_the_default_model_dir(tmp_path, monkeypatch, capsys):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert data.default_model_dir("gin/rst_teacher.gin") == str(tmp_path / "runs" / "rst_teacher")
    pseudo = tmp_path / "runs" / "rst_teacher" / "pseudo_labeled.npz"
    images = data.digits_arrays()["train"][0][:6]
    data.write_pseudo_labeled(str(pseudo), images, np.arange(6) % 10, {"note": "test"})
    config.parse(["rst.gin"])  # load_dataset.pseudo_labeled = 'runs/rst_teacher/...'
    assert data.load_dataset().sizes["pseudo_labeled"] == 6
    # From another directory the same gin file names that directory's runs/ and says which
    # command creates the file there.
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset()
    missing = tmp_path / "elsewhere" / "runs" / "rst_teacher" / "pseudo_labeled.npz"
    assert err.value.message == (f"pseudo_labeled file '{missing}' ('runs/rst_teacher/"
                                 f"pseudo_labeled.npz' relative to the working directory) does "
                                 f"not exist;")
    assert err.value.hint == (f"run bin/pseudo_label --gin_file=rst_teacher.gin first, from "
                              f"{tmp_path / 'elsewhere'} (it writes "
                              f"{tmp_path / 'elsewhere' / 'runs' / 'rst_teacher'}).")

    # train.initial_weights = 'runs/pretrain' (finetune.gin), the same way.
    config.parse(["finetune.gin"])
    with pytest.raises(cli.UserError) as err:
        train_lib.train(str(tmp_path / "ft"), dry_run=True)
    source = tmp_path / "elsewhere" / "runs" / "pretrain"
    assert err.value.message == (f"initial_weights {source} ('runs/pretrain' relative to the "
                                 f"working directory) does not exist.")
    assert "run bin/train --gin_file=pretrain.gin first" in err.value.hint
    os.makedirs(source)
    models.digits_cnn(num_classes=5).save(source / "model.keras")
    capsys.readouterr()
    train_lib.train(str(tmp_path / "ft"), dry_run=True)
    assert f"initialised from {source} (new head: logits)" in capsys.readouterr().out


# --- each kind trains end to end -------------------------------------------------------------
DIRS = {}  # the directories of the bin/train runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    """bin/train (standard training, 1 epoch) on a 32x32x3 npz and on a folder of 8x8 PNGs,
    200 digits each."""
    DIRS["tmp"] = tmp = tmp_path_factory.mktemp("byo")
    images, labels = _digits(200)
    big = np.repeat(np.kron(images, np.ones((4, 4), "uint8"))[..., None], 3, axis=-1)
    np.savez(tmp / "digits32.npz", x=big, y=np.eye(10, dtype="uint8")[labels])
    _write_folder(tmp / "pngs", images, labels)
    for kind, name in (("npz", f"npz:{tmp / 'digits32.npz'}"),
                       ("folder", f"folder:{tmp / 'pngs'}")):
        lane.submit_bin(f"test_byo_data {kind}", "train", "--gin_file=standard.gin",
                        f"--model_dir={tmp / kind}",
                        *quick_train("train.epochs = 1", f"load_dataset.name = {name!r}"))


@pytest.mark.parametrize("kind, shape", [("npz", [32, 32, 3]), ("folder", [8, 8, 1])])
def test_bin_train_on_own_data(background_lane, kind, shape):
    proc = background_lane.result(f"test_byo_data {kind}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((DIRS["tmp"] / kind / "report.json").read_text())
    assert report["dataset"].startswith(f"{kind}:") and report["epochs"] == 1
    assert report["num_examples"] == 40  # the 20% test split of 200
    assert "'train': 144, 'validation': 16, 'test': 40" in proc.stdout
    assert f"image shape {tuple(shape)}" in proc.stdout
    model = keras.models.load_model(DIRS["tmp"] / kind / "model.keras")
    assert list(model.input_shape[1:]) == shape and model.output_shape == (None, 10)


def test_tfds_dataset_trains_end_to_end_in_process(tmp_path):
    start = time.perf_counter()
    config.parse(["standard.gin"], [*QUICK_TRAIN, "train.epochs = 1", "train.verbose = 0",
                                    "load_dataset.name = 'tfds:kmnist'",
                                    "load_dataset.validation_size = 4"])
    with tfds.testing.mock_data(num_examples=20):
        report = train_lib.train(str(tmp_path / "run"))
    assert report["dataset"] == "tfds:kmnist" and report["num_examples"] == 20
    assert len(report["history"]["loss"]) == 1
    assert json.loads((tmp_path / "run" / "report.json").read_text())["epochs"] == 1
    assert time.perf_counter() - start < 60
