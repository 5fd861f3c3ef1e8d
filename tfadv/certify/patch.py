"""Interval bound propagation certificate against m x m patches.

Chiang, Ni, Abdelkader, Zhu, Studer, Goldstein, "Certified Defenses for Adversarial Patches",
ICLR 2020 (official code: Ping-C/certifiedpatchdefense, ``train.py``, attack type ``patch-all``,
bound type ``patch-interval``).

A patch at location l (mask M_l, `tfadv.attacks.patch`) can turn x into any image of the box

    B_l(x) = [(1 - M_l) * x + M_l * lo,  (1 - M_l) * x + M_l * hi]

with [lo, hi] = [0, 1] for the threat model (`patch_box`; during training the patch pixels may
range over the smaller [clip(x - eps), clip(x + eps)], the official eps ramp). IBP
(`tfadv.certify.ibp.worst_case_logits`, the last layer elided) bounds the margins over each box:
v_{l,j} >= z_j(x') - z_y(x') for every x' in B_l(x). The worst case over the locations is the
elementwise maximum

    v_j = max_l v_{l,j}                         (`worst_case_over_locations`)

(official: ``torch.min`` over the locations of the lower bounds of z_y - z_j, per class j), and
x is certified at patch size m when v_j < 0 for every j != y: no patch content at any of the
(H - m + 1)(W - m + 1) locations (`patch_locations`, the last row and column included; the
official certificate's grid has them too, its empirical ``PatchAttacker`` never samples them)
changes the prediction from y. The clean image
lies in every box, so a certified example is also correctly classified.

All (example, location) boxes of a batch go through the network together, in chunks of at most
``max_batch`` boxes (a `tf.while_loop` over location chunks; no Python loop per location).

Report schema of `certified_patch_accuracy` (the field names of
``tfadv.certify.derandomized.certified_band_accuracy``)::

    {'method': 'ibp-patch',
     'clean_accuracy': float,                 # accuracy of the model on the clean images
     'certified_accuracy': {m: float},        # correct AND certified, per patch size m
     'num_examples': int,
     'seconds': float,
     'num_locations': {m: int},               # (H - m + 1)(W - m + 1)
     'records': [                             # one per example, in order
         {'label': int, 'prediction': int, 'correct': bool,
          'certified': {m: bool},
          'worst_margin': {m: float}}, ...]}  # max_{j != y} v_j: < 0 iff certified
"""

import time

import numpy as np
import tensorflow as tf

from tfadv.attacks.patch import (apply_patch, check_patch_size, patch_box, patch_locations,
                                 patch_masks)
from tfadv.certify import ibp
from tfadv.certify.derandomized import _arrays, _patch_sizes
from tfadv.checks import check_number

METHOD = "ibp-patch"


def all_patch_masks(image_shape, size):
    """float32 (L, H, W, 1): the masks of every ``size`` x ``size`` location of an image of
    ``image_shape`` (`patch_locations`, last row and column included)."""
    return patch_masks(image_shape, size, patch_locations(image_shape, size))


def _location_bounds(model, x, labels, masks, eps, clip_min, clip_max, values, batch_statistics):
    """(B, K) max over the k locations of ``masks`` ((k, H, W, 1), the same for every example,
    or (B, k, H, W, 1), per example) of the worst-case logits over each location's box."""
    x = tf.cast(x, tf.float32)
    masks = tf.cast(masks, tf.float32)
    if masks.shape.rank == 4:
        masks = masks[None]
    xs = x[:, None]  # (B, 1, H, W, C) against (B or 1, k, H, W, 1)
    if eps is None:
        lower, upper = patch_box(xs, masks, clip_min, clip_max)
    else:  # the official training ramp: patch pixels in [clip(x - eps), clip(x + eps)]
        low, high = ibp.input_box(xs, eps, clip_min, clip_max)
        lower, upper = apply_patch(xs, low, masks), apply_patch(xs, high, masks)
    count = tf.shape(lower)[1]
    flat = [-1, *x.shape[1:]]
    repeated = tf.repeat(tf.cast(labels, tf.int32), count)
    worst = ibp.worst_case_logits(model, tf.reshape(lower, flat), tf.reshape(upper, flat),
                                  repeated, values=values, batch_statistics=batch_statistics)
    worst = tf.reshape(worst, [tf.shape(x)[0], count, worst.shape[-1]])
    return tf.reduce_max(worst, axis=1)


def worst_case_over_locations(model, x, labels, masks, max_batch=None, eps=None, clip_min=0.0,
                              clip_max=1.0, values=None, batch_statistics=None):
    """Upper bounds v_j on z_j - z_y over every patch of ``masks``, 0 at j = y (module
    docstring): the elementwise maximum over the locations of `tfadv.certify.ibp.
    worst_case_logits`. Graph-compatible and differentiable in the weights.

    Args:
      model: a classifier built from `tfadv.certify.ibp.SUPPORTED_LAYERS`.
      x: images (B, H, W, C) in [clip_min, clip_max].
      labels: integer labels (B,).
      masks: (L, H, W, 1) locations shared by every example, or (B, k, H, W, 1) per example.
      max_batch: with shared masks, the most boxes per network call (the locations run in
        chunks of max(1, max_batch // B)); None: all B * L boxes at once.
      eps: None for the threat model (patch pixels in [clip_min, clip_max]); a radius for the
        training ramp (patch pixels in [clip(x - eps), clip(x + eps)]).
      clip_min, clip_max: the image box.
      values, batch_statistics: as in `tfadv.certify.ibp.worst_case_logits` (training).

    Returns:
      float32 (B, num_classes); the example is certified where every v_j, j != y, is < 0
      (`tfadv.certify.ibp.is_verified`).
    """
    args = (eps, clip_min, clip_max, values, batch_statistics)
    if max_batch is None or tf.convert_to_tensor(masks).shape.rank != 4:
        return _location_bounds(model, x, labels, masks, *args)
    masks = tf.convert_to_tensor(masks, tf.float32)
    num_locations = tf.shape(masks)[0]
    batch = tf.shape(x)[0]
    chunk = tf.maximum(1, int(max_batch) // tf.maximum(batch, 1))
    num_classes = int(model.output_shape[-1])

    def body(start, worst):
        part = masks[start:start + chunk]
        return start + chunk, tf.maximum(worst, _location_bounds(model, x, labels, part, *args))

    start = tf.constant(0)
    worst = tf.fill([batch, num_classes], tf.constant(-np.inf, tf.float32))
    _, worst = tf.while_loop(lambda s, _: s < num_locations, body, (start, worst),
                             shape_invariants=(start.shape, tf.TensorShape([None, num_classes])))
    return worst


def _check_arrays(x, y):
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).reshape(-1)
    if x.ndim != 4:
        raise ValueError(f"x must be images of shape (N, H, W, C); got {x.shape}.")
    if len(y) != len(x):
        raise ValueError(f"x and y must hold the same number of examples; got {len(x)} and "
                         f"{len(y)}.")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"x must be images in [0, 1]; got values in [{x.min()}, {x.max()}].")
    return x, y.astype(np.int64)


def _worst_margins(model, x, y, size, max_batch):
    """(N, K) worst-case logits over every ``size`` location, examples grouped so that a call
    holds about ``max_batch`` boxes."""
    image_shape = x.shape[1:]
    masks = all_patch_masks(image_shape, size)
    per_call = max(1, int(max_batch) // int(masks.shape[0]))
    bound = tf.function(
        lambda images, labels: worst_case_over_locations(model, images, labels, masks,
                                                         max_batch=max_batch),
        reduce_retracing=True)
    parts = [np.asarray(bound(tf.constant(x[i:i + per_call]), tf.constant(y[i:i + per_call])))
             for i in range(0, len(x), per_call)]
    return np.concatenate(parts) if parts else np.zeros((0, int(model.output_shape[-1])))


def _margin(worst, y):
    """max_{j != y} v_j per example (NumPy)."""
    others = worst.copy()
    others[np.arange(len(y)), y] = -np.inf
    return others.max(axis=1)


def certify_patch(model, x, y, patch_size, max_batch=4096):
    """Per example, True where IBP certifies that no ``patch_size`` x ``patch_size`` patch at
    any location changes the prediction from ``y`` (module docstring).

    Args:
      model: a classifier (images in [0, 1] -> logits) built from
        `tfadv.certify.ibp.SUPPORTED_LAYERS`.
      x: images (N, H, W, C) in [0, 1].
      y: integer labels (N,).
      patch_size: m, an integer 1 <= m <= min(H, W).
      max_batch: the most boxes (example, location) per network call (integer >= 1).

    Returns:
      bool NumPy array (N,).
    """
    x, y = _check_arrays(x, y)
    check_patch_size(patch_size, x.shape[1:])
    check_number("max_batch", max_batch, 1, strict=False, integer=True)
    ibp.check_supported(model)
    return _margin(_worst_margins(model, x, y, patch_size, max_batch), y) < 0.0


def certified_patch_accuracy(model, data, patch_sizes, max_examples=None, max_batch=4096):
    """Clean and IBP-certified accuracy against m x m patches, for each m of ``patch_sizes``.

    Args:
      model: as in `certify_patch`.
      data: a pair of arrays (x, y) or batches of (x, y) (a `tf.data` dataset, a list of pairs).
      patch_sizes: an int m or a list of them, each 1 <= m <= min(H, W).
      max_examples: certify the first ``max_examples`` examples (all if None).
      max_batch: the most boxes per network call.

    Returns:
      the report dict of the module docstring.
    """
    start_time = time.perf_counter()
    if max_examples is not None:
        check_number("max_examples", max_examples, 1, strict=False, integer=True)
    check_number("max_batch", max_batch, 1, strict=False, integer=True)
    ibp.check_supported(model)
    x, y = _check_arrays(*_arrays(data, max_examples))
    sizes = _patch_sizes(patch_sizes, x.shape[1:])
    n = len(x)
    predict = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    logits = [np.asarray(predict(tf.constant(x[i:i + max_batch])))
              for i in range(0, n, max_batch)]
    prediction = np.argmax(np.concatenate(logits), axis=1) if n else np.zeros(0, np.int64)
    correct = prediction == y
    margins = {m: _margin(_worst_margins(model, x, y, m, max_batch), y) for m in sizes}
    certified = {m: (margins[m] < 0.0) & correct for m in sizes}
    records = [{"label": int(y[i]), "prediction": int(prediction[i]),
                "correct": bool(correct[i]),
                "certified": {m: bool(certified[m][i]) for m in sizes},
                "worst_margin": {m: float(margins[m][i]) for m in sizes}} for i in range(n)]
    return {
        "method": METHOD,
        "clean_accuracy": float(correct.mean()) if n else float("nan"),
        "certified_accuracy": {m: float(certified[m].mean()) if n else float("nan")
                               for m in sizes},
        "num_examples": n,
        "seconds": round(time.perf_counter() - start_time, 3),
        "num_locations": {m: int(len(patch_locations(x.shape[1:], m))) for m in sizes},
        "records": records,
    }


def format_table(report):
    """A plain-text table of a `certified_patch_accuracy` report (or of
    `tfadv.certify.derandomized.certified_band_accuracy`'s, which has no location counts)."""
    head = "patch   locations  certified accuracy"
    lines = [head, "-" * len(head)]
    for m, acc in report["certified_accuracy"].items():
        lines.append(f"{f'{m}x{m}':<7} {report.get('num_locations', {}).get(m, '-'):>9}  {100 * acc:17.2f}%")
    lines.append(f"(clean accuracy {100 * report['clean_accuracy']:.2f}%; "
                 f"{report['num_examples']} examples; {report['seconds']:.1f} s)")
    return "\n".join(lines)
