"""The one distribution-strategy factory (after tensorflow/models' `official/common`)."""

import gin
import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "one_device", "mirrored")


def _local_accelerators():
    return [d.name for d in tf.config.list_logical_devices("GPU")]


@gin.configurable
def get_strategy(name="mirrored", devices=None):
    """Returns a `tf.distribute.Strategy`.

    Args:
      name: ``'mirrored'``: `MirroredStrategy` over ``devices`` (default: all local GPUs);
        ``'one_device'``: ``devices[0]`` (default the first GPU, else CPU:0); ``'default'``: no
        distribution.
      devices: optional list of device names, e.g. ``['GPU:0', 'GPU:1']``.

    ``'mirrored'`` over a single device returns the default strategy instead: one replica is the
    same computation, and Keras' `fit` under a one-replica `MirroredStrategy` or
    `OneDeviceStrategy` measured 2-2.8x slower per PGD-AT step on CPU (see BUILD.md,
    "Distribution"). Name the devices explicitly to force a strategy.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy name must be one of {STRATEGIES}; got {name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = _local_accelerators()
        device = (devices or [gpus[0] if gpus else "/cpu:0"])[0]
        return tf.distribute.OneDeviceStrategy(device)
    resolved = list(devices) if devices else _local_accelerators()
    if len(resolved) <= 1 and not devices:
        logging.info("mirrored strategy over %s device(s): using the default strategy",
                     max(1, len(resolved)))
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(resolved)
