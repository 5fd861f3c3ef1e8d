"""The shared shape of every defense: a `keras.Model` that wraps a base classifier.

A defense owns the training objective (its `train_step`) and reports clean and robust accuracy in
`test_step`. It adds no variables of its own to the deployed model: `save` and `export` write the
wrapped base classifier only.

Distribution and mixed precision follow Keras' own `train_step` (see the TensorFlow trainer): the
per-replica loss is the per-replica mean divided by the number of replicas (so the optimizer's sum
over replicas gives the global-batch mean), the loss is passed through `optimizer.scale_loss`
before differentiation (loss scaling), and the logged loss is multiplied back by the number of
replicas.
"""

import keras
import numpy as np
import tensorflow as tf

from tfadv.attacks import cross_entropy
from tfadv.data import validate_arrays


def num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_mean(per_example, sample_weight=None):
    """This replica's share of the global-batch mean of ``per_example`` (see module docstring)."""
    per_example = tf.cast(per_example, tf.float32)
    if sample_weight is not None:
        sample_weight = tf.cast(sample_weight, tf.float32)
    return tf.nn.compute_average_loss(per_example, sample_weight=sample_weight)


class Defense(keras.Model):
    """Base class of tfadv defenses. Subclasses implement `train_step`.

    Args:
      base_model: the classifier to make robust, mapping images in [0, 1] to logits.
      attack: the attack used to build training examples (a `tfadv.attacks.PGD` or compatible).
      eval_attack: the attack behind ``robust_accuracy`` in `evaluate` and validation. Defaults to
        ``attack``.
    """

    def __init__(self, base_model, attack=None, eval_attack=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(base_model, keras.Model):
            raise TypeError(f"base_model must be a keras.Model; got {type(base_model).__name__}.")
        self.base_model = base_model
        self.attack = attack
        self.eval_attack = eval_attack if eval_attack is not None else attack
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.adv_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.robust_accuracy = keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy")

    # --- Keras plumbing -------------------------------------------------------------------
    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def build(self, input_shape):
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

    # --- helpers for subclasses -----------------------------------------------------------
    def regularization_loss(self):
        """The base model's `losses` (e.g. weight decay), scaled for the replica count."""
        if not self.base_model.losses:
            return tf.constant(0.0)
        return tf.nn.scale_regularization_loss(
            tf.add_n([tf.cast(l, tf.float32) for l in self.base_model.losses])
        )

    def apply_gradients(self, tape, loss):
        """Differentiates the (loss-scaled) replica loss and applies the optimizer step."""
        variables = self.base_model.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)

    def supervised_step(self, inputs, y, sample_weight, accuracy):
        """One optimizer step on the mean cross-entropy of ``base_model(inputs)`` against ``y``.

        Returns the logs dict (loss and ``accuracy``, the metric updated with these logits).
        """
        with tf.GradientTape() as tape:
            logits = self.base_model(inputs, training=True)
            loss = replica_mean(cross_entropy(y, logits), sample_weight)
            loss = loss + self.regularization_loss()
            scaled_loss = self.optimizer.scale_loss(loss)
        self.apply_gradients(tape, scaled_loss)
        self.track_loss(loss, inputs)
        accuracy.update_state(y, logits, sample_weight=sample_weight)
        return {"loss": self.loss_tracker.result(), accuracy.name: accuracy.result()}

    def track_loss(self, replica_loss, x):
        """Logs the global loss from this replica's share (undoing the replica division)."""
        batch = tf.shape(x)[0]
        self.loss_tracker.update_state(replica_loss * num_replicas(), sample_weight=batch)

    # --- evaluation -----------------------------------------------------------------------
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.base_model(x, training=False)
        loss = replica_mean(cross_entropy(y, logits), sample_weight) + self.regularization_loss()
        self.track_loss(loss, x)
        self.clean_accuracy.update_state(y, logits, sample_weight=sample_weight)
        results = {"loss": self.loss_tracker.result(), "accuracy": self.clean_accuracy.result()}
        if self.eval_attack is not None:
            x_adv = self.eval_attack(self.base_model, x, y)
            adv_logits = self.base_model(x_adv, training=False)
            self.robust_accuracy.update_state(y, adv_logits, sample_weight=sample_weight)
            results["robust_accuracy"] = self.robust_accuracy.result()
        return results

    # --- saving: the base classifier only -------------------------------------------------
    def save(self, filepath, *args, **kwargs):
        """Saves the base classifier (the defense adds nothing to the deployed model)."""
        return self.base_model.save(filepath, *args, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """Exports the base classifier (see `keras.Model.export`)."""
        return self.base_model.export(filepath, *args, **kwargs)

    def save_weights(self, filepath, *args, **kwargs):
        return self.base_model.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        return self.base_model.load_weights(filepath, *args, **kwargs)

    # --- input validation -----------------------------------------------------------------
    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, after checking array inputs (range, shape, labels)."""
        if isinstance(x, np.ndarray) or tf.is_tensor(x):
            validate_arrays(np.asarray(x), None if y is None else np.asarray(y),
                            image_shape=self.base_model.input_shape[1:],
                            num_classes=self.base_model.output_shape[-1])
        return super().fit(x, y, *args, **kwargs)
