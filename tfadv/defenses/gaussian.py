"""Gaussian noise augmentation: the training of randomized smoothing (Cohen et al. 2019).

Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019
(official code: locuslab/smoothing, ``code/train.py``). Randomized smoothing turns a base
classifier f into the smoothed classifier

    g(x) = argmax_c  P( f(x + eps) = c ),    eps ~ N(0, sigma^2 I),

which is certifiably robust in L2 (paper, Theorem 1; see `tfadv.certify.smoothing`). g is only as
good as f is under noise, so f is trained on noisy inputs: the loss of a batch is

    loss = (1/B) sum_i CE( f(x_i + sigma * z_i), y_i ),    z_i ~ N(0, I),

with f = ``base_model``, sigma = ``sigma`` (the same sigma the model is later certified with;
paper: 0.12, 0.25, 0.5, 1.0), CE the cross-entropy. As in the official code
(``inputs + torch.randn_like(inputs) * noise_sd``): the noise is added in [0, 1] pixel space before
the model's own normalisation layer (tfadv models normalise inside the model), it is NOT clipped
to [0, 1], every training input is noisy (no clean term) and a new z is drawn at every step.

Noise seeding (tfadv's): z of training step t on replica r is
``tf.random.stateless_normal(shape, seed=[seed, t * R + r])`` with t the optimizer's iteration
count and R the number of replicas, so a run is reproducible, resumes with the same noise
sequence, and replicas draw independent noise.
"""

import gin
import numpy as np
import tensorflow as tf

from tfadv.checks import check_sigma  # noqa: F401  (re-exported)
from tfadv.defenses.base import Defense, num_replicas, replica_mean


def check_noise_seed(seed):
    """An integer seed >= 0 for `add_training_noise`; ``None`` draws one from NumPy's global
    generator (which `tfadv.train` seeds with ``train.seed``)."""
    if seed is None:
        return int(np.random.randint(0, 2**31 - 1))
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be None or an integer >= 0; got {seed!r}.")
    return int(seed)


def add_training_noise(x, sigma, seed, optimizer):
    """x + sigma * z, z ~ N(0, I), for the current training step: z is drawn statelessly with the
    seed ``[seed, t * R + r]`` (t = ``optimizer.iterations``, R replicas, r this replica), so a run
    is reproducible, resumes with the same noise, and replicas draw independent noise. In [0, 1]
    pixel space and not clipped. The one training-noise draw of tfadv (Gaussian augmentation and
    stability training)."""
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    step = tf.cast(optimizer.iterations, tf.int64)
    salt = step * num_replicas() + tf.cast(replica, tf.int64)
    x = tf.cast(x, tf.float32)
    noise = tf.random.stateless_normal(tf.shape(x), seed=tf.stack([tf.constant(seed, tf.int64),
                                                                  salt]))
    return x + sigma * noise


@gin.configurable(denylist=["base_model"])
class GaussianAugmentation(Defense):
    """Training under Gaussian noise (Cohen et al. 2019), the base classifier of randomized
    smoothing. It minimises

        E_{z ~ N(0, I)}[ CE(f(x + sigma * z), y) ]

    with f = ``base_model`` and sigma = ``sigma``, so that the smoothed classifier
    g(x) = argmax_c P(f(x + sigma * z) = c) is accurate (`tfadv.certify.smoothing` certifies it).

    Example (runs as is)::

        import keras, numpy as np, tfadv.models, tfadv.defenses
        base = tfadv.models.digits_cnn(input_shape=(8, 8, 1), num_classes=10)
        model = tfadv.defenses.GaussianAugmentation(base, sigma=0.25)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.rand(64, 8, 8, 1).astype("float32"); y = np.arange(64) % 10
        model.fit(x, y, batch_size=32, epochs=1)
        model.save("smooth.keras")   # the base classifier f; certify with bin/certify

    Args:
      base_model: the base classifier f, from images in [0, 1] to logits.
      sigma: standard deviation of the noise, [0, 1] pixel units, a finite number > 0 (paper:
        0.12, 0.25, 0.5 or 1.0 on CIFAR-10). Certify with the same sigma.
      eval_attack: attack behind ``robust_accuracy`` in validation (default: none; the relevant
        guarantee comes from `tfadv.certify.smoothing`, not from an attack).
      seed: seed of the training noise (see the module docstring); ``None`` draws one from
        NumPy's global generator (which `tfadv.train` seeds with ``train.seed``).
      **kwargs: passed to `Defense` (e.g. ``margin``).

    Logged metrics: ``adv_accuracy`` is the training accuracy on the noisy inputs the loss sees;
    validation ``accuracy`` is the base classifier's accuracy on clean inputs.
    """

    supports_awp = False  # AWP perturbs the weights against an adversarial objective

    def __init__(self, base_model, sigma=0.25, eval_attack=None, seed=None, **kwargs):
        sigma = check_sigma(sigma)
        seed = check_noise_seed(seed)
        super().__init__(base_model, attack=None, eval_attack=eval_attack, **kwargs)
        self.sigma = sigma
        self.seed = seed

    def prepare(self, x, y):
        """x + sigma * z, z ~ N(0, I): in [0, 1] pixel space, not clipped (official code)."""
        return add_training_noise(x, self.sigma, self.seed, self.optimizer)

    def objective(self, state, x, y, sample_weight, x_noisy):
        logits = state(x_noisy, training=True)
        return replica_mean(self.classification_loss(y, logits), sample_weight), {
            "adv": logits}
