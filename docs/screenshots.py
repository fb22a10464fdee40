"""Screenshots of MLflow's UI, for the docs (docs/usage/tracking.md): the experiment's runs in orestudy's
saved view, a training run's overview, metric charts and artifacts, and (with --study) a study's run.

    orestudy train --freeze-epochs 20 --epochs 20 --runs /tmp/shots --name frozen20
    orestudy replicate --only table4 --backbones mobilenet_v2 --seeds 1,2 --epochs 3 --runs /tmp/shots --name study
    python docs/screenshots.py --runs /tmp/shots --study study --output docs/figures

Starts `mlflow server` on 127.0.0.1 over the run folder's store and photographs its pages with headless
Chromium (Debian's `chromium` package). The UI is a JavaScript app, so Chromium is given virtual time
to fetch and draw before each shot. Look at every PNG: on a busy machine the metric charts (WebGL drawn
in software) can still be spinners; run it again (or with a larger --wait-ms) until they are drawn.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow

RUN_PAGES = {"mlflow_run_overview.png": "", "mlflow_run_metrics.png": "/model-metrics",
             "mlflow_run_artifacts.png": "/artifacts/confusion_matrix.png"}
SAVED_VIEW = "orestudy"  # tracking.SAVED_VIEW, the runs with their scores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_run(store: str, experiment: str, name: str, kind: str = "run") -> tuple[str, str]:
    """(experiment id, run id) of the newest finished training run (kind "run") or study run (kind
    "study"), of the given name if one is given."""
    client = mlflow.MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"no experiment {experiment!r} in {store}")
    query = "attributes.status = 'FINISHED'" + (f" and attributes.run_name = '{name}'" if name else "")
    runs = [r for r in client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"])
            if ("orestudy.study" in r.data.tags) == (kind == "study")]
    if not runs:
        sys.exit(f"no finished {kind} run{' named ' + name if name else ''} in experiment {experiment!r} of {store}")
    return found.experiment_id, runs[0].info.run_id


def serve(store: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                sys.exit("mlflow server exited at start")
            time.sleep(2)
    server.terminate()
    sys.exit("mlflow server did not answer within 300 s")


def screenshot(chromium: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    """wait_ms 0: a shot at the load event, which only warms the server (a first visit under virtual time
    can stall while the server sends the UI's scripts for the first time)."""
    # The metric charts are drawn with WebGL: without a GPU, Chromium's software GL (SwiftShader) draws them;
    # with --disable-gpu they stay spinners.
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                    "--hide-scrollbars",
                    f"--window-size={size}", *([f"--virtual-time-budget={wait_ms}"] if wait_ms else []),
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=180)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="output folder of the run (holds mlflow.db)")
    parser.add_argument("--experiment", default="orestudy")
    parser.add_argument("--name", default="", help="run name (default: the newest finished training run)")
    parser.add_argument("--study", default="", help="also photograph this study's run (replicate or search --name)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "figures")
    parser.add_argument("--window-size", default="1600,1100")
    parser.add_argument("--wait-ms", type=int, default=90000, help="virtual time the page gets to draw (its metric "
                        "charts, drawn with WebGL in software, may still spin at 40 s)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("chromium not found: apt-get install chromium")
    if not (args.runs / "mlflow.db").is_file():
        parser.error(f"no MLflow store at {args.runs / 'mlflow.db'}")
    store = f"sqlite:///{(args.runs / 'mlflow.db').resolve()}"
    experiment_id, run_id = latest_run(store, args.experiment, args.name)
    port = free_port()
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"
    # MLflow 3.17's UI opens in its GenAI mode unless told otherwise (workflowType), whatever the experiment's kind
    mode = "workflowType=machine_learning"
    pages = {"mlflow_runs.png": f"{base}/runs?viewStateShareKey={SAVED_VIEW}&{mode}",
             **{file: f"{base}/runs/{run_id}{page}?{mode}" for file, page in RUN_PAGES.items()}}
    if args.study:
        pages["mlflow_study_overview.png"] = f"{base}/runs/{latest_run(store, args.experiment, args.study, 'study')[1]}?{mode}"
    server = serve(store, port)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        for file, url in pages.items():
            with tempfile.TemporaryDirectory() as tmp:  # the page once just before, else its charts may still spin
                screenshot(chromium, url, Path(tmp) / "warm.png", args.window_size, 0)
            screenshot(chromium, url, args.output / file, args.window_size, args.wait_ms)
            print(f"wrote {args.output / file} ({url})")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
