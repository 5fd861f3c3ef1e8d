"""The AutoAttack ensemble (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML), natively in TensorFlow.

Versions (reference: fra31/auto-attack ``autoattack.py``, ``version='standard'``):

- ``'standard'``: APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR, 9 target classes,
  100 iterations), FAB-T (9 target classes, 100 iterations), Square (5,000 queries), run in this
  order, each only on the examples every earlier attack failed on. An example is robust only if
  it survives all four.
- ``'rand'``: the reference's version for randomised defenses: APGD-CE and APGD-DLR, each with
  expectation over transformation over 20 model calls per gradient (``eot_iter=20``), 100
  iterations, 1 restart. `tfadv.evaluation` runs it by itself when a model's predictions change
  between identical calls.
- ``'fast'``: tfadv's cheaper screen, not in the reference: APGD-CE and APGD-T with 3 target
  classes. Use it while developing; report ``'standard'``.

Every returned point is projected onto the threat model (eps-ball ∩ [0, 1]) before it is judged,
so no component can be credited with an example outside the threat model.
"""

import gin
import numpy as np
import tensorflow as tf

from tfadv.checks import check_number
from tfadv.attacks.base import check_image_range
from tfadv.attacks.pgd import norm_name, parse_norm, project

VERSIONS = ("standard", "rand", "fast")
EOT_SAMPLES = 20  # the reference's eot_iter of version 'rand'


def components(eps, norm, version, seed):
    """The (name, attack) list of a version, with the reference's default parameters."""
    from tfadv.attacks.apgd import APGD, APGDTargeted

    if version == "rand":
        return [("apgd-ce", APGD(eps, norm=norm, steps=100, restarts=1, loss="ce", seed=seed,
                                 eot_samples=EOT_SAMPLES)),
                ("apgd-dlr", APGD(eps, norm=norm, steps=100, restarts=1, loss="dlr", seed=seed,
                                  eot_samples=EOT_SAMPLES))]
    if version == "fast":
        return [("apgd-ce", APGD(eps, norm=norm, steps=100, restarts=1, loss="ce", seed=seed)),
                ("apgd-t", APGDTargeted(eps, norm=norm, steps=100, n_target_classes=3,
                                        seed=seed))]
    from tfadv.attacks.fab import FABTargeted
    from tfadv.attacks.square import Square

    return [("apgd-ce", APGD(eps, norm=norm, steps=100, restarts=1, loss="ce", seed=seed)),
            ("apgd-t", APGDTargeted(eps, norm=norm, steps=100, n_target_classes=9, seed=seed)),
            ("fab-t", FABTargeted(eps, norm=norm, steps=100, n_target_classes=9, seed=seed)),
            ("square", Square(eps, norm=norm, n_queries=5000, seed=seed))]


@gin.configurable
class AutoAttack:
    """The AutoAttack ensemble; call as ``attack(model, x, labels)`` like any tfadv attack.

    Args:
      eps: radius of the threat model (``>= 0``), [0, 1] pixel units.
      norm: ``'linf'`` or ``'l2'``.
      version: ``'standard'`` (the reference ensemble), ``'rand'`` (EOT, for randomised models)
        or ``'fast'`` (see module docstring).
      seed: seed of every component (deterministic for a seed).

    After each call, ``stats`` maps each component to the number of examples it was the first to
    fool, accumulated over calls (reset with ``reset_stats()``).
    """

    steps = 100  # iterative: the evaluation's sanity checks compare it with single-step attacks

    def __init__(self, eps=0.3, norm="linf", version="standard", seed=0):
        check_number("eps", eps, 0.0, strict=False)
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}; got {version!r}.")
        self.eps = float(eps)
        self.norm = parse_norm(norm)
        self.version = version
        self.components = components(self.eps, norm, version, seed)
        self.reset_stats()

    def reset_stats(self):
        """Sets every component's count of examples it fooled first back to 0."""
        self.stats = {name: 0 for name, _ in self.components}

    def __repr__(self):
        norm = norm_name(self.norm)
        names = "+".join(name for name, _ in self.components)
        return f"AutoAttack(eps={self.eps:g}, norm={norm}, version={self.version}: {names})"

    def __call__(self, model, x, labels):
        x_adv, stats = self.run(model, x, labels)
        for name, count in stats.items():
            self.stats[name] += count
        return tf.convert_to_tensor(x_adv)

    def run(self, model, x, labels, on_component=None):
        """The cascade on one batch: returns ``(x_adv, stats)`` with ``stats`` the number of
        examples each component fooled first in this batch (``__call__`` accumulates them in
        ``self.stats``; `tfadv.evaluation` calls this directly, batches in parallel).

        ``on_component(name, remaining)``, when given, is called before each component runs
        on the ``remaining`` examples not fooled yet (the evaluation's progress line). Images
        outside [0, 1] raise a ValueError (`tfadv.attacks.base.check_image_range`)."""
        check_image_range(x, 0.0, 1.0, "AutoAttack")
        x = np.asarray(x, dtype="float32")
        labels = np.asarray(labels)
        x_adv = x.copy()
        stats = {name: 0 for name, _ in self.components}
        robust = np.argmax(np.asarray(model(x, training=False)), -1) == labels
        for name, attack in self.components:
            index = np.flatnonzero(robust)
            if not len(index):
                break
            if on_component is not None:
                on_component(name, len(index))
            out = attack(model, x[index], labels[index])
            out = project(out, x[index], self.eps, self.norm).numpy()
            fooled = np.argmax(np.asarray(model(out, training=False)), -1) != labels[index]
            x_adv[index[fooled]] = out[fooled]
            robust[index[fooled]] = False
            stats[name] += int(fooled.sum())
        return x_adv, stats
