"""tfadv.export and bin/export: the TF Serving SavedModel, read back by every loader there is."""

import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, dataset_arrays
from tfadv import config, evaluation, export, heads

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return env


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _finish(proc, timeout=600):
    """Waits for ``proc`` (once; later calls reuse the result); returns its stdout."""
    if not hasattr(proc, "tfadv_output"):
        proc.tfadv_output = proc.communicate(timeout=timeout)
    out, err = proc.tfadv_output
    assert proc.returncode == 0, f"{proc.args[:3]} failed:\n{err[-3000:]}"
    return out


def _keras_outputs(model, x):
    logits = np.asarray(model(x, training=False))
    return {"logits": logits, "probabilities": np.asarray(tf.nn.softmax(logits)),
            "classes": logits.argmax(-1)}


def _assert_matches(got, want, atol=1e-5):
    assert set(got) == {"logits", "probabilities", "classes"}
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    assert got["classes"].dtype == np.int64
    np.testing.assert_array_equal(got["classes"], want["classes"])


@pytest.fixture(scope="module")
def test_images(digits):
    x, y = dataset_arrays(digits.test)
    return x[:64], y[:64]


@pytest.fixture(scope="module")
def exported(trained_digits_model, tmp_path_factory):
    return export.export_saved_model(trained_digits_model,
                                     tmp_path_factory.mktemp("serving") / "digits")


# --- read back in fresh processes -------------------------------------------------------------
# Each fresh process pays a TensorFlow import (~9 s of CPU), so they all start together, early
# (the first test below requests them), and run while the in-process tests do; the tests at the
# end of the file check their results.
FRESH = """
import glob, json, os, runpy, sys, numpy as np, tensorflow as tf
version_dir, work, evaluate = sys.argv[1:4]
signatures = tf.saved_model.load(version_dir).signatures
def run(key, **inputs):
    return {k: v.numpy() for k, v in signatures[key](**inputs).items()}
x, u = np.load(os.path.join(work, "x.npy")), np.load(os.path.join(work, "u.npy"))
pngs = [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(work, "png", "*.png")))]
outputs = {"float": run("serving_default", images=tf.constant(x)),
           "float_of_u": run("serving_default", images=tf.constant(np.load(
               os.path.join(work, "u_over_255.npy")))),
           "uint8": run("serving_uint8", images=tf.constant(u)),
           "png": run("serving_image_bytes", image_bytes=tf.constant(pngs))}
np.savez(os.path.join(work, "fresh.npz"),
         **{f"{case}.{k}": v for case, out in outputs.items() for k, v in out.items()})
refused = {}
for case, images in np.load(os.path.join(work, "misuse.npz")).items():
    try:
        refused[case] = {"predicted": run("serving_default", images=tf.constant(images))[
            "classes"].tolist()}
    except Exception as err:  # noqa: BLE001  (the test names the expected class)
        refused[case] = {"error": type(err).__name__, "message": str(err)}
json.dump(refused, open(os.path.join(work, "refused.json"), "w"))
# bin/evaluate on the export, in this same fresh process (one TensorFlow import for all).
sys.argv = [evaluate, *sys.argv[4:]]
try:
    runpy.run_path(evaluate, run_name="__main__")
except SystemExit as exit:
    if exit.code not in (None, 0):
        raise
"""


def _misuse(x):
    """Float images that serving_default must refuse, each a batch of valid images but for one
    value or the shape: ``{case: float32 array}``."""
    nan, scale = x[:4].copy(), x[:4].copy()
    nan[2, 3, 4, 0] = np.nan  # one NaN in a batch of four
    scale[1, 0, 0, 0] = 255.0  # one pixel on the 0..255 scale
    return {"nan": nan, "inf": np.where(x[:2] > 0.5, np.inf, x[:2]).astype("float32"),
            "255": scale, "0..255": np.round(x[:4] * 255.0),  # the whole batch misscaled
            "negative": x[:4] - 0.5,
            "wrong_size": np.zeros((2, 16, 16, 1), "float32"),
            "wrong_channels": np.zeros((2, 8, 8, 3), "float32"),
            "no_batch": x[0]}


def _literal(array):
    """``array`` as a Python literal (saved_model_cli's --input_exprs evaluates literals only)."""
    return repr(array.tolist())


@pytest.fixture(scope="module")
def pixels():
    """Random uint8 digits-shaped images; the first two hold 0..63 and 192..255 for certain."""
    u = np.random.RandomState(5).randint(0, 256, (16, 8, 8, 1)).astype("uint8")
    u[0, :, :, 0] = np.arange(64).reshape(8, 8)  # the extremes and a ramp, for certain
    u[1, :, :, 0] = 255 - np.arange(64).reshape(8, 8)
    return u


@pytest.fixture(scope="module")
def processes(exported, trained_digits_model, test_images, pixels, tmp_path_factory):
    """Starts saved_model_cli show and run (serving_uint8), a fresh tf.saved_model.load of
    every signature followed by bin/evaluate on the export, and bin/export on a model_dir;
    yields ``(Popen dict, work directory)``."""
    from PIL import Image  # an encoder independent of TensorFlow's

    x, _ = test_images
    work = tmp_path_factory.mktemp("fresh")
    np.save(work / "x.npy", x)
    np.save(work / "u.npy", pixels)
    np.save(work / "u_over_255.npy", pixels.astype("float32") / np.float32(255.0))
    np.savez(work / "misuse.npz", **_misuse(x))
    (work / "png").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image[:, :, 0]).save(work / "png" / f"{i:03d}.png")
    (work / "run").mkdir()
    trained_digits_model.save(work / "run" / "model.keras")
    which = ["--dir", exported, "--tag_set", "serve", "--signature_def"]
    procs = {
        "show": _start([SAVED_MODEL_CLI, "show", "--dir", exported, "--all"]),
        # One run, of serving_uint8 (each saved_model_cli costs a TensorFlow import); the
        # session path of every signature is also checked by every export (`_verify`).
        "run": _start([SAVED_MODEL_CLI, "run", *which, "serving_uint8", "--input_exprs",
                       f"images={_literal(pixels[:4])}", "--outdir", str(work / "cli")]),
        "fresh": _start([sys.executable, "-c", FRESH, exported, str(work),
                         os.path.join(ROOT, "bin", "evaluate"),
                         f"--model={exported}", "--eps=0.3", "--attacks=fgsm", "--sanity=false",
                         "--max_examples=20", f"--output_dir={work / 'eval'}"]),
        "export": _start([sys.executable, os.path.join(ROOT, "bin", "export"),
                          f"--model={work / 'run'}"]),
    }
    yield procs, work
    for proc in procs.values():  # a test failed before waiting for it
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.usefixtures("processes")  # start the fresh processes now (checked at the end)
def test_signatures_and_metadata(exported, trained_digits_model):
    outputs = {"classes": {"dtype": "int64", "shape": [None]},
               "logits": {"dtype": "float32", "shape": [None, 10]},
               "probabilities": {"dtype": "float32", "shape": [None, 10]}}
    info = export.signature_info(exported)
    assert list(info) == ["serving_default", "serving_image_bytes", "serving_uint8"]
    assert info == {key: {"method_name": "tensorflow/serving/predict", "inputs": inputs,
                          "outputs": outputs} for key, inputs in [
        ("serving_default", {"images": {"dtype": "float32", "shape": [None, 8, 8, 1]}}),
        ("serving_image_bytes", {"image_bytes": {"dtype": "string", "shape": [None]}}),
        ("serving_uint8", {"images": {"dtype": "uint8", "shape": [None, 8, 8, 1]}})]}
    text = export.format_signature(info)
    for line in ["signature_def['serving_default'] (method tensorflow/serving/predict):",
                 "  inputs['images']: float32 (-1, 8, 8, 1)  # pixel / 255 in [0, 1]",
                 "signature_def['serving_uint8'] (method tensorflow/serving/predict):",
                 "  inputs['images']: uint8 (-1, 8, 8, 1)  # pixels 0..255",
                 "signature_def['serving_image_bytes'] (method tensorflow/serving/predict):",
                 "  inputs['image_bytes']: string (-1)  # PNG or JPEG"]:
        assert line in text, (line, text)
    assert text.count("outputs['probabilities']: float32 (-1, 10)") == 3
    meta = json.loads(open(os.path.join(exported, "assets.extra", "export.json")).read())
    assert meta["num_classes"] == 10 and meta["version"] == 1
    assert list(meta["signatures"]) == ["serving_default", "serving_uint8",
                                        "serving_image_bytes"]
    assert meta["signatures"]["serving_default"]["inputs"]["images"]["range"] == [0.0, 1.0]
    assert meta["signatures"]["serving_uint8"]["inputs"]["images"]["dtype"] == "uint8"
    assert "8 x 8 pixels" in meta["signatures"]["serving_image_bytes"]["inputs"][
        "image_bytes"]["format"]
    assert meta["outputs"] == {k: outputs[k] for k in ("logits", "probabilities", "classes")}
    assert meta["weight_bytes"] == export.weight_bytes(trained_digits_model)
    assert meta["tensorflow_version"] == tf.__version__ and meta["model"] == "digits_cnn"


def test_load_classifier_reads_the_export(exported, trained_digits_model, test_images):
    x, _ = test_images
    want = np.asarray(trained_digits_model(x))
    # The base directory means its highest version (a version directory itself: bin/evaluate
    # below).
    loaded = evaluation.load_classifier(os.path.dirname(exported))
    np.testing.assert_allclose(np.asarray(loaded(x)), want, rtol=1e-5, atol=1e-5)


# --- size --------------------------------------------------------------------------------------
def test_variables_are_stored_once(exported, trained_digits_model, tmp_path):
    weights = export.weight_bytes(trained_digits_model)
    assert weights == sum(w.nbytes for w in trained_digits_model.get_weights())
    ours = export.directory_bytes(os.path.join(exported, "variables"))
    assert weights <= ours <= 1.2 * weights, (ours, weights)
    # The same measure catches a doubled export: Keras' own model.export stores each weight
    # twice (the reason tfadv.export does not use it; see tfadv/export.py).
    trained_digits_model.export(str(tmp_path / "keras"), verbose=False)
    doubled = export.directory_bytes(str(tmp_path / "keras" / "variables"))
    assert doubled > 1.2 * weights, (doubled, weights)


# --- heads: the real decision function -----------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: heads.mmc_model((8, 8, 1), 10, backbone="digits_cnn", dim=16, c_mm=100.0),
    lambda: heads.he_model(input_shape=(8, 8, 1), num_classes=10, scale=15.0),
], ids=["MMC", "HE"])
def test_mmc_and_he_export_their_decision_function(build, test_images, tmp_path):
    keras.utils.set_random_seed(3)
    model = build()
    x, _ = test_images
    want = _keras_outputs(model, x)
    path = export.export_saved_model(model, tmp_path / "serving")
    got = tf.saved_model.load(path).signatures["serving_default"](images=x)
    got = {k: v.numpy() for k, v in got.items()}
    scale = float(np.abs(want["logits"]).max())
    _assert_matches(got, want, atol=1e-5 * max(1.0, scale))
    if model.name.startswith("mmc"):  # -||z - mu_k||^2, not the features z
        assert np.all(got["logits"] <= 0) and scale > 1.0
    else:  # s * cos(theta_k)
        assert np.all(np.abs(got["logits"]) <= 15.0 + 1e-4)
    assert len(np.unique(want["classes"])) > 1  # a real comparison, not a constant


# --- the three encodings, and misuse --------------------------------------------------------------
def _encode(image, fmt, **kwargs):
    """One uint8 (H, W, C) image as a PNG or JPEG file's bytes, written by Pillow."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(
        buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _refusal(call):
    """The InvalidArgumentError message of ``call()``; fails the test if it predicts."""
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        call()
    return err.value.message


def test_image_bytes_jpeg_sizes_and_garbage(exported):
    signatures = tf.saved_model.load(exported).signatures
    serve, from_bytes = signatures["serving_default"], signatures["serving_image_bytes"]
    # A JPEG of flat grey decodes to that grey exactly (only the DC coefficient), and an RGB
    # file is converted to the model's one channel.
    gray = np.full((8, 8, 1), 200, np.uint8)
    files = [_encode(gray, "JPEG", quality=95), _encode(np.repeat(gray, 3, -1), "PNG")]
    got = from_bytes(image_bytes=tf.constant(files))
    want = serve(images=tf.constant(np.stack([gray, gray]).astype("float32") / 255.0))
    np.testing.assert_array_equal(got["logits"], want["logits"])
    assert got["classes"].shape == (2,)
    # An image of another size is refused, not resized; so is a file that is no image.
    message = _refusal(lambda: from_bytes(image_bytes=tf.constant(
        [files[0], _encode(np.zeros((16, 8, 1), np.uint8), "PNG")])))
    assert re.search(r"has height\] \[16\] \[and width\] \[8\] \[but the model takes 8 x 8 "
                     r"pixels; images are not resized", message), message
    message = _refusal(lambda: from_bytes(image_bytes=tf.constant([b"not an image"])))
    assert "Unknown image file format" in message
    empty = from_bytes(image_bytes=tf.constant([], tf.string))
    assert empty["logits"].shape == (0, 10) and empty["classes"].shape == (0,)


def test_classify_unchecked_takes_any_float_images(exported, trained_digits_model,
                                                   test_images):
    # Library code (randomized smoothing) feeds noisy images outside [0, 1]: the SavedModel's
    # classify_unchecked, not a signature, takes them (the endpoint rundir.load_classifier
    # should use); serving_default refuses them.
    x, _ = test_images
    noisy = x[:8] + np.random.RandomState(0).normal(0, 0.5, x[:8].shape).astype("float32")
    want = _keras_outputs(trained_digits_model, noisy)
    loaded = tf.saved_model.load(exported)
    got = {k: v.numpy() for k, v in loaded.classify_unchecked(tf.constant(noisy)).items()}
    _assert_matches(got, want)
    assert "classify_unchecked" not in loaded.signatures
    message = _refusal(lambda: loaded.signatures["serving_default"](images=noisy))
    assert "must be float32 pixel values in [0, 1]" in message
    layer = keras.layers.TFSMLayer(exported, call_endpoint="classify_unchecked")
    images = tf.constant(noisy)
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = layer(images)["logits"]
        first = logits[:, 0]
    np.testing.assert_allclose(logits.numpy(), want["logits"], rtol=1e-5, atol=1e-5)
    assert np.abs(tape.gradient(first, images).numpy()).max() > 0  # attacks can run on it


def test_rgb_and_two_channel_models(tmp_path):
    keras.utils.set_random_seed(4)

    def model(channels):
        return keras.Sequential([keras.Input((6, 5, channels)), keras.layers.Conv2D(3, 3),
                                 keras.layers.Flatten(), keras.layers.Dense(4)])

    rgb = model(3)
    path = export.export_saved_model(rgb, tmp_path / "rgb")  # verified: every signature
    pixels = np.random.RandomState(1).randint(0, 256, (3, 6, 5, 3)).astype("uint8")
    got = tf.saved_model.load(path).signatures["serving_image_bytes"](
        image_bytes=tf.constant([_encode(image, "PNG") for image in pixels]))
    want = np.asarray(rgb(pixels.astype("float32") / np.float32(255.0)))
    np.testing.assert_allclose(got["logits"].numpy(), want, rtol=1e-5, atol=1e-6)
    # Image files decode to 1, 3 or 4 channels: a 2-channel model has no bytes signature.
    path = export.export_saved_model(model(2), tmp_path / "two", verify=False)
    assert list(export.signature_info(path)) == ["serving_default", "serving_uint8"]


def test_an_export_that_does_not_refuse_misuse_is_not_published(trained_digits_model,
                                                                tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_checked_unit_images", lambda images, shape: images)
    with pytest.raises(RuntimeError, match="reloaded by tf.saved_model.load, predicts for "
                                           "0..255 float images in serving_default"):
        export.export_saved_model(trained_digits_model, tmp_path / "unchecked")
    assert not (tmp_path / "unchecked").exists()


# --- layout, versions, errors ----------------------------------------------------------------
def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def test_versions_are_numbered_and_never_overwritten(trained_digits_model, tmp_path):
    base = tmp_path / "digits"
    first = export.export_saved_model(trained_digits_model, base, verify=False)
    second = export.export_saved_model(trained_digits_model, base, verify=False)
    assert (first, second) == (str(base / "1"), str(base / "2"))
    assert export.latest_version_dir(str(base)) == second
    with pytest.raises(FileExistsError, match="version 1 already exists.*next free one \\(3\\)"):
        export.export_saved_model(trained_digits_model, base, version=1)
    assert sorted(os.listdir(base)) == ["1", "2"]  # untouched, no temporary directory left
    (base / "7").mkdir()  # a numeric directory without a SavedModel: never served...
    (base / "notes").mkdir()  # ...and a non-numeric one, never a version
    assert export.latest_version_dir(str(base)) == second
    assert export.export_saved_model(trained_digits_model, base, verify=False) == str(base / "8")
    assert export.latest_version_dir(str(base)) == str(base / "8")
    assert sorted(os.listdir(base)) == ["1", "2", "7", "8", "notes"]


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True])
def test_bad_version_is_an_error_before_any_work(trained_digits_model, tmp_path, version):
    with pytest.raises(ValueError, match="version must be None .* or an integer >= 1"):
        export.export_saved_model(trained_digits_model, tmp_path / "digits", version=version)
    assert not (tmp_path / "digits").exists()


def test_bad_models_and_paths_are_errors_before_any_work(trained_digits_model, tmp_path):
    base = tmp_path / "digits"
    softmax = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match="outputs probabilities"):
        export.export_saved_model(softmax, base)
    features = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match=r"must output \(batch, num_classes\) logits"):
        export.export_saved_model(features, base)
    with pytest.raises(ValueError, match=r"dataset images have shape \(28, 28, 1\)"):
        export.export_saved_model(trained_digits_model, base, image_shape=(28, 28, 1))
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        export.export_saved_model(lambda x: x, base)
    assert not base.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="export_dir .* is a file"):
        export.export_saved_model(trained_digits_model, tmp_path / "file")
    reloaded = evaluation.load_classifier(
        export.export_saved_model(trained_digits_model, base, verify=False))
    with pytest.raises(ValueError, match="already an export"):
        export.export_saved_model(reloaded, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_failed_export_leaves_nothing_behind(trained_digits_model, tmp_path, monkeypatch):
    def broken(path, x, logits):
        assert os.path.exists(os.path.join(path, "saved_model.pb"))  # failed after writing
        raise RuntimeError("simulated failure after the SavedModel was written")

    monkeypatch.setattr(export, "_verify", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export.export_saved_model(trained_digits_model, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # the base directory it created is gone too
    base = tmp_path / "digits"
    export.export_saved_model(trained_digits_model, base, verify=False)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export.export_saved_model(trained_digits_model, base)
    assert os.listdir(base) == ["1"] and not _leftovers(base)


def test_a_defense_exports_its_base_classifier(trained_digits_model, tmp_path):
    from tfadv.defenses import StandardTraining

    path = export.export_saved_model(StandardTraining(trained_digits_model), tmp_path / "d",
                                     version=3)
    assert path == str(tmp_path / "d" / "3")
    assert (export.directory_bytes(os.path.join(path, "variables"))
            <= 1.2 * export.weight_bytes(trained_digits_model))
    meta = json.loads(open(os.path.join(path, export.METADATA_FILE)).read())
    assert meta["model"] == trained_digits_model.name


# --- training with export_dir ----------------------------------------------------------------
def test_train_exports_the_final_model(tmp_path):
    config.parse(["standard.gin"], [
        "train.epochs = 1", "train.verbose = 0", "train.eval_attacks = {}",
        "train.validation_freq = 2",  # no validation in a one-epoch run
        "evaluate.sanity = False", "train.export_dir = 'serving'"])
    from tfadv.train import train

    model_dir = tmp_path / "run"
    train(str(model_dir))
    version_dir = model_dir / "serving" / "1"
    meta = json.loads((version_dir / "assets.extra" / "export.json").read_text())
    assert meta["source"] == str(model_dir / "model.keras")
    saved = keras.models.load_model(model_dir / "model.keras")
    x = np.random.RandomState(0).rand(16, 8, 8, 1).astype("float32")
    got = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=x)
    np.testing.assert_allclose(got["logits"].numpy(), np.asarray(saved(x)), rtol=1e-5,
                               atol=1e-5)


def test_train_rejects_a_bad_export_dir_before_any_work():
    from tfadv.train import train

    with pytest.raises(ValueError, match="export_dir must be None or a non-empty path"):
        train("/nonexistent-export-run", export_dir="")
    assert not os.path.exists("/nonexistent-export-run")


# --- a TF Serving gRPC client (tensorflow-serving-api) -----------------------------------------
@pytest.mark.parametrize("key", ["serving_default", "serving_uint8", "serving_image_bytes"])
def test_grpc_predict_request_matches_the_signature(exported, trained_digits_model, pixels,
                                                    key):
    predict_pb2 = pytest.importorskip(
        "tensorflow_serving.apis.predict_pb2",
        reason="tensorflow-serving-api is not installed (pip install "
               "tensorflow-serving-api==2.21.0; it does not change the TensorFlow version)")
    u = pixels[:8]
    x = u.astype("float32") / np.float32(255.0)
    # The request of BUILD.md's client, without the channel (no TF Serving server here).
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.signature_name = key
    if key == "serving_default":
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(x, dtype=tf.float32))
    elif key == "serving_uint8":
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(u, dtype=tf.uint8))
    else:
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(
            [_encode(image, "PNG") for image in u], dtype=tf.string))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())

    info = export.signature_info(exported)[request.model_spec.signature_name]
    assert set(request.inputs) == set(info["inputs"])
    for name, tensor in request.inputs.items():
        assert tf.as_dtype(tensor.dtype).name == info["inputs"][name]["dtype"]
        shape, spec = [d.size for d in tensor.tensor_shape.dim], info["inputs"][name]["shape"]
        assert len(shape) == len(spec) and all(s in (None, d) for d, s in zip(shape, spec))
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    signature = tf.saved_model.load(exported).signatures[request.model_spec.signature_name]
    got = {k: v.numpy() for k, v in signature(**inputs).items()}
    _assert_matches(got, _keras_outputs(trained_digits_model, x))


# --- the fresh processes started by `processes` ------------------------------------------------
def _fresh_outputs(work, case):
    fresh = np.load(work / "fresh.npz")
    return {k: fresh[f"{case}.{k}"] for k in ("logits", "probabilities", "classes")}


def test_fresh_tf_saved_model_load_reproduces_the_keras_model(processes, trained_digits_model,
                                                              test_images):
    procs, work = processes
    _finish(procs["fresh"])
    _assert_matches(_fresh_outputs(work, "float"),
                    _keras_outputs(trained_digits_model, test_images[0]))


def test_fresh_uint8_and_png_equal_the_float_signature(processes, trained_digits_model,
                                                       pixels):
    # serving_uint8(u) == serving_default(u / 255) == serving_image_bytes(PNG(u)), bit for bit:
    # the same pixels reach the same graph (u / 255 is a table of float32(k) / 255).
    procs, work = processes
    _finish(procs["fresh"])
    want = _fresh_outputs(work, "float_of_u")
    for case in ("uint8", "png"):
        got = _fresh_outputs(work, case)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{case} {k}")
    _assert_matches(want, _keras_outputs(
        trained_digits_model, pixels.astype("float32") / np.float32(255.0)))
    assert len(np.unique(want["classes"])) > 1


# What serving_default says to each misuse of _misuse (TF Serving: HTTP 400 {"error": ...}).
REFUSALS = {
    "nan": r"must be finite float32 pixel values in \[0, 1\]; NaN or Inf values in this "
           r"request:\] \[1\]",
    "inf": r"NaN or Inf values in this request:\] \[\d+\]",
    "255": r"must be float32 pixel values in \[0, 1\] \(pixel / 255\); for 0..255 integers use "
           r"the signature serving_uint8.*This request has min\] \[0\] \[max\] \[255\]",
    "0..255": r"This request has min\] \[0\] \[max\] \[255\]",
    "negative": r"This request has min\] \[-0.5\] \[max\] \[0.5\]",
    "wrong_size": r"\[2,16,16,1\] is not compatible with expected shape \[\?,8,8,1\]",
    "wrong_channels": r"\[2,8,8,3\] is not compatible with expected shape \[\?,8,8,1\]",
    "no_batch": r"\[8,8,1\] is not compatible with expected shape \[\?,8,8,1\]",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_fresh_float_signature_refuses_misuse(processes, case):
    procs, work = processes
    _finish(procs["fresh"])
    refused = json.loads((work / "refused.json").read_text())[case]
    assert refused.get("error") == "InvalidArgumentError", refused  # never a prediction
    assert re.search(REFUSALS[case], refused["message"]), refused["message"]


def test_saved_model_cli_run_uint8_reproduces_the_keras_model(processes, trained_digits_model,
                                                              pixels):
    # saved_model_cli run restores the variables into a TF1 session, as TF Serving does; its
    # --input_exprs literal is a list of ints, fed to the uint8 input.
    procs, work = processes
    out = _finish(procs["run"])
    want = _keras_outputs(trained_digits_model,
                          pixels[:4].astype("float32") / np.float32(255.0))
    printed = re.search(r"Result for output key classes:\n\[([\d\s]+)\]", out)
    assert printed, out[-2000:]
    np.testing.assert_array_equal([int(c) for c in printed.group(1).split()], want["classes"])
    _assert_matches({k: np.load(work / "cli" / f"{k}.npy") for k in want}, want)


def _show_blocks(show):
    """saved_model_cli show --all's text, split per signature: ``{key: text}``."""
    parts = re.split(r"signature_def\['([^']+)'\]:", show.split("Concrete Functions:")[0])
    return dict(zip(parts[1::2], parts[2::2]))


def test_saved_model_cli_show_lists_the_three_signatures(processes):
    blocks = _show_blocks(_finish(processes[0]["show"]))
    assert set(blocks) - {"__saved_model_init_op"} == {
        "serving_default", "serving_uint8", "serving_image_bytes"}, list(blocks)
    inputs = {"serving_default": r"inputs\['images'\] tensor_info:\s+dtype: DT_FLOAT\s+"
                                 r"shape: \(-1, 8, 8, 1\)",
              "serving_uint8": r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+"
                               r"shape: \(-1, 8, 8, 1\)",
              "serving_image_bytes": r"inputs\['image_bytes'\] tensor_info:\s+"
                                     r"dtype: DT_STRING\s+shape: \(-1\)"}
    for key, pattern in inputs.items():
        block = blocks[key]
        for p in [pattern,
                  r"outputs\['logits'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 10\)",
                  r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT\s+"
                  r"shape: \(-1, 10\)",
                  r"outputs\['classes'\] tensor_info:\s+dtype: DT_INT64\s+shape: \(-1\)",
                  r"Method name is: tensorflow/serving/predict"]:
            assert re.search(p, block), (key, p, block)
        assert block.count("inputs['") == 1 and block.count("outputs['") == 3, block


def test_bin_evaluate_on_the_export(processes, trained_digits_model, test_images):
    procs, work = processes
    _finish(procs["fresh"])
    x, y = test_images
    result = json.loads((work / "eval" / "eval.json").read_text())
    assert result["num_examples"] == 20
    expected = float(np.mean(np.asarray(trained_digits_model(x[:20])).argmax(-1) == y[:20]))
    assert result["clean_accuracy"] == pytest.approx(expected)
    assert 0.0 <= result["robust_accuracy"]["fgsm"] <= result["clean_accuracy"]


def test_bin_export_end_to_end(processes):
    procs, work = processes
    out = _finish(procs["export"])
    model_dir = work / "run"
    version_dir = model_dir / "serving" / "1"
    assert f"tfadv: exported {version_dir}" in out
    for key in ("serving_default", "serving_uint8", "serving_image_bytes"):
        assert f"signature_def['{key}'] (method tensorflow/serving/predict):" in out
    assert "inputs['images']: uint8 (-1, 8, 8, 1)" in out
    assert "inputs['image_bytes']: string (-1)" in out
    assert out.count("outputs['probabilities']: float32 (-1, 10)") == 3
    meta = json.loads((version_dir / "assets.extra" / "export.json").read_text())
    assert meta["source"] == str(model_dir / "model.keras")
    assert os.listdir(model_dir / "serving") == ["1"]
