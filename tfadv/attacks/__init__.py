"""Attacks on image classifiers whose inputs live in [0, 1]. See `tfadv.attacks.base`.

Images outside [0, 1] are refused with a one-line error, never clipped: for 0..255 or other
ranges, `tfadv.attack(model, x, y, ..., input_range=(0, 255))` maps them (`tfadv.api`).

White-box: FGSM and PGD (`pgd`), MIM (`mim`), CW-L2 (`cw`), APGD-CE / APGD-DLR and APGD-T
(`apgd`), FAB-T (`fab`). Black-box: Square (`square`). The AutoAttack ensemble (`autoattack`).
Patches (norm 'patch', eps = the patch side): `PatchPGD` and `UniversalPatch` (`patch`).
By name: `tfadv.attacks.registry.build_attack`.
"""

from tfadv.attacks.apgd import APGD, APGDTargeted
from tfadv.attacks.autoattack import AutoAttack
from tfadv.attacks.base import Attack
from tfadv.attacks.cw import CarliniWagnerL2
from tfadv.attacks.fab import FABTargeted
from tfadv.attacks.losses import (cross_entropy, cw_margin, dlr, dlr_targeted, get_loss,
                                  kl_divergence)
from tfadv.attacks.mim import MIM
from tfadv.attacks.patch import PatchPGD, UniversalPatch
from tfadv.attacks.pgd import FGSM, PGD, parse_norm, project, random_in_ball
from tfadv.attacks.registry import build_attack
from tfadv.attacks.square import Square

__all__ = ["APGD", "APGDTargeted", "Attack", "AutoAttack", "CarliniWagnerL2", "FABTargeted",
           "FGSM", "MIM", "PGD", "PatchPGD", "Square", "UniversalPatch", "build_attack", "cross_entropy", "cw_margin", "dlr",
           "dlr_targeted", "get_loss", "kl_divergence", "parse_norm", "project", "random_in_ball"]
