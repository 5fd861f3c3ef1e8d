"""The AutoAttack ensemble: composition, robust-only cascade, threat-model guard, strength."""

import numpy as np
import pytest

from conftest import dataset_arrays
from tfadv.attacks import PGD, AutoAttack, build_attack


class _Recorder:
    """A component that records how many examples it is asked to attack."""

    def __init__(self, inner=None, scale=1.0):
        self.inner, self.scale, self.calls = inner, scale, []

    def __call__(self, model, x, y):
        self.calls.append(len(y))
        out = np.asarray(x) if self.inner is None else np.asarray(self.inner(model, x, y))
        return np.asarray(x) + self.scale * (out - np.asarray(x))


def test_standard_version_has_the_reference_components():
    attack = AutoAttack(eps=8 / 255, version="standard")
    assert [name for name, _ in attack.components] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    apgd_t, fab, square = (c for _, c in attack.components[1:])
    assert apgd_t.n_target_classes == 9 and fab.n_target_classes == 9
    assert square.n_queries == 5000 and square.black_box
    assert all(c.eps == pytest.approx(8 / 255) for _, c in attack.components)


def test_components_only_see_examples_still_robust(trained_digits_model, digits):
    x, y = dataset_arrays(digits.test)
    x, y = x[:64], y[:64]
    model = trained_digits_model
    ensemble = AutoAttack(eps=0.1, version="fast")
    first = _Recorder(PGD(eps=0.1, step_size=0.02, steps=10, random_start=None))
    second = _Recorder()
    ensemble.components = [("first", first), ("second", second)]
    ensemble.reset_stats()
    x_adv = np.asarray(ensemble(model, x, y))
    clean_correct = int(np.sum(np.argmax(model(x), -1) == y))
    assert first.calls == [clean_correct]
    assert second.calls == [clean_correct - ensemble.stats["first"]]
    assert ensemble.stats["first"] > 0 and ensemble.stats["second"] == 0
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6


def test_points_outside_the_threat_model_are_projected(trained_digits_model, digits):
    x, y = dataset_arrays(digits.test)
    x, y = x[:32], y[:32]
    ensemble = AutoAttack(eps=0.05, version="fast")
    # A rogue component that steps 10x past the ball: it must not be credited as is.
    rogue = _Recorder(PGD(eps=0.5, step_size=0.1, steps=10), scale=1.0)
    ensemble.components = [("rogue", rogue)]
    ensemble.reset_stats()
    x_adv = np.asarray(ensemble(trained_digits_model, x, y))
    assert np.abs(x_adv - x).max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_fast_ensemble_breaks_a_standard_model(trained_digits_model, digits):
    x, y = dataset_arrays(digits.test)
    x, y = x[:96], y[:96]
    model = trained_digits_model
    aa = build_attack("autoattack-fast", eps=0.3)
    robust = np.mean(np.argmax(model(np.asarray(aa(model, x, y))), -1) == y)
    assert robust <= 0.01


@pytest.mark.parametrize("kwargs, needle", [
    ({"version": "plus"}, "version must be one of"),
    ({"eps": -1.0}, "eps must be"),
    ({"norm": "l1"}, "norm must be 'linf' or 'l2'"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AutoAttack(**kwargs)
