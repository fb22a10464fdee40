"""ray_cluster.yaml against Ray's own schema, and studies on Ray clusters of several nodes started on this
machine: two CPU nodes; a worker with two logical GPUs (trials two or four at a time); a worker node
killed mid-trial; the driver killed mid-study. How trials are sized to a cluster's nodes (trial_resources)."""
import copy
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import mlflow
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orestudy.config import REPO_ROOT, TrainConfig

CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"


def validated(config: dict) -> dict:
    """What `ray up` does to a config before launching anything: fill in the provider's defaults,
    then validate against ray/autoscaler/ray-schema.json and the cross-field rules."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_cluster_config_validation():
    config = validated(yaml.safe_load(CLUSTER_YAML.read_text()))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and config["head_node_type"] == "head"
    assert "/data/minerals" in config["file_mounts"]
    assert any("orestudy" in command for command in config["setup_commands"])
    assert any("MLFLOW_TRACKING_URI" in command for command in config["head_start_ray_commands"])


@pytest.mark.parametrize("typo", ["top-level key", "node type key"])
def test_a_typo_in_the_cluster_yaml_fails_validation(typo):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    if typo == "top-level key":
        config["setup_comands"] = config.pop("setup_commands")
    else:
        worker = config["available_node_types"]["gpu_worker"]
        worker["min_worker"] = worker.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        validated(config)


# ---------------------------------------------------------------------------------------------------
# Two Ray nodes on loopback, each with its own CPU, and a tiny study driven against them

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(log: Path, env: dict, *options: str, cpus: int = 1) -> subprocess.Popen:
    """`ray start --block` in its own process group: SIGTERM to it stops every process of that node."""
    with log.open("w") as out:
        node = subprocess.Popen(["nice", "-n", "15", sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                                 "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(free_port()),
                                 "--metrics-export-port", str(free_port()), *options],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while "Ray runtime started" not in log.read_text():
        if node.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return node


def stop_node(node: subprocess.Popen) -> None:
    if node.poll() is None:
        node.terminate()  # ray start --block drains the node and stops the processes it started
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)  # whatever of that process group is left
    except ProcessLookupError:
        pass


@pytest.fixture
def two_node_cluster(tmp_path):
    # Token authentication on every node and the driver (Ray enables it for local clusters by default).
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    nodes = []
    try:
        nodes.append(start_node(tmp_path / "head.log", env, "--head", "--port", str(port),
                                "--include-dashboard", "false", "--temp-dir", temp_dir))
        nodes.append(start_node(tmp_path / "worker.log", env, "--address", f"127.0.0.1:{port}"))
        yield f"127.0.0.1:{port}", env
    finally:
        for node in reversed(nodes):
            stop_node(node)
        subprocess.run(["rm", "-rf", temp_dir])


@pytest.mark.slow
def test_study_on_a_two_node_cluster(two_node_cluster, image_folder, tmp_path):
    address, env = two_node_cluster
    grid = {"paper": {"epochs": 2, "lr": 1e-3, "batch_size": 8, "dropout": 0.5, "reduction": 4, "image_size": 64},
            "seeds": [1], "schedules": {"unfrozen": 0},
            "tables": {"tiny": {"title": "Tiny", "cells": [
                {"backbone": "mobilenet_v2", "regime": "scratch", "schedule": "unfrozen"}]}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    output = tmp_path / "runs"  # on a real cluster: a shared folder or an s3:// storage path
    study = subprocess.run(
        [sys.executable, "-m", "orestudy.replicate", "--address", address, "--grid", str(tmp_path / "grid.yaml"),
         "--data", str(image_folder), "--runs", str(output), "--cache", str(tmp_path / "cache"),
         "--seeds", "1,2,3,4", "--name", "cluster"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=400)
    log = study.stdout + study.stderr
    assert study.returncode == 0, log[-4000:]

    # Trials ran on both nodes: one CPU each, so one trial per node at a time.
    finals = []
    for result_file in (output / "ray_results" / "cluster").glob("*/result.json"):
        finals.append(json.loads(result_file.read_text().splitlines()[-1]))
    assert [f["status"] for f in finals] == ["ok"] * 4
    assert len({f["placement"]["node_id"] for f in finals}) == 2, log[-4000:]
    assert all("device_fallback" not in f for f in finals)  # handed no GPU, the CPU is no fallback
    # Results came back to the driver: the table, and the MLflow runs in the driver's store.
    assert "n=4; 95% CI" in (output / "cluster" / "report" / "report.md").read_text()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("orestudy").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "cluster"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4
    assert all(r.data.params["threads"] == "1" for r in children)


# ---------------------------------------------------------------------------------------------------
# Logical GPUs: a head that declares none and a worker node that declares two (`ray start --num-gpus 2`).
# Ray schedules and hands out GPU ids as it would on GPU machines; torch here sees no CUDA behind them.

TINY_GRID = {"paper": {"epochs": 2, "lr": 1e-3, "batch_size": 8, "dropout": 0.5, "reduction": 4, "image_size": 64},
             "seeds": [1], "schedules": {"unfrozen": 0},
             "tables": {"tiny": {"title": "Tiny", "cells": [
                 {"backbone": "mobilenet_v2", "regime": "scratch", "schedule": "unfrozen"}]}}}
# Ray marks a node dead after this many missed 1 s health checks (Ray's defaults: 5 missed 3 s checks), so
# that a killed node is noticed in seconds; only the test nodes get these.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}
# Every trial line the driver forwards, not deduplicated: Ray drops the tokens with digits before comparing
# lines, so "[..._s2] resuming after epoch 1/8" passed for a repeat of "[..._s1] resuming after epoch 3/8"
# and was not printed (the node-loss test failed on 2 of 7 runs)
EVERY_LINE = {"RAY_DEDUP_LOGS": "0"}
# What a trial's record says of where and how long it ran, not of what it computed
WHERE_AND_WHEN = ("wall_seconds", "epoch_seconds", "device_fallback")


class Cluster:
    """A head node without GPUs on loopback, and worker nodes added, killed and stopped by the test."""

    def __init__(self, tmp_path: Path):
        self.logs, self.nodes = tmp_path / "nodes", []
        self.logs.mkdir()
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                    "ORESTUDY_OFFLINE": "1", **FAST_NODE_DEATH, **EVERY_LINE}
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths must fit 107 bytes
        self.address = f"127.0.0.1:{free_port()}"
        self.start("head", "--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                   "--temp-dir", self.temp_dir, "--num-gpus", "0")

    def start(self, role: str, *options: str, cpus: int = 1) -> subprocess.Popen:
        node = start_node(self.logs / f"{role}.log", self.env, *options, "--labels", f"role={role}", cpus=cpus)
        self.nodes.append(node)
        return node

    def add_worker(self, role: str, gpus: int, cpus: int) -> subprocess.Popen:
        return self.start(role, "--address", self.address, "--num-gpus", str(gpus), cpus=cpus)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            stop_node(node)
        subprocess.run(["rm", "-rf", self.temp_dir])


@pytest.fixture
def gpu_cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def study_command(cluster: Cluster, folder: Path, tmp_path: Path, name: str, *options: str, epochs: int = 2) -> list:
    """`orestudy replicate` of the tiny grid on the cluster, its runs and MLflow store in tmp_path/runs."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**TINY_GRID, "paper": {**TINY_GRID["paper"], "epochs": epochs}}))
    return [sys.executable, "-m", "orestudy", "replicate", "--address", cluster.address, "--grid", str(grid),
            "--data", str(folder), "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
            "--name", name, *options]


def reports(tmp_path: Path, name: str) -> dict[str, list[dict]]:
    """Every report Tune took in from each trial (its result.json, whole lines: the driver may be writing
    it), by run name, in order."""
    folders = [f for f in (tmp_path / "runs" / "ray_results" / name).glob("*/") if (f / "result.json").exists()]
    return {f.name.rsplit("_", 2)[0]: [json.loads(line) for line in (f / "result.json").read_text().split("\n")[:-1]]
            for f in folders}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one ending as another starts: not both open)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def trial_records(tmp_path: Path, name: str) -> list[dict]:
    """The study's portable trial records (its report's trials.jsonl), as JSON."""
    path = tmp_path / "runs" / name / "report" / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def mlflow_runs(tmp_path: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("orestudy").experiment_id])


NODES = {"head": {"CPU": 1.0}, "gpu-worker": {"CPU": 4.0, "GPU": 2.0}}


@pytest.mark.parametrize("options, nodes, expected", [
    ({}, NODES, {"cpu": 2, "gpu": 1.0}),  # a GPU each, and half the CPUs of a node that runs two
    ({"gpus_per_trial": 0.5}, NODES, {"cpu": 1, "gpu": 0.5}),
    ({"gpus_per_trial": 1.0, "cpus_per_trial": 3}, NODES, {"cpu": 3, "gpu": 1.0}),
    ({}, {"head": {"CPU": 1.0}, "worker": {"CPU": 4.0}}, {"cpu": 1}),  # no GPU: a whole (smallest) node
    # ray_cluster.yaml before the autoscaler starts a worker: a head without CPUs; a trial asks for a worker
    ({"gpus_per_trial": 1.0, "cpus_per_trial": 8}, {"head": {"CPU": 0.0}}, {"cpu": 8, "gpu": 1.0}),
], ids=["one-gpu", "half-gpu", "cpus-given", "cpu-only", "autoscaling"])
def test_trial_resources_share_a_nodes_gpus_and_cpus(monkeypatch, tmp_path, options, nodes, expected):
    from orestudy.studies import study

    alive = [{"Alive": True, "Resources": resources} for resources in nodes.values()]
    monkeypatch.setattr(study.ray, "nodes", lambda: [*alive, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}])
    assert study.trial_resources(study.StudySettings(data=str(tmp_path), **options)) == expected


def test_trial_resources_ask_what_a_trial_needs_where_no_node_has_a_cpu_yet(monkeypatch, tmp_path):
    from orestudy.studies import study

    monkeypatch.setattr(study.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 0.0}}])
    with pytest.raises(ValueError, match="--gpus-per-trial 1 --cpus-per-trial 8"):
        study.trial_resources(study.StudySettings(data=str(tmp_path)))


def test_device_auto_says_why_it_cannot_use_the_gpus_it_was_handed(monkeypatch):
    from orestudy import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device.gpus_unusable("auto") == ""  # handed no GPU: the CPU, as expected
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as Ray sets it for a trial given GPU 1
    assert device.gpus_unusable("auto") == device.cuda_missing() != ""
    assert "CUDA" in device.gpus_unusable("auto") and device.gpus_unusable("cpu") == ""


# One GPU each, on one CPU each: the node's 4 CPUs would run four, its 2 GPUs run two. Half a GPU each
# takes the node's share of CPUs (4 / 4). Six epochs: the trials' workers start seconds apart on 2 busy
# cores, and those that may run at once must be seen doing so.
@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("gpus_per_trial, options, at_once, seeds", [
    (1, ("--cpus-per-trial", "1"), 2, "1,2,3"), (0.5, (), 4, "1,2,3,4")], ids=["one-gpu-each", "half-a-gpu-each"])
def test_trials_share_a_nodes_logical_gpus(gpu_cluster, image_folder, tmp_path, gpus_per_trial, options, at_once,
                                           seeds):
    """Trials on a worker with two logical GPUs and four CPUs: with one GPU each, two at a time (the
    third waits), with half a GPU each, four, as the trials' own start and end times show; never on the
    head; each trial's threads are the CPUs it holds; each records the GPU ids Ray gave it and, on this
    machine without CUDA, says that device auto fell back to the CPU."""
    gpu_cluster.add_worker("gpu-worker", gpus=2, cpus=4)
    study = subprocess.run(study_command(gpu_cluster, image_folder, tmp_path, "gpus", "--seeds", seeds,
                                         "--gpus-per-trial", str(gpus_per_trial), *options, "--no-mlflow",
                                         epochs=6),
                           capture_output=True, text=True, env=gpu_cluster.env, cwd=REPO_ROOT, timeout=400)
    log = study.stdout + study.stderr
    (tmp_path / "driver.log").write_text(log)
    assert study.returncode == 0, log[-4000:]

    finals = [rows[-1] for rows in reports(tmp_path, "gpus").values()]
    assert [f["status"] for f in finals] == ["ok"] * len(seeds.split(","))
    intervals = [(f["attempt_started"], f["reported_at"]) for f in finals]
    assert most_at_once(intervals) == at_once, intervals
    for gpu in ("0", "1"):  # a GPU id is shared by at most 1 / gpus_per_trial trials at a time
        mine = [i for i, f in zip(intervals, finals) if f["placement"]["gpu_ids"] == [gpu]]
        assert 1 <= most_at_once(mine) <= 1 / gpus_per_trial
    for f in finals:  # one CPU each: given, or the node's 4 shared by 4
        where = f["placement"]
        assert where["node_labels"]["role"] == "gpu-worker"  # none on the head
        assert where["resources"] == {"CPU": 1, "GPU": gpus_per_trial} and f["threads"] == 1
        assert where["gpu_ids"] in (["0"], ["1"]) and where["cuda_visible_devices"] == where["gpu_ids"][0]
        assert (f["device_requested"], f["device"]) == ("auto", "cpu")
        assert f["device_fallback"] == f"no CUDA GPU is visible (CUDA_VISIBLE_DEVICES='{where['gpu_ids'][0]}')"
    assert "device auto: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES=" in log
    assert all(r["metrics"]["device"] == "cpu" and "CUDA" in r["metrics"]["device_fallback"]
               for r in trial_records(tmp_path, "gpus"))


# ---------------------------------------------------------------------------------------------------
# A node lost mid-study, and the driver lost mid-study

def watch(command: list, env: dict) -> tuple[subprocess.Popen, list[str]]:
    """The driver started in its own process group, its output collected line by line as it comes."""
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=REPO_ROOT, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(driver.stdout.readline, "")), daemon=True).start()
    return driver, lines


def wait_for(condition, driver: subprocess.Popen, lines: list[str], seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert driver.poll() is None and time.time() < deadline, "".join(lines)[-4000:]
        time.sleep(0.05)


def epochs_reported(tmp_path: Path, name: str) -> dict[str, list[int]]:
    """The epochs each trial has reported so far, by run name."""
    return {trial: [int(r["epoch"]) for r in rows if r.get("epoch")] for trial, rows in reports(tmp_path, name).items()}


def unbroken(record: dict, folder: Path, tmp_path: Path) -> dict:
    """The trial record of record's configuration trained here in one go (threads as the trial had them),
    as a study would have recorded it."""
    from orestudy.run.training import run_experiment
    from orestudy.studies import study

    config = TrainConfig.from_dict({**record["config"], "data": str(folder), "cache": str(tmp_path / "cache"),
                                    "output": str(tmp_path / "unbroken"), "threads": record["metrics"]["threads"],
                                    "mlflow": False, "progress": False})
    rows = []
    result = run_experiment(config, lambda row, state: rows.append(row))
    trial = study.Trial(record["config"], "ok", {**result, "status": "ok"}, rows)
    return json.loads(json.dumps(trial.record(record["dataset"])))  # as trials.jsonl keeps it


def without(record: dict, keys: tuple) -> dict:
    """record less keys in its metrics and history rows."""
    return {**record, "metrics": {k: v for k, v in record["metrics"].items() if k not in keys},
            "history": [{k: v for k, v in row.items() if k not in keys} for row in record["history"]]}


# Enough epochs that the trials are still running when the node is killed after their first report (three
# were not, once the machine was quiet).
EPOCHS = 8


@pytest.mark.slow
@pytest.mark.cluster
def test_a_node_lost_mid_trial_ends_in_the_records_of_an_unbroken_study(gpu_cluster, image_folder, tmp_path):
    """SIGKILL to a worker node's processes once a trial on it has reported an epoch; a new worker node
    joins: every trial it cut continues from its last checkpoint in its own MLflow run, the driver says
    which trial lost its worker and the epoch it continues after, and the study's records are those of
    the same trials run unbroken."""
    lost = gpu_cluster.add_worker("gpu-worker-1", gpus=2, cpus=2)
    driver, lines = watch(study_command(gpu_cluster, image_folder, tmp_path, "lost", "--seeds", "1,2",
                                        "--gpus-per-trial", "1", epochs=EPOCHS), gpu_cluster.env)
    try:
        wait_for(lambda: any(epochs_reported(tmp_path, "lost").values()), driver, lines)
        os.killpg(lost.pid, signal.SIGKILL)  # the node, as a machine that vanishes: no drain, no goodbye
        gpu_cluster.add_worker("gpu-worker-2", gpus=2, cpus=2)
        driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = "".join(lines)
    (tmp_path / "driver.log").write_text(log)
    assert driver.returncode == 0, log[-4000:]

    retried = dict(re.findall(r"\[study\] trial (\S+) lost its Ray worker \(The actor died because its node has "
                              r"died\.[^)]*\): retried from (.+) \(failure 1 of 2 allowed\)", log))
    assert retried, log[-4000:]  # at least the trial that had reported an epoch was cut
    for name, rows in reports(tmp_path, "lost").items():
        on = {node: [r["epoch"] for r in rows if r["placement"]["node_labels"]["role"] == node and r.get("epoch")]
              for node in ("gpu-worker-1", "gpu-worker-2")}
        if name not in retried:  # a trial that finished on the lost node before it died
            assert rows[-1]["placement"]["node_labels"]["role"] == "gpu-worker-1" and rows[-1]["status"] == "ok"
            assert on["gpu-worker-1"] == list(range(1, EPOCHS + 1)) and not on["gpu-worker-2"]
            continue
        assert rows[-1]["placement"]["node_labels"]["role"] == "gpu-worker-2" and rows[-1]["status"] == "ok"
        after = re.fullmatch(r"its checkpoint after epoch (\d+)|its first epoch", retried[name]).group(1)
        last = int(after or 0)  # the last epoch it reported before the node died (its checkpoint's)
        assert last == 0 or f"[{name}] resuming after epoch {last}/{EPOCHS}" in log
        # Tune's copy of the reports (result.json) comes back from storage for the retry: it may lack the
        # last ones before the loss; the trial record's epochs (compared below with an unbroken run) do not.
        assert on["gpu-worker-1"] == list(range(1, len(on["gpu-worker-1"]) + 1)) and len(on["gpu-worker-1"]) <= last
        assert on["gpu-worker-2"] == list(range(last + 1, EPOCHS + 1))  # continued after it, not started again
    records = trial_records(tmp_path, "lost")
    assert len(records) == 2
    for record in records:
        assert without(record, WHERE_AND_WHEN) == without(unbroken(record, image_folder, tmp_path), WHERE_AND_WHEN)
    runs = mlflow_runs(tmp_path)
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 3  # the study's, one per trial
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for run in runs:
        if run.info.run_name != "lost":
            assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")}) == list(range(1, EPOCHS + 1))


def killed_when(condition, command: list, env: dict) -> str:
    """The driver run until condition(its output so far) holds, then killed (SIGKILL: its machine gone, or
    kill -9, no chance to save anything); its output."""
    driver, lines = watch(command, env)
    try:
        wait_for(lambda: condition("".join(lines)), driver, lines)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return "".join(lines)


def finished(output: str) -> list[str]:
    return re.findall(r"\[study\] trial (\S+) finished: ok", output)


def saved_status(tmp_path: Path, name: str) -> dict[str, str]:
    """Each trial's status in the study's saved state (what a resumed study starts from), by run name."""
    from ray.tune import ExperimentAnalysis

    from orestudy.studies import study

    analysis = ExperimentAnalysis(str(tmp_path / "runs" / "ray_results" / name))
    return {study.run_name(trial): trial.status for trial in analysis.trials}


@pytest.mark.slow
@pytest.mark.cluster
def test_a_driver_lost_mid_study_resumes_on_the_cluster(gpu_cluster, image_folder, tmp_path):
    """SIGKILL to the driver (the replicate process) as its first trial finishes, and again once the next
    trial has reported an epoch; each time the same command with --resume: the finished trial is not run
    again (reported again from its run folder where the driver died before its saved state said the
    trial had ended), the cut one continues after its last checkpoint in its own MLflow run, and the
    study keeps its run."""
    gpu_cluster.add_worker("gpu-worker", gpus=1, cpus=1)  # one trial at a time
    # The study's state is saved whenever a trial reports a checkpoint (Tune does so after every such
    # report), not also every 10 s: a trial that has just finished may stay running in it until the next.
    env = {**gpu_cluster.env, "TUNE_GLOBAL_CHECKPOINT_S": "600"}
    command = study_command(gpu_cluster, image_folder, tmp_path, "cut", "--seeds", "1,2", epochs=3)
    names = {f"mobilenet_v2_scratch_f0_e3_s{seed}" for seed in (1, 2)}

    (done,) = finished(killed_when(finished, command, env))
    (cut,) = names - {done}
    done_saved = saved_status(tmp_path, "cut")[done]
    second = killed_when(lambda out: epochs_reported(tmp_path, "cut").get(cut), [*command, "--resume"], env)
    again = f"[{done}] finished before the study was cut: its result is reported, not run again"
    assert (again in second) == (done_saved != "TERMINATED"), (done_saved, second[-4000:])
    last = max(epochs_reported(tmp_path, "cut")[cut])
    assert last < 3, second[-4000:]

    third = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=400)
    after = third.stdout + third.stderr
    (tmp_path / "resumed.log").write_text(second + after)
    assert third.returncode == 0, after[-4000:]
    for line in ("epoch", "resuming", "test accuracy"):  # neither trained nor evaluated again
        assert f"[{done}] {line}" not in second + after
    resumed = int(re.search(rf"\[{cut}\] resuming after epoch (\d)/3", after).group(1))
    assert 1 <= resumed <= last  # the checkpoint the driver had recorded: its last, or (cut in between) the one before
    assert sorted({int(e) for e in re.findall(rf"\[{cut}\] epoch (\d)/3", after)}) == list(range(resumed + 1, 4))
    records = trial_records(tmp_path, "cut")
    assert sorted(r["status"] for r in records) == ["ok", "ok"]
    assert all([h["epoch"] for h in r["history"]] == [1, 2, 3] for r in records)
    runs = mlflow_runs(tmp_path)  # the study's run and one per trial, the cut one continued
    assert sorted(r.info.run_name for r in runs) == sorted([*names, "cut"])
    assert {r.info.status for r in runs} == {"FINISHED"}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for run in runs:
        if run.info.run_name != "cut":
            assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")}) == [1, 2, 3]
