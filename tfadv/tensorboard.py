"""TensorBoard for comparing runs: the HParams session, adversarial examples, logit margins.

`tfadv.train` writes, under ``model_dir/tensorboard/``:

- ``tensorboard/`` itself: the run's session in TensorBoard's HParams dashboard (`HParamsSession`).
  When the run starts: the experiment config (the run's hyperparameters, and the metrics of
  `session_metrics`) and the session start with the hyperparameters of `run_hparams` (its gin
  bindings). When it ends, in an event file of its own: the final metrics ``report/...``
  (`REPORT_METRICS`, step = the epochs trained), the robustness curve (scalars
  ``robustness_curve/accuracy`` at step ``round(1000 * eps)``, and ``robustness_curve.png`` as
  the image ``robustness_curve/plot``) and the session end. A resumed run finds its session start
  and writes none; ``--extend`` moves the finished session aside with the run's report
  (`move_session`), so TensorBoard never sees two conflicting session starts in one run (it
  would keep the first and ignore the other).
- ``tensorboard/train/``, ``tensorboard/validation/``: Keras' per-epoch scalars (`EpochScalars`,
  flushed every epoch so that a killed run keeps them).
- ``tensorboard/adversarial/`` (`AdversarialSummaries`, every ``every_n_epochs`` epochs, step =
  the 0-based epoch, as Keras' ``epoch_*`` scalars): the image ``adversarial/examples``
  (`render_examples`: clean, adversarial and perturbation rows, labelled and upscaled) and the
  histograms ``margin/clean`` and ``margin/adversarial`` of the logit margin (`logit_margin`).
"""

import ast
import glob
import math
import os
import re
import sys
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import summary as hp_summary

from tfadv.checkpoint import RunCallback

SUBDIR = "adversarial"
# The end-of-run event file of the session (`HParamsSession.finish`) ends in this suffix.
REPORT_SUFFIX = ".report.v2"

# The final metrics, written at the end of the run into the session's own directory:
# tag -> (display name, description, value from report.json).
REPORT_METRICS = {
    "report/robust_accuracy": (
        "robust accuracy (headline)",
        "report.json headline.accuracy: the worst case per test example over every attack, "
        "AutoAttack included",
        lambda report: report["headline"]["accuracy"]),
    "report/clean_accuracy": (
        "clean accuracy", "report.json clean_accuracy (test split)",
        lambda report: report["clean_accuracy"]),
    "report/reliable": (
        "reliable (0/1)",
        "report.json headline.reliable: 1 when no sanity check of the headline failed",
        lambda report: float(bool(report["headline"]["reliable"]))),
}
# The per-epoch scalars of Keras' TensorBoard callback (tags epoch_<log name>) that a
# `tfadv.defenses.Defense` logs, by subdirectory of ``tensorboard/``.
EPOCH_METRICS = {"train": ("loss", "adv_accuracy", "accuracy", "learning_rate"),
                 "validation": ("loss", "accuracy", "robust_accuracy")}


# --- hyperparameters ---------------------------------------------------------------------------
def _literal(text):
    """A gin value's text as an hparam: a number, string or bool as itself, anything else
    (references, lists, dicts, None) as its gin text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if isinstance(value, (bool, int, float, str)) and not (
            isinstance(value, float) and not math.isfinite(value)):
        return value
    return text


def _selector(binding):
    """``'scope/Name.param'`` -> ``'Name'``; ``'module.Name.param'`` -> ``'module.Name'``."""
    return binding.rsplit(".", 1)[0].split("/")[-1]


def _other_defense(selector, defense):
    """Whether gin's ``selector`` is a `tfadv.defenses.Defense` class that ``defense`` is not."""
    from tfadv.defenses import Defense

    try:
        configurable = gin.get_configurable(selector)
    except ValueError:
        return False
    return (isinstance(configurable, type) and issubclass(configurable, Defense)
            and not (isinstance(defense, type) and issubclass(defense, configurable)))


def _actual(value):
    """A Python argument as an hparam, or None when it has no short form (an object)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "None"
    if isinstance(value, type) or callable(value) and hasattr(value, "__name__"):
        return "@" + value.__name__
    return None


def run_hparams(bindings, defense=None, train_args=None, data=None, exclude=()):
    """The hyperparameters of a run, ``{name: number | str | bool}``, named by gin binding.

    - Every binding of ``bindings`` (gin's config string, as ``run.json`` records it: the gin
      files and ``--gin_param``), with macros (``%EPSILON``) replaced by their values. Left out:
      the names in ``exclude`` and the bindings of a `tfadv.defenses.Defense` class other than
      ``defense`` (a gin file includes a base that configures another defense: ``trades.gin``
      includes ``pgd_at_base.gin``, which binds ``PGDAdversarialTraining``).
    - ``train.<argument>`` for every item of ``train_args`` (the arguments `tfadv.train.train`
      ran with: defaults and Python arguments included) that is a number, string, bool, None
      (``'None'``) or a class or function (``'@Name'``); other objects (attacks, schedules)
      keep their binding's text.
    - ``load_dataset.name`` and ``load_dataset.batch_size`` of the loaded ``data``
      (`tfadv.data.Data`).

    Numbers, strings and bools stay so (``train_attack/PGD.eps = 0.3``, ``TRADES.beta = 6.0``,
    ``train_attack/PGD.norm = 'linf'``); references, lists, dicts and None become their gin
    text (``'@train_attack/PGD()'``, ``'[60, 72]'``), so every value is scalar and any of them
    can be passed back as ``--gin_param='<name> = <value>'``.
    """
    from tfadv.rundir import parse_bindings

    parsed = parse_bindings(bindings)
    macros = {name: text for name, text in parsed.items() if "." not in name}

    def resolve(text, depth=0):
        if depth > 10:
            return text
        replaced = re.sub(r"%([A-Za-z_][\w/.]*)",
                          lambda m: macros.get(m.group(1), m.group(0)), text)
        return replaced if replaced == text else resolve(replaced, depth + 1)

    hparams = {}
    for name, text in parsed.items():
        if "." in name and name not in exclude and not _other_defense(_selector(name), defense):
            hparams[name] = _literal(resolve(text))
    for arg, value in (train_args or {}).items():
        name = f"train.{arg}"
        value = _actual(value)
        if value is not None and name not in exclude:
            hparams[name] = value
    if data is not None:
        hparams["load_dataset.name"] = data.name
        hparams["load_dataset.batch_size"] = int(data.batch_size)
    return dict(sorted(hparams.items()))


def session_metrics(metric_names=()):
    """The metrics the experiment config declares (`hp.Metric`): the final `REPORT_METRICS` in
    the session's own directory, and the per-epoch ``epoch_<name>`` scalars of `EPOCH_METRICS`
    plus ``metric_names`` (a defense's own ``metrics``) under ``train`` and ``validation``."""
    metrics = [hp.Metric(tag, group="", display_name=display, description=description)
               for tag, (display, description, _) in REPORT_METRICS.items()]
    known = {name for names in EPOCH_METRICS.values() for name in names}
    extra = [name for name in dict.fromkeys(metric_names) if name not in known]
    for group, names in EPOCH_METRICS.items():
        kind = hp.Metric.TRAINING if group == "train" else hp.Metric.VALIDATION
        for name in (*names, *extra):
            metrics.append(hp.Metric(f"epoch_{name}", group=group, dataset_type=kind,
                                     display_name=f"{group} {name} (last epoch)"))
    return metrics


def _event_files(log_dir):
    """The event files directly in ``log_dir`` (not its subdirectories), oldest first."""
    return sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))


def _hparam_value(value):
    """A `google.protobuf.Value` of a session start as Python."""
    kind = value.WhichOneof("kind")
    return {"bool_value": value.bool_value, "number_value": value.number_value,
            "string_value": value.string_value}.get(kind)


def read_session_start(log_dir):
    """The hparams (``{name: value}``, numbers as float) of the first session start in the
    event files directly in ``log_dir``, or None when there is none."""
    for path in _event_files(log_dir):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.tag == hp_metadata.SESSION_START_INFO_TAG:
                        info = hp_metadata.parse_session_start_info_plugin_data(
                            value.metadata.plugin_data.content)
                        return {k: _hparam_value(v) for k, v in info.hparams.items()}
        except tf.errors.DataLossError:  # a file cut short by a kill: read what precedes it
            continue
    return None


def _hparam_info(name, value):
    """An `api_pb2.HParamInfo` with the value's type and no domain: TensorBoard's filters then
    start open, whatever values other runs have."""
    kind = (api_pb2.DATA_TYPE_BOOL if isinstance(value, bool) else
            api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, (int, float)) else
            api_pb2.DATA_TYPE_STRING)
    return api_pb2.HParamInfo(name=name, type=kind, description="gin binding")


def move_session(log_dir, target):
    """Moves the event files directly in ``log_dir`` (the HParams session: its start, final
    metrics and end) into ``target`` (created); returns their new paths. `tfadv.train` calls it
    when ``--extend`` moves a finished run's report aside, so the extended run starts a new
    session and the old one stays comparable in ``previous/``."""
    moved = []
    for path in _event_files(log_dir):
        os.makedirs(target, exist_ok=True)
        moved.append(os.path.join(target, os.path.basename(path)))
        os.replace(path, moved[-1])
    return moved


class HParamsSession:
    """The run's session in TensorBoard's HParams dashboard. ``log_dir`` (``tensorboard/``) is
    the session's run; the metrics' groups ``train`` and ``validation`` are its subdirectories
    (Keras' TensorBoard callback), the final metrics are in ``log_dir`` itself."""

    def __init__(self, log_dir):
        self.log_dir = os.fspath(log_dir)

    def start(self, hparams, metrics):
        """Writes the experiment config (``hparams``' names and types, and ``metrics``, a list of
        `hp.Metric`) and the session start with ``hparams`` (`run_hparams`), unless ``log_dir``
        already holds a session start (a resumed run): TensorBoard keeps the first session start
        of a run and ignores later ones, so a second one would only be dead weight, or silently
        disagree. Returns whether it wrote. A resumed run whose hyperparameters differ from its
        session's (only possible with Python arguments to `tfadv.train.train`: gin bindings are
        checked on resume) gets one warning line."""
        existing = read_session_start(self.log_dir)
        if existing is not None:
            wanted = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                      else v for k, v in hparams.items()}
            if existing != wanted:
                changed = sorted(k for k in set(existing) | set(wanted)
                                 if existing.get(k) != wanted.get(k))
                print(f"tfadv: warning: TensorBoard's HParams keep this run's first "
                      f"hyperparameters; now different: {', '.join(changed[:4])}",
                      file=sys.stderr)
            return False
        writer = tf.summary.create_file_writer(self.log_dir)
        with writer.as_default():
            experiment = hp_summary.experiment_pb(
                hparam_infos=[_hparam_info(k, v) for k, v in hparams.items()],
                metric_infos=[m.as_proto() for m in metrics])
            tf.summary.experimental.write_raw_pb(experiment.SerializeToString(), step=0)
            # trial_id "": the session is its own group, named by its run (model_dir/tensorboard).
            hp.hparams(hparams, trial_id="", start_time_secs=time.time())
        writer.close()
        return True

    def finish(self, report, plot=None):
        """Writes the final metrics of ``report`` (the dict of ``report.json``) under the tags
        of `REPORT_METRICS` at step ``report['epochs']`` (a metric the report lacks is left
        out), its robustness curve (scalars ``robustness_curve/accuracy`` at step
        ``round(1000 * eps)``: TensorBoard's x axis is an integer, read it as eps in
        thousandths), the image file ``plot`` (``robustness_curve.png``) as
        ``robustness_curve/plot`` when it exists, and the session end (success), into one new
        event file; first it removes such a file left by an earlier attempt of this run that
        died before its report was written. Returns the number of curve points written."""
        for old in glob.glob(os.path.join(self.log_dir, "*" + REPORT_SUFFIX)):
            os.remove(old)
        step = int(report.get("epochs") or 0)
        curve = report.get("robustness_curve") or []
        writer = tf.summary.create_file_writer(self.log_dir, filename_suffix=REPORT_SUFFIX)
        with writer.as_default():
            for tag, (display, description, get) in REPORT_METRICS.items():
                try:
                    value = get(report)
                except (KeyError, TypeError):
                    continue
                if value is not None:
                    tf.summary.scalar(tag, float(value), step=step, description=description)
            for point in curve:
                tf.summary.scalar("robustness_curve/accuracy", point["accuracy"],
                                  step=int(round(1000 * point["eps"])),
                                  description="robust accuracy at radius eps = step / 1000 "
                                              "(AutoAttack's fast screen; at the threat "
                                              "model's eps the headline)")
            if curve and plot is not None and os.path.exists(plot):
                image = tf.image.decode_png(tf.io.read_file(plot), channels=3)
                tf.summary.image("robustness_curve/plot", image[None], step=0,
                                 description="robustness_curve.png of the final evaluation")
            end = hp_summary.session_end_pb(api_pb2.STATUS_SUCCESS)
            tf.summary.experimental.write_raw_pb(end.SerializeToString(), step=step)
        writer.close()
        return len(curve)


class EpochScalars(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback (the per-epoch ``epoch_*`` scalars in ``train/`` and
    ``validation/``), flushed to disk after every epoch: TF's summary writers otherwise keep up
    to 10 events or 2 minutes in memory, which a killed run loses although its checkpoint holds
    the epoch. `tfadv.train` places it before the checkpoint callback."""

    def on_epoch_end(self, epoch, logs=None):
        """Keras' epoch summaries, then a flush of its writers."""
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():  # Keras' train and val writers (made lazily)
            writer.flush()


# --- adversarial examples ------------------------------------------------------------------------
def logit_margin(logits, labels):
    """``z_y - max_{j != y} z_j`` per example (float32 numpy): > 0 exactly when correct."""
    logits = np.asarray(tf.cast(logits, tf.float32))
    labels = np.asarray(labels).astype(np.int64)
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return (true - others.max(axis=-1)).astype(np.float32)


def upscale(images, factor):
    """Nearest-neighbour upscaling of ``images`` (n, H, W, C) by an integer ``factor``: every
    pixel becomes a ``factor`` x ``factor`` block."""
    return np.repeat(np.repeat(np.asarray(images), factor, axis=1), factor, axis=2)


def to_rgb(images):
    """(n, H, W, C) in [0, 1] -> (n, H, W, 3): grey repeated, RGB kept, RGBA without alpha,
    other channel counts averaged to grey."""
    images = np.asarray(images, np.float32)
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels == 4:
        return images[..., :3]
    grey = images if channels == 1 else images.mean(axis=-1, keepdims=True)
    return np.repeat(grey, 3, axis=-1)


HEATMAP = "RdBu_r"  # blue = -scale, white = 0, red = +scale


def perturbation_heatmap(delta, scale):
    """(n, H, W, C) perturbations -> (n, H, W, 3) RGB in [0, 1]: the mean over channels of
    ``delta / scale`` through the diverging colour map `HEATMAP` (blue -scale, white 0, red
    +scale; values beyond +-scale saturate)."""
    import matplotlib

    signed = np.clip(np.asarray(delta, np.float32).mean(axis=-1) / scale, -1.0, 1.0)
    return matplotlib.colormaps[HEATMAP]((signed + 1.0) / 2.0)[..., :3].astype(np.float32)


class ExampleLayout:
    """Pixel layout of `render_examples`' image for ``count`` examples of ``height`` x ``width``
    and ``rows`` rows: tiles ``scale`` = ceil(min_tile / min(height, width)) times the image
    size, each under a text band; a title band on top and a margin with the row names on the
    left. ``tile(row, i)`` is the (top, left) pixel of a tile."""

    TITLE, BAND, GAP, LEFT = 30, 14, 6, 18

    def __init__(self, count, height, width, rows=3, min_tile=64):
        self.count, self.rows = count, rows
        self.scale = max(1, math.ceil(min_tile / min(height, width)))
        self.tile_h, self.tile_w = height * self.scale, width * self.scale
        self.width = self.LEFT + count * (self.tile_w + self.GAP) + self.GAP
        self.height = self.TITLE + rows * (self.BAND + self.tile_h) + self.GAP

    def tile(self, row, i):
        """(top, left) of example ``i``'s tile in row ``row`` (0 clean, 1 adversarial,
        2 perturbation)."""
        return (self.TITLE + row * (self.BAND + self.tile_h) + self.BAND,
                self.LEFT + self.GAP + i * (self.tile_w + self.GAP))


def render_examples(x, y, clean_pred, x_adv=None, adv_pred=None, scale=None, title="",
                    min_tile=64, norm="linf"):
    """A labelled picture of adversarial examples, as an RGB uint8 array (H, W, 3).

    Rows (layout: `ExampleLayout`): the clean images ``x`` (n, h, w, c) in [0, 1] with
    ``y=<true> pred=<clean prediction>`` above each; the adversarial images ``x_adv`` with
    ``pred=<adversarial prediction>`` above each; and the perturbation ``x_adv - x`` as a heat
    map (`perturbation_heatmap` with ``scale``, default its largest magnitude) with its ``norm``
    above each (``'linf'``: max |delta|; ``'l2'``: its L2 norm). A prediction that differs from
    the true class is written in red. Images are upscaled by nearest neighbour (`upscale`) to at
    least ``min_tile`` pixels per side and placed pixel for pixel, so the tiles hold the images'
    own values (to 8 bits). Without ``x_adv`` only the clean row is drawn. Matplotlib (Agg, no
    display) draws the text.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(x, np.float32)
    count, height, width = x.shape[:3]
    rows = 1 if x_adv is None else 3
    layout = ExampleLayout(count, height, width, rows, min_tile)
    panels = [to_rgb(x)]
    if x_adv is not None:
        x_adv = np.asarray(x_adv, np.float32)
        delta = x_adv - x
        if scale is None:
            scale = float(np.abs(delta).max())
        panels += [to_rgb(x_adv), perturbation_heatmap(delta, scale or 1.0)]
    canvas = np.ones((layout.height, layout.width, 3), np.float32)
    for row, images in enumerate(panels):
        tiles = upscale(np.clip(images, 0.0, 1.0), layout.scale)
        for i in range(count):
            top, left = layout.tile(row, i)
            canvas[top:top + layout.tile_h, left:left + layout.tile_w] = tiles[i]
    pixels = np.round(canvas * 255).astype(np.uint8)

    fig = Figure(figsize=(layout.width / 100, layout.height / 100), dpi=100)
    FigureCanvasAgg(fig)
    fig.figimage(pixels, 0, 0, origin="upper")

    def text(top, left, string, **kwargs):  # pixel coordinates from the top left
        fig.text(left / layout.width, 1 - top / layout.height, string, **kwargs)

    if title:
        text(4, layout.LEFT, title, fontsize=7, va="top", ha="left")
    names = ["clean", "adversarial", "perturbation"][:rows]
    for row, name in enumerate(names):
        top, _ = layout.tile(row, 0)
        text(top + layout.tile_h / 2, layout.LEFT / 2, name, fontsize=7, rotation=90,
             ha="center", va="center")
    y = np.asarray(y).astype(int)
    for i in range(count):
        labels = [(f"y={y[i]} pred={int(clean_pred[i])}", int(clean_pred[i]) != y[i])]
        if x_adv is not None:
            size = (np.abs(delta[i]).max() if norm in ("linf", np.inf, "inf", "patch")
                    else np.sqrt((delta[i] ** 2).sum()))
            labels += [(f"pred={int(adv_pred[i])}", int(adv_pred[i]) != y[i]),
                       (f"{'max|d|' if norm in ('linf', np.inf, 'inf', 'patch') else '|d|2'}"
                        f"={size:.2f}", False)]
        for row, (label, wrong) in enumerate(labels):
            top, left = layout.tile(row, i)
            text(top - 2, left + layout.tile_w / 2, label, fontsize=7, ha="center",
                 va="bottom", color="#e00000" if wrong else "black")
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return image


@gin.configurable
class AdversarialSummaries(RunCallback):
    """Adversarial examples and logit-margin histograms in TensorBoard, per epoch (see the
    module docstring for what is written where).

    Args:
      every_n_epochs: write after every this many epochs (epochs N, 2N, ...; default 1: every
        epoch); 0 writes none.
      num_images: examples shown in ``adversarial/examples`` (integer >= 1).
      num_examples: examples in the margin histograms, all attacked once per write (integer >=
        ``num_images``; fewer if the split is smaller).
      min_tile: the images are upscaled (nearest neighbour) to at least this many pixels per
        side (integer >= 1; 8x8 digits become 64x64).
      attack: the attack to show; ``None`` (default) uses the trained defense's ``eval_attack``
        (else its ``attack``). Without any attack only the clean row and margins are written.
    """

    def __init__(self, every_n_epochs=1, num_images=8, num_examples=64, min_tile=64,
                 attack=None):
        super().__init__()
        for name, value, low in (("every_n_epochs", every_n_epochs, 0),
                                 ("num_images", num_images, 1),
                                 ("num_examples", num_examples, 1), ("min_tile", min_tile, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AdversarialSummaries.{name} must be an integer >= {low}; "
                                 f"got {value!r}.")
        if num_examples < num_images:
            raise ValueError(f"AdversarialSummaries.num_examples ({num_examples}) must be >= "
                             f"num_images ({num_images}).")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.num_examples = num_examples
        self.min_tile = min_tile
        self.attack = attack
        self.base_model = None
        self.log_dir = None
        self._batch = None
        self._writer = None

    def attach(self, model_dir, base_model, data):
        """Called by `tfadv.train` before training: the output directory, the classifier to
        attack and the fixed batch (first examples of the validation, else test, split)."""
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
        """Attacks the fixed batch once and writes ``adversarial/examples`` (`render_examples`
        of the first ``num_images``) and the two margin histograms at ``step``."""
        if self._batch is None:
            raise ValueError("AdversarialSummaries needs attach(model_dir, base_model, data) "
                             "first (tfadv.train does it).")
        x, y = self._batch
        n = self.num_images
        attack = self._get_attack()
        clean_logits = self.base_model(x, training=False)
        clean_pred = np.argmax(np.asarray(clean_logits), -1)
        factor = ExampleLayout(n, x.shape[1], x.shape[2], min_tile=self.min_tile).scale
        with self._writer.as_default():
            tf.summary.histogram("margin/clean", logit_margin(clean_logits, y), step=step)
            if attack is None:
                image = render_examples(x[:n], y[:n], clean_pred[:n],
                                        title=f"epoch {step + 1}: clean (true y, prediction; "
                                              f"red = wrong); no attack",
                                        min_tile=self.min_tile)
                description = "clean validation images, true class and prediction"
            else:
                x_adv = np.asarray(tf.cast(attack(self.base_model, x, y), tf.float32))
                adv_logits = self.base_model(x_adv, training=False)
                adv_pred = np.argmax(np.asarray(adv_logits), -1)
                eps = float(getattr(attack, "eps", 0.0) or 0.0)
                norm = str(getattr(attack, "norm", "linf"))
                linf = norm in ("linf", "inf")
                scale = eps if linf and eps else float(np.abs(x_adv[:n] - x[:n]).max() or 1.0)
                name = type(attack).__name__
                image = render_examples(
                    x[:n], y[:n], clean_pred[:n], x_adv[:n], adv_pred[:n], scale=scale,
                    min_tile=self.min_tile, norm="linf" if linf else norm,
                    title=f"epoch {step + 1}: {name} eps={eps:g} ({norm}); predictions in "
                          f"red are wrong\nperturbation: blue = -{scale:.3g}, white = 0, "
                          f"red = +{scale:.3g} (mean over channels)")
                description = (f"rows: clean validation images (true class, prediction), "
                               f"{name} adversarial images (prediction, red when wrong), and "
                               f"the perturbation as a heat map (blue -{scale:.3g} ... red "
                               f"+{scale:.3g}); upscaled x{factor} by nearest neighbour")
                tf.summary.histogram("margin/adversarial", logit_margin(adv_logits, y),
                                     step=step)
            tf.summary.image("adversarial/examples", image[None], step=step,
                             description=description)
        self._writer.flush()
