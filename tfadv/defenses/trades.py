"""TRADES: the trade-off between accuracy and robustness (Zhang et al. 2019).

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness
and Accuracy", ICML 2019 (official code: yaodongyu/TRADES, ``trades.py``). The training objective
(paper, eq. 5) is

    min_f E { L(f(X), Y) + max_{X' in B(X, eps)} L(f(X), f(X')) / lambda }

implemented, as in the official code, as

    loss = (1/B) sum_i CE(f(x_i), y_i) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i))

with f = ``base_model`` (logits), p = softmax(f), B the global batch, beta = 1/lambda = ``beta``
and x' the ``attack``'s approximate maximiser of the KL (not of the cross-entropy).

What the official code does, and tfadv with it:
- the attack ascends the summed KL from x + 0.001 * N(0, I) (not a uniform start, and not
  clipped before the first step), in eval mode (BatchNorm running statistics); each step is a
  sign step, a projection on the eps-ball and a clip to [0, 1] (`tfadv.attacks.PGD` with
  ``random_start='normal'``, ``init_scale=0.001``, ``loss_fn='kl_divergence'``, ``training=False``);
- the outer loss runs in train mode and does not detach the clean softmax p(x);
- the KL is summed over classes and divided by the batch size ('batchmean').

Difference: the official code runs the clean forward pass twice (once for the cross-entropy, once
for the KL target); tfadv uses one pass for both. The two agree except for dropout masks and one
extra BatchNorm running-statistics update.
"""

import gin
import tensorflow as tf

from tfadv.attacks import PGD, cross_entropy, kl_divergence
from tfadv.defenses.paired import PairedLossDefense, label_attack_like


def trades_loss(y, clean_logits, adv_logits, beta, ce=cross_entropy):
    """Per-example TRADES loss CE(f(x), y) + beta * KL(p(x) || p(x')), in float32 (``ce``: the
    cross-entropy, e.g. with the HE margin; the KL is always on the plain softmax)."""
    clean_logits = tf.cast(clean_logits, tf.float32)
    return ce(y, clean_logits) + beta * kl_divergence(tf.nn.softmax(clean_logits), adv_logits)


@gin.configurable(denylist=["base_model"])
class TRADES(PairedLossDefense):
    """TRADES (Zhang et al. 2019) around any Keras classifier. It minimises (module docstring)

        E[ CE(f(x), y) + beta * max_{x' in B(x, eps)} KL(p(x) || p(x')) ]

    with f = ``base_model``, p = softmax(f), beta = ``beta`` and the inner max approximated by
    ``attack`` (B(x, eps): its eps-ball within the image box, [0, 1] pixel units).

    Example::

        model = tfadv.defenses.TRADES(base, beta=6.0, attack=tfadv.attacks.PGD(
            eps=0.3, step_size=0.01, steps=40, random_start="normal",
            loss_fn="kl_divergence"))
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))

    Args:
      base_model: classifier from images in [0, 1] to logits.
      beta: weight of the robustness (KL) term, 1/lambda in the paper; >= 0. The paper's headline
        rows use 6 (the MNIST script's default is 1). ``beta=0`` is clean training (the attack is
        then skipped).
      attack: the inner maximisation; its ``loss_fn`` must be ``'kl_divergence'`` (it is given
        the clean probabilities as targets). Default: the official MNIST setting, eps 0.3, step
        0.01, 40 steps, 0.001 Gaussian start, eval mode.
      eval_attack: attack behind ``robust_accuracy`` (default: a cross-entropy PGD with the
        training attack's budget and a uniform start).
      awp: optional `tfadv.defenses.AWP` (TRADES-AWP, Wu et al. 2020).
      margin: Hypersphere Embedding margin (TRADES+HE, Pang et al. 2020; see `Defense`).
    """

    def __init__(self, base_model, beta=6.0, attack=None, eval_attack=None, awp=None, **kwargs):
        if attack is not None and getattr(attack, "loss_fn", None) is not kl_divergence:
            raise ValueError(
                "TRADES maximises KL(p(x) || p(x')) in its inner loop: build its attack with "
                f"loss_fn='kl_divergence'; got loss_fn={getattr(attack, 'loss_fn', None)!r}.")
        if eval_attack is not None and getattr(eval_attack, "loss_fn", None) is kl_divergence:
            raise ValueError("eval_attack receives integer labels: use a label loss such as "
                             "'cross_entropy', not 'kl_divergence'.")
        super().__init__(base_model, beta, attack=attack, eval_attack=eval_attack, awp=awp,
                         **kwargs)
        if eval_attack is None:
            self.eval_attack = label_attack_like(self.attack)

    def default_attack(self):
        """The official MNIST TRADES attack, used when ``attack=None``: L-inf PGD ascending
        KL(p(x) || p(x')), eps 0.3, step 0.01, 40 steps ([0, 1] pixel units), from
        x + 0.001 * N(0, I), eval mode."""
        return PGD(eps=0.3, step_size=0.01, steps=40, random_start="normal", init_scale=0.001,
                   loss_fn="kl_divergence")

    def prepare(self, x, y):
        """x', the attack's approximate maximiser of KL(p(x) || p(x')) over the eps-ball,
        given the clean probabilities p(x) (eval mode) as its targets; ``None`` when
        ``beta == 0`` (clean training, no attack)."""
        if self.beta == 0:
            return None  # clean training: no attack needed
        clean_probs = tf.nn.softmax(self.base_model(x, training=False))
        return self.attack(self.base_model, x, clean_probs)

    def paired_loss(self, y, clean_logits, adv_logits):
        return trades_loss(y, clean_logits, adv_logits, self.beta, self.classification_loss)
