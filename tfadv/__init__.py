"""tfadv: adversarially robust image classifiers in TensorFlow / Keras 3.

One call each (`tfadv.api`; loaded on first use, so ``import tfadv`` does not import TensorFlow):

- ``tfadv.evaluate(model, x, y, eps=..., input_range=(0, 1))``: the headline robust accuracy
  (worst case with AutoAttack) and its verdict, for arrays, datasets, paths, any input range.
- ``tfadv.attack(model, x, y, 'pgd20', eps=...)``: adversarial images in the input's range.

Modules, one concept each:

- `tfadv.data`: the one input pipeline (digits bundled with scikit-learn, TFDS datasets, your own
  npz files and image folders, any TFDS dataset).
- `tfadv.models`: model builders; input normalization lives inside every model.
- `tfadv.attacks`: the one PGD loop (FGSM is its one-step case) and the one projection.
- `tfadv.defenses`: defenses as `keras.Model` subclasses overriding `train_step`.
- `tfadv.heads`: classification heads (Max-Mahalanobis centres, hypersphere embedding).
- `tfadv.sinkhorn`: log-domain Sinkhorn (optimal transport) for Feature Scattering.
- `tfadv.pseudo_label`: pseudo-labels for robust self-training.
- `tfadv.checkpoint`: atomic per-epoch checkpoints with resume; robust early stopping.
- `tfadv.evaluation`: clean and robust accuracy of a classifier on a dataset.
- `tfadv.certify`: certified robustness: randomized smoothing and interval bound propagation.
- `tfadv.export`: the one SavedModel export for TF Serving.
- `tfadv.tensorboard`: adversarial examples, margins and the robustness curve in TensorBoard.
- `tfadv.train`: the gin-configurable training driver behind `bin/train`.
- `tfadv.api`: the one-call Python API above.
"""

__version__ = "0.1.0"

_LAZY = {"evaluate": "tfadv.api", "attack": "tfadv.api"}  # name -> module, imported on first use


def __getattr__(name):
    """``tfadv.evaluate`` and ``tfadv.attack``, imported from `tfadv.api` on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfadv' has no attribute {name!r}")


def __dir__():
    """The module's names, the lazy ones included."""
    return sorted([*globals(), *_LAZY])
