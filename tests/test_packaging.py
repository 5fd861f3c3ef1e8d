"""Packaging: tfadv installed (not editable) works away from the checkout, with its gin files and
commands; the bin/ scripts rerun themselves with the checkout's .venv when TensorFlow is missing.

The install (`pip install --no-deps --no-build-isolation --target`, offline) and the use of the
installed package (a fresh process whose only tfadv is the installed one) run on conftest's
background lane; the console commands and the launcher run here (no TensorFlow import: quick).
"""

import ast
import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from tfadv import _launch, commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An interpreter started with -S (no site-packages), so TensorFlow cannot be found whatever is
# installed: the system's python3 as after the README's first command, else this one.
BARE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
COPIED = ("pyproject.toml", "LICENSE", "README.md", "requirements.txt",
          os.path.join("tests", "requirements.txt"), "tfadv", "gin", "bin")
STATE = {}  # what start_background set up: the source copy, the install target, elsewhere

# Runs in a fresh process with PYTHONPATH=<install target>, cwd elsewhere; prints one JSON line.
USE_INSTALLED = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import tfadv
    from tfadv import config

    out = {"gin_dir": config.GIN_DIR, "awp": config.resolve_gin_file("awp.gin"),
           "paper": config.resolve_gin_file("paper/madry_cifar10.gin")}
    out["parsed"] = config.parse(["paper/madry_cifar10.gin"]) + config.parse(["awp.gin"])
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(0.02),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1500], y[:1500], epochs=3, batch_size=100, verbose=0)
    x, y = x[-16:], y[-16:]
    out["own_accuracy"] = float(np.mean(np.argmax(model.predict(x, verbose=0), 1) == y))
    result = tfadv.evaluate(model, x, y, eps=0.1, norm="linf", autoattack="fast", sanity=False,
                            verbose=0)
    out["headline"] = float(result["headline"]["accuracy"])
    out["clean"] = float(result["clean_accuracy"])
    out["robust"] = {k: float(v) for k, v in result["robust_accuracy"].items()}
    out["num_examples"] = int(result["num_examples"])
    out["modules"] = sorted({m.__file__ for n, m in sys.modules.items()
                             if n.split(".")[0] == "tfadv" and getattr(m, "__file__", None)})
    print(json.dumps(out))
""")


def _copy_checkout(source):
    """Copies what the build reads, so that its build/ and tfadv.egg-info/ stay out of the
    checkout."""
    for name in COPIED:
        src, dst = os.path.join(ROOT, name), os.path.join(source, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    env.pop("TF_CONFIG", None)
    return env


def start_background(lane, tmp_path_factory):
    """Queues the offline install into a target directory, then the use of the installed
    package from another directory."""
    base = tmp_path_factory.mktemp("packaging")
    source, target, elsewhere = (str(base / n) for n in ("source", "site", "elsewhere"))
    os.makedirs(elsewhere)
    _copy_checkout(source)
    script = str(base / "use_installed.py")
    with open(script, "w") as f:
        f.write(f"import os\nos.chdir({elsewhere!r})\n{USE_INSTALLED}")
    STATE.update(source=source, target=target, elsewhere=elsewhere)
    lane.submit("test_packaging install",
                [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                 "--no-index", "--quiet", "--target", target, source], 300, _env())
    lane.submit("test_packaging use", [sys.executable, script], 300, _env(PYTHONPATH=target))


@pytest.fixture(scope="module")
def installed(background_lane):
    """The install target directory, once the install has succeeded."""
    assert STATE, "start_background did not run"
    proc = background_lane.result("test_packaging install")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return STATE["target"]


def _under(path, directory):
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


def _files(directory, pattern):
    return {os.path.relpath(p, directory)
            for p in glob.glob(os.path.join(directory, pattern), recursive=True)
            if "__pycache__" not in p}


def test_build_tools_are_in_the_venv():
    # Python 3.11's venv ships setuptools 65.5, whose bdist_wheel needs the wheel package
    # (TensorFlow's astunparse brings it); setuptools >= 70.1 has its own.
    import importlib.metadata
    import importlib.util

    assert importlib.util.find_spec("setuptools") is not None, "pip install setuptools"
    version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    assert version >= (64, 0), "pip install 'setuptools>=64' (PEP 660 editable installs)"
    if version < (70, 1):
        assert importlib.util.find_spec("wheel") is not None, "pip install wheel"


def test_install_holds_every_module_gin_file_and_tool(installed):
    package, source = os.path.join(installed, "tfadv"), STATE["source"]
    assert _files(os.path.join(source, "tfadv"), "**/*.py") <= _files(package, "**/*.py"), (
        "a subpackage is missing from pyproject.toml's [tool.setuptools] packages")
    gin_files = _files(os.path.join(source, "gin"), "**/*.gin")
    assert {"awp.gin", "paper/madry_cifar10.gin", "datasets/digits.gin"} <= gin_files
    assert gin_files <= _files(os.path.join(package, "gin"), "**/*.gin")
    for command in os.listdir(os.path.join(source, "bin")):
        if command != "__pycache__":
            script = os.path.join(package, "bin", command)
            assert os.stat(script).st_mode & stat.S_IXUSR, script
    # Metadata: the version of tfadv/__init__.py, the pins of requirements.txt, the license.
    import tfadv

    (dist_info,) = glob.glob(os.path.join(installed, "tfadv-*.dist-info"))
    with open(os.path.join(dist_info, "METADATA")) as f:
        metadata = f.read().splitlines()
    assert f"Version: {tfadv.__version__}" in metadata
    assert any(line.startswith("License") and "Apache-2.0" in line for line in metadata)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert [line[len("Requires-Dist: "):] for line in metadata
            if line.startswith("Requires-Dist: ") and "extra ==" not in line] == pins
    (license_file,) = glob.glob(os.path.join(dist_info, "**", "LICENSE"), recursive=True)
    with open(license_file) as f:
        assert "Apache License" in f.read()


def test_installed_package_resolves_gin_files_and_evaluates(installed, background_lane):
    proc = background_lane.result("test_packaging use")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    package = os.path.join(installed, "tfadv")
    # Every tfadv module came from the install, none from the checkout.
    assert out["modules"] and all(_under(f, package) for f in out["modules"]), out["modules"]
    assert out["gin_dir"] == os.path.join(package, "gin")
    assert out["awp"] == os.path.join(package, "gin", "awp.gin")
    assert out["paper"] == os.path.join(package, "gin", "paper", "madry_cifar10.gin")
    assert out["parsed"] == [out["paper"], out["awp"]]  # and their includes resolved
    # tfadv.evaluate on numpy arrays: accuracies in [0, 1], clean = the model's own argmax
    # accuracy, the worst case no better than clean nor than any attack.
    assert out["num_examples"] == 16
    assert out["clean"] == pytest.approx(out["own_accuracy"], abs=1e-9)
    assert out["clean"] > 0.5  # the briefly fitted model beats chance
    assert all(0.0 <= a <= 1.0 for a in [out["headline"], out["clean"], *out["robust"].values()])
    assert out["headline"] <= out["clean"]
    assert all(out["headline"] <= a + 1e-9 for a in out["robust"].values())


def _run_installed(target, tool, *args):
    return subprocess.run([os.path.join(target, "bin", tool), *args], capture_output=True,
                          text=True, timeout=120, env=_env(PYTHONPATH=target),
                          cwd=STATE["elsewhere"])


def test_installed_commands_run_the_installed_scripts(installed):
    proc = _run_installed(installed, "tfadv", "--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == [command for command, _ in commands.available()]
    assert "  train         Train a robust classifier" in proc.stdout.splitlines()
    # `tfadv train` and `tfadv-train` run the installed bin/train as __main__ with argv[0] its
    # path: absl's --helpshort lists the flags of the module named argv[0].
    script = os.path.join(installed, "tfadv", "bin", "train")
    for argv in (["tfadv", "train", "--helpshort"], ["tfadv-train", "--helpshort"]):
        proc = _run_installed(installed, *argv)
        assert f"{script}:" in proc.stdout and "--gin_file" in proc.stdout, proc.stdout
    proc = _run_installed(installed, "tfadv", "trian")
    assert proc.returncode == 2
    assert proc.stderr.startswith("tfadv: error: unknown command 'trian'; commands: train, ")


def test_checkout_finds_gin_and_bin_beside_the_package():
    assert _launch.resource_dir("gin") == os.path.join(ROOT, "gin")
    assert commands.script_path("pseudo-label") == os.path.join(ROOT, "bin", "pseudo_label")
    assert commands.script_path("rm") is None
    with open(os.path.join(ROOT, "bin", "train")) as f:
        first = ast.get_docstring(ast.parse(f.read())).splitlines()[0]
    assert first.startswith(commands.summary(os.path.join(ROOT, "bin", "train")) + ": ")


def test_dispatcher_reports_a_missing_script_as_unknown(tmp_path, monkeypatch, capsys):
    (tmp_path / "train").write_text('"""Train it: bin/train."""\n')
    monkeypatch.setattr(_launch, "resource_dir", lambda name: str(tmp_path))
    assert commands.main(["evaluate", "--model=x"]) == 2
    assert capsys.readouterr().err == (
        "tfadv: error: unknown command 'evaluate'; commands: train (`tfadv --help` describes "
        "them).\n")
    assert commands.main([]) == 2
    assert "  train         Train it" in capsys.readouterr().err


# --- the launcher: bin/ scripts under a Python without TensorFlow -------------------------------
def _fake_checkout(tmp_path, tool):
    """A checkout with the real tfadv/ and bin/<tool> (its bootstrap lines are under test)."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "tfadv"), repo / "tfadv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "bin").mkdir()
    shutil.copy2(os.path.join(ROOT, "bin", tool), repo / "bin" / tool)
    return repo


def _run_bare(python, script, *args):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}  # a fresh shell's
    return subprocess.run([python, "-S", str(script), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def _error_line(python):
    return (f"tfadv: error: TensorFlow is not installed for {python}; run the README's first "
            "command (python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e .) "
            "or activate your environment\n")


@pytest.mark.parametrize("tool", [command for command, _ in commands.available()])
def test_bin_script_reruns_itself_with_the_checkouts_venv(tmp_path, tool):
    repo = _fake_checkout(tmp_path, tool)
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    record = tmp_path / "argv.txt"
    (venv_bin / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" > {record}\n')
    (venv_bin / "python").chmod(0o755)
    args = ["--gin_file=awp.gin", "--gin_param=train.epochs = 1"]
    proc = _run_bare(BARE_PYTHON, repo / "bin" / tool, *args)
    assert proc.returncode == 0, proc.stderr
    script = os.path.realpath(repo / "bin" / tool)  # the venv is found beside the real file
    python = os.path.join(os.path.dirname(os.path.dirname(script)), ".venv", "bin", "python")
    assert record.read_text().splitlines() == [python, script, *args]


def test_bin_script_without_tensorflow_or_venv_fails_in_one_line(tmp_path):
    repo = _fake_checkout(tmp_path, "train")
    proc = _run_bare(BARE_PYTHON, repo / "bin" / "train", "--gin_file=awp.gin")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", _error_line(BARE_PYTHON))


def test_venv_without_tensorflow_fails_instead_of_looping(tmp_path):
    # A real (empty) venv: the system python reruns the script with it once, then it stops.
    repo = _fake_checkout(tmp_path, "train")
    venv = repo / ".venv"
    (venv / "bin").mkdir(parents=True)
    base = os.path.realpath(BARE_PYTHON)
    (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(base)}\n"
                                     "include-system-site-packages = false\n")
    os.symlink(base, venv / "bin" / "python")
    proc = _run_bare(BARE_PYTHON, repo / "bin" / "train", "--gin_file=awp.gin")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", _error_line(venv / "bin" / "python"))
    proc = _run_bare(str(venv / "bin" / "python"), repo / "bin" / "train")
    assert (proc.returncode, proc.stderr) == (2, _error_line(venv / "bin" / "python"))
