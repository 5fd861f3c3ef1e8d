"""Auto-PGD (APGD), the step-size-free PGD of AutoAttack, untargeted and targeted.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (arXiv:2003.01690), Algorithm 1. The reference implementation
is fra31/auto-attack, ``autoattack/autopgd_base.py`` (``APGDAttack``, ``APGDAttack_targeted``);
where it differs from the paper we follow it, and every difference is listed in `APGD`'s
docstring. AutoAttack's "standard" version runs APGD-CE (100 steps, 1 restart) and APGD-T
(100 steps, 9 target classes, 1 restart), the defaults here.
"""

import gin
import numpy as np
import tensorflow as tf
from cleverhans.tf2.utils import optimize_linear

from tfadv.attacks.base import Attack, check_number
from tfadv.attacks.losses import cross_entropy, dlr, dlr_targeted
from tfadv.attacks.pgd import norm_name, parse_norm, project, random_in_ball

MOMENTUM = 0.75  # alpha of Algorithm 1 (fixed in the paper and in the reference code)
INITIAL_STEP = 2.0  # eta^(0) = INITIAL_STEP * eps, for L-inf and L2
_LOSSES = {"ce": cross_entropy, "dlr": dlr}


def checkpoints(steps):
    """The iterations after which APGD decides whether to halve its step size.

    Paper: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) and
    w_j = ceil(p_j * steps). The reference code builds the same schedule in integers: a first
    period of ``int(0.22 * steps)`` iterations, each next period ``int(0.03 * steps)`` shorter but
    never shorter than ``int(0.06 * steps)`` (all three at least 1). We follow the code; for
    ``steps=100`` both give ``[22, 41, 57, 70, 80, 87, 93, 99]``.

    Returns the sorted list of w_1, w_2, ... <= ``steps`` (w_0 = 0 is left out: no decision is
    made there). An entry w means: right after the w-th update, i.e. once x^(w) is computed.
    """
    check_number("steps", steps, 1, strict=False, integer=True)
    period = max(int(0.22 * steps), 1)
    shrink = max(int(0.03 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    points, w = [], period
    while w <= steps:
        points.append(w)
        period = max(period - shrink, shortest)
        w += period
    return points


def halve_step_size(n_increased, window, rho, reduced_last, best_loss, best_loss_last):
    """APGD's per-example decision at a checkpoint w_j: halve the step size (and restart from the
    best point) when either condition holds. Pure TensorFlow; returns a bool tensor.

    Condition 1 (oscillation): ``n_increased`` -- how many of the ``window = w_j - w_{j-1}``
      updates since the last checkpoint increased the loss over the previous iterate -- is at
      most ``rho * window`` (the code's ``<=``; the paper writes ``<``).
    Condition 2 (stagnation): the step size was not halved at the previous checkpoint
      (``reduced_last`` False) and the best loss did not improve since then
      (``best_loss <= best_loss_last``).
    """
    n_increased = tf.cast(n_increased, tf.float32)
    window = tf.cast(window, tf.float32)
    oscillates = n_increased <= rho * window
    stalled = tf.logical_and(tf.logical_not(tf.cast(reduced_last, tf.bool)),
                             tf.cast(best_loss, tf.float32) <= tf.cast(best_loss_last, tf.float32))
    return tf.logical_or(oscillates, stalled)


def _per_example(v, like):
    """Reshapes a (batch,) tensor to broadcast against the (batch, ...) tensor ``like``."""
    return tf.reshape(v, [-1] + [1] * (len(like.shape) - 1))


class _APGDBase(Attack):
    """The APGD iteration, restarts and bookkeeping shared by `APGD` and `APGDTargeted`."""

    def __init__(self, eps, norm, steps, restarts, rho, clip_min, clip_max, seed,
                 eot_samples=1):
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        check_number("eps", eps, 0.0, strict=False)
        check_number("steps", steps, 1, strict=False, integer=True)
        check_number("restarts", restarts, 1, strict=False, integer=True)
        check_number("rho", rho, 0.0, strict=False, high=1.0)
        check_number("eot_samples", eot_samples, 1, strict=False, integer=True)
        self.eps = float(eps)
        self.norm = parse_norm(norm)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.rho = float(rho)
        self.eot_samples = int(eot_samples)

    # -- what the subclasses define -------------------------------------------------------------
    def _num_objectives(self, num_classes):
        """How many objectives (target classes) the attack runs, each ``restarts`` times."""
        raise NotImplementedError

    def _aux(self, clean_logits, j):
        """The per-example auxiliary input of objective ``j`` (int or scalar tensor): the target
        classes for `APGDTargeted`, ``None`` for `APGD`."""
        raise NotImplementedError

    def _loss(self, labels, logits, aux):
        raise NotImplementedError

    def _min_classes(self):
        return 2

    # -- one APGD run (Algorithm 1) -------------------------------------------------------------
    def _one_loss_and_grad(self, model, x_adv, labels, aux):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = model(x_adv, training=False)
            losses = tf.cast(self._loss(labels, logits, aux), tf.float32)
            total = tf.reduce_sum(losses)
        grad = tape.gradient(total, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return losses, grad, logits

    def _loss_and_grad(self, model, x_adv, labels, aux):
        """Per-example loss, input gradient and fooled flags at ``x_adv``. With
        ``eot_samples`` = K > 1 (expectation over transformation, for randomised models) the
        gradient is the mean of K gradients, each from its own call of the model, and the loss
        and fooled flags are those of the last call, as in the reference code's ``eot_iter``."""
        losses, grad, logits = self._one_loss_and_grad(model, x_adv, labels, aux)
        if self.eot_samples > 1:
            def draw(k, total, losses, logits):
                l, g, z = self._one_loss_and_grad(model, x_adv, labels, aux)
                return k + 1, total + g, l, z

            _, grad, losses, logits = tf.while_loop(
                lambda k, *_: k < self.eot_samples, draw, (tf.constant(1), grad, losses, logits))
            grad = grad / float(self.eot_samples)
        fooled = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return losses, grad, fooled

    def _direction(self, grad):
        """The unit steepest-ascent step: sign(g) (L-inf) or g / ||g||_2 (L2), the same
        cleverhans `optimize_linear` step as PGD's."""
        return optimize_linear(grad, 1.0, self.norm)

    def _project(self, x_adv, x):
        return project(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)

    def _run(self, model, x, labels, aux, seed, record=False):
        """One run of Algorithm 1 on all of ``x``. Returns a dict: ``x_best``/``loss_best`` (the
        highest-loss iterate), ``x_found``/``fooled`` (the last misclassified iterate and whether
        there was one) and, with ``record``, ``iterates`` (steps+1, batch, ...), ``losses``
        (steps+1, batch) of x^(0..steps) before any restart to x_max, and ``step_sizes``
        (steps, batch), the eta used by update k -> k+1."""
        batch = tf.shape(x)[0]
        marks = set(checkpoints(self.steps))
        is_check = tf.constant([n in marks for n in range(self.steps + 1)])
        previous = [0] + sorted(marks)
        window = tf.constant([n - max(w for w in previous if w < n) if n in marks else 1
                              for n in range(self.steps + 1)], tf.float32)

        x0 = self._project(x + random_in_ball(tf.shape(x), self.norm, self.eps, seed), x)
        loss0, grad0, fooled0 = self._loss_and_grad(model, x0, labels, aux)
        state = dict(
            x_k=x0, x_prev=x0, grad=grad0, step=tf.fill([batch], INITIAL_STEP * self.eps),
            x_best=x0, grad_best=grad0, loss_best=loss0, x_found=x0, fooled=fooled0,
            prev_loss=loss0, n_increased=tf.zeros([batch]), best_at_check=loss0,
            reduced_at_check=tf.ones([batch], tf.bool))
        if record:
            state["iterates"] = tf.TensorArray(tf.float32, self.steps + 1).write(0, x0)
            state["losses"] = tf.TensorArray(tf.float32, self.steps + 1).write(0, loss0)
            state["step_sizes"] = tf.TensorArray(tf.float32, self.steps)

        def body(i, s):
            s = dict(s)
            x_k = s["x_k"]
            alpha = tf.where(i == 0, 1.0, MOMENTUM)  # the first update has no momentum
            step = _per_example(s["step"], x_k)
            z = self._project(x_k + step * self._direction(s["grad"]), x)
            x_new = self._project(x_k + alpha * (z - x_k) + (1.0 - alpha) * (x_k - s["x_prev"]),
                                  x)
            loss, grad, fooled = self._loss_and_grad(model, x_new, labels, aux)
            if record:
                s["iterates"] = s["iterates"].write(i + 1, x_new)
                s["losses"] = s["losses"].write(i + 1, loss)
                s["step_sizes"] = s["step_sizes"].write(i, s["step"])

            s["x_found"] = tf.where(_per_example(fooled, x_new), x_new, s["x_found"])
            s["fooled"] = s["fooled"] | fooled
            n_increased = s["n_increased"] + tf.cast(loss > s["prev_loss"], tf.float32)
            s["prev_loss"] = loss
            better = loss > s["loss_best"]
            s["x_best"] = tf.where(_per_example(better, x_new), x_new, s["x_best"])
            s["grad_best"] = tf.where(_per_example(better, x_new), grad, s["grad_best"])
            s["loss_best"] = tf.where(better, loss, s["loss_best"])

            check = is_check[i + 1]
            halve = check & halve_step_size(n_increased, window[i + 1], self.rho,
                                            s["reduced_at_check"], s["loss_best"],
                                            s["best_at_check"])
            s["reduced_at_check"] = tf.where(check, halve, s["reduced_at_check"])
            s["best_at_check"] = tf.where(check, s["loss_best"], s["best_at_check"])
            s["n_increased"] = tf.where(check, tf.zeros_like(n_increased), n_increased)
            s["step"] = tf.where(halve, 0.5 * s["step"], s["step"])
            restart = _per_example(halve, x_new)
            s["x_prev"] = x_k
            s["x_k"] = tf.where(restart, s["x_best"], x_new)
            s["grad"] = tf.where(restart, s["grad_best"], grad)
            return i + 1, s

        _, state = tf.while_loop(lambda i, s: i < self.steps, body, (tf.constant(0), state))
        result = {k: state[k] for k in ("x_best", "loss_best", "x_found", "fooled")}
        if record:
            for k in ("iterates", "losses", "step_sizes"):
                result[k] = state[k].stack()
        return result

    # -- the attack: objectives x restarts on the examples not yet fooled -----------------------
    def _prepare(self, model, x, labels):
        if not labels.dtype.is_integer:
            raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}.")
        labels = tf.cast(labels, tf.int32)
        clean_logits = model(x, training=False)
        num_classes = clean_logits.shape[-1]
        if num_classes is None:
            raise ValueError("the model's number of classes (last logits dimension) must be "
                             "static.")
        if num_classes < self._min_classes():
            raise ValueError(f"{type(self).__name__} needs a model with >= {self._min_classes()} "
                             f"classes; got {num_classes}.")
        return labels, clean_logits

    # Graph-explicit code (tf.while_loop over runs and over iterations): AutoGraph has nothing
    # to convert here, and converting it only slows tracing down.
    @tf.autograph.experimental.do_not_convert
    def _attack(self, model, x, labels):
        labels, clean_logits = self._prepare(model, x, labels)
        # Examples the model already misclassifies are returned as they are (x is adversarial).
        done = tf.not_equal(tf.argmax(clean_logits, -1, output_type=tf.int32), labels)
        best = tf.fill([tf.shape(x)[0]], -np.inf)
        runs = self._num_objectives(clean_logits.shape[-1]) * self.restarts

        # Run c is restart c % restarts of objective c // restarts, on the examples not fooled
        # yet; one traced run serves them all, and the loop ends early once all are fooled.
        def one_run(c, adv, done, best):
            j, r = c // self.restarts, c % self.restarts
            todo = tf.where(~done)[:, 0]
            take = lambda t: tf.gather(t, todo)  # noqa: E731
            aux = self._aux(clean_logits, j)
            out = self._run(model, take(x), take(labels), None if aux is None else take(aux),
                            self.seed_tensor(j, r))
            old_best = take(best)
            improved = ~out["fooled"] & (out["loss_best"] > old_best)
            point = tf.where(_per_example(out["fooled"], x), out["x_found"],
                             tf.where(_per_example(improved, x), out["x_best"], take(adv)))
            where = todo[:, None]
            return (c + 1, tf.tensor_scatter_nd_update(adv, where, point),
                    tf.tensor_scatter_nd_update(done, where, out["fooled"]),
                    tf.tensor_scatter_nd_update(best, where,
                                                tf.where(improved, out["loss_best"], old_best)))

        _, adv, _, _ = tf.while_loop(
            lambda c, adv, done, best: (c < runs) & tf.reduce_any(~done), one_run,
            (tf.constant(0), x, done, best))
        return adv

    def trace(self, model, x, labels, objective=0, restart=0):
        """Debugging aid: one run of Algorithm 1 on every example of ``x`` (fooled or not), with the
        seed and objective (target rank for `APGDTargeted`) the attack would use. Returns a dict of
        tensors: ``iterates`` (steps+1, batch, ...) and ``losses`` (steps+1, batch) of x^(0..steps)
        as computed (before a restart to the best point), ``step_sizes`` (steps, batch) with the
        eta of update k -> k+1, and ``x_best``, ``loss_best``, ``x_found``, ``fooled``."""
        x = tf.convert_to_tensor(x, tf.float32)
        labels = tf.convert_to_tensor(labels)

        @tf.function(autograph=False)
        def run():
            y, clean_logits = self._prepare(model, x, labels)
            aux = self._aux(clean_logits, objective)
            return self._run(model, x, y, aux, self.seed_tensor(objective, restart), record=True)

        return run()


@gin.configurable
class APGD(_APGDBase):
    """Untargeted Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1) on the CE or DLR loss.

    Maximises ``f = loss`` over S = {x' : ||x' - x||_norm <= eps} ∩ [clip_min, clip_max]^d with
    the projection P_S = `tfadv.attacks.pgd.project`, from a random x^(0) in S:

        x^(1)   = P_S(x^(0) + eta^(0) s(grad f(x^(0))))
        z^(k+1) = P_S(x^(k) + eta^(k) s(grad f(x^(k))))
        x^(k+1) = P_S(x^(k) + alpha (z^(k+1) - x^(k)) + (1 - alpha)(x^(k) - x^(k-1)))

    with s(g) = sign(g) for L-inf and g / ||g||_2 per example for L2, momentum alpha = 0.75,
    eta^(0) = 2 eps. x_max / f_max track the highest-loss iterate. At each checkpoint w_j (see
    `checkpoints`) the step size is halved, eta <- eta / 2, and the iterate restarts from x_max
    if (Condition 1) at most a fraction ``rho`` of the updates since w_{j-1} increased f, or
    (Condition 2) eta was not halved at w_{j-1} and f_max did not improve since then (see
    `halve_step_size`).

    Symbols -> arguments: eps -> ``eps``, the norm of S -> ``norm``, N_iter -> ``steps``,
    rho -> ``rho``, f -> ``loss`` ('ce': cross-entropy; 'dlr': the shift- and scale-invariant
    difference of logits ratio, eq. 6), the number of runs from new random starts -> ``restarts``.

    Where the reference code (fra31/auto-attack ``autopgd_base.py``) differs from the paper we
    follow the code: the checkpoints are built in integers (see `checkpoints`); Condition 1
    uses ``<=`` rather than ``<``; Condition 2 is off at the first checkpoint (the paper's
    eta^(w_0) = eta^(w_1) would let it fire there); only examples the model classifies
    correctly are attacked, and each restart only those not fooled yet. Returned per example:
    the clean x if already misclassified, else the last misclassified iterate found (not
    x_max), else the highest-loss iterate over all restarts. A restart to x_max reuses the
    gradient computed there (no extra model call), and the next momentum term is
    x_max - x^(k), as in both paper and code.

    Where we differ from the code: the random start is uniform in the eps-ball
    (`random_in_ball`) and then projected onto S, where the code rescales its noise so that
    the perturbation has norm exactly eps (L-inf: uniform noise divided by its largest
    entry; L2: a Gaussian direction) before clipping to [0, 1]; the first window of
    Condition 1 compares f(x^(1)) with f(x^(0)) as in the paper (the code compares it with 0,
    an unfilled row of its loss buffer reached by index -1); an example not fooled is returned
    at its highest-loss point rather than at x. No L1 variant, no ``use_largereps``.

    EOT (``eot_samples`` = K > 1, AutoAttack's ``version='rand'`` uses K = 20 with APGD-CE and
    APGD-DLR): every gradient is the mean over K calls of a randomised model,
    (1/K) sum_k grad f(x; omega_k), as in the reference code's ``eot_iter``.

    Args:
      eps: radius of the threat model (``>= 0``).
      norm: ``'linf'`` or ``'l2'``.
      steps: N_iter, iterations per run (integer ``>= 1``; AutoAttack uses 100).
      restarts: runs from new random starts (integer ``>= 1``; AutoAttack uses 1).
      loss: ``'ce'`` or ``'dlr'``.
      rho: Condition 1 threshold, in [0, 1] (0.75).
      clip_min, clip_max: the image box.
      seed: seed of the random starts (``None``: fresh randomness on every call).
      eot_samples: K, model calls averaged per gradient (integer ``>= 1``; 1 = no EOT).
    """

    def __init__(self, eps, norm="linf", steps=100, restarts=1, loss="ce", rho=0.75,
                 clip_min=0.0, clip_max=1.0, seed=0, eot_samples=1):
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)}; got {loss!r}.")
        super().__init__(eps, norm, steps, restarts, rho, clip_min, clip_max, seed,
                         eot_samples=eot_samples)
        self.loss = loss

    def __repr__(self):
        eot = f", eot_samples={self.eot_samples}" if self.eot_samples > 1 else ""
        return (f"APGD(eps={self.eps:g}, norm={norm_name(self.norm)}, steps={self.steps}, "
                f"loss={self.loss}, restarts={self.restarts}{eot})")

    def _num_objectives(self, num_classes):
        return 1

    def _aux(self, clean_logits, j):
        return None

    def _loss(self, labels, logits, aux):
        return _LOSSES[self.loss](labels, logits)

    def _min_classes(self):
        return 3 if self.loss == "dlr" else 2


@gin.configurable
class APGDTargeted(_APGDBase):
    """Targeted Auto-PGD on the targeted DLR loss (APGD-T of AutoAttack; Croce & Hein 2020).

    The same iteration as `APGD` (see its docstring for the update equations, symbols and the
    differences from paper and reference code), maximising

        f(x') = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)        (paper, eq. 7)

    for one target class t at a time: as in the reference code, t runs over the 2nd, 3rd, ...
    highest-logit classes of the clean input, ``n_target_classes`` of them (capped at
    num_classes - 1), each with ``restarts`` runs, each run attacking only the examples not
    fooled yet. An example not fooled by any run is returned at the point with the highest
    targeted DLR over all runs (the nearest any target came to overtaking the true class).

    Args:
      eps, norm, steps, restarts, rho, clip_min, clip_max, seed: as for `APGD`.
      n_target_classes: number of target classes tried (integer ``>= 1``; AutoAttack uses 9).
    """

    def __init__(self, eps, norm="linf", steps=100, n_target_classes=9, restarts=1, rho=0.75,
                 clip_min=0.0, clip_max=1.0, seed=0):
        check_number("n_target_classes", n_target_classes, 1, strict=False, integer=True)
        super().__init__(eps, norm, steps, restarts, rho, clip_min, clip_max, seed)
        self.n_target_classes = int(n_target_classes)

    def __repr__(self):
        return (f"APGDTargeted(eps={self.eps:g}, norm={norm_name(self.norm)}, steps={self.steps}, "
                f"n_target_classes={self.n_target_classes}, restarts={self.restarts})")

    def _num_objectives(self, num_classes):
        return min(self.n_target_classes, num_classes - 1)

    def _aux(self, clean_logits, j):
        # Objective j targets the (j + 2)-th highest clean logit: 2nd, 3rd, ...
        ranked = tf.argsort(clean_logits, axis=-1, direction="DESCENDING", stable=True)
        return tf.gather(ranked, j + 1, axis=1)

    def _loss(self, labels, logits, aux):
        return dlr_targeted(labels, logits, aux)

    def _min_classes(self):
        return 4
