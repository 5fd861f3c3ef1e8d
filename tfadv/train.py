"""The training driver behind `bin/train`: data, model, defense, fit, checkpoints, report.

Everything is configured by gin (see `gin/`); `train` itself holds no method-specific logic. A run
writes to ``model_dir``:

- ``config.gin``: the operative gin configuration (also in TensorBoard as text);
- ``tensorboard/``: per-epoch loss, accuracies (train: adversarial; validation: clean and
  robust) and learning rate; ``tensorboard/adversarial/``: adversarial example grids and logit
  margin histograms every ``AdversarialSummaries.every_n_epochs`` epochs and the final robustness
  curve (`tfadv.tensorboard`);
- ``checkpoints/``: one checkpoint per epoch; running the same command again resumes after the
  last finished epoch;
- ``model.keras``: the trained base classifier (the defense wrapper is not saved);
- ``report.json``: the headline robust accuracy (the worst case over every attack, the standard
  AutoAttack included) with its verdict, clean and robust test accuracy per attack, the remedies
  a failed sanity check ran, the sanity checks and the training history, also printed as a
  table; ``eval.json``, ``robustness_curve.png`` and ``examples.png`` from
  `tfadv.evaluation.evaluate` (per-example results and plots).
"""

import functools
import inspect
import json
import math
import os
import time

import gin
import keras
import tensorflow as tf

from tfadv import checkpoint as ckpt
from tfadv import data as data_lib
from tfadv import distribute
from tfadv import evaluation
from tfadv import export as export_lib
from tfadv import models
from tfadv import tensorboard as tensorboard_lib
from tfadv.defenses import PGDAdversarialTraining

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _write_config_summary(log_dir, config_text):
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "config"))
    with writer.as_default():
        # Markdown code block so TensorBoard's text plugin keeps the layout.
        tf.summary.text("gin/operative_config", "```\n" + config_text + "\n```", step=0)
    writer.close()


def check_precision(precision):
    """Returns ``precision`` if it is one of `PRECISIONS`, else raises a ValueError naming them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    return precision


def _under_precision_policy(fn):
    """Runs ``fn`` (`train`) with the Keras global dtype policy set to its ``precision``
    argument, checked before any work, and restores the previous policy when ``fn`` returns or
    raises (so the policy of one run does not leak into the next in the same process)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        precision = check_precision(bound.arguments["precision"])
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(precision)
        try:
            return fn(*args, **kwargs)
        finally:
            keras.mixed_precision.set_global_policy(previous)

    return wrapper


@gin.configurable(denylist=["model_dir"])
@_under_precision_policy
def train(model_dir, defense=PGDAdversarialTraining, model="digits_cnn", optimizer=None,
          learning_rate=1e-3, epochs=30, eval_attacks=None, strategy="mirrored", seed=0,
          jit_compile=False, verbose=1, dry_run=False, validation_freq=1, early_stopping=None,
          initial_weights=None, callbacks=(), export_dir=None, precision="float32"):
    """Trains ``defense(base_model)`` and writes the artifacts listed in the module docstring.

    Args:
      model_dir: output directory (created; reused to resume).
      defense: a `tfadv.defenses.Defense` subclass, called as ``defense(base_model)``; gin fills
        in its other arguments (attacks, hyperparameters).
      model: a `tfadv.models.MODELS` name or a builder ``f(input_shape, num_classes)``.
      optimizer: a Keras optimizer class (gin: ``@keras.optimizers.SGD``), called with
        ``learning_rate``; default Adam.
      learning_rate: a float, or an epoch schedule from `tfadv.schedules` (gin:
        ``@PiecewiseConstant()``).
      epochs: total number of epochs (integer >= 1).
      eval_attacks: dict ``name -> attack`` for the final test report.
      strategy: name for `tfadv.distribute.get_strategy` (devices configurable there); a
        multi-worker run (``TF_CONFIG``) writes model_dir from the chief only, and
        ``load_dataset.batch_size`` (the global batch) must divide by the replica count.
      seed: seeds Python, NumPy and TensorFlow (`keras.utils.set_random_seed`).
      jit_compile: XLA for the train step (``compile(jit_compile=...)``), explicit because
        Keras' "auto" differs by strategy (gin: ``train.jit_compile = True``). On CPU XLA made
        the PGD loop slower: measure before enabling.
      verbose: Keras progress bar (1), one line per epoch (2) or silent (0).
      dry_run: build data, model, defense and attacks, then return them without training or
        writing anything (checks a configuration in seconds before a long run).
      validation_freq: validate (clean and robust accuracy) every this many epochs.
      early_stopping: a `tfadv.checkpoint.RobustEarlyStopping` (gin:
        ``@RobustEarlyStopping()``): keeps ``best.keras``; ``model.keras`` and the report are
        then the selected checkpoint's, with the last epoch's model in ``model_last.keras`` and
        its results under ``report['last']``.
      initial_weights: a trained model (model_dir or ``.keras``) whose weights, except the
        classification head, initialise the model (adversarial fine-tuning, Hendrycks et al.
        2019; see `tfadv.models.transfer_weights`).
      callbacks: more Keras callbacks (gin: ``[@CatastrophicOverfittingMonitor()]``); those
        with an ``attach(model_dir, base_model, data)`` method get it called before training.
      export_dir: when set, the final model (the one in ``model.keras``) is also exported for
        TF Serving by `tfadv.export.export_saved_model` to ``export_dir/<next version>/``, after
        the report is written; a relative path is under ``model_dir`` (gin: ``train.export_dir
        = 'serving'`` gives ``model_dir/serving/1/``), an absolute one is used as given.
      precision: the Keras dtype policy, one of `PRECISIONS`: ``'float32'``,
        ``'mixed_float16'`` (half-precision compute with dynamic loss scaling: `compile` wraps
        the optimizer in a `keras.optimizers.LossScaleOptimizer`) or ``'mixed_bfloat16'`` (no
        loss scaling needed). Set as the global policy before the model is built and restored
        when `train` returns. Variables, the logits layer (`tfadv.models`), losses and attack
        perturbations stay float32 (gin: ``train.precision = 'mixed_float16'``).

    Returns:
      the report dict (also written to ``model_dir/report.json``); with ``dry_run`` a dict of
      the built objects (``data``, ``defense``, ``eval_attacks``).
    """
    _check_positive_int("epochs", epochs)
    _check_positive_int("validation_freq", validation_freq)
    if export_dir is not None and (not isinstance(export_dir, (str, os.PathLike))
                                   or not os.fspath(export_dir)):
        raise ValueError(f"export_dir must be None or a non-empty path; got {export_dir!r}.")
    if initial_weights is not None and not os.path.exists(initial_weights):
        raise FileNotFoundError(
            f"initial_weights {initial_weights!r} does not exist (train the source model first, "
            "e.g. bin/train --gin_file=pretrain.gin).")
    if not (isinstance(defense, type) and issubclass(defense, keras.Model)):
        raise ValueError(f"defense must be a tfadv.defenses.Defense class; got {defense!r}.")
    if isinstance(model, str) and model not in models.MODELS:
        raise ValueError(f"model must be one of {sorted(models.MODELS)}; got {model!r}.")
    if isinstance(learning_rate, (int, float)) and learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    summaries = tensorboard_lib.AdversarialSummaries()  # gin: AdversarialSummaries.*
    # First TF work of the run: a multi-worker strategy must exist before other TF operations.
    strat = distribute.get_strategy(strategy)
    keras.utils.set_random_seed(seed)

    data = data_lib.load_dataset()
    if data.batch_size % strat.num_replicas_in_sync:
        raise ValueError(
            f"load_dataset.batch_size (the global batch) must be divisible by the number of "
            f"replicas; got {data.batch_size} for {strat.num_replicas_in_sync} replicas.")
    steps_per_epoch = math.ceil(data.sizes["train"] / data.batch_size)
    print(f"tfadv: {data.name} {data.sizes}, image shape {data.image_shape}, "
          f"{strat.num_replicas_in_sync} replica(s), {steps_per_epoch} steps/epoch")

    with strat.scope():
        build = models.MODELS[model] if isinstance(model, str) else model
        base_model = build(input_shape=data.image_shape, num_classes=data.num_classes)
        evaluation.check_logits_model(base_model, data.image_shape)
        if initial_weights is not None:
            head = models.transfer_weights(evaluation.load_classifier(initial_weights),
                                           base_model)
            print(f"tfadv: initialised from {initial_weights} (new head: {head})")
        wrapped = defense(base_model)
        wrapped.check_schedule(epochs)  # e.g. an AWP warm-up longer than training
        lr = learning_rate(steps_per_epoch) if callable(learning_rate) else learning_rate
        opt = (optimizer or keras.optimizers.Adam)(learning_rate=lr)
        wrapped.compile(optimizer=opt, jit_compile=jit_compile)
        wrapped.build((None, *data.image_shape))
        opt.build(base_model.trainable_variables)
    if dry_run:
        return {"data": data, "defense": wrapped, "eval_attacks": dict(eval_attacks or {})}

    # Multi-worker: every worker saves (saving may need collectives), but only the chief into
    # model_dir; the others write to a temporary directory removed at the end.
    out_dir = distribute.worker_dir(model_dir, strat)
    os.makedirs(out_dir, exist_ok=True)
    for callback in [early_stopping, *callbacks, summaries]:
        if callback is not None and hasattr(callback, "attach"):
            callback.attach(out_dir, base_model, data)
    saver = ckpt.EpochCheckpoint(os.path.join(out_dir, "checkpoints"), base_model, opt)
    initial_epoch = saver.restore()
    if out_dir != model_dir:  # resume from the chief's checkpoints (model_dir shared or absent)
        initial_epoch = ckpt.EpochCheckpoint(os.path.join(model_dir, "checkpoints"), base_model,
                                             opt).restore()
    if initial_epoch:
        print(f"tfadv: resuming from the checkpoint after epoch {initial_epoch}")

    config_text = gin.operative_config_str()
    ckpt.atomic_write_text(os.path.join(out_dir, "config.gin"), config_text)
    log_dir = os.path.join(out_dir, "tensorboard")
    _write_config_summary(log_dir, config_text)

    start = time.perf_counter()
    history = {}
    if initial_epoch < epochs:
        # Early stopping first, so an epoch's best model is on disk before its checkpoint is.
        every = [early_stopping] if early_stopping is not None else []
        every += [*callbacks, *([summaries] if summaries.every_n_epochs else []), saver,
                  keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False)]
        fit = wrapped.fit(data.train, validation_data=data.validation, epochs=epochs,
                          initial_epoch=initial_epoch, callbacks=every, verbose=verbose,
                          shuffle=False, validation_freq=validation_freq)
        history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    train_seconds = time.perf_counter() - start
    last = None
    if early_stopping is not None and os.path.exists(early_stopping.best_path):
        ckpt.atomic_save_model(base_model, os.path.join(out_dir, "model_last.keras"))
        last = evaluation.evaluate(base_model, data.test, attacks=eval_attacks or {},
                                   sanity=False, verbose=0, strategy=strat)
        best = keras.models.load_model(early_stopping.best_path)
        base_model.set_weights(best.get_weights())
        print(f"tfadv: selected the checkpoint of epoch {early_stopping.state['best_epoch']} "
              f"({early_stopping.monitor} {early_stopping.state['best']:.4f})")
    ckpt.atomic_save_model(base_model, os.path.join(out_dir, "model.keras"))
    # The operative config is complete only once every configurable has been called.
    config_text = gin.operative_config_str()
    ckpt.atomic_write_text(os.path.join(out_dir, "config.gin"), config_text)

    result = evaluation.evaluate(base_model, data.test, attacks=eval_attacks or {},
                                 output_dir=out_dir, verbose=1 if verbose else 0, strategy=strat)
    summaries.write_robustness_curve(result)
    report = {
        "dataset": data.name,
        "split": "test",
        "defense": defense.__name__,
        "model": base_model.name,
        "epochs": epochs,
        "resumed_from_epoch": initial_epoch,
        "train_seconds": round(train_seconds, 1),
        "headline": result["headline"],
        **{k: v for k, v in result.items() if k not in ("per_example", "headline")},
        "history": history,
    }
    if last is not None:
        state = early_stopping.state
        report["early_stopping"] = {
            "monitor": early_stopping.monitor, "selected_epoch": state["best_epoch"],
            "selected_value": state["best"], "stopped_epoch": state["stopped_epoch"],
            "validation_freq": validation_freq}
        report["last"] = {k: last[k] for k in ("headline", "clean_accuracy", "robust_accuracy",
                                               "worst_case_accuracy") if k in last}
    if callable(getattr(wrapped, "certified_report", None)):  # certified defenses (IBP)
        certified = wrapped.certified_report(base_model, data.test)
        report.update(certified)
        print(f"tfadv: certified {certified}")
    ckpt.atomic_write_text(os.path.join(out_dir, "report.json"),
                           json.dumps(report, indent=2) + "\n")
    print(evaluation.format_table(result))
    print(f"tfadv: wrote {os.path.join(out_dir, 'report.json')}")
    distribute.remove_worker_dir(out_dir, model_dir)
    if export_dir is not None and distribute.is_chief(strat):
        exported = export_lib.export_saved_model(base_model, os.path.join(model_dir, export_dir),
                                      source=os.path.join(model_dir, "model.keras"))
        print(f"tfadv: exported the model for TF Serving to {exported}")
    return report

