#!/usr/bin/env python3
"""Seconds per PGD-AT epoch on digits under each single-device distribution strategy.

Usage: python bench/strategy_overhead.py [--epochs 3]
Measures Keras `fit` of PGDAdversarialTraining (digits CNN, batch 64, PGD-10) after one warm-up
epoch, and the same train step written by hand in a tf.function under `strategy.run`.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfadv import data, models  # noqa: E402
from tfadv.attacks import PGD, cross_entropy  # noqa: E402
from tfadv.defenses import PGDAdversarialTraining  # noqa: E402

STRATEGIES = {
    "default": tf.distribute.get_strategy,
    "one_device": lambda: tf.distribute.OneDeviceStrategy("/cpu:0"),
    "mirrored(1 replica)": lambda: tf.distribute.MirroredStrategy(["/cpu:0"]),
}


def fit_seconds(strategy, dataset, epochs):
    with strategy.scope():
        model = PGDAdversarialTraining(models.digits_cnn(),
                                       attack=PGD(eps=0.3, step_size=0.075, steps=10))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / epochs


def manual_step_ms(strategy, x, y, repeats=20):
    with strategy.scope():
        base = models.digits_cnn()
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(base.trainable_variables)
    attack = PGD(eps=0.3, step_size=0.075, steps=10)

    def step():
        x_adv = attack(base, x, y)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(cross_entropy(y, base(x_adv, training=True)))
        optimizer.apply(tape.gradient(loss, base.trainable_variables), base.trainable_variables)
        return loss

    fn = tf.function(lambda: strategy.run(step))
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    digits = data.load_dataset("digits", batch_size=64)
    x, y = next(iter(digits.train))
    print(f"{'strategy':<22} {'fit s/epoch':>12} {'hand-written step ms':>22}")
    for name, make in STRATEGIES.items():
        print(f"{name:<22} {fit_seconds(make(), digits.train, args.epochs):12.2f} "
              f"{manual_step_ms(make(), x, y):22.1f}")


if __name__ == "__main__":
    main()
