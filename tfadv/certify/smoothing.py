"""Randomized smoothing: a certified L2 radius for a Gaussian-smoothed classifier.

Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019
(official code: locuslab/smoothing, ``code/core.py`` and ``code/certify.py``). From a base
classifier f (``model``: images in [0, 1] -> logits; train it with
`tfadv.defenses.GaussianAugmentation` or `tfadv.defenses.StabilityTraining`) the smoothed
classifier is

    g(x) = argmax_c  P( f(x + eps) = c ),    eps ~ N(0, sigma^2 I).

Theorem 1 of the paper: if the top class c_A has probability P(f(x + eps) = c_A) >= p_A_lower and
every other class at most p_B_upper, then g(x + delta) = c_A for every ||delta||_2 < R with

    R = sigma / 2 * ( Phi^-1(p_A_lower) - Phi^-1(p_B_upper) ),

and with p_B_upper = 1 - p_A_lower (as CERTIFY uses it) R = sigma * Phi^-1(p_A_lower), Phi^-1 the
standard normal quantile (`scipy.stats.norm.ppf`). g cannot be evaluated exactly, so the paper
gives two Monte Carlo algorithms, implemented by `Smooth`:

- PREDICT (`Smooth.predict`): draw n noisy copies, take the top two classes' counts n_A, n_B;
  return c_A if the two-sided binomial test of n_A out of n_A + n_B against p = 1/2 has p-value
  <= alpha, else abstain. Returns g(x) with probability >= 1 - alpha (or abstains).
- CERTIFY (`Smooth.certify`): n0 noisy copies select c_A (the most frequent class); n *fresh*
  copies count n_A = #{f(x + eps) = c_A}; p_A_lower is the one-sided (1 - alpha) Clopper-Pearson
  lower confidence bound on p_A from n_A out of n; abstain if p_A_lower < 1/2, else certify
  radius sigma * Phi^-1(p_A_lower). With probability >= 1 - alpha it abstains or returns g(x)
  with a correct radius.

Symbols -> arguments: f = ``model``, sigma = ``sigma``, n0 = ``n0``, n = ``n``, alpha = ``alpha``.
Paper defaults (``certify.py``): n0 = 100, n = 100,000, alpha = 0.001.

Official-code details followed here (where they differ from the paper's text, the code wins):

- p_A_lower = ``proportion_confint(n_A, n, alpha=2 * alpha, method="beta")[0]``, i.e. the
  ``alpha`` quantile of Beta(n_A, n - n_A + 1), and 0 when n_A = 0 (`lower_confidence_bound`).
- Abstain when p_A_lower < 0.5; the paper's pseudocode certifies only when p_A_lower > 1/2, the
  code also certifies p_A_lower = 0.5 exactly (radius 0).
- An abstention is reported as class -1 (`ABSTAIN`) with radius 0.
- The noise is added in [0, 1] pixel space (before the model's normalisation) and not clipped;
  f runs in inference mode (``model.eval()`` there, ``training=False`` here).
- Certified accuracy at radius r (``analyze.py``) is the fraction of examples whose prediction is
  correct AND whose radius is >= r; abstentions count as wrong (`certified_accuracy`).

Sampling (tfadv's): noise is drawn in batches of ``batch_size`` copies, one compiled
`tf.function` call per batch (one trace per image shape), with a counter-based Philox generator:
noise copy j of a stream is the block of the stream's Philox sequence at counter j * ceil(d / 4)
(d = pixels per image; TensorFlow's Philox normal kernel turns one counter into 4 float32 values),
so the result depends on the seed only, not on ``batch_size``. Each call draws from its own
stream: PREDICT, CERTIFY's selection and CERTIFY's estimation use different streams of the same
``seed``, so the n0 and n samples are independent, as the algorithm requires.
"""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from scipy import stats

from tfadv.checks import check_number, check_sigma
from tfadv.rundir import atomic_file

ABSTAIN = -1
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

# Streams of one seed (see the module docstring).
_PREDICT, _SELECTION, _ESTIMATION = 0, 1, 2
_PHILOX = tf.random.Algorithm.PHILOX.value


def check_alpha(alpha):
    """Returns ``float(alpha)``; raises ValueError unless it is a number in (0, 1)."""
    if (not isinstance(alpha, (int, float, np.floating)) or isinstance(alpha, bool)
            or not 0 < alpha < 1):
        raise ValueError(f"alpha (failure probability) must be a number in (0, 1); "
                         f"got {alpha!r}.")
    return float(alpha)


def _check_seed(seed):
    """A seed as a tuple of non-negative integers (an int or a tuple of ints)."""
    parts = seed if isinstance(seed, (tuple, list)) else (seed,)
    if not parts or any(not isinstance(p, (int, np.integer)) or isinstance(p, bool) or p < 0
                        for p in parts):
        raise ValueError(f"seed must be an integer >= 0 or a tuple of them; got {seed!r}.")
    return tuple(int(p) for p in parts)


def lower_confidence_bound(k, n, alpha):
    """One-sided (1 - ``alpha``) Clopper-Pearson lower confidence bound on a binomial proportion
    p from ``k`` successes in ``n`` draws: the ``alpha`` quantile of Beta(k, n - k + 1), 0 when
    k = 0. Equals the official ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``.
    P(p >= bound) >= 1 - alpha over the draws."""
    check_number("n", n, 1, strict=False, integer=True)
    check_number("k", k, 0, strict=False, integer=True, high=n)
    alpha = check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, k, n - k + 1))


class Smooth:
    """The smoothed classifier g of a base classifier f (Cohen et al. 2019; module docstring):

        g(x) = argmax_c P( f(x + eps) = c ),   eps ~ N(0, sigma^2 I),

    with f = ``model`` and sigma = ``sigma``; `certify` returns g's class c_A and the certified
    L2 radius R = sigma * Phi^-1(p_A_lower) ([0, 1] pixel units), `predict` the class alone.

    Example (runs as is)::

        import keras, numpy as np
        from tfadv.certify.smoothing import Smooth
        base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(10)])
        g = Smooth(base, num_classes=10, sigma=0.25, batch_size=500)
        x = np.random.RandomState(0).rand(8, 8, 1).astype("float32")
        g.predict(x, n=1000, alpha=0.001, seed=0)           # class or -1 (abstain)
        g.certify(x, n0=100, n=10000, alpha=0.001, seed=0)  # (class, L2 radius) or (-1, 0.0)

    Args:
      model: the base classifier f, a Keras model (or a callable ``model(x, training=False)``)
        from a batch of images in [0, 1] to (batch, num_classes) scores; only their argmax is
        used.
      num_classes: number of classes; ``None`` reads it from ``model.output_shape``.
      sigma: the noise standard deviation, [0, 1] pixel units, > 0 (use the sigma f was
        trained with).
      batch_size: noisy copies per forward pass (official code: 1000; 400 in the experiments).
        Does not change the result (see the module docstring).
      jit_compile: compile the forward pass with XLA (measured ~3x faster for the digits CNN
        on CPU; XLA may round differently, so counts can differ slightly from ``False``).

    ``trace_count`` counts the traces of the compiled counting function (one per image shape).
    """

    ABSTAIN = ABSTAIN

    def __init__(self, model, num_classes, sigma, batch_size=1000, jit_compile=False):
        self.sigma = check_sigma(sigma)
        check_number("batch_size", batch_size, 1, strict=False, integer=True)
        out = getattr(model, "output_shape", None)
        known = out[-1] if isinstance(out, tuple) and len(out) == 2 else None
        if num_classes is None:
            if known is None:
                raise ValueError("num_classes is None and the model has no (batch, classes) "
                                 "output_shape to read it from: pass num_classes.")
            num_classes = known
        check_number("num_classes", num_classes, 2, strict=False, integer=True)
        if known is not None and known != num_classes:
            raise ValueError(f"num_classes={num_classes} but the model outputs {known} scores "
                             "per example.")
        inp = getattr(model, "input_shape", None)
        self.image_shape = (tuple(inp[1:]) if isinstance(inp, tuple) and len(inp) > 1
                            and all(isinstance(d, int) for d in inp[1:]) else None)
        self.model = model
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.jit_compile = bool(jit_compile)
        self.trace_count = 0
        self._functions = {}

    # --- sampling ------------------------------------------------------------------------
    def check_image(self, x):
        """``x`` as a float32 array of one image; ValueError unless its shape is the model's
        image shape and its values are finite and in [0, 1]."""
        x = np.asarray(x, dtype="float32")
        if self.image_shape is not None and x.shape != self.image_shape:
            raise ValueError(f"x must be one image of shape {self.image_shape} (the model's "
                             f"input without the batch dimension); got shape {x.shape}.")
        if x.ndim < 1 or x.size == 0:
            raise ValueError(f"x must be one non-empty image; got shape {x.shape}.")
        if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
            raise ValueError(f"x must have finite pixel values in [0, 1]; got values in "
                             f"[{np.nanmin(x):g}, {np.nanmax(x):g}].")
        return x

    def _count_function(self, shape):
        fn = self._functions.get(shape)
        if fn is not None:
            return fn
        pixels = int(np.prod(shape))
        padded = 4 * math.ceil(pixels / 4)  # whole Philox counters per noise copy
        sigma, num_classes, model = self.sigma, self.num_classes, self.model

        def classify(images):  # XLA-compiled with jit_compile (the noise is drawn outside)
            return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)

        classify = tf.function(classify, autograph=False, jit_compile=self.jit_compile)

        def count(x, key, counter, size):
            self.trace_count += 1
            noise = tf.raw_ops.StatelessRandomNormalV2(
                shape=tf.stack([size, padded]), key=key, counter=counter, alg=_PHILOX)
            noise = tf.reshape(noise[:, :pixels], [-1, *shape])
            predictions = classify(x[None] + sigma * noise)
            return tf.math.bincount(predictions, minlength=num_classes, maxlength=num_classes,
                                    dtype=tf.int64)

        fn = tf.function(count, autograph=False, input_signature=[
            tf.TensorSpec(shape, tf.float32), tf.TensorSpec([1], tf.uint64),
            tf.TensorSpec([2], tf.uint64), tf.TensorSpec([], tf.int32)])
        self._functions[shape] = fn
        return fn

    def sample_counts(self, x, num, seed=0):
        """Counts of f(x + eps), eps ~ N(0, sigma^2 I), over ``num`` noisy copies of the image
        ``x`` (the official ``_sample_noise``): an int64 array of length ``num_classes``.

        ``seed`` (an int >= 0 or a tuple of them) names the noise stream: the same seed gives
        the same counts, whatever ``batch_size``."""
        x = self.check_image(x)
        check_number("num", num, 1, strict=False, integer=True)
        seed = _check_seed(seed)
        # Length first: SeedSequence pads entropy with zeros, so (s,) and (s, 0) would collide.
        words = np.random.SeedSequence([len(seed), *seed]).generate_state(2, dtype=np.uint64)
        key = words[:1]
        per_copy = math.ceil(x.size / 4)  # Philox counters per noise copy
        fn = self._count_function(x.shape)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        done = 0
        while done < num:
            size = min(self.batch_size, num - done)
            counter = np.array([(done * per_copy) % 2**64, words[1]], dtype=np.uint64)
            counts += fn(x, key, counter, np.int32(size)).numpy()
            done += size
        return counts

    # --- the two algorithms --------------------------------------------------------------
    def predict(self, x, n, alpha, seed=0):
        """Cohen et al.'s PREDICT: g(x) from ``n`` noisy copies, or `ABSTAIN` (-1) when the
        two-sided binomial test of the top count n_A out of n_A + n_B (n_B: the runner-up)
        against p = 1/2 has p-value > ``alpha``. Returns g(x) with probability >= 1 - alpha
        (or abstains)."""
        x = self.check_image(x)
        check_number("n", n, 1, strict=False, integer=True)
        alpha = check_alpha(alpha)
        seed = _check_seed(seed)
        counts = self.sample_counts(x, n, seed + (_PREDICT,))
        top2 = np.argsort(-counts, kind="stable")[:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if stats.binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def certify_details(self, x, n0, n, alpha, seed=0):
        """CERTIFY (see `certify`) with its intermediate values: a dict with ``prediction``
        (c_A or -1), ``radius``, ``p_lower`` (p_A_lower), ``count`` (n_A of the estimation
        samples) and ``selected`` (c_A, also when abstaining)."""
        x = self.check_image(x)
        check_number("n0", n0, 1, strict=False, integer=True)
        check_number("n", n, 1, strict=False, integer=True)
        alpha = check_alpha(alpha)
        seed = _check_seed(seed)
        selected = int(np.argmax(self.sample_counts(x, n0, seed + (_SELECTION,))))
        count = int(self.sample_counts(x, n, seed + (_ESTIMATION,))[selected])
        p_lower = lower_confidence_bound(count, n, alpha)
        if p_lower < 0.5:
            prediction, radius = ABSTAIN, 0.0
        else:
            prediction, radius = selected, float(self.sigma * stats.norm.ppf(p_lower))
        return {"prediction": prediction, "radius": radius, "p_lower": p_lower,
                "count": count, "selected": selected}

    def certify(self, x, n0, n, alpha, seed=0):
        """Cohen et al.'s CERTIFY: ``(c_A, sigma * Phi^-1(p_A_lower))``, or ``(-1, 0.0)``
        (abstain) when p_A_lower < 0.5. c_A is the most frequent class of ``n0`` selection
        copies; p_A_lower the (1 - ``alpha``) Clopper-Pearson lower bound from ``n`` fresh
        copies. With probability >= 1 - alpha the answer abstains or is g(x) with g constant on
        the L2 ball of that radius."""
        result = self.certify_details(x, n0, n, alpha, seed)
        return result["prediction"], result["radius"]


# --- datasets ------------------------------------------------------------------------------
def first_examples(dataset, max_examples=None):
    """The first ``max_examples`` (all when ``None``) examples of a batched ``dataset`` of
    (images, labels) as two NumPy arrays (float32 images, int64 labels)."""
    xs, ys, total = [], [], 0
    for x, y in dataset:
        x, y = np.asarray(x, "float32"), np.asarray(y).astype("int64").reshape(-1)
        if max_examples is not None:
            x, y = x[:max_examples - total], y[:max_examples - total]
        xs.append(x)
        ys.append(y)
        total += len(y)
        if max_examples is not None and total >= max_examples:
            break
    if not total:
        raise ValueError("the dataset to certify is empty.")
    return np.concatenate(xs), np.concatenate(ys)


def certify_dataset(smooth, dataset, n0, n, alpha, max_examples=None, seed=0, verbose=1):
    """Runs `Smooth.certify` on the first ``max_examples`` examples (all when ``None``) of a
    batched ``dataset`` of (images, labels), like the official ``certify.py``.

    Example i uses the seed ``(seed, i)``, so its result does not depend on the other examples.

    Returns:
      a list of per-example records (dicts): ``index``, ``label``, ``prediction`` (-1 =
      abstain), ``radius``, ``correct`` (0/1; prediction == label), ``p_lower``, ``count`` and
      ``seconds``.
    """
    check_number("n0", n0, 1, strict=False, integer=True)
    check_number("n", n, 1, strict=False, integer=True)
    alpha = check_alpha(alpha)
    if max_examples is not None:
        check_number("max_examples", max_examples, 1, strict=False, integer=True)
    seed = _check_seed(seed)
    images, labels = first_examples(dataset, max_examples)
    bar = keras.utils.Progbar(len(labels), unit_name="example", verbose=verbose,
                              stateful_metrics=["abstained"])
    records, abstained = [], 0
    for i, (x, label) in enumerate(zip(images, labels)):
        start = time.perf_counter()
        result = smooth.certify_details(x, n0, n, alpha, seed=seed + (i,))
        seconds = time.perf_counter() - start
        correct = int(result["prediction"] == int(label))
        abstained += result["prediction"] == ABSTAIN
        records.append({"index": i, "label": int(label), "prediction": result["prediction"],
                        "radius": result["radius"], "correct": correct,
                        "p_lower": result["p_lower"], "count": result["count"],
                        "seconds": round(seconds, 4)})
        bar.add(1, values=[("correct", correct), ("radius", result["radius"]),
                           ("abstained", abstained)])
    return records


def certified_accuracy(records, radii):
    """Certified accuracy at each radius r of ``radii``: the fraction of ``records`` whose
    prediction is correct AND whose certified radius is >= r (abstentions count as wrong), as
    the official ``analyze.py``. Returns a list of floats (one per radius)."""
    radii = [float(r) for r in np.atleast_1d(radii)]
    if any(not math.isfinite(r) or r < 0 for r in radii):
        raise ValueError(f"radii must be finite numbers >= 0; got {radii}.")
    if not records:
        raise ValueError("records is empty: nothing was certified.")
    correct = np.array([bool(r["correct"]) and r["prediction"] != ABSTAIN for r in records])
    radius = np.array([float(r["radius"]) for r in records])
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def summarize(records, radii=DEFAULT_RADII):
    """The numbers of a certification run: ``num_examples``, ``certified_accuracy`` (radius
    string -> fraction), ``abstained`` (count), ``accuracy`` (of g: correct, any radius),
    ``mean_radius`` (of the correct predictions, 0 for the others) and ``seconds`` (sum over
    examples)."""
    accuracies = certified_accuracy(records, radii)
    correct = np.array([r["correct"] for r in records], dtype=bool)
    return {
        "num_examples": len(records),
        "certified_accuracy": {f"{float(r):g}": a for r, a in zip(radii, accuracies)},
        "abstained": int(sum(r["prediction"] == ABSTAIN for r in records)),
        "accuracy": float(correct.mean()),
        "mean_radius": float(np.mean([r["radius"] if r["correct"] else 0.0 for r in records])),
        "seconds": round(float(sum(r.get("seconds", 0.0) for r in records)), 2),
    }


def format_table(summary, sigma=None):
    """A plain-text table of a `summarize` result: certified accuracy per L2 radius."""
    head = "L2 radius  certified accuracy"
    lines = [head, "-" * len(head)]
    for radius, acc in summary["certified_accuracy"].items():
        lines.append(f"{radius:>9}  {100 * acc:17.2f}%")
    where = "" if sigma is None else f", sigma={sigma:g}"
    lines.append(f"({summary['num_examples']} examples{where}; abstained "
                 f"{summary['abstained']}; {summary['seconds']:.1f} s)")
    return "\n".join(lines)


# --- plot ----------------------------------------------------------------------------------
def plot_certified_accuracy(curves, path, title="Randomized smoothing (Cohen et al. 2019)"):
    """Plots certified accuracy against L2 radius (one step curve per entry of ``curves``, a
    dict ``label -> records``, e.g. ``{"sigma=0.25": records}``) to the PNG ``path``, written
    atomically (a temporary file in the same directory, then a rename)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("curves is empty: give at least one label -> records entry.")
    largest = max(max(float(r["radius"]) for r in recs) for recs in curves.values())
    grid = np.linspace(0.0, max(largest * 1.05, 0.1), 400)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, records in curves.items():
        ax.plot(grid, 100 * np.array(certified_accuracy(records, grid)), label=label)
    ax.set_xlabel("L2 radius ([0, 1] pixels)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
