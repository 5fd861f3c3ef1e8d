"""Export a classifier as a TensorFlow SavedModel for TF Serving: tfadv's one export path.

`export_saved_model` writes the base classifier (never a defense wrapper or an attack) to
``export_dir/<version>/``, the layout TF Serving polls (it serves the highest integer version).
Three signatures (method ``tensorflow/serving/predict``) take the same images in three
encodings, and none of them turns a misused input into a prediction:

- ``serving_default``, input ``images``: float32 (batch, H, W, C), pixel values in [0, 1] --
  the scale every tfadv model is trained and attacked on (normalisation is inside the model).
  Checked in the graph: a NaN or Inf, a value outside [0, 1] (beyond ``RANGE_TOLERANCE``; e.g.
  0..255 values) or another shape fails the request with InvalidArgumentError (TF Serving: HTTP
  400 ``{"error": "assertion failed: ..."}``, gRPC status INVALID_ARGUMENT), never a prediction.
- ``serving_uint8``, input ``images``: uint8 (batch, H, W, C), 0..255, divided by 255 in the
  graph (every uint8 value is valid; the shape is checked). A REST integer outside 0..255
  arrives wrapped modulo 256 (TensorFlow's TensorProto parsing: 300 -> 44, -1 -> 255), which
  no graph can see.
- ``serving_image_bytes``, input ``image_bytes``: string (batch,), each a PNG or JPEG file
  (whatever `tf.io.decode_image` reads), decoded to the model's C channels and divided by 255.
  The name ends in ``_bytes``, TF Serving's REST convention for binary data, sent as
  ``{"b64": "<base64>"}``. An image of another height or width is an error, not resized: a
  resized image is not the input whose robustness was measured. Only for C in (1, 3, 4), the
  channel counts an image file can be decoded to.

Every signature has the outputs ``logits`` (float32 (batch, K), the model's decision function
as it is: for MMC -||z - mu_k||^2, for HE s * cos(theta_k)), ``probabilities`` (their softmax)
and ``classes`` (int64 (batch,), their argmax: the prediction). The SavedModel also has
``classify_unchecked`` (``tf.saved_model.load(path).classify_unchecked(images)``), the same
outputs for any float32 images without the checks, for library code that feeds images outside
[0, 1] on purpose (randomized smoothing's Gaussian noise); it is not a signature, so TF Serving
never exposes it.

The variables are stored once, and where TF Serving looks for them. ``keras.Model.export`` and
``keras.export.ExportArchive`` (Keras 3.15, TensorFlow backend) store every weight twice:
`ExportArchive.track` puts the Keras variables in the saved object graph, and `write_out` adds
the ``tf.Variable`` each of them wraps (collected from the traced endpoint) as separate objects;
both serialize the same tensor (sizes: BUILD.md, "Serving"). Keeping only the Keras variables is
not the fix: the SavedModel then loads with `tf.saved_model.load` but not in a session
(``saved_model_cli run``; TF Serving's C++ ``SavedModelBundle`` also restores into a session):
"Could not find variable logits/kernel". Here a plain `tf.Module` tracks exactly the
``tf.Variable`` objects the traced graph reads, and `tf.saved_model.save` writes it: each weight
once, restorable by both loaders.

A version is written atomically: into a temporary directory ``.tmp-<version>-...`` in
``export_dir`` (TF Serving ignores names that are not integers), checked by `_verify` (every
signature, in both loaders, against the Keras model's logits, and an out-of-range input must be
refused), and then renamed to ``<version>``. A failed export leaves nothing behind. The export's
description (signatures, classes, source model, versions) is written to
``<version>/assets.extra/export.json``: inside the version, so it moves with it, and in
``assets.extra``, which TF Serving ignores.
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

SIGNATURE_KEY = "serving_default"  # float32 images in [0, 1], checked
UINT8_SIGNATURE_KEY = "serving_uint8"  # uint8 images, 0..255
BYTES_SIGNATURE_KEY = "serving_image_bytes"  # PNG or JPEG files
INPUT_NAME = "images"  # the input of serving_default and serving_uint8
BYTES_INPUT_NAME = "image_bytes"  # the input of serving_image_bytes (REST: {"b64": ...})
OUTPUT_NAMES = ("logits", "probabilities", "classes")
UNCHECKED_FUNCTION = "classify_unchecked"  # not a signature: library use only
RANGE_TOLERANCE = 1e-6  # serving_default accepts values in [-1e-6, 1 + 1e-6] (float rounding)
DECODABLE_CHANNELS = (1, 3, 4)  # what tf.io.decode_image can convert an image file to
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
    """A few [0, 1] images (multiples of 1/255, exact in every signature's encoding) and their
    logits: checks the output is (batch, K) logits, not softmax."""
    pixels = np.random.RandomState(0).randint(0, 256, (4, *image_shape))
    x = pixels.astype("float32") / np.float32(255.0)
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


def _checked_unit_images(images, image_shape):
    """``images`` (float32) with in-graph checks in front of it: shape (batch, *image_shape),
    every value finite and in [0, 1] up to `RANGE_TOLERANCE`; a failed check raises
    InvalidArgumentError when the graph runs (in TF Serving too)."""
    images = tf.ensure_shape(images, (None, *image_shape))
    non_finite = tf.math.count_nonzero(tf.logical_not(tf.math.is_finite(images)))
    finite_check = tf.debugging.Assert(tf.equal(non_finite, 0), [
        f"{SIGNATURE_KEY}: {INPUT_NAME} must be finite float32 pixel values in [0, 1]; "
        f"NaN or Inf values in this request:", non_finite], name="check_finite")
    with tf.control_dependencies([finite_check]):
        lowest, highest = tf.reduce_min(images), tf.reduce_max(images)  # +-inf when empty
        range_check = tf.debugging.Assert(tf.logical_and(
            lowest >= -RANGE_TOLERANCE, highest <= 1.0 + RANGE_TOLERANCE), [
            f"{SIGNATURE_KEY}: {INPUT_NAME} must be float32 pixel values in [0, 1] (pixel / "
            f"255); for 0..255 integers use the signature {UINT8_SIGNATURE_KEY}, for image "
            f"files {BYTES_SIGNATURE_KEY}. This request has min", lowest, "max", highest],
            name="check_range")
    with tf.control_dependencies([range_check]):
        return tf.identity(images)


def _decode_image(data, image_shape):
    """One image file (a scalar string) as uint8 (H, W, C); a file that is not an image, or an
    image of another height or width, raises InvalidArgumentError (never resized)."""
    height, width, channels = image_shape
    image = tf.io.decode_image(data, channels=channels, dtype=tf.uint8,
                               expand_animations=False)
    size = tf.shape(image)[:2]
    size_check = tf.debugging.Assert(tf.reduce_all(tf.equal(size, [height, width])), [
        f"{BYTES_SIGNATURE_KEY}: an image in {BYTES_INPUT_NAME} has height", size[0],
        "and width", size[1], f"but the model takes {height} x {width} pixels; images are not "
        f"resized (a resized image is not the input whose robustness was measured): resize "
        f"it before sending."], name="check_size")
    with tf.control_dependencies([size_check]):
        image = tf.identity(image)
    # set_shape, not tf.ensure_shape: with an EnsureShape here, its generic message came
    # before the Assert's (observed on TF 2.21).
    image.set_shape(image_shape)
    return image


def _unit_pixels(pixels):
    """uint8 ``pixels`` as float32 ``k / 255``, exactly numpy's ``np.float32(k) / 255``: looked up
    in a 256-entry table, because Grappler rewrites a graph's division by a constant into a
    multiplication by its reciprocal, which differs in the last bit."""
    table = tf.constant(np.arange(256, dtype=np.float32) / np.float32(255.0))
    return tf.gather(table, tf.cast(pixels, tf.int32))


def _serving_module(model, image_shape):
    """A `tf.Module` with the serving functions (see the module docstring) and the
    ``tf.Variable`` objects their graphs read (each once); returns ``(module, signatures)``,
    the ``signatures`` argument of `tf.saved_model.save`."""
    batch = (None, *image_shape)

    @tf.function(input_signature=[tf.TensorSpec(batch, tf.float32, name=INPUT_NAME)])
    def classify_unchecked(images):
        # An empty batch skips the model: TF 2.21's oneDNN convolution fails on zero images on
        # some CPUs ("input depth must be evenly divisible by filter depth").
        num_classes = int(model.output_shape[-1])
        logits = tf.cond(tf.shape(images)[0] > 0,
                         lambda: tf.cast(model(images, training=False), tf.float32),
                         lambda: tf.zeros([0, num_classes], tf.float32))
        return {"logits": logits,
                "probabilities": tf.nn.softmax(logits, axis=-1),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}

    @tf.function(input_signature=[tf.TensorSpec(batch, tf.float32, name=INPUT_NAME)])
    def serve(images):
        return classify_unchecked(_checked_unit_images(images, image_shape))

    @tf.function(input_signature=[tf.TensorSpec(batch, tf.uint8, name=INPUT_NAME)])
    def serve_uint8(images):
        images = tf.ensure_shape(images, batch)
        return classify_unchecked(_unit_pixels(images))

    module = tf.Module(name="tfadv_classifier")
    setattr(module, UNCHECKED_FUNCTION, classify_unchecked)
    module.serve = serve  # also callable as tf.saved_model.load(path).serve(images)
    module.serve_uint8 = serve_uint8
    module.graph_variables = list(classify_unchecked.get_concrete_function().variables)
    signatures = {SIGNATURE_KEY: serve, UINT8_SIGNATURE_KEY: serve_uint8}
    if image_shape[-1] in DECODABLE_CHANNELS:
        @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT_NAME)])
        def serve_image_bytes(image_bytes):
            images = tf.map_fn(lambda data: _decode_image(data, image_shape),
                               tf.ensure_shape(image_bytes, (None,)),
                               fn_output_signature=tf.TensorSpec(image_shape, tf.uint8))
            return classify_unchecked(_unit_pixels(images))

        module.serve_image_bytes = serve_image_bytes
        signatures[BYTES_SIGNATURE_KEY] = serve_image_bytes
    return module, signatures


def _signature_inputs(x, keys):
    """The probe images ``x`` (values k / 255) in the encoding of each signature in ``keys``:
    ``{key: {input name: array}}``; uint8 of the rounded pixels, PNG files of those."""
    pixels = np.round(x * 255.0).astype(np.uint8)
    encode = {
        SIGNATURE_KEY: lambda: {INPUT_NAME: x},
        UINT8_SIGNATURE_KEY: lambda: {INPUT_NAME: pixels},
        BYTES_SIGNATURE_KEY: lambda: {BYTES_INPUT_NAME: np.array(
            [tf.io.encode_png(image).numpy() for image in pixels], dtype=object)}}
    return {key: encode[key]() for key in keys}


def _verify(path, x, logits):
    """Reloads the SavedModel at ``path`` with both loaders and compares every signature with
    the Keras model: `tf.saved_model.load` (TF2, what `tfadv.rundir.load_classifier` uses) and
    a session (the TF1 loader of ``saved_model_cli run``; TF Serving also restores into one).
    ``x`` are images whose values are multiples of 1/255, so that the float, uint8 and PNG
    encodings hold the same pixels, and ``logits`` the Keras model's for them. Each loader's
    ``serving_default`` must also refuse the same images in 0..255 (``255 * x``)."""
    refuse = "0..255 floats"  # a pseudo signature key: serving_default fed 255 * x
    loaded = tf.saved_model.load(path)
    keys = sorted(loaded.signatures.keys())
    feeds = _signature_inputs(x, keys)
    feeds[refuse] = {INPUT_NAME: 255.0 * x}

    def attempt(call):
        try:
            return {k: np.asarray(v) for k, v in call().items()}
        except tf.errors.InvalidArgumentError as err:
            return err

    got = {}
    for key, inputs in feeds.items():
        signature = loaded.signatures[SIGNATURE_KEY if key == refuse else key]
        got["tf.saved_model.load", key] = attempt(
            lambda: signature(**{name: tf.constant(v) for name, v in inputs.items()}))
    logger, level = tf.get_logger(), tf.get_logger().level
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        logger.setLevel("ERROR")  # the TF1 loader's deprecation notice
        try:
            meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        finally:
            logger.setLevel(level)
        for key, inputs in feeds.items():
            signature = meta.signature_def[SIGNATURE_KEY if key == refuse else key]
            got["session", key] = attempt(lambda: session.run(
                {k: v.name for k, v in signature.outputs.items()},
                {signature.inputs[name].name: v for name, v in inputs.items()}))
    scale = max(1.0, float(np.abs(logits).max()))
    for (loader, key), outputs in got.items():
        if key == refuse:
            if not isinstance(outputs, tf.errors.InvalidArgumentError):
                raise RuntimeError(f"the SavedModel at {path}, reloaded by {loader}, predicts "
                                   f"for 0..255 float images in {SIGNATURE_KEY} instead of "
                                   f"refusing them; nothing was exported.")
        elif not isinstance(outputs, dict):
            raise RuntimeError(f"the SavedModel at {path}, reloaded by {loader}, refuses valid "
                               f"images in its signature {key} ({outputs.message.strip()}); "
                               f"nothing was exported.")
        elif set(outputs) != set(OUTPUT_NAMES) or not np.allclose(
                outputs["logits"], logits, rtol=1e-4, atol=1e-5 * scale):
            raise RuntimeError(f"the SavedModel at {path}, reloaded by {loader}, does not "
                               f"reproduce the Keras model's logits in its signature {key}; "
                               f"nothing was exported.")


# --- the export ------------------------------------------------------------------------------
def export_saved_model(model, export_dir, version=None, image_shape=None, source=None,
                       verify=True):
    """Exports ``model`` for TF Serving as ``export_dir/<version>/`` with the signatures
    ``serving_default`` (float32 in [0, 1], checked), ``serving_uint8`` and
    ``serving_image_bytes`` (see the module docstring).

    Args:
      model: a Keras classifier mapping images in [0, 1] to logits (a tfadv defense exports its
        base classifier).
      export_dir: the TF Serving base directory of this model (``model_base_path``); created
        when missing.
      version: integer >= 1; default ``None``: one more than the highest existing numeric
        version (1 for a new directory), so TF Serving switches to the new export.
      image_shape: (H, W, C); default the model's input shape.
      source: where the model came from (a path), recorded in ``export.json``.
      verify: reload the written SavedModel (`tf.saved_model.load` and a TF1 session) before
        publishing the version: every signature must reproduce the Keras model's logits and
        ``serving_default`` must refuse 0..255 float images.

    Returns:
      the path of the version directory.

    Raises (all but the last before anything is written):
      ValueError: bad ``version`` or ``image_shape``, a model that does not map (batch, H, W, C)
        images to (batch, K) logits, or a model that is already a loaded SavedModel.
      TypeError: ``model`` is not a `keras.Model`.
      FileExistsError: ``export_dir/<version>`` exists.
      NotADirectoryError: ``export_dir`` is a file.
      RuntimeError: the reloaded SavedModel does not reproduce the model, or does not refuse
        out-of-range images (``verify``); the temporary directory is removed.
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
        module, signatures = _serving_module(model, image_shape)
        tf.saved_model.save(module, tmp, signatures=signatures)
        if verify:
            _verify(tmp, x, logits)
        metadata = {
            "signatures": _describe_signatures(image_shape, signatures),
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


def _describe_signatures(image_shape, signatures):
    """What each signature takes, for ``export.json``."""
    height, width, channels = image_shape
    batch = [None, *image_shape]
    described = {
        SIGNATURE_KEY: {INPUT_NAME: {
            "dtype": "float32", "shape": batch, "range": [0.0, 1.0],
            "range_tolerance": RANGE_TOLERANCE,
            "checked": "shape, finite, range: an error (InvalidArgumentError), never a "
                       "prediction"}},
        UINT8_SIGNATURE_KEY: {INPUT_NAME: {
            "dtype": "uint8", "shape": batch, "range": [0, 255], "scaled": "x / 255"}},
        BYTES_SIGNATURE_KEY: {BYTES_INPUT_NAME: {
            "dtype": "string", "shape": [None],
            "format": f"PNG or JPEG files of {height} x {width} pixels (other sizes are an "
                      f"error, never resized), decoded to {channels} channel(s), x / 255",
            "rest": {"b64": "<base64 of the file>"}}},
    }
    return {key: {"inputs": described[key]} for key in signatures}


def _tfadv_version():
    import tfadv

    return tfadv.__version__


# --- reading an export back ------------------------------------------------------------------
def signature_info(version_dir):
    """The serving signatures of a SavedModel, read from ``saved_model.pb`` (what TF Serving and
    ``saved_model_cli show`` see): ``{key: {"method_name": str, "inputs": {name: {"dtype",
    "shape"}}, "outputs": {...}}}``, shapes with ``None`` for unknown sizes, ``serving_default``
    first, then the others by name."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
    if not graphs or SIGNATURE_KEY not in graphs[0].signature_def:
        raise ValueError(f"{version_dir!r} has no signature {SIGNATURE_KEY!r} under the tag "
                         f"'serve'.")

    def tensors(infos):
        return {name: {"dtype": tf.as_dtype(info.dtype).name,
                       "shape": [None if d.size < 0 else int(d.size)
                                 for d in info.tensor_shape.dim]}
                for name, info in sorted(infos.items())}

    definitions = graphs[0].signature_def
    keys = sorted((k for k in definitions if not k.startswith("__")),  # __saved_model_init_op
                  key=lambda k: (k != SIGNATURE_KEY, k))
    return {key: {"method_name": definitions[key].method_name,
                  "inputs": tensors(definitions[key].inputs),
                  "outputs": tensors(definitions[key].outputs)} for key in keys}


_INPUT_NOTES = {SIGNATURE_KEY: "pixel / 255 in [0, 1]; NaN, Inf, out of range or another "
                               "shape: an error",
                UINT8_SIGNATURE_KEY: "pixels 0..255",
                BYTES_SIGNATURE_KEY: "PNG or JPEG files of the model's size (REST: "
                                     "{\"b64\": ...})"}


def format_signature(info):
    """`signature_info` as text, one block per signature in the manner of ``saved_model_cli
    show``, each input followed by what it takes."""
    lines = []
    for key, signature in info.items():
        lines.append(f"signature_def['{key}'] (method {signature['method_name']}):")
        for kind in ("inputs", "outputs"):
            for name, spec in signature[kind].items():
                shape = ", ".join("-1" if d is None else str(d) for d in spec["shape"])
                note = f"  # {_INPUT_NOTES[key]}" if kind == "inputs" and key in _INPUT_NOTES \
                    else ""
                lines.append(f"  {kind}['{name}']: {spec['dtype']} ({shape}){note}")
    return "\n".join(lines)
