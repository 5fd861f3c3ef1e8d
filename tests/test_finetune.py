"""Adversarial pre-training and fine-tuning (Hendrycks et al. 2019): weight transfer and chain."""

import json

import keras
import numpy as np
import pytest

from conftest import quick_train
from tfadv import models


def _cnn(filters, classes=10):
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(filters, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dense(6, name="hidden")(keras.layers.Flatten()(h))
    return keras.Model(inputs, keras.layers.Dense(classes, name="head")(h))


def test_transfer_copies_everything_but_the_head():
    keras.utils.set_random_seed(0)
    source = _cnn(4, classes=5)
    source.get_layer("bn").moving_mean.assign(np.full(4, 3.0, "float32"))  # statistics too
    target = _cnn(4, classes=7)
    fresh_head = [w.numpy() for w in target.get_layer("head").weights]
    assert models.transfer_weights(source, target) == "head"
    for name in ("conv", "bn", "hidden"):
        for ws, wd in zip(source.get_layer(name).weights, target.get_layer(name).weights):
            np.testing.assert_array_equal(ws.numpy(), wd.numpy())
    assert np.all(target.get_layer("bn").moving_mean.numpy() == 3.0)
    for before, after in zip(fresh_head, target.get_layer("head").weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_transfer_lists_every_mismatched_shape():
    with pytest.raises(ValueError) as err:
        models.transfer_weights(_cnn(4), _cnn(8, classes=3))
    message = str(err.value)
    assert "conv/kernel: source (3, 3, 1, 4), target (3, 3, 1, 8)" in message
    assert "bn/gamma: source (4,), target (8,)" in message
    assert "hidden/kernel: source (144, 6), target (288, 6)" in message
    assert "head/" not in message  # the head may differ
    small = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="differ in structure: 4 vs 1 layers"):
        models.transfer_weights(_cnn(4), small)


DIRS = {}  # the directories of the bin/train runs on conftest's background lane


def start_background(lane, tmp_path_factory):
    """The chain (pre-train, then fine-tune from its model_dir: one after the other on the
    lane) and the fine-tuning without a source."""
    quick = quick_train()
    DIRS["tmp"] = tmp = tmp_path_factory.mktemp("finetune")
    lane.submit_bin("test_finetune pretrain", "train", "--gin_file=pretrain.gin",
                    f"--model_dir={tmp / 'pretrain'}", "--gin_param=train.epochs = 2", *quick)
    lane.submit_bin("test_finetune finetune", "train", "--gin_file=finetune.gin",
                    f"--model_dir={tmp / 'finetune'}",
                    f"--gin_param=train.initial_weights = '{tmp / 'pretrain'}'",
                    "--gin_param=train.epochs = 1", *quick)
    lane.submit_bin("test_finetune no source", "train", "--gin_file=finetune.gin",
                    f"--model_dir={tmp / 'ft'}",
                    f"--gin_param=train.initial_weights = '{tmp / 'nothing'}'")


def test_pretrain_then_finetune_chain(background_lane):
    source = DIRS["tmp"] / "pretrain"
    proc = background_lane.result("test_finetune pretrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert keras.models.load_model(source / "model.keras").output_shape == (None, 5)
    target = DIRS["tmp"] / "finetune"
    proc = background_lane.result("test_finetune finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {source}" in proc.stdout
    report = json.loads((target / "report.json").read_text())
    assert report["num_examples"] == 180  # test digits 5-9
    assert keras.models.load_model(target / "model.keras").output_shape == (None, 5)
    # (Whether pre-training helps is measured in BUILD.md, bench/claims/rst_es_finetune.py.)


def test_finetune_without_its_source_fails_before_writing(background_lane):
    proc = background_lane.result("test_finetune no source")
    assert proc.returncode != 0
    assert "initial_weights" in proc.stderr and "pretrain.gin" in proc.stderr
    assert not (DIRS["tmp"] / "ft").exists()
