"""TensorBoard summaries beyond Keras' scalars: adversarial examples, logit margins, robustness.

`AdversarialSummaries` is the Keras callback `tfadv.train` adds to every run (gin:
``AdversarialSummaries.every_n_epochs``; 0 turns the per-epoch summaries off). It writes to
``model_dir/tensorboard/adversarial/``:

- every ``every_n_epochs`` epochs (step = the 0-based epoch, as Keras' ``epoch_*`` scalars), on a
  fixed batch of validation images (the test split when there is no validation split), attacked
  with the defense's ``eval_attack``:

  - images ``adversarial/clean``, ``adversarial/perturbation`` and ``adversarial/adversarial``:
    one grid image each of the first ``num_images`` examples, ``columns`` per row, in the same
    cell order. The perturbation delta = x_adv - x is shown as ``0.5 + delta / (2 eps)`` (eps the
    attack's radius), so mid-grey is no change and black / white are -eps / +eps;
  - histograms ``margin/clean`` and ``margin/adversarial`` of the per-example logit margin
    ``z_y - max_{j != y} z_j`` over ``num_examples`` examples (positive = correctly classified);

- once, after the final evaluation (`write_robustness_curve`, called by `tfadv.train`): the
  robustness curve of `tfadv.evaluation.evaluate` (``result['robustness_curve']``) as scalars
  ``robustness_curve/accuracy`` with step ``round(1000 * eps)`` (TensorBoard's x axis is an
  integer step: read it as eps in thousandths), and the ``robustness_curve.png`` plot as the image
  ``robustness_curve/plot`` when the evaluation wrote one. An evaluation without the curve
  (``evaluate.sanity = False``, or no attack with an ``eps``) writes nothing here.

The gin configuration is written as text by `tfadv.train` itself (``tensorboard/config``).
"""

import math
import os

import gin
import keras
import numpy as np
import tensorflow as tf

from tfadv.checkpoint import RunCallback

SUBDIR = "adversarial"


def logit_margin(logits, labels):
    """``z_y - max_{j != y} z_j`` per example (float32 numpy): > 0 exactly when correct."""
    logits = np.asarray(tf.cast(logits, tf.float32))
    labels = np.asarray(labels).astype(np.int64)
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return (true - others.max(axis=-1)).astype(np.float32)


def image_grid(images, columns):
    """Tiles ``images`` (n, H, W, C) into one image (1, rows * H, columns' * W, C), row-major;
    empty cells of the last row are black. ``columns'`` is ``min(columns, n)``."""
    images = np.asarray(images, dtype=np.float32)
    n, height, width, channels = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * height, columns * width, channels), np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return grid[None]


def perturbation_image(delta, eps):
    """``0.5 + delta / (2 eps)``: delta in [-eps, eps] shown in [0, 1] (grey = unchanged)."""
    return 0.5 + np.asarray(delta, np.float32) / (2.0 * eps)


def _displayable(images):
    """TensorBoard shows 1, 3 or 4 channels; other channel counts are averaged to grey."""
    return images if images.shape[-1] in (1, 3, 4) else images.mean(axis=-1, keepdims=True)


@gin.configurable
class AdversarialSummaries(RunCallback):
    """Adversarial example grids, margin histograms and the robustness curve in TensorBoard
    (see the module docstring for what is written where).

    Args:
      every_n_epochs: write the image grids and margin histograms after every this many epochs
        (epochs N, 2N, ...); 0 writes none (the robustness curve is still written).
      num_images: examples in each image grid (integer >= 1).
      num_examples: examples in the margin histograms (integer >= ``num_images``; fewer if the
        split is smaller).
      columns: grid columns (integer >= 1).
      attack: the attack to show; ``None`` (default) uses the trained defense's ``eval_attack``
        (else its ``attack``). Without any attack only the clean grid and margins are written.
    """

    def __init__(self, every_n_epochs=10, num_images=8, num_examples=256, columns=8,
                 attack=None):
        super().__init__()
        for name, value, low in (("every_n_epochs", every_n_epochs, 0),
                                 ("num_images", num_images, 1),
                                 ("num_examples", num_examples, 1), ("columns", columns, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AdversarialSummaries.{name} must be an integer >= {low}; "
                                 f"got {value!r}.")
        if num_examples < num_images:
            raise ValueError(f"AdversarialSummaries.num_examples ({num_examples}) must be >= "
                             f"num_images ({num_images}).")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.num_examples = num_examples
        self.columns = columns
        self.attack = attack
        self.base_model = None
        self.log_dir = None
        self.model_dir = None
        self._batch = None
        self._writer = None

    def attach(self, model_dir, base_model, data):
        """Called by `tfadv.train` before training: the output directory, the classifier to
        attack and the fixed batch (first examples of the validation, else test, split)."""
        self.model_dir = model_dir
        self.base_model = base_model
        images, labels, count = [], [], 0
        for x, y in data.validation if data.validation is not None else data.test:
            images.append(np.asarray(x, np.float32))
            labels.append(np.asarray(y))
            count += len(labels[-1])
            if count >= self.num_examples:
                break
        if not images:
            raise ValueError("AdversarialSummaries needs a non-empty validation or test split.")
        self._batch = (np.concatenate(images)[:self.num_examples],
                       np.concatenate(labels)[:self.num_examples])
        self.log_dir = os.path.join(model_dir, "tensorboard", SUBDIR)
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def _get_attack(self):
        if self.attack is not None:
            return self.attack
        model = getattr(self, "model", None)
        return getattr(model, "eval_attack", None) or getattr(model, "attack", None)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.write_examples(epoch)

    def write_examples(self, step):
        """Writes the three image grids and the two margin histograms at ``step``."""
        if self._batch is None:
            raise ValueError("AdversarialSummaries needs attach(model_dir, base_model, data) "
                             "first (tfadv.train does it).")
        x, y = self._batch
        attack = self._get_attack()
        clean_margin = logit_margin(self.base_model(x, training=False), y)
        shown = x[:self.num_images]
        with self._writer.as_default():
            tf.summary.image("adversarial/clean", image_grid(_displayable(shown), self.columns),
                             step=step)
            tf.summary.histogram("margin/clean", clean_margin, step=step)
            if attack is not None:
                x_adv = np.asarray(tf.cast(attack(self.base_model, x, y), tf.float32))
                delta = x_adv - x
                eps = float(getattr(attack, "eps", 0.0) or np.abs(delta).max() or 1.0)
                tf.summary.image(
                    "adversarial/perturbation",
                    image_grid(_displayable(np.clip(
                        perturbation_image(delta[:self.num_images], eps), 0.0, 1.0)),
                        self.columns),
                    step=step,
                    description=f"0.5 + delta / (2 eps), eps = {eps:g}: grey = unchanged, "
                                "black = -eps, white = +eps")
                tf.summary.image("adversarial/adversarial",
                                 image_grid(_displayable(x_adv[:self.num_images]), self.columns),
                                 step=step)
                tf.summary.histogram("margin/adversarial",
                                     logit_margin(self.base_model(x_adv, training=False), y),
                                     step=step)
        self._writer.flush()

    def write_robustness_curve(self, result):
        """Writes ``result['robustness_curve']`` (from `tfadv.evaluation.evaluate`) as scalars
        at step ``round(1000 * eps)``, and ``robustness_curve.png`` from ``model_dir`` as an
        image when it exists. Returns the number of curve points written."""
        if self._writer is None:
            raise ValueError("AdversarialSummaries needs attach(model_dir, base_model, data) "
                             "first (tfadv.train does it).")
        curve = result.get("robustness_curve") or []
        with self._writer.as_default():
            for point in curve:
                tf.summary.scalar("robustness_curve/accuracy", point["accuracy"],
                                  step=int(round(1000 * point["eps"])),
                                  description="robust accuracy at radius eps = step / "
                                              "1000 (AutoAttack's fast screen; at the threat "
                                              "model's eps the headline)")
            plot = os.path.join(self.model_dir, "robustness_curve.png")
            if curve and os.path.exists(plot):
                image = tf.image.decode_png(tf.io.read_file(plot), channels=3)
                tf.summary.image("robustness_curve/plot", image[None], step=0)
        self._writer.flush()
        return len(curve)
