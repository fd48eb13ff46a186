"""A local run stopped by Ctrl-C or SIGTERM: one line, exit 130 / 143, the run marked
`interrupted` in the metadata DB and KILLED in MLflow, nothing left running; the same command
resumes it from its last checkpoint (the warm-up's too) and says from which. The `npo`
command runs as a user starts it, with `--log-format json`, whose every event is a line to
wait on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_config

from npo.store.metadata import MetadataDB

pytestmark = pytest.mark.slow

NPO = str(Path(sys.executable).with_name("npo"))


def _config(tmp_path: Path, name: str) -> Path:
    return write_tiny_config(
        tmp_path / f"{name}.yaml",
        tmp_path / "runs",
        name,
        2,
        warmup={"steps": 160, "checkpoint_every": 20, "check_every": 80, "target_accuracy": None},
        train={"eval_every": 2, "checkpoint_every": 2, "eval_size": 4},
    )


def _start(config: Path, *extra: str) -> subprocess.Popen[str]:
    # its own session: a group to send Ctrl-C's SIGINT to, as a terminal does
    return subprocess.Popen(
        [NPO, "run", str(config), "--log-format", "json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _events_until(proc: subprocess.Popen[str], warmup_step: int) -> list[dict]:
    """Read JSON events until the warm-up passed `warmup_step`."""
    events = []
    assert proc.stdout is not None
    for line in proc.stdout:
        events.append(json.loads(line))
        last = events[-1]
        if (
            last["event"] == "progress"
            and last["phase"] == "warm-up"
            and last["done"] > warmup_step
        ):
            return events
    raise AssertionError(f"the run ended before warm-up step {warmup_step}: {events[-3:]}")


def _finish(proc: subprocess.Popen[str]) -> tuple[list[dict], str]:
    out, err = proc.communicate(timeout=300)
    return [json.loads(line) for line in out.splitlines()], err


def _mlflow_runs(root: Path, name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("npo")
    return client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")


def _status(root: Path, name: str) -> str:
    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        return db.get_run(name).status


def _alive(session: int) -> list[str]:
    """Processes still running in the stopped command's session (the step server's worker,
    a task): none may outlive it."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(session)], capture_output=True)
    return [line for line in out.stdout.decode().splitlines() if line.strip()]


def test_ctrl_c_in_the_warmup_marks_the_run_and_the_rerun_resumes_there(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    config = _config(tmp_path, "cut")
    proc = _start(config)
    _events_until(proc, 45)  # past its checkpoints at warm-up steps 20 and 40
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    events, err = _finish(proc)
    assert proc.returncode == 130
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    assert stopped["status"] == "interrupted"
    assert stopped["message"].startswith("SIGINT; run 'cut' marked interrupted; its last ")
    assert "checkpoint is warm-up step 40 of 160: the same command resumes it" in stopped["message"]
    assert "Traceback" not in err
    assert _alive(proc.pid) == []
    assert _status(root, "cut") == "interrupted"
    (tracked,) = _mlflow_runs(root, "cut")
    assert tracked.info.status == "KILLED"

    events, err = _finish(_start(config))
    assert err == ""
    notices = [e["message"] for e in events if e["event"] == "notice"]
    assert (
        "resuming run 'cut' (interrupted): its last checkpoint is warm-up step 40 of 160" in notices
    )
    warmup = [e["done"] for e in events if e["event"] == "progress" and e["phase"] == "warm-up"]
    assert warmup[0] == 41 and warmup[-1] == 160  # steps 1-40 were not redone
    (summary,) = [e["summary"] for e in events if e["event"] == "summary"]
    assert summary["warm-up steps"] == 160 and summary["policy steps"] == 2
    assert _status(root, "cut") == "completed"
    (tracked,) = _mlflow_runs(root, "cut")  # the same MLflow run, finished
    assert tracked.info.status == "FINISHED"


def test_sigterm_in_rl_marks_the_run_interrupted(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    config = write_tiny_config(
        tmp_path / "t.yaml",
        root,
        "term",
        400,
        warmup={"steps": 4, "target_accuracy": None},
        train={"eval_every": 100, "checkpoint_every": 5, "eval_size": 4},
    )
    proc = _start(config)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for policy step 7: past its checkpoint at step 5
        event = json.loads(line)
        if event["event"] == "progress" and event["phase"] == "grpo" and event["done"] >= 7:
            break
    proc.terminate()  # SIGTERM to the command alone, as `kill` or a scheduler sends it
    events, _ = _finish(proc)
    assert proc.returncode == 143
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    assert stopped["message"].startswith("SIGTERM; run 'term' marked interrupted; its last ")
    assert "checkpoint is policy step " in stopped["message"]
    assert _alive(proc.pid) == []
    assert _status(root, "term") == "interrupted"
    (first,) = _mlflow_runs(root, "term")
    assert first.info.status == "KILLED"
