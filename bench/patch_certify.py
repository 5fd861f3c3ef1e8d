#!/usr/bin/env python3
"""Throughput of the IBP patch certificate over every location, against plain interval passes.

Usage (about 2 minutes on 2 CPU cores):

    python bench/patch_certify.py --examples 64 --sizes 2,5 --out bench/results/patch

Certifying N images against m x m patches bounds N * L boxes, L = (H - m + 1)(W - m + 1)
(576 for 5x5 on 28x28). The reference is what that must cost at least: N * L interval forward
passes (`tfadv.certify.ibp.worst_case_logits` on precomputed boxes, in the same chunks of
``--max_batch`` boxes, one compiled function). The ratio certify / reference is the overhead of
building the boxes from the masks, chunking and taking the maximum over locations; 1.0 would
be free. Models: Chiang et al.'s MLP (784-255-10) and Madry et al.'s MNIST CNN, untrained (the
speed of interval arithmetic does not depend on the weights). Writes ``certify_throughput.md``
and ``.json``.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _best_of(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--sizes", default="2,5")
    parser.add_argument("--max_batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "patch"))
    args = parser.parse_args()
    from tfadv import data, models
    from tfadv.attacks.patch import patch_box
    from tfadv.certify import ibp, patch
    from tfadv.defenses import chiang_mlp

    mnist = data.load_dataset("mnist_5k", batch_size=args.examples)
    x, y = (np.asarray(t) for t in next(iter(mnist.test)))
    rows = []
    for name, build in (("MLP 784-255-10", chiang_mlp), ("Madry CNN", models.madry_mnist_cnn)):
        model = build()
        for size in (int(s) for s in args.sizes.split(",")):
            masks = patch.all_patch_masks(x.shape[1:], size)
            boxes = len(x) * int(masks.shape[0])
            certify = _best_of(lambda: patch.certify_patch(model, x, y, size, args.max_batch),
                               args.repeats)
            # The reference: the same boxes, precomputed, through worst_case_logits in chunks.
            lower, upper = patch_box(x[:, None], masks.numpy()[None])
            lower = lower.reshape(-1, *x.shape[1:])
            upper = upper.reshape(-1, *x.shape[1:])
            labels = np.repeat(y, int(masks.shape[0])).astype(np.int32)
            passes = tf.function(lambda lo, hi, t: ibp.worst_case_logits(model, lo, hi, t),
                                 reduce_retracing=True)
            chunks = [(tf.constant(lower[i:i + args.max_batch]),
                       tf.constant(upper[i:i + args.max_batch]),
                       tf.constant(labels[i:i + args.max_batch]))
                      for i in range(0, boxes, args.max_batch)]
            reference = _best_of(lambda: [passes(*c).numpy() for c in chunks], args.repeats)
            rows.append({"model": name, "patch": size, "boxes": boxes,
                         "certify_s": certify, "interval_passes_s": reference,
                         "boxes_per_s": boxes / certify, "ratio": certify / reference})
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "certify_throughput.json"), "w") as f:
        json.dump({"examples": len(x), "max_batch": args.max_batch, "rows": rows}, f, indent=1)
    lines = [f"{len(x)} mnist_5k test images, max_batch {args.max_batch}, best of "
             f"{args.repeats}", "",
             "| model | patch | boxes | certify (s) | interval passes (s) | boxes/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['patch']}x{r['patch']} | {r['boxes']} | "
              f"{r['certify_s']:.2f} | {r['interval_passes_s']:.2f} | {r['boxes_per_s']:.0f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    with open(os.path.join(args.out, "certify_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
