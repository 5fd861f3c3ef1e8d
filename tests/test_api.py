"""tfadv.evaluate and tfadv.attack (tfadv/api.py): input ranges, labels, single images, paths,
out-of-range errors; bin/evaluate taking dataset, eps and norm from a run directory."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfadv
from conftest import quick_train
from tfadv import api, data
from tfadv.attacks import FGSM
from tfadv.cli import UserError

EPS = 0.1
N = 48


@pytest.fixture(scope="module")
def images():
    """48 test digits as 8-bit images (0..255) and the same images in [0, 1], with labels."""
    x, y = data.digits_arrays()["test"]
    x8 = np.round(x[:N] * 255).astype("uint8")
    return x8, x8.astype("float32") / np.float32(255), y[:N].astype("int64")


def _divides_by_255(base):
    """``base`` (images in [0, 1]) behind a division by 255: a model of 0..255 images."""
    inputs = keras.Input(base.input_shape[1:])
    return keras.Model(inputs, base(keras.layers.Rescaling(1 / 255)(inputs)))


QUICK = dict(eps=EPS, attacks=["fgsm"], autoattack=None, sanity=False, verbose=0)


def test_import_tfadv_does_not_import_tensorflow():
    code = "import sys, tfadv; print('tensorflow' in sys.modules, tfadv.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", tfadv.__version__], out.stderr
    assert tfadv.evaluate is api.evaluate and tfadv.attack is api.attack


def test_uint8_images_with_input_range_match_unit_images(trained_digits_model, images):
    """The same images as uint8 with input_range=(0, 255) on a model that divides by 255, and
    as x / 255 on the model without the division: the same attacks see the same function in
    [0, 1] units, so every per-example result is the same; eps is in [0, 1] units."""
    x8, unit, y = images
    kwargs = dict(eps=EPS, attacks=["fgsm", "pgd10"], autoattack=None, sanity=False, verbose=0)
    in_255 = tfadv.evaluate(_divides_by_255(trained_digits_model), x8, y,
                            input_range=(0, 255), **kwargs)
    in_unit = tfadv.evaluate(trained_digits_model, unit, y, **kwargs)
    assert in_255["per_example"] == in_unit["per_example"]
    assert in_255["robust_accuracy"] == in_unit["robust_accuracy"]
    assert in_255["threat_model"] == {"norm": "linf", "eps": EPS}
    assert 0 < in_255["worst_case_accuracy"] < in_255["clean_accuracy"]  # not a trivial tie


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.5)])
def test_adversarial_images_stay_in_the_eps_ball_and_input_range(trained_digits_model, images,
                                                                 norm, eps):
    x8, unit, y = images
    model = _divides_by_255(trained_digits_model)
    adv = tfadv.attack(model, x8, y, "pgd10", eps=eps, norm=norm, input_range=(0, 255))
    assert adv.dtype == np.float32 and adv.shape == x8.shape
    assert adv.min() >= 0 and adv.max() <= 255
    delta = (adv - x8).reshape(len(y), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * 255 * (1 + 1e-5)  # eps in [0, 1] units: eps * 255 grey levels
    assert size.max() > 0.5 * eps * 255  # it moved
    # The same points as attacking x / 255 with the [0, 1] model, in 0..255 units.
    direct = tfadv.attack(trained_digits_model, unit, y, "pgd10", eps=eps, norm=norm)
    np.testing.assert_allclose(adv, direct * 255, atol=2e-3)
    fooled = np.argmax(model(adv), -1) != y
    assert fooled.mean() > np.mean(np.argmax(model(x8.astype("float32")), -1) != y)


def test_one_hot_labels_datasets_and_single_images(trained_digits_model, images):
    _, unit, y = images
    reference = tfadv.evaluate(trained_digits_model, unit, y, **QUICK)
    one_hot = tfadv.evaluate(trained_digits_model, unit, np.eye(10)[y], **QUICK)
    assert one_hot["per_example"] == reference["per_example"]
    dataset = tf.data.Dataset.from_tensor_slices((unit, y)).batch(20)
    assert tfadv.evaluate(trained_digits_model, dataset, **QUICK)["per_example"] == \
        reference["per_example"]
    single = tfadv.evaluate(trained_digits_model, unit[3], y[3], **QUICK)
    assert single["num_examples"] == 1
    assert single["per_example"]["fgsm"] == reference["per_example"]["fgsm"][3:4]
    adv = tfadv.attack(trained_digits_model, unit[3], np.eye(10)[y[3]], "fgsm", eps=EPS)
    assert adv.shape == unit[3].shape
    np.testing.assert_allclose(
        adv, tfadv.attack(trained_digits_model, unit, y, "fgsm", eps=EPS)[3], atol=1e-6)


def test_paths_load_like_the_model(trained_digits_model, images, tmp_path):
    """A .keras file, a directory holding model.keras (a run) and a SavedModel."""
    _, unit, y = images
    reference = tfadv.evaluate(trained_digits_model, unit, y, **QUICK)["per_example"]
    trained_digits_model.save(tmp_path / "model.keras")
    trained_digits_model.export(str(tmp_path / "saved"), verbose=False)
    for path in (tmp_path / "model.keras", tmp_path, tmp_path / "saved"):
        assert tfadv.evaluate(str(path), unit, y, **QUICK)["per_example"] == reference, path
    with pytest.raises(UserError, match="missing does not exist"):
        tfadv.evaluate(str(tmp_path / "missing"), unit, y, **QUICK)


def test_no_attacks_still_gives_clean_accuracy_and_headline(trained_digits_model, images,
                                                            capsys):
    _, unit, y = images
    result = tfadv.evaluate(trained_digits_model, unit[:16], y[:16], eps=EPS, attacks={},
                            autoattack=None, sanity=False, verbose=1)
    assert result["headline"]["accuracy"] is None and result["robust_accuracy"] == {}
    printed = capsys.readouterr().out.splitlines()
    assert f"clean  {100 * result['clean_accuracy']:7.2f}%      0.0" in printed
    assert printed[-1] == "robust accuracy: none (no attack was run)"
    # Without diagnostics, the headline is AutoAttack alone at the given threat model (on an
    # untrained model: it has little to attack, which keeps this cheap).
    keras.utils.set_random_seed(0)
    untrained = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(10)])
    alone = tfadv.evaluate(untrained, unit[:16], y[:16], eps=EPS, attacks={},
                           autoattack="fast", sanity=False, verbose=0)
    assert list(alone["robust_accuracy"]) == ["autoattack-fast"]
    assert alone["headline"]["autoattack"] == "fast"
    assert alone["threat_model"] == {"norm": "linf", "eps": EPS}


def test_out_of_range_images_and_units_are_refused(trained_digits_model, images):
    x8, unit, y = images
    model = _divides_by_255(trained_digits_model)
    with pytest.raises(ValueError, match=r"images span \[0, 255\], outside input_range=\(0, 1\)"
                                         r": pass the range your images use, "
                                         r"input_range=\(0, 255\)") as error:
        tfadv.evaluate(model, x8, y, **QUICK)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"input_range=\(-1, 1\)"):
        tfadv.attack(trained_digits_model, unit * 2 - 1, y, "fgsm", eps=EPS)
    with pytest.raises(ValueError, match="eps=8 is more than 1 for norm='linf'"):
        tfadv.evaluate(model, x8, y, eps=8, input_range=(0, 255), verbose=0)
    with pytest.raises(ValueError, match="input_range must be"):
        tfadv.evaluate(model, x8, y, eps=EPS, input_range=(255, 0), verbose=0)
    with pytest.raises(ValueError, match="x holds 48 images but y holds 47 labels"):
        tfadv.evaluate(trained_digits_model, unit, y[:-1], **QUICK)
    with pytest.raises(ValueError, match="has eps=0.2, norm=linf, but"):
        tfadv.evaluate(trained_digits_model, unit, y, eps=EPS,
                       attacks={"mine": FGSM(eps=0.2)}, verbose=0)


def test_gradient_blockers_are_found_behind_the_input_range(trained_digits_model, images):
    """The [0, 1] model built for input_range=(0, 255) is flat (the rescaling, then the model's
    own layers), so the BPDA remedy finds a quantising layer in it as in the model itself."""
    from tfadv.attacks.bpda import bpda_model, find_gradient_blockers

    _, unit, _ = images
    inputs = keras.Input((8, 8, 1))
    quantised = keras.layers.Lambda(lambda t: tf.round(t / 32) * 32, name="quantise")(inputs)
    model = keras.Model(inputs, _divides_by_255(trained_digits_model)(quantised))
    wrapped = api.in_unit_range(model, (0, 255), (8, 8, 1))
    np.testing.assert_allclose(wrapped(unit[:4]), model(255 * unit[:4]), atol=1e-5)
    blockers = find_gradient_blockers(wrapped, unit[:4])
    assert [layer.name for layer in blockers] == ["quantise"]
    surrogate = bpda_model(wrapped, blockers)
    np.testing.assert_array_equal(surrogate(unit[:4]), wrapped(unit[:4]))


# --- bin/evaluate on a run directory ----------------------------------------------------------
RUN = {}  # key -> path, filled by start_background


def start_background(lane, tmp_path_factory):
    """A one-epoch bin/train run at an eps and on classes of its own, then bin/evaluate on it
    without --eps/--norm/--dataset, and with a --norm that the run's eps is not for (a model
    outside any run without --eps: tests/test_evaluation.py)."""
    root = tmp_path_factory.mktemp("api_run")
    RUN["dir"] = root / "run"
    lane.submit_bin("test_api train", "train", "--gin_file=pgd_at_base.gin",
                    f"--model_dir={RUN['dir']}", *quick_train(
                        "train.epochs = 1", "EPSILON = 0.2", "evaluate.max_examples = 40",
                        "load_dataset.classes = [0, 1, 2, 3, 4]"))
    lane.submit_bin("test_api evaluate", "evaluate", f"--model={RUN['dir']}", "--attacks=fgsm",
                    "--autoattack=none", "--allow_unreliable", "--sanity=false")
    lane.submit_bin("test_api l2 without eps", "evaluate", f"--model={RUN['dir']}",
                    "--norm=l2")


def test_bin_evaluate_takes_dataset_eps_and_norm_from_the_run(background_lane):
    train = background_lane.result("test_api train")
    assert train.returncode == 0, train.stderr[-3000:]
    # bin/train's final evaluation shows its progress in plain lines (stdout is a pipe).
    assert "evaluate [" in train.stdout and "\r" not in train.stdout
    assert "autoattack-fast" in train.stdout
    proc = background_lane.result("test_api evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = RUN["dir"]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("tfadv: from the run")]
    assert lines == [f"tfadv: from the run {run_dir} (config.gin): dataset=digits classes=[0, 1, "
                     f"2, 3, 4], norm=linf, eps=0.2 (flags given on the command line win)"]
    result = json.loads((run_dir / "eval" / "eval.json").read_text())  # the default output_dir
    assert result["threat_model"] == {"norm": "linf", "eps": 0.2}
    assert result["num_examples"] == 180  # the test digits of classes 0-4 (of 360)
    assert "evaluate [" in proc.stdout  # progress


def test_bin_evaluate_explicit_flags_win_and_eps_is_required(background_lane, tmp_path):
    proc = background_lane.result("test_api l2 without eps")
    assert proc.returncode == 2
    assert ("--eps is required with --norm=l2: the run's eps 0.2 is a radius for norm linf"
            in proc.stderr)
    outside = tmp_path / "outside.keras"
    outside.write_bytes(b"")
    assert api.run_settings(outside) is None
    settings = api.run_settings(RUN["dir"] / "model.keras")
    assert settings["run_dir"] == str(RUN["dir"]) and settings["eps"] == 0.2
    assert settings["dataset"] == {"name": "digits", "classes": [0, 1, 2, 3, 4],
                                   "validation_size": None, "data_dir": None}

