#!/usr/bin/env python3
"""Performance of tfadv against the cost of its gradients and against cleverhans and IBM ART.

Usage (one command; ~35 min on 2 CPU cores, most of it PreActResNet-18 and AutoAttack):

    python bench/perf.py --out bench/results/perf

then see ``bench/results/perf/perf.md`` (the tables copied into BUILD.md) and ``perf.json``.
``--models``, ``--parts`` and ``--repeats`` select a subset; ``--quick`` is a smoke run. The same
command runs on a GPU (batch sizes then default to 128 for both models). The comparisons need
``pip install -r bench/requirements.txt`` (IBM ART); without it the ART rows say "not installed".

What is measured, per model (digits CNN on 8x8x1, PreActResNet-18 on 32x32x3; random images and
labels, which cost the same as real ones):

1. Baselines. ``g``: one input-gradient pass (forward + backward to the input, eval-mode BN, in a
   ``tf.function``); ``g_train``: the same with train-mode BN (attacks with ``training=True``);
   ``f``: one forward pass; ``T``: one plain training step (`StandardTraining` through Keras'
   own ``train_function``: forward, backward to the weights, SGD-momentum update).
2. PGD-10 (L-inf, uniform start): tfadv's `PGD`; cleverhans' ``projected_gradient_descent`` as
   documented (eager) and wrapped in ``tf.function`` (which unrolls its 10 steps); ART's
   ``ProjectedGradientDescent`` on a ``TensorFlowV2Classifier``. Ratio to ``10 g``.
3. One training step of every defense (Keras ``train_function``, k = 10 attack steps where the
   method has a k). Two limits: the issue's (attack input-gradient passes + one training step)
   and the method's own (passes its algorithm needs: e.g. TRADES and MART differentiate the clean
   and the adversarial forward pass, ``2 T``; AWP needs one more weight-gradient pass).
4. PGD-AT training throughput (Keras ``fit``, one epoch of ``--art_batches`` batches) against
   ART's ``AdversarialTrainerMadryPGD`` with the same model, data, eps, step, steps and batch.
5. Peak memory (resident set size of a fresh process; GPU peak from TensorFlow on a GPU) of a
   plain training step, PGD-AT with k = 10 and k = 40 (the attack's memory must not grow with k),
   and evaluation (PGD-40 on one batch).
6. The AutoAttack ensemble (standard version: APGD-CE, APGD-T, FAB-T, Square) on 1,000 digits,
   against a digits CNN PGD-trained for ``--aa_epochs`` epochs (an untrained model would be fooled
   by the first component and time nothing). Seconds per 1,000 images.

Every time is the median of ``--repeats`` calls after the warm-up (a traced first call, plus one
more call for the digits CNN). The baselines, attacks and training steps of a model are timed in
interleaved rounds (`Interleaved`), so a change of machine load shifts them all alike and the
ratios hold; the report gives the load average.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfadv import heads, models  # noqa: E402
from tfadv.attacks import PGD, cross_entropy  # noqa: E402
from tfadv.defenses import (AWP, MART, MMC, TRADES, FeatureScatterAttack,  # noqa: E402
                            FeatureScattering, FreeAdversarialTraining,
                            IntervalBoundPropagation, PGDAdversarialTraining, RandomTargetPGD,
                            StabilityTraining, StandardTraining)

K = 10  # attack steps of every k-step method
SHAPES = {"digits_cnn": (8, 8, 1), "preact_resnet18": (32, 32, 3)}
EPS = {"digits_cnn": 0.3, "preact_resnet18": 8 / 255}
GPU = bool(tf.config.list_physical_devices("GPU"))

# Goals of issue 9.
PGD_GOAL = 1.10       # PGD-k time <= 1.10 x k input-gradient passes
PGD_AT_GOAL = 1.15    # PGD-AT step <= 1.15 x (k input-gradient passes + one training step)
ART_GOAL = 10.0       # PGD-AT throughput >= 10 x ART's AdversarialTrainerMadryPGD


# --- timing ---------------------------------------------------------------------------------
def _block(result):
    """Waits for ``result`` (tensors, dicts of tensors, numpy) to be computed."""
    for leaf in tf.nest.flatten(result):
        if hasattr(leaf, "numpy"):
            leaf.numpy()
    return result


class Interleaved:
    """Times functions in interleaved rounds (A B C, A B C, ...) and reports each one's median.

    A change of machine load during the run hits every function alike, so the ratios between
    them (attack to gradient pass, training step to its limit) hold even on a busy machine; the
    absolute times are only as good as the machine was idle (the report gives the load)."""

    def __init__(self):
        self.functions = {}

    def add(self, key, fn):
        self.functions[key] = fn

    def run(self, repeats, warmup=2):
        """Returns ``(median seconds, first-call seconds)`` per key. The first warm-up call
        includes tracing: it is what a new model costs before its first result."""
        first = {}
        for number, (key, fn) in enumerate(self.functions.items(), 1):
            print(f"  warm-up {number}/{len(self.functions)}: {' '.join(map(str, key))}",
                  flush=True)
            for i in range(warmup):
                start = time.perf_counter()
                _block(fn())
                if i == 0:
                    first[key] = time.perf_counter() - start
        times = {key: [] for key in self.functions}
        for round_ in range(repeats):
            print(f"  timing round {round_ + 1}/{repeats}", flush=True)
            for key, fn in self.functions.items():
                start = time.perf_counter()
                _block(fn())
                times[key].append(time.perf_counter() - start)
        return {key: float(np.median(t)) for key, t in times.items()}, first


def random_batch(name, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *SHAPES[name]), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    return x, y


def build_base(name, head=None):
    """A freshly initialised ``name`` model (seeded), with the HE or MMC head if asked."""
    keras.utils.set_random_seed(0)
    shape = SHAPES[name]
    if head == "he":
        return heads.he_model(input_shape=shape, num_classes=10, backbone=name, scale=10.0)
    if head == "mmc":
        return heads.mmc_model(input_shape=shape, num_classes=10, backbone=name, dim=256,
                               c_mm=10.0)
    return models.MODELS[name](input_shape=shape, num_classes=10)


# --- 1. baselines ---------------------------------------------------------------------------
def input_gradient_fn(model, training):
    @tf.function(autograph=False)
    def grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(cross_entropy(y, model(x, training=training)))
        return tape.gradient(loss, x)
    return grad


def train_step_fn(defense, x, y):
    """One call of the defense's own Keras ``train_function`` on the batch (x, y)."""
    defense.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    defense.make_train_function()
    return lambda: defense.train_function(iterator)


def add_baselines(timer, name, x, y, head=None):
    model = build_base(name, head)
    xt, yt = tf.constant(x), tf.constant(y)
    forward = tf.function(lambda x_: model(x_, training=False), autograph=False)
    grad_eval, grad_train = input_gradient_fn(model, False), input_gradient_fn(model, True)
    timer.add(("baseline", head, "g"), lambda: grad_eval(xt, yt))
    timer.add(("baseline", head, "g_train"), lambda: grad_train(xt, yt))
    timer.add(("baseline", head, "f"), lambda: forward(xt))
    timer.add(("baseline", head, "T"),
              train_step_fn(StandardTraining(build_base(name, head)), x, y))


# --- 2. PGD-10 against cleverhans and ART ----------------------------------------------------
def art_classifier(model, name, optimizer=None):
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model, nb_classes=10, input_shape=SHAPES[name], optimizer=optimizer,
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0))


def art_available():
    return importlib.util.find_spec("art") is not None


ATTACKS = ("tfadv PGD", "cleverhans PGD (eager, as documented)",
           "cleverhans PGD in tf.function (10 unrolled steps)",
           "ART ProjectedGradientDescent (TF2)")


def add_attacks(timer, name, x, y):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    eps = EPS[name]
    step = eps / 4
    model = build_base(name)
    xt, yt = tf.constant(x), tf.constant(y)
    ours = PGD(eps=eps, step_size=step, steps=K, random_start="uniform", seed=0)

    def cleverhans(x_, y_):
        return projected_gradient_descent(model, x_, eps, step, K, np.inf, clip_min=0.0,
                                          clip_max=1.0, y=y_, rand_init=True,
                                          sanity_checks=False)

    cleverhans_graph = tf.function(cleverhans, autograph=False)
    timer.add(("attack", ATTACKS[0]), lambda: ours(model, xt, yt))
    timer.add(("attack", ATTACKS[1]), lambda: cleverhans(xt, yt))
    timer.add(("attack", ATTACKS[2]), lambda: cleverhans_graph(xt, yt))
    if art_available():
        from art.attacks.evasion import ProjectedGradientDescent

        art_pgd = ProjectedGradientDescent(
            art_classifier(model, name), norm=np.inf, eps=eps, eps_step=step, max_iter=K,
            num_random_init=1, batch_size=len(x), verbose=False)
        onehot = np.eye(10, dtype=np.float32)[y]
        timer.add(("attack", ATTACKS[3]), lambda: art_pgd.generate(x, y=onehot))


def attack_rows(times, first, base_line):
    limit = K * base_line["g"]
    rows = {}
    for label in ATTACKS:
        s = times.get(("attack", label))
        rows[label] = {"seconds": s, "ratio_to_limit": None if s is None else s / limit,
                       "first_call_seconds": first.get(("attack", label))}
    return rows


# --- 3. every defense's training step -------------------------------------------------------
def defense_specs(name):
    """(label, head, builder(base) -> defense, issue limit, method limit, why) per defense.

    A limit is a dict of unit counts: ``g`` input-gradient passes (eval-mode BN), ``g_train``
    (train-mode BN), ``f`` forward passes, ``T`` plain training steps."""
    eps = EPS[name]
    step = eps / 4

    def pgd(**kw):
        return PGD(eps=eps, step_size=step, steps=K, random_start="uniform", **kw)

    def kl_pgd():
        return PGD(eps=eps, step_size=step, steps=K, random_start="normal",
                   loss_fn="kl_divergence")

    at = {"g": K, "T": 1}
    return [
        ("PGD-AT (Madry)", None, lambda b: PGDAdversarialTraining(b, attack=pgd()), at, at,
         "k attack passes + one step: nothing else to do"),
        ("TRADES", None, lambda b: TRADES(b, beta=6.0, attack=kl_pgd()), at,
         {"g": K, "f": 1, "T": 2},
         "one clean forward for the KL targets; the loss differentiates the clean and the "
         "adversarial forward pass (2 T)"),
        ("AT-AWP", None, lambda b: PGDAdversarialTraining(b, attack=pgd(), awp=AWP(gamma=0.01)),
         at, {"g": K, "T": 2},
         "the weight perturbation is one more forward/backward to the weights (Wu et al.)"),
        ("MART", None, lambda b: MART(b, beta=6.0, attack=pgd()), at, {"g": K, "T": 2},
         "the loss differentiates the clean and the adversarial forward pass (2 T)"),
        ("RST_adv (TRADES step on a pseudo-labelled batch)", None,
         lambda b: TRADES(b, beta=6.0, attack=kl_pgd()), at, {"g": K, "f": 1, "T": 2},
         "RST_adv is TRADES on batches half pseudo-labelled: the same step, other data"),
        ("RST_stab (stability training)", None,
         lambda b: StabilityTraining(b, sigma=0.25, beta=6.0), {"T": 1}, {"T": 2},
         "no attack; clean and noisy forward passes are both differentiated (2 T)"),
        ("Feature Scattering", None,
         lambda b: FeatureScattering(b, attack=FeatureScatterAttack(eps=eps, step_size=eps,
                                                                    steps=1)),
         {"g": 1, "T": 1}, {"g": 1, "f": 1, "T": 1},
         "one clean forward for the transport plan, plus Sinkhorn on a batch x batch cost"),
        ("PGD-AT + HE", "he",
         lambda b: PGDAdversarialTraining(b, attack=pgd(), margin=0.2), at, at,
         "as PGD-AT (normalised head, same passes)"),
        ("AT-MMC", "mmc",
         lambda b: MMC(b, attack=RandomTargetPGD(eps=eps, step_size=step, steps=K,
                                                 training=True)),
         {"g_train": K, "T": 1}, {"g_train": K, "T": 1},
         "train-mode BN attack as the official code (its limit uses train-mode passes)"),
        ("FGSM-RS (fast AT)", None,
         lambda b: PGDAdversarialTraining(b, attack=PGD(eps=eps, step_size=1.25 * eps, steps=1,
                                                        random_start="uniform")),
         {"g": 1, "T": 1}, {"g": 1, "T": 1}, "one attack pass + one step"),
        ("Free AT (m = 8 replays)", None,
         lambda b: FreeAdversarialTraining(b, eps=eps, replays=8, batch_size=len_batch[0]),
         {"T": 8}, {"T": 8},
         "each replay is one training step whose backward also yields the input gradient"),
        ("IBP", None,
         lambda b: IntervalBoundPropagation(b, eps=eps, warmup_steps=0, rampup_steps=1),
         {"T": 1}, {"T": 1},
         "no attack; interval bounds add a centre and a radius pass per layer (|W| matmul)"),
    ]


len_batch = [128]  # the Free AT perturbation buffer is sized to the batch


def cost(units, base_line):
    return sum(n * base_line[unit] for unit, n in units.items())


def add_defenses(timer, name, x, y, only=None):
    len_batch[0] = len(x)
    specs = []
    for spec in defense_specs(name):
        label, head, build = spec[:3]
        if only and not any(key.lower() in label.lower() for key in only):
            continue
        timer.add(("defense", label), train_step_fn(build(build_base(name, head)), x, y))
        specs.append(spec)
    return specs


def defense_rows(times, first, specs, base_lines, batch):
    rows = []
    for label, head, _, issue_units, method_units, why in specs:
        base_line = base_lines[head]
        seconds = times[("defense", label)]
        issue_limit, method_limit = cost(issue_units, base_line), cost(method_units, base_line)
        rows.append({"defense": label, "seconds": seconds, "images_per_second": batch / seconds,
                     "first_call_seconds": first[("defense", label)],
                     "issue_limit": issue_limit, "ratio_issue": seconds / issue_limit,
                     "method_limit": method_limit, "ratio_method": seconds / method_limit,
                     "issue_units": issue_units, "method_units": method_units, "why": why})
        print(f"  {label}: {seconds * 1e3:.1f} ms, {seconds / issue_limit:.2f}x issue limit, "
              f"{seconds / method_limit:.2f}x method limit", flush=True)
    return rows


# --- 4. PGD-AT throughput against ART's Madry trainer ----------------------------------------
def art_trainer_throughput(name, batch, batches, rounds=2):
    """Images/s of one epoch of PGD-AT (Keras ``fit`` on arrays) and of ART's Madry trainer,
    timed in alternating rounds after one warm-up epoch each; the best round of each."""
    eps = EPS[name]
    x, y = random_batch(name, batch * batches, seed=1)
    result = {"images": len(x), "batch": batch}
    defense = PGDAdversarialTraining(
        build_base(name), attack=PGD(eps=eps, step_size=eps / 4, steps=K,
                                     random_start="uniform"))
    defense.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    epochs = {"tfadv": lambda: defense.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                                           shuffle=False)}
    if art_available():
        from art.defences.trainer import AdversarialTrainerMadryPGD

        classifier = art_classifier(build_base(name), name,
                                    optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        trainer = AdversarialTrainerMadryPGD(classifier, nb_epochs=1, batch_size=batch,
                                             eps=eps, eps_step=eps / 4, max_iter=K,
                                             num_random_init=1)
        onehot = np.eye(10, dtype=np.float32)[y]
        epochs["art"] = lambda: trainer.fit(x, onehot)
    seconds = {key: [] for key in epochs}
    for i in range(rounds + 1):
        for key, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            if i:  # round 0 is the warm-up (tracing)
                seconds[key].append(time.perf_counter() - start)
    result["tfadv_images_per_second"] = len(x) / min(seconds["tfadv"])
    result["art_images_per_second"] = len(x) / min(seconds["art"]) if "art" in seconds else None
    if result["art_images_per_second"]:
        result["speedup"] = result["tfadv_images_per_second"] / result["art_images_per_second"]
    return result


# --- 5. peak memory (child processes) -------------------------------------------------------
def _status_mb(field):
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak():
    """Resets VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(name, batch, mode):
    """Runs one workload in this (fresh) process and prints its memory as JSON."""
    x, y = random_batch(name, batch)
    eps = EPS[name]
    if mode == "eval_pgd40":
        model = build_base(name)
        attack = PGD(eps=eps, step_size=eps / 4, steps=40, seed=0)
        run = lambda: attack(model, x, y)  # noqa: E731
    else:
        steps = {"standard": 0, "pgd_at10": 10, "pgd_at40": 40}[mode]
        base = build_base(name)
        defense = (StandardTraining(base) if steps == 0 else PGDAdversarialTraining(
            base, attack=PGD(eps=eps, step_size=eps / 4, steps=steps)))
        defense.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        defense.make_train_function()
        run = lambda: defense.train_function(iterator)  # noqa: E731
    _block(run())  # trace and first run
    startup_peak = _status_mb("VmHWM")
    _reset_peak()
    before = _status_mb("VmRSS")
    for _ in range(3):
        _block(run())
    out = {"rss_before_mb": before, "peak_rss_mb": _status_mb("VmHWM"),
           "startup_peak_rss_mb": startup_peak}
    if GPU:
        out["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    print("MEMORY " + json.dumps(out), flush=True)


def memory(name, batch):
    rows = {}
    for mode in ("standard", "pgd_at10", "pgd_at40", "eval_pgd40"):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory_child", mode, "--models", name,
             "--batch", str(batch)], capture_output=True, text=True, check=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY ")][-1]
        rows[mode] = json.loads(line[len("MEMORY "):])
        print(f"  {mode}: peak RSS {rows[mode]['peak_rss_mb']:.0f} MB", flush=True)
    return rows


# --- 6. AutoAttack per 1,000 images ---------------------------------------------------------
def autoattack_time(epochs, count):
    from tfadv.attacks import AutoAttack
    from tfadv.data import digits_arrays

    splits = digits_arrays()
    keras.utils.set_random_seed(0)
    defense = PGDAdversarialTraining(
        models.digits_cnn(), attack=PGD(eps=0.3, step_size=0.1, steps=7))
    defense.compile(optimizer=keras.optimizers.Adam(1e-3))
    defense.fit(*splits["train"], batch_size=64, epochs=epochs, verbose=0)
    # The digits have 360 test and 180 validation images: the rest of the 1,000 are training
    # images (more of them survive the first components, so the time is if anything high).
    x = np.concatenate([splits[s][0] for s in ("test", "validation", "train")])[:count]
    y = np.concatenate([splits[s][1] for s in ("test", "validation", "train")])[:count]
    y = y.astype("int64")
    attack = AutoAttack(eps=0.3, version="standard", seed=0)
    clean = float(np.mean(np.argmax(defense.base_model.predict(x, verbose=0), -1) == y))
    start = time.perf_counter()
    robust = 0
    for begin in range(0, len(x), 500):
        x_adv = attack(defense.base_model, x[begin:begin + 500], y[begin:begin + 500])
        robust += int(np.sum(np.argmax(defense.base_model(x_adv, training=False), -1)
                             == y[begin:begin + 500]))
    seconds = time.perf_counter() - start
    return {"images": len(x), "seconds": seconds, "seconds_per_1000": seconds * 1000 / len(x),
            "clean_accuracy": clean, "robust_accuracy": robust / len(x),
            "first_fooled_by": dict(attack.stats), "train_epochs": epochs}


# --- report ---------------------------------------------------------------------------------
def _ms(seconds):
    return "n/a (ART not installed)" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def _verdict(ok):
    return "met" if ok else "**missed**"


def markdown(results, command):
    lines = [f"Command: `{command}`", "",
             f"Device: {'GPU' if GPU else 'CPU'}; TensorFlow {tf.__version__}, Keras "
             f"{keras.__version__}; k = {K}. Load average (1 min) at the start of each "
             f"model: {results.get('load', {})} (2 cores: ~1 is this benchmark alone).", ""]
    for name, res in results["models"].items():
        batch = res["batch"]
        base_line = res["baselines"][None]
        lines += [f"#### {name} ({'x'.join(map(str, SHAPES[name]))}, batch {batch}, "
                  f"eps {EPS[name]:.4g})", "",
                  "| baseline | time |", "|---|---|",
                  f"| one input-gradient pass g (eval-mode BN) | {_ms(base_line['g'])} |",
                  f"| one input-gradient pass g_train (train-mode BN) | "
                  f"{_ms(base_line['g_train'])} |",
                  f"| one forward pass f | {_ms(base_line['f'])} |",
                  f"| one plain training step T | {_ms(base_line['T'])} |", ""]
        if "attacks" in res:
            lines += ["| PGD-10 | time | x 10 g | first call (trace + run) |",
                      "|---|---|---|---|"]
            for label, row in res["attacks"].items():
                ratio = "" if row["ratio_to_limit"] is None else f"{row['ratio_to_limit']:.2f}"
                first = ("" if row["first_call_seconds"] is None
                         else f"{row['first_call_seconds']:.2f} s")
                lines.append(f"| {label} | {_ms(row['seconds'])} | {ratio} | {first} |")
            ours = res["attacks"]["tfadv PGD"]
            eager = res["attacks"]["cleverhans PGD (eager, as documented)"]["seconds"]
            graph = res["attacks"]["cleverhans PGD in tf.function (10 unrolled steps)"]["seconds"]
            lines += ["", f"Goal PGD-10 <= {PGD_GOAL} x 10 g: {ours['ratio_to_limit']:.2f} "
                          f"({_verdict(ours['ratio_to_limit'] <= PGD_GOAL)}). Against cleverhans: "
                          f"{eager / ours['seconds']:.2f}x faster than its documented eager "
                          f"call, {graph / ours['seconds']:.2f}x its tf.function-wrapped loop.",
                      ""]
        if "defenses" in res:
            lines += ["| defense (one training step) | time | images/s | issue limit | x issue "
                      "limit | method limit | x method limit | what the method limit adds |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in res["defenses"]:
                units = lambda u: " + ".join(f"{n} {k}" for k, n in u.items())  # noqa: E731
                lines.append(
                    f"| {row['defense']} | {_ms(row['seconds'])} | "
                    f"{row['images_per_second']:,.1f} | {units(row['issue_units'])} | "
                    f"{row['ratio_issue']:.2f} | {units(row['method_units'])} | "
                    f"{row['ratio_method']:.2f} | {row['why']} |")
            at = res["defenses"][0]
            lines += ["", f"Goal PGD-AT step <= {PGD_AT_GOAL} x its limit: "
                          f"{at['ratio_issue']:.2f} ({_verdict(at['ratio_issue'] <= PGD_AT_GOAL)}).",
                      ""]
        if "art_trainer" in res:
            art = res["art_trainer"]
            lines += [f"PGD-AT training throughput, Keras fit over {art['images']} images, batch "
                      f"{art['batch']}: tfadv {art['tfadv_images_per_second']:,.1f} images/s"]
            if art.get("art_images_per_second"):
                lines[-1] += (f"; ART AdversarialTrainerMadryPGD "
                              f"{art['art_images_per_second']:,.1f} images/s: "
                              f"**{art['speedup']:.1f}x** (goal >= {ART_GOAL:g}x: "
                              f"{_verdict(art['speedup'] >= ART_GOAL)}).")
            lines.append("")
        if "memory" in res:
            lines += ["| workload (fresh process; after its first call) | RSS before | peak RSS "
                      "over 3 more calls | growth (working memory) | peak of start-up, "
                      "tracing and first call |" + (" GPU peak |" if GPU else ""),
                      "|---|---|---|---|---|" + ("---|" if GPU else "")]
            labels = {"standard": "plain training step", "pgd_at10": "PGD-AT, k = 10",
                      "pgd_at40": "PGD-AT, k = 40", "eval_pgd40": "evaluation: PGD-40"}
            for mode, row in res["memory"].items():
                line = (f"| {labels[mode]} | {row['rss_before_mb']:,.0f} MB | "
                        f"{row['peak_rss_mb']:,.0f} MB | "
                        f"{row['peak_rss_mb'] - row['rss_before_mb']:,.0f} MB | "
                        f"{row['startup_peak_rss_mb']:,.0f} MB |")
                if GPU:
                    line += f" {row['gpu_peak_mb']:,.0f} MB |"
                lines.append(line)
            lines.append("")
    if "autoattack" in results:
        aa = results["autoattack"]
        lines += [f"AutoAttack (standard) on {aa['images']} digits against a digits CNN "
                  f"PGD-trained for {aa['train_epochs']} epochs (clean "
                  f"{aa['clean_accuracy']:.1%}, robust {aa['robust_accuracy']:.1%}): "
                  f"**{aa['seconds_per_1000']:.0f} s per 1,000 images**; first fooled by "
                  f"{aa['first_fooled_by']}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/perf")
    parser.add_argument("--models", default="digits_cnn,preact_resnet18")
    parser.add_argument("--parts", default="attacks,defenses,art_trainer,memory,autoattack")
    parser.add_argument("--defenses", default="", help="comma-separated label filter")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 128; PreActResNet-18 on CPU: 32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default: 10 digits, 3 ResNet)")
    parser.add_argument("--art_batches", type=int, default=None,
                        help="batches in the ART comparison epoch (default: 16 digits, 2 ResNet)")
    parser.add_argument("--aa_epochs", type=int, default=15)
    parser.add_argument("--aa_images", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny repeats")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in SHAPES:
            parser.error(f"--models: each must be one of {sorted(SHAPES)}; got {n!r}.")
    parts = set(p for p in args.parts.split(",") if p)
    known = {"attacks", "defenses", "art_trainer", "memory", "autoattack"}
    if parts - known:
        parser.error(f"--parts: each must be one of {sorted(known)}; got {sorted(parts - known)}.")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1; got {args.batch}.")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}.")

    def batch_of(name):
        if args.batch:
            return args.batch
        return 32 if name == "preact_resnet18" and not GPU else 128

    if args.memory_child:
        return memory_child(names[0], batch_of(names[0]), args.memory_child)
    os.makedirs(args.out, exist_ok=True)
    command = "python bench/perf.py " + " ".join(sys.argv[1:])
    results = {"command": command, "device": "GPU" if GPU else "CPU", "models": {}}
    for name in names:
        big = name == "preact_resnet18"
        repeats = args.repeats or (1 if args.quick else (3 if big else 10))
        batch = batch_of(name)
        print(f"{name}, batch {batch}", flush=True)
        results.setdefault("load", {})[name] = round(os.getloadavg()[0], 2)
        x, y = random_batch(name, batch)
        res = {"batch": batch}
        timer = Interleaved()
        for head in (None, "he", "mmc"):
            add_baselines(timer, name, x, y, head)
        if "attacks" in parts:
            add_attacks(timer, name, x, y)
        specs = []
        if "defenses" in parts:
            only = [d.strip() for d in args.defenses.split(",") if d.strip()]
            specs = add_defenses(timer, name, x, y, only)
        times, first = timer.run(repeats, warmup=1 if big or args.quick else 2)
        res["baselines"] = {head: {unit: times[("baseline", head, unit)]
                                   for unit in ("g", "g_train", "f", "T")}
                            for head in (None, "he", "mmc")}
        if "attacks" in parts:
            res["attacks"] = attack_rows(times, first, res["baselines"][None])
        if specs:
            res["defenses"] = defense_rows(times, first, specs, res["baselines"], batch)
        if "art_trainer" in parts:
            batches = args.art_batches or (1 if args.quick else (2 if big else 16))
            res["art_trainer"] = art_trainer_throughput(name, batch, batches)
        if "memory" in parts:
            res["memory"] = memory(name, batch)
        res["baselines"] = {str(k) if k else None: v for k, v in res["baselines"].items()}
        results["models"][name] = res
        _write(args.out, results, command)
    if "autoattack" in parts:
        results["autoattack"] = autoattack_time(1 if args.quick else args.aa_epochs,
                                                100 if args.quick else args.aa_images)
    _write(args.out, results, command)
    print(markdown(_keyed(results), command))


def _keyed(results):
    """JSON turns the baseline key None into 'null'; the report reads it back as None."""
    out = json.loads(json.dumps(results))
    for res in out["models"].values():
        res["baselines"] = {None if k in ("null", None) else k: v
                            for k, v in res["baselines"].items()}
    return out


def _write(out_dir, results, command):
    for filename, text in (("perf.json", json.dumps(results, indent=1, default=str)),
                           ("perf.md", markdown(_keyed(results), command))):
        tmp = os.path.join(out_dir, filename + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, filename))


if __name__ == "__main__":
    main()
