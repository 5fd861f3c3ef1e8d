#!/usr/bin/env python3
"""Export time and SavedModel size of tfadv.export against the weight bytes, and against Keras'
own ``model.export`` (which stores every variable twice; see tfadv/export.py).

Usage: python bench/export_size.py [--out /tmp/export_size] [--models digits_cnn,preact_resnet18]

Models have random weights (size and time do not depend on the values). Times include tfadv's
reload-and-compare check (``verify``), reported separately as an export without it. Prints a
Markdown table.
"""

import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _mb(n):
    return f"{n / 1e6:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/export_size")
    parser.add_argument("--models", default="digits_cnn,preact_resnet18")
    args = parser.parse_args()

    from tfadv import export, models

    rows = []
    for name in args.models.split(","):
        if name not in models.MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {sorted(models.MODELS)}")
        model = models.MODELS[name]()
        weights = export.weight_bytes(model)
        base = os.path.join(args.out, name)
        shutil.rmtree(base, ignore_errors=True)
        timings = {}
        for verify in (True, False):
            start = time.perf_counter()
            path = export.export_saved_model(model, os.path.join(base, "tfadv"), verify=verify)
            timings[verify] = time.perf_counter() - start
        start = time.perf_counter()
        model.export(os.path.join(base, "keras"), verbose=False)
        keras_seconds = time.perf_counter() - start
        variables = export.directory_bytes(os.path.join(path, "variables"))
        keras_variables = export.directory_bytes(os.path.join(base, "keras", "variables"))
        rows.append(
            f"| {name} | {_mb(weights)} | {_mb(variables)} ({variables / weights:.3f}x) | "
            f"{_mb(export.directory_bytes(path))} | {timings[True]:.1f} | {timings[False]:.1f} | "
            f"{_mb(keras_variables)} ({keras_variables / weights:.3f}x) | {keras_seconds:.1f} |")
    print("| model | weight MB | tfadv variables/ MB | tfadv SavedModel MB | export s (verify) "
          "| export s (no verify) | model.export variables/ MB | model.export s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
