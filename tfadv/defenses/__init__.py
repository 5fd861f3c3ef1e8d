"""Defenses: `keras.Model` subclasses that wrap a base classifier and override `train_step`."""

from tfadv.defenses.base import Defense
from tfadv.defenses.pgd_at import PGDAdversarialTraining, StandardTraining

__all__ = ["Defense", "PGDAdversarialTraining", "StandardTraining"]
