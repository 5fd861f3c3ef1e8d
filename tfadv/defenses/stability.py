"""Stability training: RST_stab of robust self-training (Carmon et al. 2019).

Carmon, Raghunathan, Schmidt, Liang, Duchi, "Unlabeled Data Improves Adversarial Robustness",
NeurIPS 2019, Sec. 4.2 (official code: yaircarmon/semisup-adv, run with ``--distance l_2
--epsilon 0.25``), after Zheng et al. 2016. The TRADES loss with the adversary replaced by
Gaussian noise,

    loss = (1/B) sum_i CE(f(x_i), y_i) + beta * KL(p(x_i) || p(x_i + delta_i)),
    delta_i ~ N(0, sigma^2 I),

with f = ``base_model``, p = softmax(f), ``sigma`` = the noise level and ``beta`` = the KL weight
(RST_stab: sigma 0.25, beta 6). It trains a base classifier for randomized smoothing (Cohen et
al. 2019), which certifies L2 robustness of the smoothed classifier. The noise is added in [0, 1]
pixel space before the model's normalisation and not clipped, as the smoothing code does.
"""

import gin

from tfadv.defenses.gaussian import add_training_noise, check_noise_seed, check_sigma
from tfadv.defenses.paired import PairedLossDefense
from tfadv.defenses.trades import trades_loss


@gin.configurable(denylist=["base_model"])
class StabilityTraining(PairedLossDefense):
    """Stability training (RST_stab) around any Keras classifier. It minimises

        E[ CE(f(x), y) + beta * KL(p(x) || p(x + delta)) ],   delta ~ N(0, sigma^2 I)

    with f = ``base_model``, p = softmax(f), beta = ``beta``, sigma = ``sigma`` ([0, 1] pixel
    units; the noise is not clipped).

    Args:
      base_model: classifier from images in [0, 1] to logits.
      sigma: standard deviation of the Gaussian noise, > 0 (RST_stab: 0.25).
      beta: weight of the KL stability term, >= 0 (RST: 6).
      eval_attack: attack behind ``robust_accuracy`` in validation (default: none).
      seed: seed of the training noise (`tfadv.defenses.gaussian.add_training_noise`); ``None``
        draws one from NumPy's global generator.
    """

    def __init__(self, base_model, sigma=0.25, beta=6.0, eval_attack=None, seed=None, **kwargs):
        sigma = check_sigma(sigma)
        seed = check_noise_seed(seed)
        super().__init__(base_model, beta, attack=None, eval_attack=eval_attack, **kwargs)
        self.sigma = sigma
        self.seed = seed

    def default_attack(self):
        """None: stability training perturbs with Gaussian noise (`prepare`), not an attack."""
        return None

    def prepare(self, x, y):
        """x + delta, delta ~ N(0, sigma^2 I), drawn for this training step and replica
        (`tfadv.defenses.gaussian.add_training_noise`; [0, 1] pixel space, not clipped)."""
        return add_training_noise(x, self.sigma, self.seed, self.optimizer)

    def paired_loss(self, y, clean_logits, noisy_logits):
        return trades_loss(y, clean_logits, noisy_logits, self.beta)
