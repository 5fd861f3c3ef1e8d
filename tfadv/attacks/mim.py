"""Momentum iterative method (Dong et al. 2018), a thin wrapper of cleverhans' TF2 attack.

Dong, Liao, Pang, Su, Zhu, Hu, Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018.
Each step accumulates the L1-normalised gradient of the cross-entropy into a velocity and moves
along its sign (paper, Algorithm 1, L-inf case):

    g_{t+1} = mu * g_t + grad_x J(x_t, y) / ||grad_x J(x_t, y)||_1
    x_{t+1} = clip_{x, eps}( x_t + alpha * sign(g_{t+1}) )

with ``decay_factor`` = mu, ``step_size`` = alpha, ``eps`` = epsilon, ``steps`` = T and ``clip``
the projection onto the eps-ball intersected with the image box. For ``norm='l2'`` the step is
``alpha * g / ||g||_2`` instead of the sign. The paper fixes ``alpha = eps / T``; here it is free.

The iteration is cleverhans' `momentum_iterative_method`, called inside our compiled `_attack`.
Its loop over ``nb_iter`` is a Python loop, so the traced graph holds ``steps`` copies of the
model: fine for MIM's few steps (the paper uses 10). Cleverhans normalises by the mean absolute
gradient rather than the L1 sum; the two differ by the constant factor d (the input size), which
rescales every term of g equally and so changes neither sign(g) nor g / ||g||_2.
"""

import gin
import tensorflow as tf
from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method

from tfadv.attacks.base import Attack, check_number
from tfadv.attacks.pgd import norm_name, parse_norm, project


@gin.configurable
class MIM(Attack):
    """Untargeted L-inf / L2 momentum iterative method (MI-FGSM) against the true labels.

    Args:
      eps: radius epsilon of the threat model, in [clip_min, clip_max] pixel units (``>= 0``).
      step_size: alpha, the size of one step (``> 0``).
      steps: number of iterations T (integer ``>= 1``).
      decay_factor: mu, the momentum decay (``>= 0``; 0 is iterative FGSM).
      norm: ``'linf'`` or ``'l2'``.
      clip_min, clip_max: the valid image box.
      seed: unused (the attack is deterministic); kept for a uniform attack signature.
    """

    def __init__(self, eps, step_size, steps=10, decay_factor=1.0, norm="linf", clip_min=0.0,
                 clip_max=1.0, seed=0):
        check_number("eps", eps, 0.0, strict=False)
        check_number("step_size", step_size, 0.0, strict=True)
        check_number("steps", steps, 1, strict=False, integer=True)
        check_number("decay_factor", decay_factor, 0.0, strict=False)
        self.norm = parse_norm(norm)
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.decay_factor = float(decay_factor)

    def __repr__(self):
        norm = norm_name(self.norm)
        return (f"MIM(eps={self.eps:g}, step_size={self.step_size:g}, steps={self.steps}, "
                f"decay_factor={self.decay_factor:g}, norm={norm})")

    def _attack(self, model, x, labels):
        x_adv = momentum_iterative_method(
            model_fn=lambda t: model(t, training=False),
            x=x,
            eps=self.eps,
            eps_iter=self.step_size,
            nb_iter=self.steps,
            norm=self.norm,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            y=tf.cast(labels, tf.int32),  # the true labels: y=None would attack predictions
            targeted=False,
            decay_factor=self.decay_factor,
            sanity_checks=False,
        )
        # Cleverhans already ends each step with the eps-ball clip and the box clip; this
        # (idempotent) projection states the threat-model contract in tfadv's own terms.
        return project(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)
