"""What every attack shares: argument checks and the compiled call.

An attack is called as ``attack(model, x, labels)`` with images ``x`` in [clip_min, clip_max]
and the TRUE labels, and returns float32 adversarial images of the same shape, inside the
attack's threat model (its eps-ball intersected with the image box), with no gradient attached.
Where the attack fails on an example it may return any point of the threat model for it.

Images outside [clip_min, clip_max] are refused (`check_image_range`: a one-line ValueError
naming the range found and the fix), never clipped into the box in silence: 8-bit images
(0..255) attacked with eps = 8/255 would otherwise be clipped to an almost white image. The check
is one min and one max per eager call; inside a traced function (a ``train_step``) it is skipped.
`tfadv.attack` (`tfadv.api`) maps images in any ``input_range`` to [0, 1] and back.

Subclasses implement ``_attack(model, x, labels)`` in graph-compatible TensorFlow. `Attack.__call__`
compiles it once per (model, input signature) as a `tf.function` whose batch dimension is
``None``, so batches of any size reuse one trace; when already inside a traced function (a
``train_step``, a strategy replica function) it inlines the graph instead, so each replica runs it
on its own device. ``trace_count`` counts traces, for tests and benchmarks.

Randomness is deterministic for a given ``seed``: subclasses draw with `tf.random.stateless_*`
ops seeded by `Attack.seed_tensor`, so the same inputs and seed give the same output. An attack
with ``seed=None`` inside a training step (`training_step_seed`, set by
`tfadv.defenses.Defense.train_step`) draws from a stateless seed keyed by the run and the global
step, so a run resumed from a checkpoint draws exactly what the uninterrupted run drew; elsewhere
``seed=None`` draws fresh randomness on every call.
"""

import contextlib
import math
import threading

import numpy as np
import tensorflow as tf

from tfadv.checks import check_number  # noqa: F401  (re-exported: attacks' argument checks)


_STEP = threading.local()
# Values this far outside the box (relative to its width) still pass `check_image_range`: float
# rounding of an image scaled into the box, not a wrong range. The projection clips them.
RANGE_TOLERANCE = 1e-5


def suggest_input_range(low, high):
    """The usual image range that holds values in [low, high]: (0, 1), (0, 255) or (-1, 1), or
    the integers around them; what an error message proposes as ``input_range``."""
    for lo, hi in ((0, 1), (0, 255), (-1, 1)):
        if lo - RANGE_TOLERANCE <= low and high <= hi + RANGE_TOLERANCE:
            return lo, hi
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return math.floor(low), math.ceil(high)


def value_range(x):
    """``(min, max)`` of an array or eager tensor as floats (one reduction each; NaN when a NumPy
    array holds NaN), or ``None`` for an empty one."""
    if isinstance(x, tf.Tensor):
        if x.shape.num_elements() == 0:
            return None
        return float(tf.reduce_min(x)), float(tf.reduce_max(x))
    x = np.asarray(x)
    if x.size == 0:
        return None
    return float(np.min(x)), float(np.max(x))


def check_image_range(x, clip_min=0.0, clip_max=1.0, who="attack", api="attack"):
    """Raises a one-line ValueError unless every value of the image batch ``x`` lies in
    ``[clip_min, clip_max]`` (within `RANGE_TOLERANCE` of the box's width); the message names
    the range found, the range expected and the fix (``tfadv.<api>(..., input_range=...)``).
    Eager only: one min and one max."""
    found = value_range(x)
    if found is None:
        return
    low, high = found
    slack = RANGE_TOLERANCE * (clip_max - clip_min)
    if clip_min - slack <= low and high <= clip_max + slack:  # False for NaN
        return
    guess = suggest_input_range(low, high)
    if not (math.isfinite(low) and math.isfinite(high)):
        fix = "remove the non-finite pixels (NaN or inf) first"
    elif guess is not None and guess != (clip_min, clip_max):
        fix = (f"pass images scaled to [{clip_min:g}, {clip_max:g}] (e.g. x / 255 for 8-bit "
               f"images), or call tfadv.{api}(model, x, y, ..., input_range="
               f"({guess[0]:g}, {guess[1]:g})), which maps that range to the attack's")
    else:
        fix = f"clip or rescale them to [{clip_min:g}, {clip_max:g}]"
    raise ValueError(
        f"{who}: images must lie in [{clip_min:g}, {clip_max:g}] (clip_min, clip_max), but "
        f"they span [{low:g}, {high:g}]: {fix}; they are not clipped silently.")


@contextlib.contextmanager
def training_step_seed(seed):
    """Within the block, attacks with ``seed=None`` seed their stateless draws with ``seed`` (a
    shape-[2] int32 tensor: the run's seed and the step) instead of drawing a fresh random seed.
    `tfadv.defenses.Defense.train_step` wraps its attacks in it while its graph is traced."""
    previous = getattr(_STEP, "seed", None)
    _STEP.seed = seed
    try:
        yield
    finally:
        _STEP.seed = previous


class Attack:
    """Base class: compiled call, trace counting, seeded randomness (see module docstring)."""

    def __init__(self, clip_min=0.0, clip_max=1.0, seed=0):
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be < clip_max; got {clip_min} and {clip_max}.")
        if seed is not None:
            check_number("seed", seed, 0, strict=False, integer=True)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.seed = seed
        self.trace_count = 0
        self._functions = {}
        self._lock = threading.Lock()  # `tfadv.evaluation` attacks batches in parallel threads

    def __call__(self, model, x, labels):
        return self.compiled(self._traced, model, x, labels)

    def compiled(self, traced, model, x, labels):
        """Calls ``traced(model, x, labels)`` compiled once per (entry point, model, input
        signature), or inlined when already inside a traced function (see module docstring).
        An eager call first checks that ``x`` lies in [clip_min, clip_max]
        (`check_image_range`)."""
        x = tf.convert_to_tensor(x)
        labels = tf.convert_to_tensor(labels)
        if tf.inside_function():
            return traced(model, x, labels)
        check_image_range(x, self.clip_min, self.clip_max, type(self).__name__)
        key = (traced.__name__, id(model), tuple(x.shape[1:]), x.dtype, labels.dtype,
               tuple(labels.shape[1:]))
        with self._lock:
            fn = self._functions.get(key)
            if fn is None:
                def entry(x_, y_):
                    return traced(model, x_, y_)

                # One name per attack object and entry point, so a trace count keyed by name
                # shows a retrace. autograph=False: attack loops are explicit tf.while_loops;
                # autograph would re-read the source at trace time and slows tracing down.
                entry.__name__ = f"{type(self).__name__}_{id(self):x}_{traced.__name__}"
                fn = tf.function(
                    entry, autograph=False,
                    input_signature=[tf.TensorSpec([None, *x.shape[1:]], x.dtype),
                                     tf.TensorSpec([None, *labels.shape[1:]], labels.dtype)])
                # TensorFlow's frequent-retracing warning counts traces per Python code object,
                # so every attack object's one trace would add up to a false "retracing"
                # warning (an evaluation builds many attacks); each function here has a fixed
                # input signature and traces once (tests/test_tracing.py proves it).
                fn._omit_frequent_tracing_warning = True  # noqa: SLF001
                self._functions[key] = fn
                # The first call traces; holding the lock makes a parallel first call wait
                # for this trace instead of tracing the same function again.
                return fn(x, labels)
        return fn(x, labels)

    def _traced(self, model, x, labels):
        self.trace_count += 1
        x_adv = self._attack(model, tf.cast(x, tf.float32), labels)
        return tf.stop_gradient(x_adv)

    def _attack(self, model, x, labels):
        raise NotImplementedError

    def seed_tensor(self, *salt):
        """A stateless-op seed (shape [2], int32) from ``seed`` and integer/tensor ``salt``.

        With ``seed=None``: the training step's seed inside `training_step_seed`, else a fresh
        random seed on each call (non-deterministic)."""
        if self.seed is None:
            step = getattr(_STEP, "seed", None)
            if step is None:
                return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
            first, mix = tf.unstack(tf.cast(step, tf.int32))
            for s in salt:
                mix = mix * 1000003 + tf.cast(s, tf.int32)
            return tf.stack([first, mix])
        mix = tf.constant(self.seed, tf.int32)
        for s in salt:
            mix = mix * 1000003 + tf.cast(s, tf.int32)
        return tf.stack([tf.constant(self.seed, tf.int32), mix])
