"""ray_cluster.yaml against Ray's own schema, and a study on a two-node Ray cluster on this machine."""
import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import mlflow
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orestudy.config import REPO_ROOT

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


def start_node(log: Path, env: dict, *options: str) -> subprocess.Popen:
    """`ray start --block` in its own process group: SIGTERM to it stops every process of that node."""
    with log.open("w") as out:
        node = subprocess.Popen(["nice", "-n", "15", sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
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
    assert len({f["node_id"] for f in finals}) == 2, log[-4000:]
    # Results came back to the driver: the table, and the MLflow runs in the driver's store.
    assert "n=4; 95% CI" in (output / "cluster" / "report" / "report.md").read_text()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("orestudy").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "cluster"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4
    assert all(r.data.params["threads"] == "1" for r in children)
