"""Run an experiment's Kubeflow pipeline on this machine: the DAG a cluster runs, executed
by kfp.local with one of two runners (`npo run --runner`):

- "subprocess" (the default): kfp.local's SubprocessRunner, every task a
  `kfp.dsl.executor_main` subprocess, no container, no network;
- "docker": kfp.local's DockerRunner, every task a container of the project image
  (`cluster.image`, built by `make images`) as on a cluster, with host networking (the
  services of `make services` on 127.0.0.1), the environment of the endpoints it needs, the
  working directory mounted read-only and `store.root` writable at the same paths, and the
  invoking user's uid:gid, so what a task writes is the user's. No step server: each task
  imports what its stage uses (tests/container measures the start-up).

A task's component calls `npo.stepserver.call_stage`; with the subprocess runner,
NPO_STEP_SERVER points it at a warm step server, so a task does not pay the ~5 s import of
torch and transformers: the server's worker has everything imported and runs the stage
with the task's environment, working directory and stdout. Its progress events reach
`progress` (the CLI's bars). kfp.local's own log (every task's inputs, outputs and output
lines) goes to `<run_dir>/pipeline.log`.

kfp.local's lightweight components write their code to `$(mktemp -d)/ephemeral_component.py`
and never remove it (kfp/dsl/component_factory.py): the tasks get a TMPDIR of their own,
emptied after each run and removed with the step server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from npo.config import ExperimentConfig
from npo.steps.context import NoticeFn, ProgressFn, mark_stopped, open_run

# What the step server's worker imports once, so that no task pays for it: the stages'
# implementations (torch, transformers; npo.stages itself imports them lazily) and the
# libraries they import on first use (MLflow and its SQL store, Alembic for the metadata
# DB's migrations, matplotlib for the report).
PRELOAD = (
    "npo.stages",
    "npo.methods",
    "npo.steps.warmup",
    "npo.steps.train_segment",
    "npo.steps.generate_guidance",
    "npo.steps.rollback",
    "npo.steps.detect_plateau",
    "npo.guidance.sources",
    "npo.training.state",
    "npo.report",
    "npo.report_ui",
    "transformers.utils.logging",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "alembic.command",
    "alembic.runtime.migration",
    "matplotlib.pyplot",
)


RUNNERS = ("subprocess", "docker")  # what `npo run --runner` takes
# Passed from this process into the task containers (besides secret_env): the endpoints'
# settings and credentials (AWS_*, MLFLOW_*, NPO_*) and the thread and seed settings.
_CONTAINER_ENV_PREFIXES = ("NPO_", "AWS_", "MLFLOW_")
_CONTAINER_ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "TZ")
_CONTAINER_ENV_DROPPED = ("NPO_STEP_SERVER", "NPO_STEP_SERVER_KEY")  # a host socket


class PipelineFailed(RuntimeError):
    """A task of the local pipeline failed; the message names the log to read."""


def secret_env(cfg: ExperimentConfig) -> dict[str, str]:
    """The endpoints whose credentials `public_dump` redacts from the pipeline's config
    parameter: the tasks get the real values through the environment instead, as pods get
    them from Kubernetes Secrets. Values already in the environment win."""
    env = {}
    pairs = [
        ("NPO_METADATA_URL", cfg.store.metadata_url),
        ("NPO_ARTIFACTS_URI", cfg.store.artifacts_uri),
        ("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri),
    ]
    for key, value in pairs:
        if value and not os.environ.get(key):
            env[key] = value
    return env


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the tasks (kfp.local's subprocesses inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class LocalPipelines:
    """Runs experiments' pipelines locally, sharing one warm step server between them.

        with LocalPipelines(progress) as pipelines:
            for cfg in configs:
                summary = pipelines.run(cfg)

    Entering starts the step server's worker without waiting for it: its imports (torch,
    transformers: seconds) overlap with opening the first run here. runner="docker" runs
    every task in a container instead (the module docstring) and starts no step server;
    its tasks report no progress events, their log lines go to pipeline.log."""

    def __init__(
        self,
        progress: ProgressFn | None = None,
        runner: str = "subprocess",
        notify: NoticeFn | None = None,
    ) -> None:
        from npo.stepserver import StepServer

        if runner not in RUNNERS:
            raise ValueError(f"runner {runner!r}: one of {', '.join(RUNNERS)}")
        self._runner = runner
        self._server = (
            StepServer(preload=PRELOAD, on_progress=progress) if runner == "subprocess" else None
        )
        self._notify = notify
        self._tmp: Path | None = None

    def __enter__(self) -> LocalPipelines:
        # mkdtemp also fixes this process's own temp folder (tempfile caches its choice)
        # before the tasks' TMPDIR is set in os.environ.
        self._tmp = Path(tempfile.mkdtemp(prefix="npo-kfp-"))
        if self._server is not None:
            self._server.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._server is not None:
                self._server.close()
        finally:
            # After the worker: it may have made the folder its own temp folder.
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def run(self, cfg: ExperimentConfig, fresh: bool = False) -> dict[str, Any]:
        """Run (or resume) the experiment `cfg` as its pipeline; returns the run summary.

        Stages are idempotent, so re-running a pipeline that died resumes it: finished
        tasks return their committed results quickly and the interrupted one resumes from
        its last checkpoint."""
        from npo.pipelines.build import build_pipeline

        if self._tmp is None:
            raise RuntimeError("LocalPipelines.run needs `with LocalPipelines(...)`")
        if self._server is None:
            check_images(cfg)  # before anything is written
        # Validate the config and endpoints, wipe a previous run (fresh), create the run
        # folder and the MLflow run here, before any task starts; the tasks reopen the run.
        ctx = open_run(cfg, fresh=fresh)
        if ctx.resume_note and self._notify:
            self._notify(ctx.resume_note)
        run_dir = ctx.run_dir
        ctx.db.close()
        ctx.tracker.flush()  # the MLflow run stays open: the report task finishes it
        pipeline = build_pipeline(cfg, local=True)
        try:
            return _as_written(dict(self._execute(cfg, pipeline, run_dir)), run_dir)
        except BaseException as e:
            if self._server is not None:
                self._server.close()  # first: a stage still running must not write after
            _note_stopped(e, cfg)
            raise

    def _execute(self, cfg: ExperimentConfig, pipeline: Any, run_dir: Path) -> Any:
        """The pipeline's DAG on this instance's runner; returns its output (the summary)."""
        assert self._tmp is not None
        if self._server is None:
            runner = docker_runner(cfg)
            return _run_dag(pipeline, run_dir.resolve(), {}, runner)
        from kfp import local

        self._server.wait_ready()  # at once when it serves; a new worker if one died
        # Workers take the task's environment, so per-run secrets travel with the tasks.
        env = {**secret_env(cfg), **self._server.env(), "TMPDIR": str(self._tmp)}
        try:
            return _run_dag(pipeline, run_dir, env, local.SubprocessRunner(use_venv=False))
        finally:
            _empty(self._tmp)  # the tasks' ephemeral_component.py folders


def container_env(cfg: ExperimentConfig) -> dict[str, str]:
    """The environment of a task container: the endpoints (secret_env), what this process
    has of _CONTAINER_ENV_*, and a HOME that any uid can write (the image's is uid 1000's)."""
    env = {"HOME": "/tmp"}
    for key, value in os.environ.items():
        if key in _CONTAINER_ENV_DROPPED:
            continue
        if key.startswith(_CONTAINER_ENV_PREFIXES) or key in _CONTAINER_ENV_NAMES:
            env[key] = value
    return env | secret_env(cfg)


def container_mounts(cfg: ExperimentConfig) -> list[Any]:
    """Bind mounts at the hosts' own paths: the working directory read-only (relative paths
    of the config resolve as here) and `store.root` writable (the run's folder, and SQLite,
    MLflow and artifacts when they default to it). kfp.local adds the pipeline root."""
    from docker.types import Mount

    cwd = Path.cwd().resolve()
    root = cfg.store.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return [
        Mount(str(cwd), str(cwd), type="bind", read_only=True),
        Mount(str(root), str(root), type="bind"),
    ]


def docker_runner(cfg: ExperimentConfig) -> Any:
    """kfp.local's DockerRunner for `cfg`'s tasks (the module docstring)."""
    from kfp import local

    return local.DockerRunner(
        network_mode="host",
        user=f"{os.getuid()}:{os.getgid()}",
        environment=container_env(cfg),
        mounts=container_mounts(cfg),
        working_dir=str(Path.cwd().resolve()),
    )


def task_images(cfg: ExperimentConfig) -> set[str]:
    """The images the tasks of `cfg`'s pipeline run in."""
    from npo.pipelines.kubernetes import image_of
    from npo.stages import STAGES

    return {image_of(stage, cfg.cluster) for stage in STAGES.values()}


def check_images(cfg: ExperimentConfig) -> None:
    """Fail with what to do when the Docker engine is unreachable or lacks a task's image
    (kfp.local would try to pull it from a registry)."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as e:  # docker missing, no daemon, no permission
        raise PipelineFailed(f"--runner docker needs a Docker engine: {e}") from None
    try:
        for image in sorted(task_images(cfg)):
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                raise PipelineFailed(
                    f"image {image} (cluster.image) is not on this Docker engine: build it "
                    "with `make images IMAGE_FLAVORS=cpu` (images/README.md)"
                ) from None
    finally:
        client.close()


def _as_written(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The pipeline's summary in the order the report stage wrote it to summary.json (a KFP
    output parameter keeps no key order; a reader wants the headline first)."""
    import json

    try:
        order = list(json.loads((run_dir / "summary.json").read_text()))
    except (OSError, ValueError):
        return summary
    return {k: summary[k] for k in order if k in summary} | summary


def _note_stopped(e: BaseException, cfg: ExperimentConfig) -> None:
    """Mark the run of `cfg` interrupted (Ctrl-C, SIGTERM) or failed (anything else) in the
    metadata DB and MLflow, and add to `e` the line that says so: a killed worker had no
    chance to. A mark that fails itself is said, not raised over `e`."""
    from npo.store.metadata import RunStatus

    status = RunStatus.INTERRUPTED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED
    try:
        e.add_note(mark_stopped(cfg, status))
    except Exception as failed:  # e.g. the database that made the task fail
        e.add_note(f"run {cfg.name!r} could not be marked {status.value}: {failed}")


def _empty(folder: Path) -> None:
    """Remove what `folder` holds, keeping the folder itself."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def run_pipeline(
    cfg: ExperimentConfig,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    runner: str = "subprocess",
    notify: NoticeFn | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment as its pipeline (see `LocalPipelines.run`)."""
    with LocalPipelines(progress, runner, notify) as pipelines:
        return pipelines.run(cfg, fresh=fresh)


def _run_dag(pipeline: Any, run_dir: Path, env: dict[str, str], runner: Any) -> Any:
    """Execute the pipeline with kfp.local's `runner` (the tasks' environment: `env` added
    to this process's) and return its output (the report's summary); its log goes to
    `<run_dir>/pipeline.log`."""
    from kfp import local

    log_path = run_dir / "pipeline.log"
    with (
        _environ(env),
        log_path.open("a", encoding="utf-8") as log,
        contextlib.redirect_stdout(log),
        warnings.catch_warnings(),
    ):
        # kfp.local warns that display names and cluster settings do nothing locally.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        local.init(
            runner=runner,
            pipeline_root=str(run_dir / "kfp"),
            raise_on_error=True,
        )
        start = log.tell()
        try:
            return pipeline().output
        except RuntimeError as e:
            sys.stdout.flush()
            raise PipelineFailed(_failure(str(e), log_path, start)) from None
        finally:
            sys.stdout.flush()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failure(message: str, log_path: Path, start: int) -> str:
    """One line for the user: which task failed, the stage's own error, where the log is."""
    text = _ANSI.sub("", message)
    task = re.search(r"Inner task failed: '([^']+)'", text)
    with log_path.open(encoding="utf-8", errors="replace") as f:
        f.seek(start)
        errors = [line.strip() for line in f if "StageFailed: " in line]
    reason = errors[-1].split("StageFailed: ", 1)[1] if errors else text
    where = f"task '{task.group(1)}'" if task else "a task"
    return f"{where} failed: {reason} (task logs: {log_path})"
