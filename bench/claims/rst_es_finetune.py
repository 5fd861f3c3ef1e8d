#!/usr/bin/env python3
"""Checks the RST, early-stopping and pre-training claims at digits scale (issue 5).

Usage: python bench/claims/rst_es_finetune.py [--study rst|early_stopping|finetune|all]
                                              [--out runs/claims5]

- rst: RST_adv (rst.gin: TRADES on 20% of the digits labels + pseudo-labels of the other 80% from
  a standard teacher, bin/pseudo_label --gin_file=rst_teacher.gin) against the same TRADES run on
  the labelled 20% alone (Carmon et al. 2019: unlabelled data improves robust accuracy).
- early_stopping: early_stopping.gin (PGD-AT on 251 labelled digits, 400 epochs); test robust
  accuracy of the selected checkpoint against the last epoch's (Rice et al. 2020).
- finetune: pretrain.gin (PGD-AT on digits 0-4), then finetune.gin (digits 5-9, 10 epochs) against
  PGD-AT from scratch on digits 5-9 (40 epochs, constant learning rate): epochs until the
  validation robust accuracy first reaches 90% of the fine-tuned run's best (Hendrycks et al.
  2019: pre-training reaches robustness faster).

Every run is `bin/train` (or `bin/pseudo_label`) in its own process; a finished run is reused.
Writes `claims.json`, `claims.md` and `early_stopping.png`, `finetune.png` to ``--out``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bin(tool, args):
    command = [sys.executable, os.path.join(ROOT, "bin", tool), *args]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def train(out, name, gin_files, params=()):
    model_dir = os.path.join(out, name)
    if not os.path.exists(os.path.join(model_dir, "report.json")):
        _bin("train", [*[f"--gin_file={g}" for g in gin_files], f"--model_dir={model_dir}",
                       "--gin_param=train.verbose = 0", *[f"--gin_param={p}" for p in params]])
    with open(os.path.join(model_dir, "report.json")) as f:
        return json.load(f)


def rst(out):
    teacher = os.path.join(out, "rst_teacher")
    pseudo = os.path.join(teacher, "pseudo_labeled.npz")
    if not os.path.exists(pseudo):
        _bin("pseudo_label", ["--gin_file=rst_teacher.gin", f"--teacher_dir={teacher}",
                              "--gin_param=train.verbose = 0"])
    with open(os.path.join(teacher, "report.json")) as f:
        teacher_report = json.load(f)
    import numpy as np

    with np.load(pseudo) as f:
        metadata = json.loads(str(f["metadata"]))
    rows = {
        "teacher (standard, 20% labels)": teacher_report,
        "TRADES, 20% labels only": train(out, "rst_labeled_only", ["rst.gin"],
                                         ["load_dataset.pseudo_labeled = None"]),
        "RST_adv, 20% labels + 80% pseudo-labels": train(
            out, "rst", ["rst.gin"], [f"load_dataset.pseudo_labeled = '{pseudo}'"]),
    }
    lines = [f"Teacher accuracy on the labelled validation split: "
             f"{100 * metadata['teacher_validation_accuracy']:.2f}%; "
             f"{metadata['num_examples']} pseudo-labelled images.", "",
             "| run | clean test | PGD-40 test | FGSM test |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['clean_accuracy']:.2f}% | "
                     f"{100 * r['robust_accuracy']['PGD-40']:.2f}% | "
                     f"{100 * r['robust_accuracy']['FGSM']:.2f}% |")
    return {k: _summary(v) for k, v in rows.items()}, lines


def _summary(report):
    return {"clean": report["clean_accuracy"], "robust": report["robust_accuracy"],
            "train_seconds": report.get("train_seconds"),
            "early_stopping": report.get("early_stopping"), "last": report.get("last")}


def early_stopping(out):
    report = train(out, "early_stopping", ["early_stopping.gin"])
    es, last = report["early_stopping"], report["last"]
    lines = [f"Selected epoch {es['selected_epoch']} of {report['epochs']} "
             f"(validation PGD-10 {100 * es['selected_value']:.2f}%).", "",
             "| checkpoint | clean test | PGD-40 test |", "|---|---|---|",
             f"| selected (best validation) | {100 * report['clean_accuracy']:.2f}% | "
             f"{100 * report['robust_accuracy']['PGD-40']:.2f}% |",
             f"| last epoch | {100 * last['clean_accuracy']:.2f}% | "
             f"{100 * last['robust_accuracy']['PGD-40']:.2f}% |"]
    history = report["history"]
    freq = es["validation_freq"]
    val_epochs = [freq * (i + 1) for i in range(len(history["val_robust_accuracy"]))]
    _plot(os.path.join(out, "early_stopping.png"), "Early stopping (PGD-AT, 251 digits)",
          [("train adversarial accuracy", list(range(1, len(history["adv_accuracy"]) + 1)),
            history["adv_accuracy"]),
           ("validation PGD-10 accuracy", val_epochs, history["val_robust_accuracy"])],
          marker=es["selected_epoch"])
    return {"early_stopping": _summary(report)}, lines


def _first_epoch(curve, threshold):
    return next((i + 1 for i, v in enumerate(curve) if v >= threshold), None)


def finetune(out):
    source = train(out, "pretrain", ["pretrain.gin"])
    tuned = train(out, "finetune", ["finetune.gin"],
                  [f"train.initial_weights = '{os.path.join(out, 'pretrain')}'",
                   "train.epochs = 10", "Cosine.epochs = 10"])
    scratch = train(out, "scratch_5_9", ["pgd_at.gin"],
                    ["load_dataset.classes = [5, 6, 7, 8, 9]", "train.epochs = 40",
                     "train.learning_rate = 1e-3"])
    tuned_curve = tuned["history"]["val_robust_accuracy"]
    scratch_curve = scratch["history"]["val_robust_accuracy"]
    threshold = 0.9 * max(tuned_curve)
    lines = [f"Threshold: 90% of the fine-tuned run's best validation PGD-10 accuracy = "
             f"{100 * threshold:.2f}%.", "",
             "| run | epochs to threshold | best val PGD-10 | clean test | PGD-40 test |",
             "|---|---|---|---|---|"]
    for name, r, curve in (("pre-trained on 0-4, fine-tuned on 5-9", tuned, tuned_curve),
                           ("from scratch on 5-9", scratch, scratch_curve)):
        lines.append(f"| {name} | {_first_epoch(curve, threshold) or 'not reached'} of "
                     f"{len(curve)} | {100 * max(curve):.2f}% | {100 * r['clean_accuracy']:.2f}% "
                     f"| {100 * r['robust_accuracy']['PGD-40']:.2f}% |")
    lines.append(f"\nSource model (digits 0-4): clean {100 * source['clean_accuracy']:.2f}%, "
                 f"PGD-40 {100 * source['robust_accuracy']['PGD-40']:.2f}%.")
    _plot(os.path.join(out, "finetune.png"), "Digits 5-9: fine-tuned vs from scratch",
          [("fine-tuned (val PGD-10)", list(range(1, len(tuned_curve) + 1)), tuned_curve),
           ("from scratch (val PGD-10)", list(range(1, len(scratch_curve) + 1)), scratch_curve)],
          hline=threshold)
    return {"finetune": _summary(tuned), "scratch": _summary(scratch),
            "threshold": threshold}, lines


def _plot(path, title, curves, marker=None, hline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, x, y in curves:
        ax.plot(x, [100 * v for v in y], label=label)
    if marker is not None:
        ax.axvline(marker, color="gray", linestyle="--", label=f"selected epoch {marker}")
    if hline is not None:
        ax.axhline(100 * hline, color="gray", linestyle=":", label="threshold")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


STUDIES = {"rst": rst, "early_stopping": early_stopping, "finetune": finetune}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="all", choices=["all", *STUDIES])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "claims5"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results, lines = {}, []
    for name in (list(STUDIES) if args.study == "all" else [args.study]):
        result, table = STUDIES[name](args.out)
        results[name] = result
        lines += [f"### {name}", "", *table, ""]
    with open(os.path.join(args.out, "claims.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "claims.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {args.out}/claims.md")


if __name__ == "__main__":
    main()
