"""Madry et al. PGD adversarial training.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018. The saddle-point objective (paper, eq. 2.1)

    min_theta  rho(theta),   rho(theta) = E_{(x, y) ~ D} [ max_{delta in S} L(theta, x + delta, y) ]

is trained on 100% adversarial examples: each step replaces the batch by PGD examples
x' = PGD(x, y) (``attack``; the paper's inner maximisation) and takes an optimizer step on the mean
cross-entropy L(theta, x', y). Symbols: theta = ``base_model`` weights, S = the ``attack``'s
eps-ball, L = cross-entropy.

Official code (MadryLab mnist_challenge / cifar10_challenge): uniform random start, sign steps,
clip to the eps-ball then to the image range; MNIST eps 0.3, step 0.01, 40 steps, Adam 1e-4;
CIFAR-10 eps 8/255, step 2/255, 10 steps, SGD 0.1 momentum 0.9, weight decay 2e-4. The CIFAR code
runs the attack with BatchNorm in train mode; set ``attack.training=True`` to reproduce that (the
tfadv default is eval mode, which the issue asks to be explicit).
"""

import gin

from tfadv.attacks import PGD
from tfadv.defenses.base import Defense, replica_mean


@gin.configurable(denylist=["base_model"])
class PGDAdversarialTraining(Defense):
    """PGD adversarial training (Madry et al. 2018) around any Keras classifier. It minimises
    the saddle-point objective (paper, eq. 2.1)

        E[ max_{x' in B(x, eps)} CE(f_theta(x'), y) ]

    over the weights theta of f = ``base_model``, the inner max approximated by ``attack``'s PGD
    examples x' (B(x, eps): its eps-ball within the image box, [0, 1] pixel units).

    Example (runs as is)::

        import keras, numpy as np, tfadv.models, tfadv.attacks, tfadv.defenses
        base = tfadv.models.digits_cnn(input_shape=(8, 8, 1), num_classes=10)
        model = tfadv.defenses.PGDAdversarialTraining(
            base, attack=tfadv.attacks.PGD(eps=0.3, step_size=0.1, steps=7))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.rand(64, 8, 8, 1).astype("float32"); y = np.arange(64) % 10
        model.fit(x, y, batch_size=32, epochs=1)
        model.evaluate(x, y, return_dict=True)   # loss, accuracy, robust_accuracy
        model.save("robust.keras")               # saves the base classifier only

    Args:
      base_model: classifier from images in [0, 1] to logits.
      attack: the inner maximisation (default: L-inf PGD, eps 0.3, step 0.01, 40 steps, uniform
        random start: the paper's MNIST setting).
      eval_attack: attack behind ``robust_accuracy`` in `evaluate` (default: ``attack``).
      awp: optional `tfadv.defenses.AWP` (AT-AWP, Wu et al. 2020).
      margin: Hypersphere Embedding margin (PGD-AT+HE, Pang et al. 2020; see `Defense`).
    """

    def __init__(self, base_model, attack=None, eval_attack=None, awp=None, **kwargs):
        if attack is None:
            attack = PGD(eps=0.3, step_size=0.01, steps=40, random_start="uniform")
        super().__init__(base_model, attack=attack, eval_attack=eval_attack, awp=awp, **kwargs)

    def prepare(self, x, y):
        # Inner maximisation: outside the weights tape (the base class stops its gradient).
        return self.attack(self.base_model, x, y)

    def objective(self, state, x, y, sample_weight, x_adv):
        logits = state(x_adv, training=True)
        return replica_mean(self.classification_loss(y, logits), sample_weight), {"adv": logits}


@gin.configurable(denylist=["base_model"])
class StandardTraining(Defense):
    """Plain (non-adversarial) training on clean inputs: the baseline every defense is compared
    with. ``eval_attack`` still measures robust accuracy, so the baseline's lack of robustness
    is visible in the same logs."""

    supports_awp = False  # AWP perturbs the weights against an adversarial objective

    def __init__(self, base_model, eval_attack=None, **kwargs):
        super().__init__(base_model, attack=None, eval_attack=eval_attack, **kwargs)

    def objective(self, state, x, y, sample_weight, batch):
        logits = state(x, training=True)
        return replica_mean(self.classification_loss(y, logits), sample_weight), {
            "clean": logits}
