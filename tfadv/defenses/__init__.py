"""Defenses: `keras.Model` subclasses that wrap a base classifier and define its training
objective (`Defense.prepare` + `Defense.objective`; the shared `train_step` is in `base`).

`AWP` is not a defense of its own: any defense with ``supports_awp`` takes one as ``awp=``.
`tfadv.preprocessing` holds input transformations against patches (LGS, saliency + inpainting),
layers placed in front of a classifier rather than training objectives; they are re-exported
here. `band_ablation` trains
the base classifier of de-randomized column smoothing (`tfadv.certify.derandomized`); its
``band_ablation_model`` builds the smoothed classifier that `tfadv.train` trains and saves."""

from tfadv.defenses.alp import ALP
from tfadv.defenses.awp import AWP
from tfadv.defenses.band_ablation import (BandAblationTraining, band_ablation_model,
                                          levine_mnist_cnn)
from tfadv.defenses.base import Defense, ModelState
from tfadv.defenses.catastrophic_overfitting import CatastrophicOverfittingMonitor
from tfadv.defenses.free_at import FreeAdversarialTraining
from tfadv.defenses.feature_scatter import FeatureScatterAttack, FeatureScattering
from tfadv.defenses.gaussian import GaussianAugmentation
from tfadv.defenses.ibp import IntervalBoundPropagation
from tfadv.defenses.mart import MART
from tfadv.defenses.mmc import MMC, RandomTargetPGD
from tfadv.defenses.patch_ibp import CertifiedPatchTraining, chiang_mlp
from tfadv.preprocessing import (LocalGradientSmoothing, PreprocessedClassifier,
                                                WatermarkDefense, preprocessed_model,
                                                with_preprocessing)
from tfadv.defenses.pgd_at import PGDAdversarialTraining, StandardTraining
from tfadv.defenses.stability import StabilityTraining
from tfadv.defenses.trades import TRADES

__all__ = ["ALP", "AWP", "BandAblationTraining", "CatastrophicOverfittingMonitor",
           "CertifiedPatchTraining", "Defense", "FeatureScatterAttack", "FeatureScattering",
           "FreeAdversarialTraining", "GaussianAugmentation", "IntervalBoundPropagation",
           "LocalGradientSmoothing", "MART", "MMC", "ModelState", "PGDAdversarialTraining",
           "PreprocessedClassifier", "RandomTargetPGD", "StabilityTraining", "StandardTraining",
           "TRADES", "WatermarkDefense", "band_ablation_model", "chiang_mlp", "levine_mnist_cnn",
           "preprocessed_model", "with_preprocessing"]
