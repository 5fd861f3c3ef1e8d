"""Argument checks shared across tfadv: each raises a ValueError naming the parameter, the allowed
range and the value given. A leaf module (imports nothing from tfadv), so any module may use it
without importing a sibling package for one check."""

import math
import numbers

import numpy as np


def check_number(name, value, low, *, strict, integer=False, high=None):
    """Raises ValueError naming ``name`` and the allowed range unless ``value`` is in it.

    Args:
      name: the parameter's name, as the user wrote it (e.g. ``'eps'``, ``'AWP.gamma'``).
      value: the value to check; it must be a real number (an integer with ``integer=True``),
        never a bool.
      low: the lower bound.
      strict: ``value > low`` when True, ``value >= low`` when False.
      integer: require an integer.
      high: optional upper bound, inclusive.
    """
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(
        value, bool)
    too_low = ok_type and (value <= low if strict else value < low)
    too_high = ok_type and high is not None and value > high
    if not ok_type or too_low or too_high:
        kind = "an integer" if integer else "a number"
        bound = f"> {low}" if strict else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise ValueError(f"{name} must be {kind} {bound}; got {value!r}.")


def check_positive_int(name, value):
    """Raises ValueError unless ``value`` is an integer >= 1."""
    check_number(name, value, 1, strict=False, integer=True)


def check_sigma(sigma, name="sigma"):
    """Returns ``float(sigma)``; raises ValueError naming ``name`` unless it is a finite number
    > 0 (a noise standard deviation in [0, 1] pixel units)."""
    if (not isinstance(sigma, (int, float, np.floating, np.integer)) or isinstance(sigma, bool)
            or not math.isfinite(sigma) or not sigma > 0):
        raise ValueError(f"{name} (Gaussian noise standard deviation, [0, 1] pixel units) must be "
                         f"a finite number > 0; got {sigma!r}.")
    return float(sigma)
