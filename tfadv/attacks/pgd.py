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

import numbers

import gin
import numpy as np
import tensorflow as tf
from cleverhans.tf2.utils import clip_eta, optimize_linear, random_lp_vector

from tfadv.attacks.losses import get_loss

_NORMS = {"linf": np.inf, "inf": np.inf, "l2": 2, 2: 2, np.inf: np.inf}
_RANDOM_STARTS = (None, "none", "uniform", "normal")


def parse_norm(norm):
    """Maps ``'linf'``/``np.inf`` and ``'l2'``/``2`` to the numpy order cleverhans expects."""
    key = norm.lower() if isinstance(norm, str) else norm
    try:
        return _NORMS[key]
    except (KeyError, TypeError):
        raise ValueError(f"norm must be 'linf' or 'l2' (or np.inf, 2); got {norm!r}.") from None


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


def _check_number(name, value, low, *, strict, integer=False):
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(
        value, bool
    )
    if not ok_type or (value <= low if strict else value < low):
        kind = "an integer" if integer else "a number"
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{name} must be {kind} {bound}; got {value!r}.")


@gin.configurable
class PGD:
    """L-inf / L2 projected gradient descent with random start and a pluggable objective.

    Args:
      eps: radius epsilon of the threat model, in [0, 1] pixel units (``eps >= 0``).
      step_size: alpha, the size of one ascent step (``> 0``).
      steps: number of ascent steps (integer ``>= 1``).
      norm: ``'linf'`` or ``'l2'``.
      random_start: ``'uniform'`` draws the start uniformly from the eps-ball and clips it to the
        image box (Madry et al.); ``'normal'`` adds ``init_scale * N(0, I)`` without clipping
        (TRADES' official code, 0.001); ``None`` starts at ``x``.
      init_scale: standard deviation of the ``'normal'`` start.
      loss_fn: objective L ascended by the attack, ``loss_fn(targets, logits) -> (batch,)``, or a
        name from `tfadv.attacks.losses.LOSSES`. Default: cross-entropy on the true labels.
      training: the ``training`` flag the model is called with during the attack, i.e. the
        BatchNorm mode. ``False`` (eval mode, running statistics) by default; the Madry CIFAR and
        Rice et al. code attack in train mode, which also updates the moving statistics.
      clip_min, clip_max: the valid image box.
      seed: op-level seed of the random start (combined with the global seed, as usual in TF).

    Call ``attack(model, x, targets)`` with images ``x`` in ``[clip_min, clip_max]`` and the true
    labels (never the model's predictions: that would leak labels). Returns the adversarial images
    as float32, with no gradient flowing back to ``x`` or the model.
    """

    def __init__(self, eps=0.3, step_size=0.01, steps=40, norm="linf", random_start="uniform",
                 init_scale=0.001, loss_fn="cross_entropy", training=False, clip_min=0.0,
                 clip_max=1.0, seed=None):
        _check_number("eps", eps, 0.0, strict=False)
        _check_number("step_size", step_size, 0.0, strict=True)
        _check_number("steps", steps, 1, strict=False, integer=True)
        _check_number("init_scale", init_scale, 0.0, strict=False)
        if random_start not in _RANDOM_STARTS:
            raise ValueError(
                f"random_start must be one of {_RANDOM_STARTS}; got {random_start!r}."
            )
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be < clip_max; got {clip_min} and {clip_max}.")
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.norm = parse_norm(norm)
        self.random_start = None if random_start == "none" else random_start
        self.init_scale = float(init_scale)
        self.loss_fn = get_loss(loss_fn)
        self.training = bool(training)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.seed = seed
        self.trace_count = 0  # Python executions of the loop body: one per trace.
        self._functions = {}

    def __repr__(self):
        norm = "linf" if self.norm == np.inf else "l2"
        return (f"PGD(eps={self.eps:g}, step_size={self.step_size:g}, steps={self.steps}, "
                f"norm={norm}, random_start={self.random_start})")

    def __call__(self, model, x, targets):
        x = tf.convert_to_tensor(x)
        targets = tf.convert_to_tensor(targets)
        if tf.inside_function():
            # Already being traced (a train_step, a strategy replica function): inline the loop
            # so it runs on the replica's own device with the replica's own variables.
            return self._attack(model, x, targets)
        key = (id(model), tuple(x.shape[1:]), x.dtype, targets.dtype, tuple(targets.shape[1:]))
        fn = self._functions.get(key)
        if fn is None:
            fn = tf.function(
                lambda x_, t_: self._attack(model, x_, t_),
                input_signature=[
                    tf.TensorSpec([None, *x.shape[1:]], x.dtype),
                    tf.TensorSpec([None, *targets.shape[1:]], targets.dtype),
                ],
            )
            self._functions[key] = fn
        return fn(x, targets)

    def initial_point(self, x):
        """The starting point of the ascent for clean images ``x`` (float32)."""
        if self.random_start == "uniform":
            delta = random_lp_vector(tf.shape(x), self.norm, self.eps, dtype=x.dtype,
                                     seed=self.seed)
            return tf.clip_by_value(x + delta, self.clip_min, self.clip_max)
        if self.random_start == "normal":
            return x + self.init_scale * tf.random.normal(tf.shape(x), dtype=x.dtype,
                                                          seed=self.seed)
        return x

    def _attack(self, model, x, targets):
        self.trace_count += 1
        if self.training and tf.distribute.get_strategy().num_replicas_in_sync > 1 and any(
                getattr(layer, "synchronized", False) for layer in model._flatten_layers()):
            raise ValueError(
                "PGD(training=True) cannot run a model with synchronized BatchNorm on more than "
                "one replica: its cross-replica all-reduce cannot sit inside the attack's while "
                "loop. Use training=False (eval-mode BatchNorm) or per-replica BatchNorm.")
        x = tf.cast(x, tf.float32)

        def step(i, x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                logits = model(x_adv, training=self.training)
                loss = tf.reduce_sum(self.loss_fn(targets, logits))
            grad = tape.gradient(loss, x_adv)
            x_adv = x_adv + optimize_linear(grad, self.step_size, self.norm)
            return i + 1, project(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)

        # An explicit while loop (not autograph): Keras traces train_step without converting
        # this module, and a Python loop would unroll `steps` copies of the model.
        _, x_adv = tf.while_loop(lambda i, _: i < self.steps, step,
                                 (tf.constant(0), self.initial_point(x)))
        return tf.stop_gradient(x_adv)


@gin.configurable
def FGSM(eps=0.3, norm="linf", loss_fn="cross_entropy", training=False, clip_min=0.0,
         clip_max=1.0):
    """Fast gradient sign method (Goodfellow et al. 2015): one PGD step of size eps from x."""
    return PGD(eps=eps, step_size=max(eps, 1e-12), steps=1, norm=norm, random_start=None,
               loss_fn=loss_fn, training=training, clip_min=clip_min, clip_max=clip_max)
