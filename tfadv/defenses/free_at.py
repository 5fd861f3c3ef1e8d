"""Free adversarial training (Shafahi et al. 2019).

Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor, Goldstein, "Adversarial
Training for Free!", NeurIPS 2019 (official code: mahyarnajibi/FreeAdversarialTraining). Each
minibatch is replayed ``replays`` (m) times; every replay computes ONE backward pass that gives
both the weight gradient (applied at once) and the input gradient, which updates the
perturbation carried to the next replay and on to the next minibatch:

    for each minibatch, m times:
        g_theta, g_delta = grad L(theta, clip(x + delta, 0, 1), y)
        theta <- optimizer step with g_theta
        delta <- clip(delta + eps * sign(g_delta), -eps, eps)

(paper, Algorithm 1; step size eps as in the official code). The perturbation is per replica
(each replica keeps its own for its share of the batch). It is checkpointed (`tfadv.train`) and
in Keras weights files, so a resumed run continues it: exactly on one replica; with several, the
first replica's perturbation is restored to all of them. The perturbation is float32 under every
precision policy; with ``mixed_float16`` the replay's one backward pass is of the scaled loss
(`Defense` docstring), which `keras.optimizers.LossScaleOptimizer.apply` unscales for the
weights and which leaves the sign of the input gradient unchanged. One Keras step is
``replays`` optimizer updates, so the paper's budget is ``epochs / m`` passes over the data (the
official code divides the epochs by m likewise).

FGSM with a random start (Wong et al. 2020) needs no class of its own: it is
`PGDAdversarialTraining` with a one-step PGD (gin: ``fast_at.gin``); its catastrophic-overfitting
check is `tfadv.defenses.catastrophic_overfitting`.
"""

import gin
import keras
import tensorflow as tf

from tfadv.checks import check_number
from tfadv.defenses.base import Defense, ModelState, replica_mean


@gin.configurable(denylist=["base_model"])
class FreeAdversarialTraining(Defense):
    """Free adversarial training (Shafahi et al. 2019); see the module docstring. It trains
    f = ``base_model`` on

        E[ max_{||delta||_inf <= eps} CE(f(clip(x + delta, 0, 1)), y) ]

    with the inner max approximated by the carried perturbation delta: one sign step of size
    eps = ``eps`` per replay, from the same backward pass as the weight update.

    Args:
      base_model: classifier from images in [0, 1] to logits.
      eps: L-inf radius of the perturbation (and its step size, as in the official code).
      replays: m, the number of times each minibatch is replayed (paper: 4 to 10; CIFAR 8).
      batch_size: the largest GLOBAL batch the defense will see (the carried perturbation has
        this many rows; smaller last batches use the first rows).
      eval_attack: attack behind ``robust_accuracy`` in validation.
      margin: Hypersphere Embedding margin (FreeAT+HE, Pang et al. 2020; see `Defense`).
    """

    supports_awp = False  # each replay is already an optimizer step

    def __init__(self, base_model, eps=0.3, replays=8, batch_size=128, eval_attack=None,
                 **kwargs):
        check_number("eps", eps, 0.0, strict=True)
        check_number("replays", replays, 1, strict=False, integer=True)
        check_number("batch_size", batch_size, 1, strict=False, integer=True)
        super().__init__(base_model, attack=None, eval_attack=eval_attack, **kwargs)
        self.eps = float(eps)
        self.replays = replays
        self.batch_size = batch_size
        self.delta = None
        if isinstance(getattr(base_model, "_build_shapes_dict", None), dict) or getattr(
                base_model, "built", False):
            self._make_delta(base_model.input_shape)

    def _make_delta(self, input_shape):
        # Per replica (ON_READ): every replica carries the perturbation of its own examples. A
        # checkpoint saves the first replica's (ONLY_FIRST_REPLICA) and restores it to all.
        shape = (self.batch_size, *input_shape[1:])
        self.delta = tf.Variable(tf.zeros(shape), trainable=False, name="free_at_delta",
                                 synchronization=tf.VariableSynchronization.ON_READ,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def save_own_variables(self, store):
        """Keras weights files (`save_weights`, `keras.callbacks.BackupAndRestore`) keep the
        carried perturbation too."""
        super().save_own_variables(store)
        if self.delta is not None:
            store["free_at_delta"] = self.delta.numpy()

    def load_own_variables(self, store):
        """Restores the variables `save_own_variables` wrote, the carried perturbation
        included when the store has one."""
        keys = list(store.keys())
        super().load_own_variables({k: store[k] for k in keys if k != "free_at_delta"})
        if self.delta is not None and "free_at_delta" in keys:
            self.delta.assign(store["free_at_delta"])

    def build(self, input_shape):
        """Builds the base model and, for a base model built only now (a `keras.Sequential`
        without an input shape), the carried perturbation."""
        super().build(input_shape)
        if self.delta is None:
            self._make_delta(tuple(input_shape))

    def train_step(self, data):
        """One Keras step = ``replays`` (m) optimizer updates on the same batch (paper,
        Algorithm 1; module docstring): each replay's one backward pass on
        L(theta, clip(x + delta, 0, 1), y) updates the weights and moves the carried
        perturbation delta by eps * sign(grad_delta) within [-eps, eps] ([0, 1] pixel units).

        Raises ValueError (or fails a graph assertion) when the batch has more rows than
        ``batch_size``. Returns the logs ``loss`` and ``adv_accuracy`` of the last replay."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.cast(x, tf.float32)
        n = tf.shape(x)[0]
        message = (f"FreeAdversarialTraining.batch_size ({self.delta.shape[0]}) must be at least "
                   f"the (per-replica) batch size")
        if x.shape[0] is not None and x.shape[0] > self.delta.shape[0]:
            raise ValueError(f"{message} ({x.shape[0]}).")
        tf.debugging.assert_less_equal(n, self.delta.shape[0], message=message)
        variables = self.base_model.trainable_variables
        # A Python loop, unrolled `replays` times in the graph, not a tf.while_loop: each replay
        # is an optimizer step, and Keras' optimizer aggregates gradients across replicas with
        # a merge_call, which tf.distribute does not allow inside a while loop's body.
        for _ in range(self.replays):
            delta = self.delta[:n]
            with tf.GradientTape() as tape:
                tape.watch(delta)
                state = ModelState(self.base_model)
                logits = state(tf.clip_by_value(x + delta, 0.0, 1.0), training=True)
                loss = replica_mean(self.classification_loss(y, logits), sample_weight)
                loss = loss + state.regularization_loss()
                scaled_loss = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled_loss, [*variables, delta])
            self.optimizer.apply(grads[:-1], variables)
            state.commit()
            # The input gradient is of the scaled loss (mixed_float16): its sign is that of the
            # true gradient, except where the scaling overflowed (inf/NaN; the optimizer skips
            # that step): those pixels take no step rather than poisoning the carried delta.
            g_delta = tf.cast(grads[-1], tf.float32)
            g_delta = tf.where(tf.math.is_finite(g_delta), g_delta, tf.zeros_like(g_delta))
            delta = tf.clip_by_value(delta + self.eps * tf.sign(g_delta), -self.eps, self.eps)
            self.delta.assign(tf.concat([delta, self.delta[n:]], axis=0))
        self.track_loss(loss, x)
        self.adv_accuracy.update_state(y, logits, sample_weight=sample_weight)
        return {"loss": self.loss_tracker.result(), "adv_accuracy": self.adv_accuracy.result()}
