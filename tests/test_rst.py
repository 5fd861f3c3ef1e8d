"""Robust self-training: labelled/unlabelled splits, class subsets, mixed batches, pseudo-labels,
stability training."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import quick_train
from tfadv import data, pseudo_label
from tfadv.defenses import StabilityTraining
from tfadv.defenses.trades import trades_loss


def _images(ds):
    return np.concatenate([np.asarray(b[0] if isinstance(b, tuple) else b) for b in ds])


def _pairs(ds):
    """Images and labels from ONE pass (a training pipeline reshuffles on every pass)."""
    xs, ys = zip(*[(np.asarray(x), np.asarray(y)) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_labeled_fraction_is_a_stratified_partition_of_train():
    full = data.digits_arrays()["train"]
    d = data.load_dataset("digits", batch_size=500, labeled_fraction=0.2, augment=False)
    x_lab, y_lab = _pairs(d.train)
    x_unl = _images(d.unlabeled)
    assert d.sizes["train"] == len(x_lab) == 251 and d.sizes["unlabeled"] == len(x_unl) == 1006
    # A partition: every training image is in exactly one part (as multisets of rows).
    rows = lambda x: sorted(x[i].tobytes() for i in range(len(x)))  # noqa: E731
    assert rows(np.concatenate([x_lab, x_unl])) == rows(full[0])
    # Stratified: each class keeps about 20% of its labels.
    expected = np.bincount(full[1], minlength=10) * 0.2
    assert np.all(np.abs(np.bincount(y_lab, minlength=10) - expected) <= 1.0)


def test_classes_keep_only_those_digits_relabelled_in_order():
    d = data.load_dataset("digits", batch_size=400, classes=[7, 2, 9], augment=False)
    assert d.num_classes == 3
    full = data.digits_arrays()
    for split, ds in (("train", d.train), ("test", d.test)):
        x, y = _pairs(ds)
        counts = np.bincount(full[split][1], minlength=10)
        np.testing.assert_array_equal(np.bincount(y, minlength=3), counts[[7, 2, 9]])
        # Same images as the original class 7 under the new label 0.
        originals = {a.tobytes() for a in full[split][0][full[split][1] == 7]}
        assert {a.tobytes() for a in x[y == 0]} == originals


def test_classes_and_fractions_are_checked():
    for kwargs, needle in [({"classes": [3]}, "classes must be a list of >= 2"),
                           ({"classes": [1, 1, 2]}, "distinct"),
                           ({"classes": [0, 10]}, r"classes must lie in \[0, 10\)"),
                           ({"labeled_fraction": 1.0}, "labeled_fraction must be"),
                           ({"unsup_fraction": 0.0}, "unsup_fraction must be")]:
        with pytest.raises(ValueError, match=needle):
            data.load_dataset("digits", **kwargs)


def _pseudo_file(tmp_path, images, labels):
    path = str(tmp_path / "pseudo.npz")
    data.write_pseudo_labeled(path, images, labels, {"note": "test"})
    return path


def test_mixed_batches_follow_the_rst_sampler(tmp_path):
    # Three recognisable pseudo-labelled images (constant 1.0, 0.5, 0.25) with labels 7, 8, 9.
    pseudo = np.stack([np.full((8, 8, 1), v, "float32") for v in (1.0, 0.5, 0.25)])
    path = _pseudo_file(tmp_path, pseudo, [7, 8, 9])
    d = data.load_dataset("digits", batch_size=32, labeled_fraction=0.2, pseudo_labeled=path,
                          unsup_fraction=0.25)
    assert d.sizes["pseudo_labeled"] == 3
    epochs = []
    for _ in range(2):
        batches = list(d.train)
        assert len(batches) == int(np.ceil(251 / 32))  # an epoch in labelled-set sizes
        epochs.append(batches)
        seen_labeled = []
        for x, y in batches:
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == (32, 8, 8, 1)
            flat = x.reshape(32, -1)
            is_pseudo = np.all(flat == flat[:, :1], axis=1) & np.isin(flat[:, 0], [1.0, .5, .25])
            assert is_pseudo.sum() == 8  # int(32 * 0.25) per batch
            value_to_label = {1.0: 7, 0.5: 8, 0.25: 9}
            assert all(y[i] == value_to_label[float(flat[i, 0])] for i in np.where(is_pseudo)[0])
            seen_labeled += [r.tobytes() for r in flat[~is_pseudo]]
        # Labelled examples: no repeats within one epoch's 24 * 8 = 192 < 251 draws.
        assert len(set(seen_labeled)) == len(seen_labeled)
    positions = np.concatenate([np.where(np.all(np.asarray(x).reshape(32, -1) ==
                                                np.asarray(x).reshape(32, -1)[:, :1], 1))[0]
                                for x, _ in epochs[0]])
    assert positions.min() < 8 and positions.max() >= 24  # shuffled into the batch
    # With replacement: 3 images fill 8 slots per batch.
    assert not np.array_equal(np.asarray(epochs[0][0][0]), np.asarray(epochs[1][0][0]))


def test_pseudo_labeled_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="bin/pseudo_label"):
        data.load_dataset("digits", pseudo_labeled=str(tmp_path / "missing.npz"))
    bad_shape = _pseudo_file(tmp_path, np.zeros((4, 9, 9, 1), "float32"), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 8, 8, 1\)"):
        data.load_dataset("digits", pseudo_labeled=bad_shape)
    bad_label = _pseudo_file(tmp_path, np.zeros((2, 8, 8, 1), "float32"), [0, 12])
    with pytest.raises(ValueError, match=r"labels must be 2 integers in \[0, 10\)"):
        data.load_dataset("digits", pseudo_labeled=bad_label)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary leftovers


DIRS = {}  # the directories of the runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    """bin/pseudo_label, then bin/train on its pseudo-labels (one after the other on the lane)."""
    DIRS["tmp"] = tmp = tmp_path_factory.mktemp("rst")
    lane.submit_bin("test_rst pseudo_label", "pseudo_label", "--gin_file=rst_teacher.gin",
                    f"--teacher_dir={tmp / 'teacher'}",
                    *quick_train("train.epochs = 15", "train.verbose = 0"))
    lane.submit_bin("test_rst train", "train", "--gin_file=rst.gin",
                    f"--model_dir={tmp / 'rst'}",
                    f"--gin_param=load_dataset.pseudo_labeled = "
                    f"'{tmp / 'teacher' / 'pseudo_labeled.npz'}'",
                    *quick_train("train.epochs = 2", "train.validation_freq = 1"))


def test_bin_pseudo_label_trains_a_teacher_labels_the_split_and_rst_trains(background_lane):
    teacher_dir = DIRS["tmp"] / "teacher"
    proc = background_lane.result("test_rst pseudo_label")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = teacher_dir / "pseudo_labeled.npz"
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
        metadata = json.loads(str(f["metadata"]))
    assert images.dtype == np.float32 and images.shape == (1006, 8, 8, 1)
    assert metadata["num_examples"] == 1006 and sum(metadata["class_counts"]) == 1006
    # The labels are the teacher's argmax, and the teacher's accuracy is measured on the
    # labelled validation split.
    teacher = keras.models.load_model(teacher_dir / "model.keras")
    np.testing.assert_array_equal(labels, np.argmax(teacher.predict(images, verbose=0), -1))
    d = data.load_dataset("digits", labeled_fraction=0.2)
    val_x, val_y = _pairs(d.validation)
    accuracy = np.mean(np.argmax(teacher.predict(val_x, verbose=0), -1) == val_y)
    assert metadata["teacher_validation_accuracy"] == pytest.approx(accuracy)
    assert accuracy > 0.7  # a real teacher, trained on 251 labels
    # Pseudo-labels agree with the withheld true labels about as often as the teacher is right.
    full = data.digits_arrays()["train"]
    truth = {full[0][i].tobytes(): full[1][i] for i in range(len(full[1]))}
    agreement = np.mean([truth[images[i].tobytes()] == labels[i] for i in range(len(labels))])
    assert agreement > 0.7

    rst_dir = DIRS["tmp"] / "rst"
    proc = background_lane.result("test_rst train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((rst_dir / "report.json").read_text())
    assert report["defense"] == "TRADES" and len(report["history"]["loss"]) == 2
    assert "4/4" in proc.stdout  # 4 steps per epoch: 251 labelled images, batch 64


def test_unlabeled_sources_npz_and_tfds(tmp_path):
    d = data.load_dataset("digits", batch_size=64)
    images = (np.random.RandomState(0).rand(5, 8, 8, 1) * 255).astype("uint8")
    np.savez(tmp_path / "u.npz", images=images)
    ds, uint8 = pseudo_label.unlabeled_images(str(tmp_path / "u.npz"), d)
    assert uint8 and np.allclose(_images(ds), images / 255.0)
    np.savez(tmp_path / "wrong.npz", pictures=images)
    with pytest.raises(ValueError, match="must hold an 'images' array"):
        pseudo_label.unlabeled_images(str(tmp_path / "wrong.npz"), d)
    with pytest.raises(ValueError, match="labeled_fraction"):
        pseudo_label.unlabeled_images("split", d)
    with tfds.testing.mock_data(num_examples=6):
        ds, uint8 = pseudo_label.unlabeled_images("tfds:mnist:train", d)
        x = _images(ds)
    assert uint8 and x.shape == (6, 28, 28, 1) and 0 <= x.min() and x.max() <= 1


def test_stability_training_pairs_clean_and_gaussian_noise():
    base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10)])
    model = StabilityTraining(base, sigma=0.5, beta=2.0, seed=4)
    model.compile(optimizer="sgd")  # the noise of a step is seeded by the optimizer's step
    x = tf.fill([256, 8, 8, 1], 0.5)
    noisy = model.prepare(x, None).numpy()
    np.testing.assert_array_equal(noisy, model.prepare(x, None).numpy())  # same step, same noise
    assert abs(np.std(noisy - 0.5) - 0.5) < 0.02  # sigma, not clipped to [0, 1]
    assert noisy.min() < 0 and noisy.max() > 1
    y = np.arange(4) % 10
    from tfadv.defenses import ModelState

    loss, logits = model.objective(ModelState(base), x[:4], y, None, noisy[:4])
    expected = trades_loss(y, base(x[:4]), base(noisy[:4]), 2.0).numpy().mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert model.eval_attack is None and set(logits) == {"clean", "adv"}
    for sigma in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="sigma .*must be a finite number > 0"):
            StabilityTraining(base, sigma=sigma)
