"""TensorBoard beyond scalars: a real bin/train run, its event files read back.

Checks the adversarial example grids (clean, perturbation, adversarial), the logit-margin
histograms, the robustness curve and the gin config text written by `tfadv.tensorboard` and
`tfadv.train`.
"""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfadv.tensorboard import AdversarialSummaries, image_grid, logit_margin, perturbation_image

EPS = 0.3  # pgd_at_base.gin's EPSILON
NUM_IMAGES, COLUMNS = 6, 4  # a 2 x 4 grid whose last two cells stay empty


def _summaries(directory):
    """tag -> [(step, plugin name, numpy value)] from every event file in ``directory``."""
    found = {}
    paths = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
    assert paths, f"no event file in {directory}"
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, value.metadata.plugin_data.plugin_name,
                     tf.make_ndarray(value.tensor)))
    return found


def _decode_image(tensor):
    """An image summary's tensor is [width, height, png, ...]; returns the first image as
    float in [0, 1] after checking the recorded size."""
    width, height, png = int(tensor[0]), int(tensor[1]), tensor[2]
    image = tf.io.decode_png(png).numpy()
    assert image.shape[:2] == (height, width)
    return image.astype(np.float32) / 255.0


MODEL_DIR = []  # the --model_dir of the run on conftest's background lane


def start_background(lane, tmp_path_factory):
    MODEL_DIR.append(tmp_path_factory.mktemp("tb") / "run")
    lane.submit_bin(
        "test_tensorboard run", "train", "--gin_file=pgd_at_base.gin",
        f"--model_dir={MODEL_DIR[0]}",
        # The 2-step test PGD is weaker than FGSM, so the verdict is unreliable: this test is
        # about the summaries, not the verdict.
        "--allow_unreliable",
        *[f"--gin_param={p}" for p in (
            "train.epochs = 2", "train.verbose = 2", "train_attack/PGD.steps = 1",
            "evaluate.autoattack = 'fast'",
            "val_attack/PGD.steps = 2", "test_attack/PGD.steps = 2",
            "evaluate.max_examples = 64", "evaluate.curve_fractions = [0.0, 0.5, 1.0]",
            "AdversarialSummaries.every_n_epochs = 1",
            f"AdversarialSummaries.num_images = {NUM_IMAGES}",
            f"AdversarialSummaries.columns = {COLUMNS}",
            "AdversarialSummaries.num_examples = 100")])


@pytest.fixture(scope="module")
def run(background_lane):
    model_dir = MODEL_DIR[0]
    proc = background_lane.result("test_tensorboard run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((model_dir / "report.json").read_text())
    return model_dir, report, _summaries(str(model_dir / "tensorboard" / "adversarial"))


def test_image_grids_show_clean_perturbation_and_adversarial_inside_the_ball(run):
    _, _, found = run
    grids = {}
    for kind in ("clean", "perturbation", "adversarial"):
        events = found[f"adversarial/{kind}"]
        assert [step for step, _, _ in events] == [0, 1], kind  # every epoch
        assert all(plugin == "images" for _, plugin, _ in events)
        grids[kind] = _decode_image(events[-1][2])
        assert grids[kind].shape == (2 * 8, COLUMNS * 8, 1), kind  # 8x8 digits, one channel
    cells = np.zeros((2 * 8, COLUMNS * 8), bool)
    for i in range(NUM_IMAGES):
        r, c = divmod(i, COLUMNS)
        cells[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = True
    clean, pert, adv = (grids[k][..., 0] for k in ("clean", "perturbation", "adversarial"))
    quantum = 1.0 / 255 + 1e-6  # PNG rounding of each value
    delta = adv - clean
    assert np.abs(delta[cells]).max() <= EPS + 2 * quantum  # inside the L-inf ball
    assert np.abs(delta[cells]).max() > 0.1  # the attack moved the images
    # The perturbation grid is 0.5 + delta / (2 eps) of the same cells.
    np.testing.assert_allclose((pert[cells] - 0.5) * 2 * EPS, delta[cells],
                               atol=2 * EPS * quantum + 2 * quantum)
    assert not pert[cells].std() == 0  # not a flat grey image
    for grid in (clean, pert, adv):  # empty cells are black
        assert np.all(grid[~cells] == 0)


def test_margin_histograms_cover_the_fixed_batch_and_the_attack_lowers_margins(run):
    _, _, found = run
    means = {}
    for kind in ("clean", "adversarial"):
        events = found[f"margin/{kind}"]
        assert [step for step, _, _ in events] == [0, 1], kind
        assert all(plugin == "histograms" for _, plugin, _ in events)
        buckets = events[-1][2]  # rows (left, right, count)
        assert buckets.ndim == 2 and buckets.shape[1] == 3
        assert buckets[:, 2].sum() == pytest.approx(100)
        means[kind] = float(((buckets[:, 0] + buckets[:, 1]) / 2 * buckets[:, 2]).sum() / 100)
    assert means["adversarial"] < means["clean"]


def test_robustness_curve_matches_the_report(run):
    _, report, found = run
    curve = report["robustness_curve"]
    assert [c["eps"] for c in curve] == pytest.approx([0.0, 0.15, 0.3, 1.0])
    events = found["robustness_curve/accuracy"]
    assert all(plugin == "scalars" for _, plugin, _ in events)
    assert [step for step, _, _ in events] == [round(1000 * c["eps"]) for c in curve]
    np.testing.assert_allclose([float(v) for _, _, v in events],
                               [c["accuracy"] for c in curve], rtol=1e-6)
    (step, plugin, tensor), = found["robustness_curve/plot"]
    assert plugin == "images" and step == 0
    assert _decode_image(tensor).shape[-1] == 3


def test_gin_config_text_names_the_summaries(run):
    model_dir, _, _ = run
    config = _summaries(str(model_dir / "tensorboard" / "config"))
    (step, plugin, tensor), = config["gin/operative_config"]
    assert plugin == "text"
    text = tensor.item().decode()
    assert "AdversarialSummaries.every_n_epochs = 1" in text
    assert f"AdversarialSummaries.num_images = {NUM_IMAGES}" in text
    assert "train.epochs = 2" in text


def test_helpers_grid_perturbation_margin():
    images = np.arange(3 * 2 * 2 * 1, dtype=np.float32).reshape(3, 2, 2, 1)
    grid = image_grid(images, columns=2)
    assert grid.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(grid[0, 2:, :2], images[2])
    np.testing.assert_array_equal(grid[0, 2:, 2:], 0)
    np.testing.assert_allclose(perturbation_image([-0.1, 0.0, 0.1], 0.1), [0.0, 0.5, 1.0])
    margins = logit_margin(np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]), [0, 2])
    np.testing.assert_allclose(margins, [1.0, -4.0])


@pytest.mark.parametrize("kwargs, name", [({"every_n_epochs": -1}, "every_n_epochs"),
                                          ({"num_images": 0}, "num_images"),
                                          ({"num_images": 9, "num_examples": 4}, "num_examples")])
def test_bad_arguments_fail_clearly(kwargs, name):
    with pytest.raises(ValueError, match=f"AdversarialSummaries.{name}"):
        AdversarialSummaries(**kwargs)
    with pytest.raises(ValueError, match="attach"):
        AdversarialSummaries().write_robustness_curve({"robustness_curve": []})
