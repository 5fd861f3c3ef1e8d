"""Square Attack: score-based black-box random search, L-inf and L2.

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020 (arXiv:1912.00049). Reference implementations: the authors'
max-andr/square-attack (``attack.py``) and AutoAttack's fra31/auto-attack
(``autoattack/square.py``, ``SquareAttack``), whose "standard" version runs it untargeted with the
margin loss, ``n_queries=5000``, ``p_init=0.8`` and one restart (the defaults here). The attack only
reads the model's logits: it needs no gradient, so gradient masking does not fool it.
"""

import gin
import numpy as np
import tensorflow as tf

from tfadv.attacks.base import Attack, check_number
from tfadv.attacks.losses import cw_margin
from tfadv.attacks.pgd import norm_name, parse_norm, project

# Rescaled iterations (out of 10,000) after which the fraction p of changed pixels is halved.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init, iteration, n_queries):
    """The fraction p of pixels changed at 0-based ``iteration`` of a ``n_queries`` search.

    The iteration is rescaled to a 10,000-query run, ``it = int(iteration / n_queries * 10000)``,
    and p starts at ``p_init`` and is halved each time ``it`` passes one of 10, 50, 200, 500,
    1000, 2000, 4000, 6000, 8000 (strictly: ``it = 10`` still uses ``p_init``), down to
    ``p_init / 512``. ``iteration`` may be a Python number (returns a float) or a tensor (returns
    a float64 tensor, computed in the same float64 arithmetic, hence with the same boundaries).
    """
    check_number("p_init", p_init, 0.0, strict=True, high=1.0)
    check_number("n_queries", n_queries, 1, strict=False, integer=True)
    if isinstance(iteration, (tf.Tensor, tf.Variable)):
        scaled = tf.cast(iteration, tf.float64) / float(n_queries) * 10000.0
        scaled = tf.cast(tf.floor(scaled), tf.int64)
        halvings = tf.reduce_sum(tf.cast(scaled > tf.constant(_HALVINGS, tf.int64), tf.float64))
        return float(p_init) / tf.pow(tf.constant(2.0, tf.float64), halvings)
    check_number("iteration", iteration, 0, strict=False, integer=True)
    scaled = int(iteration / n_queries * 10000)
    return p_init / 2 ** sum(scaled > bound for bound in _HALVINGS)


def _window_side(p, height, width, channels):
    """``round(sqrt(p * n_features / c))`` as an int32 scalar, in the reference's float64
    arithmetic and order, rounding half to even like Python's ``round``."""
    side = tf.round(tf.sqrt(p * float(height * width * channels) / float(channels)))
    return tf.cast(side, tf.int32)


def _uniform_int(shape, seed, high):
    """Integers uniform in ``{0, ..., high - 1}`` (``high`` an int32 scalar >= 1)."""
    return tf.random.stateless_uniform(shape, seed, minval=0, maxval=high, dtype=tf.int32)


def _random_signs(shape, seed):
    return tf.cast(2 * _uniform_int(shape, seed, 2) - 1, tf.float32)


@gin.configurable
class Square(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020): random search over square updates.

    The attack maximises the margin ``L(x') = max_{j != y} z_j(x') - z_y(x')`` of the logits z
    (`tfadv.attacks.losses.cw_margin` without clipping; the reference minimises its negative)
    by random search: each iteration proposes one candidate that differs from the current best
    point ``x_best`` inside a randomly placed square window of side s (the same in all channels),
    queries the model once, and keeps the candidate iff its margin is strictly larger. An
    example stops as soon as its margin is positive (misclassified). The window side follows
    `p_selection`: s is chosen so that the window covers a fraction p of the h * w pixels,
    ``s = round(sqrt(p * h * w))``, and p is halved at fixed fractions of the query budget.

    L-inf (paper, Algorithm 2; ``attack.py:square_attack_linf``):
      * initialisation: vertical stripes, ``x + eps * r`` with one random sign r per (column,
        channel), constant along the image height, clipped to the box;
      * update: ``s = clip(round(sqrt(p h w)), 1, min(h, w) - 1)``; the window is set to
        ``clip(x + eps * sigma)`` with one random sign sigma per channel. So every coordinate of
        the perturbation is always +eps or -eps, or clipped at the box. A proposal that would not
        change ``x_best`` (the window already holds those signs) is redrawn among the other sign
        vectors, as the authors' code does, so that no query is wasted on a repeated point.

    L2 (paper, Algorithm 3; ``attack.py:square_attack_l2``):
      * the building block is ``eta(s)``, an s x s pattern of two "pseudo-Gaussian" bumps of
        opposite sign, one in the top rows ``[0, s // 2)`` and one in the rest; a bump on an
        a x b rectangle with centre ``(a // 2, b // 2)`` has value
        ``sum_{k = m}^{K - 1} 1 / (k + 1)^2`` at distance ``m = max(|i - a // 2|, |j - b // 2|)``
        (Chebyshev) from the centre, ``K = max(a // 2, b // 2) + 1``; each bump is scaled to
        unit L2 norm, then the whole pattern, and with probability 1/2 it is transposed;
      * initialisation: a grid of tiles of side ``max(h // 5, 1)`` starting at
        ``(h - 5 * side) // 2``, each tile ``eta(side)`` times a random sign per channel; the sum
        is rescaled to L2 norm eps, added to x and clipped to the box;
      * update: ``s = max(round(sqrt(p h w)), 3)``, made odd, at most ``min(h, w)``. Two windows
        W1, W2 of side s are drawn. With ``delta = x_best - x``, in every channel the new
        content of W1 is ``eta(s) * sign + delta_W1 / ||delta_W1||`` rescaled to the norm
        ``sqrt(max(eps^2 - ||delta||^2, 0) / c + ||delta_{W1 u W2}||^2)``, i.e. W1 receives the
        mass of both windows plus an equal share of the unused budget, and W2 outside W1 is
        zeroed; then the whole perturbation is rescaled to norm eps and clipped to the box.

    Both: projections onto the eps-ball and the box use `tfadv.attacks.pgd.project`, and the
    p schedule halves at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 out of 10,000 queries.

    Queries and restarts. ``n_queries`` is a hard per-example budget counting every model
    evaluation: query 1 is the clean input (an example that is already misclassified stops
    there and is returned unchanged); each restart then spends 1 query on its initialisation and
    up to ``(n_queries - 1 - restarts) // restarts`` on iterations. Restarts start afresh from a
    new initialisation, only for the examples not fooled yet, and the p schedule is rescaled to
    ``n_queries // restarts``. `attack_with_queries` returns the queries used per example.

    Returned point: for a fooled example, the first misclassified point found; otherwise the
    point of highest margin over all restarts (never the clean input, which the search does not
    return).

    Where we differ from the references (the code is followed where it differs from the paper):
      * Budget: the references count the initialisation as query 1, do not count AutoAttack's
        clean-accuracy query, and run ``n_queries`` (AutoAttack) or ``n_queries - 1``
        (``attack.py``) iterations after it; here the clean query counts and the total never
        exceeds ``n_queries``: 2 fewer iterations than AutoAttack for one restart.
      * Window positions follow the code: uniform in ``{0, ..., h - s - 1}`` (``randint(0,
        h - s)``, exclusive), so a square never touches the last row or column (the paper draws
        up to h - s). For L-inf the side is capped at ``h - 1`` as in ``attack.py`` (AutoAttack
        does not cap it); the L2 cap at ``min(h, w)`` and the cropping of init tiles that do not
        fit (e.g. h = 8) are ours, for images too small for the reference, which assumes
        square images of side >= 28.
      * Randomness is per example: window positions, signs and the transposition of eta are
        drawn independently for every example (the paper and ``attack.py`` per example for
        L-inf; AutoAttack shares one window and sign per iteration across the batch, and both
        codes share the eta transposition).
      * The L-inf redraw of no-op proposals is ``attack.py``'s (AutoAttack has none); we draw
        the replacement uniformly from the other sign vectors in one step (exact for <= 30
        channels; with more, all signs are flipped).
      * L2 with c > 1 channels: W1's per-channel norm uses the per-channel mass of W1 u W2
        (``attack.py``); AutoAttack uses the mass over all channels. Identical for c = 1.
      * Success is a strictly positive margin (the references stop at margin >= 0, a tie).
      * ``p_selection`` beyond the budget keeps ``p_init / 512`` (AutoAttack; ``attack.py``
        returns to ``p_init`` past 10,000, unreachable within a run).

    Args:
      eps: radius of the threat model (``>= 0``), in pixel units.
      norm: ``'linf'`` or ``'l2'``.
      n_queries: per-example query budget, an integer ``>= restarts + 1`` (AutoAttack: 5000).
      p_init: initial fraction of pixels changed per iteration, in (0, 1] (AutoAttack: 0.8).
      restarts: number of runs from new random initialisations (integer >= 1).
      clip_min, clip_max: the valid image box.
      seed: integer seed of the random search (``None``: fresh randomness on every call).
    """

    black_box = True  # uses logits only: the evaluation's black-box vs white-box check

    def __init__(self, eps, norm="linf", n_queries=5000, p_init=0.8, restarts=1, clip_min=0.0,
                 clip_max=1.0, seed=0):
        super().__init__(clip_min=clip_min, clip_max=clip_max, seed=seed)
        check_number("eps", eps, 0.0, strict=False)
        self.norm = parse_norm(norm)
        check_number("restarts", restarts, 1, strict=False, integer=True)
        check_number("n_queries", n_queries, restarts + 1, strict=False, integer=True)
        check_number("p_init", p_init, 0.0, strict=True, high=1.0)
        self.eps = float(eps)
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.restarts = int(restarts)

    def __repr__(self):
        norm = norm_name(self.norm)
        extra = f", restarts={self.restarts}" if self.restarts > 1 else ""
        return (f"Square(eps={self.eps:g}, norm={norm}, n_queries={self.n_queries}, "
                f"p_init={self.p_init:g}{extra})")

    @property
    def iterations_per_restart(self):
        """Square updates per restart after its initialisation query."""
        return (self.n_queries - 1 - self.restarts) // self.restarts

    # --- public entry points ------------------------------------------------------------------
    def attack_with_queries(self, model, x, labels):
        """Like ``attack(model, x, labels)`` but returns ``(x_adv, queries_per_example)``.

        ``queries_per_example`` (int32, shape ``(batch,)``) counts the model evaluations spent
        on each example, the clean query included; it never exceeds ``n_queries``. Compiled
        once per model and input signature, like the plain call."""
        return self.compiled(self._traced_with_queries, model, x, labels)

    @tf.autograph.experimental.do_not_convert
    def _traced_with_queries(self, model, x, labels):
        self.trace_count += 1
        x_adv, queries = self._search(model, tf.cast(x, tf.float32), labels)
        return tf.stop_gradient(x_adv), queries

    # The search builds its graph with explicit tf.while_loop / tf.cond: converting it with
    # autograph (the base class's tf.function does by default) only costs tracing time.
    @tf.autograph.experimental.do_not_convert
    def _attack(self, model, x, labels):
        return self._search(model, x, labels)[0]

    # --- the search -----------------------------------------------------------------------------
    def _margin(self, model, x, labels):
        logits = model(x, training=False)
        return cw_margin(labels, logits, confidence=np.inf)

    def _search(self, model, x, labels):
        geometry = self._geometry(x)

        clean_margin = self._margin(model, x, labels)  # query 1 of every example
        fooled = clean_margin > 0.0
        best_x = x
        best_margin = tf.where(fooled, clean_margin, -np.inf)
        queries = tf.ones_like(clean_margin, tf.int32)
        iterations = self.iterations_per_restart
        schedule_length = self.n_queries // self.restarts

        def query_active(active, propose, run_x, run_margin, queries, accept_all):
            """Proposes points for the active examples, queries them once, keeps improvements."""
            def run():
                idx = tf.where(active)[:, 0]
                x_act = tf.gather(x, idx)
                candidate = propose(x_act, tf.gather(run_x, idx))
                margin = self._margin(model, candidate, tf.gather(labels, idx))
                old = tf.gather(run_margin, idx)
                keep = tf.fill(tf.shape(margin), True) if accept_all else margin > old
                new_x = tf.where(tf.reshape(keep, [-1, 1, 1, 1]), candidate,
                                 tf.gather(run_x, idx))
                new_margin = tf.where(keep, margin, old)
                where = idx[:, None]
                return (tf.tensor_scatter_nd_update(run_x, where, new_x),
                        tf.tensor_scatter_nd_update(run_margin, where, new_margin),
                        tf.tensor_scatter_nd_add(queries, where, tf.ones_like(idx, tf.int32)))

            return tf.cond(tf.reduce_any(active), run, lambda: (run_x, run_margin, queries))

        for restart in range(self.restarts):
            started = ~fooled
            run_x, run_margin, queries = query_active(
                started, lambda x_act, _: self._initial_point(x_act, restart, geometry),
                x, tf.fill(tf.shape(clean_margin), -np.inf), queries, accept_all=True)

            def still_active(run_margin):
                return started & ~(run_margin > 0.0)

            def body(i, run_x, run_margin, queries):
                p = p_selection(self.p_init, i, schedule_length)

                def propose(x_act, x_best):
                    return self._proposal(x_act, x_best, p, restart, i, geometry)

                run_x, run_margin, queries = query_active(
                    still_active(run_margin), propose, run_x, run_margin, queries,
                    accept_all=False)
                return i + 1, run_x, run_margin, queries

            _, run_x, run_margin, queries = tf.while_loop(
                lambda i, _, run_margin, __: (i < iterations) & tf.reduce_any(
                    still_active(run_margin)),
                body, (tf.constant(0), run_x, run_margin, queries))

            improved = started & (run_margin > best_margin)
            best_x = tf.where(tf.reshape(improved, [-1, 1, 1, 1]), run_x, best_x)
            best_margin = tf.where(improved, run_margin, best_margin)
            fooled = fooled | (started & (run_margin > 0.0))
        return best_x, queries

    # --- initialisations and proposals --------------------------------------------------------
    @staticmethod
    def _geometry(x):
        """Static (height, width, channels) and broadcastable row / column index tensors."""
        if x.shape.rank != 4 or None in x.shape[1:]:
            raise ValueError(f"Square needs NHWC images of a known size; got shape {x.shape}.")
        height, width, channels = (int(d) for d in x.shape[1:])
        rows = tf.reshape(tf.range(height), [1, height, 1])
        cols = tf.reshape(tf.range(width), [1, 1, width])
        return height, width, channels, rows, cols

    def _initial_point(self, x, restart, geometry):
        height, width, channels, rows, cols = geometry
        n = tf.shape(x)[0]
        if self.norm == np.inf:
            stripes = _random_signs(tf.stack([n, 1, width, channels]),
                                    self.seed_tensor(restart, -1, 0))
            return self._linf_target(x, stripes)
        side = max(height // 5, 1)
        start = (height - 5 * side) // 2
        tiles_h, tiles_w = height // side, width // side
        # Tile index and position inside the tile of every row / column (tiles may be cropped).
        tile_r, tile_c = (rows - start) // side, (cols - start) // side
        in_tiles = ((rows >= start) & (tile_r < tiles_h)) & ((cols >= start) & (tile_c < tiles_w))
        tile_r = tf.clip_by_value(tile_r, 0, tiles_h - 1)
        tile_c = tf.clip_by_value(tile_c, 0, tiles_w - 1)
        i, j = rows - start - tile_r * side, cols - start - tile_c * side
        tile = tile_r * tiles_w + tile_c  # [1, h, w]
        flips = _uniform_int(tf.stack([n, tiles_h * tiles_w]), self.seed_tensor(restart, -1, 1),
                             2)
        signs = _random_signs(tf.stack([n, tiles_h * tiles_w, channels]),
                              self.seed_tensor(restart, -1, 2))
        tile = tf.broadcast_to(tile, [n, height, width])
        transposed = tf.gather(flips, tile, batch_dims=1) > 0
        bumps = _eta(side, tf.where(transposed, j, i), tf.where(transposed, i, j),
                     max(height, width))
        bumps = tf.where(in_tiles, bumps, 0.0)[..., None] * tf.gather(signs, tile, batch_dims=1)
        return self._l2_point(x, bumps)

    def _proposal(self, x, x_best, p, restart, i, geometry):
        height, width, channels, rows, cols = geometry
        n = tf.shape(x)[0]
        side = _window_side(p, height, width, channels)
        short = min(height, width)

        def window(salt):  # uses salts `salt` and `salt + 1`; reads `side` when called
            top = _uniform_int(tf.stack([n]), self.seed_tensor(restart, i, salt),
                               tf.maximum(height - side, 1))
            left = _uniform_int(tf.stack([n]), self.seed_tensor(restart, i, salt + 1),
                                tf.maximum(width - side, 1))
            i_loc = rows - tf.reshape(top, [-1, 1, 1])
            j_loc = cols - tf.reshape(left, [-1, 1, 1])
            inside = (i_loc >= 0) & (i_loc < side) & (j_loc >= 0) & (j_loc < side)
            return i_loc, j_loc, inside

        if self.norm == np.inf:
            side = tf.clip_by_value(side, 1, max(short - 1, 1))
            _, _, inside = window(0)
            mask = inside[..., None]
            sigma = _random_signs(tf.stack([n, 1, 1, channels]), self.seed_tensor(restart, i, 2))
            candidate = tf.where(mask, self._linf_target(x, sigma), x_best)
            no_op = tf.reduce_all(tf.equal(candidate, x_best), axis=[1, 2, 3])
            if channels <= 30:  # flip a uniformly drawn non-empty subset of the channels
                subset = tf.random.stateless_uniform(
                    tf.stack([n]), self.seed_tensor(restart, i, 3), minval=1,
                    maxval=2 ** channels, dtype=tf.int64)
                bits = tf.bitwise.right_shift(subset[:, None], tf.range(channels, dtype=tf.int64))
                flip = tf.cast(tf.bitwise.bitwise_and(bits, 1), tf.float32)
                flip = tf.reshape(1.0 - 2.0 * flip, [-1, 1, 1, channels])
            else:
                flip = -tf.ones([1, 1, 1, channels])
            sigma = tf.where(tf.reshape(no_op, [-1, 1, 1, 1]), sigma * flip, sigma)
            return tf.where(mask, self._linf_target(x, sigma), x_best)

        side = tf.maximum(side, 3)
        side = tf.minimum(side + 1 - side % 2, short)  # odd, as the reference, if it fits
        i1, j1, in1 = window(0)
        _, _, in2 = window(4)
        transposed = _uniform_int(tf.stack([n, 1, 1]), self.seed_tensor(restart, i, 6), 2) > 0
        pattern = _eta(side, tf.where(transposed, j1, i1), tf.where(transposed, i1, j1),
                       max(height, width))
        signs = _random_signs(tf.stack([n, 1, 1, channels]), self.seed_tensor(restart, i, 7))
        in1, in2 = in1[..., None], in2[..., None]
        delta = x_best - x

        def norm(t, axis):
            return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axis, keepdims=True))

        delta_w1 = tf.where(in1, delta, 0.0)
        old = delta_w1 / (1e-12 + norm(delta_w1, [1, 2]))
        new = tf.where(in1, pattern[..., None] * signs + old, 0.0)
        budget = tf.maximum(self.eps ** 2 - tf.square(norm(delta, [1, 2, 3])), 0.0) / channels
        union = norm(tf.where(in1 | in2, delta, 0.0), [1, 2])
        new = new / (1e-12 + norm(new, [1, 2])) * tf.sqrt(budget + tf.square(union))
        delta = tf.where(in1, new, tf.where(in2, 0.0, delta))
        return self._l2_point(x, delta)

    def _linf_target(self, x, signs):
        """``clip(x + eps * signs)``: every coordinate +-eps or at the box (exactly)."""
        return project(x + 2.0 * self.eps * signs, x, self.eps, self.norm, self.clip_min,
                       self.clip_max)

    def _l2_point(self, x, delta):
        """``delta`` rescaled to L2 norm eps, added to x, projected into the ball and the box."""
        size = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
        return project(x + self.eps * delta / (size + 1e-12), x, self.eps, self.norm,
                       self.clip_min, self.clip_max)


def _eta(side, i, j, max_side):
    """The L2 pattern ``eta(side)`` evaluated at local coordinates ``(i, j)`` (0 outside).

    ``side`` is an int scalar (tensor or Python int), ``i``/``j`` int32 tensors of one shape.
    Top rows ``[0, side // 2)`` hold a positive bump, the other rows a negative one; each bump
    has unit L2 norm, then the pattern is scaled to unit norm (see `Square`)."""
    side = tf.convert_to_tensor(side, tf.int32)
    # inverse_squares[n] = sum_{t=1}^{n} 1 / t^2, n = 0 .. max_side + 1.
    steps = tf.range(1, max_side + 2, dtype=tf.float32)
    inverse_squares = tf.concat([[0.0], tf.cumsum(1.0 / tf.square(steps))], axis=0)
    last = max_side + 1

    def bump(i, j):
        half = side // 2
        top = i < half
        rows_in_half = tf.where(top, half, side - half)
        r = tf.where(top, i, i - half)
        dist = tf.maximum(tf.abs(r - rows_in_half // 2), tf.abs(j - side // 2))
        count = tf.maximum(rows_in_half // 2, side // 2) + 1
        value = (tf.gather(inverse_squares, tf.clip_by_value(count, 0, last))
                 - tf.gather(inverse_squares, tf.clip_by_value(dist, 0, last)))
        inside = (i >= 0) & (i < side) & (j >= 0) & (j < side)
        value = tf.where(inside, value, 0.0)
        return value, top & inside, ~top & inside

    # Norms of the two bumps, from the pattern on a canonical grid (they do not depend on where
    # the window is placed or on a transposition).
    grid = tf.range(max_side)
    gi, gj = tf.meshgrid(grid, grid, indexing="ij")
    value, top, bottom = bump(gi, gj)
    top_norm = tf.sqrt(tf.reduce_sum(tf.where(top, tf.square(value), 0.0)))
    bottom_norm = tf.sqrt(tf.reduce_sum(tf.where(bottom, tf.square(value), 0.0)))
    halves = tf.cast(top_norm > 0, tf.float32) + tf.cast(bottom_norm > 0, tf.float32)

    value, top, bottom = bump(i, j)
    value = tf.where(top, tf.math.divide_no_nan(value, top_norm),
                     tf.where(bottom, -tf.math.divide_no_nan(value, bottom_norm), 0.0))
    return value / tf.sqrt(tf.maximum(halves, 1.0))
