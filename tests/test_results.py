"""bin/results and tfadv.results: the leaderboard over many runs, read back from real files.

The run directories are synthetic but in the format `tfadv.train.Run.report` writes (the keys of a
real digits run's report.json); no TensorFlow work is done, so the whole file takes about 3 s."""

import csv
import io
import json
import os
import subprocess
import sys
import warnings

import pytest

from tfadv import results
from tfadv.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AUTOATTACK_LABELS = {"standard": "worst case incl. AutoAttack (standard)",
                     "fast": "worst case incl. AutoAttack-FAST (APGD-CE + APGD-T, not the "
                             "standard ensemble)"}


def make_report(*, defense="PGDAdversarialTraining", clean=0.95, robust=0.4, failed=(),
                autoattack="standard", dataset="digits", norm="linf", eps=0.3, epochs=20,
                train_seconds=290.4, num_examples=360, **extra):
    """A report dict with the keys and structure of `tfadv.train.Run.report` (headline of
    `tfadv.evaluation._headline`; ``failed``: names of failed sanity checks)."""
    checks = [{"name": name, "passed": name not in failed,
               "verdict": (f"FAILED: {name} went wrong on this model" if name in failed
                           else f"ok: {name}"), "affects_headline": True}
              for name in ("deterministic", "gradients", "iterative_vs_single_step",
                           "monotone_in_eps")]
    checks.append({"name": "pgd_vs_strongest", "passed": True, "affects_headline": False,
                   "verdict": "ok: fixed-step PGD is within 5 points of the strongest attack",
                   "gap": 0.0})
    verdict = "unreliable: " + ", ".join(failed) if failed else "reliable"
    report = {
        "dataset": dataset, "split": "test", "defense": defense, "model": "digits_cnn",
        "epochs": epochs, "resumes": [], "train_seconds": train_seconds,
        "headline": {"accuracy": robust, "verdict": verdict, "reliable": not failed,
                     "autoattack": autoattack, "label": AUTOATTACK_LABELS[autoattack],
                     "attacks": ["FGSM", "PGD-40", "autoattack"]},
        "num_examples": num_examples, "prediction": "one call", "clean_accuracy": clean,
        "robust_accuracy": {"FGSM": min(1.0, robust + 0.3), "PGD-40": robust + 0.1,
                            "autoattack": robust},
        "worst_case_accuracy": robust, "remedies": [],
        "counts": {"clean_correct": round(clean * num_examples)},
        "seconds": {"clean": 0.02, "autoattack": 161.1},
        "threat_model": {"norm": norm, "eps": eps},
        "attacks": {"autoattack": f"AutoAttack(eps={eps}, norm={norm}, version={autoattack})"},
        "attack_details": {}, "robustness_curve": [{"eps": 0.0, "accuracy": clean,
                                                    "attack": "clean"}],
        "sanity_checks": checks,
        "history": {"loss": [1.0, 0.5], "val_accuracy": [0.8, 0.9]},
    }
    report.update(extra)
    return report


def write_run(root, name, report):
    """A finished bin/train run directory: run.json, config.gin, report.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"created": "2026-12-02T16:12:07Z", "seed": 0,
                                              "bindings": "train.epochs = 20\n",
                                              "resumes": []}))
    (run / "config.gin").write_text("train.epochs = 20\n")
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return run


@pytest.fixture
def zoo(tmp_path):
    """Seven finished runs in three threat models, one unfinished run, and their reports."""
    runs = tmp_path / "runs"
    reports = {
        "pgd_at": make_report(clean=0.9694, robust=0.3972),
        "trades": make_report(defense="TRADES", clean=0.93, robust=0.45),
        "standard": make_report(defense="StandardTraining", clean=0.9667, robust=0.0),
        # Masked gradients: the highest number of the group, but it must not be ranked.
        "mmc": make_report(defense="MMC", clean=0.91, robust=0.62,
                           failed=("gradients", "monotone_in_eps")),
        # A FAST headline: reliable, but below the standard AutoAttack ones.
        "fast": make_report(defense="PGDAdversarialTraining", clean=0.95, robust=0.5,
                            autoattack="fast"),
        "ibp": make_report(defense="IntervalBoundPropagation", clean=0.88, robust=0.55,
                           eps=0.1, verified_accuracy=0.71, verified_eps=0.1),
        "cifar_at": make_report(dataset="cifar10", eps=8 / 255, clean=0.84, robust=0.48,
                                early_stopping={"monitor": "val_robust_accuracy",
                                                "selected_epoch": 14, "selected_value": 0.5,
                                                "stopped_epoch": 20, "validation_freq": 1}),
    }
    for name, report in reports.items():
        write_run(runs, name, report)
    certify = {"method": "randomized smoothing", "settings": {"sigma": 0.25, "n": 10000},
               "num_examples": 100, "certified_accuracy": {"0": 0.9, "0.25": 0.75, "0.5": 0.5},
               "abstained": 3, "accuracy": 0.9, "records": []}
    (runs / "ibp" / "certify").mkdir()
    (runs / "ibp" / "certify" / "certify.json").write_text(json.dumps(certify))
    # A superseded report under previous/ is not a run of its own.
    write_run(runs / "pgd_at" / "previous", "20261201T000000Z", make_report(robust=0.1))
    # A run still training: run.json, no report.json.
    (runs / "running").mkdir()
    (runs / "running" / "run.json").write_text("{}")
    return runs, reports, certify


def collect_quietly(paths):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = results.collect(paths)
    return rows, [str(w.message) for w in caught]


def test_rows_hold_the_reports_numbers(zoo):
    runs, reports, certify = zoo
    rows, caught = collect_quietly([runs])
    assert sorted(r["name"] for r in rows) == sorted(reports)  # not previous/, not running/
    assert len(caught) == 1 and "running" in caught[0] and "not finished" in caught[0]
    for row in rows:
        report = reports[row["name"]]
        assert row["report"] == str(runs / row["name"] / "report.json")
        assert row["clean_accuracy"] == report["clean_accuracy"]
        assert row["robust_accuracy"] == report["headline"]["accuracy"]
        assert row["verdict"] == report["headline"]["verdict"]
        assert (row["defense"], row["model"], row["dataset"]) == (
            report["defense"], report["model"], report["dataset"])
        assert (row["norm"], row["eps"]) == (report["threat_model"]["norm"],
                                             report["threat_model"]["eps"])
        assert (row["epochs"], row["num_examples"], row["train_seconds"]) == (
            report["epochs"], report["num_examples"], report["train_seconds"])
    by = {r["name"]: r for r in rows}
    assert by["mmc"]["reliable"] is False and list(by["mmc"]["failed_checks"]) == [
        "gradients", "monotone_in_eps"]
    assert by["mmc"]["failed_checks"]["gradients"].startswith("FAILED: gradients")
    assert by["fast"]["attack"] == "AutoAttack-FAST" and by["fast"]["reliable"] is True
    assert by["pgd_at"]["attack"] == "AutoAttack (standard)"
    assert by["ibp"]["verified_accuracy"] == 0.71 and by["ibp"]["verified_eps"] == 0.1
    assert by["ibp"]["certified_accuracy"] == certify["certified_accuracy"]
    assert by["ibp"]["smoothing_sigma"] == 0.25
    assert by["cifar_at"]["selected_epoch"] == 14
    # A single run directory, a report file given directly, and the same run twice: one row.
    one, _ = collect_quietly([runs / "trades", runs / "trades" / "report.json"])
    assert [r["name"] for r in one] == ["trades"]


def test_grouped_by_threat_model_and_unreliable_never_ranked(zoo):
    runs, reports, _ = zoo
    rows, _ = collect_quietly([runs])
    groups = results.leaderboard(rows)
    assert [(g["dataset"], g["norm"], g["eps"]) for g in groups] == [
        ("cifar10", "linf", 8 / 255), ("digits", "linf", 0.1), ("digits", "linf", 0.3)]
    digits = groups[2]["rows"]
    # Reliable standard AutoAttack by robust accuracy, then FAST, then the unreliable one,
    # although it has the highest number.
    assert [r["name"] for r in digits] == ["trades", "pgd_at", "standard", "fast", "mmc"]
    assert [r["rank"] for r in digits] == [1, 2, 3, 4, None]
    assert [r["rank"] for r in groups[0]["rows"]] == [1]  # ranks restart in every group
    by_clean = results.leaderboard(rows, sort="clean")[2]["rows"]
    assert [r["name"] for r in by_clean] == ["pgd_at", "standard", "fast", "trades", "mmc"]
    by_name = results.leaderboard(rows, sort="name")[2]["rows"]
    assert [r["name"] for r in by_name] == sorted(r["name"] for r in digits)
    assert [r["rank"] for r in by_name] == [1, None, 2, 3, 4]  # fast, mmc, pgd_at, ...
    with pytest.raises(ValueError, match="sort must be one of headline, clean, name, time"):
        results.leaderboard(rows, sort="robust")


def _table(markdown, title):
    """The body rows of the Markdown table under ``### title``, as lists of cells."""
    lines = markdown.splitlines()
    start = lines.index(f"### {title}") + 2
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split(" | ")])
    return lines[start], body


def test_markdown_flags_unreliable_headlines_with_a_footnote(zoo):
    runs, reports, _ = zoo
    rows, _ = collect_quietly([runs])
    text = results.to_markdown(rows)
    header, body = _table(text, "digits, Linf eps=0.3")
    assert "IBP verified" not in header  # certified columns only where a run has them
    assert [(c[0], c[1], c[5], c[6]) for c in body] == [
        ("1", "trades", "93.00%", "45.00%"), ("2", "pgd_at", "96.94%", "39.72%"),
        ("3", "standard", "96.67%", "0.00%"), ("4", "fast", "95.00%", "50.00%\u2020"),
        ("\u2013", "mmc", "91.00%", "62.00%\\*")]
    assert body[-1][8] == "unreliable: gradients, monotone_in_eps"
    footnote = text.split("### digits, Linf eps=0.3")[1]
    assert "\\* Not ranked" in footnote
    assert ("- `mmc`: unreliable: gradients: FAILED: gradients went wrong on this model; "
            "monotone_in_eps: FAILED: monotone_in_eps went wrong on this model") in footnote
    assert "\u2020 AutoAttack-FAST screen" in footnote
    header, body = _table(text, "digits, Linf eps=0.1")
    assert "IBP verified" in header and "certified L2 r=0.25" in header
    assert body[0][11:] == ["71.00% (eps 0.1)", "0.25 (100 examples)", "90.00%", "75.00%",
                            "50.00%"]
    header, body = _table(text, "cifar10, Linf eps=8/255")
    assert body[0][4] == "20 (best 14)" and body[0][10] == "4 min 50 s"


def test_csv_parses_back_to_the_same_numbers(zoo):
    runs, reports, certify = zoo
    rows, _ = collect_quietly([runs])
    parsed = list(csv.DictReader(io.StringIO(results.to_csv(rows))))
    assert [r["name"] for r in parsed] == ["cifar_at", "ibp", "trades", "pgd_at", "standard",
                                           "fast", "mmc"]
    for r in parsed:
        report = reports[r["name"]]
        assert float(r["clean_accuracy"]) == report["clean_accuracy"]
        assert float(r["robust_accuracy"]) == report["headline"]["accuracy"]
        assert float(r["eps"]) == report["threat_model"]["eps"]
        assert int(r["num_examples"]) == report["num_examples"]
        assert float(r["train_seconds"]) == report["train_seconds"]
        assert r["verdict"] == report["headline"]["verdict"]
    by = {r["name"]: r for r in parsed}
    assert (by["mmc"]["rank"], by["mmc"]["flag"], by["mmc"]["reliable"]) == ("", "*", "false")
    assert by["mmc"]["failed_checks"] == "gradients;monotone_in_eps"
    assert (by["trades"]["rank"], by["fast"]["flag"]) == ("1", "\u2020")
    assert float(by["ibp"]["verified_accuracy"]) == 0.71
    assert {k: float(by["ibp"][f"certified_r={k}"])
            for k in certify["certified_accuracy"]} == certify["certified_accuracy"]
    assert by["pgd_at"]["certified_r=0.5"] == ""


def test_scatter_draws_one_point_per_run_and_panel_per_threat_model(zoo, tmp_path):
    runs, reports, _ = zoo
    rows, _ = collect_quietly([runs])
    target = tmp_path / "plots" / "scatter.png"
    drawn = results.scatter(rows, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["title"] for p in drawn["panels"]] == [
        "cifar10, Linf eps=8/255", "digits, Linf eps=0.1", "digits, Linf eps=0.3"]
    assert [p["points"] for p in drawn["panels"]] == [1, 1, 5]
    assert sorted(drawn["panels"][2]["names"]) == ["fast", "mmc", "pgd_at", "standard",
                                                   "trades"]
    assert os.listdir(tmp_path / "plots") == ["scatter.png"]  # no temporary file left
    with pytest.raises(ValueError, match=r"must end in \.png, \.pdf, \.svg"):
        results.scatter(rows, tmp_path / "scatter.gif")


def test_missing_paths_and_corrupt_reports(zoo, tmp_path):
    runs, reports, _ = zoo
    with pytest.raises(UserError, match="does not exist"):
        results.collect([runs, tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no report.json"):
        results.collect([tmp_path / "empty"])
    with pytest.raises(UserError, match=r"holds no report.json \(1 run\(s\) there have not "
                                        r"finished yet"):
        results.collect([runs / "running"])
    # A report cut in half (a copy interrupted): skipped with one warning naming it.
    text = (runs / "trades" / "report.json").read_text()
    (runs / "trades" / "report.json").write_text(text[:len(text) // 2])
    (runs / "standard" / "report.json").write_text(json.dumps({"not": "a report"}))
    (runs / "ibp" / "certify" / "certify.json").write_text('{"certified_accuracy": {"0": 0.')
    rows, caught = collect_quietly([runs])
    assert sorted(r["name"] for r in rows) == sorted(set(reports) - {"trades", "standard"})
    ibp, = [r for r in rows if r["name"] == "ibp"]  # listed, without the broken certificate
    assert ibp["certified_accuracy"] == {} and ibp["verified_accuracy"] == 0.71
    assert any(m.startswith(f"ignoring {runs / 'ibp' / 'certify' / 'certify.json'}")
               for m in caught)
    skipped = [m for m in caught if m.startswith("skipping")]
    assert len(skipped) == 2
    assert any(str(runs / "trades" / "report.json") in m and "JSONDecodeError" in m
               for m in skipped)
    assert any("standard" in m and "not a tfadv report" in m for m in skipped)
    with pytest.raises(UserError, match="no readable report.json"):
        collect_quietly([runs / "trades"])


def test_bin_results_without_tensorflow(zoo, tmp_path):
    runs, reports, _ = zoo
    table, plot = tmp_path / "out" / "table.csv", tmp_path / "out" / "scatter.png"
    # -X importtime lists every module the command imports (on stderr, "import time:" lines).
    command = [sys.executable, "-X", "importtime", os.path.join(ROOT, "bin", "results")]
    done = subprocess.run([*command, str(runs), f"--output={table}", f"--plot={plot}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "matplotlib" in imported and "absl" in imported
    assert not imported & {"tensorflow", "keras"}  # the command is instant
    messages = [line for line in done.stderr.splitlines() if line.startswith("tfadv:")]
    assert messages[0].startswith("tfadv: warning: 1 run(s) have not finished")
    assert messages[-1] == f"tfadv: wrote {plot} (7 runs in 3 threat-model panel(s))"
    parsed = list(csv.DictReader(table.open()))  # CSV, from the file name
    assert {r["name"]: float(r["robust_accuracy"]) for r in parsed} == {
        name: report["headline"]["accuracy"] for name, report in reports.items()}
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # A user error is one line and exit status 2.
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "results"),
                              str(tmp_path / "nowhere")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[0] == f"tfadv: error: {tmp_path / 'nowhere'} does not " \
                                             f"exist."


def test_unchecked_and_attackless_headlines_are_flagged_not_ranked(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "quick", make_report(robust=0.6, autoattack="fast"))
    unchecked = make_report(robust=0.6, autoattack="fast")
    unchecked["headline"]["verdict"] = "unchecked: the sanity checks were not run"
    write_run(runs, "unchecked", unchecked)
    attackless = make_report(robust=0.6, threat_model=None)
    attackless["headline"] = {"accuracy": None, "verdict": "no attack was run",
                              "reliable": False, "autoattack": None,
                              "label": "no robust accuracy (no attack)"}
    write_run(runs, "attackless", attackless)
    rows, _ = collect_quietly([runs])
    groups = results.leaderboard(rows)
    assert [g["title"] for g in groups] == ["digits, Linf eps=0.3",
                                            "digits, no threat model (no attack)"]
    assert [(r["name"], r["rank"]) for r in groups[0]["rows"]] == [("quick", 1),
                                                                   ("unchecked", None)]
    text = results.to_markdown(rows)
    assert "- `unchecked`: unchecked: the sanity checks were not run" in text
    assert "- `attackless`: no attack was run" in text
    _, body = _table(text, "digits, no threat model (no attack)")
    assert body[0][6] == "\u2013\\*" and body[0][7] == "none"
    drawn = results.scatter(rows, tmp_path / "s.svg")
    assert [(p["points"], p["unplotted"]) for p in drawn["panels"]] == [(2, []),
                                                                        (0, ["attackless"])]
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
