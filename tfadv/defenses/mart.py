"""MART: misclassification-aware adversarial training (Wang et al. 2020).

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples", ICLR 2020 (official code: YisenWang/MART, ``mart.py``). The objective (paper, eq. 10)

    L = (1/B) sum_i [ BCE(p(x'_i), y_i) + beta * KL(p(x_i) || p(x'_i)) * (1 - p_{y_i}(x_i)) ]

    BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x'))

with p = softmax(``base_model``), x' = ``attack``(x, y) (cross-entropy PGD), beta = ``beta``.
The (1 - p_y(x)) factor weights the KL up on examples the model misclassifies.

Following the official code exactly: the attack starts at x + 0.001 * N(0, I) and runs in eval
mode; the margin term is ``-log(1.0001 - p_k(x') + 1e-12)`` at the top non-true class; the KL
uses ``log(p(x') + 1e-12)`` and the weight ``1.0000001 - p_y(x)``; the clean probabilities are not
detached; defaults beta = 6, eps 0.031, step 0.007, 10 steps (``train_wideresnet.py``).
"""

import gin
import tensorflow as tf

from tfadv.attacks import cross_entropy
from tfadv.defenses.paired import PairedLossDefense


def mart_loss(y, clean_logits, adv_logits, beta):
    """Per-example MART loss (Wang et al. 2020, eq. 10; official ``mart.py``), in float32:

        BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)),
        BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x'))

    with p = softmax, x = the clean and x' the adversarial input, y = ``y`` (integer labels),
    beta = ``beta``, and the official code's guards (1.0001, 1e-12, 1.0000001; module
    docstring). ``clean_logits``, ``adv_logits``: (batch, classes) logits. Returns (batch,)."""
    y = tf.cast(y, tf.int32)
    clean_logits = tf.cast(clean_logits, tf.float32)
    adv_logits = tf.cast(adv_logits, tf.float32)
    adv_probs = tf.nn.softmax(adv_logits)
    onehot = tf.one_hot(y, tf.shape(adv_logits)[-1])
    # The most likely wrong class under attack (the official code's argsort trick).
    other = tf.argmax(adv_probs - 2.0 * onehot, axis=-1, output_type=tf.int32)
    other_prob = tf.gather(adv_probs, other, axis=1, batch_dims=1)
    bce = cross_entropy(y, adv_logits) - tf.math.log(1.0001 - other_prob + 1e-12)
    clean_probs = tf.nn.softmax(clean_logits)
    kl = tf.reduce_sum(tf.math.xlogy(clean_probs, clean_probs)
                       - clean_probs * tf.math.log(adv_probs + 1e-12), axis=-1)
    true_prob = tf.reduce_sum(clean_probs * onehot, axis=-1)
    return bce + beta * kl * (1.0000001 - true_prob)


@gin.configurable(denylist=["base_model"])
class MART(PairedLossDefense):
    """MART (Wang et al. 2020) around any Keras classifier. It minimises (`mart_loss`)

        E[ BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)) ],   x' = attack(x, y)

    with p = softmax(``base_model``), beta = ``beta``, x' the ``attack``'s cross-entropy PGD.

    Args:
      base_model: classifier from images in [0, 1] to logits.
      beta: weight of the misclassification-aware KL term, >= 0 (official default 6).
      attack: the inner maximisation (default: cross-entropy PGD, eps 0.3, step 0.01, 40 steps,
        0.001 Gaussian start, eval mode: the official attack at the MNIST radius).
      eval_attack: attack behind ``robust_accuracy`` (default: ``attack``).
      awp: optional `tfadv.defenses.AWP` (MART-AWP, Wu et al. 2020).
    """

    def __init__(self, base_model, beta=6.0, attack=None, eval_attack=None, awp=None, **kwargs):
        super().__init__(base_model, beta, attack=attack, eval_attack=eval_attack, awp=awp,
                         **kwargs)

    def paired_loss(self, y, clean_logits, adv_logits):
        return mart_loss(y, clean_logits, adv_logits, self.beta)
