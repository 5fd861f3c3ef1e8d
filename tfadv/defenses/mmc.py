"""MMC: training with the Max-Mahalanobis center loss (Pang et al. 2020), optionally adversarial.

Pang, Xu, Dong, Du, Chen, Zhu, "Rethinking Softmax Cross-Entropy Loss for Adversarial
Robustness", ICLR 2020 (official code: P2333/Max-Mahalanobis-Training, ``train.py`` and
``advtrain.py``). The model ends in an `tfadv.heads.MMCHead`: a linear feature layer z and fixed
centres mu_k with ||mu_k|| = C_MM, outputting f_k(x) = -||z(x) - mu_k||^2 (see `tfadv.heads`).
The paper's MMC loss is

    L_MMC(z, y) = 1/2 ||z - mu_y||_2^2;

the official code trains on ``dot_loss`` = -sum_k y_k f_k(x) = ||z - mu_y||^2, WITHOUT the 1/2,
averaged over the batch. tfadv follows the code:

    loss = (1/B) sum_i ||z(x'_i) - mu_{y_i}||^2,    B = the global batch,

with x' = x for MMC and x' = ``attack``(x) for AT-MMC (``adv_ratio=1.0``: adversarial examples
only). Symbols: z = the head's input (``mmc_features``), mu = the head's ``centers``,
C_MM = ``c_mm`` of `tfadv.heads.mmc_model`.

The official AT-MMC attack (``advtrain.py --use_target=True``) is cleverhans 2.1.0's
``MadryEtAl``: L-inf, eps 8/256, step 2/256, 10 iterations, uniform random start, run in the
Keras training phase (BatchNorm in train mode), descending the softmax cross-entropy of the
f_k(x) "logits" towards a target label drawn uniformly from all L classes for every example (it
can be the true label). `RandomTargetPGD` is that attack on tfadv's PGD loop. Small differences:
tfadv clips the random start to the image box (cleverhans clips only after the first step), and
the official inputs are mean-subtracted pixels where tfadv normalises inside the model (the same
eps in [0, 1] pixel units).

Evaluation: the f_k(x) outputs of a trained model differ by up to 2 C_MM^2 L/(L-1) between
classes (222 for C_MM = 10, L = 10, when z reaches its centre), so softmax cross-entropy
saturates: its input gradient is exactly 0 in float32 at confidently classified points, and
cross-entropy PGD or FGSM make no progress there (the official README warns that attacks must be
adaptive). Evaluate with margin losses (PGD with
``loss_fn='cw_margin'``, APGD-DLR) and AutoAttack; the default ``eval_attack`` here is PGD on the
CW margin.
"""

import gin
import keras
import tensorflow as tf

from tfadv.attacks import PGD, cross_entropy
from tfadv.defenses.base import Defense, replica_mean
from tfadv.heads import find_mmc_head

_TARGET_SALT = -1  # seed salt of the target labels (PGD's random starts use the restart index)


def mmc_loss(labels, logits):
    """Per-example MMC loss ||z - mu_y||^2 = -f_y(x) from the `MMCHead` outputs
    f_k(x) = -||z - mu_k||^2 (official ``dot_loss``; no 1/2), in float32."""
    logits = tf.cast(logits, tf.float32)
    return -tf.gather(logits, tf.cast(labels, tf.int32), axis=1, batch_dims=1)


def targeted_cross_entropy(target_labels, logits):
    """-CE(t, f(x)) per example: ascending it (what `tfadv.attacks.PGD` does with its
    objective) descends the cross-entropy towards the targets t, as cleverhans' targeted
    ``MadryEtAl`` does by negating its loss."""
    return -cross_entropy(target_labels, logits)


@gin.configurable
class RandomTargetPGD(PGD):
    """The AT-MMC training attack: targeted PGD towards uniformly random labels.

    Each call draws a target t_i uniformly from all L classes for every example (t_i may equal
    y_i, as in the official ``tf.multinomial(tf.ones(...))``), discards the true labels and runs
    `tfadv.attacks.PGD`'s loop on ``loss_fn`` = `targeted_cross_entropy`:

        x^{s+1} = Pi_{x+S}( x^s - alpha * sign(grad_x CE(f(x^s), t)) )

    (alpha = ``step_size``, S = the ``eps``-ball of ``norm``). Unlike untargeted cross-entropy,
    this objective does not saturate on MMC outputs: at a saturated softmax its gradient with
    respect to f is e_t - e_y, not 0.

    Defaults are the official AT-MMC setting (``advtrain.py``): eps 8/256, step 2/256, 10 steps,
    uniform random start, ``training=True`` (BatchNorm in train mode, the Keras training phase
    of the official attack graph). Targets are drawn with `Attack.seed_tensor`: deterministic for
    an integer ``seed``, fresh on every call with ``seed=None``.

    Args: as `tfadv.attacks.PGD`, without ``loss_fn`` (fixed) and with ``select`` 'last' or
    'max_loss' ('misclassified' would compare predictions with the targets, not the labels).
    """

    def __init__(self, eps=8 / 256, step_size=2 / 256, steps=10, norm="linf",
                 random_start="uniform", init_scale=0.001, training=True, restarts=1,
                 select="last", clip_min=0.0, clip_max=1.0, seed=None):
        if select == "misclassified":
            raise ValueError("RandomTargetPGD supports select='last' or 'max_loss': "
                             "'misclassified' would test predictions against the random targets.")
        # Every PGD argument is passed explicitly, so no PGD gin binding leaks into this class.
        super().__init__(eps=eps, step_size=step_size, steps=steps, norm=norm,
                         random_start=random_start, init_scale=init_scale,
                         loss_fn=targeted_cross_entropy, training=training, restarts=restarts,
                         select=select, clip_min=clip_min, clip_max=clip_max, seed=seed)

    def __repr__(self):
        return "RandomTarget" + super().__repr__()

    def random_targets(self, model, x):
        """The target labels of one call on images ``x``: uniform over the model's classes."""
        num_classes = model.output_shape[-1]
        return tf.random.stateless_uniform(tf.shape(x)[:1], self.seed_tensor(_TARGET_SALT),
                                           minval=0, maxval=num_classes, dtype=tf.int32)

    def _attack(self, model, x, labels):
        return super()._attack(model, x, self.random_targets(model, x))


def _cw_margin_like(attack):
    """PGD on the CW margin with ``attack``'s radius, step and budget, uniform start: an
    evaluation attack that does not saturate on MMC outputs (see module docstring)."""
    return PGD(eps=attack.eps, step_size=attack.step_size, steps=attack.steps, norm=attack.norm,
               random_start="uniform", loss_fn="cw_margin", clip_min=attack.clip_min,
               clip_max=attack.clip_max)


@gin.configurable(denylist=["base_model"])
class MMC(Defense):
    """MMC training (``attack=None``) or AT-MMC (``attack=RandomTargetPGD()``), Pang et al. It
    minimises (official ``dot_loss``, without the paper's 1/2; `mmc_loss`)

        E[ ||z(x') - mu_y||_2^2 ],   x' = x (MMC) or x' = attack(x) (AT-MMC)

    with z the input of the base model's `tfadv.heads.MMCHead` and mu_y its centre of class y.

    Example (runs as is)::

        import keras, numpy as np, tfadv.heads, tfadv.defenses.mmc as mmc
        base = tfadv.heads.mmc_model((8, 8, 1), 10, backbone="digits_cnn", dim=64, c_mm=10.0)
        model = mmc.MMC(base, attack=mmc.RandomTargetPGD(eps=0.3, step_size=0.1, steps=7))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.rand(64, 8, 8, 1).astype("float32"); y = np.arange(64) % 10
        model.fit(x, y, batch_size=32, epochs=1)
        model.save("mmc.keras")      # the base classifier, MMC head included

    Args:
      base_model: a classifier ending in an `tfadv.heads.MMCHead` (`tfadv.heads.mmc_model`).
      attack: ``None`` for MMC on clean inputs; an attack for AT-MMC (official:
        `RandomTargetPGD`), whose examples replace the clean ones (``adv_ratio=1.0``).
      eval_attack: the attack behind ``robust_accuracy`` in `evaluate`. Default: ``None``
        without ``attack``; otherwise uniform-start PGD on the CW margin with the attack's eps,
        step and steps (not the random-target attack, which does not seek errors).

    Raises:
      ValueError: when ``base_model`` does not end in an `MMCHead`.
    """

    supports_awp = False  # not part of the method

    def __init__(self, base_model, attack=None, eval_attack=None, **kwargs):
        if isinstance(base_model, keras.Model) and find_mmc_head(base_model) is None:
            last = base_model.layers[-1] if base_model.layers else None
            raise ValueError(
                f"MMC needs a base model ending in an MMCHead (outputs -||z - mu_k||^2); "
                f"{base_model.name!r} ends in {type(last).__name__} {getattr(last, 'name', '')!r}."
                f" Build it with tfadv.heads.mmc_model (gin: train.model = @mmc_model).")
        if eval_attack is None and attack is not None and all(
                hasattr(attack, a) for a in ("eps", "step_size", "steps", "norm")):
            eval_attack = _cw_margin_like(attack)
        super().__init__(base_model, attack=attack, eval_attack=eval_attack, **kwargs)

    def prepare(self, x, y):
        if self.attack is None:
            return None
        return self.attack(self.base_model, x, y)

    def objective(self, state, x, y, sample_weight, x_adv):
        images = x if x_adv is None else x_adv
        logits = state(images, training=True)
        loss = replica_mean(mmc_loss(y, logits), sample_weight)
        return loss, {"clean" if x_adv is None else "adv": logits}

    def evaluation_loss(self, y, logits):
        """The validation ``loss`` is the MMC loss, not the cross-entropy."""
        return mmc_loss(y, logits)
