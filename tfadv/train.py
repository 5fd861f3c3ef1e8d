"""The training driver behind `bin/train`: data, model, defense, fit, checkpoints, report.

Everything is configured by gin (see `gin/`); `train` itself holds no method-specific logic. It
runs a `Run` in steps, the way dopamine's Runner splits its loop: `Run.claim` (lock the model_dir,
check it against the run-directory contract of `tfadv.rundir`), `Run.build` (data, model,
defense, optimizer), `Run.restore` (the newest intact checkpoint and the run's state), `Run.fit`,
`Run.select` (early stopping's checkpoint), `Run.report` (evaluation, ``report.json``) and
`Run.export`. A run writes to ``model_dir`` (names in `tfadv.rundir`):

- ``run.json`` and ``config.gin``: the bindings the run was started with, and the operative
  gin configuration (also in TensorBoard as text);
- ``tensorboard/``: the run's HParams session (its hyperparameters from the start; at the end
  the final clean and headline robust accuracy, its reliability and the robustness curve);
  ``train/`` and ``validation/``: per-epoch loss, accuracies (train: adversarial; validation:
  clean and robust) and learning rate; ``adversarial/``: labelled adversarial examples and logit
  margin histograms every ``AdversarialSummaries.every_n_epochs`` epochs (`tfadv.tensorboard`);
- ``checkpoints/``: a verified checkpoint per epoch (`tfadv.checkpoint`); running the same command
  again resumes after the last finished epoch, bit for bit;
- ``model.keras``: the trained base classifier (the defense wrapper is not saved);
- ``report.json``: the headline robust accuracy (the worst case over every attack, the standard
  AutoAttack included) with its verdict, clean and robust test accuracy per attack, the remedies
  a failed sanity check ran, the sanity checks and the training history of the whole run (across
  resumes), also printed as a table; ``eval.json``, ``robustness_curve.png`` and
  ``examples.png`` from `tfadv.evaluation.evaluate` (per-example results and plots).
"""
import contextlib
import functools
import inspect
import math
import os
import sys
import time

import gin
import keras
import tensorflow as tf

import tfadv
from tfadv import checkpoint as ckpt
from tfadv import cli
from tfadv import data as data_lib
from tfadv import distribute
from tfadv import evaluation
from tfadv import export as export_lib
from tfadv import models
from tfadv import rundir
from tfadv import tensorboard as tensorboard_lib
from tfadv.checks import check_positive_int
from tfadv.cli import UserError
from tfadv.defenses import PGDAdversarialTraining

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


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
        if precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
            print("tfadv: warning: train.precision = 'mixed_float16' needs a GPU (on a CPU it "
                  "runs about 5x slower); training in float32", file=sys.stderr)
            precision = "float32"
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(precision)
        try:
            return fn(*args, **kwargs)
        finally:
            keras.mixed_precision.set_global_policy(previous)

    return wrapper



# Bindings that may differ when a run is resumed: they change what is printed, not what is
# trained (train.epochs may grow with extend=True).
RESUME_NEUTRAL = ("train.verbose",)


@gin.configurable(denylist=["model_dir", "restart", "extend"])
@_under_precision_policy
def train(model_dir, defense=PGDAdversarialTraining, model="digits_cnn", optimizer=None,
          learning_rate=1e-3, epochs=30, eval_attacks=None, strategy="mirrored", seed=0,
          jit_compile=False, verbose=1, dry_run=False, validation_freq=1, early_stopping=None,
          initial_weights=None, callbacks=(), export_dir=None, precision="float32",
          restart=False, extend=False):
    """Trains ``defense(base_model)`` and writes the artifacts listed in the module docstring.

    Args:
      model_dir: output directory (created; the same call again resumes an unfinished run).
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
      seed: seeds Python, NumPy and TensorFlow (`keras.utils.set_random_seed`), the order of
        every epoch's batches (`tfadv.data.epoch_key`) and the step-keyed attack draws.
      jit_compile: XLA for the train step (``compile(jit_compile=...)``), explicit because
        Keras' "auto" differs by strategy (gin: ``train.jit_compile = True``). On CPU XLA made
        the PGD loop slower: measure before enabling.
      verbose: Keras progress bar (1; one line per epoch when stdout is not a terminal), one
        line per epoch (2) or silent (0).
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
      callbacks: more Keras callbacks (gin: ``[@CatastrophicOverfittingMonitor()]``); a
        `tfadv.checkpoint.RunCallback` gets ``attach`` called before training and its state
        checkpointed.
      export_dir: when set, the final model (the one in ``model.keras``) is also exported for
        TF Serving by `tfadv.export.export_saved_model` to ``export_dir/<next version>/``, after
        the report is written; a relative path is under ``model_dir`` (gin: ``train.export_dir
        = 'serving'`` gives ``model_dir/serving/1/``), an absolute one is used as given.
      precision: the Keras dtype policy, one of `PRECISIONS`: ``'float32'``,
        ``'mixed_float16'`` (half-precision compute with dynamic loss scaling: `compile` wraps
        the optimizer in a `keras.optimizers.LossScaleOptimizer`; on a machine without a GPU it
        falls back to float32 with one warning line) or ``'mixed_bfloat16'`` (no loss scaling
        needed). Set as the global policy before the model is built and restored when `train`
        returns. Variables, the logits layer (`tfadv.models`), losses and attack perturbations
        stay float32 (gin: ``train.precision = 'mixed_float16'``).
      restart: start over on a model_dir that holds a run: the old run moves to
        ``model_dir/previous/<UTC time>/`` (``bin/train --restart``).
      extend: train a finished run on to a larger ``epochs``: its report and models move to
        ``model_dir/previous/<UTC time>/`` and training continues from its last checkpoint
        (``bin/train --extend``).

    Returns:
      the report dict (also written to ``model_dir/report.json``); with ``dry_run`` a dict of
      the built objects (``data``, ``defense``, ``eval_attacks``).

    Raises:
      tfadv.cli.UserError: the model_dir is in use, holds a finished run (neither ``restart``
        nor ``extend``), or was started with other bindings; `tfadv.checkpoint.TrainingDiverged`
        when the loss or the weights become non-finite (the last good checkpoint is kept).
    """
    check_positive_int("epochs", epochs)
    check_positive_int("validation_freq", validation_freq)
    if export_dir is not None and (not isinstance(export_dir, (str, os.PathLike))
                                   or not os.fspath(export_dir)):
        raise ValueError(f"export_dir must be None or a non-empty path; got {export_dir!r}.")
    if initial_weights is not None:  # relative: to the working directory, as model_dir
        given, initial_weights = initial_weights, data_lib.resolve_path(initial_weights)
        if not os.path.exists(initial_weights):
            relative = ("" if os.path.isabs(given)
                        else f" ({given!r} relative to the working directory)")
            raise UserError(f"initial_weights {initial_weights}{relative} does not exist.",
                            hint=data_lib.run_output_hint(
                                initial_weights, "train", fallback="train the source model "
                                "first, e.g. bin/train --gin_file=pretrain.gin."))
    if not (isinstance(defense, type) and issubclass(defense, keras.Model)):
        raise ValueError(f"defense must be a tfadv.defenses.Defense class; got {defense!r}.")
    if isinstance(model, str) and model not in models.MODELS:
        raise ValueError(f"model must be one of {sorted(models.MODELS)}; got {model!r}.")
    if isinstance(learning_rate, (int, float)) and not (math.isfinite(learning_rate)
                                                         and learning_rate > 0):
        raise ValueError(f"train.learning_rate must be a finite number > 0; got {learning_rate}.")
    if restart and extend:
        raise UserError("restart and extend exclude each other: restart starts over, extend "
                        "trains a finished run on.")
    if verbose == 1 and not sys.stdout.isatty():
        verbose = 2  # a progress bar written to a file is a stream of escape codes
    run = Run(model_dir, defense=defense, model=model, optimizer=optimizer,
              learning_rate=learning_rate, epochs=epochs, eval_attacks=eval_attacks or {},
              strategy=strategy, seed=seed, jit_compile=jit_compile, verbose=verbose,
              validation_freq=validation_freq, early_stopping=early_stopping,
              initial_weights=initial_weights, callbacks=list(callbacks), export_dir=export_dir)
    run.start_strategy()
    run.build()
    if dry_run:
        return {"data": run.data, "defense": run.defense,
                "eval_attacks": dict(eval_attacks or {})}
    with run.claim(restart=restart, extend=extend):
        cli.setup_done()  # from here on, only a UserError is the user's (tfadv.cli)
        run.restore()
        run.fit()
        run.select()
        report = run.report()
        run.export()
    return report


class Run:
    """One `train` call in steps (module docstring); the arguments are `train`'s."""

    def __init__(self, model_dir, **config):
        self.model_dir = os.fspath(model_dir)
        self.defense_cls = config.pop("defense")
        for key, value in config.items():
            setattr(self, key, value)
        self.train_args = {"defense": self.defense_cls, **config}  # TensorBoard's hparams
        self.summaries = tensorboard_lib.AdversarialSummaries()  # gin: AdversarialSummaries.*
        self.history = {}
        self.train_seconds = 0.0
        self.resumes = []
        self.initial_epoch = 0
        self.last = None

    # --- 1. strategy and objects ---------------------------------------------------------
    def start_strategy(self):
        """Creates the distribution strategy (the run's first TensorFlow work) and seeds Keras."""
        # First TF work of the run: a multi-worker strategy must exist before other TF ops.
        self.strat = distribute.get_strategy(self.strategy)
        keras.utils.set_random_seed(self.seed)

    def build(self):
        """Data, base model, defense, optimizer: everything a bad configuration fails in."""
        data = self.data = data_lib.load_dataset()
        replicas = self.strat.num_replicas_in_sync
        if data.batch_size % replicas:
            raise ValueError(
                f"load_dataset.batch_size (the global batch) must be divisible by the number of "
                f"replicas; got {data.batch_size} for {replicas} replicas.")
        self.steps_per_epoch = data.training.steps
        print(f"tfadv: {data.name} {data.sizes}, image shape {data.image_shape}, {replicas} "
              f"replica(s), {self.steps_per_epoch} steps/epoch")
        with self.strat.scope():
            build = models.MODELS[self.model] if isinstance(self.model, str) else self.model
            base = self.base_model = build(input_shape=data.image_shape,
                                           num_classes=data.num_classes)
            rundir.check_logits_model(base, data.image_shape)
            if self.initial_weights is not None:
                head = models.transfer_weights(
                    rundir.load_classifier(self.initial_weights, name="initial_weights"), base)
                print(f"tfadv: initialised from {self.initial_weights} (new head: {head})")
            wrapped = self.defense = self.defense_cls(base)
            wrapped.check_schedule(self.epochs)  # e.g. an AWP warm-up longer than training
            lr = (self.learning_rate(self.steps_per_epoch) if callable(self.learning_rate)
                  else self.learning_rate)
            self.opt = (self.optimizer or keras.optimizers.Adam)(learning_rate=lr)
            wrapped.compile(optimizer=self.opt, jit_compile=self.jit_compile)
            wrapped.build((None, *data.image_shape))
            self.opt.build(base.trainable_variables)
        self.run_callbacks = [c for c in [self.early_stopping, *self.callbacks, self.summaries]
                              if isinstance(c, ckpt.RunCallback)]

    # --- 2. the model_dir ----------------------------------------------------------------
    def claim(self, restart=False, extend=False):
        """Locks the model_dir (chief) and applies the run-directory contract (`tfadv.rundir`):
        refuses a finished run unless ``restart``/``extend``, refuses other bindings on
        resume. Returns the lock (a context manager)."""
        # Multi-worker: every worker saves (saving may need collectives), but only the chief
        # into model_dir; the others write to a temporary directory removed at the end.
        self.out_dir = distribute.worker_dir(self.model_dir, self.strat)
        if self.out_dir != self.model_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            return contextlib.nullcontext()
        lock = rundir.RunLock(self.out_dir)
        lock.acquire()
        try:
            self._check_model_dir(restart, extend)
        except BaseException:
            lock.release()
            raise
        return lock

    def _check_model_dir(self, restart, extend):
        d = self.model_dir
        rundir.remove_stale_temporaries(d)
        bindings = gin.config_str()
        run_file = rundir.path(d, rundir.RUN)
        has_run = os.path.exists(run_file)
        foreign = [n for n in os.listdir(d) if n not in (rundir.LOCK, rundir.PREVIOUS)]
        if restart and foreign:
            aside = rundir.move_aside(d)
            print(f"tfadv: restarting; the previous run is kept in {aside}")
            has_run = False
        elif not has_run and foreign:
            raise UserError(f"model_dir {d} holds files but no {rundir.RUN} (not a tfadv run, "
                            f"or one from an older version); nothing was changed.",
                            hint="choose another --model_dir, or pass --restart to move them "
                                 "to previous/ and start over.")
        info = {"created": rundir.now_iso(), "bindings": bindings, "seed": self.seed,
                "tfadv_version": tfadv.__version__, "tensorflow_version": tf.__version__,
                "argv": sys.argv, "resumes": []}
        if has_run:
            info = rundir.read_json(run_file)
            ignore = RESUME_NEUTRAL + (("train.epochs",) if extend else ())
            diff = rundir.config_diff(info["bindings"], bindings, ignore=ignore)
            if diff:
                raise UserError(
                    f"model_dir {d} was started with other gin bindings ({len(diff)} differ): "
                    f"{rundir.format_diff(diff)}.",
                    hint=f"resume with the run's bindings (see {run_file}), or pass --restart "
                         f"to start over (the old run moves to previous/).")
            if rundir.is_finished(d):
                report = rundir.read_json(rundir.path(d, rundir.REPORT))
                done = report.get("epochs")
                if not extend:
                    headline = report.get("headline", {})
                    raise UserError(
                        f"model_dir {d} holds a finished run ({done} epochs, headline "
                        f"{100 * headline.get('accuracy', float('nan')):.2f}% "
                        f"{headline.get('verdict', '')}); nothing was overwritten.",
                        hint="to train it further, raise train.epochs and pass --extend; to "
                             "start over, pass --restart (the old run moves to previous/).")
                if not self.epochs > done:
                    raise UserError(f"--extend needs train.epochs above the finished run's "
                                    f"{done}; got {self.epochs}.")
                aside = rundir.move_aside(d, rundir.FINISHED_OUTPUTS)
                # Its HParams session (start, final metrics) too: the extended run starts anew.
                tensorboard_lib.move_session(rundir.path(d, rundir.TENSORBOARD),
                                             rundir.path(aside, rundir.TENSORBOARD))
                print(f"tfadv: extending the finished run of {done} epochs to {self.epochs}; "
                      f"its report and models are kept in {aside}")
            info["bindings"] = bindings
        rundir.atomic_write_json(run_file, info)
        self.run_info = info

    # --- 3. restore ----------------------------------------------------------------------
    def restore(self):
        """Attaches the run callbacks, opens the checkpoint directory and restores the last
        verified checkpoint with the run's state (history, training time, resumes, callbacks)."""
        for callback in self.run_callbacks:
            callback.attach(self.out_dir, self.base_model, self.data)
        trackables = {"defense": self.defense, "optimizer": self.opt}
        self.saver = ckpt.EpochCheckpoint(rundir.path(self.out_dir, rundir.CHECKPOINTS),
                                          trackables, state_fn=self._state)
        source = self.saver
        if self.out_dir != self.model_dir:  # resume from the chief's checkpoints
            source = ckpt.EpochCheckpoint(rundir.path(self.model_dir, rundir.CHECKPOINTS),
                                          trackables)
        self.initial_epoch, state = source.restore()
        if state:
            self.history = state["history"]
            self.train_seconds = state["train_seconds"]
            self.resumes = state.get("resumes", [])
            for callback in self.run_callbacks:
                if callback.state_key in state.get("callbacks", {}):
                    callback.set_state(state["callbacks"][callback.state_key])
        if self.initial_epoch:
            self.resumes = [*self.resumes, self.initial_epoch]
            print(f"tfadv: resuming from the checkpoint after epoch {self.initial_epoch}")
        self._protect_best()
        config_text = gin.operative_config_str()
        rundir.atomic_write_text(rundir.path(self.out_dir, rundir.CONFIG), config_text)
        self.log_dir = rundir.path(self.out_dir, rundir.TENSORBOARD)
        _write_config_summary(self.log_dir, config_text)
        self.session = tensorboard_lib.HParamsSession(self.log_dir)
        self.session.start(
            tensorboard_lib.run_hparams(gin.config_str(), self.defense_cls, self.train_args,
                                        self.data, exclude=RESUME_NEUTRAL),
            tensorboard_lib.session_metrics([m.name for m in self.defense.metrics]))

    def _protect_best(self):
        best = self.early_stopping.state["best_epoch"] if self.early_stopping else None
        self.saver.protected = {best} if best else set()

    def _state(self, epoch, logs):
        """The run's state after ``epoch`` (0-based), saved in its checkpoint's manifest."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        self._protect_best()
        return {"history": self.history, "resumes": self.resumes,
                "train_seconds": round(self.train_seconds + time.perf_counter()
                                       - self._fit_start, 3),
                "callbacks": {c.state_key: c.get_state() for c in self.run_callbacks
                              if c.state_key}}

    # --- 4. fit --------------------------------------------------------------------------
    def fit(self):
        """Trains from the restored epoch to ``epochs``, one verified checkpoint per epoch."""
        self._fit_start = time.perf_counter()
        if self.initial_epoch >= self.epochs:
            return
        # Early stopping first, so an epoch's best model is on disk before its checkpoint is.
        every = [self.early_stopping] if self.early_stopping is not None else []
        every += [*self.callbacks, *([self.summaries] if self.summaries.every_n_epochs else []),
                  ckpt.FiniteGuard(self.learning_rate, self.saver),
                  # Scalars before the checkpoint: a kill between the two then repeats an
                  # epoch's scalars on resume instead of losing them.
                  tensorboard_lib.EpochScalars(log_dir=self.log_dir, write_graph=False),
                  self.saver]
        self.defense.fit(
            self.data.training.epochs(self.initial_epoch, self.epochs),
            steps_per_epoch=self.steps_per_epoch, validation_data=self.data.validation,
            epochs=self.epochs, initial_epoch=self.initial_epoch, callbacks=every,
            verbose=self.verbose, validation_freq=self.validation_freq, shuffle=False)
        self.train_seconds += time.perf_counter() - self._fit_start
        ckpt.check_finite_weights(self.base_model, self.epochs)

    # --- 5. select -----------------------------------------------------------------------
    def select(self):
        """With early stopping: keeps the last epoch's model as ``model_last.keras``, evaluates
        it, and loads the selected epoch's weights (from its kept checkpoint)."""
        es = self.early_stopping
        if es is None or not es.state.get("best_epoch"):
            return
        rundir.atomic_save_model(self.base_model, rundir.path(self.out_dir, rundir.MODEL_LAST))
        self.last = evaluation.evaluate(self.base_model, self.data.test,
                                        attacks=self.eval_attacks, sanity=False,
                                        verbose=1 if self.verbose else 0,
                                        strategy=self.strat)
        best = es.state["best_epoch"]
        if best in self.saver.epochs():
            self.saver.restore_epoch(best)
        else:  # not among this process's checkpoints (a worker that resumed from the chief's)
            self.base_model.set_weights(keras.models.load_model(es.best_path).get_weights())
        print(f"tfadv: selected the checkpoint of epoch {best} ({es.monitor} "
              f"{es.state['best']:.4f})")

    # --- 6. report -----------------------------------------------------------------------
    def report(self):
        """Saves the classifier and operative config, runs the final evaluation and writes
        ``report.json`` last (it marks the run as finished)."""
        out = self.out_dir
        rundir.atomic_save_model(self.base_model, rundir.path(out, rundir.MODEL))
        # The operative config is complete only once every configurable has been called.
        rundir.atomic_write_text(rundir.path(out, rundir.CONFIG), gin.operative_config_str())
        result = evaluation.evaluate(self.base_model, self.data.test, attacks=self.eval_attacks,
                                     output_dir=out, verbose=1 if self.verbose else 0,
                                     strategy=self.strat)
        report = {
            "dataset": self.data.name,
            "split": "test",
            "defense": type(self.defense).__name__,
            "model": self.base_model.name,
            "epochs": self.epochs,
            "resumes": self.resumes,
            "train_seconds": round(self.train_seconds, 1),
            "headline": result["headline"],
            **{k: v for k, v in result.items() if k not in ("per_example", "headline")},
            "history": self.history,
        }
        es = self.early_stopping
        if self.last is not None:
            report["early_stopping"] = {
                "monitor": es.monitor, "selected_epoch": es.state["best_epoch"],
                "selected_value": es.state["best"], "stopped_epoch": es.state["stopped_epoch"],
                "validation_freq": self.validation_freq}
            report["last"] = {k: self.last[k] for k in (
                "headline", "clean_accuracy", "robust_accuracy", "worst_case_accuracy")
                if k in self.last}
        certified = self.defense.certified_report(self.base_model, self.data.test)
        if certified:  # certified defenses (IBP)
            report.update(certified)
            print(f"tfadv: certified {certified}")
        self.session.finish(report, plot=rundir.path(out, "robustness_curve.png"))
        # report.json last: its presence marks the run finished (tfadv.rundir).
        rundir.atomic_write_json(rundir.path(out, rundir.REPORT), report)
        print(evaluation.format_table(result))
        print(f"tfadv: wrote {rundir.path(out, rundir.REPORT)}")
        distribute.remove_worker_dir(out, self.model_dir)
        return report

    # --- 7. export -----------------------------------------------------------------------
    def export(self):
        """Exports the SavedModel for TF Serving to ``export_dir`` (chief only; none if unset)."""
        if self.export_dir is None or not distribute.is_chief(self.strat):
            return
        exported = export_lib.export_saved_model(
            self.base_model, os.path.join(self.model_dir, self.export_dir),
            source=rundir.path(self.model_dir, rundir.MODEL))
        print(f"tfadv: exported the model for TF Serving to {exported}")
