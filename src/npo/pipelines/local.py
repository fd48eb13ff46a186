"""Run an experiment's Kubeflow pipeline on this machine: the DAG a cluster runs, executed
by kfp.local's SubprocessRunner (every task a `kfp.dsl.executor_main` subprocess, no
container, no network).

A task's component calls `npo.stepserver.call_stage`; here NPO_STEP_SERVER points it at a
warm step server, so a task does not pay the ~5 s import of torch and transformers: the
server's worker has everything imported and runs the stage with the task's environment,
working directory and stdout. Its progress events reach `progress` (the CLI's bars).
kfp.local's own log (every task's inputs, outputs and output lines) goes to
`<run_dir>/pipeline.log`.

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
from npo.steps.context import ProgressFn, open_run

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
    transformers: seconds) overlap with opening the first run here."""

    def __init__(self, progress: ProgressFn | None = None) -> None:
        from npo.stepserver import StepServer

        self._server = StepServer(preload=PRELOAD, on_progress=progress)
        self._tmp: Path | None = None

    def __enter__(self) -> LocalPipelines:
        # mkdtemp also fixes this process's own temp folder (tempfile caches its choice)
        # before the tasks' TMPDIR is set in os.environ.
        self._tmp = Path(tempfile.mkdtemp(prefix="npo-kfp-"))
        self._server.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
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
        # Validate the config and endpoints, wipe a previous run (fresh), create the run
        # folder and the MLflow run here, before any task starts; the tasks reopen the run.
        ctx = open_run(cfg, fresh=fresh)
        run_dir = ctx.run_dir
        ctx.db.close()
        ctx.tracker.flush()  # the MLflow run stays open: the report task finishes it
        pipeline = build_pipeline(cfg, local=True)
        self._server.wait_ready()  # at once when it serves; a new worker if one died
        # Workers take the task's environment, so per-run secrets travel with the tasks.
        env = {**secret_env(cfg), **self._server.env(), "TMPDIR": str(self._tmp)}
        try:
            summary = _run_dag(pipeline, run_dir, env)
        finally:
            _empty(self._tmp)  # the tasks' ephemeral_component.py folders
        return dict(summary)


def _empty(folder: Path) -> None:
    """Remove what `folder` holds, keeping the folder itself."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def run_pipeline(
    cfg: ExperimentConfig, fresh: bool = False, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run (or resume) one experiment as its pipeline (see `LocalPipelines.run`)."""
    with LocalPipelines(progress) as pipelines:
        return pipelines.run(cfg, fresh=fresh)


def _run_dag(pipeline: Any, run_dir: Path, env: dict[str, str]) -> Any:
    """Execute the pipeline with kfp.local and return its output (the report's summary);
    its log goes to `<run_dir>/pipeline.log`."""
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
            runner=local.SubprocessRunner(use_venv=False),
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
