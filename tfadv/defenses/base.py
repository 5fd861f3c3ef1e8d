"""The shared shape of every defense: a `keras.Model` that wraps a base classifier.

A defense owns the training objective and reports clean and robust accuracy in `test_step`. It
adds no variables of its own to the deployed model: `save` writes the wrapped base classifier
only (`tfadv.export.export_saved_model` exports it); `save_weights` keeps the complete training
state.

One training step, for every defense (`Defense.train_step`):

1. ``batch = self.prepare(x, y)``: the attack builds what the objective needs (adversarial
   images, targets), outside any weights tape.
2. Optionally (`tfadv.defenses.AWP`), a weight perturbation v is computed from the same objective.
3. ``loss, logits = self.objective(state, x, y, sample_weight, batch)`` under the tape, where
   ``state`` is a `ModelState`: the base model as a function of explicit weight values (the
   variables, or the variables plus v), with BatchNorm statistics threaded through its calls.
4. The gradient of ``loss`` plus the base model's regularization losses updates the variables,
   and the BatchNorm statistics of the step are written back.

Subclasses implement `prepare` and `objective`; the step, AWP, distribution and mixed precision
are handled here once.

Distribution and mixed precision follow Keras' own `train_step` (see the TensorFlow trainer): the
per-replica loss is the per-replica mean divided by the number of replicas (so the optimizer's sum
over replicas gives the global-batch mean), the loss is passed through `optimizer.scale_loss`
before differentiation (loss scaling), and the logged loss is multiplied back by the number of
replicas.

Mixed precision (``train.precision``): under the ``mixed_float16`` policy `keras.Model.compile`
(``auto_scale_loss=True``, the default) wraps the optimizer in a
`keras.optimizers.LossScaleOptimizer`, whose ``scale_loss`` multiplies by the dynamic loss scale
and whose ``apply`` divides the gradients by it again (skipping the step, and halving the scale,
when they are not finite); any other optimizer's ``scale_loss`` is the identity
(``float32``, ``mixed_bfloat16``). Variables stay float32; losses are computed in float32 from the
logits (`replica_mean`, `tfadv.attacks.losses`), and attacks keep the perturbation in float32.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks import cross_entropy
from tfadv.attacks.base import training_step_seed
from tfadv.data import validate_arrays
from tfadv.heads import HypersphereHead


def num_replicas():
    """The number of replicas of the current `tf.distribute` strategy (1 outside any): the
    factor between one replica's share of the loss and the global-batch loss."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_mean(per_example, sample_weight=None):
    """This replica's share of the global-batch mean of ``per_example`` (see module docstring)."""
    per_example = tf.cast(per_example, tf.float32)
    if sample_weight is not None:
        sample_weight = tf.cast(sample_weight, tf.float32)
    return tf.nn.compute_average_loss(per_example, sample_weight=sample_weight)


class ModelState:
    """A Keras model evaluated at explicit weight values (`keras.Model.stateless_call`).

    ``trainable`` are the model's variables read under the caller's gradient tape, plus
    ``perturbation`` (one tensor or ``None`` per trainable variable) when given: gradients taken
    with respect to the variables are then gradients at the perturbed point. Non-trainable
    values (BatchNorm moving statistics, dropout seed state) start at the variables and are
    threaded through successive calls, as successive ordinary calls would update them; nothing
    is written to the model until `commit`.
    """

    def __init__(self, model, perturbation=None):
        self.model = model
        variables = model.trainable_variables
        if perturbation is None:
            perturbation = [None] * len(variables)
        if len(perturbation) != len(variables):
            raise ValueError(f"perturbation has {len(perturbation)} entries; the model has "
                             f"{len(variables)} trainable variables.")
        self.trainable = [v.value if p is None else v.value + tf.cast(p, v.dtype)
                          for v, p in zip(variables, perturbation)]
        self.non_trainable = [v.value for v in model.non_trainable_variables]
        self._regularization = None

    def __call__(self, inputs, training=True):
        outputs, self.non_trainable, losses = self.model.stateless_call(
            self.trainable, self.non_trainable, inputs, training=training, return_losses=True)
        self._regularization = losses
        return outputs

    def regularization_loss(self):
        """The model's losses (weight decay) at these weight values, scaled for the replicas."""
        losses = self._regularization
        if losses is None:  # not called yet: evaluate the regularizers at these values
            losses = [v.regularizer(value) for v, value
                      in zip(self.model.trainable_variables, self.trainable)
                      if getattr(v, "regularizer", None) is not None]
        if not losses:
            return tf.constant(0.0)
        return tf.nn.scale_regularization_loss(tf.add_n([tf.cast(l, tf.float32) for l in losses]))

    def commit(self):
        """Writes the threaded non-trainable values (BatchNorm statistics) to the model."""
        for variable, value in zip(self.model.non_trainable_variables, self.non_trainable):
            if value is not variable.value:
                variable.assign(value)


def _logit_margin(base_model, margin):
    """s * m for the HE margin m of a model whose head is a `HypersphereHead` of scale s."""
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 2:
        raise ValueError(f"margin must be a number in [0, 2) (cosine units); got {margin!r}.")
    if not margin:
        return 0.0
    heads = [layer for layer in base_model._flatten_layers()
             if isinstance(layer, HypersphereHead)]
    if not heads:
        raise ValueError(
            "margin (Hypersphere Embedding) needs a base model whose logits are s * cos(theta) "
            "from tfadv.heads.HypersphereHead (gin: train.model = @he_model).")
    return float(heads[-1].scale * margin)


class _AWPWarmup(keras.callbacks.Callback):
    """Switches AWP on at ``awp.warmup_epochs`` (rebuilding the train function once)."""

    def __init__(self, defense):
        super().__init__()
        self.defense = defense

    def on_epoch_begin(self, epoch, logs=None):
        active = epoch >= self.defense.awp.warmup_epochs
        if active != self.defense.awp_active:
            self.defense.awp_active = active
            self.defense.make_train_function(force=True)


class Defense(keras.Model):
    """Base class of tfadv defenses. Subclasses implement `prepare` and `objective`.

    Args:
      base_model: the classifier to make robust, mapping images in [0, 1] to logits.
      attack: the attack used to build training examples (a `tfadv.attacks.PGD` or compatible).
      eval_attack: the attack behind ``robust_accuracy`` in `evaluate` and validation. Defaults to
        ``attack``.
      awp: an `tfadv.defenses.AWP` to train against adversarial weight perturbations too (only
        defenses with ``supports_awp``).
      margin: the Hypersphere Embedding angular margin m (Pang et al. 2020), in cosine units;
        needs a base model ending in `tfadv.heads.HypersphereHead` (logits s * cos(theta)). The
        training cross-entropy then uses s * (cos(theta_y) - m) for the true class; attacks and
        evaluation never see the margin (see `classification_loss`).
    """

    supports_awp = True

    def __init__(self, base_model, attack=None, eval_attack=None, awp=None, margin=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(base_model, keras.Model):
            raise TypeError(f"base_model must be a keras.Model; got {type(base_model).__name__}.")
        self.logit_margin = _logit_margin(base_model, margin)
        if awp is not None:
            if not self.supports_awp:
                raise ValueError(
                    f"{type(self).__name__} does not support AWP (awp=...): adversarial weight "
                    "perturbation needs an adversarial objective. Use it with "
                    "PGDAdversarialTraining, TRADES, MART or ALP.")
            if not callable(getattr(awp, "perturbation", None)):
                raise TypeError(f"awp must be a tfadv.defenses.AWP; got {type(awp).__name__}.")
        self.base_model = base_model
        # From NumPy's global generator, which tfadv.train seeds with train.seed (step_seed).
        self.run_seed = int(np.random.randint(0, 2**31 - 1))
        self.attack = attack
        self.eval_attack = eval_attack if eval_attack is not None else attack
        self.awp = awp
        self.awp_active = awp is not None and awp.warmup_epochs == 0
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.adv_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.robust_accuracy = keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy")

    # --- Keras plumbing -------------------------------------------------------------------
    def call(self, inputs, training=False):
        """The base classifier's logits for ``inputs`` (images in [0, 1]): a defense predicts
        exactly as the model it wraps; ``training`` is passed on (BatchNorm, dropout)."""
        return self.base_model(inputs, training=training)

    def build(self, input_shape):
        """Builds the base model for ``input_shape`` (batch, H, W, C) if it is not built yet
        (e.g. a `keras.Sequential` of layers only), then the defense."""
        if not self.base_model.built:
            self.base_model.build(input_shape)
        super().build(input_shape)

    @property
    def metrics(self):
        return [self.loss_tracker, self.adv_accuracy, self.clean_accuracy, self.robust_accuracy]

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Like `keras.Model.compile`, with the loss and metrics fixed by the defense."""
        if loss is not None or metrics is not None:
            raise ValueError(
                f"{type(self).__name__} defines its own training loss and metrics (loss, "
                "adv_accuracy, accuracy, robust_accuracy); call compile(optimizer=...) without "
                "loss= or metrics=."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def classification_loss(self, y, logits):
        """Per-example training cross-entropy: plain, or with the HE margin (``margin``),

            -log( e^{s(cos theta_y - m)} / (e^{s(cos theta_y - m)} + sum_{j != y} e^{s cos theta_j}) )

        (Pang et al. 2020, eq. 7; official ``he.py``), i.e. the logit of the true class lowered by
        s * m. Use it for every cross-entropy of a training objective; attacks use plain
        cross-entropy (the official code attacks with m = 0)."""
        if not self.logit_margin:
            return cross_entropy(y, logits)
        logits = tf.cast(logits, tf.float32)
        onehot = tf.one_hot(tf.cast(y, tf.int32), tf.shape(logits)[-1])
        return cross_entropy(y, logits - self.logit_margin * onehot)

    # --- what subclasses define -----------------------------------------------------------
    def prepare(self, x, y):
        """Everything the objective needs from the attack (e.g. adversarial images), computed
        outside the weights tape. Default: nothing."""
        return None

    def objective(self, state, x, y, sample_weight, batch):
        """The training loss of one replica's batch at the weights of ``state``.

        Args:
          state: a `ModelState`; call ``state(images, training=True)`` for logits.
          x, y, sample_weight: the replica's batch.
          batch: what `prepare` returned.

        Returns:
          ``(loss, logits)``: the replica's share of the global-batch loss (use `replica_mean`;
          without regularization), and a dict with ``'adv'`` and/or ``'clean'`` logits for the
          training accuracies.
        """
        raise NotImplementedError

    # --- the training step ----------------------------------------------------------------
    def step_seed(self, salt=0):
        """The stateless seed of this training step on this replica: ``[run seed, t * R + r]``
        (t = ``optimizer.iterations``, R replicas, r this replica). Attacks with ``seed=None``
        draw from it (`tfadv.attacks.base.training_step_seed`), so a resumed run repeats the
        uninterrupted run's draws and replicas draw independently. Validation (`test_step`)
        uses ``salt=1``: its attacks draw the same at the same training step."""
        context = tf.distribute.get_replica_context()
        replica = 0 if context is None else context.replica_id_in_sync_group
        step = tf.cast(self.optimizer.iterations % (2**31 - 1), tf.int32)
        return tf.stack([tf.constant((self.run_seed + 1000003 * salt) % (2**31 - 1), tf.int32),
                         step * num_replicas() + tf.cast(replica, tf.int32)])

    def train_step(self, data):
        """One training step on a batch ``(x, y[, sample_weight])`` (module docstring):
        `prepare` outside the weights tape, the AWP perturbation when active, `objective` plus
        the regularization losses under the tape, one optimizer update, then the BatchNorm
        statistics written back. Attacks and noise with ``seed=None`` draw from `step_seed`.

        Returns the logs: ``loss`` (global-batch mean, regularization included) and
        ``adv_accuracy`` and/or ``accuracy``, the training accuracies on the examples the
        objective saw."""
        with training_step_seed(self.step_seed()):
            return self._train_step(data)

    def _train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.nest.map_structure(
            lambda t: None if t is None else tf.stop_gradient(t), self.prepare(x, y))
        perturbation = None
        if self.awp is not None and self.awp_active:
            perturbation = self.awp.perturbation(self, x, y, sample_weight, batch)
        variables = self.base_model.trainable_variables
        with tf.GradientTape() as tape:
            state = ModelState(self.base_model, perturbation)
            loss, logits = self.objective(state, x, y, sample_weight, batch)
            loss = loss + state.regularization_loss()
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(grads, variables)
        state.commit()
        self.track_loss(loss, x)
        logs = {"loss": self.loss_tracker.result()}
        for key, metric in (("adv", self.adv_accuracy), ("clean", self.clean_accuracy)):
            if key in logits:
                metric.update_state(y, logits[key], sample_weight=sample_weight)
                logs[metric.name] = metric.result()
        return logs

    def regularization_loss(self):
        """The base model's `losses` (e.g. weight decay) at its variables, scaled for the
        replica count."""
        return ModelState(self.base_model).regularization_loss()

    def track_loss(self, replica_loss, x):
        """Logs the global loss from this replica's share (undoing the replica division)."""
        batch = tf.shape(x)[0]
        self.loss_tracker.update_state(replica_loss * num_replicas(), sample_weight=batch)

    # --- evaluation -----------------------------------------------------------------------
    def evaluation_loss(self, y, logits):
        """Per-example loss logged as the validation ``loss`` (default: cross-entropy)."""
        return cross_entropy(y, logits)

    def test_step(self, data):
        """One validation / `evaluate` step on ``(x, y[, sample_weight])``: ``loss``
        (`evaluation_loss` on the clean images plus regularization), clean ``accuracy`` and,
        when there is an ``eval_attack``, ``robust_accuracy`` on its adversarial examples (its
        seeds come from ``step_seed(salt=1)``). Both accuracies are of the base model in
        inference mode (``training=False``)."""
        with training_step_seed(self.step_seed(salt=1)):
            return self._test_step(data)

    def _test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.base_model(x, training=False)
        loss = (replica_mean(self.evaluation_loss(y, logits), sample_weight)
                + self.regularization_loss())
        self.track_loss(loss, x)
        self.clean_accuracy.update_state(y, logits, sample_weight=sample_weight)
        results = {"loss": self.loss_tracker.result(), "accuracy": self.clean_accuracy.result()}
        if self.eval_attack is not None:
            x_adv = self.eval_attack(self.base_model, x, y)
            adv_logits = self.base_model(x_adv, training=False)
            self.robust_accuracy.update_state(y, adv_logits, sample_weight=sample_weight)
            results["robust_accuracy"] = self.robust_accuracy.result()
        return results

    # --- saving ---------------------------------------------------------------------------
    def save(self, filepath, *args, **kwargs):
        """Saves the base classifier (the defense adds nothing to the deployed model); tfadv's
        one export for TF Serving is `tfadv.export.export_saved_model`, which also unwraps a
        defense."""
        return self.base_model.save(filepath, *args, **kwargs)

    # save_weights/load_weights are Keras' own (not overridden): they cover the complete
    # training state, i.e. the base model, the optimizer and the defense's own variables (e.g.
    # Free AT's carried perturbation), so keras.callbacks.BackupAndRestore around a defense
    # loses nothing.

    def certified_report(self, base_model, dataset):
        """Certified defenses (IBP) return a dict of verified accuracies for the final report;
        the others return ``None``."""
        return None

    def _build_from(self, x):
        """Builds the defense (and a base model without an input shape yet, e.g. a
        `keras.Sequential` of layers only) from the shape of the training inputs ``x``."""
        if self.built and self.base_model.built:
            return
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            spec = spec[0] if isinstance(spec, tuple) else spec
            shape = tuple(spec.shape)
        elif hasattr(x, "shape"):
            shape = (None, *tuple(x.shape)[1:])
        else:
            return
        with self.distribute_strategy.scope():
            self.build((None, *shape[1:]))

    # --- input validation -----------------------------------------------------------------
    def check_schedule(self, epochs):
        """Raises a clear error if the defense cannot train for ``epochs`` epochs (e.g. an AWP
        warm-up that would outlast training). Called by `fit` and by `tfadv.train`."""
        if self.awp is not None and self.awp.warmup_epochs >= epochs:
            raise ValueError(
                f"AWP.warmup_epochs={self.awp.warmup_epochs} must be smaller than the number of "
                f"training epochs ({epochs}): AWP would never start.")

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, after checking array inputs (range, shape, labels) and the
        schedule; adds the AWP warm-up switch when AWP is used."""
        signature = inspect.signature(keras.Model.fit)
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        x, y = arguments.get("x"), arguments.get("y")
        self._build_from(x)
        if isinstance(x, np.ndarray) or tf.is_tensor(x):
            validate_arrays(np.asarray(x), None if y is None else np.asarray(y),
                            image_shape=self.base_model.input_shape[1:],
                            num_classes=self.base_model.output_shape[-1])
        self.check_schedule(arguments.get("epochs", signature.parameters["epochs"].default))
        if self.awp is not None:
            arguments["callbacks"] = [*(arguments.get("callbacks") or []), _AWPWarmup(self)]
        return super().fit(**arguments, **extra)
