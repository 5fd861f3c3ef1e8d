"""User errors of the `bin/` tools: one line ``tfadv: error: ...`` and exit status 2.

A `bin/` script runs its ``main`` with `run` instead of ``absl.app.run``. A user error (a bad
flag, a bad gin binding or file, a missing or corrupt input file) then prints exactly::

    tfadv: error: <what is wrong: the flag or parameter, its allowed values, the value given>
    tfadv: hint: <what to do>         (only when there is something useful to say)

on stderr and exits with status 2; ``--debug`` shows the full traceback instead. Which errors are
the user's depends on the phase (`setup_done`):

- during setup (flags parsed, gin configuration parsed, data, model and attacks built), every
  `UserError`, flag error, ``absl.app.UsageError``, gin error (a gin ``SyntaxError``, a
  ``KeyError`` raised by gin), ``ValueError``, ``TypeError``, ``FileNotFoundError``,
  ``NotADirectoryError`` and ``IsADirectoryError``: the library checks its arguments there;
- once the real work has started (training, attacking, writing), only a `UserError`: anything
  else is a bug and keeps its traceback.

Library code raises `UserError` (or a subclass) for errors that are the user's at any time;
any exception with a ``hint`` attribute contributes the hint line. gin's multi-line messages
(``In call to configurable ...``, ``In file "...", line N`` and the binding) are squashed into
the one line, keeping the configurable, the file and line and the binding.

This module imports only absl (no TensorFlow), so flag errors are reported in a fraction of a
second.
"""

import ast
import inspect
import os
import re
import sys

from absl import app, flags

EXIT_CODE = 2
ERROR_PREFIX = "tfadv: error: "
HINT_PREFIX = "tfadv: hint: "

_SETUP_DONE = False


class UserError(Exception):
    """An error that is the user's: `run` prints ``tfadv: error: <message>`` (and
    ``tfadv: hint: <hint>`` when given) and exits with status `exit_code`, in any phase.

    (``hint`` is an instance attribute on purpose: gin re-raises errors from configurables as a
    proxy that forwards missing attributes to the original exception.)"""

    exit_code = EXIT_CODE

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def setup_done():
    """Marks the end of the setup phase: from now on only a `UserError` is reported as the
    user's; any other exception is a bug and keeps its traceback."""
    global _SETUP_DONE
    _SETUP_DONE = True


def reset():
    """Back to the setup phase (for tests)."""
    global _SETUP_DONE
    _SETUP_DONE = False


def in_setup():
    """Whether `setup_done` has not been called yet."""
    return not _SETUP_DONE


# --- which errors are the user's ----------------------------------------------------------------
_SETUP_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _gin_frames(err):
    """(function name, is innermost) of every frame of ``err``'s traceback in the gin package."""
    gin = sys.modules.get("gin")
    if gin is None:
        return []
    gin_dir = os.path.dirname(os.path.abspath(gin.__file__)) + os.sep
    frames = []
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if os.path.abspath(code.co_filename).startswith(gin_dir):
            frames.append((code.co_name, tb.tb_next is None))
        tb = tb.tb_next
    return frames


# gin's entry points that parse configuration text (errors under them are the configuration's).
_GIN_PARSING = {"parse_config", "parse_config_file", "parse_config_files_and_bindings",
                "parse_value", "bind_parameter", "finalize"}


def _from_gin(err):
    """Whether ``err`` is gin's: raised by gin itself (innermost frame in gin) or while gin
    parsed a file or binding (a syntax error, an unknown configurable, an include or import
    that fails)."""
    frames = _gin_frames(err)
    return any(innermost for _, innermost in frames) or any(
        name in _GIN_PARSING for name, _ in frames)


def is_user_error(err):
    """Whether `run` reports ``err`` as the user's (module docstring) in the current phase."""
    if isinstance(err, UserError):
        return True
    if _SETUP_DONE:
        return False
    return isinstance(err, (app.UsageError, flags.Error) + _SETUP_ERRORS) or _from_gin(err)


# --- one line per error -------------------------------------------------------------------------
_CONFIGURABLE = re.compile(r"^\s*In call to configurable '([^']+)' \(.*?\)"
                           r"(?: in scope '([^']*)')?\s*$")
_LOCATION = re.compile(r"^\s*In (?:file \"(?P<file>.*)\",|bindings string) line (?P<line>\d+)"
                       r"\s*$")
_GIN_DETAILS = re.compile(r"^\s*(No values supplied by Gin|Gin had values bound for|"
                          r"Caller supplied values for)")


def _base_message(err):
    import tokenize

    if isinstance(err, SyntaxError) and err.msg is not None:
        # gin: SyntaxError(msg, (filename, line, column, text)).
        if err.filename in (None, "<string>", ""):
            where = f"bindings string line {err.lineno}"
        else:
            where = f"{err.filename}, line {err.lineno}"
        text = (err.text or "").strip()
        return f"gin syntax error: {err.msg.rstrip('.')} ({where}{': ' + text if text else ''})."
    if isinstance(err, tokenize.TokenError):  # gin's tokenizer: an unclosed bracket or string
        what = err.args[0] if err.args else str(err)
        return f"gin syntax error: {what} (an unclosed bracket, brace or string in a binding)."
    message = str(err)
    if isinstance(err, KeyError):
        first, _, rest = message.partition("\n")
        try:
            key = ast.literal_eval(first)
        except (ValueError, SyntaxError):
            key = first
        message = (key if isinstance(key, str) else repr(key)) + (
            "\n" + rest if rest else "")
    if isinstance(err, OSError) and err.filename and message.startswith("[Errno"):
        message = f"{err.filename}: {err.strerror}."
    # gin's unbound macro error appends the whole operative configuration.
    macro = re.match(r"No bindings specified for '(?:(.+)/)?gin\.macro' in config string:",
                     message)
    if macro:
        name = macro.group(1)
        message = f"gin macro %{name} is used but never bound (bind it: {name} = ...)."
    return message


def _configurable(name):
    try:
        import gin.config

        return gin.config._REGISTRY.get_match(name)  # noqa: SLF001
    except Exception:  # noqa: BLE001  (only a nicer message is at stake)
        return None


def _parameters(configurable):
    """The parameter names gin may bind of a registered configurable (empty if unknown)."""
    entry = _configurable(configurable)
    if entry is None:
        return set()
    fn = entry.wrapped.__init__ if inspect.isclass(entry.wrapped) else entry.wrapped
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - {"self"} - set(entry.denylist or ()) if not entry.allowlist else (
        names & set(entry.allowlist))


def _gin_hint(message):
    """A hint for gin's unknown-configurable and unknown-parameter errors: the close names."""
    import difflib

    unknown = re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'",
                       message)
    if unknown:
        name, param = unknown.groups()
        params = sorted(_parameters(name))
        if not params:
            return None
        close = difflib.get_close_matches(param, params, 1)
        return (f"did you mean {name}.{close[0]}? " if close else "") + (
            f"parameters of {name}: {', '.join(params)}.")
    missing = re.match(r"No configurable matching (?:reference )?'@?([^'(]+)", message)
    if missing:
        try:
            import gin.config

            names = sorted({entry.name for _, entry in gin.config._REGISTRY.items()})  # noqa
        except Exception:  # noqa: BLE001
            return None
        wanted = missing.group(1).split("/")[-1]
        close = difflib.get_close_matches(wanted, names, 1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]}?"
    return None


def squash(message):
    """One line from a possibly multi-line (gin) error message: the message, the innermost
    configurable it was raised in (``scope/name.parameter`` when the message starts with one of
    its parameters), and the gin file/line and binding it came from."""
    main, configurables, locations = [], [], []
    lines = message.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        conf, loc = _CONFIGURABLE.match(line), _LOCATION.match(line)
        if conf:
            name = conf.group(1)
            configurables.append(f"{conf.group(2)}/{name}" if conf.group(2) else name)
        elif loc:
            binding = lines[i + 1].strip() if i + 1 < len(lines) else ""
            i += 1
            if i + 1 < len(lines) and lines[i + 1].strip() == "^":  # gin's column marker
                i += 1
            where = (f"{loc.group('file')}, line {loc.group('line')}" if loc.group("file")
                     else f"bindings string line {loc.group('line')}")
            locations.append(f"{where}: {binding}" if binding else where)
        elif _GIN_DETAILS.match(line):
            main.append(line.strip() + ";")
        elif line.strip() and line.strip() != "^":
            main.append(line.strip())
        i += 1
    text = " ".join(main).strip()
    if text.endswith((";", ",", ":")):  # a hint cut off the end of the message
        text = text[:-1].rstrip() + "."
    if configurables:
        inner = configurables[0]
        name = inner.split("/")[-1]
        first = re.match(r"[A-Za-z_]\w*", text)
        if (first and not text.startswith(name + ".") and not text.startswith(inner + ".")
                and first.group(0) in _parameters(name)):
            text = f"{inner}.{text}"
    if locations:
        text = f"{text.rstrip('.')} ({'; '.join(locations)})."
    return re.sub(r"\s+", " ", text).strip()


def describe(err):
    """``(message, hint)`` of a user error: the one-line message and an optional hint."""
    hint = getattr(err, "hint", None)
    message = _base_message(err)
    if hint and f" {hint}" in message:  # an error whose str() also carries its hint
        message = message.replace(f" {hint}", "", 1)
    if not hint and _gin_frames(err):
        hint = _gin_hint(message)
    return squash(message), (squash(str(hint)) if hint else None)


def _flag_choices(flag):
    values = getattr(getattr(flag, "parser", None), "enum_values", None)
    return list(values) if values else None


def describe_flag_error(err, argv):
    """``(message, hint)`` for an absl flag error raised while parsing ``argv``."""
    text = str(err).strip()
    script = os.path.basename(argv[0]) if argv else "this tool"
    if isinstance(err, flags.UnrecognizedFlagError):
        name = err.flagname
        suggestion = re.search(r"Did you mean: (.*?)\s*\?", text)
        message = f"unknown flag --{name}"
        if suggestion:
            names = [s.strip() for s in suggestion.group(1).split(",") if s.strip()]
            message += f"; did you mean {' or '.join('--' + n for n in names)}?"
        else:
            message += "."
        return message, f"bin/{script} --helpshort lists its flags."
    match = re.match(r"flag --(?P<name>[\w.-]+)=(?P<value>.*?): (?P<why>.*)$", text, re.S)
    if match and match.group("name") in flags.FLAGS:
        name, value, why = match.group("name", "value", "why")
        flag = flags.FLAGS[name]
        why = " ".join(why.split())
        if "must have a value other than None" in why:
            help_text = " ".join((flag.help or "").split()).rstrip(".")
            return (f"--{name} is required" + (f" ({help_text})." if help_text else "."), None)
        kind = flag.flag_type()
        choices = _flag_choices(flag)
        if choices:
            return f"--{name} must be one of {', '.join(choices)}; got {value!r}.", None
        if kind == "bool":
            return f"--{name} is a boolean flag (--{name}, --no{name}, --{name}=true|false); " \
                   f"got {value!r}.", None
        if kind in ("int", "integer", "float"):
            article = "an" if kind.startswith("i") else "a"
            return f"--{name} must be {article} {kind}; got {value!r}.", None
        return f"invalid value {value!r} for --{name}: {why}", None
    missing = re.match(r"Missing value for flag (--?)([\w.-]+)", text)
    if missing and missing.group(2) in flags.FLAGS:
        name = missing.group(2)
        help_text = " ".join((flags.FLAGS[name].help or "").split()).rstrip(".")
        return (f"--{name} needs a value (--{name}=...)"
                + (f": {help_text}." if help_text else "."), None)
    return " ".join(text.split()), None


def _print_error(message, hint=None):
    sys.stdout.flush()
    print(ERROR_PREFIX + message, file=sys.stderr)
    if hint:
        print(HINT_PREFIX + hint, file=sys.stderr)
    sys.stderr.flush()


# What TensorFlow prints to stderr while it starts on a machine without a GPU, whatever
# TF_CPP_MIN_LOG_LEVEL says: the CUDA stub, the failed cuInit, the CPU-feature notice.
_STARTUP_NOISE = re.compile(
    r"(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|[IWEF]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] .*|To enable the following "
    r"instructions: .*rebuild TensorFlow with the appropriate compiler flags\.)")


def import_tensorflow():
    """Imports TensorFlow (and initialises its devices) with its start-up log lines on stderr
    dropped (`_STARTUP_NOISE`; anything else it prints is passed on). The bin/ tools call it
    before their first TensorFlow work, unless ``--debug`` is on."""
    if "tensorflow" in sys.modules or (flags.FLAGS.is_parsed() and "debug" in flags.FLAGS
                                       and flags.FLAGS.debug):
        import tensorflow  # noqa: F401
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            rest = [line for line in captured.read().decode(errors="replace").splitlines()
                    if line.strip() and not _STARTUP_NOISE.fullmatch(line)]
            if rest:
                print("\n".join(rest), file=sys.stderr)


def _debug_requested(argv):
    """``--debug`` on the command line (before flags are parsed, or when parsing failed)."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("--debug", "-debug") or re.fullmatch(r"--?debug=(true|t|1|yes|y)", arg,
                                                        re.I):
            return True
    return False


def _define_debug():
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "print full tracebacks of errors.")
        try:  # listed by --helpshort with the script's own flags
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["debug"])
        except Exception:  # noqa: BLE001  (absl internals; only --helpshort is at stake)
            pass


def run(main, argv=None):
    """Runs ``main(argv)`` like ``absl.app.run`` (flags parsed first; ``sys.exit`` with its
    return value), reporting user errors (module docstring) as one line and exit status 2.
    Defines ``--debug`` (full tracebacks) if the script has not."""
    _define_debug()
    argv = list(sys.argv if argv is None else argv)
    debug = _debug_requested(argv)

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as err:
            if debug:
                raise
            _print_error(*describe_flag_error(err, args))
            sys.exit(EXIT_CODE)

    def guarded_main(args):
        try:
            return main(args)
        except Exception as err:  # noqa: BLE001  (classified below; bugs are re-raised)
            if not is_user_error(err):
                raise
            if flags.FLAGS["debug"].value:
                if isinstance(err, app.UsageError):  # absl would print usage, not a traceback
                    raise UserError(str(err)) from err
                raise
            _print_error(*describe(err))
            sys.exit(getattr(err, "exit_code", EXIT_CODE) if isinstance(err, UserError)
                     else EXIT_CODE)

    app.run(guarded_main, argv=argv, flags_parser=parse)
