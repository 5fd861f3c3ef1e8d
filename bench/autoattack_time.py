#!/usr/bin/env python3
"""Time of tfadv's evaluation with the standard AutoAttack, on 1 and on 2 devices.

Usage (about 10 minutes on 2 CPU cores with the defaults):

    python bench/autoattack_time.py --digits_model runs/pgd_at --out bench/results/autoattack

writes ``autoattack_time.md`` and ``.json`` to ``--out``. Two workloads:

- digits: ``tfadv.evaluation.evaluate`` with the standard AutoAttack (no sanity checks, no curve)
  on the first ``--digits_examples`` test digits against a trained model (a bin/train model_dir:
  an untrained model is fooled by the first component and times nothing), batch 128.
- PreActResNet-18 on CIFAR-shaped random images (32x32x3), randomly initialised, batch
  ``--resnet_batch``, the labels set to the model's own predictions so every example is attacked.
  Every example falls to APGD-CE, so this times APGD-CE's 100 iterations (the part every example
  pays); a robust model sends the survivors on to APGD-T, FAB-T and Square.

Each is timed with the strategy over one device and over two: two GPUs where there are, else two
logical CPU devices on the same cores (which shows the overhead of the parallel path, not a
speed-up: the cores are shared). The result is seconds per 1,000 images; the 1- and 2-device
per-example results are compared and must be identical.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _devices():
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        return ["/gpu:0", "/gpu:1"]
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    return ["/cpu:0", "/cpu:1"]


def _time(model, data, strategy, eps):
    from tfadv import evaluation
    from tfadv.attacks import AutoAttack

    start = time.perf_counter()
    result = evaluation.evaluate(model, data, attacks={"autoattack": AutoAttack(eps)},
                                 sanity=False, verbose=0, strategy=strategy)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits_model", required=True, help="a bin/train model_dir (digits)")
    parser.add_argument("--digits_examples", type=int, default=360)
    parser.add_argument("--resnet_examples", type=int, default=32)
    parser.add_argument("--resnet_batch", type=int, default=16)
    parser.add_argument("--out", default="bench/results/autoattack")
    args = parser.parse_args()
    devices = _devices()
    import keras

    from tfadv import data as data_lib
    from tfadv import evaluation, models

    two = tf.distribute.MirroredStrategy(devices)
    rows = []
    digits_model = evaluation.load_classifier(args.digits_model)
    digits = data_lib.load_dataset("digits", batch_size=128, augment=False).test.unbatch().take(
        args.digits_examples).batch(128)
    keras.utils.set_random_seed(0)
    resnet = models.preact_resnet18(input_shape=(32, 32, 3), num_classes=10)
    images = np.random.RandomState(0).rand(args.resnet_examples, 32, 32, 3).astype("float32")
    labels = np.argmax(np.asarray(resnet(images, training=False)), -1)
    cifar = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.resnet_batch)
    for name, model, dataset, eps, n in [
            ("digits CNN (PGD-AT), 8x8x1, eps 0.3", digits_model, digits, 0.3,
             args.digits_examples),
            ("PreActResNet-18 (random init), 32x32x3, eps 8/255", resnet, cifar, 8 / 255,
             args.resnet_examples)]:
        _time(model, dataset.take(1), None, eps)  # warm-up: traces
        one_s, one = _time(model, dataset, None, eps)
        _time(model, dataset.take(1), two, eps)
        two_s, two_r = _time(model, dataset, two, eps)
        same = one["per_example"] == two_r["per_example"]
        rows.append({"workload": name, "examples": n,
                     "robust_accuracy": one["robust_accuracy"]["autoattack"],
                     "seconds_1_device": round(one_s, 1), "seconds_2_devices": round(two_s, 1),
                     "per_1000_1_device": round(1000 * one_s / n, 1),
                     "per_1000_2_devices": round(1000 * two_s / n, 1),
                     "identical_results": same})
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "autoattack_time.json"), "w") as f:
        json.dump({"devices": devices, "load_average": os.getloadavg(), "rows": rows}, f,
                  indent=1)
    lines = [f"devices: {', '.join(devices)}; load average {os.getloadavg()[0]:.2f}", "",
             "| workload | examples | AA robust acc. | s / 1,000 images, 1 device | "
             "2 devices | identical |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['examples']} | {100 * r['robust_accuracy']:.1f}% | "
              f"{r['per_1000_1_device']} | {r['per_1000_2_devices']} | "
              f"{'yes' if r['identical_results'] else 'NO'} |" for r in rows]
    with open(os.path.join(args.out, "autoattack_time.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
