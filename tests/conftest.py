"""Shared test setup: two logical CPU devices (stand-ins for two GPUs) and quiet TF logs."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the two logical CPUs for the whole session (separate instances
    in one process can reuse collective keys and then fail with mismatched shapes)."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def digits():
    from tfadv import data

    return data.load_dataset("digits", batch_size=128)


@pytest.fixture(scope="session")
def trained_digits_model():
    """A digits CNN trained normally for a few epochs (about 95% clean accuracy).

    It trains on its own pipeline: the shared ``digits`` train split reshuffles on every pass,
    so training on it would make this model depend on which tests ran first."""
    from tfadv import data, models
    from tfadv.defenses import StandardTraining

    digits = data.load_dataset("digits", batch_size=128)
    keras.utils.set_random_seed(1)
    base = models.digits_cnn()
    model = StandardTraining(base)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(digits.train, epochs=8, verbose=0)
    return base


def dataset_arrays(data):
    """Concatenates a batched (x, y) dataset into two numpy arrays."""
    xs, ys = zip(*data)
    return np.concatenate([np.asarray(x) for x in xs]), np.concatenate([np.asarray(y) for y in ys])


# gin bindings that keep a bin/train run in a test short: a 2-step validation and test PGD, and
# the final evaluation without its sanity checks and robustness curve (their own tests are in
# test_evaluation.py and test_train_e2e.py). Pass them as ``*quick_train()``.
QUICK_TRAIN = ("train.verbose = 2", "test_attack/PGD.steps = 2", "val_attack/PGD.steps = 2",
               "evaluate.sanity = False")


def quick_train(*extra):
    """``--gin_param=`` flags for `QUICK_TRAIN` plus ``extra`` bindings."""
    return [f"--gin_param={p}" for p in (*QUICK_TRAIN, *extra)]


def run_bin(tool, *args, timeout=600):
    """Runs ``bin/<tool> args...`` in a fresh process (quiet TF logs, no TF_CONFIG) and returns
    the `subprocess.CompletedProcess` with text stdout and stderr."""
    import subprocess

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", tool), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def linear_model(weights, bias=None):
    """A Keras model with logits = flatten(x) @ weights (+ bias) for images of shape
    (1, n, 1), n = weights.shape[0]: the tiny model of the closed-form tests."""
    inputs = keras.Input((1, weights.shape[0], 1))
    dense = keras.layers.Dense(weights.shape[1], use_bias=bias is not None)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights] if bias is None else [weights, bias])
    return model


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Each test starts without gin bindings (a parsed paper config would otherwise reach the
    gin-configurable `load_dataset` of later tests)."""
    yield
    import gin

    gin.clear_config()
