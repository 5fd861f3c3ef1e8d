#!/usr/bin/env python3
"""Certified accuracy curves of randomized smoothing models at several sigmas (issue 7).

Usage: python bench/claims/smoothing_curves.py RUN_OR_CERTIFY_JSON [...] [--radii=0,0.25,0.5,0.75,1.0]
         [--plot=bench/results/smoothing_certified.png]

Each argument is a bin/certify certify.json, or a bin/train model_dir holding one in
``certify/`` (Cohen et al. 2019; the models from ``bin/train --gin_file=smoothing.gin``). Draws
all the curves (certified accuracy against L2 radius, one per sigma) into one PNG and prints a
markdown table: certified accuracy per radius, abstentions, the base classifier's clean accuracy,
and the seconds of training (report.json) and certification, for BUILD.md. Nothing is recomputed
from the models: the numbers are those of the certify.json files (per-example records).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load(path):
    """The certify.json at ``path`` (a file, or a model_dir with certify/certify.json) and the
    report.json of its model_dir when there is one."""
    if os.path.isdir(path):
        path = os.path.join(path, "certify", "certify.json")
    with open(path) as f:
        result = json.load(f)
    report_path = os.path.join(result["settings"]["model"], "report.json")
    report = None
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    return result, report


def markdown_table(results, radii):
    """The BUILD.md table: one row per certify.json, certified accuracy at each radius."""
    from tfadv.certify.smoothing import certified_accuracy

    head = ["sigma", *[f"r = {r:g}" for r in radii], "abstained", "base clean accuracy",
            "train s", "certify s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result, report in results:
        accs = certified_accuracy(result["records"], radii)
        train = f"{report['train_seconds']:.0f}" if report else "n/a"
        row = [f"{result['settings']['sigma']:g}", *[f"{100 * a:.2f}%" for a in accs],
               f"{result['abstained']} / {result['num_examples']}",
               f"{100 * result['base_clean_accuracy']:.2f}%", train,
               f"{result['total_seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="certify.json files or model_dirs")
    parser.add_argument("--radii", default="0,0.25,0.5,0.75,1.0")
    parser.add_argument("--plot", default=os.path.join(ROOT, "bench", "results",
                                                       "smoothing_certified.png"))
    args = parser.parse_args()
    radii = [float(r) for r in args.radii.split(",")]
    from tfadv.certify.smoothing import plot_certified_accuracy

    results = [load(path) for path in args.runs]
    settings = results[0][0]["settings"]
    curves = {f"sigma={r['settings']['sigma']:g}": r["records"] for r, _ in results}
    plot_certified_accuracy(curves, args.plot, title=(
        f"{settings['dataset']} {settings['split']} ({results[0][0]['num_examples']} examples): "
        f"certified accuracy, n={settings['n']}, alpha={settings['alpha']:g}"))
    print(markdown_table(results, radii))
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
