"""Every shipped gin file parses and builds its objects; gin errors name the file and line."""

import glob
import os
import re

import gin
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfadv import config
from tfadv import data as data_lib
from tfadv import train as train_lib
from tfadv.attacks import kl_divergence
from tfadv.defenses import Defense

GIN_FILES = sorted(os.path.relpath(p, config.GIN_DIR)
                   for p in glob.glob(os.path.join(config.GIN_DIR, "**", "*.gin"), recursive=True))
FRAGMENT_DIRS = ("datasets", "models")  # include-only pieces, built on top of pgd_at.gin
MODEL_DATA = {"models/madry_mnist_cnn.gin": "datasets/mnist.gin",
              "models/small_cnn.gin": "datasets/mnist.gin",
              "models/preact_resnet18.gin": "datasets/cifar10.gin",
              "models/wrn34_10.gin": "datasets/cifar10.gin",
              "models/wrn28_10.gin": "datasets/cifar10.gin"}
TINY = ["train.epochs = 1", "AWP.warmup_epochs = 0", "wide_resnet.depth = 10",
        "train.initial_weights = None", "load_dataset.pseudo_labeled = None",
        "wide_resnet.width = 1", "test_attack/PatchPGD.steps = 2",
        "test_attack/PatchPGD.locations = 2"]
# mock_data gives a TFDS dataset 8 examples per split: its validation must leave some for training
# (the splits of the embedded datasets are fixed).
MOCK_VALIDATION = "load_dataset.validation_size = 2"
CITATION = re.compile(r"et al\.|\b(19|20)\d\d\b")


def test_there_are_gin_files():
    assert {"pgd_at.gin", "standard.gin", "paper/madry_cifar10.gin"} <= set(GIN_FILES)


@pytest.mark.parametrize("name", GIN_FILES)
def test_gin_file_parses_and_builds(name):
    files = [name]
    if name.split("/")[0] in FRAGMENT_DIRS:
        files = ["pgd_at.gin", MODEL_DATA.get(name, "datasets/digits.gin"), name]
    config.parse(files, TINY, finalize=False)
    try:
        dataset = gin.query_parameter("load_dataset.name")
    except ValueError:  # unbound: the default, digits
        dataset = "digits"
    config.parse(files, TINY + ([] if dataset in data_lib.EMBEDDED else [MOCK_VALIDATION]))
    with tfds.testing.mock_data(num_examples=8):
        built = train_lib.train("/nonexistent-model-dir", dry_run=True)
        x, y = next(iter(built["data"].test))
    defense = built["defense"]
    assert isinstance(defense, Defense)
    assert not os.path.exists("/nonexistent-model-dir")
    base = defense.base_model
    assert tuple(base.input_shape[1:]) == built["data"].image_shape
    assert base.output_shape[-1] == built["data"].num_classes
    for attack in [defense.attack, defense.eval_attack, *built["eval_attacks"].values()]:
        if attack is None:
            continue
        # TRADES' attack ascends a KL against the clean prediction instead of the labels.
        targets = (tf.nn.softmax(base(x[:2])) if attack.loss_fn is kl_divergence else y[:2])
        x_adv = attack(base, x[:2], targets).numpy()
        assert x_adv.shape == tuple(x[:2].shape)
        assert np.abs(x_adv - x[:2].numpy()).max() <= attack.eps + 1e-6


@pytest.mark.parametrize("name", [n for n in GIN_FILES if n.split("/")[0] not in FRAGMENT_DIRS])
def test_method_gin_files_cite_their_paper(name):
    with open(os.path.join(config.GIN_DIR, name)) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert CITATION.search(header), f"{name} does not cite a paper in its header"


def test_unknown_parameter_names_file_and_line(tmp_path):
    path = tmp_path / "typo.gin"
    path.write_text("include 'pgd_at.gin'\ntrain.epochs = 2\nPGD.epsilon = 0.3\n")
    with pytest.raises(ValueError) as err:
        config.parse([str(path)])
    message = str(err.value)
    assert "epsilon" in message and "typo.gin" in message and "line 3" in message


def test_bare_names_resolve_in_gin_dir_and_missing_ones_list_the_choices():
    assert config.resolve_gin_file("pgd_at.gin") == os.path.join(config.GIN_DIR, "pgd_at.gin")
    assert config.resolve_gin_file("pgd_at") == os.path.join(config.GIN_DIR, "pgd_at.gin")
    with pytest.raises(FileNotFoundError, match="available: .*pgd_at.gin"):
        config.resolve_gin_file("no_such_defense.gin")
