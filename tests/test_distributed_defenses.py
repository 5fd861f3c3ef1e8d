"""Every defense trains the same on two logical devices as on one (issue 8).

Two optimizer steps of each defense on two replicas (MirroredStrategy over two logical CPUs, the
global batch split in halves) must give the weights and the logged loss of the same two steps on
one device: the per-replica losses are scaled by the global batch, the gradients all-reduced,
BatchNorm synchronized, and the metrics aggregated over both replicas. Randomness is removed
(attacks without random starts) so that both runs compute the same thing. The defenses covered
elsewhere: PGD-AT (`test_defense.py`), AT-AWP, TRADES-AWP, MART-AWP and ALP
(`test_regularized.py`), Feature Scattering (per-replica plans, `test_feature_scatter.py`) and
Gaussian noise augmentation (`test_smoothing.py`). Gaussian augmentation and stability training
draw their noise per replica by design (seeded by step and replica, `add_training_noise`), so
their two layouts see different noise and are not compared here.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv.attacks import PGD
from tfadv.defenses import (MMC, FreeAdversarialTraining, IntervalBoundPropagation,
                            PGDAdversarialTraining, StandardTraining, TRADES)
from tfadv.heads import he_model, mmc_model


def _backbone(batch_norm=True):
    def build(input_shape, num_classes):
        inputs = keras.Input(input_shape, name="images")
        h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
        if batch_norm:
            h = keras.layers.BatchNormalization(synchronized=True)(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(16, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(h))
    return build


def _attack(eps=0.2):
    return PGD(eps=eps, step_size=0.05, steps=3, random_start=None)


# name -> (base model builder, defense builder)
DEFENSES = {
    "standard": (lambda: _backbone()((8, 8, 1), 10), StandardTraining),
    "TRADES": (lambda: _backbone()((8, 8, 1), 10),
               # eps = 0: TRADES' attack needs a random start, which differs between layouts.
               lambda b: TRADES(b, attack=PGD(eps=0.0, step_size=0.05, steps=1,
                                              random_start=None, loss_fn="kl_divergence"))),
    # c_mm = 1: with the paper's 10 the squared distances (~100) amplify the summation-order
    # differences of two replicas to ~2e-4 relative.
    "MMC": (lambda: mmc_model((8, 8, 1), 10, backbone=_backbone(), dim=16, c_mm=1.0),
            lambda b: MMC(b, attack=_attack())),
    "PGD-AT+HE": (lambda: he_model((8, 8, 1), 10, backbone=_backbone(), scale=15.0),
                  lambda b: PGDAdversarialTraining(b, attack=_attack(), margin=0.2)),
    "IBP": (lambda: _backbone(batch_norm=False)((8, 8, 1), 10),
            lambda b: IntervalBoundPropagation(b, eps=0.1, warmup_steps=0, rampup_steps=0,
                                               eval_attack=_attack())),
    "FreeAT": (lambda: _backbone()((8, 8, 1), 10),
               lambda b: FreeAdversarialTraining(b, eps=0.1, replays=2, batch_size=16)),
}


def _two_steps(strategy, name, initial):
    make_base, make_defense = DEFENSES[name]
    rng = np.random.RandomState(0)
    x, y = rng.rand(32, 8, 8, 1).astype("float32"), np.arange(32) % 10
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = make_base()
        if initial is not None:
            base.set_weights(initial)
        model = make_defense(base)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    loss = model.fit(ds, epochs=1, verbose=0).history["loss"]
    return [w.numpy() for w in base.weights], loss


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_two_replicas_match_one_device(two_replicas, name):
    keras.utils.set_random_seed(0)
    initial = DEFENSES[name][0]().get_weights()
    one, loss_one = _two_steps(tf.distribute.OneDeviceStrategy("/cpu:0"), name, initial)
    two, loss_two = _two_steps(two_replicas, name, initial)
    moved = max(np.abs(a - b).max() for a, b in zip(one, initial))
    assert moved > 1e-4, "the steps did not change the weights"
    # Synchronized BatchNorm sums its statistics in another order on two replicas.
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(loss_one, loss_two, rtol=2e-5)
