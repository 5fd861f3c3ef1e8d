"""Defenses whose loss pairs each clean example with its adversarial counterpart.

TRADES, MART and ALP all train on

    loss = (1/B) sum_i l(y_i, f(x_i), f(x'_i)),    x' = attack(x)

with both forward passes in train mode and gradients through both (the clean logits are not
detached). They differ only in the per-example loss l (`PairedLossDefense.paired_loss`) and in
what the attack ascends.
"""

import math

from tfadv.attacks import PGD
from tfadv.defenses.base import Defense, replica_mean


def check_weight(name, value):
    """Raises ValueError naming ``name`` unless ``value`` (a loss weight such as ``beta``) is a
    finite number >= 0."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")


def label_attack_like(attack):
    """A cross-entropy PGD with ``attack``'s radius, step and budget and a uniform start: the
    evaluation attack of defenses whose training attack is not a label attack (TRADES'
    ``pgd_attack_cifar10.py`` evaluates with uniform-start PGD on the cross-entropy)."""
    return PGD(eps=attack.eps, step_size=attack.step_size, steps=attack.steps, norm=attack.norm,
               random_start="uniform", clip_min=attack.clip_min, clip_max=attack.clip_max)


class PairedLossDefense(Defense):
    """Base class: ``beta`` weighs the pairing term of `paired_loss`; the default attack is the
    official codes' cross-entropy PGD from x + 0.001 * N(0, I) in eval mode, at the MNIST budget
    (eps 0.3, step 0.01, 40 steps)."""

    def __init__(self, base_model, beta, attack=None, eval_attack=None, awp=None, **kwargs):
        check_weight("beta", beta)
        if attack is None:
            attack = self.default_attack()
        super().__init__(base_model, attack=attack, eval_attack=eval_attack, awp=awp, **kwargs)
        self.beta = float(beta)

    def default_attack(self):
        """The attack used when ``attack=None``: L-inf PGD on the cross-entropy, eps 0.3,
        step 0.01, 40 steps ([0, 1] pixel units), from x + 0.001 * N(0, I), eval mode (the
        official codes' attack at the MNIST budget). Subclasses override it (TRADES: the KL)."""
        return PGD(eps=0.3, step_size=0.01, steps=40, random_start="normal", init_scale=0.001)

    def paired_loss(self, y, clean_logits, adv_logits):
        """Per-example loss from the labels and the clean and adversarial logits; its
        cross-entropy terms use `classification_loss` (so the HE margin applies)."""
        raise NotImplementedError

    def prepare(self, x, y):
        return self.attack(self.base_model, x, y)

    def objective(self, state, x, y, sample_weight, x_adv):
        clean_logits = state(x, training=True)
        if x_adv is None:  # nothing to pair with (TRADES with beta = 0): clean training
            return replica_mean(self.classification_loss(y, clean_logits), sample_weight), {
                "clean": clean_logits}
        adv_logits = state(x_adv, training=True)
        loss = replica_mean(self.paired_loss(y, clean_logits, adv_logits), sample_weight)
        return loss, {"clean": clean_logits, "adv": adv_logits}
