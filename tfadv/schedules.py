"""Learning-rate schedules expressed in epochs, as the papers state them.

The driver knows the number of steps per epoch only once the data is loaded, so a schedule here is
a factory: ``schedule(steps_per_epoch)`` returns a Keras `LearningRateSchedule` evaluated per
iteration (fractional epochs, as in Rice et al.'s code).
"""

import gin
import keras


@gin.configurable
class PiecewiseConstant:
    """Piecewise-constant learning rate: ``values[i]`` until epoch ``boundaries[i]``.

    E.g. Madry CIFAR-10: ``boundaries=[102, 154], values=[0.1, 0.01, 0.001]``.

    Args:
      boundaries: increasing epochs > 0 (fractions allowed) at which the rate changes; each
        becomes ``round(boundary * steps_per_epoch)`` optimizer steps.
      values: the learning rates (> 0), one more than ``boundaries``.

    Calling it with ``steps_per_epoch`` returns a `keras.optimizers.schedules.
    PiecewiseConstantDecay`, or the constant ``values[0]`` when there are no boundaries.
    """

    def __init__(self, boundaries=(), values=(0.1,)):
        boundaries, values = list(boundaries), list(values)
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"values must have len(boundaries) + 1 = {len(boundaries) + 1} "
                             f"entries; got {len(values)}.")
        if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing epochs > 0; got {boundaries}.")
        if any(v <= 0 for v in values):
            raise ValueError(f"values (learning rates) must be > 0; got {values}.")
        self.boundaries, self.values = boundaries, values

    def __call__(self, steps_per_epoch):
        if not self.boundaries:
            return float(self.values[0])
        steps = [int(round(b * steps_per_epoch)) for b in self.boundaries]
        return keras.optimizers.schedules.PiecewiseConstantDecay(steps, self.values)


@gin.configurable
class Cosine:
    """Cosine decay from ``initial`` to ``initial * alpha`` over ``epochs`` epochs
    (`keras.optimizers.schedules.CosineDecay`), per optimizer step t:

        lr(t) = initial * ((1 - alpha) * (1 + cos(pi * min(t, T) / T)) / 2 + alpha),

    T = int(``epochs`` * steps_per_epoch). Args: ``initial`` > 0, ``epochs`` > 0, ``alpha`` the
    final fraction of ``initial`` (0: decay to 0)."""

    def __init__(self, initial=0.1, epochs=1, alpha=0.0):
        if initial <= 0 or epochs <= 0:
            raise ValueError(f"initial and epochs must be > 0; got {initial}, {epochs}.")
        self.initial, self.epochs, self.alpha = initial, epochs, alpha

    def __call__(self, steps_per_epoch):
        return keras.optimizers.schedules.CosineDecay(
            self.initial, int(self.epochs * steps_per_epoch), alpha=self.alpha)


class _TriangularSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak, peak_step, total_steps):
        self.peak, self.peak_step, self.total_steps = peak, peak_step, total_steps

    def __call__(self, step):
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        up = step / max(self.peak_step, 1)
        down = (self.total_steps - step) / max(self.total_steps - self.peak_step, 1)
        return self.peak * tf.clip_by_value(tf.minimum(up, down), 0.0, 1.0)

    def get_config(self):
        return {"peak": self.peak, "peak_step": self.peak_step, "total_steps": self.total_steps}


@gin.configurable
class Triangular:
    """Cyclic (one-cycle, triangular) learning rate of Wong et al. 2020 (``lr_schedule`` in
    locuslab/fast_adversarial): linear from 0 to ``peak`` over the first ``peak_fraction`` of
    ``epochs`` epochs, then linear back to 0 at the end. Per optimizer step t:

        lr(t) = peak * clip(min(t / t_peak, (T - t) / (T - t_peak)), 0, 1),

    T = int(``epochs`` * steps_per_epoch), t_peak = int(``peak_fraction`` * T) (both
    denominators floored at 1). Args: ``peak`` > 0, ``epochs`` > 0, ``peak_fraction`` in
    (0, 1)."""

    def __init__(self, peak=0.2, epochs=15, peak_fraction=0.4):
        if peak <= 0 or epochs <= 0 or not 0 < peak_fraction < 1:
            raise ValueError(f"peak and epochs must be > 0 and peak_fraction in (0, 1); got "
                             f"{peak}, {epochs}, {peak_fraction}.")
        self.peak, self.epochs, self.peak_fraction = peak, epochs, peak_fraction

    def __call__(self, steps_per_epoch):
        total = int(self.epochs * steps_per_epoch)
        return _TriangularSchedule(self.peak, int(self.peak_fraction * total), total)
