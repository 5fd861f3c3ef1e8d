"""The patch threat model in tfadv.evaluation: the patch PGD is the headline, the curve runs over
patch sides, and a transform marked non-differentiable is attacked with BPDA, reported next to
the non-adaptive number with the worst case as the headline."""

import numpy as np
import pytest

from tfadv import evaluation
from tfadv.attacks.patch import PatchPGD
from tfadv.defenses import LocalGradientSmoothing, with_preprocessing

from conftest import dataset_arrays

EXAMPLES = 24


@pytest.fixture(scope="module")
def digit_arrays(digits):
    x, y = dataset_arrays(digits.test)
    return x[:EXAMPLES], y[:EXAMPLES]


def test_patch_headline_is_the_worst_case_over_patch_attacks(trained_digits_model, digit_arrays):
    x, y = digit_arrays
    result = evaluation.evaluate(
        trained_digits_model, [(x, y)],
        attacks={"patch-80": PatchPGD(3, steps=20, locations=8, screen_steps=0)},
        autoattack="fast", verbose=0, curve_fractions=(0.5,))
    assert result["threat_model"] == {"norm": "patch", "eps": 3}
    head = result["headline"]
    assert head["autoattack"] == "patch-fast" and "patch" in head["label"]
    robust = result["robust_accuracy"]
    assert set(robust) >= {"patch-80", "patch-fast"}
    assert head["accuracy"] <= min(robust.values()) + 1e-9
    assert head["accuracy"] < result["clean_accuracy"]  # a 3x3 patch on an 8x8 digit hurts
    sides = [point["eps"] for point in result["robustness_curve"]]
    assert all(float(s).is_integer() for s in sides) and max(sides) == 8  # the whole image
    lines = evaluation.format_table(result).splitlines()
    assert "patch" in lines[0] and "patch" in lines[-1]


def test_a_smoothing_transform_is_evaluated_with_bpda_side_by_side(trained_digits_model,
                                                                    digit_arrays):
    x, y = digit_arrays
    defended = with_preprocessing(trained_digits_model, LocalGradientSmoothing(3, 2))
    result = evaluation.evaluate(defended, [(x, y)], autoattack="fast", verbose=0,
                                 threat_model={"eps": 3, "norm": "patch"},
                                 curve_fractions=())
    pairs = evaluation.adaptive_pairs(result)
    assert [p["adaptive"] for p in pairs] == ["bpda-patch-fast"]
    pair = pairs[0]
    head = result["headline"]["accuracy"]
    assert head == pytest.approx(min(head, pair["non_adaptive"], pair["adaptive_accuracy"]))
    assert head <= min(pair["non_adaptive"], pair["adaptive_accuracy"]) + 1e-9
    assert "non-adaptive vs adaptive" in evaluation.format_table(result)


def test_patch_threat_model_errors_are_one_line(trained_digits_model, digit_arrays):
    x, y = digit_arrays
    with pytest.raises(ValueError, match=r"patch side in pixels"):
        evaluation.evaluate(trained_digits_model, [(x, y)], verbose=0,
                            threat_model={"eps": 0.5, "norm": "patch"})
    with pytest.raises(ValueError, match="does not fit"):
        evaluation.evaluate(trained_digits_model, [(x, y)], verbose=0, sanity=False,
                            threat_model={"eps": 9, "norm": "patch"})


def test_python_api_takes_the_patch_threat_model(trained_digits_model, digit_arrays):
    import tfadv

    x, y = digit_arrays
    result = tfadv.evaluate(trained_digits_model, x[:8], y[:8], eps=2, norm="patch",
                            autoattack="fast", sanity=False, verbose=0)
    assert result["threat_model"] == {"eps": 2, "norm": "patch"}
    assert list(result["robust_accuracy"]) == ["patch-fast"]
    adversarial = tfadv.attack(trained_digits_model, x[:8] * 16, y[:8], "patch-random80", eps=2,
                               norm="patch", input_range=(0, 16))
    for clean, adv in zip(x[:8] * 16, adversarial):
        changed = np.argwhere(np.abs(adv - clean).max(axis=-1) > 1e-4)
        assert len(changed) and (changed.max(axis=0) - changed.min(axis=0) <= 1).all()
    with pytest.raises(ValueError, match=r"eps \(the patch side in pixels"):
        tfadv.evaluate(trained_digits_model, x, y, eps=0.3, norm="patch")
