#!/usr/bin/env python3
"""What tfadv's evaluation says about deliberately masked models, and what its remedies find.

Usage (about 5 minutes on 2 CPU cores with --examples 32):

    python bench/claims/masked_models.py --examples 32 --eps 0.15 --out bench/results/masked

A digits CNN trained normally (8 epochs, Adam 3e-3, seed 1: the model of the test suite) is
wrapped four ways that fool gradient attacks: logits x 1e4 (a saturated softmax), input
quantisation (``tf.round(8 x) / 8``, zero gradient), ``tf.stop_gradient`` pre-processing (no
gradient path) and Gaussian input noise (sigma 0.3, a randomised model). Each is evaluated by
`tfadv.evaluation.evaluate` with PGD-10 and the standard AutoAttack on the first ``--examples``
test digits; the table gives the verdict, the plain numbers, the remedies that ran and the
headline. Writes ``masked.md`` and ``masked.json`` to ``--out``.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def _wrapped(base, fn, before):
    inputs = keras.Input((8, 8, 1))
    if before:
        return keras.Model(inputs, base(keras.layers.Lambda(fn)(inputs)))
    return keras.Model(inputs, keras.layers.Lambda(fn)(base(inputs)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.15)
    parser.add_argument("--out", default="bench/results/masked")
    args = parser.parse_args()
    from tfadv import data, evaluation, models
    from tfadv.attacks.registry import build_attack
    from tfadv.defenses import StandardTraining

    digits = data.load_dataset("digits", batch_size=128)
    keras.utils.set_random_seed(1)
    base = models.digits_cnn()
    trainer = StandardTraining(base)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    trainer.fit(digits.train, epochs=8, verbose=0)
    test = digits.test.unbatch().take(args.examples).batch(args.examples)
    variants = {
        "plain": base,
        "logits x 1e4": _wrapped(base, lambda z: 1e4 * z, before=False),
        "quantised input": _wrapped(base, lambda t: tf.round(t * 8) / 8, before=True),
        "stop_gradient pre-processing": _wrapped(base, tf.stop_gradient, before=True),
        "input noise (sigma 0.3)": _wrapped(
            base, lambda t: t + tf.random.normal(tf.shape(t), stddev=0.3), before=True),
    }
    rows = []
    for name, model in variants.items():
        result = evaluation.evaluate(model, test,
                                     attacks={"pgd10": build_attack("pgd10", args.eps)},
                                     curve_fractions=(0.0, 1.0), verbose=0)
        remedies = {r["name"]: r["accuracy"] for r in result["remedies"]}
        rows.append({"model": name, "verdict": result["headline"]["verdict"],
                     "clean": result["clean_accuracy"],
                     "pgd10": result["robust_accuracy"]["pgd10"],
                     "autoattack": result["robust_accuracy"]["autoattack"],
                     "remedies": remedies, "headline": result["headline"]["accuracy"],
                     "exit_status": evaluation.exit_code(result)})
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "masked.json"), "w") as f:
        json.dump({"examples": args.examples, "eps": args.eps, "rows": rows}, f, indent=1)
    lines = [f"{args.examples} test digits, L-inf eps {args.eps}", "",
             "| model | verdict | exit | clean | PGD-10 | AutoAttack | remedies | headline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        remedies = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["remedies"].items()) or "-"
        lines.append(f"| {r['model']} | {r['verdict']} | {r['exit_status']} | "
                     f"{100 * r['clean']:.1f}% | {100 * r['pgd10']:.1f}% | "
                     f"{100 * r['autoattack']:.1f}% | {remedies} | {100 * r['headline']:.1f}% |")
    with open(os.path.join(args.out, "masked.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
