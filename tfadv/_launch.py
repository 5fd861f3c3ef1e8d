"""Start-up of the command-line tools: the right interpreter, and where gin/ and bin/ are.

The `bin/` scripts start with ``#!/usr/bin/env python3``, which is often a Python without
TensorFlow (the system's) right after the README's first command created ``.venv``. Their first
lines put the checkout on ``sys.path`` and call `ensure_environment`, which re-runs the script
with the checkout's ``.venv/bin/python`` when TensorFlow is missing, so ``bin/train ...`` works
from a fresh shell without activating the virtualenv.

`resource_dir` finds the gin configurations and the scripts: installed as package data
(``tfadv/gin``, ``tfadv/bin``: see pyproject.toml) or, in a checkout and an editable install,
beside the package (``<checkout>/gin``, ``<checkout>/bin``).

Standard library only: this module runs before anything else is known to be importable.
"""

import importlib.resources
import importlib.util
import os
import sys

ERROR_PREFIX = "tfadv: error: "  # as tfadv.cli's (which needs absl, maybe missing here)
EXIT_CODE = 2
VENV_PYTHON = os.path.join(".venv", "bin", "python")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def resource_dir(name):
    """The directory ``name`` (``'gin'`` or ``'bin'``): the installed package data
    ``tfadv/<name>`` when it exists, else ``<checkout>/<name>`` beside the package.

    The package data comes first: installed into site-packages, the directory beside the package
    would be site-packages' (``site-packages/gin`` is gin-config itself)."""
    installed = importlib.resources.files("tfadv").joinpath(name)
    if installed.is_dir():
        return os.fspath(installed)
    return os.path.join(os.path.dirname(_PACKAGE_DIR), name)


def _is_running_interpreter(python):
    """Whether ``python`` (a virtualenv's interpreter) is the one running, or its environment
    is this process's (``python3`` and ``python`` of one venv are the same environment)."""
    if sys.executable and os.path.abspath(sys.executable) == os.path.abspath(python):
        return True
    venv = os.path.dirname(os.path.dirname(python))
    return os.path.realpath(sys.prefix) == os.path.realpath(venv)


def ensure_environment(script, repo=None):
    """Makes sure TensorFlow can be imported before ``script`` (a `bin/` tool) goes on.

    When TensorFlow is installed for the running interpreter, returns at once (nothing is
    imported). Otherwise, when ``<repo>/.venv/bin/python`` exists and is not the running
    interpreter, replaces this process by that interpreter running ``script`` with the same
    arguments (`os.execv`: same pid, stdin/stdout/stderr and exit status). Otherwise prints one
    ``tfadv: error:`` line naming the interpreter and the fix, and exits with status 2.

    Args:
      script: path of the running script (its ``__file__``).
      repo: the checkout holding ``.venv``; default: the parent of the script's directory.
    """
    if importlib.util.find_spec("tensorflow") is not None:
        return
    script = os.path.realpath(script)
    repo = repo or os.path.dirname(os.path.dirname(script))
    python = os.path.join(repo, VENV_PYTHON)
    if os.access(python, os.X_OK) and not _is_running_interpreter(python):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(python, [python, script, *sys.argv[1:]])
    print(f"{ERROR_PREFIX}TensorFlow is not installed for {sys.executable}; run the README's "
          "first command (python3 -m venv .venv && .venv/bin/pip install -r requirements.txt "
          "-e .) or activate your environment", file=sys.stderr)
    sys.exit(EXIT_CODE)
