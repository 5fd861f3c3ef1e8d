"""gin plumbing: external configurables, config-file search path and parsing.

Keras 3 optimizers are not registered with gin; they are registered here once, under the module
``keras.optimizers`` (so gin files say ``@keras.optimizers.SGD``).
"""

import difflib
import logging
import os

import gin
import keras

from tfadv import _launch

# The configurations: the checkout's gin/, or the installed package data tfadv/gin/.
GIN_DIR = _launch.resource_dir("gin")

for _cls in (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW):
    try:
        gin.external_configurable(_cls, module="keras.optimizers")
    except ValueError:  # already registered (module imported twice under another name)
        pass


_SEARCH_PATH_ADDED = False


def _import_configurables():
    # Importing registers every @gin.configurable of the library.
    import tfadv.attacks  # noqa: F401
    import tfadv.certify  # noqa: F401
    import tfadv.data  # noqa: F401
    import tfadv.defenses  # noqa: F401
    import tfadv.distribute  # noqa: F401
    import tfadv.evaluation  # noqa: F401
    import tfadv.heads  # noqa: F401
    import tfadv.models  # noqa: F401
    import tfadv.pseudo_label  # noqa: F401
    import tfadv.schedules  # noqa: F401
    import tfadv.train  # noqa: F401


def resolve_gin_file(name):
    """A path as given if it exists, else the file of that name in `GIN_DIR` (``'awp'``,
    ``'awp.gin'``, ``'paper/madry_cifar10.gin'``), in a checkout and installed alike."""
    if os.path.exists(name):
        return name
    candidate = os.path.join(GIN_DIR, name)
    if os.path.exists(candidate):
        return candidate
    if not name.endswith(".gin") and os.path.exists(candidate + ".gin"):
        return candidate + ".gin"
    available = sorted(f for f in os.listdir(GIN_DIR) if f.endswith(".gin"))
    err = FileNotFoundError(f"gin file {name!r} not found as a path or in {GIN_DIR}; "
                            f"available: {', '.join(available)}.")
    close = difflib.get_close_matches(os.path.basename(name), available, 1)
    err.hint = f"did you mean {close[0]}?" if close else None  # shown by tfadv.cli
    raise err


def parse(gin_files=(), bindings=(), finalize=True):
    """Clears gin, then parses ``gin_files`` (bare names resolve in `GIN_DIR`) and
    ``bindings``. Unknown parameters raise, naming the file and line."""
    _import_configurables()
    gin.clear_config()
    global _SEARCH_PATH_ADDED
    if not _SEARCH_PATH_ADDED:  # so that `include 'datasets/digits.gin'` resolves in GIN_DIR
        gin.add_config_file_search_path(GIN_DIR)
        _SEARCH_PATH_ADDED = True
    files = [resolve_gin_file(f) for f in gin_files]
    root = logging.getLogger()
    root.addFilter(_quiet_include_probe)
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), skip_unknown=False,
                                            finalize_config=finalize)
    finally:
        root.removeFilter(_quiet_include_probe)
    return files


def _quiet_include_probe(record):
    # gin first looks for an include relative to the working directory and logs an ERROR
    # ("Path not found") before finding it in GIN_DIR: noise, not an error.
    return "Path not found" not in record.getMessage()
