"""Patch attacks (tfadv.attacks.patch): geometry, closed-form checks on a linear model whose only
vulnerable spot is known, the patch constraint as a property, and the registry."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv.attacks.patch import (PatchPGD, UniversalPatch, apply_patch, check_patch_size,
                                 patch_box, patch_locations, patch_masks, place_patch)
from tfadv.attacks.registry import build_attack

SIDE = 8


class CornerModel(keras.Model):
    """Two classes: logit 0 is the constant ``bias``, logit 1 the sum of the pixels of the 2x2
    block in the bottom-right corner (rows and columns 6-7). A 2x2 patch fools it at label 0 only
    at the last location (6, 6), and only when ``bias`` < 4."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias
        weights = np.zeros((1, SIDE, SIDE, 1), np.float32)
        weights[0, 6:, 6:] = 1.0
        self.weights_map = tf.constant(weights)

    def call(self, x, training=False):
        corner = tf.reduce_sum(x * self.weights_map, axis=[1, 2, 3])
        return tf.stack([tf.fill(tf.shape(corner), self.bias), corner], axis=1)


def _changed(x, x_adv):
    return np.argwhere(np.abs(x_adv - x).max(axis=-1) > 0)


def test_locations_cover_every_corner_including_the_last_row_and_column():
    locations = patch_locations((28, 28, 1), 5)
    assert len(locations) == 24 * 24
    assert locations.max(axis=0).tolist() == [23, 23]
    strided = patch_locations((28, 28, 1), 5, stride=5)
    assert sorted(set(strided[:, 0])) == [0, 5, 10, 15, 20, 23]  # 23 added: 5 does not divide 23
    with pytest.raises(ValueError, match=r"size: a 9x9 patch does not fit a 8x8 image"):
        check_patch_size(9, (8, 8, 1), name="size")
    with pytest.raises(ValueError, match="size"):
        PatchPGD(2)(CornerModel(1.0), np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.int64))


def test_masks_box_and_placement_agree():
    locations = patch_locations((SIDE, SIDE, 1), 3)
    masks = patch_masks((SIDE, SIDE, 1), 3, locations).numpy()
    assert masks.shape == (36, SIDE, SIDE, 1) and (masks.sum(axis=(1, 2, 3)) == 9).all()
    r, c = locations[-1]
    assert masks[-1, r:r + 3, c:c + 3].all()
    x = np.random.default_rng(0).random((36, SIDE, SIDE, 1)).astype(np.float32)
    lower, upper = (np.asarray(t) for t in patch_box(x, masks))
    patch = np.random.default_rng(1).random((3, 3, 1)).astype(np.float32)
    canvas, placed = place_patch(tf.constant(patch), locations, (SIDE, SIDE, 1))
    np.testing.assert_array_equal(placed.numpy(), masks)
    patched = apply_patch(x, canvas, placed).numpy()
    assert (lower <= patched).all() and (patched <= upper).all()
    np.testing.assert_allclose(patched[-1, r:r + 3, c:c + 3], patch)


@pytest.mark.parametrize("attack", [
    PatchPGD(2, steps=20, step_size=0.1),
    PatchPGD(2, steps=20, step_size=0.25, locations=1, screen_steps=4),
    PatchPGD(2, steps=20, step_size=0.1, max_batch=5),  # many chunks
], ids=["all", "screen", "chunked"])
def test_patch_pgd_finds_the_only_vulnerable_location(attack):
    x = np.zeros((3, SIDE, SIDE, 1), np.float32)
    y = np.zeros(3, np.int64)
    x_adv = attack(CornerModel(3.5), x, y).numpy()
    assert (np.argmax(CornerModel(3.5)(x_adv), 1) == 1).all()
    for image in x_adv:  # the patch at (6, 6): the last row and column of locations
        assert _changed(x[0], image).tolist() == [[6, 6], [6, 7], [7, 6], [7, 7]]


def test_patch_pgd_reaches_the_maximal_loss_when_it_cannot_fool():
    # bias 4.5: the corner logit is at most 4, so no patch fools; the strongest patch sets the
    # corner to 1 (the closed-form optimum of the loss) and the model still says 0.
    x = np.zeros((2, SIDE, SIDE, 1), np.float32)
    x_adv = PatchPGD(2, steps=30, step_size=0.1)(CornerModel(4.5), x, np.zeros(2, np.int64))
    assert (np.argmax(CornerModel(4.5)(x_adv), 1) == 0).all()
    np.testing.assert_allclose(x_adv.numpy()[:, 6:, 6:], 1.0)
    assert np.abs(x_adv.numpy()[:, :6]).max() == 0 and np.abs(x_adv.numpy()[:, :, :6]).max() == 0


def test_patch_pgd_changes_one_square_of_real_images_only():
    rng = np.random.default_rng(0)
    x = rng.random((6, 12, 12, 3)).astype(np.float32)
    model = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.Flatten(), keras.layers.Dense(5)])
    y = rng.integers(0, 5, 6)
    for attack in (PatchPGD(4, steps=3, locations=2, screen_steps=1, eot_samples=2),
                   UniversalPatch(4, steps=3)):
        x_adv = attack(model, x, y).numpy()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        for clean, adv in zip(x, x_adv):
            changed = _changed(clean, adv)
            if len(changed):  # inside one 4x4 square
                assert (changed.max(axis=0) - changed.min(axis=0) <= 3).all()


def test_universal_patch_is_one_patch_that_fools_every_image():
    x = np.zeros((8, SIDE, SIDE, 1), np.float32)
    y = np.zeros(8, np.int64)
    attack = UniversalPatch(2, steps=100, step_size=0.05, batch_size=16)
    patch = attack.fit(CornerModel(3.5), x, y)
    assert patch.shape == (2, 2, 1)
    np.testing.assert_allclose(patch, 1.0)  # the closed-form best patch
    x_adv = attack(CornerModel(3.5), x, y).numpy()
    assert (np.argmax(CornerModel(3.5)(x_adv), 1) == 1).all()


def test_registry_builds_patch_attacks_for_the_patch_norm_only():
    attack = build_attack("patch", 5, "patch")
    assert (attack.size, attack.locations, attack.steps, attack.step_size) == (5, "all", 150, 0.05)
    assert build_attack("patch-fast", 5, "patch").locations == 10
    assert build_attack("patch-random80", 5, "patch").screen_steps == 0
    assert isinstance(build_attack("upatch", 3, "patch"), UniversalPatch)
    with pytest.raises(ValueError, match="is a patch attack: use norm 'patch'"):
        build_attack("patch", 5, "linf")
    with pytest.raises(ValueError, match="is not a patch attack"):
        build_attack("pgd20", 5, "patch")
    with pytest.raises(ValueError, match="locations must be 'all' or an integer"):
        PatchPGD(3, locations="most")
