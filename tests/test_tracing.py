"""No retracing: the number of `tf.function` traces of a run does not grow with its steps.

Every trace is counted where TensorFlow creates a concrete function
(``tracing_compilation._create_concrete_function``, private: the fixture fails loudly if it moves),
keyed by the traced function's name. A short run and a run with three times the epochs (and so
three times the training, validation and attack steps) must trace the same functions the same
number of times. The runs end with the same partial batch, so the batch shapes seen are equal.
"""

import collections
import re

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager.polymorphic_function import tracing_compilation

from tfadv import config, models, train
from tfadv.attacks import PGD
from tfadv.defenses import (AWP, MMC, TRADES, FeatureScatterAttack, FeatureScattering,
                            FreeAdversarialTraining, GaussianAugmentation,
                            IntervalBoundPropagation, PGDAdversarialTraining, RandomTargetPGD)
from tfadv.heads import mmc_model


@pytest.fixture
def traces(monkeypatch):
    """A Counter of traces per function name, filled while the test runs."""
    original = tracing_compilation._create_concrete_function
    counts = collections.Counter()

    def counting(function_type, type_context, func_graph, tracing_options):
        counts[tracing_options.name] += 1
        return original(function_type, type_context, func_graph, tracing_options)

    monkeypatch.setattr(tracing_compilation, "_create_concrete_function", counting)
    return counts


def _pgd(steps=2, **kwargs):
    return PGD(eps=0.3, step_size=0.1, steps=steps, **kwargs)


DEFENSES = {
    "pgd_at": lambda: PGDAdversarialTraining(models.digits_cnn(), attack=_pgd(),
                                             eval_attack=_pgd(seed=0)),
    "pgd_at_awp": lambda: PGDAdversarialTraining(models.digits_cnn(), attack=_pgd(),
                                                 awp=AWP(gamma=0.01, warmup_epochs=0)),
    "trades": lambda: TRADES(models.digits_cnn(), attack=_pgd(random_start="normal",
                                                              loss_fn="kl_divergence")),
    "mmc": lambda: MMC(mmc_model((8, 8, 1), 10), attack=RandomTargetPGD(
        eps=0.3, step_size=0.1, steps=2)),
    "feature_scatter": lambda: FeatureScattering(
        models.digits_cnn(), attack=FeatureScatterAttack(eps=0.3, step_size=0.3, steps=1)),
    "free_at": lambda: FreeAdversarialTraining(models.digits_cnn(), eps=0.3, replays=2,
                                               batch_size=32, eval_attack=_pgd(seed=0)),
    "ibp": lambda: IntervalBoundPropagation(models.digits_cnn(), eps=0.1, warmup_steps=2,
                                            rampup_steps=4),
    "gaussian": lambda: GaussianAugmentation(models.digits_cnn(), sigma=0.25, seed=0),
}


def _fit_traces(traces, build, epochs, batches):
    """Traces of building, fitting (``epochs`` x ``batches`` batches of 32 plus a partial batch
    of 8 each epoch, with validation) and evaluating one defense."""
    rng = np.random.default_rng(0)
    n = 32 * batches + 8
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)
    keras.utils.set_random_seed(0)
    traces.clear()
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, validation_data=(x[:40], y[:40]))
    model.evaluate(x[:40], y[:40], batch_size=32, verbose=0)
    return dict(traces)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_fit_traces_do_not_grow_with_steps(traces, name):
    short = _fit_traces(traces, DEFENSES[name], epochs=1, batches=2)
    long = _fit_traces(traces, DEFENSES[name], epochs=3, batches=5)
    assert sum(short.values()) > 0, "the trace counter saw no trace: the TF hook has moved"
    assert long == short


def test_attack_reuses_one_trace_for_every_batch_size():
    model = models.digits_cnn()
    attack = _pgd(steps=3, seed=0)
    rng = np.random.default_rng(0)
    for n in (32, 32, 7, 128, 1):
        attack(model, rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n))
    assert attack.trace_count == 1


def _train_traces(traces, tmp_path, epochs):
    config.parse(["pgd_at_base.gin"], [
        f"train.epochs = {epochs}", "train.verbose = 0", "train_attack/PGD.steps = 2",
        "val_attack/PGD.steps = 2", "test_attack/PGD.steps = 2", "evaluate.sanity = False",
        "evaluate.autoattack = 'fast'", "PiecewiseConstant.boundaries = [1, 2]"])
    traces.clear()
    train.train(str(tmp_path / f"run{epochs}"))
    gin.clear_config()
    # Attack and prediction functions are named after their object's id: count by kind.
    counts = collections.Counter()
    for name, n in traces.items():
        counts[_without_ids(name)] += n
    return dict(counts)


def _without_ids(name):
    return re.sub(r"_[0-9a-f]{8,}", "", name)


def test_bin_train_run_traces_do_not_grow_with_epochs(traces, tmp_path):
    """The whole `tfadv.train` path (MirroredStrategy, validation every epoch, checkpoints,
    TensorBoard summaries, final evaluation): 1 epoch and 3 epochs trace alike."""
    short = _train_traces(traces, tmp_path, 1)
    long = _train_traces(traces, tmp_path, 3)
    assert sum(short.values()) > 0, "the trace counter saw no trace: the TF hook has moved"
    assert long == short


def test_counter_sees_a_retrace(traces):
    """The counter itself: a function called with a new input shape is traced again."""
    fn = tf.function(lambda x: x * 2.0, autograph=False)
    fn(tf.zeros([2]))
    fn(tf.zeros([2]))
    assert sum(traces.values()) == 1
    fn(tf.zeros([3, 3]))
    assert sum(traces.values()) == 2


def test_evaluation_traces_each_function_once(traces, trained_digits_model, digits):
    """Every attack of the standard AutoAttack ensemble and the evaluation's prediction function
    trace once, a ragged last batch included (no 'triggered tf.function retracing')."""
    from tfadv import evaluation
    from tfadv.attacks import AutoAttack

    data = digits.test.unbatch().take(40).batch(16)  # 16, 16, 8
    traces.clear()
    evaluation.evaluate(trained_digits_model, data,
                        attacks={"autoattack": AutoAttack(0.1, version="standard")},
                        sanity=False, verbose=0)
    names = [n for n in traces if any(c in n for c in ("APGD", "FAB", "Square", "predict"))]
    assert len([n for n in names if "APGD" in n]) == 2  # APGD-CE and APGD-T
    assert any("FAB" in n for n in names) and any("Square" in n for n in names)
    assert any("predict" in n for n in names)
    assert all(traces[n] == 1 for n in names), dict(traces)
