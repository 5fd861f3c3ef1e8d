"""Attacks on image classifiers whose inputs live in [0, 1]."""

from tfadv.attacks.losses import cross_entropy, cw_margin, get_loss
from tfadv.attacks.pgd import FGSM, PGD, parse_norm, project

__all__ = ["FGSM", "PGD", "cross_entropy", "cw_margin", "get_loss", "parse_norm", "project"]
