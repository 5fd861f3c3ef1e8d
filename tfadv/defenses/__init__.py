"""Defenses: `keras.Model` subclasses that wrap a base classifier and define its training
objective (`Defense.prepare` + `Defense.objective`; the shared `train_step` is in `base`).

`AWP` is not a defense of its own: any defense with ``supports_awp`` takes one as ``awp=``."""

from tfadv.defenses.alp import ALP
from tfadv.defenses.awp import AWP
from tfadv.defenses.base import Defense, ModelState
from tfadv.defenses.catastrophic_overfitting import CatastrophicOverfittingMonitor
from tfadv.defenses.free_at import FreeAdversarialTraining
from tfadv.defenses.feature_scatter import FeatureScatterAttack, FeatureScattering
from tfadv.defenses.gaussian import GaussianAugmentation
from tfadv.defenses.ibp import IntervalBoundPropagation
from tfadv.defenses.mart import MART
from tfadv.defenses.mmc import MMC, RandomTargetPGD
from tfadv.defenses.pgd_at import PGDAdversarialTraining, StandardTraining
from tfadv.defenses.stability import StabilityTraining
from tfadv.defenses.trades import TRADES

__all__ = ["ALP", "AWP", "CatastrophicOverfittingMonitor", "Defense", "FeatureScatterAttack",
           "FeatureScattering", "FreeAdversarialTraining", "GaussianAugmentation",
           "IntervalBoundPropagation", "MART", "MMC", "ModelState", "PGDAdversarialTraining",
           "RandomTargetPGD", "StabilityTraining", "StandardTraining", "TRADES"]
