"""Attacks on image classifiers whose inputs live in [0, 1]. See `tfadv.attacks.base`."""

from tfadv.attacks.base import Attack
from tfadv.attacks.losses import cross_entropy, cw_margin, dlr, dlr_targeted, get_loss
from tfadv.attacks.pgd import FGSM, PGD, parse_norm, project, random_in_ball

__all__ = ["Attack", "FGSM", "PGD", "cross_entropy", "cw_margin", "dlr", "dlr_targeted",
           "get_loss", "parse_norm", "project", "random_in_ball"]
