"""Per-example attack objectives.

An attack objective is any callable ``loss_fn(targets, logits) -> per-example loss`` of shape
``(batch,)``. The attack ascends the sum of it. ``targets`` is whatever the objective compares the
logits with: integer class labels for cross-entropy, clean-input probabilities for the TRADES KL.
"""

import tensorflow as tf


def cross_entropy(labels, logits):
    """Softmax cross-entropy with integer labels, one value per example.

    ``-log softmax(logits)[y]``, computed in float32 whatever the logits' dtype.
    """
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def cw_margin(labels, logits, confidence=50.0):
    """Carlini-Wagner margin for an attacker to maximise, one value per example:

        min(max_{j != y} z_j - z_y, confidence)

    Positive exactly when the example is misclassified; the gain stops once the wrong class leads
    by ``confidence`` (kappa). The default 50 is the margin of the CW-20 evaluation in the
    Feature Scattering code (``fs_eval.py``); 0 stops at the decision boundary.
    """
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    onehot = tf.one_hot(labels, num_classes, dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    other_logit = tf.reduce_max(logits - onehot * 1e9, axis=-1)
    return tf.minimum(other_logit - true_logit, confidence)


def kl_divergence(target_probs, logits):
    """KL(p || softmax(logits)) per example, the TRADES objective (Zhang et al. 2019, eq. 5):

        sum_k p_k * (log p_k - log softmax(z)_k)

    with ``target_probs`` = p (the clean prediction, rows summing to 1) and 0 * log 0 = 0, as
    PyTorch's ``KLDivLoss(log_softmax(z), p)`` in the official code. Gradients flow into both
    arguments (the official outer loss does not detach p).
    """
    target_probs = tf.cast(target_probs, tf.float32)
    log_q = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    return tf.reduce_sum(tf.math.xlogy(target_probs, target_probs) - target_probs * log_q,
                         axis=-1)


def _sorted_logits(logits):
    return tf.sort(tf.cast(logits, tf.float32), axis=-1, direction="DESCENDING")


def dlr(labels, logits):
    """Difference of logits ratio (Croce & Hein 2020, eq. 6), untargeted, one value per example:

        DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)

    where z_pi1 >= z_pi2 >= ... are the sorted logits. Invariant to shifting and rescaling the
    logits, so a model cannot look robust by saturating its softmax. Needs >= 3 classes.
    """
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    ranked = _sorted_logits(logits)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - onehot * 1e9, axis=-1)
    return -(true_logit - other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def dlr_targeted(labels, logits, target_labels):
    """Targeted DLR (Croce & Hein 2020, eq. 7):

        -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)

    with ``target_labels`` = t. Needs >= 4 classes.
    """
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    ranked = _sorted_logits(logits)
    true_logit = tf.gather(logits, labels, axis=1, batch_dims=1)
    target_logit = tf.gather(logits, tf.cast(target_labels, tf.int32), axis=1, batch_dims=1)
    scale = ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12
    return -(true_logit - target_logit) / scale


LOSSES = {"cross_entropy": cross_entropy, "cw_margin": cw_margin, "dlr": dlr,
          "kl_divergence": kl_divergence}


def get_loss(loss_fn):
    """Returns ``loss_fn`` itself if callable, else the named built-in objective."""
    if callable(loss_fn):
        return loss_fn
    if loss_fn not in LOSSES:
        raise ValueError(
            f"loss_fn must be a callable or one of {sorted(LOSSES)}; got {loss_fn!r}."
        )
    return LOSSES[loss_fn]
