"""Projected gradient descent (Madry et al. 2018), the one attack loop of tfadv.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018. The attack approximately solves the inner maximisation

    max_{delta in S} L(f_theta(x + delta), y),   S = {delta : ||delta||_p <= eps, x + delta in [0, 1]}

by iterating (paper, eq. 2, L-inf case)

    x^{t+1} = Pi_{x+S}( x^t + alpha * sign(grad_x L(theta, x^t, y)) )

with ``eps`` = epsilon, ``step_size`` = alpha, ``steps`` = number of iterations t, ``loss_fn`` = L
and ``norm`` = p. For p = 2 the step is ``alpha * g / ||g||_2`` (steepest ascent under L2). The
linear step (`optimize_linear`) and the projection onto the norm ball (`clip_eta`) are cleverhans'
TF2 building blocks; the loop is a `tf.function` of ours, traced once per model and input
signature (cleverhans' own loop retraces whenever it is handed a new model function).

FGSM (Goodfellow et al. 2015) is the one-step case: ``steps=1, step_size=eps, random_start=None``.
"""

import gin
import numpy as np
import tensorflow as tf
from cleverhans.tf2.utils import clip_eta, optimize_linear

from tfadv.attacks.base import Attack, check_number
from tfadv.attacks.losses import get_loss

_NORMS = {"linf": np.inf, "inf": np.inf, "l2": 2, 2: 2, np.inf: np.inf}
_RANDOM_STARTS = (None, "none", "uniform", "normal")
_SELECTS = ("last", "max_loss", "misclassified")


def parse_norm(norm):
    """Maps ``'linf'``/``np.inf`` and ``'l2'``/``2`` to the numpy order cleverhans expects."""
    key = norm.lower() if isinstance(norm, str) else norm
    try:
        return _NORMS[key]
    except (KeyError, TypeError):
        raise ValueError(f"norm must be 'linf' or 'l2' (or np.inf, 2); got {norm!r}.") from None


def norm_name(norm):
    """``'linf'`` or ``'l2'``: the name of a norm given in any form `parse_norm` accepts."""
    return "linf" if parse_norm(norm) == np.inf else "l2"


def project(x_adv, x, eps, norm, clip_min=0.0, clip_max=1.0):
    """Projects ``x_adv`` onto ``{x' : ||x' - x||_norm <= eps} ∩ [clip_min, clip_max]^d``.

    The one projection of tfadv: every attack and defense that constrains a perturbation calls it.
    The norm-ball step is exact for L-inf; for L2 the ball projection is followed by the box clip,
    which can only shrink the perturbation, so the result stays inside both sets.
    """
    x_adv = tf.convert_to_tensor(x_adv)
    x = tf.cast(tf.convert_to_tensor(x), x_adv.dtype)
    eta = clip_eta(x_adv - x, parse_norm(norm), eps)
    return tf.clip_by_value(x + eta, clip_min, clip_max)


def random_in_ball(shape, norm, eps, seed):
    """A uniform sample from the ``norm`` ball of radius ``eps`` (per example), stateless.

    L-inf: U(-eps, eps) per pixel. L2: a uniform direction scaled by ``eps * u^(1/d)``, u ~ U(0, 1),
    which is uniform in the ball (the construction cleverhans' ``random_lp_vector`` uses)."""
    if parse_norm(norm) == np.inf:
        return tf.random.stateless_uniform(shape, seed, -eps, eps)
    dim = tf.cast(tf.reduce_prod(shape[1:]), tf.float32)
    direction = tf.random.stateless_normal(shape, seed)
    axes = list(range(1, len(direction.shape)))
    direction /= tf.sqrt(tf.reduce_sum(tf.square(direction), axes, keepdims=True) + 1e-20)
    radius = tf.random.stateless_uniform(tf.stack([shape[0]]), seed + 1) ** (1.0 / dim)
    return eps * direction * tf.reshape(radius, [-1] + [1] * len(axes))


@gin.configurable
class PGD(Attack):
    """L-inf / L2 projected gradient descent with random start, restarts and a pluggable objective.

    Args:
      eps: radius epsilon of the threat model, in [0, 1] pixel units (``eps >= 0``).
      step_size: alpha, the size of one ascent step (``> 0``).
      steps: number of ascent steps (integer ``>= 1``).
      norm: ``'linf'`` or ``'l2'``.
      random_start: ``'uniform'`` draws the start uniformly from the eps-ball and clips it to the
        image box (Madry et al.); ``'normal'`` adds ``init_scale * N(0, I)`` without clipping
        (TRADES' official code, 0.001); ``None`` starts at ``x``.
      init_scale: standard deviation of the ``'normal'`` start.
      loss_fn: objective L ascended by the attack, ``loss_fn(labels, logits) -> (batch,)``, or a
        name from `tfadv.attacks.losses.LOSSES` (``'cross_entropy'``, ``'cw_margin'``, ``'dlr'``).
      training: the ``training`` flag the model is called with during the attack, i.e. the
        BatchNorm mode. ``False`` (eval mode, running statistics) by default; the Madry CIFAR and
        Rice et al. code attack in train mode, which also updates the moving statistics.
      restarts: independent runs from new random starts (integer >= 1).
      select: which iterate is returned per example. ``'last'``: the final iterate (training;
        needs ``restarts=1``). ``'max_loss'``: the final iterate of the restart with the highest
        loss (Rice et al.'s ``attack_pgd``). ``'misclassified'``: any iterate of any restart that
        the model misclassifies, else the highest-loss iterate, so an example counts as robust
        only if it survives every restart and every iterate (RST's ``PGD_Ours`` evaluation).
      clip_min, clip_max: the valid image box.
      seed: seed of the random start. ``None`` (training default) draws fresh noise on every
        call from TensorFlow's global seed; an integer makes every call deterministic (use it
        for evaluation).

    Call ``attack(model, x, labels)`` with images ``x`` in ``[clip_min, clip_max]`` and the true
    labels (never the model's predictions: that would leak labels).
    """

    # Run the steps as a Python loop (one graph copy per step) instead of a tf.while_loop. One
    # step never needs a loop. Subclasses whose loss itself runs a tf.while_loop set it: see
    # `tfadv.defenses.FeatureScatterAttack`.
    unroll = False

    def __init__(self, eps=0.3, step_size=0.01, steps=40, norm="linf", random_start="uniform",
                 init_scale=0.001, loss_fn="cross_entropy", training=False, restarts=1,
                 select="last", clip_min=0.0, clip_max=1.0, seed=None):
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        check_number("eps", eps, 0.0, strict=False)
        check_number("step_size", step_size, 0.0, strict=True)
        check_number("steps", steps, 1, strict=False, integer=True)
        check_number("init_scale", init_scale, 0.0, strict=False)
        check_number("restarts", restarts, 1, strict=False, integer=True)
        if random_start not in _RANDOM_STARTS:
            raise ValueError(
                f"random_start must be one of {_RANDOM_STARTS}; got {random_start!r}.")
        if select not in _SELECTS:
            raise ValueError(f"select must be one of {_SELECTS}; got {select!r}.")
        if select == "last" and restarts > 1:
            raise ValueError("select='last' keeps one run: with restarts > 1 use "
                             "select='max_loss' or 'misclassified'.")
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.norm = parse_norm(norm)
        self.random_start = None if random_start == "none" else random_start
        self.init_scale = float(init_scale)
        self.loss_fn = get_loss(loss_fn)
        self.training = bool(training)
        self.restarts = int(restarts)
        self.select = select

    def __repr__(self):
        extra = f", restarts={self.restarts}" if self.restarts > 1 else ""
        return (f"PGD(eps={self.eps:g}, step_size={self.step_size:g}, steps={self.steps}, "
                f"norm={norm_name(self.norm)}, random_start={self.random_start}{extra})")

    def initial_point(self, x, restart=0):
        """The starting point of the ascent for clean images ``x`` (float32)."""
        if self.random_start == "uniform":
            delta = random_in_ball(tf.shape(x), self.norm, self.eps, self.seed_tensor(restart))
            return tf.clip_by_value(x + delta, self.clip_min, self.clip_max)
        if self.random_start == "normal":
            noise = tf.random.stateless_normal(tf.shape(x), self.seed_tensor(restart))
            return x + self.init_scale * noise
        return x

    def _loss_and_grad(self, model, x_adv, labels):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = model(x_adv, training=self.training)
            losses = tf.cast(self.loss_fn(labels, logits), tf.float32)
            total = tf.reduce_sum(losses)
        # A model without a gradient path to its input (masked gradients) gets a zero step, not
        # a crash: the evaluation's sanity checks are there to flag it.
        grad = tape.gradient(total, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return logits, losses, grad

    def ascend(self, model, x, labels, start):
        """The last iterate of ``steps`` ascent steps from ``start`` (no restart, no selection):
        the loop every PGD-based attack runs."""
        return self._loop(model, x, labels, start, (), None)[0]

    def _loop(self, model, x, labels, start, state, update):
        """``steps`` steps from ``start``; ``update(state, x_t, logits_t, losses_t)`` (if given)
        folds every iterate into ``state``. Returns (last iterate, state)."""
        def step(i, x_adv, *state):
            logits, losses, grad = self._loss_and_grad(model, x_adv, labels)
            if update is not None:
                state = update(state, x_adv, logits, losses)
            x_adv = x_adv + optimize_linear(grad, self.step_size, self.norm)
            x_adv = project(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)
            return (i + 1, x_adv, *state)

        if self.steps == 1 or self.unroll:
            carry = (tf.constant(0), start, *state)
            for _ in range(self.steps):
                carry = step(*carry)
            _, x_adv, *state = carry
            return x_adv, tuple(state)
        # An explicit while loop (not autograph): Keras traces train_step without converting
        # this module, and a Python loop would unroll `steps` model copies.
        _, x_adv, *state = tf.while_loop(lambda i, *_: i < self.steps, step,
                                         (tf.constant(0), start, *state))
        return x_adv, tuple(state)

    def _attack(self, model, x, labels):
        if self.training and tf.distribute.get_strategy().num_replicas_in_sync > 1 and any(
                getattr(layer, "synchronized", False) for layer in model._flatten_layers()):
            raise ValueError(
                "PGD(training=True) cannot run a model with synchronized BatchNorm on more than "
                "one replica: its cross-replica all-reduce cannot sit inside the attack's while "
                "loop. Use training=False (eval-mode BatchNorm) or per-replica BatchNorm.")
        labels_int = tf.cast(labels, tf.int32) if labels.dtype.is_integer else None
        track_every = self.select == "misclassified"
        batch = tf.shape(x)[0]
        # Best-so-far state per example: (point, fooled, loss).
        best = (x, tf.zeros([batch], tf.bool), tf.fill([batch], -np.inf))

        def update(best, point, logits, losses):
            best_x, best_fooled, best_loss = best
            fooled = tf.zeros([batch], tf.bool)
            if labels_int is not None and self.select == "misclassified":
                fooled = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels_int)
            better = (fooled & ~best_fooled) | (~best_fooled & ~fooled & (losses > best_loss))
            mask = tf.reshape(better, [-1] + [1] * (len(x.shape) - 1))
            return (tf.where(mask, point, best_x), best_fooled | fooled,
                    tf.where(better, losses, best_loss))

        for restart in range(self.restarts):
            x_adv, state = self._loop(model, x, labels, self.initial_point(x, restart),
                                      best, update if track_every else None)
            if self.select == "last":
                return x_adv
            logits = model(x_adv, training=self.training)
            best = update(state, x_adv, logits,
                          tf.cast(self.loss_fn(labels, logits), tf.float32))
        return best[0]


@gin.configurable
def FGSM(eps=0.3, norm="linf", loss_fn="cross_entropy", training=False, clip_min=0.0,
         clip_max=1.0):
    """Fast gradient sign method (Goodfellow et al. 2015): one PGD step of size eps from x.

    For ``norm='l2'`` this is the fast gradient method, a step of L2 length eps along the
    gradient."""
    check_number("eps", eps, 0.0, strict=False)
    return PGD(eps=eps, step_size=max(eps, 1e-12), steps=1, norm=norm, random_start=None,
               loss_fn=loss_fn, training=training, clip_min=clip_min, clip_max=clip_max)
