"""Attacks by name, for `bin/evaluate` and reports: ``build_attack('pgd20', eps=8/255)``.

Names: ``fgsm``; ``pgdK`` (PGD with K steps, e.g. ``pgd20``: step 2.5 eps / K, uniform random
start, an example robust only if every iterate is classified correctly); ``pgdK-cw`` (the same
with the Carlini-Wagner margin loss); ``mim``; ``cw-l2`` (L2 only); ``apgd-ce``; ``apgd-dlr``;
``apgd-t``; ``fab-t``; ``square``; ``autoattack`` (the standard version, the headline of every
report); ``autoattack-rand`` (APGD-CE and APGD-DLR with EOT over 20 samples, for randomised
models); ``autoattack-fast`` (a cheaper screen, labelled as such wherever it is reported).

The patch threat model (``norm='patch'``, eps = the patch side m in pixels; `tfadv.attacks.patch`):
``patch`` (PGD on the patch content at every location, 150 steps of 0.05: the strongest, the
headline of patch reports); ``patch-fast`` (a 5-step screen at every location, then 150 steps at
the 10 best and 10 random locations); ``patch-random80`` (Chiang et al.'s evaluation: 150 steps at
80 random locations); ``upatch`` (a universal patch, Brown et al. 2017, fitted on each batch and
tried at every location).
"""

import re

from tfadv.attacks.pgd import FGSM, PGD, parse_norm

NAMES = ("fgsm", "pgdK", "pgdK-cw", "mim", "cw-l2", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t",
         "square", "autoattack", "autoattack-rand", "autoattack-fast", "patch", "patch-fast",
         "patch-random80", "upatch")
PATCH_NAMES = ("patch", "patch-fast", "patch-random80", "upatch")


def build_attack(name, eps, norm="linf", seed=0):
    """The attack called ``name`` (see module docstring) for the threat model (norm, eps)."""
    key = name.strip().lower()
    patch_norm = isinstance(norm, str) and norm.strip().lower() == "patch"
    if key in PATCH_NAMES or patch_norm:
        return _patch_attack(key, name, eps, patch_norm, seed)
    norm = parse_norm(norm)
    match = re.fullmatch(r"pgd(\d+)(-cw)?", key)
    if key == "fgsm":
        return FGSM(eps=eps, norm=norm)
    if match:
        steps = int(match.group(1))
        return PGD(eps=eps, step_size=max(2.5 * eps / steps, 1e-6), steps=steps, norm=norm,
                   loss_fn="cw_margin" if match.group(2) else "cross_entropy",
                   random_start="uniform", select="misclassified", seed=seed)
    if key == "mim":
        from tfadv.attacks.mim import MIM
        return MIM(eps=eps, step_size=eps / 10, steps=10, norm=norm, seed=seed)
    if key == "cw-l2":
        if norm != 2:
            raise ValueError("attack 'cw-l2' is an L2 attack: use norm 'l2'.")
        from tfadv.attacks.cw import CarliniWagnerL2
        return CarliniWagnerL2(eps=eps, seed=seed)
    if key in ("apgd-ce", "apgd-dlr"):
        from tfadv.attacks.apgd import APGD
        return APGD(eps, norm=norm, loss=key.split("-")[1], seed=seed)
    if key == "apgd-t":
        from tfadv.attacks.apgd import APGDTargeted
        return APGDTargeted(eps, norm=norm, seed=seed)
    if key == "fab-t":
        from tfadv.attacks.fab import FABTargeted
        return FABTargeted(eps, norm=norm, seed=seed)
    if key == "square":
        from tfadv.attacks.square import Square
        return Square(eps, norm=norm, seed=seed)
    if key in ("autoattack", "autoattack-rand", "autoattack-fast"):
        from tfadv.attacks.autoattack import AutoAttack
        version = key.split("-")[1] if "-" in key else "standard"
        return AutoAttack(eps, norm=norm, version=version, seed=seed)
    raise ValueError(f"unknown attack name {name!r}; known: {', '.join(NAMES)} "
                     f"(K = number of PGD steps, e.g. pgd20).")


def _patch_attack(key, name, eps, patch_norm, seed):
    """The patch attack ``key`` for an eps x eps patch (norm 'patch')."""
    if key not in PATCH_NAMES:
        raise ValueError(f"attack {name!r} is not a patch attack: with norm 'patch' use one of "
                         f"{', '.join(PATCH_NAMES)}.")
    if not patch_norm:
        raise ValueError(f"attack {name!r} is a patch attack: use norm 'patch' (eps = the patch "
                         f"side in pixels).")
    from tfadv.attacks.patch import PatchPGD, UniversalPatch
    if key == "upatch":
        return UniversalPatch(eps, seed=seed)
    settings = {"patch": {"locations": "all"},
                "patch-fast": {"locations": 10, "screen_steps": 5},
                "patch-random80": {"locations": 80, "screen_steps": 0}}[key]
    return PatchPGD(eps, steps=150, step_size=0.05, seed=seed, **settings)
