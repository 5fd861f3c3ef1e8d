"""ALP: adversarial logit pairing (Kannan et al. 2018).

Kannan, Kurakin, Goodfellow, "Adversarial Logit Pairing", arXiv:1803.06373, 2018. The objective
(paper, Sec. 3.2) is the mixed clean/adversarial cross-entropy plus a penalty pairing the logits
of each clean example with those of its adversarial counterpart,

    L = (1/B) sum_i [ 0.5 * CE(f(x_i), y_i) + 0.5 * CE(f(x'_i), y_i)
                      + beta * (1/K) ||f(x_i) - f(x'_i)||_2^2 ]

with f = ``base_model`` (K logits), x' = ``attack``(x, y), beta = ``beta`` (the paper's lambda).

The paper released no training code. tfadv follows the ALP baseline in the Hypersphere Embedding
code (ShawnXYang/AT_HE, ``losses.py:alp_loss``), the implementation the HE and AWP papers compare
with: PyTorch ``mse_loss`` (mean over batch and classes, hence the 1/K), beta = 1, cross-entropy
PGD from x + 0.001 * N(0, I) in eval mode, outer loss in train mode.
"""

import gin
import tensorflow as tf

from tfadv.attacks import cross_entropy
from tfadv.defenses.paired import PairedLossDefense


def alp_loss(y, clean_logits, adv_logits, beta, ce=cross_entropy):
    """Per-example ALP loss (Kannan et al. 2018, Sec. 3.2, as HE's ``alp_loss``), in float32:

        0.5 * CE(f(x), y) + 0.5 * CE(f(x'), y) + beta * (1/K) ||f(x) - f(x')||_2^2

    with f(x) = ``clean_logits`` and f(x') = ``adv_logits`` (batch, K), y = ``y``, beta =
    ``beta``; ``ce`` is the cross-entropy (e.g. with the HE margin, as ALP+HE in the official
    HE code). Returns (batch,)."""
    clean_logits = tf.cast(clean_logits, tf.float32)
    adv_logits = tf.cast(adv_logits, tf.float32)
    pairing = tf.reduce_mean(tf.square(clean_logits - adv_logits), axis=-1)
    return 0.5 * ce(y, clean_logits) + 0.5 * ce(y, adv_logits) + beta * pairing


@gin.configurable(denylist=["base_model"])
class ALP(PairedLossDefense):
    """Adversarial logit pairing (Kannan et al. 2018) around any Keras classifier. It minimises
    (`alp_loss`)

        E[ 0.5 * CE(f(x), y) + 0.5 * CE(f(x'), y) + beta * (1/K) ||f(x) - f(x')||_2^2 ]

    with f = ``base_model`` (K logits), x' = ``attack``(x, y), beta = ``beta``.

    Args:
      base_model: classifier from images in [0, 1] to logits.
      beta: weight of the logit-pairing term, >= 0 (lambda; HE's ALP baseline uses 1).
      attack: the inner maximisation (default: cross-entropy PGD, eps 0.3, step 0.01, 40 steps,
        0.001 Gaussian start, eval mode).
      eval_attack: attack behind ``robust_accuracy`` (default: ``attack``).
      awp: optional `tfadv.defenses.AWP`.
      margin: Hypersphere Embedding margin (ALP+HE, Pang et al. 2020; see `Defense`).
    """

    def __init__(self, base_model, beta=1.0, attack=None, eval_attack=None, awp=None, **kwargs):
        super().__init__(base_model, beta, attack=attack, eval_attack=eval_attack, awp=awp,
                         **kwargs)

    def paired_loss(self, y, clean_logits, adv_logits):
        return alp_loss(y, clean_logits, adv_logits, self.beta, self.classification_loss)
