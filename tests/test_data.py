"""The data layer: the embedded digits split, TFDS through mock data, fast failure offline."""

import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import dataset_arrays
from tfadv import data


def test_digits_split_is_fixed_documented_and_disjoint():
    first = data.load_dataset("digits", batch_size=100)
    second = data.load_dataset("digits", batch_size=37)
    assert first.sizes == {"train": 1257, "validation": 180, "test": 360}
    assert first.image_shape == (8, 8, 1) and first.num_classes == 10
    arrays = {}
    for split in ("train", "validation", "test"):
        x1, y1 = dataset_arrays(getattr(first, split))
        x2, y2 = dataset_arrays(getattr(second, split))
        assert len(y1) == first.sizes[split]
        assert x1.dtype == np.float32 and y1.dtype == np.int32
        assert x1.min() >= 0.0 and x1.max() == 1.0
        # Same examples whatever the batch size (train order is shuffled, so compare as sets).
        assert sorted(map(bytes, x1)) == sorted(map(bytes, x2))
        assert set(np.unique(y1)) == set(range(10))  # stratified: every class in every split
        arrays[split] = x1
    # The splits partition the 1,797 images (compare with the source, which has duplicates).
    total = np.concatenate(list(arrays.values()))
    assert len(total) == 1797
    from sklearn.datasets import load_digits
    source = (load_digits().images / 16.0).astype("float32")[..., None]
    assert sorted(map(bytes, total)) == sorted(map(bytes, source))


def test_mnist_5k_is_real_28x28_mnist_split_4000_500_500():
    import gzip

    d = data.load_dataset("mnist_5k", batch_size=500, shuffle_buffer=100)
    assert d.sizes == {"train": 4000, "validation": 500, "test": 500}
    assert d.image_shape == (28, 28, 1) and d.num_classes == 10 and d.name == "mnist_5k"
    arrays = data.mnist_5k_arrays()
    x_test, y_test = dataset_arrays(d.test)
    np.testing.assert_array_equal(x_test, arrays["test"][0])  # the pipeline keeps the fixed split
    seen = []
    for split, count in (("train", 4000), ("validation", 500), ("test", 500)):
        x, y = arrays[split]
        assert x.shape == (count, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(np.bincount(y), [count // 10] * 10)  # stratified
        seen.append(x.reshape(count, -1))
    # The three splits partition the 5,000 rows of the file, pixel values k / 255 exactly.
    with gzip.open(data.mnist_5k_path(), "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float32)
    source = (table[:, :-1] / 255.0).astype("float32")
    assert sorted(map(bytes, np.concatenate(seen))) == sorted(map(bytes, source))
    with pytest.raises(ValueError, match="validation_size for mnist_5k is fixed at 500"):
        data.load_dataset("mnist_5k", validation_size=100)


def test_train_split_is_reshuffled_each_epoch():
    d = data.load_dataset("digits", batch_size=1257)
    (a, _), (b, _) = next(iter(d.train)), next(iter(d.train))
    assert not np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("name, shape, classes", [
    ("cifar10", (32, 32, 3), 10), ("mnist", (28, 28, 1), 10), ("svhn_cropped", (32, 32, 3), 10),
])
def test_tfds_path_with_mock_data(name, shape, classes):
    with tfds.testing.mock_data(num_examples=40):
        d = data.load_dataset(name, batch_size=16, validation_size=8)
        x, y = next(iter(d.train))
        xv, _ = next(iter(d.validation))
        xt, _ = next(iter(d.test))
    assert d.image_shape == shape and d.num_classes == classes
    # validation: the last 8 of the 40 mock training examples; train: the other 32
    assert d.sizes == {"train": 32, "validation": 8, "test": 40}
    assert d.sizes["train"] == sum(len(b[1]) for b in d.train)
    for images in (x, xv, xt):
        assert images.dtype == tf.float32 and tuple(images.shape[1:]) == shape
        assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 1.0
    assert y.dtype == tf.int32 and int(tf.reduce_max(y)) < classes


def test_tfds_validation_is_the_end_of_the_training_split():
    with tfds.testing.mock_data(num_examples=12):
        d = data.load_dataset("mnist", batch_size=5, validation_size=3, augment=False)
        source = [(x.numpy(), int(y)) for x, y in tfds.load("mnist", split="train",
                                                             as_supervised=True)]
        xv, yv = dataset_arrays(d.validation)
        xt, yt = dataset_arrays(d.train)
    images = np.stack([x for x, _ in source]) / np.float32(255)
    labels = np.array([y for _, y in source])
    np.testing.assert_array_equal(xv, images[-3:])
    np.testing.assert_array_equal(yv, labels[-3:])
    assert sorted(map(bytes, xt)) == sorted(map(bytes, images[:-3]))
    assert d.class_names == [str(k) for k in range(10)]


def test_augmentation_pads_crops_and_flips():
    image = tf.reshape(tf.range(32 * 32 * 3, dtype=tf.float32) / (32 * 32 * 3), (32, 32, 3))
    augment = data.augment_fn("crop_flip", (32, 32, 3))
    outs = [augment(image, 0)[0].numpy() for _ in range(20)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any(not np.array_equal(o, image.numpy()) for o in outs)
    # Every output is the image shifted by at most 4 pixels (zeros enter at the border).
    for o in outs:
        assert (o == 0).sum() <= 32 * 32 * 3 - 24 * 24 * 3 + 3
    assert data.augment_fn(None, (8, 8, 1)) is None


def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotAvailableError) as err:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert "'cifar10'" in message and str(tmp_path) in message and "tfds build cifar10" in message


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": "imagenet"}, "dataset name must be one of digits, mnist_5k, mnist, fashion_mnist, "
                           "svhn_cropped, cifar10, cifar100 or your own data as"),
    ({"augment": "rotate"}, "augment must be True .the dataset's default., False, or one of "
                            "crop, crop_flip"),
    ({"split_seed": 0.5}, "split_seed must be an integer"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"validation_size": -1}, "validation_size must be None or an integer >= 0"),
    ({"validation_size": 10}, "validation_size for digits is fixed"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        data.load_dataset(**kwargs)


def test_validate_arrays_accepts_good_input():
    data.validate_arrays(np.zeros((2, 8, 8, 1), "float32"), np.array([0, 9]), (8, 8, 1), 10)
