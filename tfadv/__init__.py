"""tfadv: adversarially robust image classifiers in TensorFlow / Keras 3.

Modules, one concept each:

- `tfadv.data`: the one input pipeline (digits bundled with scikit-learn, TFDS datasets).
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
"""

__version__ = "0.1.0"
