"""The console commands: ``tfadv <command> [flags]`` and ``tfadv-<command> [flags]``.

Each command is a `bin/` script, taken from the checkout's ``bin/`` or from the installed package
data (`tfadv._launch.resource_dir`), and run in this process by `runpy.run_path` as
``__main__`` with ``sys.argv[0]`` the script's path: ``tfadv train --gin_file=awp.gin``,
``tfadv-train --gin_file=awp.gin`` and ``bin/train --gin_file=awp.gin`` are the same run.
``tfadv --help`` lists the commands, each with the first line of its script's docstring.

Standard library only until a script runs (``tfadv --help`` imports nothing else).
"""

import ast
import os
import re
import runpy
import sys

from tfadv import _launch

# Command names are the bin/ scripts' names; `tfadv pseudo-label` is accepted too.
COMMANDS = ("train", "evaluate", "export", "certify", "pseudo_label", "results")


def script_path(command):
    """The path of the `bin/` script of ``command`` (``-`` read as ``_``), or None when there
    is no such command or its script is missing."""
    command = command.replace("-", "_")
    if command not in COMMANDS:
        return None
    path = os.path.join(_launch.resource_dir("bin"), command)
    return path if os.path.isfile(path) else None


def summary(path):
    """The first line of the docstring of the script at ``path``, up to its first ``: ``
    (``'Train a robust classifier'``); ``''`` when it has none or does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read(), path))
    except (OSError, SyntaxError, ValueError):
        return ""
    first = (doc or "").strip().splitlines()[:1]
    return re.split(r":\s", first[0], maxsplit=1)[0].rstrip(".") if first else ""


def available():
    """``[(command, script path)]`` of the commands whose script exists, in `COMMANDS` order."""
    found = ((command, script_path(command)) for command in COMMANDS)
    return [(command, path) for command, path in found if path]


def usage():
    """The text of ``tfadv --help``: the synopsis and every available command."""
    from tfadv import __version__

    lines = ["usage: tfadv <command> [flags]   (the same as tfadv-<command> [flags] and "
             "bin/<command> [flags])", "", "commands:"]
    lines += [f"  {command:<14}{summary(path)}" for command, path in available()]
    lines += ["", "`tfadv <command> --help` lists a command's flags (`--helpfull`: all flags).",
              f"tfadv {__version__}"]
    return "\n".join(lines)


def _error(message):
    print(f"{_launch.ERROR_PREFIX}{message}", file=sys.stderr)
    return _launch.EXIT_CODE


def run(command, args):
    """Runs the script of ``command`` with the flags ``args`` as ``bin/<command> args...`` would
    (the script's own exit status ends the process through `SystemExit`); returns 0 when the
    script returns without exiting, 2 after one ``tfadv: error:`` line for an unknown command."""
    path = script_path(command)
    if path is None:
        names = ", ".join(name for name, _ in available())
        return _error(f"unknown command {command!r}; commands: {names} "
                      "(`tfadv --help` describes them).")
    saved = sys.argv
    sys.argv = [path, *args]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved
    return 0


def main(argv=None):
    """The ``tfadv`` command: ``tfadv <command> [flags]`` runs ``bin/<command> [flags]``;
    ``tfadv --help`` lists the commands, ``tfadv --version`` prints the version."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return _launch.EXIT_CODE
    if args[0] in ("-h", "--help", "-help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from tfadv import __version__

        print(f"tfadv {__version__}")
        return 0
    return run(args[0], args[1:])


def train():
    """The ``tfadv-train`` command: ``bin/train``."""
    return run("train", sys.argv[1:])


def evaluate():
    """The ``tfadv-evaluate`` command: ``bin/evaluate``."""
    return run("evaluate", sys.argv[1:])


def export():
    """The ``tfadv-export`` command: ``bin/export``."""
    return run("export", sys.argv[1:])


def certify():
    """The ``tfadv-certify`` command: ``bin/certify``."""
    return run("certify", sys.argv[1:])


def pseudo_label():
    """The ``tfadv-pseudo-label`` command: ``bin/pseudo_label``."""
    return run("pseudo_label", sys.argv[1:])


def results():
    """The ``tfadv-results`` command: ``bin/results``."""
    return run("results", sys.argv[1:])
