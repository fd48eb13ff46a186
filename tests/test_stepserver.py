"""npo.stepserver: a stage run by the warm worker behaves as if run by the task itself.

The stages are fakes (tests/stepserver_fake_stages.py); the worker imports them from tests/
through PYTHONPATH in the server's env. One server serves the whole module; tests that stop
or break a server start their own.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from npo.stepserver import (
    ENV_RUNNER,
    ENV_SERVER,
    ProgressLogger,
    StageFailed,
    StepServer,
    call_stage,
)
from npo.stepserver.client import ENV_SERVER_KEY

TESTS = str(Path(__file__).resolve().parent)
FAKE = "stepserver_fake_stages"
RUNNER = f"{FAKE}:run_stage"


def _server(**kwargs: Any) -> StepServer:
    kwargs.setdefault("preload", (FAKE,))
    kwargs.setdefault("env", {"PYTHONPATH": TESTS})
    return StepServer(runner=RUNNER, **kwargs)


def _client_env(**extra: str) -> dict[str, str]:
    """A subprocess client's environment: the fake stages importable, no inherited server."""
    env = {k: v for k, v in os.environ.items() if k != ENV_SERVER}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    env[ENV_RUNNER] = RUNNER
    return {**env, **extra}


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_PREEXISTING: set[int] = set()  # descendants alive before this module's server started


def _children() -> set[int]:
    psutil = pytest.importorskip("psutil")
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _descendants(besides: StepServer) -> list[str]:
    """Command lines of this process's live descendants, except the worker of `besides` (the
    module's server) and what other tests left running before this module (session-wide
    test services: an S3 server, PostgreSQL)."""
    psutil = pytest.importorskip("psutil")
    kept = _PREEXISTING | {besides.worker_pid}
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in kept or child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" not in cmdline:
            found.append(f"{child.pid}: {cmdline}")
    return found


def _wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Events:
    """A progress callback that records events (the listener thread appends)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, dict[str, float]]] = []

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        self.events.append((phase, done, total, metrics))


@pytest.fixture(scope="module")
def events() -> Events:
    return Events()


@pytest.fixture(scope="module")
def server(events: Events) -> Iterator[StepServer]:
    _PREEXISTING.update(_children())
    with _server(on_progress=events) as running:
        yield running


@pytest.fixture
def remote(server: StepServer, events: Events, monkeypatch: pytest.MonkeyPatch) -> StepServer:
    """call_stage goes to the module's server."""
    events.events.clear()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return server


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> None:
    """call_stage runs the fake stages in this process."""
    monkeypatch.delenv(ENV_SERVER, raising=False)
    monkeypatch.setenv(ENV_RUNNER, RUNNER)


def _both(
    monkeypatch: pytest.MonkeyPatch, server: StepServer, name: str, **params: Any
) -> list[Any]:
    """call_stage's outcome (result or StageFailed) through the server, then in-process."""
    outcomes = []
    for env in (server.env(), {ENV_RUNNER: RUNNER}):
        with monkeypatch.context() as m:
            m.delenv(ENV_SERVER, raising=False)
            m.delenv(ENV_SERVER_KEY, raising=False)
            for key, value in env.items():
                m.setenv(key, value)
            try:
                outcomes.append(call_stage(name, **params))
            except StageFailed as exc:
                outcomes.append(exc)
    return outcomes


# -- import ---------------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = (
        "import sys, npo.stepserver\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'numpy', 'multiprocessing') or m.startswith('npo.stages')]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- results and failures -------------------------------------------------------------------


def test_server_and_in_process_results_are_equal(
    server: StepServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote, direct = _both(monkeypatch, server, "compute", a=2, b=3, config='{"x": 1}')
    assert remote == direct
    # JSON values in both modes: the tuple is a list, the int key a string
    assert remote == {"sum": 5, "pair": [2, 3], "by_int": {"1": "one"}, "config": '{"x": 1}'}


def test_stage_exception_raises_stage_failed_with_traceback(
    server: StepServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for exc in _both(monkeypatch, server, "fail", message="no gold answer"):
        assert isinstance(exc, StageFailed)
        assert isinstance(exc, RuntimeError)
        text = str(exc)
        assert "'fail'" in text
        assert "ValueError: boom: no gold answer" in text
        assert "Traceback (most recent call last)" in text
        assert "stepserver_fake_stages.py" in text  # the stage's own frame
        assert exc.stage == "fail"


def test_non_dict_result_fails_in_both_modes(
    server: StepServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for exc in _both(monkeypatch, server, "wrong_type"):
        assert isinstance(exc, StageFailed)
        assert "returned list, expected a dict" in str(exc)


def test_stage_failed_pickles() -> None:
    exc = pickle.loads(pickle.dumps(StageFailed("train", "ValueError: x", "Traceback ...")))
    assert (exc.stage, exc.error, exc.traceback_text) == ("train", "ValueError: x", "Traceback ...")


def test_a_stage_exiting_fails_its_call_and_the_worker_goes_on(remote: StepServer) -> None:
    """SystemExit in a stage is the stage's failure, not the worker's end."""
    with pytest.raises(StageFailed, match="stage 'system_exit' failed: SystemExit: 3"):
        call_stage("system_exit", code=3)
    assert call_stage("compute", a=1, b=1)["sum"] == 2


@pytest.mark.parametrize(
    ("stage", "params"), [("exit", {"code": 3}), ("kill", {"signum": int(signal.SIGKILL)})]
)
def test_a_worker_that_dies_fails_its_call_and_a_new_one_serves(
    stage: str, params: dict[str, Any]
) -> None:
    with _server() as dying:
        first = dying.worker_pid
        with pytest.raises(StageFailed, match=f"stage '{stage}' failed: lost the connection"):
            call_stage_at(dying, stage, **params)
        dying.wait_ready()  # what each local pipeline run does first: a new worker
        assert dying.worker_pid not in (None, first)
        assert call_stage_at(dying, "compute", a=1, b=1)["sum"] == 2


def test_unreachable_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_SERVER, str(tmp_path / "nobody.sock"))
    with pytest.raises(StageFailed, match="cannot reach the step server"):
        call_stage("compute", a=1, b=1)


def test_a_wrong_key_is_refused(server: StepServer) -> None:
    from npo.stepserver.client import _call_remote

    with pytest.raises(StageFailed, match="cannot reach the step server"):
        _call_remote(server.address, "compute", {"a": 1, "b": 1}, key=b"not the key")


# -- the task's process ---------------------------------------------------------------------


def test_the_worker_imports_the_stages_once_and_runs_every_call(remote: StepServer) -> None:
    first, second = call_stage("pids"), call_stage("pids")
    assert first == second == {"import_pid": remote.worker_pid, "pid": remote.worker_pid}


def test_client_environment_and_cwd_reach_the_stage_and_are_restored(
    remote: StepServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NPO_FAKE_VALUE", "from the task")
    monkeypatch.chdir(tmp_path)
    result = call_stage("environment", key="NPO_FAKE_VALUE")
    assert result == {"value": "from the task", "cwd": str(tmp_path)}
    monkeypatch.delenv("NPO_FAKE_VALUE")
    monkeypatch.chdir(TESTS)
    assert call_stage("environment", key="NPO_FAKE_VALUE") == {"value": None, "cwd": TESTS}


def test_progress_reaches_on_progress_in_order(remote: StepServer, events: Events) -> None:
    assert call_stage("progress", n=5) == {"n": 5}
    assert _wait_for(lambda: len(events.events) == 5)  # relayed on the listener thread
    assert events.events == [
        ("phase", i + 1, 5, {"x": float(i), "y": float(2 * i)}) for i in range(5)
    ]


def test_concurrent_calls_take_turns(remote: StepServer) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: call_stage("sleep", seconds=s), [0.3, 0.2, 0.1, 0.3]))
    assert [r["slept"] for r in results] == [0.3, 0.2, 0.1, 0.3]
    assert {r["pid"] for r in results} == {remote.worker_pid}


def test_stage_output_goes_to_the_task_log(server: StepServer) -> None:
    code = (
        "from npo.stepserver import call_stage\n"
        "print('task starts')\n"  # buffered (a pipe): must still come before the stage's
        "print(call_stage('print', text='hello'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_client_env(**server.env()),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.splitlines() == ["task starts", "hello on stdout", "{'printed': True}"]
    assert out.stderr.splitlines() == ["hello on stderr"]


def test_without_on_progress_the_worker_logs_progress_to_the_task() -> None:
    code = "from npo.stepserver import call_stage\ncall_stage('progress', n=20)\n"
    with _server() as server:
        remote = subprocess.run(
            [sys.executable, "-c", code],
            env=_client_env(**server.env()),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    direct = subprocess.run(
        [sys.executable, "-c", code],
        env=_client_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert remote.stdout == direct.stdout
    lines = remote.stdout.splitlines()
    assert lines[0] == "[progress] phase 1/20 (5%) x=0 y=0"
    assert lines[-1] == "[progress] phase 20/20 (100%) x=19 y=38"
    assert len(lines) == 11  # the first event, then one per 10%


def test_progress_logger_throttles_per_phase(capsys: pytest.CaptureFixture[str]) -> None:
    log = ProgressLogger("train")
    for done in range(1, 1001):
        log("grpo", done, 1000, {"reward/mean": 0.5, "flag": True, "note": "x"})
    log("eval", 1, 4, {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[train] grpo 1/1000 (0%) reward/mean=0.5"
    assert len(lines) == 12  # 0%, 10%, ..., 100% of grpo, then eval's first
    assert lines[-1] == "[train] eval 1/4 (25%)"


def test_progress_logger_prints_a_no_signal_warning_between_its_marks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from npo.learning_signal import NO_SIGNAL

    log = ProgressLogger("train")
    log("grpo", 1, 100, {"reward/mean": 0.0})
    log("grpo", 3, 100, {"reward/mean": 0.0})  # no mark crossed: silent
    log("grpo", 4, 100, {"reward/mean": 0.0, NO_SIGNAL: 4.0, "reward/all_correct_frac": 0.0})
    log("grpo", 5, 100, {"reward/mean": 0.0})  # still within the first 10%
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("[train] grpo 4/100 (4%)")
    assert lines[2].startswith(
        "[train] warning: grpo step 4: no learning signal for 4 policy steps in a row"
    )
    assert "all-wrong" in lines[2]


# -- start and stop -------------------------------------------------------------------------


def test_a_worker_failing_to_start_is_reported(server: StepServer) -> None:
    failing = StepServer(runner="no_such_module_anywhere:run_stage", preload=())
    with pytest.raises(RuntimeError, match="failed to start") as info, failing:
        pass
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in str(info.value)

    dying = StepServer(
        runner=RUNNER, preload=(FAKE,), env={"PYTHONPATH": TESTS, "NPO_FAKE_DIE_ON_IMPORT": "1"}
    )
    with pytest.raises(RuntimeError, match="failed to start: it exited with status 5"), dying:
        pass
    assert _descendants(besides=server) == []


def test_close_stops_the_worker_and_removes_its_socket(server: StepServer, tmp_path: Path) -> None:
    outcome: list[Any] = []
    pid_file = tmp_path / "pids"

    with _server(stop_grace_s=1.0) as stopped:
        worker, socket_dir = stopped.worker_pid, Path(stopped.address).parent

        def blocked_task() -> None:
            try:
                outcome.append(call_stage_at(stopped, "sleep", seconds=60, pid_file=str(pid_file)))
            except StageFailed as exc:
                outcome.append(exc)

        thread = threading.Thread(target=blocked_task)
        thread.start()
        assert _wait_for(pid_file.exists)
    thread.join(10)
    assert isinstance(outcome[0], StageFailed)
    assert "lost the connection" in str(outcome[0])
    assert worker is not None and not _alive(worker)
    assert not socket_dir.exists()
    stopped.close()  # idempotent


def test_the_worker_exits_with_its_parent(tmp_path: Path) -> None:
    """A parent that is killed (no close) leaves no worker behind."""
    pid_file = tmp_path / "worker"
    code = (
        "import sys, time\nfrom npo.stepserver import StepServer\n"
        f"s = StepServer(runner={RUNNER!r}, preload=({FAKE!r},), env={{'PYTHONPATH': {TESTS!r}}})\n"
        "s.start()\nopen(sys.argv[1], 'w').write(str(s.worker_pid))\ntime.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(pid_file)])
    try:
        assert _wait_for(pid_file.exists, timeout_s=60)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.kill()
        parent.wait()
        assert _wait_for(lambda: not _alive(worker))
    finally:
        parent.kill()
        parent.wait()


def call_stage_at(server: StepServer, name: str, **params: Any) -> dict[str, Any]:
    """call_stage against `server` without touching os.environ (other threads read it)."""
    from npo.stepserver.client import _call_remote

    key = bytes.fromhex(server.env()[ENV_SERVER_KEY])
    return _call_remote(server.address, name, params, key)


@pytest.mark.slow
def test_a_torch_preloaded_worker_runs_torch_ops() -> None:
    with _server(preload=("torch", FAKE)) as server:
        results = [call_stage_at(server, "torch_sum", n=1000) for _ in range(2)]
    assert [r["sum"] for r in results] == [499500.0, 499500.0]


# -- latency --------------------------------------------------------------------------------


def test_per_call_latency(remote: StepServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the warm per-call cost (never asserted: machines differ)."""
    call_stage("pids")
    start = time.perf_counter()
    for _ in range(20):
        call_stage("pids")
    per_call_ms = (time.perf_counter() - start) / 20 * 1000
    with capsys.disabled():
        print(f"\nstep server: {per_call_ms:.2f} ms per call (20 calls, trivial stage)")
