"""BPDA: attacking through layers that block or break the input gradient.

Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018,
Sec. 4.1 (Backward Pass Differentiable Approximation). A layer g that is not differentiable, or
whose gradient is zero almost everywhere (quantisation, rounding, JPEG, a ``tf.stop_gradient``
pre-processing step), is kept on the forward pass and replaced on the backward pass by a
differentiable approximation; when g(x) ~ x the approximation is the identity, the
"straight-through" estimator:

    forward:  g(x)            backward:  d g(x) / dx := I     (x + stop_gradient(g(x) - x))

`find_gradient_blockers` finds such layers in a Keras model by measuring each shape-preserving
layer's vector-Jacobian product on real inputs (a layer whose product is zero or missing for
every example blocks the gradient); a layer can also declare itself with a class or instance
attribute ``non_differentiable = True`` and may supply its own approximation as a method
``bpda_approximation(x)`` (differentiable, same output shape). `bpda_model` returns a model with
the same forward pass and those layers' backward passes replaced, to be attacked by any
gradient attack; the attack's output is then judged on the original model.
"""

import keras
import numpy as np
import tensorflow as tf


def _is_marked(layer):
    return bool(getattr(layer, "non_differentiable", False))


def _top_level_layers(model):
    return [layer for layer in getattr(model, "layers", [])
            if not isinstance(layer, keras.layers.InputLayer)]


def _received_inputs(model):
    """``(inputs, {id(layer): tensor})``: the tensor each layer of the functional ``model``
    receives, in a copy of its graph (same layers) built on new inputs; ``None`` for a model
    that cannot be rebuilt so (a Sequential model). ``layer.input`` is the tensor of a layer's
    FIRST call, which belongs to another model when the layer is shared (e.g. a classifier
    rebuilt behind a rescaling layer by `tfadv.evaluate`); this graph is the model's own."""
    received = {}

    def call(layer, *args, **kwargs):
        received.setdefault(id(layer), args[0] if len(args) == 1 else None)
        return layer(*args, **kwargs)

    try:
        copy = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                        call_function=call)
    except Exception:  # noqa: BLE001 (Keras raises several types for models it cannot rebuild)
        return None
    return copy.inputs, received


def find_gradient_blockers(model, x):
    """The top-level layers of the functional ``model`` that block the input gradient on ``x``.

    A layer is a blocker when it is marked ``non_differentiable`` or when it maps a tensor to
    one of the same shape and its vector-Jacobian product with a random direction is missing or
    zero for every example of ``x``. Returns a list of layers (empty for models that are not
    functional graphs of layers, e.g. subclassed models)."""
    layers = _top_level_layers(model)
    if not layers or not isinstance(getattr(model, "inputs", None), list):
        return []
    x = tf.convert_to_tensor(np.asarray(x, "float32"))
    graph = _received_inputs(model)
    blockers = []
    for layer in layers:
        if _is_marked(layer):
            blockers.append(layer)
            continue
        try:
            inputs, layer_input = ((graph[0], graph[1].get(id(layer))) if graph is not None
                                   else (model.inputs, layer.input))
        except (AttributeError, ValueError):  # shared layer or not in the graph
            continue
        if layer_input is None or isinstance(layer_input, (list, tuple, dict)):
            continue
        try:
            probe = keras.Model(inputs, layer_input)
            inner = tf.convert_to_tensor(probe(x, training=False))
            with tf.GradientTape() as tape:
                tape.watch(inner)
                out = layer(inner, training=False)
                if isinstance(out, (list, tuple, dict)) or tuple(out.shape) != tuple(
                        inner.shape):
                    continue
                direction = tf.random.stateless_normal(tf.shape(out), seed=[0, 1],
                                                       dtype=out.dtype)
                objective = tf.reduce_sum(out * direction)
            vjp = tape.gradient(objective, inner)
        except (TypeError, ValueError):  # layers that cannot be probed in isolation
            continue
        if vjp is None:
            blockers.append(layer)
            continue
        per_example = tf.reduce_max(tf.abs(tf.reshape(vjp, [tf.shape(vjp)[0], -1])), axis=1)
        if bool(tf.reduce_all(per_example < 1e-12)):
            blockers.append(layer)
    return blockers


class StraightThrough(keras.layers.Layer):
    """``layer`` on the forward pass; on the backward pass the gradient of
    ``layer.bpda_approximation`` when the layer has one, else the identity."""

    def __init__(self, layer, **kwargs):
        super().__init__(name=f"bpda_{layer.name}", **kwargs)
        self.inner = layer

    def call(self, x, training=None, mask=None):
        """``inner(x)`` forward; backward through the approximation (straight-through:
        ``surrogate + stop_gradient(inner(x) - surrogate)``)."""
        y = self.inner(x, training=training)
        approx = getattr(self.inner, "bpda_approximation", None)
        surrogate = approx(x) if callable(approx) else tf.cast(x, y.dtype)
        return surrogate + tf.stop_gradient(y - surrogate)

    def compute_output_shape(self, input_shape):
        """The input shape: the wrapped layer preserves it (`find_gradient_blockers` only picks
        shape-preserving layers)."""
        return input_shape


def bpda_model(model, layers):
    """A model with ``model``'s forward pass (and weights, shared) whose ``layers`` have the
    straight-through backward pass of `StraightThrough`. Raises ValueError when ``layers`` is
    empty or the model cannot be rebuilt (a subclassed model)."""
    targets = {id(layer) for layer in layers}
    if not targets:
        raise ValueError("bpda_model needs at least one layer to replace.")

    def clone(layer):
        return StraightThrough(layer) if id(layer) in targets else layer

    try:
        return keras.models.clone_model(model, clone_function=clone)
    except Exception as error:  # noqa: BLE001 (Keras raises several types here)
        raise ValueError(f"cannot rebuild {model.name!r} with BPDA layers: {error}") from error


def marked_layers(model):
    """The top-level layers of ``model`` that declare themselves non-differentiable (attribute
    ``non_differentiable = True``: e.g. local gradient smoothing, inpainting, band-vote
    smoothing); `tfadv.evaluation` attacks them with BPDA even when their gradients look fine,
    since a gradient that exists can still mislead (Athalye et al. 2018, Sec. 4.1)."""
    return [layer for layer in _top_level_layers(model) if _is_marked(layer)]
