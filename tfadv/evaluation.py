"""Robustness evaluation that is hard to fool: the headline number, its verdict, remedies, plots.

`evaluate` runs every attack on every example and reports, per attack, the robust accuracy
(correct on the clean input AND on the attack's output). The **headline** is the worst case per
example over every attack, and it always includes the standard AutoAttack ensemble (Croce & Hein
2020): `evaluate` adds AutoAttack for the threat model of the given attacks unless it is already
there (``autoattack='fast'`` adds the cheaper screen instead, and every output then says so).
FGSM and PGD numbers are diagnostics.

Beside the headline stands a **verdict**: ``reliable``, or ``unreliable: <checks>`` naming the
failed sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Athalye et al.
2018, "Obfuscated Gradients Give a False Sense of Security"): predictions are deterministic;
input gradients exist, are finite and non-zero; iterative attacks do at least as well as
single-step ones; a black-box attack does not beat the white-box ones; robust accuracy falls
monotonically with eps and reaches about 0 at an eps that allows any image. One more check,
``pgd_vs_strongest``, compares the fixed-step PGD attacks with the strongest attack: more than 5
points apart means PGD is unreliable on this model and must not be quoted. It judges the PGD
diagnostics, not the headline (which already holds the strongest attack), so it is reported but
does not make the headline unreliable.

**Remedies** run by themselves when a check fails (``remedies=True``), and join the worst case:

- predictions that change between identical calls (a randomised model): AutoAttack's ``rand``
  version, APGD-CE and APGD-DLR with expectation over transformation (EOT) over 20 calls. Such a
  model's prediction, clean and under every attack, is then its majority vote over the same 20
  calls (ties to the lower class), so that a single lucky or unlucky draw cannot decide an
  example and the per-attack numbers compare attacks, not noise;
- no gradient path, non-finite, zero or saturated input gradients: Square with a larger query
  budget, and BPDA (`tfadv.attacks.bpda`): layers found to block the gradient get a
  straight-through backward pass and the standard AutoAttack runs through them;
- layers that declare themselves non-differentiable (``non_differentiable = True``: local
  gradient smoothing, inpainting, band-vote smoothing; `tfadv.attacks.bpda.marked_layers`) get
  BPDA whatever the gradient check says: a gradient that exists can still mislead. The
  non-adaptive attack and its BPDA version are reported side by side (``bpda-<attack>``) and the
  worst case of the two is in the headline.

**The patch threat model** (``norm='patch'``, eps = the side m of an m x m patch in pixels;
`tfadv.attacks.patch`): there is no AutoAttack for patches, so the strongest attack is the patch
PGD at every location (``patch``; ``autoattack='fast'`` adds the screen ``patch-fast``
instead, labelled as such); the remedies are its EOT and BPDA versions, and the curve runs the
screen per patch side up to a patch as large as the image. The other checks are the same.

The **robustness curve** runs the cheaper AutoAttack screen (APGD-CE + APGD-T, the ``fast``
version; ``rand`` for randomised models) at each eps of the grid, and at the threat model's eps
it is the headline itself.

Evaluation runs batches in parallel on the devices of a `tf.distribute` strategy (one thread
per device; the same batches and seeds as on one device, so the same numbers), shows one progress
line with ETA over all of it (`Progress`: the sanity checks, each attack and AutoAttack component,
the remedies and the curve; redrawn in place on a terminal, one line per stage and every 30 s
elsewhere), and, with an ``output_dir``, saves per-example results after every batch to
``output_dir/eval_progress/`` so an interrupted evaluation continues where it stopped.

Artifacts when ``output_dir`` is given: ``eval.json``, ``robustness_curve.png`` (accuracy against
eps) and ``examples.png`` (clean and adversarial images with predictions).
"""

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import sys
import threading
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfadv import heads  # noqa: F401  (registers the head layers for keras.models.load_model)
from tfadv.rundir import (  # noqa: F401  (load_classifier: re-exported)
    atomic_file, atomic_write_text, check_logits_model, load_classifier, looks_like_probabilities)
from tfadv.attacks import PGD, parse_norm
from tfadv.attacks.autoattack import AutoAttack
from tfadv.attacks.base import check_image_range
from tfadv.attacks.pgd import norm_name

CURVE_FRACTIONS = (0.0, 0.5, 1.0, 1.5, 2.0)
HEADLINE_VERSIONS = ("standard", "fast")  # of the AutoAttack in every headline
UNRELIABLE_EXIT_CODE = 3  # bin/train and bin/evaluate exit with it for an unreliable headline
PGD_GAP = 0.05  # pgd_vs_strongest: PGD more than this above the strongest attack is unreliable
EOT_SAMPLES = 20  # AutoAttack 'rand': model calls averaged per gradient, and votes per prediction
PATCH = "patch"  # the patch threat model's norm name; its eps is the patch side in pixels


# --- models --------------------------------------------------------------------------------
# --- running attacks -------------------------------------------------------------------------
def _predict_fn(model, image_shape):
    """``model(x, training=False)`` compiled once for every batch size (no retracing on a
    ragged last batch)."""
    def predict(x):
        return model(x, training=False)

    predict.__name__ = f"predict_{id(model):x}"
    fn = tf.function(predict, autograph=False,
                     input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    # One trace per evaluation; TensorFlow's retracing warning would add up the traces of every
    # evaluation in a process (it counts per code object), as for the attacks (attacks/base.py).
    fn._omit_frequent_tracing_warning = True  # noqa: SLF001
    return fn


def _majority_vote(predict, calls=EOT_SAMPLES):
    """The prediction of a randomised model: per example, the vote counts of its argmax over
    ``calls`` calls (argmax of the counts = the majority class, ties to the lower class)."""
    def vote(x):
        counts = 0
        for _ in range(calls):
            logits = np.asarray(predict(x))
            counts = counts + np.eye(logits.shape[-1], dtype="float32")[np.argmax(logits, -1)]
        return counts

    return vote


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


def _devices(strategy):
    """The local devices to spread batches over: the strategy's replicas' devices, or [None]
    (the current device) for one replica."""
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync < 2:
        return [None]
    try:
        devices = list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # strategies without local replica devices
        return [None]
    return devices if len(devices) > 1 else [None]


def _duration(seconds):
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """One progress line with ETA over a whole evaluation (the sanity checks, every attack and
    AutoAttack component, the remedies and the robustness curve), counted in examples.

    On a terminal it redraws one line in place (carriage return), at least every second so the
    elapsed time and ETA move during a long batch. Elsewhere (a log file, a pipe, bin/train's
    output under a scheduler) it prints one plain line when a stage starts and then one every
    ``interval`` seconds while the stage runs, so a long AutoAttack still shows it is alive,
    without escape codes. ``verbose=0`` prints nothing. Use it as a context manager (or call
    `close`): leaving it stops the periodic lines."""

    def __init__(self, total, verbose=1, stream=None, interval=30.0):
        self.total = max(int(total), 1)
        self.done = 0
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = float(interval)
        self.start = time.perf_counter()
        self.stage = ""
        self.detail = ""
        self._lock = threading.Lock()
        self._printed = self.start
        self._stop = threading.Event()
        self._thread = None

    def _eta(self):
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        return elapsed, ((self.total - self.done) / rate if rate else float("nan"))

    def _line(self):
        elapsed, eta = self._eta()
        fraction = self.done / self.total
        bar = "=" * int(24 * fraction)
        stage = f"{self.stage} ({self.detail})" if self.detail else self.stage
        return (f"evaluate [{bar:<24}] {100 * fraction:3.0f}%  {stage}  "
                f"elapsed {_duration(elapsed)}  ETA {_duration(eta)}")

    def _print_line(self):
        print(self._line(), file=self.stream, flush=True)
        self._printed = time.perf_counter()

    def set_total(self, total):
        """Changes the number of examples the whole evaluation counts (e.g. once the sanity
        checks have chosen the remedies)."""
        with self._lock:
            self.total = max(int(total), self.done, 1)
            self._draw()

    def set_stage(self, stage):
        """Starts a stage (an attack, a remedy, a curve point, the sanity checks)."""
        with self._lock:
            self.stage, self.detail = stage, ""
            if self.verbose and not self.tty:
                self._print_line()
            if self.verbose and self._thread is None:
                self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                                name="evaluate-progress")
                self._thread.start()
            self._draw()

    def set_detail(self, detail):
        """What runs inside the stage right now (e.g. an AutoAttack component); shown on the
        terminal line and in the next periodic line."""
        with self._lock:
            self.detail = detail
            self._draw()

    def add(self, count):
        """Counts ``count`` more examples as done."""
        with self._lock:
            self.done = min(self.done + int(count), self.total)
            self._draw()

    def _draw(self):
        if self.verbose and self.tty:
            self.stream.write("\r" + self._line() + "\033[K")
            self.stream.flush()

    def _heartbeat(self):
        while not self._stop.wait(min(self.interval, 1.0)):
            with self._lock:
                if self.tty:
                    self._draw()
                elif time.perf_counter() - self._printed >= self.interval:
                    self._print_line()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(finished=exc_type is None)

    def close(self, finished=True):
        """Stops the periodic lines and, for a finished evaluation, prints the total time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.verbose:
            elapsed = time.perf_counter() - self.start
            if self.tty:
                self.stream.write("\n")
            if finished:
                print(f"evaluate: done in {_duration(elapsed)}", file=self.stream, flush=True)


def _fingerprint(model, x, y, seed):
    """What the saved per-example results depend on besides the attack: weights, data, seed."""
    digest = hashlib.sha1()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    digest.update(str(seed).encode())
    return digest.hexdigest()


class _ProgressStore:
    """Per-example results of each evaluation stage, saved atomically after every batch in
    ``directory`` (``<output_dir>/eval_progress``), so an interrupted evaluation resumes. Results
    saved for other weights, data or seed (another fingerprint) are discarded."""

    def __init__(self, directory, fingerprint):
        self._write = atomic_write_text
        self.directory = directory
        marker = os.path.join(directory, "fingerprint")
        if os.path.isdir(directory):
            try:
                with open(marker) as f:
                    same = f.read().strip() == fingerprint
            except OSError:
                same = False
            if not same:
                shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)
        if not os.path.exists(marker):
            self._write(marker, fingerprint + "\n")
        self._lock = threading.Lock()

    @staticmethod
    def key(name, attack):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
        return f"{slug}-{hashlib.sha1(repr(attack).encode()).hexdigest()[:10]}"

    def load(self, key):
        """``({batch index: (correct, stats)}, first adversarial images or None)``."""
        path = os.path.join(self.directory, key + ".json")
        if not os.path.exists(path):
            return {}, None
        try:
            with open(path) as f:
                saved = json.load(f)
            done = {int(i): (np.asarray(v["correct"], bool), v["stats"])
                    for i, v in saved["batches"].items()}
            first = None
            if os.path.exists(os.path.join(self.directory, key + ".npy")):
                first = np.load(os.path.join(self.directory, key + ".npy"))
        except (OSError, ValueError, KeyError):
            logging.warning("evaluate: unreadable saved results %s; recomputing them", path)
            return {}, None
        return done, first

    def save(self, key, done, first):
        with self._lock:
            if first is not None:
                with atomic_file(os.path.join(self.directory, key + ".npy")) as tmp:
                    np.save(tmp, first)
            payload = {"batches": {str(i): {"correct": c.astype(int).tolist(), "stats": s}
                                   for i, (c, s) in sorted(done.items())}}
            self._write(os.path.join(self.directory, key + ".json"), json.dumps(payload))

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


class _Runner:
    """Runs one attack over all batches: in parallel over devices, resumable, with progress."""

    def __init__(self, batches, predict, devices, store, progress):
        self.batches = batches
        self.predict = predict
        self.devices = devices
        self.store = store
        self.progress = progress

    def _one(self, attack, attack_model, index, device):
        x, y = self.batches[index]
        with tf.device(device) if device else contextlib.nullcontext():
            if hasattr(attack, "run"):  # AutoAttack: per-batch stats, safe in parallel
                x_adv, stats = attack.run(
                    attack_model, x, y, on_component=lambda component, remaining:
                    self.progress.set_detail(f"{component} on {remaining} examples"))
            else:
                x_adv, stats = np.asarray(attack(attack_model, x, y)), {}
            correct = np.argmax(np.asarray(self.predict(x_adv)), -1) == y
        return correct, dict(stats), (np.asarray(x_adv[:8]) if index == 0 else None)

    def run(self, name, attack, model, attack_model=None, stage=None):
        """Returns ``(correct, stats, first)``: per-example correctness on ``model`` of the
        points ``attack`` found on ``attack_model`` (default ``model``), the summed stats of an
        ensemble, and the first batch's first 8 adversarial images. ``name`` keys the saved
        per-example results; ``stage`` (default ``name``) is what the progress line shows."""
        attack_model = model if attack_model is None else attack_model
        key = _ProgressStore.key(name, attack)
        done, first = self.store.load(key) if self.store else ({}, None)
        done = {i: v for i, v in done.items() if i < len(self.batches)
                and len(v[0]) == len(self.batches[i][1])}
        self.progress.set_stage(stage or name)
        self.progress.add(sum(len(self.batches[i][1]) for i in done))
        todo = [i for i in range(len(self.batches)) if i not in done]
        if 0 in todo:
            first = None

        def finish(index, correct, stats, adv):
            nonlocal first
            done[index] = (correct, stats)
            if adv is not None:
                first = adv
            if self.store:
                self.store.save(key, done, first)
            self.progress.add(len(correct))

        if len(self.devices) == 1:
            for index in todo:
                finish(index, *self._one(attack, attack_model, index, self.devices[0]))
        else:
            self._parallel(attack, attack_model, todo, finish)
        correct = np.concatenate([done[i][0] for i in range(len(self.batches))])
        stats = {}
        for i in range(len(self.batches)):
            for k, v in done[i][1].items():
                stats[k] = stats.get(k, 0) + int(v)
        return correct, stats, first

    def _parallel(self, attack, attack_model, todo, finish):
        """One thread per device, each taking the next batch (results keyed by batch index, so
        the order of completion does not matter)."""
        work, errors, lock = queue.Queue(), [], threading.Lock()
        for index in todo:
            work.put(index)

        def worker(device):
            while not errors:
                try:
                    index = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    out = self._one(attack, attack_model, index, device)
                    with lock:
                        finish(index, *out)
                except BaseException as error:  # noqa: BLE001 (re-raised in the caller)
                    errors.append(error)

        threads = [threading.Thread(target=worker, args=(d,), daemon=True)
                   for d in self.devices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]


def curve_attack(eps, norm, seed=0, randomised=False):
    """The attack behind the robustness curve: AutoAttack's cheaper screen, APGD-CE + APGD-T
    (version ``fast``), or its EOT version ``rand`` for a randomised model; for the patch threat
    model (eps = the side) the patch screen ``patch-fast``, with EOT for a randomised model."""
    if _is_patch_norm(norm):
        from tfadv.attacks.registry import build_attack

        attack = build_attack("patch-fast", int(eps), PATCH, seed=seed)
        if randomised:
            attack.eot_samples = EOT_SAMPLES
        return attack
    return AutoAttack(eps, norm=norm, version="rand" if randomised else "fast", seed=seed)


def _large_eps(norm, image_shape):
    """An eps at which any image of the box is reachable: 1 (L-inf), the box diagonal (L2), or
    a patch as large as the image (patch)."""
    if _is_patch_norm(norm):
        return int(min(image_shape[0], image_shape[1]))
    return 1.0 if parse_norm(norm) == np.inf else float(np.sqrt(np.prod(image_shape)))


def _is_patch_norm(norm):
    return isinstance(norm, str) and norm.strip().lower() == PATCH


def _is_patch(threat):
    return threat is not None and threat["norm"] == PATCH


def _threat_model(threat_model):
    """``{'norm': 'linf' | 'l2', 'eps': float}``, or ``{'norm': 'patch', 'eps': int}`` (eps =
    the patch side in pixels), from a dict with ``eps`` and ``norm``."""
    try:
        eps, norm = threat_model["eps"], threat_model["norm"]
    except (KeyError, TypeError):
        raise ValueError(f"threat_model must be a dict with 'eps' and 'norm'; got "
                         f"{threat_model!r}.") from None
    from tfadv.checks import check_number

    if _is_patch_norm(norm):
        check_number("threat_model['eps'] (the patch side in pixels)", eps, 1, strict=False,
                     integer=True)
        return {"norm": PATCH, "eps": int(eps)}
    check_number("threat_model['eps']", eps, 0.0, strict=False)
    return {"norm": norm_name(norm), "eps": float(eps)}


def _threat(attacks):
    for a in attacks.values():
        if hasattr(a, "eps") and hasattr(a, "norm"):
            if _is_patch_norm(a.norm):
                return {"norm": PATCH, "eps": int(a.eps)}
            return {"norm": norm_name(a.norm), "eps": a.eps}
    return None


def _patch_version(attack):
    """``'patch'`` for a patch PGD at every location, ``'patch-fast'`` for one that screens
    every location first, else None (random locations or a universal patch: no headline)."""
    if not (_is_patch_norm(getattr(attack, "norm", None)) and hasattr(attack, "locations")):
        return None
    if attack.locations == "all":
        return "patch"
    return "patch-fast" if attack.screen_steps > 0 else None


def _is_patch_attack(attack):
    """A patch attack strong enough for the headline (`_patch_version`)."""
    return _patch_version(attack) is not None


def _autoattack_version(attacks):
    """The strongest attack family in ``attacks``, the headline's label: an AutoAttack version
    (``standard``, ``rand``, ``fast``), or for the patch threat model ``patch`` (patch PGD at
    every location) or ``patch-fast`` (the screen); ``None`` when there is none of them."""
    versions = {a.version for a in attacks.values() if isinstance(a, AutoAttack)}
    versions |= {_patch_version(a) for a in attacks.values() if _is_patch_attack(a)}
    return next((v for v in ("standard", "rand", "fast", "patch", "patch-fast")
                 if v in versions), None)


def _headline_attack(threat, version, seed):
    """``(name, attack)``: the attack `evaluate` adds for the headline: AutoAttack (``version``
    ``standard`` or ``fast``) for L-inf/L2; for patches the patch PGD at every location
    (``standard``) or the patch screen (``fast``)."""
    if _is_patch(threat):
        from tfadv.attacks.registry import build_attack

        name = "patch" if version == "standard" else "patch-fast"
        return name, build_attack(name, threat["eps"], PATCH, seed=seed)
    name = "autoattack" if version == "standard" else "autoattack-fast"
    return name, AutoAttack(threat["eps"], norm=threat["norm"], version=version, seed=seed)


# --- sanity checks ---------------------------------------------------------------------------
def _check(name, passed, verdict, affects_headline=True, **details):
    return {"name": name, "passed": passed, "verdict": verdict,
            "affects_headline": affects_headline, **details}


def _determinism_check(model, x):
    a, b = np.asarray(model(x, training=False)), np.asarray(model(x, training=False))
    same = bool(np.allclose(a, b, atol=1e-5))
    return _check("deterministic", same,
                  "ok: predictions are deterministic" if same else
                  "FAILED: predictions change between identical calls: a randomised model needs "
                  "attacks with expectation over transformation (EOT); plain gradient attacks "
                  "overstate its robustness")


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


def model_checks(model, x, y):
    """The checks on the model alone, run before any attack (they choose the remedies):
    deterministic predictions, and finite, non-zero input gradients."""
    return [_determinism_check(model, x), _gradient_check(model, x, y)]


def attack_checks(robust, attacks, curve, num_examples):
    """The checks on the attacks' results (``robust``: name -> per-example 0/1): iterative vs
    single-step, black-box vs white-box, monotone in eps, and fixed-step PGD vs the strongest
    attack (`PGD_GAP`; it does not affect the headline)."""
    tol = 1.0 / max(num_examples, 1) + 1e-9
    checks = []
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
    pgd = [n for n, at in attacks.items()
           if isinstance(at, PGD) and at.steps > 1 and n in accs]
    if pgd and len(accs) > len(pgd):
        strongest = min(accs, key=accs.get)
        weakest_pgd = max(pgd, key=accs.get)
        gap = accs[weakest_pgd] - accs[strongest]
        ok = gap <= PGD_GAP + 1e-9
        checks.append(_check(
            "pgd_vs_strongest", ok,
            f"ok: fixed-step PGD is within {100 * PGD_GAP:.0f} points of the strongest attack"
            if ok else
            f"FAILED: the strongest attack ({strongest}, {accs[strongest]:.2%}) beats "
            f"{weakest_pgd} ({accs[weakest_pgd]:.2%}) by {100 * gap:.1f} points: fixed-step "
            f"PGD is unreliable on this model and its number must not be quoted (the headline "
            f"includes the strongest attack)", affects_headline=False, gap=gap))
    return checks


# --- plots -----------------------------------------------------------------------------------
def _plot_curve(curve, norm, eps, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([c["eps"] for c in curve], [100 * c["accuracy"] for c in curve], "o-",
            label="robust accuracy")
    head = [c for c in curve if c.get("attack") == "headline"]
    if head:
        ax.plot([head[0]["eps"]], [100 * head[0]["accuracy"]], "r*", markersize=11,
                label="headline (worst case incl. the strongest attack)")
    if _is_patch_norm(norm):
        ax.set_xlabel("patch side (pixels)")
    else:
        ax.set_xlabel(f"eps ({'L-inf' if parse_norm(norm) == np.inf else 'L2'}, [0, 1] pixels)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.axvline(eps, color="gray", linestyle="--", linewidth=1, label=f"threat model eps={eps:g}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_examples(x, x_adv, y, clean_pred, adv_pred, attack_name, path, norm):
    """examples.png: the same labelled picture as TensorBoard's ``adversarial/examples``
    (`tfadv.tensorboard.render_examples`), for the strongest attack."""
    from matplotlib import image as mpimg

    from tfadv.tensorboard import render_examples

    picture = render_examples(x, y, clean_pred, x_adv, adv_pred, norm=norm,
                              title=f"clean / {attack_name} / perturbation")
    with atomic_file(path) as tmp:
        mpimg.imsave(tmp, picture, format="png")


# --- the evaluation --------------------------------------------------------------------------
def _remedies(model, checks, threat, x, seed, square_queries, version):
    """``name -> (attack, attack_model, reason)`` for the failed model checks and for layers
    marked non-differentiable (module docstring)."""
    from tfadv.attacks.bpda import bpda_model, find_gradient_blockers, marked_layers

    failed = {c["name"] for c in checks if c["passed"] is False}
    eps, norm = threat["eps"], threat["norm"]
    patch = _is_patch(threat)
    strongest = version if version in ("standard", "fast") else "standard"
    if patch:
        strongest = "fast" if version == "patch-fast" else "standard"
    out = {}
    if "deterministic" in failed:
        if patch:
            name, attack = _headline_attack(threat, strongest, seed)
            attack.eot_samples = EOT_SAMPLES
            out[f"eot-{name}"] = (
                attack, None, f"randomised predictions: {name} with the gradient averaged over "
                f"{EOT_SAMPLES} calls (EOT)")
        else:
            out["eot-autoattack-rand"] = (
                AutoAttack(eps, norm=norm, version="rand", seed=seed), None,
                f"randomised predictions: APGD-CE and APGD-DLR with EOT over {EOT_SAMPLES} calls "
                f"per gradient (AutoAttack 'rand')")
    if "gradients" in failed and not patch:
        from tfadv.attacks.square import Square

        out[f"square-{square_queries}"] = (
            Square(eps, norm=norm, n_queries=square_queries, seed=seed + 1), None,
            f"masked gradients: the black-box Square attack with {square_queries} queries")
    blockers = marked_layers(model)
    why = "layers marked non-differentiable"
    if "gradients" in failed:
        blockers = find_gradient_blockers(model, x)
        why = "masked gradients: the layers that block the gradient"
    if blockers:
        names = ", ".join(layer.name for layer in blockers)
        if patch:
            name, attack = _headline_attack(threat, strongest, seed)
        else:
            name, attack = "autoattack", AutoAttack(eps, norm=norm, version=version or "standard",
                                                    seed=seed)
        out[f"bpda-{name}"] = (
            attack, bpda_model(model, blockers),
            f"{why} ({names}) get a straight-through backward pass (BPDA), then {name}")
    return out


def _headline(result, sanity, version):
    robust = result["robust_accuracy"]
    if not robust:
        return {"accuracy": None, "verdict": "no attack was run", "reliable": False,
                "autoattack": None, "label": "no robust accuracy (no attack)"}
    failed = [c["name"] for c in result["sanity_checks"]
              if c["passed"] is False and c.get("affects_headline", True)]
    if version is None:
        failed.append("no_patch_attack" if _is_patch(result.get("threat_model"))
                      else "no_autoattack")
    if failed:
        verdict = "unreliable: " + ", ".join(failed)
    elif not sanity:
        verdict = "unchecked: the sanity checks were not run"
    else:
        verdict = "reliable"
    label = {"standard": "worst case incl. AutoAttack (standard)",
             "rand": "worst case incl. AutoAttack (rand, EOT)",
             "fast": "worst case incl. AutoAttack-FAST (APGD-CE + APGD-T, not the standard "
                     "ensemble)",
             "patch": "worst case incl. patch PGD at every location",
             "patch-fast": "worst case incl. the patch screen (PGD at the best screened "
                           "locations, not every location)",
             None: ("worst case WITHOUT a patch PGD attack" if _is_patch(
                 result.get("threat_model")) else "worst case WITHOUT AutoAttack")}[version]
    return {"accuracy": result["worst_case_accuracy"], "verdict": verdict,
            "reliable": not failed, "autoattack": version, "label": label,
            "attacks": list(robust)}


@gin.configurable(denylist=["model", "dataset", "output_dir", "strategy"])
def evaluate(model, dataset, attacks=None, sanity=True, autoattack="standard", remedies=True,
             curve_fractions=CURVE_FRACTIONS, max_examples=None, output_dir=None, seed=0,
             verbose=1, strategy=None, resume=True, square_queries=10000, threat_model=None):
    """Evaluates ``model`` (images in [0, 1] -> logits) on a batched ``dataset`` of (x, y).

    ``dataset`` is anything that yields ``(images, integer labels)`` batches (a `tf.data`
    dataset, a list of NumPy pairs); images outside [0, 1] raise a ValueError (for other
    ranges, `tfadv.evaluate` with ``input_range``). The Python API `tfadv.evaluate` (one call on
    arrays, paths, one-hot labels, any input range) calls this function.

    Args:
      attacks: dict ``name -> attack``, each called as ``attack(model, x, y)``; the first with
        ``eps`` and ``norm`` sets the threat model, unless ``threat_model`` is given.
      sanity: run the sanity checks, the remedies and the robustness curve.
      autoattack: the AutoAttack added to ``attacks`` for the headline when none is there:
        ``'standard'`` (default), ``'fast'`` (labelled as such everywhere) or ``None`` (no
        AutoAttack: the verdict is then ``unreliable: no_autoattack``).
      remedies: run the adaptive attacks a failed check calls for (module docstring).
      curve_fractions: multiples of the threat model's eps for the robustness curve; an eps at
        which any image is reachable is appended.
      max_examples: evaluate on the first ``max_examples`` examples only.
      output_dir: where to write ``eval.json`` and the PNGs, and the per-example progress that
        makes an interrupted evaluation resumable (nothing written when ``None``).
      seed: seed of the added AutoAttack, the remedies and the curve.
      verbose: 1 for the progress bar, 0 for silence.
      strategy: a `tf.distribute` strategy whose local devices run batches in parallel
        (default: the current strategy).
      resume: reuse the per-example results saved in ``output_dir`` by an interrupted
        evaluation of the same weights, data and seed.
      square_queries: query budget of the Square remedy for masked gradients (AutoAttack's own
        Square has 5,000).
      threat_model: ``{'eps': ..., 'norm': 'linf' | 'l2' | 'patch'}`` of the added AutoAttack
        (for 'patch', eps is the patch side in pixels and the patch PGD is added), the
        remedies and the robustness curve; default: that of the first attack with ``eps`` and
        ``norm``. Given, the headline holds AutoAttack even when ``attacks`` is empty.

    Returns:
      dict with ``headline`` (``accuracy``, ``verdict``, ``reliable``, ``autoattack``,
      ``label``), ``num_examples``, ``prediction`` (one call, or a randomised model's
      majority vote), ``clean_accuracy``, ``robust_accuracy`` (per attack, the
      remedies included), ``worst_case_accuracy`` (= the headline accuracy), ``remedies``,
      ``counts``, ``seconds``, ``threat_model``, ``attack_details`` (per ensemble: examples each
      component fooled first), ``robustness_curve``, ``sanity_checks`` and ``per_example``.
    """
    if autoattack not in (*HEADLINE_VERSIONS, None):
        raise ValueError(f"evaluate.autoattack must be one of {HEADLINE_VERSIONS} or None; got "
                         f"{autoattack!r}.")
    from tfadv.checks import check_number

    check_number("square_queries", square_queries, 2, strict=False, integer=True)
    attacks = dict(attacks or {})
    check_logits_model(model)
    batches = _batches(dataset, max_examples)
    if not batches:
        raise ValueError("the dataset to evaluate on is empty.")
    image_shape = batches[0][0].shape[1:]
    check_logits_model(model, image_shape)
    predict = _predict_fn(model, image_shape)
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
    check_image_range(x_all, 0.0, 1.0, "evaluate: dataset", api="evaluate")
    n = len(y_all)
    threat = _threat_model(threat_model) if threat_model else _threat(attacks)
    if _is_patch(threat):
        from tfadv.attacks.patch import check_patch_size

        check_patch_size(threat["eps"], image_shape, name="threat_model['eps'] (the patch side)")
    family = _is_patch_attack if _is_patch(threat) else (lambda a: isinstance(a, AutoAttack))
    if autoattack and threat and not any(family(a) for a in attacks.values()):
        name, attack = _headline_attack(threat, autoattack, seed)
        attacks[name] = attack
    grid = []
    if sanity and threat:
        grid = [f * threat["eps"] for f in curve_fractions] + [
            _large_eps(threat["norm"], image_shape)]
        if _is_patch(threat):  # patch sides are whole pixels
            grid = sorted({int(round(e)) for e in grid})
    curve_runs = [e for e in grid if e > 0 and not np.isclose(e, threat["eps"])]
    with Progress(n * (len(attacks) + len(curve_runs)), verbose=verbose) as progress:
        if sanity:
            progress.set_stage("sanity checks")
        checks = model_checks(model, *batches[0]) if sanity else []
        randomised = any(c["name"] == "deterministic" and c["passed"] is False for c in checks)
        if randomised:
            predict = _majority_vote(predict)
        progress.set_stage("clean accuracy")
        start = time.perf_counter()
        clean_logits = np.concatenate([np.asarray(predict(x)) for x, _ in batches])
        clean = np.argmax(clean_logits, -1) == y_all
        seconds = {"clean": time.perf_counter() - start}
        extra = {}
        if sanity and remedies and threat:
            if any(c["passed"] is False for c in checks):
                progress.set_stage("sanity checks: choosing remedies")
            extra = _remedies(model, checks, threat, batches[0][0], seed, square_queries,
                              _autoattack_version(attacks))
        progress.set_total(n * (len(attacks) + len(extra) + len(curve_runs)))

        store = None
        if output_dir is not None and resume:
            store = _ProgressStore(os.path.join(output_dir, "eval_progress"),
                                   _fingerprint(model, x_all, y_all, seed))
        runner = _Runner(batches, predict, _devices(strategy), store, progress)

        robust, first_adv, details, remedy_report = {}, {}, {}, []
        runs = [(name, attack, None, None) for name, attack in attacks.items()]
        runs += [(name, attack, attack_model, reason)
                 for name, (attack, attack_model, reason) in extra.items()]
        for name, attack, attack_model, reason in runs:
            if hasattr(attack, "reset_stats"):
                attack.reset_stats()
            start = time.perf_counter()
            stage = f"remedy {name}" if reason is not None else name
            correct, stats, first_adv[name] = runner.run(name, attack, model, attack_model,
                                                         stage=stage)
            seconds[name] = time.perf_counter() - start
            robust[name] = correct & clean  # a misclassified clean input is not robust
            if isinstance(attack, AutoAttack):
                attack.stats = dict(stats)
                details[name] = dict(stats)
            if reason is not None:
                remedy_report.append({"name": name, "reason": reason, "attack": repr(attack),
                                      "accuracy": float(robust[name].mean())})
        worst = clean.copy()
        for r in robust.values():
            worst &= r

        curve = []
        if grid:
            start = time.perf_counter()
            for eps in grid:
                if eps == 0:
                    correct, source = clean, "clean"
                elif np.isclose(eps, threat["eps"]):
                    correct, source = worst, "headline"
                else:
                    attack = curve_attack(eps, threat["norm"], seed, randomised)
                    correct, _, _ = runner.run(f"curve eps={eps:g}", attack, model,
                                               stage=f"robustness curve eps={eps:g}")
                    correct, source = correct & clean, repr(attack)
                curve.append({"eps": float(eps), "accuracy": float(correct.mean()),
                              "attack": source})
            seconds["robustness_curve"] = time.perf_counter() - start
    if sanity:
        all_attacks = {**attacks, **{k: v[0] for k, v in extra.items()}}
        checks += attack_checks(robust, all_attacks, curve, n)
    for c in checks:
        if c["passed"] is False:
            logging.warning("sanity check %s: %s", c["name"], c["verdict"])

    result = {
        "num_examples": int(n),
        "prediction": (f"majority vote over {EOT_SAMPLES} calls (randomised model)"
                       if randomised else "one call"),
        "clean_accuracy": float(clean.mean()),
        "robust_accuracy": {k: float(v.mean()) for k, v in robust.items()},
        "worst_case_accuracy": float(worst.mean()),
        "remedies": remedy_report,
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
    result["headline"] = _headline(result, sanity, _autoattack_version(attacks))
    if output_dir is not None:
        write_artifacts(result, output_dir, x_all, y_all, clean_logits, first_adv, predict)
        if store is not None:
            store.remove()
    return result


def write_artifacts(result, output_dir, x, y, clean_logits, first_adv, predict):
    """Writes eval.json (atomically), robustness_curve.png and examples.png."""

    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "eval.json"), json.dumps(result, indent=1) + "\n")
    if result["robustness_curve"]:
        threat = result["threat_model"]
        _plot_curve(result["robustness_curve"], threat["norm"], threat["eps"],
                    os.path.join(output_dir, "robustness_curve.png"),
                    f"{curve_title(result)}\n{result['headline']['label']} at eps "
                    f"{threat['eps']:g}: {100 * result['headline']['accuracy']:.1f}% "
                    f"[{result['headline']['verdict']}]")
    shown = {k: v for k, v in first_adv.items() if v is not None}
    if shown:
        # Show the strongest attack: the one with the lowest robust accuracy.
        name = min(shown, key=result["robust_accuracy"].get)
        x_adv = shown[name]
        count = len(x_adv)
        _plot_examples(x[:count], x_adv, y[:count], np.argmax(clean_logits[:count], -1),
                       np.argmax(np.asarray(predict(x_adv)), -1), name,
                       os.path.join(output_dir, "examples.png"),
                       (result["threat_model"] or {}).get("norm", "linf"))


def curve_title(result):
    """Which attack the robustness curve used, in words."""
    attacks = {c["attack"] for c in result.get("robustness_curve", [])}
    if _is_patch(result.get("threat_model")):
        return "robustness curve: the patch screen per patch side (pixels)"
    family = ("AutoAttack rand (EOT APGD-CE + APGD-DLR)" if any("rand" in a for a in attacks)
              else "AutoAttack fast (APGD-CE + APGD-T)")
    return f"robustness curve: {family} per eps"


def adaptive_pairs(result):
    """Each attack next to its adaptive version among the remedies (``bpda-<name>``: BPDA
    through non-differentiable layers; ``eot-<name>``: EOT over a randomised model): a list of
    ``{'attack', 'non_adaptive', 'adaptive', 'adaptive_accuracy'}`` (accuracies in [0, 1])."""
    robust = result.get("robust_accuracy", {})
    pairs = []
    for remedy in result.get("remedies", []):
        prefix, _, base = remedy["name"].partition("-")
        if prefix in ("bpda", "eot") and base in robust:
            pairs.append({"attack": base, "non_adaptive": robust[base],
                          "adaptive": remedy["name"], "adaptive_accuracy": remedy["accuracy"]})
    return pairs


def headline_line(result):
    """The one line to quote: the headline accuracy, what it is, and its verdict."""
    head = result["headline"]
    if head["accuracy"] is None:
        return f"robust accuracy: none ({head['verdict']})"
    threat = result.get("threat_model") or {}
    where = f", {threat['norm']} eps={threat['eps']:g}" if threat else ""
    return (f"ROBUST ACCURACY {100 * head['accuracy']:.2f}%  [{head['verdict']}]  "
            f"({head['label']}{where}, {result['num_examples']} examples)")


def format_table(result):
    """The headline line with its verdict, then a plain-text table of every attack (the
    diagnostics), the remedies, and the sanity-check verdicts."""
    rows = [("clean", result["clean_accuracy"], result["seconds"].get("clean", 0.0))]
    remedy_names = {r["name"] for r in result.get("remedies", [])}
    rows += [(name + (" (remedy)" if name in remedy_names else ""), acc,
              result["seconds"].get(name, 0.0))
             for name, acc in result["robust_accuracy"].items()]
    if result["robust_accuracy"]:
        rows.append(("worst case", result["worst_case_accuracy"], float("nan")))
    width = max(len(r[0]) for r in rows)
    lines = [headline_line(result), "",
             f"{'attack':<{width}}  accuracy  seconds", "-" * (width + 19)]
    for name, acc, sec in rows:
        sec_text = "" if np.isnan(sec) else f"{sec:7.1f}"
        lines.append(f"{name:<{width}}  {100 * acc:7.2f}%  {sec_text}")
    for name, stats in result.get("attack_details", {}).items():
        parts = ", ".join(f"{k} {v}" for k, v in stats.items())
        lines.append(f"{name}: examples fooled first by each component: {parts}")
    for remedy in result.get("remedies", []):
        lines.append(f"remedy {remedy['name']}: {100 * remedy['accuracy']:.2f}% "
                     f"({remedy['reason']})")
    for pair in adaptive_pairs(result):
        lines.append(f"non-adaptive vs adaptive: {pair['attack']} "
                     f"{100 * pair['non_adaptive']:.2f}% | {pair['adaptive']} "
                     f"{100 * pair['adaptive_accuracy']:.2f}%")
    if result.get("robustness_curve"):
        lines.append(curve_title(result) + ": " + ", ".join(
            f"{c['eps']:g}: {100 * c['accuracy']:.1f}%" for c in result["robustness_curve"]))
    for check in result.get("sanity_checks", []):
        mark = "PASS" if check["passed"] else "FAIL"
        lines.append(f"[{mark}] {check['name']}: {check['verdict']}")
    if not result["headline"].get("reliable", False) and result["headline"]["verdict"].startswith(
            "unreliable"):
        lines.append("!!! WARNING: the robust accuracy is UNRELIABLE (a sanity check failed): "
                     "it may be an overestimate. Read the verdicts and the remedies before "
                     "reporting it. !!!")
    lines.append(headline_line(result))
    return "\n".join(lines)


def exit_code(result, allow_unreliable=False):
    """`UNRELIABLE_EXIT_CODE` when the headline's verdict is unreliable (and not allowed), else
    0: the exit status of bin/train and bin/evaluate."""
    verdict = (result.get("headline") or {}).get("verdict", "")
    return UNRELIABLE_EXIT_CODE if verdict.startswith("unreliable") and not allow_unreliable \
        else 0
