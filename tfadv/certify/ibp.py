"""Interval bound propagation (IBP): sound bounds on a Keras network over an L-inf box.

Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli, "On the Effectiveness
of Interval Bound Propagation for Training Verifiably Robust Models", 2018 (arXiv:1810.12715;
official code deepmind/interval-bound-propagation, ``src/bounds.py``, ``src/specification.py``).

Every input in the box ``[lower, upper]`` (for an image x and radius eps: ``[clip(x - eps, 0,
1), clip(x + eps, 0, 1)]``, the L-inf ball intersected with the image box) is pushed through the
network one layer at a time as an interval per unit, held in center/radius form
(mu, r) = ((u + l) / 2, (u - l) / 2). For an affine layer h -> W h + b (paper, Sec. 3;
official ``IntervalBounds._affine``):

    mu' = W mu + b,    r' = |W| r

which is the exact range of the layer over the input box. A monotone non-decreasing elementwise
activation h (ReLU, sigmoid, tanh, ...) maps the interval ends: l' = h(l), u' = h(u).
Composing these gives bounds that contain the network's output for every input of the box; they
are loose (each layer forgets the correlations between units), which is why IBP works best on
networks trained with it (`tfadv.defenses.IntervalBoundPropagation`).

The last layer is elided into the specification (paper, Sec. 3, "elision of the last layer";
official ``ClassificationSpecification(collapse=True)``): rather than bounding the logits z and
then the margins, the margin z_j - z_y = c^T z with c = e_j - e_y is bounded directly through the
final Dense layer z = W^T h + b:

    upper(z_j - z_y) = (w_j - w_y)^T mu + |w_j - w_y|^T r + b_j - b_y

where (mu, r) is the interval of the penultimate activations h. This is never looser, and usually
much tighter, than upper(z_j) - lower(z_y) computed from separate logit bounds. `worst_case_logits`
returns the vector of these upper bounds with 0 at j = y: the "worst-case logits" whose
cross-entropy with label y is the verified loss (`verified_cross_entropy`). An example is verified
at eps when every upper(z_j - z_y) with j != y is < 0: no input in the box changes the decision.
(The official code counts ``max_j bound_j <= 0``; tfadv uses the strict inequality, so a tie
counts as not verified.)

Supported layers (Keras 3; Functional or Sequential models, nested models included): see
`SUPPORTED_LAYERS`. BatchNormalization uses its moving statistics (inference mode) unless
``batch_statistics`` is given (training: see `logit_bounds`). Dropout-like layers are the identity
(inference). Anything else raises a ValueError naming the layer and its class. All bounds are
computed in float32 from the layers' variables, or from explicit ``values`` (a dict
``id(variable) -> tensor``), so they are differentiable with respect to the weights and run inside
`tf.function`.
"""

import keras
import numpy as np
import tensorflow as tf

from tfadv.checks import check_number
from tfadv.attacks.losses import cross_entropy

# Elementwise activations that are monotone non-decreasing: the interval ends map to the ends.
_MONOTONE_NAMES = ("linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "tanh", "hard_tanh",
                   "elu", "selu", "celu", "softplus", "softsign", "exponential", "leaky_relu",
                   "log_sigmoid", "sparse_plus", "squareplus", "tanh_shrink", "soft_shrink")
_MONOTONE_ACTIVATIONS = {}
for _name in _MONOTONE_NAMES:
    try:
        _MONOTONE_ACTIVATIONS[keras.activations.get(_name)] = _name
    except ValueError:  # not in this Keras version
        pass

_L = keras.layers
_IDENTITY = (_L.InputLayer, _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D,
             _L.SpatialDropout3D, _L.GaussianDropout, _L.GaussianNoise, _L.Identity)
_SHAPE = (_L.Flatten, _L.Reshape, _L.Permute, _L.ZeroPadding1D, _L.ZeroPadding2D,
          _L.Cropping1D, _L.Cropping2D)
_POSITIVE_LINEAR = (_L.AveragePooling1D, _L.AveragePooling2D, _L.GlobalAveragePooling1D,
                    _L.GlobalAveragePooling2D)
_MONOTONE_LAYERS = (_L.MaxPooling1D, _L.MaxPooling2D, _L.GlobalMaxPooling1D,
                    _L.GlobalMaxPooling2D, _L.ReLU, _L.LeakyReLU, _L.ELU, _L.Activation)
_AFFINE = (_L.Dense, _L.Conv1D, _L.Conv2D, _L.Normalization, _L.Rescaling,
           _L.BatchNormalization)
_MERGE = (_L.Add, _L.Subtract, _L.Average, _L.Concatenate, _L.Maximum, _L.Minimum)

#: Layer classes `logit_bounds` can propagate intervals through (plus nested Functional and
#: Sequential models).
SUPPORTED_LAYERS = tuple(sorted(
    {cls.__name__ for cls in _IDENTITY + _SHAPE + _POSITIVE_LINEAR + _MONOTONE_LAYERS + _AFFINE
     + _MERGE} | {"Functional", "Sequential"}))


class Interval:
    """A box ``[center - radius, center + radius]`` of tensors (one interval per unit)."""

    __slots__ = ("center", "radius")

    def __init__(self, center, radius):
        self.center = center
        self.radius = radius

    @classmethod
    def from_bounds(cls, lower, upper):
        """The interval [lower, upper] (elementwise; ``lower <= upper`` is assumed)."""
        lower = tf.cast(lower, tf.float32)
        upper = tf.cast(upper, tf.float32)
        return cls((upper + lower) / 2.0, (upper - lower) / 2.0)

    @property
    def lower(self):
        """The lower ends, center - radius (elementwise)."""
        return self.center - self.radius

    @property
    def upper(self):
        """The upper ends, center + radius (elementwise)."""
        return self.center + self.radius

    def map(self, fn):
        """``fn`` applied to center and radius: exact for maps that are linear with
        non-negative weights (reshapes, average pooling)."""
        return Interval(fn(self.center), fn(self.radius))

    def monotone(self, fn):
        """``[fn(lower), fn(upper)]`` for an elementwise (or max-like) non-decreasing ``fn``."""
        return Interval.from_bounds(fn(self.lower), fn(self.upper))


class _Elided:
    """The interval entering the final Dense layer, kept for the elided specification."""

    __slots__ = ("interval", "layer")

    def __init__(self, interval, layer):
        self.interval = interval
        self.layer = layer


class _Context:
    def __init__(self, values, nominal_rows):
        self.values = values or {}
        self.nominal_rows = nominal_rows  # rows of clean inputs stacked first (batch statistics)

    def value(self, variable):
        if variable is None:
            return None
        value = self.values.get(id(variable))
        if value is None:
            value = variable.value if isinstance(variable, keras.Variable) else variable
        return tf.cast(tf.convert_to_tensor(value), tf.float32)


def _unsupported(layer, why=""):
    return ValueError(
        f"interval bound propagation does not support layer {layer.name!r} of class "
        f"{type(layer).__name__}{why}. Supported: {', '.join(SUPPORTED_LAYERS)}; activations "
        f"(monotone): {', '.join(sorted(set(_MONOTONE_ACTIVATIONS.values())))}.")


def _check_activation(layer, fn):
    if fn is None:
        return
    if fn not in _MONOTONE_ACTIVATIONS:
        raise _unsupported(layer, f" (activation {getattr(fn, '__name__', fn)!r} is not a "
                                  "supported monotone activation)")


def _check_layer(layer):
    """Raises the ValueError of `check_supported` for one layer (not recursing into models)."""
    if isinstance(layer, keras.Model):
        if not isinstance(layer, keras.Sequential) and not hasattr(layer, "_run_through_graph"):
            raise _unsupported(layer, " (a subclassed model: its call is opaque to IBP; build "
                                      "it as a Functional or Sequential model)")
        if not isinstance(layer, keras.Sequential) and (
                len(layer.inputs) != 1 or len(layer.outputs) != 1):
            raise _unsupported(layer, " (IBP needs exactly one input and one output)")
        return
    if not isinstance(layer, _IDENTITY + _SHAPE + _POSITIVE_LINEAR + _MONOTONE_LAYERS + _AFFINE
                      + _MERGE):
        raise _unsupported(layer)
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise _unsupported(layer, " (LoRA-enabled or quantized)")
    if isinstance(layer, (_L.Dense, _L.Conv1D, _L.Conv2D, _L.Activation)):
        _check_activation(layer, layer.activation)
    if isinstance(layer, (_L.ReLU, _L.LeakyReLU)) and float(layer.negative_slope) < 0:
        raise _unsupported(layer, " (negative_slope < 0 is not monotone)")
    if isinstance(layer, _L.ELU) and float(layer.alpha) < 0:
        raise _unsupported(layer, " (alpha < 0 is not monotone)")


def _sublayers(model):
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    return [op for op in getattr(model, "operations", model.layers)
            if not isinstance(op, _L.InputLayer)]


def check_supported(model):
    """Raises a ValueError naming the first layer (and its class) of ``model`` that
    `logit_bounds` cannot propagate an interval through, listing the supported ones."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model; got {type(model).__name__}.")
    _check_layer(model)
    for layer in _sublayers(model):
        if isinstance(layer, keras.Model):
            check_supported(layer)
        elif isinstance(layer, keras.Operation) and not isinstance(layer, keras.layers.Layer):
            raise _unsupported(layer, " (a keras.ops operation in a functional graph)")
        else:
            _check_layer(layer)


def _bias_shape(rank, channel_axis, channels):
    shape = [1] * rank
    shape[channel_axis] = channels
    return shape


def _dense(layer, box, ctx):
    kernel = ctx.value(layer.kernel)
    center = tf.matmul(box.center, kernel)
    if layer.bias is not None:
        center = center + ctx.value(layer.bias)
    return Interval(center, tf.matmul(box.radius, tf.abs(kernel)))


def _conv(layer, box, ctx):
    kernel = ctx.value(layer.kernel)
    center = layer.convolution_op(box.center, kernel)
    if layer.use_bias:
        rank = len(center.shape)
        axis = -1 if layer.data_format == "channels_last" else 1
        center = center + tf.reshape(ctx.value(layer.bias),
                                     _bias_shape(rank, axis, layer.filters))
    return Interval(center, layer.convolution_op(box.radius, tf.abs(kernel)))


def _batch_moments(layer, x, axis):
    """Mean and (biased) variance of ``x`` over all axes but ``axis``, as Keras' BatchNorm in
    training mode; all-reduced over the replicas when the layer is ``synchronized``."""
    reduce_axes = [i for i in range(len(x.shape)) if i != axis]
    context = tf.distribute.get_replica_context()
    if not getattr(layer, "synchronized", False) or context is None:
        return tf.nn.moments(x, reduce_axes, keepdims=True)
    total = tf.reduce_sum(x, reduce_axes, keepdims=True)
    squares = tf.reduce_sum(tf.square(x), reduce_axes, keepdims=True)
    count = tf.cast(tf.size(x), tf.float32) / tf.cast(tf.shape(x)[axis], tf.float32)
    total, squares, count = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [total, squares, tf.reshape(count, [1])])
    mean = total / count
    return mean, tf.maximum(squares / count - tf.square(mean), 0.0)


def _batch_norm(layer, box, ctx):
    rank = len(box.center.shape)
    axis = layer.axis if layer.axis >= 0 else rank + layer.axis
    shape = _bias_shape(rank, axis, box.center.shape[axis])
    if ctx.nominal_rows is not None and layer.trainable:
        # Training mode: the statistics of the clean batch, as the nominal pass uses them
        # (official BatchNormWrapper: the statistics of the most recent connection).
        mean, variance = _batch_moments(layer, box.center[:ctx.nominal_rows], axis)
    else:
        mean = tf.reshape(ctx.value(layer.moving_mean), shape)
        variance = tf.reshape(ctx.value(layer.moving_variance), shape)
    # y = gamma (x - mean) / sqrt(var + epsilon) + beta = w x + b, w of either sign.
    w = tf.math.rsqrt(variance + layer.epsilon)
    if layer.gamma is not None:
        w = w * tf.reshape(ctx.value(layer.gamma), shape)
    b = -w * mean
    if layer.beta is not None:
        b = b + tf.reshape(ctx.value(layer.beta), shape)
    return Interval(w * box.center + b, tf.abs(w) * box.radius)


def _normalization(layer, box, ctx):
    mean = ctx.value(layer.mean)
    scale = tf.maximum(tf.sqrt(ctx.value(layer.variance)), keras.config.epsilon())
    if layer.invert:
        return Interval(mean + box.center * scale, box.radius * scale)
    return Interval((box.center - mean) / scale, box.radius / scale)


def _rescaling(layer, box, ctx):
    scale = tf.cast(tf.convert_to_tensor(layer.scale), tf.float32)
    offset = tf.cast(tf.convert_to_tensor(layer.offset), tf.float32)
    return Interval(box.center * scale + offset, box.radius * tf.abs(scale))


def _activation(fn, box):
    if fn is None or _MONOTONE_ACTIVATIONS.get(fn) == "linear":
        return box
    return box.monotone(fn)


def _merge(layer, boxes):
    if isinstance(layer, _L.Add):
        return Interval(tf.add_n([b.center for b in boxes]), tf.add_n([b.radius for b in boxes]))
    if isinstance(layer, _L.Subtract):
        return Interval(boxes[0].center - boxes[1].center, boxes[0].radius + boxes[1].radius)
    if isinstance(layer, _L.Average):
        n = float(len(boxes))
        return Interval(tf.add_n([b.center for b in boxes]) / n,
                        tf.add_n([b.radius for b in boxes]) / n)
    if isinstance(layer, _L.Concatenate):
        return Interval(layer.call([b.center for b in boxes]),
                        layer.call([b.radius for b in boxes]))
    # Maximum / Minimum: monotone in every argument.
    return Interval.from_bounds(layer.call([b.lower for b in boxes]),
                                layer.call([b.upper for b in boxes]))


def _layer(layer, box, ctx):
    """The interval of ``layer``'s output given its input interval(s) ``box``."""
    if isinstance(layer, keras.Model):
        return _propagate(layer, box, ctx, elide=False)
    _check_layer(layer)
    if isinstance(layer, _MERGE):
        return _merge(layer, list(box))
    if isinstance(box, (list, tuple)):
        raise _unsupported(layer, " (called on several inputs)")
    if isinstance(layer, _IDENTITY):
        return box
    if isinstance(layer, _SHAPE + _POSITIVE_LINEAR):
        # `call`, not `__call__`: no autocasting to a mixed-precision compute dtype.
        return box.map(layer.call)
    if isinstance(layer, _L.Dense):
        return _activation(layer.activation, _dense(layer, box, ctx))
    if isinstance(layer, (_L.Conv1D, _L.Conv2D)):
        return _activation(layer.activation, _conv(layer, box, ctx))
    if isinstance(layer, _L.BatchNormalization):
        return _batch_norm(layer, box, ctx)
    if isinstance(layer, _L.Normalization):
        return _normalization(layer, box, ctx)
    if isinstance(layer, _L.Rescaling):
        return _rescaling(layer, box, ctx)
    # Pooling by max, activation layers: monotone, applied to the interval ends.
    return box.monotone(layer.call)


def _elidable(layer):
    return (isinstance(layer, _L.Dense) and layer.activation in _MONOTONE_ACTIVATIONS
            and _MONOTONE_ACTIVATIONS[layer.activation] == "linear"
            and not getattr(layer, "lora_enabled", False)
            and not getattr(layer, "quantization_mode", None))


def _propagate(model, box, ctx, elide):
    """The output interval of ``model`` (or an `_Elided` before its final linear Dense when
    ``elide``)."""
    _check_layer(model)
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
        last = layers[-1] if layers else None
        if elide and last is not None and _elidable(last):
            for layer in layers[:-1]:
                box = _layer(layer, box, ctx)
            return _Elided(box, last)
        for i, layer in enumerate(layers):
            if elide and i == len(layers) - 1 and isinstance(layer, keras.Model):
                return _propagate(layer, box, ctx, elide=True)
            box = _layer(layer, box, ctx)
        return box

    last = model.outputs[0]._keras_history.operation
    elide_last = elide and len(getattr(last, "_inbound_nodes", ())) == 1

    def call_fn(op, *args, **kwargs):
        if elide_last and op is last:
            if _elidable(op):
                return _Elided(args[0], op)
            if isinstance(op, keras.Model):
                return _propagate(op, args[0], ctx, elide=True)
        if not isinstance(op, keras.layers.Layer):
            raise _unsupported(op, " (a keras.ops operation in a functional graph)")
        return _layer(op, args[0], ctx)

    out = model._run_through_graph(box, operation_fn=lambda op: op, call_fn=call_fn)
    return out[0] if isinstance(out, (list, tuple)) else out


def _start(lower, upper, batch_statistics):
    box = Interval.from_bounds(lower, upper)
    if batch_statistics is None:
        return box, None
    # Stack the clean batch first, with radius 0: every layer maps it exactly, and BatchNorm
    # reads its batch statistics from these rows.
    nominal = tf.cast(batch_statistics, tf.float32)
    rows = tf.shape(nominal)[0]
    return Interval(tf.concat([nominal, box.center], 0),
                    tf.concat([tf.zeros_like(nominal), box.radius], 0)), rows


def _drop_nominal(box, rows):
    return box if rows is None else Interval(box.center[rows:], box.radius[rows:])


def logit_bounds(model, lower, upper, values=None, batch_statistics=None):
    """Interval bounds ``(z_lower, z_upper)`` on ``model``'s outputs over the box
    ``lower <= x <= upper`` (no elision; see `worst_case_logits` for the margins). Layer by
    layer (module docstring), an affine layer maps the interval (mu, r) to (W mu + b, |W| r) and
    a monotone activation h maps its ends, [h(l), h(u)].

    Args:
      model: a Functional or Sequential Keras model built from `SUPPORTED_LAYERS`.
      lower, upper: input tensors of the model's input shape, ``lower <= upper``.
      values: optional dict ``id(variable) -> tensor`` overriding variables (e.g. the weight
        values of a `tfadv.defenses.ModelState`, so gradients flow to them); others are read.
      batch_statistics: optional clean batch x: BatchNorm layers (trainable ones, as Keras runs
        them with ``training=True``) then normalise with the mean and variance of x's
        activations instead of their moving statistics (IBP training, as the official code).

    Returns:
      two float32 tensors, each of the model's output shape.
    """
    box, rows = _start(lower, upper, batch_statistics)
    ctx = _Context(values, rows)
    out = _drop_nominal(_propagate(model, box, ctx, elide=False), rows)
    return out.lower, out.upper


def worst_case_logits(model, lower, upper, labels, values=None, batch_statistics=None):
    """Upper bounds on the margins z_j - z_y over the box, 0 at j = y: the "worst-case logits".

    With the final layer elided into the specification c = e_j - e_y (module docstring):

        v_j = (w_j - w_y)^T mu + |w_j - w_y|^T r + b_j - b_y,    v_y = 0

    where (mu, r) is the interval of the penultimate activations, ``w_j`` the column j of the
    last Dense kernel and y = ``labels``. If the model does not end with a linear Dense layer, the
    margins are bounded from the logit bounds, v_j = upper(z_j) - lower(z_y) (sound, looser).

    Args:
      model, lower, upper, values, batch_statistics: as in `logit_bounds`.
      labels: integer labels of shape (batch,).

    Returns:
      float32 tensor (batch, num_classes). The example is verified when v_j < 0 for all j != y.
    """
    labels = tf.cast(labels, tf.int32)
    box, rows = _start(lower, upper, batch_statistics)
    ctx = _Context(values, rows)
    out = _propagate(model, box, ctx, elide=True)
    if isinstance(out, _Elided):
        penultimate = _drop_nominal(out.interval, rows)
        if len(penultimate.center.shape) != 2:
            raise ValueError(f"the final Dense layer {out.layer.name!r} must receive (batch, "
                             f"features); got rank {len(penultimate.center.shape)}.")
        kernel = ctx.value(out.layer.kernel)                   # (features, classes)
        logits = tf.matmul(penultimate.center, kernel)         # (batch, classes), no bias yet
        if out.layer.bias is not None:
            logits = logits + ctx.value(out.layer.bias)
        true_logit = tf.gather(logits, labels, axis=1, batch_dims=1)
        w_true = tf.gather(tf.transpose(kernel), labels)       # (batch, features)
        diff = tf.abs(kernel[None] - w_true[:, :, None])       # (batch, features, classes)
        spread = tf.einsum("bi,bik->bk", penultimate.radius, diff)
        return logits - true_logit[:, None] + spread
    out = _drop_nominal(out, rows)
    onehot = _is_label(labels, tf.shape(out.center)[-1])
    lower_true = tf.gather(out.lower, labels, axis=1, batch_dims=1)
    return tf.where(onehot, 0.0, out.upper - lower_true[:, None])


def _is_label(labels, num_classes):
    return tf.equal(tf.range(num_classes)[None, :], tf.cast(labels, tf.int32)[:, None])


def input_box(x, eps, clip_min=0.0, clip_max=1.0):
    """``(clip(x - eps, clip_min, clip_max), clip(x + eps, clip_min, clip_max))``: the L-inf
    ball of radius ``eps`` around x intersected with the image box (as the official code)."""
    x = tf.cast(x, tf.float32)
    eps = tf.cast(eps, tf.float32)
    return (tf.clip_by_value(x - eps, clip_min, clip_max),
            tf.clip_by_value(x + eps, clip_min, clip_max))


def verified_cross_entropy(labels, worst_logits):
    """The verified loss of the paper (Sec. 3; official ``Losses._build_verified_loss`` with
    ``xent``): the cross-entropy of the worst-case logits with the true label, per example.
    With v_y = 0 this is log(1 + sum_{j != y} exp(v_j)), the official CE over
    [v_j for j != y, 0] with the appended 0 as the target."""
    return cross_entropy(labels, worst_logits)


def is_verified(worst_logits, labels):
    """True where every upper(z_j - z_y), j != y, is < 0 (bool, per example)."""
    onehot = _is_label(labels, tf.shape(worst_logits)[-1])
    return tf.reduce_all(tf.where(onehot, -1.0, worst_logits) < 0.0, axis=-1)


def verified(model, x, labels, eps, clip_min=0.0, clip_max=1.0):
    """Per-example verification at the L-inf radius ``eps``: True where IBP proves that no
    input of ``[clip(x - eps), clip(x + eps)]`` (clipped to [``clip_min``, ``clip_max``]) changes
    the prediction from ``labels``. Graph-compatible (``eps`` may be a tensor)."""
    lower, upper = input_box(x, eps, clip_min, clip_max)
    return is_verified(worst_case_logits(model, lower, upper, labels), labels)


def _batches(data, batch_size):
    if isinstance(data, tf.data.Dataset):
        for batch in data:
            yield batch[0], batch[1]
        return
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("data must be a tf.data.Dataset of (x, y) batches or a tuple "
                         f"(x, y) of arrays; got {type(data).__name__}.")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length; got {len(x)} and {len(y)}.")
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def verified_accuracy(model, data, eps, batch_size=256, clip_min=0.0, clip_max=1.0,
                      return_mask=False):
    """Fraction of examples IBP verifies at the L-inf radius ``eps`` (see `verified`).

    The box of each image is ``[clip(x - eps, clip_min, clip_max), clip(x + eps, clip_min,
    clip_max)]``: the threat model of the attacks (eps-ball within the image box). A verified
    example is correctly classified and robust, so verified accuracy is a lower bound on the
    accuracy under any attack at ``eps``.

    Args:
      model: a classifier (images -> logits) built from `SUPPORTED_LAYERS`.
      data: a `tf.data.Dataset` of ``(x, y, ...)`` batches, or a tuple ``(x, y)`` of arrays.
      eps: the L-inf radius, >= 0, in the units of x.
      batch_size: batch size for array inputs.
      return_mask: also return the per-example boolean numpy array.
    """
    check_number("eps", eps, 0, strict=False)
    check_number("batch_size", batch_size, 0, strict=True, integer=True)
    if not clip_min < clip_max:
        raise ValueError(f"clip_min must be < clip_max; got {clip_min} and {clip_max}.")
    check_supported(model)
    fn = tf.function(lambda x, y: verified(model, x, y, eps, clip_min, clip_max),
                     reduce_retracing=True, autograph=False)
    masks = []
    for x, y in _batches(data, batch_size):
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"labels must be integer class ids of shape (batch,); got shape "
                             f"{y.shape}.")
        masks.append(np.asarray(fn(tf.convert_to_tensor(x, tf.float32),
                                   tf.convert_to_tensor(y, tf.int32))))
    if not masks:
        raise ValueError("data is empty.")
    mask = np.concatenate(masks)
    accuracy = float(mask.mean())
    return (accuracy, mask) if return_mask else accuracy
