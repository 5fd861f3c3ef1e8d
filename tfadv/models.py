"""Model builders. Every model maps images in [0, 1] to logits.

Input normalization (``mean``, ``std`` per channel, in [0, 1] units) is the model's first layer, so
attacks and threat models always live in [0, 1] pixel space whatever the architecture expects.
The ``logits`` layer computes in float32 (``dtype="float32"``) whatever the global Keras dtype
policy: under ``mixed_float16`` / ``mixed_bfloat16`` (``train.precision``) the body runs in half
precision and the logits, which every loss and attack reads, stay float32 (the Keras mixed
precision guide's advice for the last layer; float16 logits overflow above 65504).
``weight_decay`` follows the PyTorch convention of the papers' code (the gradient of the penalty is
``weight_decay * w``), i.e. an L2 kernel regularizer of ``weight_decay / 2`` on conv and dense
kernels (not on biases or BatchNorm parameters; PyTorch's ``weight_decay`` also decays those).
BatchNorm uses momentum 0.9 and epsilon 1e-5, PyTorch's defaults.

Builders, by name (`build_model`):

- ``digits_cnn``: a small CNN for the 8x8 scikit-learn digits (tfadv's own design).
- ``madry_mnist_cnn``: Madry et al. MNIST challenge model: conv5x5x32, pool, conv5x5x64, pool,
  fc1024, fc10.
- ``small_cnn``: TRADES' SmallCNN: four 3x3 convs (32, 32, 64, 64) with two max-pools, fc 200-200
  with dropout 0.5, last layer initialised to zero.
- ``preact_resnet18``: PreAct ResNet-18 (He et al. 2016), as in Rice et al. and AWP.
- ``gowal_cnn``: Gowal et al.'s (2018) IBP CNNs, 'small', 'medium' and 'large'.
- ``wide_resnet``: WideResNet-depth-width (Zagoruyko & Komodakis 2016) as in TRADES / RST / AWP:
  WRN-34-10 is ``depth=34, width=10``, WRN-28-10 is ``depth=28, width=10``.
"""

import gin
import keras
import numpy as np
from keras import layers


def _normalize(inputs, mean, std):
    mean = np.asarray(mean, dtype="float32")
    std = np.asarray(std, dtype="float32")
    if np.any(std <= 0):
        raise ValueError(f"std must be > 0 per channel; got {std.tolist()}.")
    if np.all(mean == 0) and np.all(std == 1):
        return inputs
    return layers.Normalization(mean=mean, variance=np.square(std), name="normalize")(inputs)


def _regularizer(weight_decay):
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}.")
    return keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None


def _check_io(input_shape, num_classes):
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels); got {input_shape}.")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    return input_shape, int(num_classes)


def _bn(name=None):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


@gin.configurable
def digits_cnn(input_shape=(8, 8, 1), num_classes=10, mean=0.0, std=1.0, weight_decay=0.0):
    """conv3x3x32, conv3x3x64, max-pool, conv3x3x128, max-pool, fc 256, fc ``num_classes``
    (ReLU, same padding, no BatchNorm): tfadv's small CNN for the 8x8 digits.

    Args (the same for every builder here):
      input_shape: (height, width, channels) of the images.
      num_classes: number of classes (>= 2).
      mean, std: per-channel input normalisation, in [0, 1] pixel units (a scalar or one value
        per channel; std > 0); the model's first layer, skipped for mean 0, std 1.
      weight_decay: PyTorch-style weight decay on conv and dense kernels (an L2 regularizer of
        weight_decay / 2; module docstring), >= 0.

    Returns:
      a `keras.Model` from (batch, *input_shape) images in [0, 1] to (batch, num_classes)
      float32 logits; the output layer is named ``logits``.
    """
    input_shape, num_classes = _check_io(input_shape, num_classes)
    reg = _regularizer(weight_decay)
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", kernel_regularizer=reg)(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", kernel_regularizer=reg)(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", kernel_regularizer=reg)(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu", kernel_regularizer=reg)(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits",
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


@gin.configurable
def madry_mnist_cnn(input_shape=(28, 28, 1), num_classes=10, mean=0.0, std=1.0,
                    weight_decay=0.0):
    """Madry et al. (2018) MNIST challenge CNN (mnist_challenge/model.py): conv5x5x32, max-pool,
    conv5x5x64, max-pool, fc 1024, fc ``num_classes`` (ReLU, same padding). Arguments and output
    as `digits_cnn`."""
    input_shape, num_classes = _check_io(input_shape, num_classes)
    reg = _regularizer(weight_decay)
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    x = layers.Conv2D(32, 5, padding="same", activation="relu", kernel_regularizer=reg)(x)
    x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu", kernel_regularizer=reg)(x)
    x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu", kernel_regularizer=reg)(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits",
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name="madry_mnist_cnn")


@gin.configurable
def small_cnn(input_shape=(28, 28, 1), num_classes=10, mean=0.0, std=1.0, weight_decay=0.0,
              dropout=0.5):
    """TRADES' SmallCNN (TRADES/models/small_cnn.py): valid 3x3 convs (32, 32, max-pool, 64,
    64, max-pool), fc 200, dropout, fc 200, zero-initialised fc ``num_classes``. Arguments and
    output as `digits_cnn`, plus ``dropout`` (the rate, official 0.5); images must be at least
    16x16."""
    input_shape, num_classes = _check_io(input_shape, num_classes)
    if min(input_shape[:2]) < 16:
        raise ValueError(f"small_cnn needs images of at least 16x16 (four valid 3x3 convs and "
                         f"two pools); got input_shape {input_shape}.")
    reg = _regularizer(weight_decay)
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    for i, filters in enumerate((32, 32, 64, 64)):
        x = layers.Conv2D(filters, 3, activation="relu", kernel_regularizer=reg)(x)
        if i % 2 == 1:
            x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(200, activation="relu", kernel_regularizer=reg)(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(200, activation="relu", kernel_regularizer=reg)(x)
    outputs = layers.Dense(num_classes, kernel_initializer="zeros", kernel_regularizer=reg,
                           name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _preact_block(x, filters, stride, reg, name):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, projection shortcut taken
    from the pre-activated input when the shape changes."""
    out = layers.ReLU()(_bn(f"{name}_bn1")(x))
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                 kernel_regularizer=reg, name=f"{name}_shortcut")(out)
    out = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                        kernel_regularizer=reg, name=f"{name}_conv1")(out)
    out = layers.ReLU()(_bn(f"{name}_bn2")(out))
    out = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                        name=f"{name}_conv2")(out)
    return layers.Add()([out, shortcut])


@gin.configurable
def preact_resnet18(input_shape=(32, 32, 3), num_classes=10, mean=0.0, std=1.0,
                    weight_decay=0.0):
    """PreAct ResNet-18 (He et al. 2016; the model of Rice et al. and AWP): a 3x3 stem, stages
    of 2 pre-activation blocks at widths 64/128/256/512 with strides 1/2/2/2, BN-ReLU, global
    average pooling, fc ``num_classes``. Arguments and output as `digits_cnn`."""
    input_shape, num_classes = _check_io(input_shape, num_classes)
    reg = _regularizer(weight_decay)
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    x = layers.Conv2D(64, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                      name="stem")(x)
    for stage, (filters, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
        for block in range(2):
            x = _preact_block(x, filters, stride if block == 0 else 1, reg,
                              f"stage{stage + 1}_block{block + 1}")
    x = layers.ReLU()(_bn("final_bn")(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits",
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name="preact_resnet18")


def _wide_block(x, filters, stride, reg, name):
    """WRN basic block as in the TRADES/RST code: BN-ReLU shared by the conv path and, when the
    shape changes, the 1x1 projection shortcut."""
    pre = layers.ReLU()(_bn(f"{name}_bn1")(x))
    equal = x.shape[-1] == filters and stride == 1
    shortcut = x if equal else layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                             kernel_regularizer=reg,
                                             name=f"{name}_shortcut")(pre)
    out = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                        kernel_regularizer=reg, name=f"{name}_conv1")(pre)
    out = layers.ReLU()(_bn(f"{name}_bn2")(out))
    out = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                        name=f"{name}_conv2")(out)
    return layers.Add()([out, shortcut])


@gin.configurable
def wide_resnet(input_shape=(32, 32, 3), num_classes=10, depth=34, width=10, mean=0.0, std=1.0,
                weight_decay=0.0):
    """WideResNet-``depth``-``width`` (Zagoruyko & Komodakis 2016, as in TRADES / RST / AWP):
    a 3x3 stem of 16, three stages of (depth - 4) / 6 blocks at widths 16k/32k/64k (k =
    ``width``) with strides 1/2/2, BN-ReLU, global average pooling, fc ``num_classes``.
    ``depth`` is 6n + 4 >= 10 (WRN-34-10: depth 34, width 10). Other arguments and output as
    `digits_cnn`."""
    input_shape, num_classes = _check_io(input_shape, num_classes)
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be an integer 6n + 4 >= 10 (e.g. 28, 34); got {depth!r}.")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1; got {width!r}.")
    reg = _regularizer(weight_decay)
    blocks = (depth - 4) // 6
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                      name="stem")(x)
    for stage, (filters, stride) in enumerate(((16 * width, 1), (32 * width, 2),
                                               (64 * width, 2))):
        for block in range(blocks):
            x = _wide_block(x, filters, stride if block == 0 else 1, reg,
                            f"stage{stage + 1}_block{block + 1}")
    x = layers.ReLU()(_bn("final_bn")(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits",
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"wide_resnet_{depth}_{width}")


_GOWAL_SIZES = {
    # (filters, kernel, stride) of the 'SAME'/'VALID' convs, then the hidden fc widths
    # (official examples/train.py `layers(model_size)`).
    "small": ("valid", [(16, 4, 2), (32, 4, 1)], [100]),
    "medium": ("valid", [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512]),
    "large": ("same", [(64, 3, 1), (64, 3, 1), (128, 3, 2), (128, 3, 1), (128, 3, 1)], [512]),
}


@gin.configurable
def gowal_cnn(input_shape=(28, 28, 1), num_classes=10, size="large", mean=0.0, std=1.0,
              weight_decay=0.0):
    """The CNNs of Gowal et al. (2018) (official ``examples/train.py``), ReLU after every conv
    and hidden fc layer, no BatchNorm. ``size``: 'small' (conv4x4x16 s2, conv4x4x32, fc100),
    'medium' (conv 32, 32 s2, 64, 64 s2, fc512, fc512; valid padding) or 'large' (conv3x3 64,
    64, 128 s2, 128, 128, same padding, fc512: the paper's best MNIST/CIFAR-10 model).
    ``mean``, ``std``: per-channel normalisation as the first layer (official CIFAR-10). Other
    arguments and output as `digits_cnn`."""
    input_shape, num_classes = _check_io(input_shape, num_classes)
    if size not in _GOWAL_SIZES:
        raise ValueError(f"size must be one of {sorted(_GOWAL_SIZES)}; got {size!r}.")
    reg = _regularizer(weight_decay)
    padding, convs, hidden = _GOWAL_SIZES[size]
    inputs = keras.Input(input_shape, name="images")
    x = _normalize(inputs, mean, std)
    for filters, kernel, stride in convs:
        x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, activation="relu",
                          kernel_regularizer=reg)(x)
    x = layers.Flatten()(x)
    for width in hidden:
        x = layers.Dense(width, activation="relu", kernel_regularizer=reg)(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits",
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"gowal_cnn_{size}")


MODELS = {
    "digits_cnn": digits_cnn,
    "madry_mnist_cnn": madry_mnist_cnn,
    "small_cnn": small_cnn,
    "preact_resnet18": preact_resnet18,
    "wide_resnet": wide_resnet,
    "gowal_cnn": gowal_cnn,
}


@gin.configurable
def build_model(name="digits_cnn", input_shape=None, num_classes=None):
    """Builds the model called ``name`` (a key of `MODELS`) for images of ``input_shape``
    (H, W, C) and ``num_classes`` classes (`tfadv.train` passes the dataset's); the builder's
    other arguments come from its own gin bindings. Raises ValueError for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}; got {name!r}.")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)


def transfer_weights(source, target):
    """Copies every weight of ``source`` into ``target`` except the classification head.

    Adversarial pre-training and fine-tuning (Hendrycks, Lee, Mazeika, "Using Pre-Training Can
    Improve Model Robustness and Uncertainty", ICML 2019; official ``tune.py``): the pre-trained
    network is loaded, its last (fully connected) layer is replaced by a fresh one for the new
    class count, and all layers are then fine-tuned. Layers with weights are matched in order
    (both models come from the same builder); the last such layer is the head and keeps
    ``target``'s fresh initialisation. BatchNorm statistics are copied with the other weights.

    Raises:
      ValueError listing every mismatched layer or weight shape other than the head's.
    """
    src = [layer for layer in source.layers if layer.weights]
    dst = [layer for layer in target.layers if layer.weights]
    if len(src) != len(dst):
        raise ValueError(
            f"source and target models differ in structure: {len(src)} vs {len(dst)} layers "
            f"with weights ({[l.name for l in src]} vs {[l.name for l in dst]}).")
    mismatched = []
    for s, d in zip(src[:-1], dst[:-1]):
        if len(s.weights) != len(d.weights):
            mismatched.append(f"{d.name}: {len(s.weights)} weights in the source, "
                              f"{len(d.weights)} in the target")
            continue
        for ws, wd in zip(s.weights, d.weights):
            if tuple(ws.shape) != tuple(wd.shape):
                mismatched.append(f"{d.name}/{wd.name}: source {tuple(ws.shape)}, target "
                                  f"{tuple(wd.shape)}")
    if mismatched:
        raise ValueError("cannot transfer weights; mismatched shapes outside the head:\n  "
                         + "\n  ".join(mismatched))
    for s, d in zip(src[:-1], dst[:-1]):
        for ws, wd in zip(s.weights, d.weights):
            wd.assign(ws)
    return dst[-1].name
