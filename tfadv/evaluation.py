"""Clean and robust accuracy of a classifier on a dataset, and the report table.

``robust_accuracy[name]`` is the fraction of examples still classified correctly after attack
``name``; ``worst_case_accuracy`` counts an example as robust only if it survives every attack.
"""

import time

import gin
import keras
import numpy as np
import tensorflow as tf


def check_logits_model(model, image_shape=None):
    """Raises ValueError unless ``model`` maps (batch, H, W, C) images to (batch, classes)."""
    out = model.output_shape if hasattr(model, "output_shape") else None
    if out is not None and len(out) != 2:
        raise ValueError(f"model must output (batch, num_classes) logits; got shape {out}.")
    inp = getattr(model, "input_shape", None)
    if image_shape is not None and inp is not None and tuple(inp[1:]) != tuple(image_shape):
        raise ValueError(
            f"dataset images have shape {tuple(image_shape)} but the model expects "
            f"{tuple(inp[1:])}.")


@gin.configurable(denylist=["model", "dataset"])
def evaluate(model, dataset, attacks=None, verbose=1):
    """Evaluates ``model`` (images in [0, 1] -> logits) on a batched ``dataset`` of (x, y).

    Args:
      attacks: dict ``name -> attack``; each attack is called as ``attack(model, x, y)``.
      verbose: show a progress bar per attack.

    Returns:
      dict with ``num_examples``, ``clean_accuracy``, ``robust_accuracy`` (per attack),
      ``worst_case_accuracy`` and ``seconds`` (per attack, and ``clean``).
    """
    attacks = dict(attacks or {})
    check_logits_model(model)
    predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1,
                                              output_type=tf.int32))
    batches = list(dataset)
    labels = np.concatenate([np.asarray(y) for _, y in batches])
    total = len(labels)
    start = time.perf_counter()
    clean = np.concatenate([predict(x).numpy() == np.asarray(y) for x, y in batches])
    seconds = {"clean": time.perf_counter() - start}
    robust = {}
    worst = clean.copy()
    for name, attack in attacks.items():
        bar = keras.utils.Progbar(total, unit_name="example", verbose=verbose)
        if verbose:
            print(f"Attack {name}: {attack!r}")
        start = time.perf_counter()
        correct = []
        for x, y in batches:
            x_adv = attack(model, x, y)
            correct.append(predict(x_adv).numpy() == np.asarray(y))
            bar.add(len(correct[-1]))
        seconds[name] = time.perf_counter() - start
        correct = np.concatenate(correct) & clean  # a misclassified clean input is not robust
        robust[name] = float(correct.mean()) if total else 0.0
        worst &= correct
    return {
        "num_examples": int(total),
        "clean_accuracy": float(clean.mean()) if total else 0.0,
        "robust_accuracy": robust,
        "worst_case_accuracy": float(worst.mean()) if total else 0.0,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def format_table(result):
    """A plain-text table of an `evaluate` result."""
    rows = [("clean", result["clean_accuracy"], result["seconds"].get("clean", 0.0))]
    rows += [(name, acc, result["seconds"].get(name, 0.0))
             for name, acc in result["robust_accuracy"].items()]
    if result["robust_accuracy"]:
        rows.append(("worst case", result["worst_case_accuracy"], float("nan")))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'attack':<{width}}  accuracy  seconds", "-" * (width + 19)]
    for name, acc, sec in rows:
        sec_text = "" if np.isnan(sec) else f"{sec:7.1f}"
        lines.append(f"{name:<{width}}  {100 * acc:7.2f}%  {sec_text}")
    lines.append(f"({result['num_examples']} examples)")
    return "\n".join(lines)
