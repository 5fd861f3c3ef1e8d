"""Entropic optimal transport between two batches of vectors: the log-domain Sinkhorn algorithm.

Used by Feature Scattering (`tfadv.defenses.feature_scatter`; Zhang & Wang, NeurIPS 2019, official
code Haichao-Zhang/FeatureScatter ``ot.py``), whose attack ascends the transport cost between the
logits of a clean batch and those of its perturbed copy.

Problem. For a cost matrix C (m x n) and uniform marginals mu = 1/m (rows), nu = 1/n (columns),
the entropic optimal transport plan with regularisation eps (``reg``) is

    T* = argmin_{T >= 0, T 1 = mu, T^T 1 = nu}  <T, C> - eps * H(T),   H(T) = -sum_ij T_ij log T_ij

and has the form T_ij = exp((-C_ij + u_i + v_j) / eps) for dual potentials u (m,) and v (n,).
Sinkhorn's algorithm in the log domain alternates, from u = v = 0,

    u <- u + eps * (log mu - LSE_j(M(u, v)))      M_ij(u, v) = (-C_ij + u_i + v_j) / eps
    v <- v + eps * (log nu - LSE_i(M(u, v)))      (with the new u)

and stops after ``max_iter`` rounds or as soon as a round changed u by sum_i |u_i - u_prev_i| <
``tol`` (the check comes after the v update, so the column marginals are then exact up to the
offset below, and the row marginals are off by about that last change). Every step is a
differentiable TensorFlow op inside a `tf.while_loop`: gradients flow through the unrolled
iterations (the stopping decision itself is not differentiated), as in the official code, which
detaches nothing.

Official code details kept here (``ot.py: sinkhorn``): eps = 0.01, at most 100 rounds, tol = 0.1;
LSE(a) = log(sum exp(a) + 1e-6), the 1e-6 keeping the log finite when a whole row underflows. We
compute that same quantity stably, as a log-sum-exp over the row with one more term log(1e-6)
appended (`LSE_OFFSET`), so the values agree wherever the official float32 sum does not underflow.
The cost is C_ij = max(0, 1 - cos(x_i, y_j)) (``cost_matrix_cos``, cosine similarity with
PyTorch's eps 1e-6: each vector is divided by max(||.||, 1e-6)).
"""

import math

import tensorflow as tf

from tfadv.checks import check_number

LSE_OFFSET = 1e-6  # the official LSE adds 1e-6 inside the log ("to prevent NaN")


def _check(reg, max_iter, tol):
    check_number("reg", reg, 0.0, strict=True)
    check_number("max_iter", max_iter, 1, strict=False, integer=True)
    check_number("tol", tol, 0.0, strict=False)


def cosine_cost(x, y):
    """C_ij = max(0, 1 - cos(x_i, y_j)) for x (m, d) and y (n, d): an (m, n) matrix in [0, 2].

    A vector's norm is floored at 1e-6 (PyTorch's ``CosineSimilarity(eps=1e-6)``), so zero
    vectors give cos = 0 and finite gradients."""
    x = tf.convert_to_tensor(x)
    y = tf.cast(tf.convert_to_tensor(y), x.dtype)
    # l2_normalize floors the squared norm: x / max(||x||, sqrt(1e-12)) = x / max(||x||, 1e-6).
    x = tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)
    y = tf.math.l2_normalize(y, axis=-1, epsilon=1e-12)
    return tf.maximum(1.0 - tf.matmul(x, y, transpose_b=True), 0.0)


def _lse(a, axis):
    """log(sum_axis exp(a) + LSE_OFFSET), computed without overflow or underflow."""
    top = tf.maximum(tf.reduce_max(a, axis=axis), tf.cast(math.log(LSE_OFFSET), a.dtype))
    top = tf.stop_gradient(top)  # the shift cancels exactly; no gradient through the max
    total = tf.reduce_sum(tf.exp(a - tf.expand_dims(top, axis)), axis=axis)
    return top + tf.math.log(total + LSE_OFFSET * tf.exp(-top))


def sinkhorn_potentials(cost, reg=0.01, max_iter=100, tol=0.1):
    """The dual potentials (u, v) and the number of rounds run, for cost (m, n); see the module
    docstring. Differentiable with respect to ``cost``.

    Args:
      cost: (m, n) float tensor C (float32 or float64; the computation keeps its dtype).
      reg: entropic regularisation eps (> 0); official 0.01.
      max_iter: at most this many rounds (integer >= 1); official 100.
      tol: stop once a round changes u by less than this in L1 (>= 0; 0 runs ``max_iter``
        rounds); official 0.1.

    Returns:
      ``(u, v, rounds)``: u of shape (m,), v of shape (n,), rounds an int32 scalar.
    """
    _check(reg, max_iter, tol)
    cost = tf.convert_to_tensor(cost)
    if not cost.dtype.is_floating:
        cost = tf.cast(cost, tf.float32)
    dtype = cost.dtype
    m, n = tf.shape(cost)[0], tf.shape(cost)[1]
    log_mu = -tf.math.log(tf.cast(m, dtype))  # log(1/m), the same for every row
    log_nu = -tf.math.log(tf.cast(n, dtype))

    def modified(u, v):  # M_ij = (-C_ij + u_i + v_j) / eps
        return (-cost + u[:, None] + v[None, :]) / reg

    def round_(i, u, v, change):
        u_prev = u
        u = reg * (log_mu - _lse(modified(u, v), 1)) + u
        v = reg * (log_nu - _lse(modified(u, v), 0)) + v
        return i + 1, u, v, tf.reduce_sum(tf.abs(u - u_prev))

    start = (tf.constant(0), tf.zeros([m], dtype), tf.zeros([n], dtype),
             tf.constant(float("inf"), dtype))
    rounds, u, v, _ = tf.while_loop(
        lambda i, u, v, change: tf.logical_and(i < max_iter, change >= tol), round_, start,
        maximum_iterations=max_iter)
    return u, v, rounds


def sinkhorn(cost, reg=0.01, max_iter=100, tol=0.1):
    """The entropic transport plan T_ij = exp((-C_ij + u_i + v_j) / eps) for ``cost`` (m, n):
    rows sum to about 1/m, columns to 1/n (see `sinkhorn_potentials` for the arguments)."""
    cost = tf.convert_to_tensor(cost)
    u, v, _ = sinkhorn_potentials(cost, reg, max_iter, tol)
    return tf.exp((-tf.cast(cost, u.dtype) + u[:, None] + v[None, :]) / reg)


def sinkhorn_distance(x, y, reg=0.01, max_iter=100, tol=0.1):
    """Feature Scattering's OT loss between batches x (m, d) and y (n, d):

        D(x, y) = sum_ij T_ij C_ij,   C = `cosine_cost` (x, y),   T = `sinkhorn` (C)

    (official ``sinkhorn_loss_joint_IPOT``: x are the clean logits, y the perturbed ones). The
    gradient with respect to both x and y runs through the Sinkhorn iterations."""
    cost = cosine_cost(x, y)
    return tf.reduce_sum(sinkhorn(cost, reg, max_iter, tol) * cost)
