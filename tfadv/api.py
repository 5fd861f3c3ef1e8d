"""The Python API, one call each: `evaluate` a classifier's robustness, `attack` images.

    import tfadv
    result = tfadv.evaluate(model, x_test, y_test, eps=8 / 255)            # images in [0, 1]
    result = tfadv.evaluate("runs/pgd_at", x_uint8, y, eps=0.3, input_range=(0, 255))
    x_adv = tfadv.attack(model, x, y, "pgd20", eps=8 / 255)

**Inputs.** ``model`` is a Keras classifier (images -> logits) or a path: a `bin/train`
model_dir, a ``.keras`` file, a SavedModel or a TF Serving directory
(`tfadv.rundir.load_classifier`). ``x`` is one image (H, W, C) or a batch (N, H, W, C) as a
NumPy array or tensor, or, for `evaluate`, a `tf.data` dataset of ``(images, labels)`` (then
``y=None``). Labels are integer class indices or one-hot rows (a scalar for one image).

**Input range and eps units.** Images are expected in ``input_range = (lo, hi)``: (0, 1) by
default, (0, 255) for 8-bit images, (-1, 1) for models trained that way; the model is called on
images in that same range. The attacks work in [0, 1]: images are mapped to
``u = (x - lo) / (hi - lo)`` and the model is called through a `keras.layers.Rescaling` that
maps back, ``lo + u * (hi - lo)``. So ``eps`` is in [0, 1] units, a fraction of the input
range, as everywhere in tfadv (gin files, reports, `bin/evaluate`): with
``input_range=(0, 255)``, ``eps=8 / 255`` allows 8 grey levels per pixel (L-inf), and an L2
``eps`` is a length in [0, 1] units (``eps * (hi - lo)`` in input units). An L-inf eps above 1
is refused (it would be in input units by mistake). Images outside ``input_range`` raise a
one-line ValueError naming the range found and the ``input_range`` to pass: never clipped in
silence.

**Results.** `evaluate` returns the dict of `tfadv.evaluation.evaluate`, which it calls (one
evaluation path: the headline with AutoAttack, its verdict, the sanity checks and remedies,
``output_dir`` artifacts). `attack` returns float32 adversarial images in the input's range and
shape, ``x + delta * (hi - lo)`` (inside the eps-ball up to float32 rounding); uint8 images are
not rounded back to uint8, because rounding changes the perturbation (and can leave the eps-ball
when ``eps * (hi - lo)`` is not a whole number of levels).

`run_settings` reads what `bin/evaluate` takes from a run directory (dataset, eps, norm).
"""

import ast
import math
import numbers
import os
import re

DEFAULT_ATTACKS = ("fgsm", "pgd20")  # diagnostics; tfadv.evaluation adds AutoAttack
UNIT_RANGE = (0.0, 1.0)


# --- checks ---------------------------------------------------------------------------------------
def _check_input_range(input_range):
    try:
        lo, hi = input_range
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                 for v in (lo, hi)) and lo < hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"input_range must be (low, high), two finite numbers with low < high, "
                         f"e.g. (0, 255) for 8-bit images; got {input_range!r}.")
    return float(lo), float(hi)


def _check_threat(eps, norm):
    from tfadv.attacks.pgd import norm_name
    from tfadv.checks import check_number

    if isinstance(norm, str) and norm.strip().lower() == "patch":
        check_number("eps (the patch side in pixels, norm='patch')", eps, 1, strict=False,
                     integer=True)
        return {"eps": int(eps), "norm": "patch"}
    check_number("eps", eps, 0.0, strict=False)
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite; got {eps!r}.")
    norm = norm_name(norm)
    if norm == "linf" and eps > 1:
        raise ValueError(f"eps={eps:g} is more than 1 for norm='linf': eps is in [0, 1] units, "
                         f"a fraction of input_range (for 0..255 images, 8 grey levels is "
                         f"eps=8/255).")
    return {"eps": float(eps), "norm": norm}


def _check_count(name, value, allow_none=False):
    if value is None and allow_none:
        return
    from tfadv.checks import check_positive_int

    check_positive_int(name, value)


def _check_images(images, lo, hi, who):
    """Raises a one-line ValueError unless every pixel lies in [lo, hi]."""
    from tfadv.attacks.base import RANGE_TOLERANCE, suggest_input_range, value_range

    found = value_range(images)
    if found is None:
        raise ValueError(f"{who}: x holds no images.")
    low, high = found
    slack = RANGE_TOLERANCE * (hi - lo)
    if lo - slack <= low and high <= hi + slack:  # False for NaN
        return
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{who}: x holds non-finite pixels (NaN or inf); remove them first.")
    guess = suggest_input_range(low, high)
    raise ValueError(
        f"{who}: images span [{low:g}, {high:g}], outside input_range=({lo:g}, {hi:g}): pass the "
        f"range your images use, input_range=({guess[0]:g}, {guess[1]:g}), or rescale them; "
        f"they are not clipped silently.")


# --- inputs ---------------------------------------------------------------------------------------
def _load(model):
    if isinstance(model, (str, os.PathLike)):
        from tfadv import rundir

        return rundir.load_classifier(model, name="model")
    if not callable(model):
        raise ValueError(f"model must be a Keras model (images -> logits) or the path of a "
                         f"bin/train model_dir, a .keras file or a SavedModel; got "
                         f"{type(model).__name__}.")
    return model


def _model_shape(model, attribute):
    try:
        shape = getattr(model, attribute, None)
    except (AttributeError, ValueError):  # Keras raises for models that are not built
        return None
    return tuple(shape) if isinstance(shape, (tuple, list)) and shape and all(
        d is None or isinstance(d, int) for d in shape) else None


def _is_single(images, model):
    """Whether ``images`` is one image (no batch axis): by the model's input rank when known,
    else by the convention that one image is (H, W, C)."""
    shape = _model_shape(model, "input_shape")
    if shape is None:
        return images.ndim == 3
    if images.ndim == len(shape) - 1:
        return True
    if images.ndim == len(shape):
        return False
    raise ValueError(f"x: the model takes images of shape {shape[1:]}; got an array of shape "
                     f"{images.shape}, neither one image nor a batch of them.")


def _labels(y, count, num_classes):
    """Integer labels (int64, shape (count,)) from integer or one-hot labels."""
    import numpy as np

    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise ValueError("y: 2-D labels must be one-hot rows (one 1 per row, zeros "
                             "elsewhere); pass integer class indices otherwise.")
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"y: one-hot rows have {y.shape[1]} columns but the model has "
                             f"{num_classes} classes.")
        y = np.argmax(y, axis=1)
    elif y.ndim != 1:
        raise ValueError(f"y must be integer class indices, shape (N,), or one-hot rows, shape "
                         f"(N, classes); got shape {y.shape}.")
    if len(y) != count:
        raise ValueError(f"x holds {count} images but y holds {len(y)} labels.")
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise ValueError(f"y must be integer class indices or one-hot rows; got dtype {y.dtype}.")
    y = y.astype("int64")
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        bound = num_classes if num_classes is not None else "number of classes"
        raise ValueError(f"y: labels must lie in [0, {bound}); got values in [{y.min()}, "
                         f"{y.max()}].")
    return y


def _examples(model, x, y, max_examples):
    """``(images, labels, single)``: images as an array with a batch axis (input dtype kept),
    int64 labels, and whether ``x`` was one image."""
    import numpy as np
    import tensorflow as tf

    output = _model_shape(model, "output_shape")
    num_classes = output[-1] if output is not None and len(output) == 2 else None
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("y must be None when x is a tf.data.Dataset: its elements are "
                             "(images, labels) pairs.")
        xs, ys, count = [], [], 0
        for element in x:
            if not (isinstance(element, (tuple, list)) and len(element) == 2):
                raise ValueError("x: a tf.data.Dataset must yield (images, labels) pairs.")
            images, labels = np.asarray(element[0]), np.asarray(element[1])
            if _is_single(images, model):
                images, labels = images[None], labels[None]
            xs.append(images)
            ys.append(labels)
            count += len(images)
            if max_examples is not None and count >= max_examples:
                break
        if not xs:
            raise ValueError("x: the dataset is empty.")
        images, labels, single = np.concatenate(xs), np.concatenate(ys), False
    else:
        if y is None:
            raise ValueError("y (the true labels) is required with image arrays; y=None is for "
                             "a tf.data.Dataset of (images, labels).")
        images, labels = np.asarray(x), np.asarray(y)
        single = _is_single(images, model)
        if single:
            images, labels = images[None], labels[None]
    if images.dtype.kind not in "iuf":
        raise ValueError(f"x must hold numbers (uint8 or float images); got dtype {images.dtype}.")
    labels = _labels(labels, len(images), num_classes)
    if max_examples is not None:
        images, labels = images[:max_examples], labels[:max_examples]
    return images, labels, single


def _to_unit(images, lo, hi):
    """Images in [lo, hi] -> float32 in [0, 1] (float rounding at the edges clipped)."""
    import numpy as np

    unit = images.astype("float32")
    if (lo, hi) != UNIT_RANGE:
        unit = (unit - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(unit, 0.0, 1.0)


def in_unit_range(model, input_range, image_shape):
    """``model`` (images in ``input_range`` -> logits) as a Keras model of images in [0, 1]:
    ``model(lo + u * (hi - lo))``, a `keras.layers.Rescaling` in front; ``model`` itself for
    (0, 1). The layers and weights are shared, not copied.

    A Sequential or functional ``model`` is rebuilt flat (the rescaling, then its own layers,
    not a nested model), so that the evaluation's BPDA remedy finds gradient-blocking layers
    in it as it would in ``model`` (`tfadv.attacks.bpda` searches the top-level layers)."""
    lo, hi = _check_input_range(input_range)
    if (lo, hi) == UNIT_RANGE:
        return model
    import keras

    inputs = keras.Input(tuple(image_shape), name="images_0_1")
    images = keras.layers.Rescaling(hi - lo, offset=lo, name="to_input_range")(inputs)
    name = f"{model.name}_from_0_1"
    if isinstance(model, keras.Sequential):
        out = images
        for layer in model.layers:
            out = layer(out)
        return keras.Model(inputs, out, name=name)
    if isinstance(getattr(model, "inputs", None), list) and len(model.inputs) == 1:
        def call(layer, *args, **kwargs):  # the rescaled images go where the input went
            args, kwargs = keras.tree.map_structure(
                lambda t: images if t is inputs else t, (args, kwargs))
            return layer(*args, **kwargs)

        try:
            rebuilt = keras.models.clone_model(model, input_tensors=inputs,
                                               clone_function=lambda layer: layer,
                                               call_function=call)
            return keras.Model(inputs, rebuilt.outputs, name=name)
        except (ValueError, TypeError):  # not rebuildable: nest it (BPDA then sees less)
            pass
    return keras.Model(inputs, model(images), name=name)


def _attacks(attacks, threat, seed):
    """``name -> attack`` from None (`DEFAULT_ATTACKS`), names (a list, or one string with
    commas), attack objects, or a dict of either. Objects must clip to [0, 1] and, unless
    ``threat`` is ``None``, use its eps and norm."""
    from tfadv.attacks import registry
    from tfadv.attacks.pgd import norm_name

    if attacks is None:  # the patch threat model's headline (the patch PGD) is added later
        attacks = [] if threat is not None and threat["norm"] == "patch" else DEFAULT_ATTACKS
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if isinstance(attacks, dict):
        items = list(attacks.items())
    else:
        items = [(a.strip() if isinstance(a, str) else type(a).__name__, a) for a in attacks]
    out = {}
    for name, attack in items:
        if isinstance(attack, str):
            attack = registry.build_attack(attack, threat["eps"], threat["norm"], seed)
        elif not callable(attack):
            raise ValueError(f"attacks[{name!r}] must be an attack name (see "
                             f"tfadv.attacks.registry) or an attack object; got {attack!r}.")
        else:
            box = (getattr(attack, "clip_min", 0.0), getattr(attack, "clip_max", 1.0))
            if box != UNIT_RANGE:
                raise ValueError(
                    f"attacks[{name!r}] clips to [{box[0]:g}, {box[1]:g}], but tfadv.evaluate "
                    f"and tfadv.attack map images to [0, 1]: build it with clip_min=0, "
                    f"clip_max=1 (the default) and give the images' range as input_range.")
            own = (getattr(attack, "norm", None) if getattr(attack, "norm", None) == "patch"
                   else norm_name(attack.norm) if hasattr(attack, "norm") else None)
            if threat is not None and hasattr(attack, "eps") and own is not None and (
                    not math.isclose(attack.eps, threat["eps"], rel_tol=1e-6, abs_tol=1e-12)
                    or own != threat["norm"]):
                raise ValueError(
                    f"attacks[{name!r}] has eps={attack.eps:g}, norm={own}, "
                    f"but the evaluation's threat model is eps={threat['eps']:g}, "
                    f"norm={threat['norm']}: every attack of one evaluation shares it.")
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}-{n}"
        out[key] = attack
    return out


# --- the two calls --------------------------------------------------------------------------------
def evaluate(model, x, y=None, *, eps, norm="linf", input_range=UNIT_RANGE, attacks=None,
             autoattack="standard", batch_size=256, max_examples=None, output_dir=None, seed=0,
             verbose=1, sanity=True, remedies=True, strategy=None, resume=True):
    """The robustness of ``model`` on ``(x, y)``: the headline (worst case per example over every
    attack, AutoAttack included) with its verdict, as `tfadv.evaluation.evaluate` computes it.

    Args:
      model: a Keras classifier (images in ``input_range`` -> logits), or the path of a
        `bin/train` model_dir, a ``.keras`` file or a SavedModel.
      x: one image (H, W, C), a batch (N, H, W, C) (NumPy or tensor, any numeric dtype), or a
        `tf.data` dataset of (images, labels) batches or single examples.
      y: integer labels or one-hot rows (a scalar or one row for one image); ``None`` when
        ``x`` is a dataset.
      eps: the threat model's radius in [0, 1] units, a fraction of ``input_range`` (module
        docstring), or for ``norm='patch'`` the side of the square patch in pixels; required.
      norm: ``'linf'``, ``'l2'`` or ``'patch'`` (an eps x eps patch of any content anywhere in
        the image: `tfadv.attacks.patch`; the headline is the patch PGD at every location).
      input_range: ``(lo, hi)``, the range of ``x`` and of the model's input: (0, 1), (0, 255)
        for 8-bit images, (-1, 1), ...; images outside it raise a ValueError.
      attacks: the diagnostic attacks besides AutoAttack: names of
        `tfadv.attacks.registry` (a list, or ``'fgsm,pgd20'``), attack objects (working on
        [0, 1], with this eps and norm), or a dict ``name -> name or object``. Default
        `DEFAULT_ATTACKS`; ``{}`` for none (the headline is then AutoAttack alone, or, with
        ``autoattack=None`` too, only the clean accuracy).
      autoattack: the AutoAttack of the headline: ``'standard'``, ``'fast'`` (a cheaper
        screen, labelled as such) or ``None`` (the verdict is then unreliable).
      batch_size: images per attack batch.
      max_examples: evaluate on the first ``max_examples`` examples only.
      output_dir: where to write ``eval.json`` and the plots (and the per-example progress that
        makes an interrupted evaluation resume); nothing is written when ``None``.
      seed: seed of every attack.
      verbose: 1 shows the progress line (redrawn on a terminal, one line per stage and every
        30 s elsewhere) and prints the result table at the end; 0 is silent.
      sanity, remedies, strategy, resume: as for `tfadv.evaluation.evaluate`.

    Returns:
      the dict of `tfadv.evaluation.evaluate`: ``headline`` (``accuracy``, ``verdict``, ...),
      ``clean_accuracy``, ``robust_accuracy`` per attack, ``worst_case_accuracy``,
      ``threat_model`` (eps in [0, 1] units), ``sanity_checks``, ``per_example``, ...
    """
    lo, hi = _check_input_range(input_range)
    threat = _check_threat(eps, norm)
    _check_count("batch_size", batch_size)
    _check_count("max_examples", max_examples, allow_none=True)
    from tfadv import evaluation

    if autoattack not in (*evaluation.HEADLINE_VERSIONS, None):
        raise ValueError(f"autoattack must be one of {evaluation.HEADLINE_VERSIONS} or None; "
                         f"got {autoattack!r}.")
    chosen = _attacks(attacks, threat, seed)
    model = _load(model)
    images, labels, _ = _examples(model, x, y, max_examples)
    _check_images(images, lo, hi, "tfadv.evaluate")
    unit = _to_unit(images, lo, hi)
    batches = [(unit[i:i + batch_size], labels[i:i + batch_size])
               for i in range(0, len(labels), batch_size)]
    result = evaluation.evaluate(
        in_unit_range(model, (lo, hi), unit.shape[1:]), batches, attacks=chosen, sanity=sanity,
        autoattack=autoattack, remedies=remedies, output_dir=output_dir, seed=seed,
        verbose=verbose, strategy=strategy, resume=resume, threat_model=threat)
    if verbose:
        print(evaluation.format_table(result), flush=True)
    return result


def attack(model, x, y, attack="pgd20", *, eps=None, norm="linf", input_range=UNIT_RANGE,
           batch_size=256, seed=0):
    """Adversarial versions of the images ``x`` (true labels ``y``) against ``model``.

    Args:
      model: as for `evaluate` (a Keras classifier or a path).
      x: one image (H, W, C) or a batch (N, H, W, C) in ``input_range`` (any numeric dtype).
      y: the TRUE labels, integer or one-hot (never the model's predictions).
      attack: a name of `tfadv.attacks.registry` (``'fgsm'``, ``'pgd20'``, ``'apgd-ce'``,
        ``'autoattack'``, ...) or an attack object working on [0, 1] (its own eps and norm).
      eps: radius in [0, 1] units, a fraction of ``input_range``; required with a name, left
        unset with an object.
      norm: ``'linf'`` or ``'l2'`` (with a name).
      input_range: ``(lo, hi)`` of ``x`` and of the model's input (module docstring).
      batch_size: images per attack call.
      seed: seed of a named attack's randomness.

    Returns:
      float32 images of ``x``'s shape in ``input_range``: ``x + delta * (hi - lo)``, with
      ``delta`` inside the eps-ball ([0, 1] units). Not rounded to the input's dtype: rounding
      would change the perturbation.
    """
    import numpy as np

    lo, hi = _check_input_range(input_range)
    _check_count("batch_size", batch_size)
    if isinstance(attack, str):
        if eps is None:
            raise ValueError(f"eps is required with attack={attack!r} (a radius in [0, 1] units, "
                             f"a fraction of input_range).")
        threat = _check_threat(eps, norm)
        (_, chosen), = _attacks([attack], threat, seed).items()
    else:
        if eps is not None:
            raise ValueError("eps: an attack object carries its own eps and norm; leave eps "
                             "unset (or pass the attack by name).")
        (_, chosen), = _attacks({"attack": attack}, None, seed).items()
    model = _load(model)
    images, labels, single = _examples(model, x, y, None)
    _check_images(images, lo, hi, "tfadv.attack")
    unit = _to_unit(images, lo, hi)
    wrapped = in_unit_range(model, (lo, hi), unit.shape[1:])
    adversarial = np.concatenate([
        np.asarray(chosen(wrapped, unit[i:i + batch_size], labels[i:i + batch_size]), "float32")
        for i in range(0, len(labels), batch_size)])
    out = images.astype("float32") + (adversarial - unit) * np.float32(hi - lo)
    out = np.clip(out, lo, hi).astype("float32")
    return out[0] if single else out


# --- what bin/evaluate takes from a run -----------------------------------------------------------
def _literal(text, macros, depth=0):
    """The Python value of a gin value text (``'digits'``, ``[0, 1]``, ``0.3``, ``%EPSILON``), or
    ``None`` when it is not a literal (a ``@reference``)."""
    text = text.strip()
    if text.startswith("%") and depth < 5:
        return _literal(macros.get(text[1:], ""), macros, depth + 1)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _norm_text(value):
    key = value.lower() if isinstance(value, str) else value
    return {"linf": "linf", "inf": "linf", "l2": "l2", 2: "l2"}.get(key)


DATASET_PARAMETERS = ("name", "classes", "validation_size", "data_dir")
# How your own data (npz, folder, tfds:NAME) was split: taken from the run for those only.
OWN_DATA_PARAMETERS = ("train_split", "test_split", "test_fraction", "split_seed")


def _own_data(name):
    """Whether a ``load_dataset.name`` is your own data (`tfadv.data.dataset_kind`'s rules,
    without importing TensorFlow)."""
    return isinstance(name, str) and (":" in name or name.endswith(".npz") or "/" in name
                                      or os.sep in name)


def find_run_dir(model_path):
    """The `bin/train` run directory ``model_path`` belongs to, or ``None``: the directory
    itself when it holds ``model.keras``, the directory of a ``.keras`` file
    (``<run>/model_last.keras``), or the parent or grandparent of a SavedModel
    (``<run>/serving``, ``<run>/serving/1``). It must hold the run's ``config.gin`` or
    ``run.json``."""
    from tfadv import rundir

    path = os.path.abspath(os.fspath(model_path))
    if os.path.isdir(path) and os.path.exists(rundir.path(path, rundir.MODEL)):
        candidates = [path]
    elif path.endswith(".keras"):
        candidates = [os.path.dirname(path)]
    else:
        candidates = [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
    for candidate in candidates:
        if rundir.is_run_dir(candidate) and any(
                os.path.exists(rundir.path(candidate, name)) for name in (rundir.CONFIG,
                                                                         rundir.RUN)):
            return candidate
    return None


def run_settings(model_path):
    """What `bin/evaluate` takes from the run ``model_path`` belongs to (`find_run_dir`), as
    bound in its ``config.gin`` (else the bindings in ``run.json``); ``None`` outside a run.

    Returns a dict: ``run_dir``; ``source`` (the file read); ``dataset``, the
    ``load_dataset`` bindings among `DATASET_PARAMETERS` (name, classes, validation_size,
    data_dir); ``eps`` and ``norm`` of the final evaluation's threat model: those of the first
    attack in ``train.eval_attacks`` with an ``eps`` bound, or ``norm='patch'`` and eps = the
    ``size`` bound to a patch attack (``None`` when none is)."""
    from tfadv import rundir

    run_dir = find_run_dir(model_path)
    if run_dir is None:
        return None
    config = rundir.path(run_dir, rundir.CONFIG)
    if os.path.exists(config):
        with open(config) as f:
            text, source = f.read(), config
    else:
        source = rundir.path(run_dir, rundir.RUN)
        try:
            text = str(rundir.read_json(source).get("bindings", ""))
        except (OSError, ValueError, AttributeError):
            text = ""
    bindings = rundir.parse_bindings(text)
    macros = {k: v for k, v in bindings.items() if "." not in k and "/" not in k}
    dataset = {}
    for parameter in DATASET_PARAMETERS:
        key = f"load_dataset.{parameter}"
        if key in bindings:
            dataset[parameter] = _literal(bindings[key], macros)
    if _own_data(dataset.get("name")):
        for parameter in OWN_DATA_PARAMETERS:
            key = f"load_dataset.{parameter}"
            if key in bindings:
                dataset[parameter] = _literal(bindings[key], macros)
    eps = norm = None
    for reference in re.findall(r"@([\w./]+)\(\)", bindings.get("train.eval_attacks", "")):
        short = reference.rsplit("/", 1)[-1].rsplit(".", 1)[-1]

        def bound(parameter, reference=reference, short=short):
            for key in (f"{reference}.{parameter}", f"{short}.{parameter}"):
                if key in bindings:
                    return _literal(bindings[key], macros)
            return None

        value = bound("eps")
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            eps, norm = float(value), _norm_text(bound("norm") or "linf")
            break
        side = bound("size")  # a patch attack (tfadv.attacks.patch): eps is the patch side
        if "patch" in short.lower() and isinstance(side, int) and not isinstance(side, bool):
            eps, norm = side, "patch"
            break
    return {"run_dir": run_dir, "source": source, "dataset": dataset, "eps": eps, "norm": norm}
