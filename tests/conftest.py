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
# the final evaluation without its sanity checks and robustness curve, and with AutoAttack's
# fast screen in the headline (their own tests are in test_evaluation.py,
# test_honest_evaluation.py and test_train_e2e.py). Pass them as ``*quick_train()``.
QUICK_TRAIN = ("train.verbose = 2", "test_attack/PGD.steps = 2", "val_attack/PGD.steps = 2",
               "evaluate.sanity = False", "evaluate.autoattack = 'fast'")


def quick_train(*extra):
    """``--gin_param=`` flags for `QUICK_TRAIN` plus ``extra`` bindings."""
    return [f"--gin_param={p}" for p in (*QUICK_TRAIN, *extra)]


def run_bin(tool, *args, timeout=600):
    """Runs ``bin/<tool> args...`` in a fresh process (quiet TF logs, no TF_CONFIG) and returns
    the `subprocess.CompletedProcess` with text stdout and stderr."""
    import subprocess

    return subprocess.run(bin_command(tool, *args), capture_output=True, text=True,
                          timeout=timeout, env=bin_env())


def bin_command(tool, *args):
    return [sys.executable, os.path.join(ROOT, "bin", tool), *args]


def bin_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return env


def linear_model(weights, bias=None):
    """A Keras model with logits = flatten(x) @ weights (+ bias) for images of shape
    (1, n, 1), n = weights.shape[0]: the tiny model of the closed-form tests."""
    inputs = keras.Input((1, weights.shape[0], 1))
    dense = keras.layers.Dense(weights.shape[1], use_bias=bias is not None)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights] if bias is None else [weights, bias])
    return model


# --- the background lane ------------------------------------------------------------------------
# The in-process tests keep about one of the CI machine's two cores busy. Subprocess runs whose
# results are only checked afterwards (the acceptance trainings: several minutes of bin/train; the
# short bin/train runs of the end-to-end tests) run meanwhile on a background lane, one command at
# a time, in submission order, so that they use the spare core. A module takes part by defining
# ``start_background(lane, tmp_path_factory)``, called once when the first test of the session
# starts if one of its tests is selected; its tests then wait for ``lane.result(key)``. Modules
# that use the lane run last (`pytest_collection_modifyitems`), so their runs have the rest of the
# suite to finish in. (At the same CPU priority as the tests: a niced lane starves when another
# process shares the machine, and then the whole suite waits for it at the end.)


class BackgroundLane:
    """Runs submitted commands one after another on a thread; `result` waits for one."""

    def __init__(self):
        import concurrent.futures
        import threading

        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lane")
        self._futures = {}
        self._running = set()
        self._lock = threading.Lock()
        self._stopped = False

    def submit(self, key, cmd, timeout, env=None):
        """Queues ``cmd`` (an argv list); its `subprocess.CompletedProcess` (text output) is
        ``result(key)``. The timeout counts from the command's own start."""
        assert key not in self._futures, key
        self._futures[key] = self._executor.submit(self._run, cmd, timeout, env)

    def submit_bin(self, key, tool, *args, timeout=600):
        """`submit` for `run_bin`'s command (``bin/<tool> args...``, same environment)."""
        self.submit(key, bin_command(tool, *args), timeout, bin_env())

    def _run(self, cmd, timeout, env):
        import subprocess

        with self._lock:
            if self._stopped:
                raise RuntimeError("the background lane was stopped")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
            self._running.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        finally:
            with self._lock:
                self._running.discard(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def result(self, key):
        return self._futures[key].result()

    def stop(self):
        with self._lock:
            self._stopped = True
            for proc in self._running:
                proc.kill()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _uses_lane(item):
    return hasattr(getattr(item, "module", None), "start_background")


def _lane_order(item):
    module = getattr(item, "module", None)
    return _uses_lane(item), getattr(module, "BACKGROUND_LAST", False)


def pytest_collection_modifyitems(session, config, items):
    """Moves the tests of modules with background runs to the end, those of modules that set
    ``BACKGROUND_LAST`` (the longest runs) after the others; the lane runs them in this order too.
    A stable sort: the order is otherwise unchanged."""
    items.sort(key=_lane_order)


@pytest.fixture(scope="session", autouse=True)
def background_lane(request, tmp_path_factory):
    """The session's `BackgroundLane`, started with the first test."""
    lane = BackgroundLane()
    modules = []
    for item in request.session.items:
        if _uses_lane(item) and item.module not in modules:
            modules.append(item.module)
    try:
        for module in modules:
            module.start_background(lane, tmp_path_factory)
        yield lane
    finally:
        lane.stop()


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Each test starts without gin bindings (a parsed paper config would otherwise reach the
    gin-configurable `load_dataset` of later tests)."""
    yield
    import gin

    gin.clear_config()
