"""One home for a classifier on disk: the run directory of `bin/train`, its files, and loading a
classifier from a run directory, a ``.keras`` file or a SavedModel.

The run-directory contract (BUILD.md, "Reliability"). A ``model_dir`` holds one run:

- ``run.json``: the run's identity, written when it starts: the gin bindings it was started with
  (``gin.config_str()``), seed, tfadv/TF versions, creation time, and how often it was resumed.
- ``config.gin``: the operative gin configuration (for people and TensorBoard).
- ``checkpoints/``: ``ckpt-<epoch>`` TF checkpoints, each committed by its manifest
  ``ckpt-<epoch>.json`` (file sizes and SHA-256, and the run's state after that epoch: history,
  training seconds, callback state). See `tfadv.checkpoint`.
- ``tensorboard/``, ``best.keras`` (early stopping), and when the run has finished:
  ``model.keras``, ``model_last.keras``, ``report.json`` (its presence means *finished*),
  ``eval.json`` and plots, ``serving/<version>/`` (the SavedModel export).
- ``previous/<UTC time>/``: earlier runs and earlier reports, moved aside, never deleted.
- ``lock``: the pid of the one process writing the directory.

Rules: a finished run is never overwritten (a rerun refuses; ``restart`` moves the old run to
``previous/``; ``extend`` moves only the old report and models there and trains on); a resumed
run must have the bindings it was started with (`config_diff`); one writer at a time
(`RunLock`); every file is written atomically (`atomic_file`) with the mode the umask gives.
"""

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import zipfile

from tfadv.faults import failpoint

# --- the layout ----------------------------------------------------------------------------------
RUN = "run.json"
CONFIG = "config.gin"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
MODEL = "model.keras"
MODEL_LAST = "model_last.keras"
BEST = "best.keras"
REPORT = "report.json"
EVAL = "eval.json"
SERVING = "serving"
PREVIOUS = "previous"
LOCK = "lock"
# Outputs of a finished run: what `extend` moves aside before training on.
FINISHED_OUTPUTS = (REPORT, EVAL, MODEL, MODEL_LAST, "robustness_curve.png", "examples.png",
                    "catastrophic_overfitting.json")


def path(model_dir, *names):
    """The path of a file of the run-directory layout, e.g. ``path(d, rundir.MODEL)``."""
    return os.path.join(os.fspath(model_dir), *names)


def is_run_dir(directory):
    """Whether ``directory`` holds a `bin/train` run, started or finished: it has a
    ``run.json``, a ``model.keras`` or a ``checkpoints/``."""
    return os.path.isdir(directory) and (os.path.exists(path(directory, RUN))
                                         or os.path.exists(path(directory, MODEL))
                                         or os.path.isdir(path(directory, CHECKPOINTS)))


def is_finished(model_dir):
    """Whether the run in ``model_dir`` has finished: its ``report.json`` exists."""
    return os.path.exists(path(model_dir, REPORT))


def read_json(file):
    """The parsed content of the JSON file ``file``. Raises OSError when it cannot be read and
    ValueError (`json.JSONDecodeError`) when it is not valid JSON (e.g. truncated)."""
    with open(file) as f:
        return json.load(f)


# --- atomic writes -------------------------------------------------------------------------------
def _file_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(target):
    """Yields a temporary path beside ``target``; when the block succeeds it gets the mode the
    umask gives (0644 by default; `tempfile` would leave 0600) and is renamed onto ``target``;
    when it raises, the temporary file is removed and ``target`` is untouched. tfadv's one way to
    write a file."""
    target = os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(target)
    stem, ext = os.path.splitext(base)
    # The extension stays last: some writers (Keras, NumPy, matplotlib) go by it.
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{stem}{ext}")
    try:
        yield tmp
        failpoint("write:" + base)
        if os.path.isfile(tmp):
            os.chmod(tmp, _file_mode())
        os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(target, text):
    """Writes ``text`` to ``target`` atomically (`atomic_file`)."""
    with atomic_file(target) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(target, obj):
    """Writes ``obj`` as JSON (indented by 2, with a final newline) to ``target`` atomically
    (`atomic_write_text`)."""
    atomic_write_text(target, json.dumps(obj, indent=2) + "\n")


def atomic_save_model(model, target):
    """``model.save(target)`` (a ``.keras`` file) atomically."""
    with atomic_file(target) as tmp:
        model.save(tmp)


def remove_stale_temporaries(directory):
    """Removes what an interrupted atomic write leaves behind (``.tmp-*`` files and directories
    of this module, TF's ``*_temp`` checkpoint directories) under ``directory``; returns them."""
    removed = []
    for root, dirs, files in os.walk(directory):
        for name in list(dirs):
            if name.startswith(".tmp-") or name.endswith("_temp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(os.path.join(root, name))
                dirs.remove(name)
        for name in files:
            if name.startswith(".tmp-"):
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


# --- one writer ----------------------------------------------------------------------------------
def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a model_dir: the file ``lock`` holding the owner's pid and host.

    `acquire` creates it with O_EXCL. A lock whose process no longer exists (same host) is stale:
    it is taken over with one warning line. A live owner makes `acquire` raise a `UserError`."""

    def __init__(self, model_dir):
        self.model_dir = os.fspath(model_dir)
        self.file = path(model_dir, LOCK)
        self.held = False

    def _create(self):
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": now_iso()}, f)

    def acquire(self):
        """Takes the lock (creating ``model_dir`` if needed) and returns ``self``. A stale lock
        (its process is gone, same host) is taken over with one warning line on stderr.

        Raises:
          UserError: the lock is held by a live process of this host, by this process
            already, or by a process of another host (whose liveness cannot be checked).
        """
        from tfadv.cli import UserError

        os.makedirs(self.model_dir, exist_ok=True)
        for _ in range(2):
            try:
                self._create()
                self.held = True
                return self
            except FileExistsError:
                pass
            try:
                owner = read_json(self.file)
            except (OSError, ValueError):
                owner = {}  # half-written by a process killed right then: stale
            pid, host = owner.get("pid"), owner.get("host")
            if pid == os.getpid() and host == socket.gethostname():
                raise UserError(f"model_dir {self.model_dir} is already locked by this process.")
            if isinstance(pid, int) and host == socket.gethostname() and _alive(pid):
                raise UserError(
                    f"model_dir {self.model_dir} is in use by process {pid} (since "
                    f"{owner.get('since', '?')}): one run writes a model_dir at a time.",
                    hint="wait for it to finish, or choose another --model_dir.")
            if host not in (None, socket.gethostname()):
                raise UserError(
                    f"model_dir {self.model_dir} is locked by process {pid} on host {host}.",
                    hint=f"if that process is gone, remove {self.file}.")
            print(f"tfadv: warning: taking over the stale lock of process {pid} (no longer "
                  f"running) on {self.model_dir}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file)
        raise UserError(f"could not lock model_dir {self.model_dir}.")

    def release(self):
        """Removes the lock file if this object holds the lock; does nothing otherwise, so it
        is safe to call twice."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file)
            self.held = False

    def __enter__(self):
        return self if self.held else self.acquire()

    def __exit__(self, *exc):
        self.release()


def now_iso():
    """The current UTC time as ISO 8601 to the second, e.g. ``2026-12-02T16:08:00Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aside_dir(model_dir):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path(model_dir, PREVIOUS, stamp)
    n = 1
    while os.path.exists(target):
        n += 1
        target = path(model_dir, PREVIOUS, f"{stamp}-{n}")
    os.makedirs(target)
    return target


def move_aside(model_dir, names=None):
    """Moves ``names`` (default: everything but ``previous/`` and the lock) of ``model_dir`` to a
    new ``previous/<UTC time>/``; returns that directory. Nothing is deleted."""
    names = [n for n in (os.listdir(model_dir) if names is None else names)
             if n not in (PREVIOUS, LOCK) and os.path.exists(path(model_dir, n))]
    target = _aside_dir(model_dir)
    for name in names:
        os.replace(path(model_dir, name), os.path.join(target, name))
    return target


# --- the run's identity and its configuration -----------------------------------------------------
def parse_bindings(config_text):
    """``{'scope/configurable.parameter': 'value text'}`` from gin's config string (macros as
    ``'%NAME'`` keys); continuation lines are joined, comments and imports dropped."""
    bindings, key = {}, None
    for line in config_text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("import "):
            continue
        if line[:1] in (" ", "\t") and key is not None:  # continuation of a multi-line value
            bindings[key] += " " + stripped
            continue
        name, sep, value = stripped.partition("=")
        if sep:
            key = name.strip()
            bindings[key] = value.strip()
    return {k: " ".join(v.split()) for k, v in bindings.items()}


def config_diff(old_text, new_text, ignore=()):
    """The bindings that differ between two gin config strings, as ``[(name, old, new)]``
    (``None`` for a binding one side lacks), skipping the names in ``ignore``."""
    old, new = parse_bindings(old_text), parse_bindings(new_text)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def format_diff(diff, limit=4):
    """A `config_diff` result ``[(name, old, new)]`` as one line for an error message:
    ``name: old in the run, new now`` for the first ``limit`` bindings, joined by ``; ``, then
    ``; and N more``; ``(unset)`` stands for a binding one side lacks."""
    shown = "; ".join(f"{k}: {o if o is not None else '(unset)'} in the run, "
                      f"{n if n is not None else '(unset)'} now" for k, o, n in diff[:limit])
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return shown + more


# --- loading a classifier ------------------------------------------------------------------------
def latest_version_dir(export_dir):
    """The highest ``<version>/`` holding a ``saved_model.pb`` in a TF Serving base directory
    ``export_dir`` (the one TF Serving would serve), or ``None`` when there is none."""
    for version in reversed(numeric_versions(export_dir)):
        candidate = os.path.join(export_dir, str(version))
        if os.path.exists(os.path.join(candidate, "saved_model.pb")):
            return candidate
    return None


def numeric_versions(export_dir):
    """The integer version subdirectories of a TF Serving base directory, ascending."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(name) for name in os.listdir(export_dir)
                  if name.isdigit() and os.path.isdir(os.path.join(export_dir, name)))


def resolve_model_path(model_path, name="model"):
    """The file or directory a classifier is read from, for a run directory (its
    ``model.keras``), a ``.keras`` file, a SavedModel, or a TF Serving base directory (its
    highest version; also a run directory's ``serving/``). Raises a `UserError` naming ``name``
    (e.g. ``--model``) when there is nothing to load."""
    from tfadv.cli import UserError

    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
        raise UserError(f"{name} {model_path} does not exist.")
    if os.path.isdir(model_path):
        if os.path.exists(path(model_path, MODEL)):
            return path(model_path, MODEL)
        if os.path.exists(os.path.join(model_path, "saved_model.pb")):
            return model_path
        latest = latest_version_dir(model_path)
        if latest is not None:
            return latest
        if is_run_dir(model_path):
            raise UserError(f"{name} {model_path} is a bin/train model_dir whose run has not "
                            f"finished (no {MODEL}).",
                            hint=f"resume it: bin/train --model_dir={model_path} with its gin "
                                 f"files.")
    elif model_path.endswith(".keras"):
        return model_path
    raise UserError(f"{model_path} is not a SavedModel, a .keras file or a bin/train model_dir.")


def load_classifier(model_path, name="model"):
    """Loads a classifier from a `bin/train` model_dir, a ``.keras`` file or a SavedModel.

    A SavedModel is wrapped in a Keras model calling its ``serving_default`` signature; when the
    signature returns several outputs, the one named ``logits`` is used. A TF Serving base
    directory (``model_name/<version>/``, as `tfadv.export` writes) means its highest version.
    A missing, truncated or corrupt file raises a `UserError` saying which."""
    import keras
    import tensorflow as tf

    # Registers tfadv's layers and models for keras.models.load_model: the heads, the patch
    # pre-processing layers and the de-randomized smoothing model.
    from tfadv import heads  # noqa: F401
    from tfadv import preprocessing  # noqa: F401
    from tfadv.certify import derandomized  # noqa: F401
    from tfadv.cli import UserError

    resolved = resolve_model_path(model_path, name)
    if resolved.endswith(".keras"):
        if not zipfile.is_zipfile(resolved):
            raise UserError(f"{resolved} is not a valid .keras file (truncated or corrupt: not a "
                            f"zip archive).")
        try:
            return keras.models.load_model(resolved)
        except Exception as err:  # noqa: BLE001  (any failure here is the file's)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"{resolved} is not a valid .keras file ({type(err).__name__}: "
                            f"{first[:200]}).") from err
    try:
        loaded = tf.saved_model.load(resolved)
        signature = loaded.signatures["serving_default"]
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{resolved} is not a valid SavedModel ({type(err).__name__}: "
                        f"{first[:200]}).") from err
    (input_name, spec), = signature.structured_input_signature[1].items()
    outputs = signature.structured_outputs
    key = "logits" if "logits" in outputs else next(iter(outputs))
    # tfadv exports also hold the classifier without serving_default's input checks (randomized
    # smoothing's noise and a normal-start PGD leave [0, 1] on purpose); other SavedModels: the
    # signature.
    endpoint = ("classify_unchecked" if hasattr(loaded, "classify_unchecked")
                else "serving_default")
    layer = keras.layers.TFSMLayer(resolved, call_endpoint=endpoint)
    inputs = keras.Input(spec.shape[1:], name=input_name)
    out = layer(inputs)
    out = out[key] if isinstance(out, dict) else out
    return keras.Model(inputs, out, name=os.path.basename(os.path.normpath(resolved)))


def check_logits_model(model, image_shape=None):
    """Raises ValueError unless ``model`` maps (batch, H, W, C) images to (batch, classes)."""
    out = getattr(model, "output_shape", None)
    if out is not None and (not isinstance(out, tuple) or len(out) != 2):
        raise ValueError(f"model must output (batch, num_classes) logits; got shape {out}.")
    inp = getattr(model, "input_shape", None)
    if image_shape is not None and isinstance(inp, tuple) and tuple(inp[1:]) != tuple(
            image_shape):
        raise ValueError(
            f"dataset images have shape {tuple(image_shape)} but the model expects "
            f"{tuple(inp[1:])}.")


def looks_like_probabilities(outputs):
    """True when every row is non-negative and sums to 1: a softmax output, not logits."""
    import numpy as np

    outputs = np.asarray(outputs, dtype="float64")
    return bool(outputs.size and outputs.min() >= 0.0 and outputs.max() <= 1.0
                and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-4))
