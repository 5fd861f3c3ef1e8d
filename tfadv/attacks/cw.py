"""Carlini-Wagner L2 attack (Carlini & Wagner 2017), untargeted, written from the paper.

Carlini, Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017. For an
image x with true label y and logits Z(.), the attack solves, per example,

    minimize_w  ||x'(w) - x||_2^2 + c * f(x'(w)),
    x'(w) = clip_min + (tanh(w) + 1) / 2 * (clip_max - clip_min),
    f(x')  = max( Z(x')_y - max_{i != y} Z(x')_i , -kappa ),

(the paper's L2 attack, section VI-A, in its untargeted form), where

- ``kappa`` is ``confidence``: an example counts as adversarial only once some other logit beats
  the true one by more than kappa;
- ``c`` starts at ``initial_const`` and is tuned per example by a binary search over
  ``binary_search_steps`` rounds: multiplied by 10 while no adversarial example has been found
  for that example, bisected between the largest failing and smallest succeeding c afterwards;
- the change of variables w keeps x' inside the image box without clipping, and w is optimised
  by Adam (``learning_rate``, beta1 0.9, beta2 0.999, epsilon 1e-8, restarted from w(x) in
  every round) for at most ``max_iterations`` steps; with ``abort_early`` a round stops when the
  summed objective has not decreased by 0.01% over the last tenth of ``max_iterations``.

Over all rounds and iterations the attack keeps, per example, the successful x' of smallest L2
distance. As in the authors' code, early abort looks at the objective summed over the batch, and
atanh is taken of x shrunk by 0.999999 (finite at the box edges). Small differences: the
distance is measured to x itself (theirs to the tanh round trip of x, ~1e-6 away), the last
iterate of each round is scored too, and x' is clipped to the box to absorb float rounding.
The paper's f is computed as the hinge ``max(Z_y - max_{i != y} Z_i + kappa, 0)``, which
differs from f by the constant kappa and so has the same minimisers and gradients.
"""

import gin
import numpy as np
import tensorflow as tf

from tfadv.attacks.base import Attack, check_number
from tfadv.attacks.pgd import parse_norm, project

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
_TANH_SHRINK = 0.999999  # keeps atanh finite on pixels at the box edges
_NO_BOUND = 1e10  # "no upper bound on c found yet"


@gin.configurable
class CarliniWagnerL2(Attack):
    """Untargeted Carlini-Wagner L2 attack: the smallest-L2 adversarial example it can find.

    Args:
      eps: optional L2 radius of a threat model (``>= 0``). If given, an example whose smallest
        adversarial example found is farther than eps is returned unchanged (counted robust);
        if ``None``, the smallest adversarial example found is returned whatever its size.
      confidence: kappa (``>= 0``), the logit margin an adversarial example must have.
      learning_rate: Adam step size on w (``> 0``).
      binary_search_steps: rounds of the search on c (integer ``>= 1``). With 10 or more, the
        last round uses the smallest c that succeeded (as in the authors' code).
      max_iterations: Adam steps per round (integer ``>= 1``).
      initial_const: the first c (``> 0``).
      abort_early: stop a round once the objective stops decreasing.
      clip_min, clip_max: the valid image box.
      seed: unused (the attack is deterministic); kept for a uniform attack signature.

    Where no adversarial example is found (or none within eps), ``x`` itself is returned.
    """

    def __init__(self, eps=None, confidence=0.0, learning_rate=0.01, binary_search_steps=9,
                 max_iterations=1000, initial_const=0.01, abort_early=True, clip_min=0.0,
                 clip_max=1.0, seed=0):
        if eps is not None:
            check_number("eps", eps, 0.0, strict=False)
        check_number("confidence", confidence, 0.0, strict=False)
        check_number("learning_rate", learning_rate, 0.0, strict=True)
        check_number("binary_search_steps", binary_search_steps, 1, strict=False, integer=True)
        check_number("max_iterations", max_iterations, 1, strict=False, integer=True)
        check_number("initial_const", initial_const, 0.0, strict=True)
        if not isinstance(abort_early, (bool, np.bool_)):
            raise ValueError(f"abort_early must be True or False; got {abort_early!r}.")
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        self.eps = None if eps is None else float(eps)
        self.norm = parse_norm("l2")
        self.confidence = float(confidence)
        self.learning_rate = float(learning_rate)
        self.binary_search_steps = int(binary_search_steps)
        self.max_iterations = int(max_iterations)
        self.initial_const = float(initial_const)
        self.abort_early = bool(abort_early)

    def __repr__(self):
        eps = "None" if self.eps is None else f"{self.eps:g}"
        return (f"CarliniWagnerL2(eps={eps}, confidence={self.confidence:g}, "
                f"learning_rate={self.learning_rate:g}, "
                f"binary_search_steps={self.binary_search_steps}, "
                f"max_iterations={self.max_iterations}, initial_const={self.initial_const:g})")

    def _attack(self, model, x, labels):
        labels = tf.cast(labels, tf.int32)
        batch = tf.shape(x)[0]
        axes = list(range(1, len(x.shape)))
        per_example = [-1] + [1] * len(axes)  # broadcasts a (batch,) vector over an image
        half = (self.clip_max - self.clip_min) / 2.0
        mid = (self.clip_max + self.clip_min) / 2.0
        kappa = self.confidence

        # w(x): the tanh-space point that maps back to (almost exactly) x.
        w_start = tf.atanh(tf.clip_by_value((x - mid) / half, -1.0, 1.0) * _TANH_SHRINK)

        def to_image(w):
            return tf.clip_by_value(tf.tanh(w) * half + mid, self.clip_min, self.clip_max)

        def objective_terms(image):
            """Squared L2 distance, hinge f + kappa and success flag, per example."""
            logits = tf.cast(model(image, training=False), tf.float32)
            onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=tf.float32)
            true_logit = tf.reduce_sum(onehot * logits, axis=-1)
            best_other = tf.reduce_max(logits - onehot * 1e9, axis=-1)
            margin = true_logit - best_other
            dist = tf.reduce_sum(tf.square(image - x), axis=axes)
            return dist, tf.maximum(margin + kappa, 0.0), margin + kappa < 0.0

        def record(image, dist, success, best_round, best_dist, best_adv):
            """Keeps the smallest successful point, per round and over all rounds."""
            best_round = tf.where(success & (dist < best_round), dist, best_round)
            better = success & (dist < best_dist)
            return (best_round, tf.where(better, dist, best_dist),
                    tf.where(tf.reshape(better, per_example), image, best_adv))

        check_every = max(self.max_iterations // 10, 1)

        def run_round(const, best_dist, best_adv):
            """One round of Adam on w at fixed c; returns the round's best and the overall best."""

            def not_done(i, w, m, v, prev, stop, *best):
                return (i < self.max_iterations) & ~stop

            def adam_step(i, w, m, v, prev, stop, best_round, best_dist, best_adv):
                with tf.GradientTape() as tape:
                    tape.watch(w)
                    image = to_image(w)
                    dist, hinge, success = objective_terms(image)
                    total = tf.reduce_sum(dist + const * hinge)
                grad = tape.gradient(total, w,
                                     unconnected_gradients=tf.UnconnectedGradients.ZERO)
                best_round, best_dist, best_adv = record(
                    image, dist, success, best_round, best_dist, best_adv)
                if self.abort_early:
                    check = tf.equal(i % check_every, 0)
                    stop = check & (total > prev * 0.9999)
                    prev = tf.where(check, total, prev)
                # Adam (Kingma & Ba 2015), bias-corrected, one tensor per example pixel.
                t = tf.cast(i + 1, tf.float32)
                m = _BETA1 * m + (1.0 - _BETA1) * grad
                v = _BETA2 * v + (1.0 - _BETA2) * tf.square(grad)
                rate = self.learning_rate * tf.sqrt(1.0 - _BETA2 ** t) / (1.0 - _BETA1 ** t)
                w = w - rate * m / (tf.sqrt(v) + _ADAM_EPS)
                return i + 1, w, m, v, prev, stop, best_round, best_dist, best_adv

            zeros = tf.zeros_like(x)
            state = (tf.constant(0), w_start, zeros, zeros, tf.constant(np.inf, tf.float32),
                     tf.constant(False), tf.fill([batch], np.inf), best_dist, best_adv)
            _, w, _, _, _, _, best_round, best_dist, best_adv = tf.while_loop(
                not_done, adam_step, state)
            image = to_image(w)  # the last iterate has not been scored yet
            dist, _, success = objective_terms(image)
            return record(image, dist, success, best_round, best_dist, best_adv)

        last = self.binary_search_steps - 1
        final_round_at_upper = self.binary_search_steps >= 10

        def search_step(step, const, lower, upper, best_dist, best_adv):
            if final_round_at_upper:
                const = tf.where(tf.equal(step, last), upper, const)
            best_round, best_dist, best_adv = run_round(const, best_dist, best_adv)
            found = best_round < np.inf
            upper = tf.where(found, tf.minimum(upper, const), upper)
            lower = tf.where(found, lower, tf.maximum(lower, const))
            const = tf.where(upper < 1e9, (lower + upper) / 2.0,
                             tf.where(found, const, const * 10.0))
            return step + 1, const, lower, upper, best_dist, best_adv

        state = (tf.constant(0), tf.fill([batch], self.initial_const), tf.zeros([batch]),
                 tf.fill([batch], _NO_BOUND), tf.fill([batch], np.inf), x)
        _, _, _, _, best_dist, best_adv = tf.while_loop(
            lambda step, *_: step < self.binary_search_steps, search_step, state)

        keep = best_dist < np.inf
        if self.eps is not None:
            keep &= tf.sqrt(best_dist) <= self.eps
        x_adv = tf.where(tf.reshape(keep, per_example), best_adv, x)
        if self.eps is not None:  # a no-op up to rounding: kept points are inside the ball
            x_adv = project(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)
        return x_adv
