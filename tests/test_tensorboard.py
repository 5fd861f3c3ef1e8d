"""TensorBoard for comparing runs: a real bin/train run, killed and resumed, its event files read
back; and the pieces of `tfadv.tensorboard` in process.

The lane run (TRADES on digits, 2 epochs) is killed right after epoch 1's checkpoint
(``TFADV_FAULT``) and resumed by the same command. Checked: the HParams session (one session
start, written by the first process, with the run's actual hyperparameters; the experiment config
declaring the metrics; the final metrics equal to report.json), the labelled and upscaled
adversarial examples of every epoch, the margin histograms, the robustness curve and the gin
config text.
"""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata

from conftest import bin_command, bin_env
from tfadv import tensorboard as tb
from tfadv.tensorboard import AdversarialSummaries, ExampleLayout, logit_margin, render_examples

EPS = 0.3  # pgd_at_base.gin's EPSILON
NUM_IMAGES = 6
PARAMS = ("train.epochs = 2", "train.verbose = 2", "train_attack/PGD.steps = 1",
          "train.learning_rate = 0.002", "TRADES.beta = 3.0",
          "evaluate.autoattack = 'fast'", "val_attack/PGD.steps = 2", "test_attack/PGD.steps = 2",
          "evaluate.max_examples = 64", "evaluate.curve_fractions = [0.0, 0.5, 1.0]",
          f"AdversarialSummaries.num_images = {NUM_IMAGES}",
          "AdversarialSummaries.num_examples = 100")


def _summaries(directory, recursive=False):
    """tag -> [(step, plugin name, value, event file)] from the event files in ``directory``
    (not its subdirectories); value is the numpy tensor, or the SummaryMetadata for hparams."""
    found = {}
    paths = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
    assert paths, f"no event file in {directory}"
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                found.setdefault(value.tag, []).append(
                    (event.step, plugin,
                     value.metadata if plugin == "hparams" else tf.make_ndarray(value.tensor),
                     os.path.basename(path)))
    return found


def _decode_image(tensor):
    """An image summary's tensor is [width, height, png, ...]; returns the first image as
    uint8 after checking the recorded size."""
    width, height, png = int(tensor[0]), int(tensor[1]), tensor[2]
    image = tf.io.decode_png(png).numpy()
    assert image.shape[:2] == (height, width)
    return image


MODEL_DIR = []  # the --model_dir of the run on conftest's background lane


def start_background(lane, tmp_path_factory):
    """The run killed after epoch 1's checkpoint, then the same command, which resumes it."""
    MODEL_DIR.append(tmp_path_factory.mktemp("tb") / "run")
    # --allow_unreliable: the 2-step test PGD is weaker than FGSM, so the verdict is
    # unreliable; this test is about the summaries, not the verdict.
    cmd = bin_command("train", "--gin_file=trades.gin", f"--model_dir={MODEL_DIR[0]}",
                      "--allow_unreliable", *[f"--gin_param={p}" for p in PARAMS])
    lane.submit("test_tensorboard killed", cmd, 600,
                dict(bin_env(), TFADV_FAULT="checkpoint.committed@1:kill"))
    lane.submit("test_tensorboard resumed", cmd, 600, bin_env())


@pytest.fixture(scope="module")
def run(background_lane):
    model_dir = MODEL_DIR[0]
    killed = background_lane.result("test_tensorboard killed")
    assert killed.returncode == -9, killed.stderr[-3000:]
    proc = background_lane.result("test_tensorboard resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the checkpoint after epoch 1" in proc.stdout
    report = json.loads((model_dir / "report.json").read_text())
    assert report["resumes"] == [1]
    return model_dir, report


def _session(model_dir):
    return _summaries(str(model_dir / "tensorboard"))


def test_one_session_start_with_the_runs_actual_hyperparameters(run):
    model_dir, report = run
    found = _session(model_dir)
    # The resumed process found the first one's session start and wrote none.
    (start,) = found[hp_metadata.SESSION_START_INFO_TAG]
    (experiment,) = found[hp_metadata.EXPERIMENT_TAG]
    assert start[3] == experiment[3]  # written together, at the start of the first process
    (end,) = found[hp_metadata.SESSION_END_INFO_TAG]
    assert end[3] != start[3] and end[3].endswith(tb.REPORT_SUFFIX)  # by the resumed process
    info = hp_metadata.parse_session_start_info_plugin_data(start[2].plugin_data.content)
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    expected = {
        "train.defense": "@TRADES", "train.model": "digits_cnn", "train.epochs": 2,
        "train.learning_rate": 0.002, "train.seed": 0, "train.optimizer": "@Adam",
        "load_dataset.name": "digits", "load_dataset.batch_size": 64,
        "train_attack/PGD.eps": EPS, "train_attack/PGD.norm": "linf",
        "train_attack/PGD.steps": 1, "train_attack/PGD.loss_fn": "kl_divergence",
        "val_attack/PGD.steps": 2, "TRADES.beta": 3.0, "TRADES.attack": "@train_attack/PGD()",
        "evaluate.autoattack": "fast", "train.jit_compile": False,
        "evaluate.curve_fractions": "[0.0, 0.5, 1.0]",
    }
    for name, value in expected.items():
        assert hparams[name] == pytest.approx(value) if isinstance(value, float) else \
            hparams[name] == value, name
    # Scalars as numbers, strings and bools; nothing printed-only; not the other defense that
    # trades.gin's base (pgd_at_base.gin) configures.
    assert isinstance(hparams["train.jit_compile"], bool)
    assert "train.verbose" not in hparams
    assert not [k for k in hparams if k.startswith("PGDAdversarialTraining.")]
    assert info.group_name == ""  # its own group, named by the run
    # The bound learning rate is the one Keras logged.
    train = _summaries(str(model_dir / "tensorboard" / "train"))
    assert [float(v) for _, _, v, _ in train["epoch_learning_rate"]] == pytest.approx([0.002] * 2)


def test_experiment_config_declares_the_hparams_and_the_metrics(run):
    model_dir, _ = run
    found = _session(model_dir)
    (experiment,) = found[hp_metadata.EXPERIMENT_TAG]
    config = hp_metadata.parse_experiment_plugin_data(experiment[2].plugin_data.content)
    (start,) = found[hp_metadata.SESSION_START_INFO_TAG]
    info = hp_metadata.parse_session_start_info_plugin_data(start[2].plugin_data.content)
    declared = {h.name: h for h in config.hparam_infos}
    assert set(declared) == set(info.hparams)
    assert declared["TRADES.beta"].type == api_pb2.DATA_TYPE_FLOAT64
    assert declared["train.defense"].type == api_pb2.DATA_TYPE_STRING
    assert declared["train.jit_compile"].type == api_pb2.DATA_TYPE_BOOL
    assert not any(h.HasField("domain_discrete") or h.HasField("domain_interval")
                   for h in config.hparam_infos)  # no domain: filters start open
    metrics = {(m.name.group, m.name.tag) for m in config.metric_infos}
    assert {("", tag) for tag in tb.REPORT_METRICS} <= metrics
    logged = {("train", "epoch_loss"), ("train", "epoch_adv_accuracy"),
              ("train", "epoch_learning_rate"), ("validation", "epoch_accuracy"),
              ("validation", "epoch_robust_accuracy")}
    assert logged <= metrics
    # Every per-epoch metric it declares that the run logs has both epochs, the first written by
    # the killed process (flushed before its checkpoint), the second by the resumed one.
    for group in ("train", "validation"):
        scalars = _summaries(str(model_dir / "tensorboard" / group))
        for g, tag in metrics:
            if g == group and tag in scalars:
                assert sorted(step for step, *_ in scalars[tag]) == [0, 1], (group, tag)
    for g, tag in logged:
        assert tag in _summaries(str(model_dir / "tensorboard" / g)), (g, tag)


def test_final_metrics_equal_the_report(run):
    model_dir, report = run
    found = _session(model_dir)
    values = {}
    for tag in tb.REPORT_METRICS:
        ((step, plugin, value, _),) = found[tag]
        assert plugin == "scalars" and step == report["epochs"] == 2
        values[tag] = float(value)
    assert values["report/robust_accuracy"] == pytest.approx(report["headline"]["accuracy"])
    assert values["report/clean_accuracy"] == pytest.approx(report["clean_accuracy"])
    assert values["report/reliable"] == float(report["headline"]["reliable"])
    (end,) = found[hp_metadata.SESSION_END_INFO_TAG]
    status = hp_metadata.parse_session_end_info_plugin_data(end[2].plugin_data.content).status
    assert status == api_pb2.STATUS_SUCCESS


def test_robustness_curve_matches_the_report(run):
    model_dir, report = run
    found = _session(model_dir)
    curve = report["robustness_curve"]
    assert [c["eps"] for c in curve] == pytest.approx([0.0, 0.15, 0.3, 1.0])
    events = found["robustness_curve/accuracy"]
    assert all(plugin == "scalars" for _, plugin, _, _ in events)
    assert [step for step, *_ in events] == [round(1000 * c["eps"]) for c in curve]
    np.testing.assert_allclose([float(v) for _, _, v, _ in events],
                               [c["accuracy"] for c in curve], rtol=1e-6)
    ((step, plugin, tensor, _),) = found["robustness_curve/plot"]
    assert plugin == "images" and step == 0
    png = tf.io.decode_png(tf.io.read_file(str(model_dir / "robustness_curve.png")), 3).numpy()
    np.testing.assert_array_equal(_decode_image(tensor), png)  # the evaluation's own figure


def test_labelled_upscaled_examples_every_epoch(run):
    from tfadv import data

    model_dir, _ = run
    found = _summaries(str(model_dir / "tensorboard" / "adversarial"))
    events = found["adversarial/examples"]
    assert sorted(step for step, *_ in events) == [0, 1]  # every epoch (the default)
    assert all(plugin == "images" for _, plugin, _, _ in events)
    layout = ExampleLayout(NUM_IMAGES, 8, 8)
    assert layout.tile_h == layout.tile_w == 64  # 8x8 digits, nearest neighbour x8
    validation = np.concatenate([x for x, _ in data.load_dataset().validation])[:NUM_IMAGES]
    for _, _, tensor, _ in events:
        image = _decode_image(tensor)
        assert image.shape == (layout.height, layout.width, 3)
        tiles = {}
        for row in range(3):
            tiles[row] = []
            for i in range(NUM_IMAGES):
                top, left = layout.tile(row, i)
                tiles[row].append(image[top:top + 64, left:left + 64].astype(np.float32) / 255)
        clean, adv, heat = (np.stack(tiles[r]) for r in range(3))
        # The clean row is the fixed validation batch, upscaled pixel for pixel.
        np.testing.assert_allclose(clean[..., 0], tb.upscale(validation, 8)[..., 0],
                                   atol=0.5 / 255 + 1e-6)
        delta = adv - clean
        assert np.abs(delta).max() <= EPS + 2 / 255  # inside the L-inf ball
        assert np.abs(delta).max() > 0.1  # the attack moved the images
        # The heat map is the perturbation through the colour map (scale eps).
        np.testing.assert_allclose(heat, tb.perturbation_heatmap(delta[..., :1], EPS),
                                   atol=10 / 255)


def test_margin_histograms_cover_the_fixed_batch_and_the_attack_lowers_margins(run):
    model_dir, _ = run
    found = _summaries(str(model_dir / "tensorboard" / "adversarial"))
    means = {}
    for kind in ("clean", "adversarial"):
        events = sorted(found[f"margin/{kind}"], key=lambda e: e[0])
        assert [step for step, *_ in events] == [0, 1], kind
        assert all(plugin == "histograms" for _, plugin, _, _ in events)
        buckets = events[-1][2]  # rows (left, right, count)
        assert buckets.ndim == 2 and buckets.shape[1] == 3
        assert buckets[:, 2].sum() == pytest.approx(100)
        means[kind] = float(((buckets[:, 0] + buckets[:, 1]) / 2 * buckets[:, 2]).sum() / 100)
    assert means["adversarial"] < means["clean"]


def test_gin_config_text_names_the_summaries(run):
    model_dir, _ = run
    config = _summaries(str(model_dir / "tensorboard" / "config"))
    (step, plugin, tensor, _), *_ = config["gin/operative_config"]
    assert plugin == "text"
    text = tensor.item().decode()
    assert "AdversarialSummaries.every_n_epochs = 1" in text
    assert f"AdversarialSummaries.num_images = {NUM_IMAGES}" in text
    assert "train.epochs = 2" in text


# --- in process --------------------------------------------------------------------------------
def test_run_hparams_from_gin_bindings():
    from tfadv.defenses import TRADES  # (also registers the defenses with gin)

    bindings = "\n".join([
        "EPS = 0.25", "train_attack/PGD.eps = %EPS", "train_attack/PGD.norm = 'l2'",
        "TRADES.beta = 6.0", "TRADES.attack = @train_attack/PGD()",
        "PGDAdversarialTraining.attack = @train_attack/PGD()",
        "PiecewiseConstant.values = [0.1, 0.01]", "train.verbose = 2", "AWP.gamma = 0.005"])
    hparams = tb.run_hparams(bindings, TRADES,
                             {"defense": TRADES, "epochs": 5, "learning_rate": 0.1,
                              "jit_compile": False, "early_stopping": None, "verbose": 2,
                              "callbacks": [object()]},
                             exclude=("train.verbose",))
    assert hparams == {
        "AWP.gamma": 0.005, "PiecewiseConstant.values": "[0.1, 0.01]",
        "TRADES.attack": "@train_attack/PGD()", "TRADES.beta": 6.0,
        "train.defense": "@TRADES", "train.early_stopping": "None", "train.epochs": 5,
        "train.jit_compile": False, "train.learning_rate": 0.1,
        "train_attack/PGD.eps": 0.25, "train_attack/PGD.norm": "l2"}


def test_session_is_written_once_and_moved_aside(tmp_path):
    log_dir = str(tmp_path / "tensorboard")
    session = tb.HParamsSession(log_dir)
    metrics = tb.session_metrics(["loss", "verified_accuracy"])
    assert ("validation", "epoch_verified_accuracy") in {
        (m.as_proto().name.group, m.as_proto().name.tag) for m in metrics}
    assert session.start({"train.epochs": 2, "x": "a"}, metrics)
    assert not session.start({"train.epochs": 2, "x": "a"}, metrics)  # a resume: nothing new
    assert tb.read_session_start(log_dir) == {"train.epochs": 2.0, "x": "a"}
    report = {"epochs": 2, "clean_accuracy": 0.9, "robust_accuracy": {},
              "headline": {"accuracy": 0.4, "reliable": True},
              "robustness_curve": [{"eps": 0.0, "accuracy": 0.9}, {"eps": 0.3, "accuracy": 0.4}]}
    assert session.finish(report) == 2
    assert session.finish(dict(report, clean_accuracy=0.8)) == 2  # a retry replaces the first
    found = _summaries(log_dir)
    assert [float(v) for _, _, v, _ in found["report/clean_accuracy"]] == [pytest.approx(0.8)]
    assert len(found[hp_metadata.SESSION_END_INFO_TAG]) == 1
    # --extend: the finished session moves aside and the extended run starts a new one.
    moved = tb.move_session(log_dir, str(tmp_path / "previous" / "tensorboard"))
    assert len(moved) == 2 and tb.read_session_start(log_dir) is None
    assert tb.read_session_start(str(tmp_path / "previous" / "tensorboard"))["train.epochs"] == 2
    assert session.start({"train.epochs": 4, "x": "a"}, metrics)
    assert tb.read_session_start(log_dir)["train.epochs"] == 4


def test_render_examples_places_tiles_pixel_for_pixel_and_marks_wrong_predictions():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    delta = rng.choice([-0.2, 0.0, 0.2], x.shape).astype(np.float32)
    x_adv = np.clip(x + delta, 0, 1)
    y = np.array([1, 2, 3, 4])
    adv_pred = np.array([1, 7, 3, 9])  # examples 1 and 3 fooled
    image = render_examples(x, y, y, x_adv, adv_pred, scale=0.2)
    layout = ExampleLayout(4, 8, 8)
    assert image.shape == (layout.height, layout.width, 3) and image.dtype == np.uint8
    heat = tb.perturbation_heatmap(x_adv - x, 0.2)
    for i in range(4):
        for row, expected in enumerate((tb.to_rgb(x), tb.to_rgb(x_adv), heat)):
            top, left = layout.tile(row, i)
            tile = image[top:top + 64, left:left + 64]
            np.testing.assert_array_equal(
                tile, np.round(tb.upscale(expected[i:i + 1], 8)[0] * 255).astype(np.uint8))
        # The label above the adversarial tile is red exactly when the prediction is wrong.
        top, left = layout.tile(1, i)
        band = image[top - layout.BAND:top, left:left + 64].astype(int)
        red = (band[..., 0] > 180) & (band[..., 1] < 80) & (band[..., 2] < 80)
        dark = band.sum(-1) < 150
        assert red.any() == (adv_pred[i] != y[i]), i
        assert red.any() or dark.any(), i  # a label is there either way
    # Zero perturbation is the colour map's middle (near white), +scale its red end, -scale its
    # blue end; beyond saturates.
    import matplotlib

    colours = matplotlib.colormaps[tb.HEATMAP]([0.5, 1.0, 0.0, 1.0])[:, :3]
    np.testing.assert_allclose(
        tb.perturbation_heatmap(np.array([[[[0.0], [0.2], [-0.2], [0.5]]]]), 0.2)[0, 0], colours,
        atol=1e-6)
    assert colours[0].min() > 0.9  # white-ish
    assert colours[1][0] > colours[1][2] and colours[2][2] > colours[2][0]  # red, blue
    # Clean row only without an attack; 28x28 images are upscaled x3 to 84 pixels.
    clean_only = render_examples(np.zeros((2, 28, 28, 3)), [0, 1], [0, 0])
    assert clean_only.shape == (ExampleLayout(2, 28, 28, rows=1).height,
                                ExampleLayout(2, 28, 28, rows=1).width, 3)
    assert ExampleLayout(2, 28, 28).tile_h == 84


def test_helpers_margin_upscale():
    margins = logit_margin(np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]), [0, 2])
    np.testing.assert_allclose(margins, [1.0, -4.0])
    up = tb.upscale(np.arange(4.0).reshape(1, 2, 2, 1), 3)
    assert up.shape == (1, 6, 6, 1)
    np.testing.assert_array_equal(up[0, :3, :3, 0], 0)
    np.testing.assert_array_equal(up[0, 3:, 3:, 0], 3)


@pytest.mark.parametrize("kwargs, name", [({"every_n_epochs": -1}, "every_n_epochs"),
                                          ({"num_images": 0}, "num_images"),
                                          ({"min_tile": 0}, "min_tile"),
                                          ({"num_images": 9, "num_examples": 4}, "num_examples")])
def test_bad_arguments_fail_clearly(kwargs, name):
    with pytest.raises(ValueError, match=f"AdversarialSummaries.{name}"):
        AdversarialSummaries(**kwargs)
    with pytest.raises(ValueError, match="attach"):
        AdversarialSummaries().write_examples(0)
