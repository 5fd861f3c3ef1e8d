"""Results over many runs: a leaderboard (Markdown or CSV) and a clean-vs-robust scatter plot,
read from the ``report.json`` of `bin/train` run directories (`bin/results`).

`collect` finds every ``report.json`` under the given paths (a finished run directory holds one;
``previous/`` holds superseded runs and is not searched) and makes one row per run; `to_markdown`,
`to_csv` and `scatter` present the rows. The rules are those of the headline (`tfadv.evaluation`):

- the robust accuracy of a run is its report's headline, the worst case per example over every
  attack with AutoAttack included, and its label says which AutoAttack (standard, rand, or the
  cheaper FAST screen);
- runs are ranked only against runs of the same threat model: the rows are grouped by
  (dataset, norm, eps) (`leaderboard`);
- a headline whose verdict is not ``reliable`` (a failed sanity check, or checks not run) is
  flagged with ``*`` and a footnote naming the failed checks, is not ranked and sorts below the
  reliable ones; a FAST headline (a weaker attack than the standard ensemble) is flagged ``†``
  and sorts below the standard ones. A masked model never passes as robust;
- certified numbers are shown where a run has them: IBP's verified accuracy (in the report, see
  `tfadv.defenses.base.Defense.certified_report`) and randomized smoothing's certified accuracy
  per L2 radius (``certify/certify.json`` of the run, written by `bin/certify`).

This module imports neither TensorFlow nor Keras (matplotlib only inside `scatter`), so
`bin/results` answers at once.
"""

import csv
import io
import json
import math
import os
import warnings

from tfadv import rundir
from tfadv.cli import UserError

SORTS = ("headline", "clean", "name", "time")
FORMATS = ("markdown", "csv")
PLOT_FORMATS = (".png", ".pdf", ".svg")
# bin/certify's output inside a run directory (its default --output_dir).
CERTIFY = os.path.join("certify", "certify.json")
# Directories of a run that hold no runs of their own (previous/: superseded runs).
_NOT_RUNS = {rundir.CHECKPOINTS, rundir.TENSORBOARD, rundir.PREVIOUS, rundir.SERVING, "certify",
             "eval_progress"}
_ATTACK_LABELS = {"standard": "AutoAttack (standard)", "rand": "AutoAttack (rand, EOT)",
                  "fast": "AutoAttack-FAST", None: "none"}
_LEFT = ("run", "defense", "model", "attack", "verdict")  # the other columns are numbers
UNRELIABLE_MARK = "*"
FAST_MARK = "\u2020"  # dagger


class ResultsWarning(UserWarning):
    """A report that `collect` skipped (truncated, corrupt, not a tfadv report), or runs that
    have not finished yet."""


def _warn(message):
    warnings.warn(message, ResultsWarning, stacklevel=3)


# --- finding and reading reports ---------------------------------------------------------------
def find_reports(paths):
    """The ``report.json`` files under ``paths`` (run directories, directories of runs, or
    report files), as a list of ``(name, file)``: the run's name is its directory relative to
    the path given (the directory's own name for a run directory given directly; for a report
    file, its directory's name, or the file's stem when it is not called report.json). A report
    reached through two paths is listed once. Also warns (`ResultsWarning`) about run
    directories under ``paths`` that have not finished (a ``run.json`` but no report yet).

    Raises:
      tfadv.cli.UserError: no paths, a path that does not exist, or a directory that holds no
        ``report.json`` (checked for every path before any report is read).
    """
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike))
                                    else paths)]
    if not paths:
        raise UserError("give at least one run directory, directory of runs or report.json "
                        "file, e.g. runs/.")
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"{p} does not exist.",
                            hint="give bin/train model_dirs, a directory holding them (e.g. "
                                 "runs/) or report.json files.")
    found, seen, unfinished = [], set(), []
    for p in paths:
        if os.path.isfile(p):
            stem = os.path.splitext(os.path.basename(p))[0]
            name = (stem if stem != os.path.splitext(rundir.REPORT)[0]
                    else _dir_name(os.path.dirname(os.path.abspath(p))))
            reports = [(name, p)]
        else:
            reports, waiting = _walk(p)
            unfinished += waiting
            if not reports:
                more = (f" ({len(waiting)} run(s) there have not finished yet: "
                        f"{', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''})"
                        if waiting else "")
                raise UserError(f"{p} holds no {rundir.REPORT}{more}.",
                                hint="give the model_dir of a finished bin/train run, a "
                                     "directory holding such runs, or a report.json file.")
        for name, file in reports:
            key = os.path.realpath(file)
            if key not in seen:
                seen.add(key)
                found.append((name, file))
    if unfinished:
        _warn(f"{len(unfinished)} run(s) have not finished (no {rundir.REPORT} yet) and are not "
              f"in the table: {', '.join(unfinished)}")
    return _unique_names(found)


def _dir_name(directory):
    return os.path.basename(os.path.normpath(os.path.abspath(directory))) or directory


def _walk(root):
    """``([(name, report file)], [unfinished run directories])`` under the directory root."""
    reports, unfinished = [], []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS and not d.startswith("."))
        relative = os.path.relpath(directory, root)
        name = _dir_name(root) if relative == os.curdir else relative
        if rundir.REPORT in files:
            reports.append((name, os.path.join(directory, rundir.REPORT)))
            dirs[:] = []  # a finished run: nothing below it is another run
        elif rundir.RUN in files:
            unfinished.append(directory)
    return reports, unfinished


def _unique_names(found):
    """Two runs of the same name (e.g. runs_a/pgd_at and runs_b/pgd_at) are named by their
    directories' paths instead."""
    counts = {}
    for name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    return [(os.path.relpath(os.path.dirname(os.path.abspath(file))) if counts[name] > 1
             else name, file) for name, file in found]


def read_report(file):
    """The report dict in ``file``, or ``None`` (with one `ResultsWarning` naming the file) when
    it is truncated, corrupt or not a tfadv report (no ``headline`` and ``clean_accuracy``)."""
    try:
        with open(file, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        _warn(f"skipping {file}: not a readable report ({type(err).__name__}: {reason}; "
              f"truncated or corrupt?)")
        return None
    if not (isinstance(report, dict) and isinstance(report.get("headline"), dict)
            and "clean_accuracy" in report):
        _warn(f"skipping {file}: not a tfadv report (no headline and clean_accuracy)")
        return None
    return report


def _read_certify(run_dir):
    """``(sigma, {L2 radius text: certified accuracy}, examples)`` from bin/certify's
    ``certify.json`` in a run directory, or ``None`` when there is none (or, with one warning,
    when it cannot be read)."""
    file = os.path.join(run_dir, CERTIFY)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            result = json.load(f)
        accuracy = {str(r): _number(a) for r, a in result["certified_accuracy"].items()
                    if math.isfinite(float(r))}
        return (_number(result.get("settings", {}).get("sigma")), accuracy,
                _number(result.get("num_examples")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        _warn(f"ignoring {file}: not a readable bin/certify result ({type(err).__name__}); the "
              f"run is listed without certified accuracy")
        return None


def _number(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def _checks_text(report, failed):
    """``{check name: its verdict}`` for the failed checks of a report."""
    verdicts = {c.get("name"): c.get("verdict", "") for c in report.get("sanity_checks") or []
                if isinstance(c, dict)}
    texts = {"no_autoattack": "no AutoAttack among the attacks of the headline"}
    return {name: verdicts.get(name) or texts.get(name, "") for name in failed}


def row_from_report(report, name, file):
    """One leaderboard row (a flat dict) from a report dict (the format `tfadv.train` writes):

    ``name``, ``report`` (the file), ``defense``, ``model``, ``dataset``, ``norm``, ``eps``,
    ``epochs``, ``selected_epoch`` (early stopping), ``clean_accuracy``, ``robust_accuracy``
    (the headline; ``None`` without any attack), ``autoattack`` (``standard``, ``rand``,
    ``fast`` or ``None``), ``attack`` (its label), ``verdict``, ``reliable`` (the verdict is
    exactly ``reliable``), ``failed_checks`` (``{name: verdict}``), ``num_examples``,
    ``train_seconds``, ``verified_accuracy`` and ``verified_eps`` (IBP), ``smoothing_sigma``,
    ``certified_accuracy`` (``{L2 radius text: accuracy}``, randomized smoothing; ``{}`` when
    none) and ``certified_examples``. Accuracies are fractions in [0, 1], as in the report.

    Raises:
      KeyError, TypeError, ValueError: the report lacks a field or has a field of the wrong type.
    """
    head = report["headline"]
    threat = report.get("threat_model") or {}
    verdict = str(head.get("verdict") or "unknown")
    robust = _number(head.get("accuracy"))
    failed = ([c.strip() for c in verdict.partition(":")[2].split(",") if c.strip()]
              if verdict.startswith("unreliable") else [])
    early = report.get("early_stopping") or {}
    row = {
        "name": name, "report": os.fspath(file),
        "defense": report.get("defense"), "model": report.get("model"),
        "dataset": report.get("dataset"),
        "norm": threat.get("norm"), "eps": _number(threat.get("eps")),
        "epochs": _number(report.get("epochs")),
        "selected_epoch": _number(early.get("selected_epoch")),
        "clean_accuracy": _number(report["clean_accuracy"]),
        "robust_accuracy": robust,
        "autoattack": head.get("autoattack"),
        "attack": _ATTACK_LABELS.get(head.get("autoattack"), str(head.get("autoattack"))),
        "verdict": verdict,
        "reliable": verdict == "reliable" and robust is not None,
        "failed_checks": _checks_text(report, failed),
        "num_examples": _number(report.get("num_examples")),
        "train_seconds": _number(report.get("train_seconds")),
        "verified_accuracy": _number(report.get("verified_accuracy")),
        "verified_eps": _number(report.get("verified_eps")),
        "smoothing_sigma": None, "certified_accuracy": {}, "certified_examples": None,
    }
    certify = _read_certify(os.path.dirname(os.path.abspath(file)))
    if certify is not None:
        row["smoothing_sigma"], row["certified_accuracy"], row["certified_examples"] = certify
    return row


def collect(paths):
    """One row per finished run under ``paths`` (run directories, directories of runs such as
    ``runs/``, or ``report.json`` files), in the order found (sorted by path); see
    `row_from_report` for the columns. A truncated or corrupt report is skipped with one
    `ResultsWarning` naming it.

    Raises:
      tfadv.cli.UserError: a path does not exist, a directory holds no ``report.json``, or no
        report under ``paths`` could be read.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    rows = []
    for name, file in find_reports(paths):
        report = read_report(file)
        if report is None:
            continue
        try:
            rows.append(row_from_report(report, name, file))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            _warn(f"skipping {file}: not a tfadv report ({type(err).__name__}: {err})")
    if not rows:
        raise UserError(f"no readable {rundir.REPORT} under {', '.join(map(os.fspath, paths))} "
                        f"(see the warnings above).")
    return rows


# --- ranking -----------------------------------------------------------------------------------
def threat_key(row):
    """The threat model a row is ranked within: ``(dataset, norm, eps)``."""
    eps = row.get("eps")
    return (row.get("dataset"), row.get("norm"), None if eps is None else round(eps, 10))


def _sort_key(sort):
    if sort == "headline":
        # Reliable first, the standard AutoAttack before the FAST screen, then accuracy.
        return lambda r: (not r["reliable"], r["autoattack"] == "fast",
                          r["robust_accuracy"] is None, -(r["robust_accuracy"] or 0.0),
                          -(r["clean_accuracy"] or 0.0), r["name"])
    if sort == "clean":
        return lambda r: (-(r["clean_accuracy"] or 0.0), r["name"])
    if sort == "time":
        return lambda r: (r["train_seconds"] is None, r["train_seconds"] or 0.0, r["name"])
    return lambda r: r["name"]


def check_sort(sort):
    """Raises ValueError unless ``sort`` is one of `SORTS`."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}; got {sort!r}.")


def format_eps(eps):
    """eps as text: ``0.3``, or ``8/255`` when it is a small multiple of 1/255."""
    if eps is None:
        return "?"
    short = f"{eps:g}"
    k = eps * 255
    if len(short) > 6 and abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return short


def group_title(dataset, norm, eps):
    """``digits, Linf eps=0.3``: a threat-model group's title."""
    if norm is None:
        return f"{dataset or '?'}, no threat model (no attack)"
    pretty = {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(str(norm), str(norm))
    return f"{dataset or '?'}, {pretty} eps={format_eps(eps)}"


def leaderboard(rows, sort="headline"):
    """The rows grouped by threat model (`threat_key`) and sorted within each group.

    Returns a list of groups ``{'dataset', 'norm', 'eps', 'title', 'rows'}`` (ordered by
    dataset, norm and eps); each row is a copy with a ``rank``: 1, 2, ... for the reliable
    headlines in table order, ``None`` for the others (never ranked). ``sort``: ``headline``
    (default: reliable standard-AutoAttack headlines first, then reliable FAST ones, then the
    unreliable ones, each by robust accuracy, highest first), ``clean`` (clean accuracy,
    highest first), ``name`` or ``time`` (training time, shortest first).
    """
    check_sort(sort)
    groups = {}
    for row in rows:
        groups.setdefault(threat_key(row), []).append(row)

    def order(key):
        return tuple((value is None, "" if value is None else value) for value in key)

    out = []
    for key in sorted(groups, key=order):
        ranked, n = [], 0
        for row in sorted(groups[key], key=_sort_key(sort)):
            n += row["reliable"]
            ranked.append(dict(row, rank=n if row["reliable"] else None))
        dataset, norm, _ = key
        eps = ranked[0]["eps"]
        out.append({"dataset": dataset, "norm": norm, "eps": eps,
                    "title": group_title(dataset, norm, eps), "rows": ranked})
    return out


# --- text formats ------------------------------------------------------------------------------
def _pct(value):
    return "\u2013" if value is None else f"{100 * value:.2f}%"


def format_seconds(seconds):
    """``55 s``, ``4 min 50 s``, ``2 h 05 min``; ``–`` for ``None``."""
    if seconds is None:
        return "\u2013"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _radii(rows):
    return sorted({r for row in rows for r in row["certified_accuracy"]}, key=float)


def flags_of(row):
    """The marks of a row's headline: `UNRELIABLE_MARK` when it is not reliable, `FAST_MARK`
    when it is AutoAttack-FAST's; ``''`` for a reliable standard-AutoAttack headline."""
    return (("" if row["reliable"] else UNRELIABLE_MARK)
            + (FAST_MARK if row["autoattack"] == "fast" else ""))


def headline_cell(row):
    """The robust accuracy as a Markdown table shows it: ``39.72%``, flagged ``39.72%\\*``
    (rendered 39.72%*) when the headline is not reliable and ``39.72%†`` when it is
    AutoAttack-FAST's."""
    marks = flags_of(row).replace(UNRELIABLE_MARK, "\\" + UNRELIABLE_MARK)
    return _pct(row["robust_accuracy"]) + marks


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _shorten(text, limit=160):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "\u2026"


def to_markdown(rows, sort="headline"):
    """A RobustBench-like leaderboard in Markdown: one table per threat model (`leaderboard`),
    columns rank, run, defense, model, epochs, clean and robust accuracy, the headline's attack
    and verdict, examples, training time, and, where a run of the group has them, IBP verified
    accuracy and randomized smoothing's certified accuracy per L2 radius. Unreliable headlines
    read ``39.72%*``, are not ranked (``–``) and are footnoted with their failed checks; FAST
    headlines read ``39.72%†``."""
    groups = leaderboard(rows, sort)
    count = sum(len(g["rows"]) for g in groups)
    lines = [f"Robust accuracy is each run's headline (report.json): the worst case per example "
             f"over every attack, AutoAttack included. Runs are ranked only within a threat "
             f"model; \\{UNRELIABLE_MARK} marks an unreliable headline (a sanity check failed: it "
             f"may overestimate robustness), which is not ranked. {count} run(s)."]
    for group in groups:
        members = group["rows"]
        ibp = any(r["verified_accuracy"] is not None for r in members)
        radii = _radii(members)
        header = ["#", "run", "defense", "model", "epochs", "clean", "robust", "attack",
                  "verdict", "examples", "train time"]
        if ibp:
            header.append("IBP verified")
        if radii:
            header += ["smoothing \u03c3"] + [f"certified L2 r={r}" for r in radii]
        lines += ["", f"### {group['title']}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" if h in _LEFT else "---:" for h in header) + "|"]
        for r in members:
            epochs = "\u2013" if r["epochs"] is None else str(r["epochs"])
            if r["selected_epoch"] is not None:
                epochs += f" (best {r['selected_epoch']})"
            cells = ["\u2013" if r["rank"] is None else str(r["rank"]), r["name"],
                     r["defense"] or "?", r["model"] or "?", epochs,
                     _pct(r["clean_accuracy"]), headline_cell(r), r["attack"], r["verdict"],
                     "\u2013" if r["num_examples"] is None else str(r["num_examples"]),
                     format_seconds(r["train_seconds"])]
            if ibp:
                verified = r["verified_accuracy"]
                cells.append("\u2013" if verified is None else
                             f"{_pct(verified)} (eps {format_eps(r['verified_eps'])})")
            if radii:
                examples = ("" if r["certified_examples"] is None
                            else f" ({r['certified_examples']} examples)")
                cells.append("\u2013" if r["smoothing_sigma"] is None
                             else f"{r['smoothing_sigma']:g}{examples}")
                cells += [_pct(r["certified_accuracy"].get(radius)) for radius in radii]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        flagged = [r for r in members if not r["reliable"]]
        if flagged:
            lines += ["", f"\\{UNRELIABLE_MARK} Not ranked: the headline is not reliable and "
                          f"may overestimate robustness."]
            for r in flagged:
                if r["failed_checks"]:
                    why = "; ".join(f"{name}: {_shorten(text)}" if text else name
                                    for name, text in r["failed_checks"].items())
                    lines.append(f"- `{r['name']}`: unreliable: {_cell(why)}")
                else:
                    lines.append(f"- `{r['name']}`: {_cell(r['verdict'])}")
        if any(r["autoattack"] == "fast" for r in members):
            lines += ["", f"{FAST_MARK} AutoAttack-FAST screen (APGD-CE + APGD-T), not the "
                          f"standard ensemble: a weaker attack, ranked below the standard "
                          f"AutoAttack headlines."]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("dataset", "norm", "eps", "rank", "name", "defense", "model", "epochs",
               "selected_epoch", "clean_accuracy", "robust_accuracy", "flag", "attack",
               "autoattack", "verdict", "reliable", "failed_checks", "num_examples",
               "train_seconds", "verified_accuracy", "verified_eps", "smoothing_sigma",
               "certified_examples")


def to_csv(rows, sort="headline"):
    """The leaderboard (`leaderboard`: grouped by threat model, then sorted) as CSV text with a
    header row: the columns of `CSV_COLUMNS` (accuracies as fractions in [0, 1] at full
    precision; ``flag`` is ``*`` for an unreliable headline and ``†`` for a FAST one; ``rank``
    is empty for an unranked row; ``failed_checks`` is ``;``-separated), one
    ``certified_r=<radius>`` column per L2 radius any run was certified at, and ``report``.
    Empty cells for missing values; booleans as ``true``/``false``."""
    groups = leaderboard(rows, sort)
    radii = _radii([r for g in groups for r in g["rows"]])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"certified_r={r}" for r in radii), "report"])

    def text(value):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)

    for group in groups:
        for r in group["rows"]:
            values = dict(r, failed_checks=";".join(r["failed_checks"]), flag=flags_of(r))
            writer.writerow([text(values[c]) for c in CSV_COLUMNS]
                            + [text(r["certified_accuracy"].get(radius)) for radius in radii]
                            + [r["report"]])
    return out.getvalue()


def render(rows, fmt="markdown", sort="headline"):
    """`to_markdown` or `to_csv` of ``rows`` by ``fmt`` (one of `FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
    return (to_markdown if fmt == "markdown" else to_csv)(rows, sort)


# --- the plot ----------------------------------------------------------------------------------
def check_plot_path(path):
    """Raises ValueError unless ``path`` ends in one of `PLOT_FORMATS`."""
    if os.path.splitext(os.fspath(path))[1].lower() not in PLOT_FORMATS:
        raise ValueError(f"the plot file must end in {', '.join(PLOT_FORMATS)}; got "
                         f"{os.fspath(path)!r}.")


def scatter(rows, path):
    """Draws clean accuracy (x) against the headline robust accuracy (y), one labelled point
    per run and one panel per threat model (`leaderboard`), and writes it to ``path`` (.png,
    .pdf or .svg; atomically). Reliable headlines are filled markers; unreliable ones hollow
    (the legend says so); FAST headlines are triangles. Runs without a robust accuracy (no
    attack) cannot be placed and are listed in the panel instead.

    Returns:
      ``{'path', 'panels': [{'title', 'points' (markers drawn, counted from the axes'
      artists), 'names' (the runs plotted), 'unplotted' (runs without a robust accuracy)}]}``.
    """
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = leaderboard(rows)
    columns = min(3, len(groups))
    lines_ = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(lines_, columns, figsize=(5.2 * columns, 4.8 * lines_),
                             squeeze=False)
    panels = []
    for ax, group in zip(axes.flat, groups):
        plotted = [r for r in group["rows"] if r["robust_accuracy"] is not None]
        unplotted = [r["name"] for r in group["rows"] if r["robust_accuracy"] is None]
        labels = {}  # runs at the same place share one label
        for r in plotted:
            xy = (100 * r["clean_accuracy"], 100 * r["robust_accuracy"])
            color = "tab:blue" if r["reliable"] else "tab:red"
            ax.scatter([xy[0]], [xy[1]], marker="^" if r["autoattack"] == "fast" else "o",
                       s=46, facecolors=color if r["reliable"] else "none", edgecolors=color,
                       linewidths=1.5, zorder=3)
            labels.setdefault((round(xy[0], 1), round(xy[1], 1)), []).append(
                r["name"] + ("" if r["reliable"] else UNRELIABLE_MARK))
        for xy, names in labels.items():
            ax.annotate(", ".join(names), xy, textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if unplotted:
            ax.text(0.02, 0.98, "no robust accuracy: " + ", ".join(unplotted),
                    transform=ax.transAxes, fontsize=7, va="top")
        clean = [100 * r["clean_accuracy"] for r in plotted] or [0.0]
        robust = [100 * r["robust_accuracy"] for r in plotted] or [100.0]
        ax.set_xlim(max(0.0, 10 * math.floor(min(clean) / 10 - 0.5)), 101)
        ax.set_ylim(-2, min(100.0, 10 * math.ceil(max(robust) / 10 + 0.5)) + 2)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy (%), the headline")
        ax.set_title(group["title"], fontsize=10)
        ax.grid(alpha=0.3)
        panels.append({"title": group["title"],
                       "points": sum(len(c.get_offsets()) for c in ax.collections),
                       "names": [r["name"] for r in plotted], "unplotted": unplotted})
    everything = [r for g in groups for r in g["rows"] if r["robust_accuracy"] is not None]
    handles = [Line2D([], [], marker="o", linestyle="", color="tab:blue",
                      label="reliable headline")]
    if any(not r["reliable"] for r in everything):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                              color="tab:red", label=f"unreliable headline{UNRELIABLE_MARK} "
                                                     f"(hollow): a sanity check failed"))
    if any(r["autoattack"] == "fast" for r in everything):
        handles.append(Line2D([], [], marker="^", linestyle="", color="gray",
                              label="AutoAttack-FAST headline (weaker attack)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0.4 / (4.8 * lines_), 1, 1))
    with rundir.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return {"path": os.fspath(path), "panels": panels}
