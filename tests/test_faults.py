"""Faults a run meets, each one line and nothing left RUNNING: odd file names, data or models that cannot
be trained (refused before a run folder is made), a NaN loss, Ctrl-C and kill -9 of `train`, Ctrl-C of
`search`; and what a run says: its opening summary, where it went, and no library noise."""
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from orestudy import data, tracking
from orestudy.commands import train as train_face
from orestudy.config import REPO_ROOT
from orestudy.run import training
from conftest import png_folder, with_ctrl_c
from test_training import tiny_config

TINY = ["--regime", "scratch", "--attention", "none", "--freeze-epochs", "0", "--epochs", "1", "--image-size", "64",
        "--batch-size", "8", "--threads", "1"]


@pytest.fixture
def no_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store in the run's output (conftest restores)


def runs_in(output, experiment="orestudy") -> list:
    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orestudy", *args]


def environment() -> dict:
    """This checkout's orestudy, the store in each command's output."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO_ROOT)}


def lines_until(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    """Read the process's merged output until a line holding text (or its end)."""
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)[-3000:]}")


def test_a_file_name_that_is_not_utf8_trains_and_logs(tmp_path, no_tracking_uri):
    folder = png_folder(tmp_path / "minerals")
    os.rename(folder / "azurite" / "azurite_0.png", os.fsencode(folder / "azurite") + b"/bad\xff\xfename.png")
    config = tiny_config(folder, tmp_path, mlflow=True, epochs=1, freeze_epochs=1)
    result = training.run_experiment(config)
    (run,) = runs_in(tmp_path / "runs")
    assert run.info.status == "FINISHED" and run.data.metrics["test/accuracy"] == result["accuracy"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "minerals-seed231"


def test_a_run_whose_tracking_cannot_be_set_up_ends_failed(tmp_path, no_tracking_uri, monkeypatch):
    folder = png_folder(tmp_path / "minerals")

    def broken(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(tracking, "log_split", broken)
    with pytest.raises(UnicodeDecodeError):
        training.run_experiment(tiny_config(folder, tmp_path, mlflow=True, epochs=1, freeze_epochs=1))
    assert [r.info.status for r in runs_in(tmp_path / "runs")] == ["FAILED"]


def refusals(tmp_path, output):
    """(what, argv, the error's words) of runs refused before a run folder is made."""
    good = png_folder(tmp_path / "good")
    bad = png_folder(tmp_path / "bad")  # its split manifest no longer matches it
    manifest = output / "splits" / data.manifest_name(bad, data.scan_folder(bad)[0], 231, "hash")
    manifest.parent.mkdir(parents=True)
    manifest.write_text("path,sha256,label,split,group\nazurite/gone.png,0,azurite,test,0\n")
    one = tmp_path / "one"
    (one / "azurite").mkdir(parents=True)
    for path in (good / "azurite").iterdir():
        (one / "azurite" / path.name).write_bytes(path.read_bytes())
    small = png_folder(tmp_path / "small")
    for path in list((small / "pyrite").iterdir())[1:]:  # one photo left: no test or validation photo
        path.unlink()
    return [("one class", ["--data", str(one)], "has one class (azurite): a classifier needs"),
            ("too small a class", ["--data", str(small)], "class 'pyrite' has 1 images"),
            ("no data folder", ["--data", str(tmp_path / "missing")], "missing"),
            ("bad manifest", ["--data", str(bad)], "does not match the data"),
            ("unknown timm model", ["--data", str(good), "--backbone", "timm/not_a_model"],
             "unknown backbone 'timm/not_a_model'")]


def test_refused_runs_say_one_line_and_leave_no_run_folder(tmp_path, capsys):
    output = tmp_path / "out"
    for what, argv, words in refusals(tmp_path, output):
        with pytest.raises(SystemExit) as stop:
            train_face.main([*argv, *TINY, "--runs", str(output), "--name", "mine", "--no-mlflow",
                             "--cache", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and words in err, what
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (output / "mine").exists(), what  # the name stays free


def test_a_nan_loss_is_one_line_and_its_mlflow_run_failed(tmp_path, capsys, monkeypatch, no_tracking_uri):
    folder = png_folder(tmp_path / "minerals")
    loss_of = training.loss_of
    monkeypatch.setattr(training, "loss_of", lambda *args: (loss_of(*args)[0] * float("nan"), loss_of(*args)[1]))
    with pytest.raises(SystemExit) as stop:
        train_face.main(["--data", str(folder), *TINY, "--runs", str(tmp_path / "runs"), "--cache", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "training loss is nan" in err[-1] and "Traceback" not in "".join(err)
    assert [r.info.status for r in runs_in(tmp_path / "runs")] == ["FAILED"]


def test_ctrl_c_says_how_to_resume_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch, no_tracking_uri):
    folder = png_folder(tmp_path / "minerals")
    argv = ["--data", str(folder), *TINY, "--epochs", "2", "--runs", str(tmp_path / "runs"), "--cache", "",
            "--name", "stopped"]
    fit_step = training.fit_step

    def interrupted(run, progress, tracker, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return fit_step(run, progress, tracker, epoch)

    monkeypatch.setattr(training, "fit_step", interrupted)
    with pytest.raises(SystemExit) as stop:
        train_face.main(argv)
    run_dir = tmp_path / "runs" / "stopped"
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f" interrupted after epoch 1: `orestudy train --resume {run_dir}` "
                                                 f"continues it")
    assert [r.info.status for r in runs_in(tmp_path / "runs")] == ["KILLED"]
    monkeypatch.setattr(training, "fit_step", fit_step)
    result = train_face.main(["--resume", str(run_dir)])
    assert result["epochs_run"] == 2 and [r.info.status for r in runs_in(tmp_path / "runs")] == ["FINISHED"]


def test_a_new_run_in_a_killed_runs_folder_ends_its_stale_mlflow_run(tmp_path, no_tracking_uri):
    folder = png_folder(tmp_path / "minerals")
    config = tiny_config(folder, tmp_path, mlflow=True, epochs=1, freeze_epochs=1, name="again")
    run_dir = training.claim_run_dir(config)
    stale = tracking.Tracker.start(config, run_dir)  # a process killed while it ran: nothing ended it
    with pytest.raises(training.RunFolderExists, match="its run finished no epoch: `orestudy train --resume"):
        (run_dir / "config.json").write_text("{}")
        training.claim_run_dir(config)
    training.run_experiment(tiny_config(folder, tmp_path, mlflow=True, epochs=1, freeze_epochs=1, name="again",
                                        exist_ok=True))
    statuses = {r.info.run_id: r.info.status for r in runs_in(tmp_path / "runs")}
    assert statuses.pop(stale.run_id) == "KILLED" and list(statuses.values()) == ["FINISHED"]


@pytest.mark.slow
def test_kill_9_before_the_first_epoch_ends_is_restarted_by_resume(tmp_path):
    folder = png_folder(tmp_path / "minerals")
    argv = command("train", "--data", str(folder), *TINY, "--name", "kill9", "--cache", "")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    lines_until(proc, "MLflow run", seen)  # the run and its folder are made; its first epoch has begun
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run_dir = tmp_path / "runs" / "kill9"
    assert not (run_dir / training.LAST).exists()
    assert [r.info.status for r in runs_in(tmp_path / "runs")] == ["RUNNING"]
    taken = subprocess.run(argv, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert taken.returncode == 2 and "`orestudy train --resume runs/kill9` restarts it" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1
    resumed = subprocess.run(command("train", "--resume", "runs/kill9"), cwd=tmp_path, env=environment(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restarting the run in its folder: it finished no epoch" in resumed.stderr
    assert sorted(r.info.status for r in runs_in(tmp_path / "runs")) == ["FINISHED", "KILLED"]
    assert (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_a_train_says_what_it_trains_and_where_it_went_and_nothing_else(tmp_path):
    """The noise a `train` printed (MLflow's INFO lines, UserWarnings, artifact download bars) is gone:
    what is left is the run's own lines, the test table and the commands to use next."""
    folder = png_folder(tmp_path / "minerals")
    done = subprocess.run(command("train", "--data", str(folder), *TINY, "--cache", ""), cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    for noise in ("Warning", "INFO", "Downloading artifacts", "Traceback"):
        assert noise not in err, err
    run_dir = tmp_path / "runs" / "mobilenet_v2_scratch_f0_e1_s231"
    assert f"data {folder}: 3 classes, 30 images; split by hash, seed 231: " in err
    assert "mobilenet_v2, scratch, attention none, backbone frozen for 0 of 1 epochs; on cpu, " in err
    assert f"run folder runs/mobilenet_v2_scratch_f0_e1_s231; MLflow run " in err
    assert f"in sqlite:///{tmp_path / 'runs' / 'mlflow.db'}, experiment orestudy" in err
    ending = err.strip().splitlines()[-3:]
    assert ending[0].startswith("run folder: runs/mobilenet_v2_scratch_f0_e1_s231 (MLflow run ")
    assert ending[1] == "next: orestudy predict --model runs/mobilenet_v2_scratch_f0_e1_s231 PHOTO_OR_FOLDER ..."
    assert ending[2].strip().startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert len(err.strip().splitlines()) == 8, err  # 3 opening lines, 1 epoch, the test line, 3 closing lines
    assert run_dir.is_dir()


@pytest.mark.slow
def test_a_study_prints_its_trials_not_rays_boxes(tmp_path):
    """Two tiny trials of `replicate`: Tune's progress as orestudy's lines and table, no config boxes, token or
    TensorBoard notices, checkpoint lines or MLflow warnings."""
    folder = png_folder(tmp_path / "minerals")
    done = subprocess.run(command("replicate", "--only", "table3", "--backbones", "mobilenet_v2", "--regimes", "scratch",
                                  "--seeds", "1,2", "--epochs", "1", "--set", "image_size=64", "--set", "batch_size=8",
                                  "--data", str(folder), "--cache", "", "--name", "tiny"),
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for noise in ("Configuration for experiment", "Trial status", "Checkpoint successfully created", "Token authentication",
                  "TensorBoard", "tensorboard", "Warning", "INFO", "Downloading artifacts"):
        assert noise not in out, noise
    assert "[study] " in out and "trial mobilenet_v2_scratch_f0_e1_s2 finished: ok" in out
    assert re.search(r"^trial +status +epoch +val acc +best val acc +test acc$", out, re.M), out
    report = (tmp_path / "runs" / "tiny" / "report" / "report.md").read_text()
    assert len(out.splitlines()) < 60 + len(report.splitlines()), out


@pytest.mark.slow
def test_ctrl_c_of_a_search_is_one_line_and_leaves_nothing_running(tmp_path):
    from test_search import TINY_SPACE

    folder = png_folder(tmp_path / "minerals")
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE.replace("epochs: 2,", "epochs: 4,").replace("trials: 1", "trials: 2"))
    proc = subprocess.Popen(command("search", str(space), "--data", str(folder), "--cache", "", "--seeds",
                                    "--no-baseline", "--name", "srch2"), cwd=tmp_path, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=with_ctrl_c)
    seen = []
    lines_until(proc, "epoch 1/4", seen)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole process group
    rest = proc.stdout.read()
    proc.wait(timeout=300)
    assert proc.returncode == 130, "".join(seen)[-2000:] + rest[-3000:]
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest[-3000:]
    assert rest.strip().splitlines()[-1].startswith("orestudy search: interrupted: the same command with --resume")
    runs = runs_in(tmp_path / "runs")
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["srch2"] == "KILLED" and "RUNNING" not in statuses.values() and len(statuses) >= 2, statuses
    time.sleep(1)
