"""The one distribution-strategy factory (after tensorflow/models' `official/common`).

Strategies: ``'default'`` (no distribution), ``'one_device'``, ``'mirrored'`` (the local GPUs or
named devices) and ``'multi_worker'`` (`tf.distribute.MultiWorkerMirroredStrategy` over the
cluster in the ``TF_CONFIG`` environment variable). ``'mirrored'``, the default, becomes
``'multi_worker'`` by itself when ``TF_CONFIG`` describes a cluster of more than one task, so the
same gin file trains on one machine or on N workers (see BUILD.md, "Distribution").

`is_chief` and `worker_dir` say where a worker writes files: the chief writes to ``model_dir``;
the other workers take part in every save (saving may need collectives) but write to a temporary
directory that `remove_worker_dir` deletes, as in the Keras multi-worker guide.
"""

import json
import os
import shutil
import socket
import tempfile
import time

import gin
import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
COMMUNICATIONS = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}
TASK_TYPES = ("chief", "worker")


def _local_accelerators():
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def parse_tf_config(text=None):
    """Parses and validates a ``TF_CONFIG`` for `MultiWorkerMirroredStrategy`.

    Args:
      text: the JSON text; default the ``TF_CONFIG`` environment variable.

    Returns:
      ``None`` when there is no (or an empty) ``TF_CONFIG``, else a dict with ``cluster``
      (job name -> list of ``'host:port'``), ``task_type``, ``task_index``, ``num_tasks`` (chief
      plus workers) and ``chief_address`` (the chief's, or worker 0's when there is no chief).

    Raises:
      ValueError: naming the problem: not JSON, no ``cluster`` or ``task``, a job other than
        ``chief``/``worker``, more than one chief, an address that is not ``host:port``, a task
        type not in the cluster or an index out of range.
    """
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}); got {text!r}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task'; got {text!r}.")
    for key in ("cluster", "task"):
        if not isinstance(config.get(key), dict) or not config[key]:
            raise ValueError(f"TF_CONFIG has no {key!r} object (it needs 'cluster', e.g. "
                             "{'worker': ['host1:port', 'host2:port']}, and 'task', e.g. "
                             f"{{'type': 'worker', 'index': 0}}); got {text!r}.")
    cluster = config["cluster"]
    for job, addresses in cluster.items():
        if job not in TASK_TYPES:
            raise ValueError(f"TF_CONFIG cluster job {job!r} is not supported by "
                             f"MultiWorkerMirroredStrategy; allowed jobs: {TASK_TYPES}.")
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) for a in addresses)):
            raise ValueError(f"TF_CONFIG cluster[{job!r}] must be a non-empty list of "
                             f"'host:port' strings; got {addresses!r}.")
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"TF_CONFIG cluster[{job!r}] address {address!r} is not "
                                 "'host:port' with a port in 1..65535.")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG cluster may have one chief; got {cluster['chief']!r}.")
    task = config["task"]
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster:
        raise ValueError(f"TF_CONFIG task type {task_type!r} is not a job of the cluster; "
                         f"allowed: {sorted(cluster)}.")
    if not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < len(cluster[task_type]):
        raise ValueError(f"TF_CONFIG task index {index!r} is out of range for job "
                         f"{task_type!r} with {len(cluster[task_type])} task(s) "
                         f"(allowed 0..{len(cluster[task_type]) - 1}).")
    chief = cluster["chief"][0] if "chief" in cluster else cluster["worker"][0]
    return {"cluster": cluster, "task_type": task_type, "task_index": index,
            "num_tasks": sum(len(a) for a in cluster.values()), "chief_address": chief}


def _is_chief_task(task_type, task_index, cluster):
    return task_type == "chief" or (task_type == "worker" and task_index == 0
                                    and "chief" not in cluster)


def wait_for_chief(address, timeout, interval=0.5):
    """Blocks until a TCP connection to ``address`` (``'host:port'``) succeeds.

    Raises:
      TimeoutError: naming the address when it does not accept a connection within ``timeout``
        seconds (an unknown host fails the same way).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(
                    interval * 4, deadline - time.monotonic()))):
                return
        except OSError as e:
            last_error = e
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    raise TimeoutError(
        f"the chief of the TF_CONFIG cluster at {address} did not accept a connection within "
        f"{timeout:g} s ({last_error}); start the chief (or worker 0) with the same cluster, or "
        "raise get_strategy.timeout.")


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` also takes nested structures.

    Keras 3's `fit` (``TensorFlowTrainer._maybe_symbolic_build``) calls
    ``strategy.reduce("MEAN", batch)`` on the first ``(x, y)`` batch, a tuple of `PerReplica`
    values; `MirroredStrategy` maps over the structure, but the multi-worker strategy passes the
    tuple to its collective ops, which fail ("Attempt to convert a value (PerReplica ...) to a
    Tensor", Keras 3.15, TF 2.21). Reducing leaf by leaf is what `MirroredStrategy` does.
    Keras' train step then reduces every log value with ``reduce("MEAN", v, axis=0)``, which
    fails for scalars (the per-replica losses and metric results); a scalar is averaged over the
    replicas only (``axis=None``), as Keras does for `MirroredStrategy`.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def reduce_one(v):
            local = self.experimental_local_results(v)[0]
            scalar = getattr(getattr(local, "shape", None), "rank", None) == 0
            return parent.reduce(reduce_op, v, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def _multi_worker_strategy(tf_config, communication, timeout):
    """`MultiWorkerMirroredStrategy`; a worker first waits up to ``timeout`` s for the chief."""
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=COMMUNICATIONS[communication])
    if tf_config is None or tf_config["num_tasks"] < 2:
        return _MultiWorkerMirroredStrategy(communication_options=options)
    cluster = tf_config["cluster"]
    if not _is_chief_task(tf_config["task_type"], tf_config["task_index"], cluster):
        # The chief starts its server first thing; a worker whose chief never comes up would
        # otherwise wait for it in the coordination service for an hour.
        wait_for_chief(tf_config["chief_address"], timeout)
    return _MultiWorkerMirroredStrategy(communication_options=options)


@gin.configurable
def get_strategy(name="mirrored", devices=None, communication="auto", timeout=120.0):
    """Returns a `tf.distribute.Strategy`.

    Args:
      name: ``'mirrored'``: `MirroredStrategy` over ``devices`` (default: all local GPUs), or,
        when ``TF_CONFIG`` describes a cluster of two or more tasks, ``'multi_worker'``;
        ``'multi_worker'``: `MultiWorkerMirroredStrategy` over the ``TF_CONFIG`` cluster (each
        worker's local GPUs, else its CPU; without ``TF_CONFIG`` one local worker);
        ``'one_device'``: ``devices[0]`` (default the first GPU, else CPU:0); ``'default'``: no
        distribution.
      devices: optional list of device names, e.g. ``['GPU:0', 'GPU:1']`` (not for
        ``'multi_worker'``, which uses every local GPU of each worker).
      communication: multi-worker collectives: ``'auto'``, ``'ring'`` (gRPC, CPU or GPU) or
        ``'nccl'`` (GPUs).
      timeout: seconds a multi-worker task other than the chief waits for the chief's address
        to accept a connection before creating the strategy; then `TimeoutError` naming the
        address. (The chief itself waits for its workers in TensorFlow's coordination service,
        which this does not bound.)

    ``'mirrored'`` over a single device returns the default strategy instead: one replica is the
    same computation, and Keras' `fit` under a one-replica `MirroredStrategy` or
    `OneDeviceStrategy` measured 2-2.8x slower per PGD-AT step on CPU (see BUILD.md,
    "Distribution"). Name the devices explicitly to force a strategy.

    A multi-worker strategy must be created before any other TensorFlow operation of the
    process (`tfadv.train.train` creates it first).

    Raises:
      ValueError: an unknown name or communication, a non-positive timeout, devices with
        ``'multi_worker'``, or a malformed ``TF_CONFIG`` (see `parse_tf_config`).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy name must be one of {STRATEGIES}; got {name!r}.")
    if communication not in COMMUNICATIONS:
        raise ValueError(f"get_strategy.communication must be one of {sorted(COMMUNICATIONS)}; "
                         f"got {communication!r}.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"get_strategy.timeout must be a number of seconds > 0; got {timeout!r}.")
    tf_config = parse_tf_config()
    if name == "mirrored" and tf_config is not None and tf_config["num_tasks"] > 1:
        logging.info("TF_CONFIG names %d tasks: using the multi_worker strategy",
                     tf_config["num_tasks"])
        name = "multi_worker"
    if name == "multi_worker":
        if devices:
            raise ValueError("get_strategy.devices cannot be set for the multi_worker strategy "
                             f"(it uses each worker's local GPUs, else its CPU); got {devices!r}.")
        return _multi_worker_strategy(tf_config, communication, timeout)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = _local_accelerators()
        device = (devices or [gpus[0] if gpus else "/cpu:0"])[0]
        return tf.distribute.OneDeviceStrategy(device)
    resolved = list(devices) if devices else _local_accelerators()
    if len(resolved) <= 1 and not devices:
        logging.info("mirrored strategy over %s device(s): using the default strategy",
                     max(1, len(resolved)))
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(resolved)


def is_chief(strategy):
    """True unless ``strategy`` is multi-worker and this task is not its chief (the task of type
    ``chief``, or worker 0 when the cluster has no chief)."""
    extended = strategy.extended
    if not getattr(extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = extended._task_type, extended._task_id
    return _is_chief_task(task_type, task_id, extended._cluster_spec.as_dict())


def worker_dir(model_dir, strategy):
    """Where this task writes: ``model_dir`` on the chief, else a new temporary directory
    (delete it with `remove_worker_dir` once training and saving are done)."""
    if is_chief(strategy):
        return model_dir
    extended = strategy.extended
    return tempfile.mkdtemp(prefix=f"tfadv-{extended._task_type}{extended._task_id}-")


def remove_worker_dir(directory, model_dir):
    """Deletes a non-chief's `worker_dir` (does nothing when it is ``model_dir``)."""
    if os.path.abspath(directory) != os.path.abspath(model_dir):
        shutil.rmtree(directory, ignore_errors=True)
