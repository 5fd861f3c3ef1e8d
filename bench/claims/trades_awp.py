#!/usr/bin/env python3
"""Checks the TRADES and AWP papers' claims at digits scale (issue 4), with the shipped gin files.

Usage: python bench/claims/trades_awp.py [--study trades_beta|awp_gap|all] [--out runs/claims]

- trades_beta: `trades.gin` at several beta (TRADES, Zhang et al. 2019, Table 4: as beta = 1/lambda
  grows, robust accuracy rises while clean accuracy stays about level).
- awp_gap: `pgd_at.gin` vs `awp.gin`, `trades.gin` vs `trades_awp.gin`, plus `mart.gin` and
  `alp.gin` (AWP, Wu et al. 2020: AWP narrows the gap between training and test robust accuracy).

Each run is `bin/train` in its own process (a finished run is reused: delete its directory to
redo it). Afterwards every model is attacked with PGD-40 (eps 0.3, step 0.01, uniform start,
the reports' attack) on the full training split and on the test split. Writes `claims.json`,
`claims.md` (the tables for BUILD.md) and `trades_beta.png` to ``--out``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BETAS = [0.1, 0.5, 1.0, 3.0, 6.0]
STUDIES = {
    "trades_beta": [(f"trades_beta{b:g}", "trades.gin", [f"TRADES.beta = {b}"]) for b in BETAS],
    "awp_gap": [("pgd_at", "pgd_at.gin", []), ("awp", "awp.gin", []),
                ("trades", "trades.gin", []), ("trades_awp", "trades_awp.gin", []),
                ("mart", "mart.gin", []), ("alp", "alp.gin", [])],
}


def run(name, gin_file, params, out):
    model_dir = os.path.join(out, name)
    if os.path.exists(os.path.join(model_dir, "report.json")):
        print(f"{name}: reusing {model_dir}")
    else:
        command = [sys.executable, os.path.join(ROOT, "bin", "train"), f"--gin_file={gin_file}",
                   f"--model_dir={model_dir}", "--gin_param=train.verbose = 0",
                   *[f"--gin_param={p}" for p in params]]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    with open(os.path.join(model_dir, "report.json")) as f:
        return json.load(f)


def robust_accuracy(model, dataset):
    import numpy as np
    from tfadv.attacks import PGD

    attack = PGD(eps=0.3, step_size=0.01, steps=40, random_start="uniform", seed=0)
    clean = robust = total = 0
    for x, y in dataset:
        x_adv = attack(model, x, y)
        clean += int(np.sum(np.argmax(model(x, training=False), -1) == y.numpy()))
        robust += int(np.sum(np.argmax(model(x_adv, training=False), -1) == y.numpy()))
        total += len(y)
    return clean / total, robust / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="all", choices=["all", *STUDIES])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "claims"))
    args = parser.parse_args()
    names = list(STUDIES) if args.study == "all" else [args.study]
    start = time.perf_counter()
    reports = {}
    for study in names:
        for name, gin_file, params in STUDIES[study]:
            reports[name] = (study, gin_file, params, run(name, gin_file, params, args.out))

    import keras
    from tfadv import data

    digits = data.load_dataset("digits", batch_size=256, augment=False)
    results = {}
    for name, (study, gin_file, params, report) in reports.items():
        model = keras.models.load_model(os.path.join(args.out, name, "model.keras"))
        train_clean, train_robust = robust_accuracy(model, digits.train)
        test_clean, test_robust = robust_accuracy(model, digits.test)
        results[name] = {"study": study, "gin_file": gin_file, "params": params,
                         "train_clean": train_clean, "train_robust": train_robust,
                         "test_clean": test_clean, "test_robust": test_robust,
                         "gap": train_robust - test_robust,
                         "train_seconds": report["train_seconds"],
                         "best_val_robust": max(report["history"].get("val_robust_accuracy",
                                                                      [float("nan")]))}
        print(name, {k: v for k, v in results[name].items() if isinstance(v, float)}, flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "claims.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = []
    if "trades_beta" in names:
        lines += ["| beta (1/lambda) | clean test | PGD-40 test | best val PGD-10 |",
                  "|---|---|---|---|"]
        for b in BETAS:
            r = results[f"trades_beta{b:g}"]
            lines.append(f"| {b:g} | {100 * r['test_clean']:.2f}% | "
                         f"{100 * r['test_robust']:.2f}% | {100 * r['best_val_robust']:.2f}% |")
        lines.append("")
        _plot_beta(results, os.path.join(args.out, "trades_beta.png"))
    if "awp_gap" in names:
        lines += ["| run | gin | clean test | PGD-40 train | PGD-40 test | gap (train - test) "
                  "| best val PGD-10 |", "|---|---|---|---|---|---|---|"]
        for name, _, _ in STUDIES["awp_gap"]:
            r = results[name]
            lines.append(f"| {name} | {r['gin_file']} | {100 * r['test_clean']:.2f}% | "
                         f"{100 * r['train_robust']:.2f}% | {100 * r['test_robust']:.2f}% | "
                         f"{100 * r['gap']:.2f} | {100 * r['best_val_robust']:.2f}% |")
    with open(os.path.join(args.out, "claims.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {args.out}/claims.md")


def _plot_beta(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [100 * results[f"trades_beta{b:g}"]["test_clean"] for b in BETAS]
    robust = [100 * results[f"trades_beta{b:g}"]["test_robust"] for b in BETAS]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(BETAS, clean, "o-", label="clean")
    ax.plot(BETAS, robust, "s-", label="PGD-40 (eps 0.3)")
    ax.set_xscale("log")
    ax.set_xlabel("beta = 1/lambda")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("TRADES trade-off on digits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
