#!/usr/bin/env python3
"""Clean, PGD-40 and IBP-verified accuracy on the 360 test digits, per L-inf eps, of the IBP
model (gin/ibp.gin) next to standard training (gin/standard.gin) and, when present, the PGD-AT
model (gin/pgd_at.gin; never retrained here: it takes about 10 minutes).

Usage: python bench/claims/ibp.py [--out runs/ibp_claims] [--ibp DIR] [--standard DIR]
       [--pgd_at runs/claims/pgd_at]

Missing runs are trained with `bin/train` in their own process; finished runs are reused.
Verified accuracy (`tfadv.certify.ibp.verified_accuracy`) is a lower bound on the accuracy under
any attack in the box [clip(x - eps, 0, 1), clip(x + eps, 0, 1)]; PGD-40 (uniform random start,
step 2.5 eps / 40) is an upper bound. Writes ``ibp_claims.json`` and ``ibp_claims.md`` to
``--out``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
EPSILONS = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]


def _train(gin_file, model_dir):
    if os.path.exists(os.path.join(model_dir, "report.json")):
        return
    command = [sys.executable, os.path.join(ROOT, "bin", "train"), f"--gin_file={gin_file}",
               f"--model_dir={model_dir}", "--gin_param=train.verbose = 0"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def _measure(model_dir, x, y):
    import numpy as np

    from tfadv import evaluation
    from tfadv.attacks import PGD
    from tfadv.certify import ibp

    model = evaluation.load_classifier(model_dir)
    clean = float(np.mean(np.argmax(model.predict(x, verbose=0), 1) == y))
    rows = {}
    for eps in EPSILONS:
        start = time.perf_counter()
        verified = ibp.verified_accuracy(model, (x, y), eps)
        seconds = time.perf_counter() - start
        attacked = clean
        if eps > 0:
            pgd = PGD(eps=eps, step_size=2.5 * eps / 40, steps=40, random_start="uniform")
            x_adv = pgd(model, x, y).numpy()
            attacked = float(np.mean(np.argmax(model.predict(x_adv, verbose=0), 1) == y))
        rows[str(eps)] = {"clean": clean, "pgd40": attacked, "verified": verified,
                          "verify_seconds": round(seconds, 2)}
    with open(os.path.join(model_dir, "report.json")) as f:
        report = json.load(f)
    return {"by_eps": rows, "train_seconds": report["train_seconds"],
            "report_verified": report.get("verified_accuracy")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ibp_claims"))
    parser.add_argument("--ibp", default=None, help="IBP run dir (default OUT/ibp)")
    parser.add_argument("--standard", default=None, help="standard run dir (default OUT/standard)")
    parser.add_argument("--pgd_at", default=os.path.join(ROOT, "runs", "claims", "pgd_at"))
    args = parser.parse_args()
    runs = {"ibp": args.ibp or os.path.join(args.out, "ibp"),
            "standard": args.standard or os.path.join(args.out, "standard")}
    _train("ibp.gin", runs["ibp"])
    _train("standard.gin", runs["standard"])
    if os.path.exists(os.path.join(args.pgd_at, "report.json")):
        runs["pgd_at"] = args.pgd_at

    from tfadv import data as data_lib

    test = data_lib.load_dataset("digits", batch_size=360).test
    x, y = next(iter(test))
    x, y = x.numpy(), y.numpy()
    results = {name: _measure(path, x, y) for name, path in runs.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ibp_claims.json"), "w") as f:
        json.dump({"num_examples": int(len(y)), "runs": runs, "results": results}, f, indent=2)
    lines = ["| model | eps | clean | PGD-40 | IBP verified |", "|---|---|---|---|---|"]
    for name, result in results.items():
        for eps, r in result["by_eps"].items():
            lines.append(f"| {name} | {eps} | {100 * r['clean']:.2f}% | {100 * r['pgd40']:.2f}% |"
                         f" {100 * r['verified']:.2f}% |")
    lines.append("")
    lines.append("| model | train s |")
    lines.append("|---|---|")
    for name, result in results.items():
        lines.append(f"| {name} | {result['train_seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "ibp_claims.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
