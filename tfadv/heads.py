"""Classification heads that replace a backbone's final ``Dense('logits')`` layer.

Every head keeps the tfadv model contract: the model maps images in [0, 1] to one score per class,
its output layer is named ``logits``, and the argmax of the output is the model's prediction. So
every tfadv attack (and AutoAttack) attacks exactly the decision function the model predicts with.

MMC: the Max-Mahalanobis center head (`MMCHead`, `mmc_model`).
    Pang, Xu, Dong, Du, Chen, Zhu, "Rethinking Softmax Cross-Entropy Loss for Adversarial
    Robustness", ICLR 2020 (official code: P2333/Max-Mahalanobis-Training, Keras 2.2 / TF 1.9).
    A linear feature layer z = W h + b (``dim`` = D units, after the backbone's features h) is
    compared with L fixed class centres mu_1..mu_L (`mmc_centers`); the head outputs

        f_k(x) = -||z - mu_k||_2^2,    k = 1..L   (the official ``MMLDA_layer``, use_ball=True)

    and predicts the nearest centre, argmax_k f_k(x). The MMC loss ||z - mu_y||^2 = -f_y(x) is in
    `tfadv.defenses.mmc`.

HE: the Hypersphere Embedding head (`HypersphereHead`, `he_model`): logits s * cos(theta_k) with
    normalised features and class weights (Pang et al., NeurIPS 2020); the angular margin is a
    training-loss option of the defenses (``margin=``).
"""

import math
import numbers

import gin
import keras
import numpy as np
from keras import layers, ops

from tfadv import models


def _check_c_mm(c_mm):
    if (not isinstance(c_mm, numbers.Real) or isinstance(c_mm, bool) or not math.isfinite(c_mm)
            or c_mm <= 0):
        raise ValueError(f"c_mm (C_MM, the norm of every centre) must be a finite number > 0; "
                         f"got {c_mm!r}.")


def _check_int(name, value, low):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")


def _check_classes_and_dim(num_classes, dim):
    _check_int("num_classes", num_classes, 2)
    _check_int("dim", dim, 1)
    if dim < num_classes:
        raise ValueError(
            f"the MMC feature dimension dim={dim} must be >= num_classes={num_classes}: the "
            f"closed-form Max-Mahalanobis centres need D >= L (the official code's D < L variant, "
            f"utils/craft_MMLDA_means_whenDlessthanL.py, is an optimisation and is not "
            f"implemented). Use dim >= {num_classes} (the paper uses 256).")


def mmc_centers(num_classes, dim, c_mm=10.0):
    """The Max-Mahalanobis centres mu_1..mu_L in R^D, as a float64 array of shape (L, D).

    Construction (official ``kernel_paras/craft_MMcenters.m``), with L = ``num_classes`` and
    D = ``dim``:

        mu_1 = e_1
        for k = 2..L:   mu_k[j] = -(1/(L-1) + <mu_k, mu_j>) / mu_j[j]   for j = 1..k-1,
                        mu_k[k] = sqrt(|1 - ||mu_k||^2|)

    gives unit vectors with <mu_i, mu_j> = -1/(L-1) for i != j (a regular simplex: the largest
    possible minimum distance between L unit vectors). The official code then multiplies them by
    ``mean_var`` = C_MM (``c_mm``), so ||mu_k|| = C_MM and <mu_i, mu_j> = -C_MM^2/(L-1).

    Raises:
      ValueError: ``c_mm <= 0``, ``num_classes < 2`` or ``dim < num_classes``.
    """
    _check_c_mm(c_mm)
    _check_classes_and_dim(num_classes, dim)
    num_classes, dim = int(num_classes), int(dim)
    mu = np.zeros((num_classes, dim), dtype=np.float64)
    mu[0, 0] = 1.0
    for k in range(1, num_classes):
        for j in range(k):
            mu[k, j] = -(1.0 / (num_classes - 1) + mu[k] @ mu[j]) / mu[j, j]
        mu[k, k] = math.sqrt(abs(1.0 - mu[k] @ mu[k]))
    return float(c_mm) * mu


@keras.saving.register_keras_serializable(package="tfadv")
class MMCHead(layers.Layer):
    """Outputs -||z - mu_k||^2 for every class k: the MMC "logits" (see module docstring).

    The centres are a non-trainable weight ``centers`` of shape (L, D), filled with
    `mmc_centers` (L = ``num_classes``, D = the input's last dimension, ``c_mm`` = C_MM) when the
    layer is built, and saved with the model, so ``keras.models.load_model`` restores them.

    The squared distances are computed as differences (not ||z||^2 - 2<z, mu> + ||mu||^2, which
    loses precision when z is near a centre of norm C_MM) and in float32 whatever the global
    dtype policy: with C_MM = 100 they exceed float16's range.

    Args:
      num_classes: L, the number of classes (>= 2).
      c_mm: C_MM, the norm of every centre (> 0; the paper uses 10 or 100).
    """

    def __init__(self, num_classes, c_mm=10.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        _check_c_mm(c_mm)
        _check_int("num_classes", num_classes, 2)
        self.num_classes = int(num_classes)
        self.c_mm = float(c_mm)

    def build(self, input_shape):
        """Creates the non-trainable ``centers`` (L, D) = `mmc_centers` (L, D, C_MM), D the
        input's last dimension; ValueError when D is unknown or < L."""
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("MMCHead needs a known feature dimension (last input axis).")
        centers = mmc_centers(self.num_classes, int(dim), self.c_mm)
        self.centers = self.add_weight(
            name="centers", shape=centers.shape, trainable=False,
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(centers, dtype=dtype))

    def call(self, z):
        """f_k = -||z - mu_k||^2 for features z of shape (..., D): (..., L) scores,
        the largest for the nearest centre."""
        z = ops.cast(z, self.centers.dtype)
        diff = ops.expand_dims(z, -2) - self.centers  # (..., L, D)
        return -ops.sum(ops.square(diff), axis=-1)

    def compute_output_shape(self, input_shape):
        """``input_shape`` with its last axis (D) replaced by L = ``num_classes``."""
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, c_mm=self.c_mm)
        return config


def find_mmc_head(model):
    """The `MMCHead` producing ``model``'s output (looking into a nested final sub-model), or
    ``None`` when the model does not end in one."""
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, MMCHead):
        return last
    if isinstance(last, keras.Model):
        return find_mmc_head(last)
    return None


def _backbone_features(backbone, input_shape, num_classes):
    """Builds ``backbone`` and returns it with the input of its final ``logits`` layer (the
    features a replacement head is applied to)."""
    if isinstance(backbone, str):
        if backbone not in models.MODELS:
            raise ValueError(f"backbone must be one of {sorted(models.MODELS)} or a model "
                             f"builder; got {backbone!r}.")
        build = models.MODELS[backbone]
    elif callable(backbone):
        build = backbone
    else:
        raise ValueError(f"backbone must be a model name or a builder; got {backbone!r}.")
    if num_classes is None:
        raise ValueError("a head builder needs num_classes (tfadv.train passes the dataset's).")
    base = build(input_shape=input_shape, num_classes=num_classes)
    try:
        features = base.get_layer("logits").input
    except ValueError:
        raise ValueError(f"backbone {getattr(base, 'name', backbone)!r} has no final layer named "
                         f"'logits' to replace by a head.") from None
    return base, features


@gin.configurable
def mmc_model(input_shape=None, num_classes=None, backbone="digits_cnn", dim=256, c_mm=10.0):
    """A tfadv backbone with its ``Dense('logits')`` replaced by the MMC head.

    The backbone (``tfadv.models.MODELS[backbone]``, or a builder ``f(input_shape,
    num_classes)``, configured by its own gin bindings: normalisation, weight decay) is built,
    its final layer ``logits`` is dropped, and its input features h feed

        z = Dense(dim)(h)                    (linear; the official ``final_features``)
        logits = MMCHead(num_classes, c_mm)(z) = -||z - mu_k||^2

    As in the official ``utils/model.py``, z is a ``he_normal``-initialised Dense layer without
    weight decay (the official l2(1e-4) is on convolution kernels only). The output layer is
    named ``logits``, so the result is an ordinary tfadv classifier; use ``train.model =
    @mmc_model`` in gin.

    Args:
      input_shape, num_classes: the data's image shape and L (filled in by `tfadv.train.train`).
      backbone: a `tfadv.models.MODELS` name or a builder; it must end in a layer ``logits``.
      dim: D, the dimension of z (>= num_classes; official: 256 for ResNet-v2, 64 for v1).
      c_mm: C_MM, the norm of the centres (> 0; paper: 10 or 100).

    Raises:
      ValueError: for an unknown backbone, a backbone without a ``logits`` layer, ``c_mm <= 0``
        or ``dim < num_classes`` (all before any weight is built).
    """
    _check_c_mm(c_mm)
    if num_classes is None:
        raise ValueError("mmc_model needs num_classes (tfadv.train passes the dataset's).")
    _check_classes_and_dim(num_classes, dim)
    base, features = _backbone_features(backbone, input_shape, num_classes)
    z = layers.Dense(dim, kernel_initializer="he_normal", name="mmc_features")(features)
    outputs = MMCHead(num_classes, c_mm=c_mm, name="logits")(z)
    return keras.Model(base.inputs, outputs, name=f"mmc_{base.name}")


# --- Hypersphere Embedding ------------------------------------------------------------------

def _unit_columns(initializer):
    def init(shape, dtype=None):
        kernel = keras.initializers.get(initializer)(shape, dtype=dtype)
        return kernel / ops.maximum(ops.norm(kernel, axis=0, keepdims=True), 1e-12)

    return init


@keras.saving.register_keras_serializable(package="tfadv")
class HypersphereHead(layers.Layer):
    """Hypersphere Embedding head: logits s * cos(theta_k) (Pang et al. 2020).

    Pang, Yang, Dong, Xu, Zhu, Su, "Boosting Adversarial Training with Hypersphere Embedding",
    NeurIPS 2020 (official code: ShawnXYang/AT_HE, ``models/wideresnet.py`` with
    ``use_FNandWN=True``). Feature normalisation (FN) and weight normalisation (WN) without bias:

        cos(theta_k) = <h / ||h||, W_k>,   ||W_k|| = 1,   logits_k = s * cos(theta_k)

    with h the backbone's features, W_k the weight column of class k and s = ``scale``. FN is a
    differentiable L2 normalisation. The official WN overwrites the weight rows with their
    normalised values before each forward pass (a projection, not a differentiable
    reparametrisation); tfadv does the same with a unit-norm initialisation and a
    `keras.constraints.UnitNorm` constraint, which the optimizer applies after every update, so
    the forward pass always sees unit columns and the gradient is the official one.

    The angular margin m is a training-loss matter only (``margin=`` of the defenses, see
    `tfadv.defenses.Defense.classification_loss`); the model outputs s * cos(theta), which is
    what it predicts with and what attacks see.

    Args:
      num_classes: number of classes.
      scale: s (> 0). Official recipes: PGD-AT+HE 10, TRADES+HE 15, ALP+HE 20.
    """

    def __init__(self, num_classes, scale=15.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        _check_int("num_classes", num_classes, 2)
        if (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
                or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale (s) must be a finite number > 0; got {scale!r}.")
        self.num_classes = int(num_classes)
        self.scale = float(scale)

    def build(self, input_shape):
        """Creates the trainable (D, L) ``kernel`` W, D the input's last dimension, with
        unit-norm columns W_k (unit-norm initialisation, `keras.constraints.UnitNorm` after
        every optimizer update)."""
        self.kernel = self.add_weight(
            name="kernel", shape=(int(input_shape[-1]), self.num_classes),
            initializer=_unit_columns("glorot_uniform"),
            constraint=keras.constraints.UnitNorm(axis=0))

    def call(self, features):
        """logits_k = s * <h / ||h||, W_k> = s * cos(theta_k) for features h of shape
        (..., D) (norm floored at 1e-12): (..., L), in [-s, s]."""
        features = ops.cast(features, self.kernel.dtype)
        unit = features / ops.maximum(ops.norm(features, axis=-1, keepdims=True), 1e-12)
        return self.scale * ops.matmul(unit, self.kernel)

    def compute_output_shape(self, input_shape):
        """``input_shape`` with its last axis (D) replaced by L = ``num_classes``."""
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, scale=self.scale)
        return config


@gin.configurable
def he_model(input_shape=None, num_classes=None, backbone="digits_cnn", scale=15.0):
    """A tfadv backbone with its ``Dense('logits')`` replaced by a `HypersphereHead` (named
    ``logits``): gin ``train.model = @he_model``, with ``margin=`` on the defense.

    Args:
      input_shape, num_classes: the data's image shape and class count (from `tfadv.train`).
      backbone: a `tfadv.models.MODELS` name or a builder ending in a layer ``logits``.
      scale: s of the head (> 0).
    """
    base, features = _backbone_features(backbone, input_shape, num_classes)
    outputs = HypersphereHead(num_classes, scale=scale, name="logits")(features)
    return keras.Model(base.inputs, outputs, name=f"he_{base.name}")
