"""tfadv.export and bin/export: the TF Serving SavedModel, read back by every loader there is."""

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
import runpy, sys, numpy as np, tensorflow as tf
version_dir, images, outputs, evaluate = sys.argv[1:5]
serve = tf.saved_model.load(version_dir).signatures["serving_default"]
out = serve(images=tf.constant(np.load(images)))
np.savez(outputs, **{k: v.numpy() for k, v in out.items()})
# bin/evaluate on the export, in this same fresh process (one TensorFlow import for both).
sys.argv = [evaluate, *sys.argv[5:]]
try:
    runpy.run_path(evaluate, run_name="__main__")
except SystemExit as exit:
    if exit.code not in (None, 0):
        raise
"""


@pytest.fixture(scope="module")
def processes(exported, trained_digits_model, test_images, tmp_path_factory):
    """Starts saved_model_cli show and run, a fresh tf.saved_model.load followed by bin/evaluate
    on the export, and bin/export on a model_dir; yields ``(Popen dict, work directory)``."""
    x, _ = test_images
    work = tmp_path_factory.mktemp("fresh")
    np.save(work / "x.npy", x)
    (work / "run").mkdir()
    trained_digits_model.save(work / "run" / "model.keras")
    few = x[:4]  # saved_model_cli's --input_exprs takes a Python literal
    literal = repr([[[[float(v) for v in px] for px in row] for row in image] for image in few])
    which = ["--dir", exported, "--tag_set", "serve", "--signature_def", "serving_default"]
    procs = {
        "show": _start([SAVED_MODEL_CLI, "show", *which]),
        "run": _start([SAVED_MODEL_CLI, "run", *which, "--input_exprs", f"images={literal}",
                       "--outdir", str(work / "cli")]),
        "fresh": _start([sys.executable, "-c", FRESH, exported, str(work / "x.npy"),
                         str(work / "fresh.npz"), os.path.join(ROOT, "bin", "evaluate"),
                         f"--model={exported}", "--attacks=fgsm", "--sanity=false",
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
def test_signature_and_metadata(exported, trained_digits_model):
    info = export.signature_info(exported)
    assert info == {
        "method_name": "tensorflow/serving/predict",
        "inputs": {"images": {"dtype": "float32", "shape": [None, 8, 8, 1]}},
        "outputs": {"classes": {"dtype": "int64", "shape": [None]},
                    "logits": {"dtype": "float32", "shape": [None, 10]},
                    "probabilities": {"dtype": "float32", "shape": [None, 10]}}}
    assert "inputs['images']: float32 (-1, 8, 8, 1)" in export.format_signature(info)
    meta = json.loads(open(os.path.join(exported, "assets.extra", "export.json")).read())
    assert meta["num_classes"] == 10 and meta["version"] == 1
    assert meta["inputs"]["images"] == {"dtype": "float32", "shape": [None, 8, 8, 1],
                                        "range": [0.0, 1.0]}
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
def test_grpc_predict_request_matches_the_signature(exported, trained_digits_model,
                                                    test_images):
    predict_pb2 = pytest.importorskip(
        "tensorflow_serving.apis.predict_pb2",
        reason="tensorflow-serving-api is not installed (pip install "
               "tensorflow-serving-api==2.21.0; it does not change the TensorFlow version)")
    x, _ = test_images
    # The request of BUILD.md's client, without the channel (no TF Serving server here).
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(x[:8], dtype=tf.float32))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())

    info = export.signature_info(exported, request.model_spec.signature_name)
    assert set(request.inputs) == set(info["inputs"])
    for name, tensor in request.inputs.items():
        assert tf.as_dtype(tensor.dtype).name == info["inputs"][name]["dtype"]
        shape, spec = [d.size for d in tensor.tensor_shape.dim], info["inputs"][name]["shape"]
        assert len(shape) == len(spec) and all(s in (None, d) for d, s in zip(shape, spec))
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    signature = tf.saved_model.load(exported).signatures[request.model_spec.signature_name]
    got = {k: v.numpy() for k, v in signature(**inputs).items()}
    _assert_matches(got, _keras_outputs(trained_digits_model, x[:8]))


# --- the fresh processes started by `processes` ------------------------------------------------
def test_fresh_tf_saved_model_load_reproduces_the_keras_model(processes, trained_digits_model,
                                                              test_images):
    procs, work = processes
    _finish(procs["fresh"])
    _assert_matches(dict(np.load(work / "fresh.npz")),
                    _keras_outputs(trained_digits_model, test_images[0]))


def test_saved_model_cli_run_reproduces_the_keras_model(processes, trained_digits_model,
                                                        test_images):
    # saved_model_cli run restores the variables into a TF1 session, as TF Serving does.
    procs, work = processes
    out = _finish(procs["run"])
    want = _keras_outputs(trained_digits_model, test_images[0][:4])
    printed = re.search(r"Result for output key classes:\n\[([\d\s]+)\]", out)
    assert printed, out[-2000:]
    np.testing.assert_array_equal([int(c) for c in printed.group(1).split()], want["classes"])
    _assert_matches({k: np.load(work / "cli" / f"{k}.npy") for k in want}, want)


def test_saved_model_cli_show_lists_the_named_signature(processes):
    show = _finish(processes[0]["show"])
    for pattern in [r"inputs\['images'\] tensor_info:\s+dtype: DT_FLOAT\s+"
                    r"shape: \(-1, 8, 8, 1\)",
                    r"outputs\['logits'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 10\)",
                    r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT\s+"
                    r"shape: \(-1, 10\)",
                    r"outputs\['classes'\] tensor_info:\s+dtype: DT_INT64\s+shape: \(-1\)",
                    r"Method name is: tensorflow/serving/predict"]:
        assert re.search(pattern, show), (pattern, show)
    assert len(re.findall(r"inputs\['", show)) == 1 and len(re.findall(r"outputs\['", show)) == 3


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
    assert "outputs['probabilities']: float32 (-1, 10)" in out
    meta = json.loads((version_dir / "assets.extra" / "export.json").read_text())
    assert meta["source"] == str(model_dir / "model.keras")
    assert os.listdir(model_dir / "serving") == ["1"]
