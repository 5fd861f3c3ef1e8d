"""The patch threat model: an m x m square of the image replaced by any content in [0, 1].

A patch attacker picks a location (the patch's top-left corner (row, col)) and the content of an
m x m square of pixels (all channels), and leaves every other pixel as it is (Brown et al.,
"Adversarial Patch", 2017; Karmon et al., "LaVAN: Localized and Visible Adversarial Noise",
ICML 2018; Chiang et al., "Certified Defenses for Adversarial Patches", ICLR 2020). For an
H x W image there are (H - m + 1) x (W - m + 1) locations: `patch_locations` lists every one of
them, the last row and column included (Chiang et al.'s official code never sampled those), and it
is the one list of locations that the patch attacks and the patch certificates share.

With a location's 0/1 mask M (1 inside the square) the patched image is

    x' = (1 - M) * x + M * p,        p in [0, 1]^(H x W x C)

(`apply_patch`), and the set of all such x' for one location is the box
[(1 - M) * x, (1 - M) * x + M] (`patch_box`), which interval bound propagation certifies.
"""

import gin
import numpy as np
import tensorflow as tf

from tfadv.attacks.base import Attack, check_image_range
from tfadv.attacks.losses import get_loss
from tfadv.attacks.pgd import PGD
from tfadv.checks import check_number


def check_patch_size(size, image_shape, name="patch_size"):
    """Raises a one-line ValueError unless ``size`` is an integer m with 1 <= m <= min(H, W) of
    ``image_shape`` (H, W[, C]); returns m."""
    height, width = int(image_shape[0]), int(image_shape[1])
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > min(
            height, width):
        raise ValueError(f"{name}: a {size}x{size} patch does not fit a {height}x{width} image "
                         f"({name} must be an integer >= 1 and <= {min(height, width)}).")
    check_number(name, size, 1, strict=False, integer=True, high=min(height, width))
    return int(size)


def patch_locations(image_shape, size, stride=1):
    """int32 array (L, 2) of the top-left corners (row, col) of every ``size`` x ``size`` patch
    of an image of ``image_shape`` (H, W[, C]), row-major, with ``stride`` pixels between
    neighbours; the last row (H - size) and column (W - size) are always included, also when
    ``stride`` does not divide H - size. Raises ValueError for a patch that does not fit."""
    size = check_patch_size(size, image_shape)
    check_number("stride", stride, 1, strict=False, integer=True)
    height, width = int(image_shape[0]), int(image_shape[1])

    def starts(extent):
        values = list(range(0, extent - size + 1, stride))
        if values[-1] != extent - size:
            values.append(extent - size)
        return values

    rows, cols = starts(height), starts(width)
    return np.array([(r, c) for r in rows for c in cols], dtype=np.int32)


def patch_masks(image_shape, size, locations):
    """float32 tensor (L, H, W, 1): mask l is 1 on the ``size`` x ``size`` square whose top-left
    corner is ``locations[l]`` (a (L, 2) array or int tensor of (row, col)) and 0 elsewhere."""
    height, width = int(image_shape[0]), int(image_shape[1])
    locations = tf.convert_to_tensor(locations, tf.int32)
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    top, left = locations[:, 0][:, None, None], locations[:, 1][:, None, None]
    inside = ((rows >= top) & (rows < top + size)) & ((cols >= left) & (cols < left + size))
    return tf.cast(inside, tf.float32)[..., None]


def apply_patch(x, patch, mask):
    """``(1 - mask) * x + mask * patch``: the patched images (shapes broadcast)."""
    return (1.0 - mask) * x + mask * patch


def patch_box(x, mask, clip_min=0.0, clip_max=1.0):
    """``(lower, upper)``: the box of every image the patch of ``mask`` can make from ``x``:
    x outside the patch, [clip_min, clip_max] inside it."""
    lower = (1.0 - mask) * x + mask * clip_min
    upper = (1.0 - mask) * x + mask * clip_max
    return lower, upper


def _patch_losses_and_logits(model, eot_samples, training):
    """A callable ``(images, training) -> logits`` for the attack loop: ``model`` itself, or for
    ``eot_samples`` = K > 1 the log of its softmax averaged over K calls (the expected prediction
    of a randomised model, whose cross-entropy -log E[p_y] the ascent then follows)."""
    if eot_samples <= 1:
        return model

    def expected(images, training=training):
        def draw(k, total):
            logits = tf.cast(model(images, training=training), tf.float32)
            return k + 1, total + tf.nn.softmax(logits)

        first = tf.nn.softmax(tf.cast(model(images, training=training), tf.float32))
        _, total = tf.while_loop(lambda k, _: k < eot_samples, draw, (tf.constant(1), first))
        return tf.math.log(total / float(eot_samples) + 1e-12)

    return expected


@gin.configurable
class PatchPGD(Attack):
    """LaVAN-style patch attack: PGD on the content of an m x m patch at each candidate location,
    keeping per example the strongest (location, content) pair.

    Karmon, Zoran, Goldberg, "LaVAN", ICML 2018; the evaluation protocol of Chiang et al.
    (ICLR 2020, Sec. 5: 150 PGD steps of size 0.05 on the patch, random locations). For one
    location with mask M (module docstring) the attack solves

        max_{p in [0, 1]^d}  L(f((1 - M) * x + M * p), y)

    by signed-gradient ascent ``p <- clip(p + alpha * sign(grad_p L), 0, 1)`` from a uniform
    random p: tfadv's one PGD loop (`tfadv.attacks.pgd.PGD`, L-inf with eps = 1, i.e. only the
    [0, 1] box) run on the patched model ``p -> f((1 - M) * x + M * p)``, so the gradient
    outside the patch is zero and those pixels never move. Symbols -> arguments: m = ``size``,
    alpha = ``step_size``, the number of steps = ``steps``, L = ``loss``.

    Locations. ``locations='all'``: every one of the (H - m + 1)(W - m + 1) locations
    (`patch_locations`, last row and column included). ``locations=k`` (an integer): a screen
    of ``screen_steps`` steps at every location, then the full ``steps`` at the k locations the
    screen found strongest plus k uniformly random ones; with ``screen_steps=0`` only k random
    locations (Chiang et al.'s protocol uses k = 80).

    Batching. The (example, location) pairs run ``max_batch`` at a time in a `tf.while_loop`
    (one graph, any number of locations), location-major, and an example is dropped from the
    remaining locations as soon as one patch fools the model: the result is the same as running
    every location (the first fooling patch is kept), at a fraction of the cost on weak models.

    Returned per example: a patched image that the model misclassifies if one was found (at
    any iterate), else the highest-loss final patch of any location.

    Args:
      size: the side m of the square patch in pixels (integer, 1 <= m <= min(H, W)).
      steps: PGD steps per location (>= 1; Chiang et al.: 150).
      step_size: alpha (> 0; Chiang et al.: 0.05).
      locations: ``'all'`` or an integer k >= 1 (see above).
      screen_steps: steps of the screen for ``locations=k`` (>= 0; 0 = no screen).
      loss: ``'cross_entropy'`` or ``'cw_margin'`` (or any `tfadv.attacks.losses` name).
      max_batch: (example, location) pairs per model call (>= 1).
      eot_samples: model calls averaged per gradient for randomised models (>= 1; the
        evaluation sets 20 for them).
      seed: seed of the random starts and the random locations.
    """

    norm = "patch"

    def __init__(self, size, steps=150, step_size=0.05, locations="all", screen_steps=10,
                 loss="cross_entropy", max_batch=1024, eot_samples=1, clip_min=0.0,
                 clip_max=1.0, seed=0):
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        check_number("size", size, 1, strict=False, integer=True)
        check_number("steps", steps, 1, strict=False, integer=True)
        check_number("step_size", step_size, 0.0, strict=True)
        if locations != "all":
            if isinstance(locations, str):
                raise ValueError(f"locations must be 'all' or an integer >= 1; got "
                                 f"{locations!r}.")
            check_number("locations", locations, 1, strict=False, integer=True)
        check_number("screen_steps", screen_steps, 0, strict=False, integer=True)
        check_number("max_batch", max_batch, 1, strict=False, integer=True)
        check_number("eot_samples", eot_samples, 1, strict=False, integer=True)
        self.size = int(size)
        self.eps = self.size  # the threat model's eps is the patch side
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.locations = locations if locations == "all" else int(locations)
        self.screen_steps = int(screen_steps)
        self.loss = loss
        self.loss_fn = get_loss(loss)
        self.max_batch = int(max_batch)
        self.eot_samples = int(eot_samples)

    def __repr__(self):
        where = ("every location" if self.locations == "all" else
                 f"{self.locations} screened + {self.locations} random locations"
                 if self.screen_steps else f"{self.locations} random locations")
        eot = f", eot_samples={self.eot_samples}" if self.eot_samples > 1 else ""
        return (f"PatchPGD(size={self.size}, steps={self.steps}, step_size={self.step_size:g}, "
                f"{where}{eot})")

    def _pgd(self, steps):
        return PGD(eps=self.clip_max - self.clip_min, step_size=self.step_size, steps=steps,
                   norm="linf", random_start=None, loss_fn=self.loss_fn,
                   select="misclassified", clip_min=self.clip_min, clip_max=self.clip_max,
                   seed=self.seed)

    def _attack(self, model, x, labels):
        image_shape = tuple(int(d) for d in x.shape[1:])
        check_patch_size(self.size, image_shape, name="size")
        all_locations = patch_locations(image_shape, self.size)
        num_locations = len(all_locations)
        masks = patch_masks(image_shape, self.size, all_locations)
        batch = tf.shape(x)[0]
        best = (x, tf.fill([batch], -np.inf))
        if self.locations == "all":
            table = tf.tile(tf.range(num_locations)[None], [batch, 1])
            return self.search(model, x, labels, masks, table, self.steps, best, 0)[0]
        k = min(self.locations, num_locations)
        random = tf.random.stateless_uniform([batch, k], self.seed_tensor(1), 0, num_locations,
                                             tf.int32)
        table = random
        if self.screen_steps:
            screen = tf.tile(tf.range(num_locations)[None], [batch, 1])
            best_x, best_score, scores = self.search(model, x, labels, masks, screen,
                                                     self.screen_steps, best, 2)
            best = (best_x, best_score)
            table = tf.concat([tf.math.top_k(scores, k).indices, random], axis=1)
        return self.search(model, x, labels, masks, table, self.steps, best, 3)[0]

    def search(self, model, x, labels, masks, table, steps, best, salt):
        """PGD at the locations ``table`` (B, K) of location indices into ``masks``, starting
        from ``best`` = (best images, best scores) per example, where an example's score is +inf
        once fooled, else its loss. Returns (best images, best scores, (B, K) pair scores; -inf
        for the pairs skipped because their example was already fooled)."""
        pgd = self._pgd(steps)
        labels_int = tf.cast(labels, tf.int32) if labels.dtype.is_integer else None
        batch, width = tf.shape(table)[0], tf.shape(table)[1]
        scores = tf.fill([batch, width], -np.inf)
        forward = _patch_losses_and_logits(model, self.eot_samples, False)

        def active_examples(best_score):
            return tf.where(best_score < np.inf)[:, 0]

        def cond(column, best_x, best_score, scores):
            del best_x, scores
            return (column < width) & tf.reduce_any(best_score < np.inf)

        def body(column, best_x, best_score, scores):
            active = tf.cast(active_examples(best_score), tf.int32)
            count = tf.shape(active)[0]
            columns = tf.minimum(tf.maximum(self.max_batch // count, 1), width - column)
            example = tf.reshape(tf.tile(active[:, None], [1, columns]), [-1])
            col = tf.reshape(tf.tile(tf.range(column, column + columns)[None], [count, 1]), [-1])
            pair = tf.stack([example, col], axis=1)
            mask = tf.gather(masks, tf.gather_nd(table, pair))
            clean = tf.gather(x, example)
            targets = tf.gather(labels, example)

            def patched_model(p, training=False):
                return forward(apply_patch(clean, p, mask), training=training)

            start = tf.random.stateless_uniform(tf.shape(clean), self.seed_tensor(salt, column),
                                                self.clip_min, self.clip_max)
            state = (start, tf.zeros([tf.shape(clean)[0]], tf.bool),
                     tf.fill([tf.shape(clean)[0]], -np.inf))
            targets_int = None if labels_int is None else tf.gather(labels_int, example)

            def update(state, point, logits, losses):
                point_best, fooled_best, loss_best = state
                fooled = tf.zeros_like(fooled_best)
                if targets_int is not None:
                    fooled = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32),
                                          targets_int)
                better = (fooled & ~fooled_best) | (~fooled_best & ~fooled
                                                    & (losses > loss_best))
                return (tf.where(better[:, None, None, None], point, point_best),
                        fooled_best | fooled, tf.where(better, losses, loss_best))

            last, state = pgd._loop(patched_model, clean, targets, start, state, update)  # noqa: SLF001
            logits = patched_model(last)
            point, fooled, loss = update(state, last, logits,
                                         tf.cast(self.loss_fn(targets, logits), tf.float32))
            pair_score = tf.where(fooled, np.inf, loss)
            scores = tf.tensor_scatter_nd_update(scores, pair, pair_score)
            top = tf.math.unsorted_segment_max(pair_score, example, batch)
            wins = (pair_score >= tf.gather(top, example)) & (
                pair_score > tf.gather(best_score, example))
            winners = tf.boolean_mask(example, wins)[:, None]
            images = apply_patch(clean, point, mask)
            best_x = tf.tensor_scatter_nd_update(best_x, winners, tf.boolean_mask(images, wins))
            best_score = tf.tensor_scatter_nd_update(best_score, winners,
                                                     tf.boolean_mask(pair_score, wins))
            return column + columns, best_x, best_score, scores

        _, best_x, best_score, scores = tf.while_loop(
            cond, body, (tf.constant(0), best[0], best[1], scores))
        return best_x, best_score, scores


def place_patch(patch, corners, image_shape):
    """(B, H, W, C) canvases holding the (m, m, C) ``patch`` with its top-left corner at
    ``corners`` (B, 2) (row, col), and the matching (B, H, W, 1) masks."""
    size = int(patch.shape[0])
    height, width = int(image_shape[0]), int(image_shape[1])
    corners = tf.convert_to_tensor(corners, tf.int32)
    rows = tf.clip_by_value(tf.range(height)[None] - corners[:, :1], 0, size - 1)  # (B, H)
    cols = tf.clip_by_value(tf.range(width)[None] - corners[:, 1:], 0, size - 1)  # (B, W)
    canvas = tf.gather(patch, rows)  # (B, H, m, C)
    canvas = tf.gather(canvas, cols, axis=2, batch_dims=1)  # (B, H, W, C)
    return canvas, patch_masks(image_shape, size, corners)


@gin.configurable
class UniversalPatch(Attack):
    """Universal adversarial patch (Brown, Mane, Roy, Abadi, Gilmer, "Adversarial Patch", 2017):
    one m x m patch p for every image, trained with expectation over transformation over
    locations,

        max_{p in [0, 1]^(m x m x C)}  E_{(x, y) ~ data, l ~ U(locations)} L(f(A(p, x, l)), y),

    with A(p, x, l) = (1 - M_l) * x + M_l * p placed at location l (`place_patch`), by
    signed-gradient ascent on random minibatches of ``batch_size`` images with a random location
    per image (``steps`` steps of size ``step_size``). Untargeted (the paper trains a targeted
    "toaster" patch; for robust accuracy the untargeted loss is the relevant one). Brown et al.
    also sample rotation and scale; with a square patch of fixed size only the location is drawn.

    An image is then attacked at EVERY location (the attacker of the patch threat model picks
    the location): it counts as fooled if the patch fools the model at any location, and the
    returned image is the fooling one (or the highest-loss one).

    `fit` trains the patch on a dataset (x, y arrays); an attack that was not fitted trains its
    patch on each batch it is called with (a patch universal over that batch).

    Args:
      size: the patch side m in pixels (integer >= 1, at most the image side).
      steps: ascent steps of the fit (>= 1).
      step_size: alpha of the signed-gradient steps (> 0).
      batch_size: images per step of the fit (>= 1).
      loss: the ascended loss (a `tfadv.attacks.losses` name).
      seed: seed of the initial patch, the minibatches and the locations.
    """

    norm = "patch"
    universal = True

    def __init__(self, size, steps=500, step_size=0.01, batch_size=64, loss="cross_entropy",
                 clip_min=0.0, clip_max=1.0, seed=0):
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        check_number("size", size, 1, strict=False, integer=True)
        check_number("steps", steps, 1, strict=False, integer=True)
        check_number("step_size", step_size, 0.0, strict=True)
        check_number("batch_size", batch_size, 1, strict=False, integer=True)
        self.size = int(size)
        self.eps = self.size
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.batch_size = int(batch_size)
        self.loss = loss
        self.loss_fn = get_loss(loss)
        self.patch = None

    def __repr__(self):
        return (f"UniversalPatch(size={self.size}, steps={self.steps}, "
                f"step_size={self.step_size:g}, fitted={self.patch is not None})")

    def fit(self, model, x, y):
        """Trains the patch on images ``x`` (N, H, W, C) in [clip_min, clip_max] with labels
        ``y``; returns the (m, m, C) patch as a NumPy array (also kept as ``self.patch``)."""
        x = tf.convert_to_tensor(np.asarray(x, np.float32))
        y = tf.convert_to_tensor(np.asarray(y))
        check_image_range(x, self.clip_min, self.clip_max, type(self).__name__)
        check_patch_size(self.size, x.shape[1:], name="size")
        fit = tf.function(lambda x_, y_: self._fit(model, x_, y_), autograph=False)
        self.patch = fit(x, y).numpy()
        self._functions.clear()  # calls traced before now used no fitted patch
        return self.patch

    def _fit(self, model, x, labels):
        image_shape = tuple(int(d) for d in x.shape[1:])
        corners = tf.constant(patch_locations(image_shape, self.size))
        count = tf.shape(x)[0]
        patch = tf.random.stateless_uniform([self.size, self.size, image_shape[2]],
                                            self.seed_tensor(0), self.clip_min, self.clip_max)

        def step(i, patch):
            pick = tf.random.stateless_uniform([self.batch_size], self.seed_tensor(1, i), 0,
                                               count, tf.int32)
            where = tf.random.stateless_uniform([self.batch_size], self.seed_tensor(2, i), 0,
                                                tf.shape(corners)[0], tf.int32)
            clean, targets = tf.gather(x, pick), tf.gather(labels, pick)
            with tf.GradientTape() as tape:
                tape.watch(patch)
                canvas, mask = place_patch(patch, tf.gather(corners, where), image_shape)
                logits = model(apply_patch(clean, canvas, mask), training=False)
                loss = tf.reduce_mean(tf.cast(self.loss_fn(targets, logits), tf.float32))
            grad = tape.gradient(loss, patch, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            patch = tf.clip_by_value(patch + self.step_size * tf.sign(grad), self.clip_min,
                                     self.clip_max)
            return i + 1, patch

        return tf.while_loop(lambda i, _: i < self.steps, step, (tf.constant(0), patch))[1]

    def _attack(self, model, x, labels):
        image_shape = tuple(int(d) for d in x.shape[1:])
        check_patch_size(self.size, image_shape, name="size")
        patch = (self._fit(model, x, labels) if self.patch is None
                 else tf.constant(self.patch, tf.float32))
        corners = patch_locations(image_shape, self.size)
        batch = tf.shape(x)[0]
        labels_int = tf.cast(labels, tf.int32) if labels.dtype.is_integer else None

        def step(i, best_x, best_score):
            canvas, mask = place_patch(patch, tf.tile(tf.gather(corners, i)[None], [batch, 1]),
                                       image_shape)
            images = apply_patch(x, canvas, mask)
            logits = model(images, training=False)
            score = tf.cast(self.loss_fn(labels, logits), tf.float32)
            if labels_int is not None:
                fooled = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels_int)
                score = tf.where(fooled, np.inf, score)
            better = score > best_score
            return (i + 1, tf.where(better[:, None, None, None], images, best_x),
                    tf.where(better, score, best_score))

        return tf.while_loop(lambda i, *_: i < len(corners), step,
                             (tf.constant(0), x, tf.fill([batch], -np.inf)))[1]
