"""`npo submit`: what it asks of the Kubeflow Pipelines API, what it prints, its exit codes.

kfp.Client is replaced by a fake that records calls; a tiny HTTP server on 127.0.0.1 plays
the API's health endpoint that submit checks first. One test points at a closed port.
Exit codes: 0 submitted (and, with --wait, succeeded), 1 the run did not succeed, 2 bad
input or an unreachable / refusing API server.

Run: .venv/bin/python -m pytest tests/test_submit.py -q
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

kfp = pytest.importorskip("kfp")

from kfp_server_api.exceptions import ApiException  # noqa: E402

from npo.cli import app  # noqa: E402
from npo.pipelines import submit as submit_module  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy_grpo.yaml"


def says(text: str, words: str) -> bool:
    """`words` occurs in `text`, ignoring whitespace (rich wraps long lines)."""
    return re.sub(r"\s+", "", words) in re.sub(r"\s+", "", text)


class FakeClient:
    """Records every call; answers like kfp.Client for one pipeline and one run."""

    pipeline_id: str | None = None  # an already uploaded pipeline of that name
    versions: tuple[str, ...] = ()  # its versions (display names)
    states: tuple[str, ...] = ("SUCCEEDED",)  # successive run states for get_run
    fail_on: str = ""  # the method that answers 403

    def __init__(self, host: str) -> None:
        self.host = host
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: list[str] = []  # package contents
        self._states = list(self.states)
        INSTANCES.append(self)

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if name == self.fail_on:
            raise ApiException(status=403, reason="Forbidden")

    def get_pipeline_id(self, name: str) -> str | None:
        self._record("get_pipeline_id", name)
        return self.pipeline_id

    def upload_pipeline(self, path: str, pipeline_name: str, description: str) -> Any:
        self._record("upload_pipeline", path, pipeline_name=pipeline_name)
        self.uploaded.append(Path(path).read_text())
        return SimpleNamespace(pipeline_id="pipe-new")

    def list_pipeline_versions(self, pipeline_id: str, **kwargs: Any) -> Any:
        self._record("list_pipeline_versions", pipeline_id, **kwargs)
        if "filter" not in kwargs:
            names = ["default"]
        else:
            wanted = yaml.safe_load(kwargs["filter"])["predicates"][0]["stringValue"]
            names = [v for v in self.versions if v == wanted]
        return SimpleNamespace(
            pipeline_versions=[SimpleNamespace(pipeline_version_id=f"ver-{n}") for n in names]
            or None
        )

    def upload_pipeline_version(self, path: str, **kwargs: Any) -> Any:
        self._record("upload_pipeline_version", path, **kwargs)
        self.uploaded.append(Path(path).read_text())
        return SimpleNamespace(pipeline_version_id="ver-uploaded")

    def create_experiment(self, name: str) -> Any:
        self._record("create_experiment", name)
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def run_pipeline(self, **kwargs: Any) -> Any:
        self._record("run_pipeline", **kwargs)
        return SimpleNamespace(run_id="run-1")

    def get_run(self, run_id: str) -> Any:
        self._record("get_run", run_id)
        state = self._states.pop(0) if len(self._states) > 1 else self._states[0]
        return SimpleNamespace(state=state)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def call(self, name: str) -> tuple[tuple, dict]:
        (found,) = [(a, k) for n, a, k in self.calls if n == name]
        return found


INSTANCES: list[FakeClient] = []


@pytest.fixture
def fake_kfp(monkeypatch) -> type[FakeClient]:
    """kfp.Client -> a fresh FakeClient subclass (per-test settings), polling every 10 ms."""
    INSTANCES.clear()
    fake = type("Fake", (FakeClient,), {})
    monkeypatch.setattr(kfp, "Client", fake)
    monkeypatch.setattr(submit_module, "POLL_S", 0.01)
    return fake


class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == submit_module.HEALTHZ
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def host() -> Iterator[str]:
    """A server on 127.0.0.1 that answers the KFP health check."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def submit(*args: str) -> Any:
    return CliRunner().invoke(app, ["submit", str(CONFIG), *args])


# --------------------------------------------------------------------------- uploads
def test_first_submission_uploads_the_pipeline_and_prints_the_run_link(fake_kfp, host):
    result = submit("--host", host)
    assert result.exit_code == 0, result.output
    (client,) = INSTANCES
    assert client.host == host
    assert client.names() == [
        "get_pipeline_id",
        "upload_pipeline",
        "list_pipeline_versions",
        "create_experiment",
        "run_pipeline",
    ]
    assert client.call("get_pipeline_id") == (("toy-grpo",), {})
    assert client.call("upload_pipeline")[1] == {"pipeline_name": "toy-grpo"}
    assert client.call("create_experiment") == (("npo",), {})  # tracking.experiment
    run = client.call("run_pipeline")[1]
    assert run["experiment_id"] == "exp-npo"
    assert run["pipeline_id"] == "pipe-new"
    assert run["version_id"] == "ver-default"
    assert run["service_account"] == "npo-pipeline"  # the chart's, without API rights
    assert re.fullmatch(r"toy-grpo-\d{8}-\d{6}", run["job_name"])
    # What was uploaded is the compiled pipeline of the config.
    (package,) = client.uploaded
    spec = next(yaml.safe_load_all(package))
    assert spec["pipelineInfo"]["name"] == "toy-grpo"
    assert "pip install" not in package
    assert says(result.stdout, f"run: {host}/#/runs/details/run-1")


def test_resubmission_adds_a_version_named_by_the_yaml_hash(fake_kfp, host):
    fake_kfp.pipeline_id = "pipe-7"
    result = submit("--host", host, "--experiment", "sweeps")
    assert result.exit_code == 0, result.output
    (client,) = INSTANCES
    assert client.names() == [
        "get_pipeline_id",
        "list_pipeline_versions",
        "upload_pipeline_version",
        "create_experiment",
        "run_pipeline",
    ]
    kwargs = client.call("upload_pipeline_version")[1]
    assert kwargs["pipeline_id"] == "pipe-7"
    version = kwargs["pipeline_version_name"]
    assert re.fullmatch(r"toy-grpo-[0-9a-f]{12}", version)
    assert client.call("create_experiment") == (("sweeps",), {})
    assert client.call("run_pipeline")[1]["version_id"] == "ver-uploaded"

    # The same YAML again: the existing version is reused, nothing is uploaded.
    INSTANCES.clear()
    fake_kfp.versions = (version,)
    result = submit("--host", host, "--experiment", "sweeps")
    assert result.exit_code == 0, result.output
    (client,) = INSTANCES
    assert "upload_pipeline_version" not in client.names()
    assert client.call("run_pipeline")[1]["version_id"] == f"ver-{version}"


def test_submit_warns_when_pods_could_not_share_storage(fake_kfp, host):
    # the default Secrets and ConfigMap (the chart's) give every pod the shared stores
    result = submit("--host", host)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    INSTANCES.clear()
    result = submit("--host", host, "--set", "cluster.config_maps=[]")
    assert says(result.stderr, "warning: store.artifacts_uri is not s3://")
    assert "SQLite" not in result.stderr  # the DB URL still comes from the default Secret
    INSTANCES.clear()
    result = submit("--host", host, "--set", "cluster.secrets=[]")
    assert says(result.stderr, "the metadata DB is SQLite")
    INSTANCES.clear()
    shared = ["--set", "cluster.config_maps=[]", "--set", "cluster.secrets=[]"]
    shared += ["--set", "store.artifacts_uri=s3://npo/runs"]
    shared += ["--set", "store.metadata_url=postgresql+psycopg://npo@db/npo"]
    result = submit("--host", host, *shared)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_submit_warns_about_inputs_the_pods_cannot_see(fake_kfp, host):
    def submit_math(*args: str) -> Any:
        config = CONFIG.parent / "math_autonpo.yaml"  # model and data on s3:// already
        return CliRunner().invoke(app, ["submit", str(config), "--host", host, *args])

    result = submit_math()
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    INSTANCES.clear()
    local = ["--set", "model.source=/models/qwen"]
    local += ["--set", "task.train_path=/data/train.jsonl"]
    result = submit_math(*local)
    assert result.exit_code == 0, result.output
    assert says(result.stderr, "model.source '/models/qwen' is a local path")
    assert says(result.stderr, "npo stage /models/qwen s3://BUCKET/")
    assert says(result.stderr, "task.train_path '/data/train.jsonl' is a local path")
    assert "task.eval_path" not in result.stderr


# --------------------------------------------------------------------------- --wait
def test_wait_exits_0_when_the_run_succeeds(fake_kfp, host):
    fake_kfp.states = ("PENDING", "RUNNING", "SUCCEEDED")
    result = submit("--host", host, "--wait")
    assert result.exit_code == 0, result.output
    assert INSTANCES[0].names().count("get_run") == 3
    assert says(result.stdout, "run run-1 succeeded")


@pytest.mark.parametrize("state", ["FAILED", "CANCELED"])
def test_wait_exits_1_when_the_run_does_not_succeed(fake_kfp, host, state):
    fake_kfp.states = ("RUNNING", state)
    result = submit("--host", host, "--wait")
    assert result.exit_code == 1, result.output
    assert says(result.stderr, f"run run-1 ended {state}: {host}/#/runs/details/run-1")


def test_wait_exits_1_on_timeout(fake_kfp, host):
    fake_kfp.states = ("RUNNING",)
    result = submit("--host", host, "--wait", "--timeout", "0.05")
    assert result.exit_code == 1, result.output
    assert says(result.stderr, "still RUNNING after 0.05 s")


# --------------------------------------------------------------------------- errors
def test_closed_port_exits_2_naming_the_host(fake_kfp):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = submit("--host", url)
    assert result.exit_code == 2, result.output
    assert says(result.stderr, f"error: cannot reach Kubeflow Pipelines at {url}")
    assert "Traceback" not in result.output
    assert INSTANCES == []  # no client was even built


def test_refusing_api_exits_2_naming_the_host(fake_kfp, host):
    fake_kfp.fail_on = "create_experiment"
    result = submit("--host", host)
    assert result.exit_code == 2, result.output
    assert says(result.stderr, f"Kubeflow Pipelines at {host} refused the request: 403")


def test_host_without_scheme_exits_2(fake_kfp):
    result = submit("--host", "localhost:8080")
    assert result.exit_code == 2
    assert says(result.stderr, "expected http(s)://host[:port]")


def test_bad_config_exits_2_before_contacting_anything(fake_kfp, host):
    result = submit("--host", host, "--set", "cluster.image=npo:latest")
    assert result.exit_code == 2
    assert says(result.stderr, "cluster.image must pin a version tag or digest")
    assert INSTANCES == []


def test_host_comes_from_kfp_host_when_not_given(fake_kfp, host, monkeypatch):
    monkeypatch.setenv("KFP_HOST", host)
    result = CliRunner().invoke(app, ["submit", str(CONFIG)])
    assert result.exit_code == 0, result.output
    assert INSTANCES[0].host == host
