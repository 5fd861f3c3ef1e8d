"""Adversarial pre-training and fine-tuning (Hendrycks et al. 2019): weight transfer and chain."""

import json

import keras
import numpy as np
import pytest

from conftest import quick_train, run_bin
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


def _train(args):
    return run_bin("train", *args)


def test_pretrain_then_finetune_chain(tmp_path):
    quick = quick_train()
    source = tmp_path / "pretrain"
    proc = _train(["--gin_file=pretrain.gin", f"--model_dir={source}",
                   "--gin_param=train.epochs = 2", *quick])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert keras.models.load_model(source / "model.keras").output_shape == (None, 5)
    target = tmp_path / "finetune"
    proc = _train(["--gin_file=finetune.gin", f"--model_dir={target}",
                   f"--gin_param=train.initial_weights = '{source}'",
                   "--gin_param=train.epochs = 1", *quick])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {source}" in proc.stdout
    report = json.loads((target / "report.json").read_text())
    assert report["num_examples"] == 180  # test digits 5-9
    assert keras.models.load_model(target / "model.keras").output_shape == (None, 5)
    # (Whether pre-training helps is measured in BUILD.md, bench/rst_es_finetune_claims.py.)


def test_finetune_without_its_source_fails_before_writing(tmp_path):
    proc = _train(["--gin_file=finetune.gin", f"--model_dir={tmp_path / 'ft'}",
                   f"--gin_param=train.initial_weights = '{tmp_path / 'nothing'}'"])
    assert proc.returncode != 0
    assert "initial_weights" in proc.stderr and "pretrain.gin" in proc.stderr
    assert not (tmp_path / "ft").exists()
