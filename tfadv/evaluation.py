"""Robustness evaluation that is hard to fool: attacks, worst case, sanity checks, plots.

`evaluate` runs every attack on every clean-correct example and reports, per attack, the robust
accuracy (correct on the clean input AND on the attack's output), and the worst case over all
attacks per example, which is the number to quote. The sanity checks follow Carlini et al. 2019
("On Evaluating Adversarial Robustness") and Athalye et al. 2018 ("Obfuscated Gradients Give a
False Sense of Security"): predictions are deterministic; input gradients are finite and
non-zero; iterative attacks do at least as well as single-step ones; a black-box attack does not
beat the white-box ones; robust accuracy falls monotonically with eps and reaches about 0 at an
eps that allows any image. A failed check is a loud warning naming the likely cause.

Artifacts when ``output_dir`` is given: ``eval.json``, ``robustness_curve.png`` (accuracy against
eps) and ``examples.png`` (clean and adversarial images with predictions).
"""

import json
import os
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfadv import heads  # noqa: F401  (registers the head layers for keras.models.load_model)
from tfadv.attacks import PGD, parse_norm
from tfadv.attacks.pgd import norm_name

CURVE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


# --- models --------------------------------------------------------------------------------
def check_logits_model(model, image_shape=None):
    """Raises ValueError unless ``model`` maps (batch, H, W, C) images to (batch, classes)."""
    out = getattr(model, "output_shape", None)
    if out is not None and (not isinstance(out, tuple) or len(out) != 2):
        raise ValueError(f"model must output (batch, num_classes) logits; got shape {out}.")
    inp = getattr(model, "input_shape", None)
    if image_shape is not None and isinstance(inp, tuple) and tuple(inp[1:]) != tuple(
            image_shape):
        raise ValueError(
            f"dataset images have shape {tuple(image_shape)} but the model expects "
            f"{tuple(inp[1:])}.")


def looks_like_probabilities(outputs):
    """True when every row is non-negative and sums to 1: a softmax output, not logits."""
    outputs = np.asarray(outputs, dtype="float64")
    return bool(outputs.size and outputs.min() >= 0.0 and outputs.max() <= 1.0
                and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-4))


def load_classifier(path):
    """Loads a classifier from a `bin/train` model_dir, a ``.keras`` file or a SavedModel.

    A SavedModel is wrapped in a Keras model calling its ``serving_default`` signature; when the
    signature returns several outputs, the one named ``logits`` is used. A TF Serving base
    directory (``model_name/<version>/``, as `tfadv.export` writes) means its highest version."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.keras")):
        path = os.path.join(path, "model.keras")
    elif os.path.isdir(path) and not os.path.exists(os.path.join(path, "saved_model.pb")):
        from tfadv.export import latest_version_dir

        path = latest_version_dir(path) or path
    if path.endswith(".keras") and os.path.isfile(path):
        return keras.models.load_model(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures["serving_default"]
        (name, spec), = signature.structured_input_signature[1].items()
        outputs = signature.structured_outputs
        key = "logits" if "logits" in outputs else next(iter(outputs))
        layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
        inputs = keras.Input(spec.shape[1:], name=name)
        out = layer(inputs)
        out = out[key] if isinstance(out, dict) else out
        return keras.Model(inputs, out, name=os.path.basename(os.path.normpath(path)))
    raise FileNotFoundError(
        f"no model at {path!r}: expected a bin/train model_dir (with model.keras), a .keras file "
        f"or a SavedModel directory.")


# --- running attacks -------------------------------------------------------------------------
def _predict_fn(model):
    return tf.function(lambda x: model(x, training=False))


def _run_attack(attack, model, batches, predict, verbose, name):
    bar = keras.utils.Progbar(sum(len(y) for _, y in batches), unit_name="example",
                              verbose=verbose)
    if verbose:
        print(f"Attack {name}: {attack!r}")
    correct, adversarial = [], []
    for x, y in batches:
        x_adv = np.asarray(attack(model, x, y))
        correct.append(np.argmax(predict(x_adv), -1) == y)
        adversarial.append(x_adv)
        bar.add(len(y))
    return np.concatenate(correct), np.concatenate(adversarial)


def _batches(dataset, max_examples):
    out, total = [], 0
    for x, y in dataset:
        x, y = np.asarray(x, "float32"), np.asarray(y).astype("int64")
        if max_examples is not None and total + len(y) > max_examples:
            x, y = x[:max_examples - total], y[:max_examples - total]
        if len(y):
            out.append((x, y))
        total += len(y)
        if max_examples is not None and total >= max_examples:
            break
    return out


def curve_attack(eps, norm, seed=0):
    """The attack behind the robustness curve: PGD-20, step 2.5 eps / 20, every iterate counts."""
    return PGD(eps=eps, step_size=max(2.5 * eps / 20, 1e-6), steps=20, norm=norm,
               random_start="uniform" if eps > 0 else None, select="misclassified", seed=seed)


def _large_eps(norm, image_shape):
    """An eps at which any image of the box is reachable: 1 (L-inf) or the box diagonal (L2)."""
    return 1.0 if parse_norm(norm) == np.inf else float(np.sqrt(np.prod(image_shape)))


# --- sanity checks ---------------------------------------------------------------------------
def _check(name, passed, verdict, **details):
    return {"name": name, "passed": passed, "verdict": verdict, **details}


def _gradient_check(model, x, y):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model(x, training=False), tf.float32)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(y, tf.int32), logits=logits))
    grad = tape.gradient(loss, x)
    if grad is None:
        return _check("gradients", False, "FAILED: the model is not differentiable with respect "
                      "to its input (no gradient path): gradient-based attacks cannot work; "
                      "use a black-box attack (Square) or BPDA.", zero_fraction=1.0)
    grad = grad.numpy().reshape(len(y), -1)
    finite = bool(np.isfinite(grad).all())
    zero = float(np.mean(np.abs(grad).max(axis=1) < 1e-12))
    probs = tf.nn.softmax(logits).numpy()
    saturated = float(np.mean(probs.max(axis=1) > 1 - 1e-6))
    ok = finite and zero <= 0.1
    if ok:
        verdict = "ok: input gradients are finite and non-zero"
    elif not finite:
        verdict = "FAILED: non-finite input gradients (numerical instability or masking)"
    else:
        verdict = (f"FAILED: {100 * zero:.0f}% of examples have zero input gradient: gradient "
                   f"masking or a saturated softmax ({100 * saturated:.0f}% of predictions have "
                   f"confidence > 1 - 1e-6; rescaled logits); trust the DLR and black-box "
                   f"attacks, not cross-entropy PGD")
    return _check("gradients", ok, verdict, zero_fraction=zero, saturated_fraction=saturated,
                  finite=finite)


def sanity_checks(model, first_batch, robust, attacks, curve, num_examples):
    """The checks listed in the module docstring; each a dict with a plain-language verdict."""
    x, y = first_batch
    tol = 1.0 / max(num_examples, 1) + 1e-9
    checks = []
    a, b = np.asarray(model(x, training=False)), np.asarray(model(x, training=False))
    same = bool(np.allclose(a, b, atol=1e-5))
    checks.append(_check("deterministic", same,
                         "ok: predictions are deterministic" if same else
                         "FAILED: predictions change between identical calls: a randomised "
                         "model needs attacks with expectation over transformation (EOT); "
                         "these numbers overstate robustness"))
    checks.append(_gradient_check(model, x, y))

    accs = {name: float(r.mean()) for name, r in robust.items()}
    single = [n for n, at in attacks.items() if getattr(at, "steps", None) == 1]
    iterative = [n for n, at in attacks.items() if (getattr(at, "steps", 0) or 0) > 1]
    if single and iterative:
        worst_single = min(accs[n] for n in single)
        best_iter = max(accs[n] for n in iterative)
        ok = best_iter <= worst_single + tol
        checks.append(_check(
            "iterative_vs_single_step", ok,
            "ok: iterative attacks do at least as well as single-step ones" if ok else
            f"FAILED: an iterative attack ({best_iter:.2%}) is weaker than a single-step one "
            f"({worst_single:.2%}): the loss surface is likely masked; increase steps/restarts "
            f"or the step size"))
    black = [n for n, at in attacks.items() if getattr(at, "black_box", False)]
    white = [n for n in attacks if n not in black]
    if black and white:
        best_black, best_white = min(accs[n] for n in black), min(accs[n] for n in white)
        ok = best_black >= best_white - tol
        checks.append(_check(
            "black_box_vs_white_box", ok,
            "ok: the black-box attack does not beat the white-box ones" if ok else
            f"FAILED: the black-box attack ({best_black:.2%}) beats every white-box attack "
            f"({best_white:.2%}): gradients are masked or obfuscated"))
    if curve:
        values = [c["accuracy"] for c in curve]
        monotone = all(later <= earlier + tol for earlier, later in zip(values, values[1:]))
        reaches_zero = values[-1] <= 0.05
        ok = monotone and reaches_zero
        if ok:
            verdict = ("ok: robust accuracy falls monotonically with eps and reaches about 0 "
                       "when any image is allowed")
        elif not monotone:
            verdict = ("FAILED: robust accuracy does not fall monotonically with eps: the "
                       "attack is failing (masked gradients or too few steps)")
        else:
            verdict = (f"FAILED: robust accuracy is still {values[-1]:.2%} at eps "
                       f"{curve[-1]['eps']:g}, where any image is allowed: the attack cannot "
                       f"find adversarial examples it must exist for (gradient masking)")
        checks.append(_check("monotone_in_eps", ok, verdict))
    return checks


# --- plots -----------------------------------------------------------------------------------
def _plot_curve(curve, norm, eps, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([c["eps"] for c in curve], [100 * c["accuracy"] for c in curve], "o-")
    ax.set_xlabel(f"eps ({'L-inf' if parse_norm(norm) == np.inf else 'L2'}, [0, 1] pixels)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.axvline(eps, color="gray", linestyle="--", linewidth=1, label=f"threat model eps={eps:g}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_examples(x, x_adv, y, clean_pred, adv_pred, attack_name, path, count=8):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(y))
    fig, axes = plt.subplots(3, count, figsize=(1.4 * count, 4.6), dpi=120, squeeze=False)
    cmap = "gray" if x.shape[-1] == 1 else None
    for i in range(count):
        delta = x_adv[i] - x[i]
        scale = np.abs(delta).max() or 1.0
        panels = [(x[i], f"y={y[i]} pred={clean_pred[i]}"),
                  (x_adv[i], f"adv pred={adv_pred[i]}"),
                  (0.5 + 0.5 * delta / scale, f"delta x{1 / scale:.1f}")]
        for row, (image, label) in enumerate(panels):
            ax = axes[row, i]
            ax.imshow(np.clip(image.squeeze(), 0, 1), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(label, fontsize=7, color="red" if row == 1 and adv_pred[i] != y[i]
                         else "black")
            ax.axis("off")
    fig.suptitle(f"clean / {attack_name} / perturbation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- the evaluation --------------------------------------------------------------------------
@gin.configurable(denylist=["model", "dataset", "output_dir"])
def evaluate(model, dataset, attacks=None, sanity=True, curve_fractions=CURVE_FRACTIONS,
             max_examples=None, output_dir=None, seed=0, verbose=1):
    """Evaluates ``model`` (images in [0, 1] -> logits) on a batched ``dataset`` of (x, y).

    Args:
      attacks: dict ``name -> attack``, each called as ``attack(model, x, y)``.
      sanity: run the sanity checks and the robustness curve (needs an attack with ``eps``).
      curve_fractions: multiples of the threat model's eps for the robustness curve; an eps at
        which any image is reachable is appended.
      max_examples: evaluate on the first ``max_examples`` examples only.
      output_dir: where to write ``eval.json`` and the PNGs (nothing written when ``None``).
      seed: seed of the curve's PGD.
      verbose: progress bar per attack.

    Returns:
      dict with ``num_examples``, ``clean_accuracy``, ``robust_accuracy`` (per attack),
      ``worst_case_accuracy``, ``counts``, ``seconds`` (per attack), ``threat_model``,
      ``attack_details`` (per ensemble: examples each component fooled first),
      ``robustness_curve``, ``sanity_checks`` and ``per_example`` (0/1 lists).
    """
    attacks = dict(attacks or {})
    check_logits_model(model)
    batches = _batches(dataset, max_examples)
    if not batches:
        raise ValueError("the dataset to evaluate on is empty.")
    predict = _predict_fn(model)
    check_logits_model(model, batches[0][0].shape[1:])
    first_out = np.asarray(predict(batches[0][0]))
    if first_out.ndim != 2:
        raise ValueError(f"model must output (batch, num_classes) logits; got {first_out.shape}.")
    if looks_like_probabilities(first_out):
        raise ValueError(
            "the model outputs probabilities (rows are non-negative and sum to 1), but attacks "
            "and checks need logits: remove the final softmax (e.g. build the model with "
            "activation=None on its last layer).")
    x_all = np.concatenate([b[0] for b in batches])
    y_all = np.concatenate([b[1] for b in batches])
    n = len(y_all)

    start = time.perf_counter()
    clean_logits = np.concatenate([np.asarray(predict(x)) for x, _ in batches])
    clean = np.argmax(clean_logits, -1) == y_all
    seconds = {"clean": time.perf_counter() - start}
    robust, adversarial, details = {}, {}, {}
    for name, attack in attacks.items():
        if hasattr(attack, "reset_stats"):
            attack.reset_stats()
        start = time.perf_counter()
        correct, adversarial[name] = _run_attack(attack, model, batches, predict, verbose, name)
        seconds[name] = time.perf_counter() - start
        robust[name] = correct & clean  # a misclassified clean input is not robust
        if hasattr(attack, "stats"):  # an ensemble: examples each component fooled first
            details[name] = dict(attack.stats)
    worst = clean.copy()
    for r in robust.values():
        worst &= r

    threat = next(({"norm": norm_name(a.norm), "eps": a.eps}
                   for a in attacks.values() if hasattr(a, "eps") and hasattr(a, "norm")), None)
    curve, checks = [], []
    if sanity and threat is not None:
        image_shape = x_all.shape[1:]
        grid = [f * threat["eps"] for f in curve_fractions] + [
            _large_eps(threat["norm"], image_shape)]
        start = time.perf_counter()
        for eps in grid:
            correct, _ = _run_attack(curve_attack(eps, threat["norm"], seed), model, batches,
                                     predict, 0, f"curve eps={eps:g}")
            curve.append({"eps": float(eps), "accuracy": float((correct & clean).mean())})
        seconds["robustness_curve"] = time.perf_counter() - start
        checks = sanity_checks(model, batches[0], robust, attacks, curve, n)
    elif sanity:
        checks = sanity_checks(model, batches[0], robust, attacks, [], n)
    for c in checks:
        if c["passed"] is False:
            logging.warning("sanity check %s: %s", c["name"], c["verdict"])

    result = {
        "num_examples": int(n),
        "clean_accuracy": float(clean.mean()),
        "robust_accuracy": {k: float(v.mean()) for k, v in robust.items()},
        "worst_case_accuracy": float(worst.mean()),
        "counts": {"clean_correct": int(clean.sum()),
                   **{k: int(v.sum()) for k, v in robust.items()},
                   "worst_case": int(worst.sum())},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "threat_model": threat,
        "attacks": {k: repr(v) for k, v in attacks.items()},
        "attack_details": details,
        "robustness_curve": curve,
        "sanity_checks": checks,
        "per_example": {"clean": clean.astype(int).tolist(),
                        **{k: v.astype(int).tolist() for k, v in robust.items()},
                        "worst_case": worst.astype(int).tolist()},
    }
    if output_dir is not None:
        write_artifacts(result, output_dir, x_all, y_all, clean_logits, adversarial, predict)
    return result


def write_artifacts(result, output_dir, x, y, clean_logits, adversarial, predict):
    """Writes eval.json (atomically), robustness_curve.png and examples.png."""
    from tfadv.checkpoint import atomic_write_text

    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "eval.json"), json.dumps(result, indent=1) + "\n")
    if result["robustness_curve"]:
        threat = result["threat_model"]
        _plot_curve(result["robustness_curve"], threat["norm"], threat["eps"],
                    os.path.join(output_dir, "robustness_curve.png"),
                    "PGD-20 robust accuracy (every iterate counts)")
    if adversarial:
        # Show the strongest attack: the one with the lowest robust accuracy.
        name = min(result["robust_accuracy"], key=result["robust_accuracy"].get)
        x_adv = adversarial[name][:8]
        _plot_examples(x[:8], x_adv, y[:8], np.argmax(clean_logits[:8], -1),
                       np.argmax(np.asarray(predict(x_adv)), -1), name,
                       os.path.join(output_dir, "examples.png"))


def format_table(result):
    """A plain-text table of an `evaluate` result, with the sanity-check verdicts."""
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
    for name, stats in result.get("attack_details", {}).items():
        parts = ", ".join(f"{k} {v}" for k, v in stats.items())
        lines.append(f"{name}: examples fooled first by each component: {parts}")
    threat = result.get("threat_model")
    where = f", {threat['norm']} eps={threat['eps']:g}" if threat else ""
    lines.append(f"({result['num_examples']} examples{where})")
    for check in result.get("sanity_checks", []):
        mark = "PASS" if check["passed"] else "FAIL"
        lines.append(f"[{mark}] {check['name']}: {check['verdict']}")
    if any(c["passed"] is False for c in result.get("sanity_checks", [])):
        lines.append("!!! WARNING: a sanity check failed: the robust accuracy above may be an "
                     "overestimate. Read the verdicts before reporting it. !!!")
    return "\n".join(lines)
