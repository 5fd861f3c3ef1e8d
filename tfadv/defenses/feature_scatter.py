"""Feature Scattering adversarial training (Zhang & Wang 2019).

Zhang, Wang, "Defense Against Adversarial Attacks Using Feature Scattering-based Adversarial
Training", NeurIPS 2019 (official code: Haichao-Zhang/FeatureScatter, ``attack_methods.py``
``Attack_FeaScatter``, ``ot.py``, ``utils.py``).

Attack (unsupervised: labels are not used). The perturbed batch is pushed away from the clean
batch in the optimal-transport sense,

    x' = argmax_{x'_i in S_x_i}  D(mu, nu'),   D = sum_ij T_ij C_ij,
    C_ij = max(0, 1 - cos(f(x_i), f(x'_j))),   T = entropic OT plan (Sinkhorn) for C,

where mu and nu' are the uniform empirical distributions of the clean and perturbed batches, f
is the ``base_model``'s logits (the official code takes the logits, not an inner feature layer),
S_x the eps-ball around x intersected with the image box, and the Sinkhorn plan couples every
clean example with every perturbed one of the batch (B x B). The maximisation is approximated
(official code) by ``steps`` = 1 sign step of size ``step_size`` = ``eps`` from a uniform start
x + U(-eps, eps) that is not clipped before the step; after the step, x' is projected on the
eps-ball and clipped to the image box. The model runs in eval mode (BatchNorm running statistics:
the official code attacks a deep copy in ``eval()``); the clean logits are constants; the
gradient of D with respect to x' runs through the unrolled Sinkhorn iterations
(`tfadv.sinkhorn.sinkhorn_distance`: entropic regularisation ``sinkhorn_reg`` = 0.01, at most
``sinkhorn_iters`` = 100 rounds, stop when sum |u - u_prev| < ``sinkhorn_tol`` = 0.1).

Training loss (official ``softCrossEntropy`` on ``label_smoothing``): only the
adversarial batch is used, in train mode, with label-smoothed soft targets

    loss = (1/B) sum_i  -sum_k y~_ik log softmax(f(x'_i))_k,
    y~ = (1 - delta - delta / (K - 1)) * onehot(y) + delta / (K - 1),

delta = ``ls_factor`` (official 0.5), K the number of classes. So the true class gets 1 - delta
and every other class delta / (K - 1) (K = 10, delta = 0.5: 0.5 and 0.0556); rows sum to 1.

Distribution (tf.distribute): the transport plan is PER REPLICA. Each replica attacks its own
share of the global batch, so a plan couples only that replica's B / R examples (R replicas);
the loss is then averaged over the global batch as for every defense. R replicas therefore train
as one device would if it split each batch into R chunks and attacked each chunk on its own
(`tests/test_feature_scatter.py` checks exactly this). To reproduce the official plan size
(batch 60 on one GPU, ``fs_train.sh``), give each replica 60 examples. The official code does
the same on several GPUs: its ``torch.nn.DataParallel`` wraps the attack module, so each GPU
solves the plan of its own chunk. A global plan would need the perturbed logits all-gathered,
with gradients, inside the attack loop; tfadv does not do that. (At the official regularisation
0.01 the plan between a batch and its slightly perturbed copy is close to the identity coupling,
so the split changes little; with a smoother plan it changes the examples.)

Evaluation (official ``fs_eval.py``): PGD-20 and CW-20 (margin 50), step 2/255, eps 8/255, random
start. The default ``eval_attack`` here is that PGD-20 on the cross-entropy at the training
attack's eps (step eps / 4). AutoAttack (Croce & Hein 2020) gives the official WRN-28-10 89.98%
clean but only 36.64% robust (reported PGD-20 about 70.5%), which suggests masked gradients:
evaluate a Feature Scattering model with AutoAttack, not only with PGD.

Differences from the official code:
- The official inputs are in [-1, 1], so its eps 16/255 and step 16/255 are 8/255 here, in
  [0, 1] pixel units (the model normalises inside; use mean = std = 0.5 to match its [-1, 1]).
- The official LSE, log(sum exp + 1e-6), is computed stably (same value; see `tfadv.sinkhorn`).
- Cosine similarity divides each vector by max(||.||, 1e-6) (newer PyTorch's rule; older
  versions floor the product of the norms; identical unless a logit vector is nearly zero).
"""

import numbers

import gin
import tensorflow as tf
from tfadv.checks import check_number
from tfadv.attacks.pgd import PGD, norm_name, random_in_ball
from tfadv.defenses.base import Defense, replica_mean
from tfadv.sinkhorn import cosine_cost, sinkhorn

_EIGHT_OVER_255 = 8.0 / 255.0


def check_ls_factor(ls_factor):
    """Raises ValueError unless ``ls_factor``, the label-smoothing factor delta, is a number in
    [0, 1)."""
    if (not isinstance(ls_factor, numbers.Real) or isinstance(ls_factor, bool)
            or not 0.0 <= ls_factor < 1.0):
        raise ValueError(f"ls_factor must be a number >= 0 and < 1; got {ls_factor!r}.")


def label_smoothing(labels, num_classes, ls_factor):
    """Official ``utils.label_smoothing`` targets (K = ``num_classes``, delta = ``ls_factor``):

        y~ = (1 - delta - delta / (K - 1)) * onehot(labels) + delta / (K - 1)

    i.e. 1 - delta on the true class and delta / (K - 1) elsewhere. Shape (batch, K), float32."""
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes; got {num_classes}.")
    off = ls_factor / (num_classes - 1)
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    return (1.0 - ls_factor - off) * onehot + off


def soft_cross_entropy(targets, logits):
    """-sum_k targets_k * log softmax(logits)_k per example, in float32 (``softCrossEntropy``
    without the batch mean)."""
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    return -tf.reduce_sum(tf.cast(targets, tf.float32) * log_probs, axis=-1)


def feature_scatter_loss(labels, logits, ls_factor):
    """Per-example Feature Scattering training loss, -sum_k y~_k log softmax(f(x'))_k with the
    label-smoothed targets y~ of `label_smoothing` (delta = ``ls_factor``); ``logits`` are
    f(x') of the adversarial batch, (batch, K). Returns (batch,) float32."""
    targets = label_smoothing(labels, logits.shape[-1], ls_factor)
    return soft_cross_entropy(targets, logits)


def transport_losses(clean_logits, adv_logits, reg=0.01, max_iter=100, tol=0.1):
    """Each perturbed example's share of the OT distance, sum_i T_ij C_ij for column j, so the
    shares sum to D = sum_ij T_ij C_ij (`tfadv.sinkhorn.sinkhorn_distance`). The shares are coupled
    through the plan T: only their sum is a loss on its own, which is what PGD ascends."""
    cost = cosine_cost(tf.cast(clean_logits, tf.float32), tf.cast(adv_logits, tf.float32))
    return tf.reduce_sum(sinkhorn(cost, reg, max_iter, tol) * cost, axis=0)


@gin.configurable
class FeatureScatterAttack(PGD):
    """The Feature Scattering attack: tfadv's PGD loop ascending the OT distance between the
    logits of the clean and the perturbed batch (see module docstring). The clean logits take
    the place of the labels, which are accepted and ignored.

    Args:
      eps: radius of the threat model, [0, 1] pixel units (>= 0). Default 8/255 (the paper's
        CIFAR-10 budget; the official code writes it 16/255 in [-1, 1]).
      step_size: size of a sign step (> 0); ``None`` means ``eps`` (official).
      steps: number of ascent steps (integer >= 1); official 1.
      norm: ``'linf'`` (official) or ``'l2'`` (uniform start in the L2 ball, normalised
        gradient step).
      sinkhorn_reg: entropic regularisation of the transport plan (> 0); official 0.01.
      sinkhorn_iters: maximal number of Sinkhorn rounds (integer >= 1); official 100.
      sinkhorn_tol: Sinkhorn stops once a round changes the row potential u by less than this
        in L1 norm (>= 0); official 0.1.
      clip_min, clip_max: the image box.
      seed: seed of the uniform start; ``None`` draws fresh noise on each call.
    """

    # The steps are unrolled (`PGD.unroll`): the gradient of the Sinkhorn tf.while_loop inside
    # the attack's own tf.while_loop makes TensorFlow's graph optimizer rewrite an AddN of the
    # gradient into a temporary variable that is not released between calls, and the second
    # training step of a PreActResNet-18 at batch 32 (CPU, TF 2.21) failed with
    # "AlreadyExistsError: Resource __per_step_0/.../AddN_4/tmp_var" (measured by
    # bench/perf.py; TensorFlow issues 37740 and 38906). The official attack has one step.
    unroll = True

    def __init__(self, eps=_EIGHT_OVER_255, step_size=None, steps=1, norm="linf",
                 sinkhorn_reg=0.01, sinkhorn_iters=100, sinkhorn_tol=0.1, clip_min=0.0,
                 clip_max=1.0, seed=None):
        check_number("eps", eps, 0.0, strict=False)
        check_number("sinkhorn_reg", sinkhorn_reg, 0.0, strict=True)
        check_number("sinkhorn_iters", sinkhorn_iters, 1, strict=False, integer=True)
        check_number("sinkhorn_tol", sinkhorn_tol, 0.0, strict=False)
        self.sinkhorn_reg = float(sinkhorn_reg)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.sinkhorn_tol = float(sinkhorn_tol)
        # training=False: BatchNorm in eval mode during the attack (official: aux_net.eval()).
        super().__init__(eps=eps, step_size=eps if step_size is None else step_size,
                         steps=steps, norm=norm, random_start="uniform",
                         loss_fn=self._transport_losses, training=False, clip_min=clip_min,
                         clip_max=clip_max, seed=seed)

    def __repr__(self):
        return (f"FeatureScatterAttack(eps={self.eps:g}, step_size={self.step_size:g}, "
                f"steps={self.steps}, norm={norm_name(self.norm)})")

    def _transport_losses(self, clean_logits, adv_logits):
        return transport_losses(clean_logits, adv_logits, self.sinkhorn_reg,
                                self.sinkhorn_iters, self.sinkhorn_tol)

    def distance(self, clean_logits, adv_logits):
        """The OT loss D = sum_ij T_ij C_ij between the two batches of logits (float32)."""
        return tf.reduce_sum(self._transport_losses(clean_logits, adv_logits))

    def targets(self, model, x):
        """What the loop compares against: the clean logits, in eval mode, as constants."""
        return tf.stop_gradient(model(x, training=False))

    def initial_point(self, x, restart=0):
        """x + U(-eps, eps) (L-inf) or a uniform point of the L2 ball; unlike PGD's start it is
        not clipped to the image box (official)."""
        return x + random_in_ball(tf.shape(x), self.norm, self.eps, self.seed_tensor(restart))

    def _attack(self, model, x, labels):
        del labels  # unsupervised: the official attack never reads the labels
        return self.ascend(model, x, self.targets(model, x), self.initial_point(x))


def official_eval_attack(attack):
    """PGD-20 on the cross-entropy with ``attack``'s radius and norm, step eps / 4 (2/255 at
    8/255) and a uniform start: the official ``fs_eval.py`` PGD evaluation."""
    return PGD(eps=attack.eps, step_size=max(attack.eps / 4.0, 1e-12), steps=20,
               norm=attack.norm, random_start="uniform", clip_min=attack.clip_min,
               clip_max=attack.clip_max)


@gin.configurable(denylist=["base_model"])
class FeatureScattering(Defense):
    """Feature Scattering adversarial training (Zhang & Wang 2019) around any Keras classifier.
    It minimises (module docstring)

        (1/B) sum_i -sum_k y~_ik log softmax(f(x'_i))_k,
        x' = argmax_{x'_i in S_x_i} sum_ij T_ij C_ij,   C_ij = max(0, 1 - cos(f(x_i), f(x'_j)))

    with f = ``base_model``, y~ the labels smoothed by delta = ``ls_factor``, T the Sinkhorn
    transport plan for C and the argmax approximated by ``attack`` (S_x: its eps-ball).

    Example::

        model = tfadv.defenses.FeatureScattering(
            base, ls_factor=0.5, attack=FeatureScatterAttack(eps=8 / 255))
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))

    Args:
      base_model: classifier from images in [0, 1] to logits (K >= 2 classes).
      ls_factor: label-smoothing factor delta in [0, 1); official 0.5 (true class 1 - delta,
        others delta / (K - 1)); 0 is the plain cross-entropy.
      attack: builds the training examples; default `FeatureScatterAttack` (eps 8/255, one step
        of size eps). Its plan is per replica (see module docstring).
      eval_attack: attack behind ``robust_accuracy``; default PGD-20 at the attack's eps, step
        eps / 4, uniform start (`official_eval_attack`).
      awp: optional `tfadv.defenses.AWP`.

    The base class's Hypersphere Embedding ``margin`` is rejected: it is defined for the hard
    cross-entropy, not for these soft targets.
    """

    def __init__(self, base_model, ls_factor=0.5, attack=None, eval_attack=None, awp=None,
                 **kwargs):
        check_ls_factor(ls_factor)
        if kwargs.get("margin"):
            raise ValueError(
                "FeatureScattering trains on a label-smoothed soft cross-entropy; the Hypersphere "
                f"Embedding margin is not defined for it (margin must be 0; got "
                f"{kwargs['margin']!r}).")
        if attack is None:
            attack = FeatureScatterAttack()
        if eval_attack is None and hasattr(attack, "eps") and hasattr(attack, "norm"):
            eval_attack = official_eval_attack(attack)
        super().__init__(base_model, attack=attack, eval_attack=eval_attack, awp=awp, **kwargs)
        self.ls_factor = float(ls_factor)

    def prepare(self, x, y):
        # The attack ignores y; it runs outside the weights tape (the base class stops gradients).
        return self.attack(self.base_model, x, y)

    def objective(self, state, x, y, sample_weight, x_adv):
        logits = state(x_adv, training=True)
        loss = feature_scatter_loss(y, logits, self.ls_factor)
        return replica_mean(loss, sample_weight), {"adv": logits}
