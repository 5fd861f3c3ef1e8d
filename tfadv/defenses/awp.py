"""AWP: adversarial weight perturbation (Wu et al. 2020), composable with any defense.

Wu, Xia, Wang, "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020
(official code: csdongxian/AWP, ``utils_awp.py``). AWP trains against a worst case over inputs
and weights together (paper, eq. 7),

    min_w max_{v in V} rho(w + v),   rho = the defense's adversarial loss (PGD-AT, TRADES, ...)

with the layer-wise constraint ||v_l|| <= gamma * ||w_l||. One ascent step on v solves the inner
maximisation (paper, eq. 9; the official ``calc_awp``):

    v_l = gamma * ||w_l|| * d_l / ||d_l||,    d_l = grad_{w_l} rho(w)

over the >= 2-D weights (convolution and dense kernels; biases and BatchNorm parameters get no
perturbation), and the update is w <- w - lr * grad_w rho(w + v) (paper, eq. 10). Symbols:
gamma = ``gamma``, rho = the wrapped defense's `objective` on the adversarial examples already
generated for this batch, l = one kernel variable of the base model.

How tfadv maps the official code:
- The official code copies the model into a proxy, takes one SGD step on -rho in train mode, and
  normalises the weight difference. The proxy's learning rate cancels, so tfadv takes the
  gradient d directly, with the model run by `keras.Model.stateless_call` (train mode): the
  model's BatchNorm statistics are not touched by this pass. The proxy loss has no weight decay,
  as the official proxy optimizer has none.
- The official code adds v to the weights, computes the loss, steps and subtracts v. tfadv
  evaluates the loss at w + v functionally and applies its gradient to w: the same update,
  with no perturbation ever written to (or left in) the variables. The training-mode pass at
  w + v updates BatchNorm statistics, as the official code's does; weight decay is evaluated at
  w + v, as PyTorch's SGD does at the perturbed weights.
- Under a distribution strategy d is all-reduced (summed) before normalisation, so every replica
  applies the same v, computed from the global batch.
- Warm-up: no perturbation before epoch ``warmup_epochs`` (TRADES-AWP: 10; AT-AWP: 0).

Paper settings: gamma = 0.01 for AT-AWP, 5e-3 for TRADES-AWP (and RST-AWP).
"""

import gin
import tensorflow as tf

from tfadv.defenses.base import ModelState, num_replicas

_EPS = 1e-20  # the official code's guard in ||w|| / (||d|| + 1e-20)


@gin.configurable
class AWP:
    """Adversarial weight perturbation settings; pass as ``awp=`` to a defense (gin:
    ``TRADES.awp = @AWP()``). The defense then minimises (module docstring)

        min_w max_{||v_l|| <= gamma ||w_l||} rho(w + v),   v_l = gamma ||w_l|| d_l / ||d_l||,

    rho = the defense's adversarial loss, d_l = grad_{w_l} rho(w) for each kernel l, gamma =
    ``gamma``; no perturbation before epoch ``warmup_epochs``.

    Args:
      gamma: relative size of the weight perturbation per layer, >= 0 (paper: 0.01 for AT-AWP,
        5e-3 for TRADES-AWP).
      warmup_epochs: epochs of plain training before AWP starts (integer >= 0; TRADES-AWP: 10).
    """

    def __init__(self, gamma=0.01, warmup_epochs=0):
        if (not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0
                or gamma == float("inf")):
            raise ValueError(f"AWP.gamma must be a finite number >= 0; got {gamma!r}.")
        if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or (
                warmup_epochs < 0):
            raise ValueError(f"AWP.warmup_epochs must be an integer >= 0; got {warmup_epochs!r}.")
        self.gamma = float(gamma)
        self.warmup_epochs = warmup_epochs

    def __repr__(self):
        return f"AWP(gamma={self.gamma}, warmup_epochs={self.warmup_epochs})"

    @staticmethod
    def perturbed(variable):
        """Whether ``variable`` gets a perturbation: kernels (>= 2-D), as the official code's
        ``len(size) > 1 and 'weight' in name``."""
        return len(variable.shape) >= 2

    def perturbation(self, defense, x, y, sample_weight, batch):
        """The weight perturbation v for this batch: one tensor (or None) per trainable variable
        of ``defense.base_model``; see the module docstring."""
        variables = defense.base_model.trainable_variables
        with tf.GradientTape() as tape:
            state = ModelState(defense.base_model)  # its BatchNorm updates are discarded
            loss, _ = defense.objective(state, x, y, sample_weight, batch)
            loss = defense.optimizer.scale_loss(loss)  # fp16 range; the scale cancels below
        index = [i for i, v in enumerate(variables) if self.perturbed(v)]
        grads = tape.gradient(loss, [variables[i] for i in index],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = [tf.cast(g, tf.float32) for g in grads]
        if num_replicas() > 1:
            grads = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, grads)
        out = [None] * len(variables)
        for i, g in zip(index, grads):
            w = tf.cast(variables[i].value, tf.float32)
            scale = self.gamma * tf.norm(w) / (tf.norm(g) + _EPS)
            out[i] = tf.stop_gradient(scale * g)
        return out
