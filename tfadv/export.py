"""Export a classifier as a TensorFlow SavedModel for TF Serving: tfadv's one export path.

`export_saved_model` writes the base classifier (never a defense wrapper or an attack) to
``export_dir/<version>/``, the layout TF Serving polls (it serves the highest integer version).
The SavedModel has one signature, ``serving_default`` (method ``tensorflow/serving/predict``):

- input ``images``: float32, shape (batch, H, W, C), pixel values in [0, 1] -- the scale every
  tfadv model is trained on; normalisation is inside the model, so clients send raw [0, 1]
  floats (not 0..255 integers, not standardised values);
- output ``logits``: float32 (batch, K), the model's decision function as it is (for MMC
  -||z - mu_k||^2, for HE s * cos(theta_k)), the scores attacks are run against;
- output ``probabilities``: float32 (batch, K), softmax of the logits;
- output ``classes``: int64 (batch,), argmax of the logits: the prediction.

The variables are stored once, and where TF Serving looks for them. ``keras.Model.export`` and
``keras.export.ExportArchive`` (Keras 3.15, TensorFlow backend) store every weight twice:
`ExportArchive.track` puts the Keras variables in the saved object graph, and `write_out` adds
the ``tf.Variable`` each of them wraps (collected from the traced endpoint) as separate objects;
both serialize the same tensor, so ``variables/`` is twice the weight bytes (measured: 1.82 MB
for the 0.91 MB digits CNN, 89.5 MB for the 44.7 MB PreAct ResNet-18). Keeping only the Keras
variables is not the fix: the SavedModel then loads with `tf.saved_model.load` but not in a
session (``saved_model_cli run``; TF Serving's C++ ``SavedModelBundle`` also restores into a
session): "Could not find variable logits/kernel". Here a plain `tf.Module` tracks exactly the
``tf.Variable`` objects the traced ``serve`` graph reads, and `tf.saved_model.save` writes it:
each weight once, restorable by both loaders. `_verify` checks both before a version is
published.

A version is written atomically: into a temporary directory ``.tmp-<version>-...`` in
``export_dir`` (TF Serving ignores names that are not integers), checked by reloading it and
comparing its logits with the Keras model's, and then renamed to ``<version>``. A failed export
leaves nothing behind. The export's description (input shape, classes, source model, versions)
is written to ``<version>/assets.extra/export.json``: inside the version, so it moves with it,
and in ``assets.extra``, which TF Serving ignores.
"""

import json
import os
import shutil
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from tfadv.rundir import (  # noqa: F401  (latest_version_dir: re-exported)
    check_logits_model, latest_version_dir, looks_like_probabilities, numeric_versions)

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities", "classes")
METADATA_FILE = os.path.join("assets.extra", "export.json")


# --- the layout ------------------------------------------------------------------------------
def _check_version(version):
    if version is None:
        return
    if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be None (the next free version) or an integer >= 1 "
                         f"(TF Serving versions are positive integers); got {version!r}.")


# --- the model -------------------------------------------------------------------------------
def _base_classifier(model):
    # A defense exports what is deployed: the classifier it wraps.
    if isinstance(getattr(model, "base_model", None), keras.Model):
        model = model.base_model
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model (images in [0, 1] -> logits); got "
                        f"{type(model).__name__}.")
    if any(isinstance(layer, keras.layers.TFSMLayer) for layer in model._flatten_layers()):
        raise ValueError("model wraps a loaded SavedModel (keras.layers.TFSMLayer): it is "
                         "already an export; copy its version directory instead of exporting "
                         "it again.")
    return model


def _image_shape(model, image_shape):
    inputs = getattr(model, "inputs", None)
    if inputs is not None and len(inputs) != 1:
        raise ValueError(f"model must take one input (images); it takes {len(inputs)}.")
    known = getattr(model, "input_shape", None)
    if image_shape is None:
        if not isinstance(known, tuple) or len(known) != 4 or None in known[1:]:
            raise ValueError(f"image_shape must be given as (height, width, channels): the "
                             f"model's input shape is {known!r}.")
        image_shape = known[1:]
    image_shape = tuple(image_shape)
    if (len(image_shape) != 3 or not all(isinstance(d, (int, np.integer)) and d >= 1
                                         for d in image_shape)):
        raise ValueError(f"image_shape must be (height, width, channels), positive integers; "
                         f"got {image_shape!r}.")
    check_logits_model(model, image_shape)
    return tuple(int(d) for d in image_shape)


def _probe(model, image_shape):
    """Logits of a few [0, 1] images: checks the output is (batch, K) logits, not softmax."""
    x = np.random.RandomState(0).rand(4, *image_shape).astype("float32")
    logits = np.asarray(model(x, training=False), dtype="float32")
    if logits.ndim != 2 or logits.shape[0] != len(x) or logits.shape[1] < 2:
        raise ValueError(f"model must output (batch, num_classes) logits; got shape "
                         f"{logits.shape}.")
    if looks_like_probabilities(logits):
        raise ValueError("model outputs probabilities (rows are non-negative and sum to 1), "
                         "but the export serves logits and applies the softmax itself: remove "
                         "the model's final softmax.")
    return x, logits


def weight_bytes(model):
    """Bytes of ``model``'s variables (each counted once): what ``variables/`` should hold."""
    seen, total = set(), 0
    for v in model.variables:
        if id(v) not in seen:
            seen.add(id(v))
            total += int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
    return total


def directory_bytes(path):
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def _serving_module(model, image_shape):
    """A `tf.Module` with the ``serve`` function and the ``tf.Variable`` objects its graph reads
    (each once; see the module docstring)."""

    @tf.function(input_signature=[
        tf.TensorSpec((None, *image_shape), tf.float32, name=INPUT_NAME)])
    def serve(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        return {"logits": logits,
                "probabilities": tf.nn.softmax(logits, axis=-1),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}

    module = tf.Module(name="tfadv_classifier")
    module.serve = serve  # also callable as tf.saved_model.load(path).serve(images)
    module.graph_variables = list(serve.get_concrete_function().variables)
    return module, serve


def _verify(path, x, logits):
    """Reloads the SavedModel at ``path`` with both loaders and compares it with the Keras
    model: `tf.saved_model.load` (TF2, what `tfadv.rundir.load_classifier` uses) and a
    session (the TF1 loader of ``saved_model_cli run``; TF Serving also restores into one)."""
    outputs = tf.saved_model.load(path).signatures[SIGNATURE_KEY](**{INPUT_NAME: x})
    loaded = {"tf.saved_model.load": {k: np.asarray(v) for k, v in outputs.items()}}
    logger, level = tf.get_logger(), tf.get_logger().level
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        logger.setLevel("ERROR")  # the TF1 loader's deprecation notice
        try:
            meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        finally:
            logger.setLevel(level)
        signature = meta.signature_def[SIGNATURE_KEY]
        loaded["session"] = session.run(
            {k: v.name for k, v in signature.outputs.items()},
            {signature.inputs[INPUT_NAME].name: x})
    scale = max(1.0, float(np.abs(logits).max()))
    for loader, got in loaded.items():
        if set(got) != set(OUTPUT_NAMES) or not np.allclose(
                got["logits"], logits, rtol=1e-4, atol=1e-5 * scale):
            raise RuntimeError(f"the SavedModel at {path}, reloaded by {loader}, does not "
                               f"reproduce the Keras model's logits; nothing was exported.")


# --- the export ------------------------------------------------------------------------------
def export_saved_model(model, export_dir, version=None, image_shape=None, source=None,
                       verify=True):
    """Exports ``model`` for TF Serving as ``export_dir/<version>/`` (see module docstring).

    Args:
      model: a Keras classifier mapping images in [0, 1] to logits (a tfadv defense exports its
        base classifier).
      export_dir: the TF Serving base directory of this model (``model_base_path``); created
        when missing.
      version: integer >= 1; default ``None``: one more than the highest existing numeric
        version (1 for a new directory), so TF Serving switches to the new export.
      image_shape: (H, W, C); default the model's input shape.
      source: where the model came from (a path), recorded in ``export.json``.
      verify: reload the written SavedModel and compare its logits with the Keras model's
        before publishing the version.

    Returns:
      the path of the version directory.

    Raises (all but the last before anything is written):
      ValueError: bad ``version`` or ``image_shape``, a model that does not map (batch, H, W, C)
        images to (batch, K) logits, or a model that is already a loaded SavedModel.
      TypeError: ``model`` is not a `keras.Model`.
      FileExistsError: ``export_dir/<version>`` exists.
      NotADirectoryError: ``export_dir`` is a file.
      RuntimeError: the reloaded SavedModel does not reproduce the model (``verify``); the
        temporary directory is removed.
    """
    _check_version(version)
    export_dir = os.fspath(export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise NotADirectoryError(f"export_dir {export_dir!r} is a file; it must be a directory "
                                 f"(TF Serving's model base path).")
    if version is None:
        version = (numeric_versions(export_dir) or [0])[-1] + 1
    final = os.path.join(export_dir, str(int(version)))
    if os.path.exists(final):
        raise FileExistsError(f"version {version} already exists at {final!r}: pass another "
                              f"version, or none for the next free one "
                              f"({(numeric_versions(export_dir) or [0])[-1] + 1}).")
    model = _base_classifier(model)
    image_shape = _image_shape(model, image_shape)
    x, logits = _probe(model, image_shape)

    created_base = not os.path.isdir(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    try:
        os.mkdir(tmp)  # mkdir (unlike mkdtemp) honours the umask: TF Serving must read it
        module, serve = _serving_module(model, image_shape)
        tf.saved_model.save(module, tmp, signatures={SIGNATURE_KEY: serve})
        if verify:
            _verify(tmp, x, logits)
        metadata = {
            "signature": SIGNATURE_KEY,
            "inputs": {INPUT_NAME: {"dtype": "float32", "shape": [None, *image_shape],
                                    "range": [0.0, 1.0]}},
            "outputs": {"logits": {"dtype": "float32", "shape": [None, logits.shape[1]]},
                        "probabilities": {"dtype": "float32",
                                          "shape": [None, logits.shape[1]]},
                        "classes": {"dtype": "int64", "shape": [None]}},
            "num_classes": int(logits.shape[1]),
            "model": model.name,
            "source": None if source is None else os.path.abspath(os.fspath(source)),
            "version": int(version),
            "weight_bytes": weight_bytes(model),
            "export_seconds": round(time.perf_counter() - start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tfadv_version": _tfadv_version(),
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
        }
        os.makedirs(os.path.join(tmp, "assets.extra"))
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            f.write(json.dumps(metadata, indent=2) + "\n")
        try:
            os.rename(tmp, final)  # atomic; fails if another export took the version meanwhile
        except OSError as err:
            raise FileExistsError(f"version {version} appeared at {final!r} during the "
                                  f"export: {err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_base and not os.listdir(export_dir):
            os.rmdir(export_dir)
        raise
    return final


def _tfadv_version():
    import tfadv

    return tfadv.__version__


# --- reading an export back ------------------------------------------------------------------
def signature_info(version_dir, signature_key=SIGNATURE_KEY):
    """The inputs and outputs of a SavedModel's signature, read from ``saved_model.pb`` (what
    TF Serving and ``saved_model_cli show`` see): ``{"method_name": str, "inputs": {name:
    {"dtype", "shape"}}, "outputs": {...}}``, shapes with ``None`` for unknown sizes."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
    if not graphs or signature_key not in graphs[0].signature_def:
        raise ValueError(f"{version_dir!r} has no signature {signature_key!r} under the tag "
                         f"'serve'.")
    signature = graphs[0].signature_def[signature_key]

    def tensors(infos):
        return {name: {"dtype": tf.as_dtype(info.dtype).name,
                       "shape": [None if d.size < 0 else int(d.size)
                                 for d in info.tensor_shape.dim]}
                for name, info in sorted(infos.items())}

    return {"method_name": signature.method_name, "inputs": tensors(signature.inputs),
            "outputs": tensors(signature.outputs)}


def format_signature(info, signature_key=SIGNATURE_KEY):
    """`signature_info` as text, in the manner of ``saved_model_cli show``."""
    lines = [f"signature_def['{signature_key}'] (method {info['method_name']}):"]
    for kind in ("inputs", "outputs"):
        for name, spec in info[kind].items():
            shape = ", ".join("-1" if d is None else str(d) for d in spec["shape"])
            lines.append(f"  {kind}['{name}']: {spec['dtype']} ({shape})")
    return "\n".join(lines)
