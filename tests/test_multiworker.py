"""Multi-worker training: TF_CONFIG validation, a bounded wait for the chief, the global-batch
rule, and a real two-worker run over 127.0.0.1 (two processes) ending with identical weights."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import QUICK_TRAIN, ROOT
from tfadv import config, distribute
from tfadv import train as train_lib


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tf_config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


TWO_WORKERS = {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]}


@pytest.mark.parametrize("text, message", [
    ("{'cluster': {}", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "no 'cluster'"),
    (json.dumps({"cluster": TWO_WORKERS}), "no 'task'"),
    (_tf_config(TWO_WORKERS, index=2), "index 2 is out of range"),
    (_tf_config(TWO_WORKERS, index=-1), "index -1 is out of range"),
    (_tf_config(TWO_WORKERS, task_type="chief"), "task type 'chief' is not a job"),
    (_tf_config({"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}), "job 'ps'"),
    (_tf_config({"worker": ["127.0.0.1"]}), "'127.0.0.1' is not 'host:port'"),
    (_tf_config({"worker": ["a:1"], "chief": ["b:1", "c:1"]}), "one chief"),
])
def test_malformed_tf_config_is_a_clear_error(monkeypatch, text, message):
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        distribute.get_strategy()  # the default name looks at TF_CONFIG
    assert "TF_CONFIG" in str(error.value)


def test_parse_tf_config():
    assert distribute.parse_tf_config("") is None
    parsed = distribute.parse_tf_config(_tf_config(
        {"chief": ["h0:1"], "worker": ["h1:2", "h2:3"]}, "worker", 1))
    assert parsed["num_tasks"] == 3 and parsed["chief_address"] == "h0:1"
    assert parsed["task_type"] == "worker" and parsed["task_index"] == 1
    assert distribute.parse_tf_config(_tf_config(TWO_WORKERS))["chief_address"] == \
        "127.0.0.1:20001"


def test_bad_strategy_arguments():
    with pytest.raises(ValueError, match="communication must be one of"):
        distribute.get_strategy("multi_worker", communication="mpi")
    with pytest.raises(ValueError, match="timeout must be"):
        distribute.get_strategy("multi_worker", timeout=0)
    with pytest.raises(ValueError, match="devices cannot be set"):
        distribute.get_strategy("multi_worker", devices=["/cpu:0"])


def test_unreachable_chief_fails_within_the_timeout(monkeypatch):
    chief = f"127.0.0.1:{_free_port()}"  # nobody listens there
    monkeypatch.setenv("TF_CONFIG", _tf_config({"worker": [chief, "127.0.0.1:1"]}, index=1))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=re.escape(chief)) as error:
        distribute.get_strategy(timeout=2)
    elapsed = time.monotonic() - start
    assert 1.0 < elapsed < 10, elapsed
    assert "2 s" in str(error.value)


def test_wait_for_chief_returns_once_the_chief_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        distribute.wait_for_chief(f"127.0.0.1:{server.getsockname()[1]}", timeout=30)
        assert time.monotonic() - start < 5


def test_global_batch_not_divisible_by_replicas_fails_before_training(tmp_path):
    config.parse(["standard.gin"], [
        "get_strategy.devices = ['/cpu:0', '/cpu:1']", "load_dataset.batch_size = 127",
        "train.dry_run = True"])
    with pytest.raises(ValueError, match=r"load_dataset\.batch_size.*127 for 2 replicas"):
        train_lib.train(str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


# One worker of the two-worker run: bin/train's steps plus a callback that saves the trained
# weights of this worker (the non-chief's own files are deleted by design).
WORKER_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import gin, keras, numpy as np
from tfadv import config, train

class SaveWeights(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        np.savez(sys.argv[2], *[np.asarray(w) for w in self.model.base_model.get_weights()])

config.parse(["standard.gin"], {bindings!r}, finalize=False)
gin.bind_parameter("train.callbacks", [SaveWeights()])
gin.finalize()
train.train(sys.argv[1])
"""


def test_two_workers_over_loopback_end_with_identical_weights(tmp_path):
    bindings = [*QUICK_TRAIN, "train.verbose = 0", "train.epochs = 1",
                "get_strategy.timeout = 60.0"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT.format(root=ROOT, bindings=bindings))
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    model_dir = tmp_path / "run"  # the same command on both workers
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=_tf_config(cluster, "worker", index))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(model_dir), str(tmp_path / f"w{index}.npz")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "2 replica(s)" in out, out
    # The chief wrote the run; the other worker wrote to a temporary directory, now removed.
    assert {"model.keras", "report.json", "config.gin", "checkpoints"} <= set(
        os.listdir(model_dir))
    chief_report = re.search(r"tfadv: wrote (\S+)", outputs[0][0]).group(1)
    worker_report = re.search(r"tfadv: wrote (\S+)", outputs[1][0]).group(1)
    assert chief_report == str(model_dir / "report.json")
    assert os.path.dirname(worker_report) != str(model_dir)
    assert not os.path.exists(os.path.dirname(worker_report))
    report = json.loads((model_dir / "report.json").read_text())
    assert report["clean_accuracy"] > 0.5  # it trained (10 classes: chance is 0.1)

    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) > 0
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)
    saved = keras.models.load_model(model_dir / "model.keras").get_weights()
    for key, value in zip(w0.files, saved):
        np.testing.assert_array_equal(w0[key], value, err_msg=key)
