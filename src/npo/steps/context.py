"""What every step of a run shares: config, task, stores, tracker, progress sink.

`open_run(cfg)` opens (or re-opens, to resume) the run named `cfg.name`: the artifact store,
the metadata DB (migrated), the tracker and the local output folder `<store.root>/<name>/`.
Everything a later step reads is in the artifact store or the metadata DB (the history, the
MLflow run id, the start time, the config the run was started with), never in that folder:
a cluster's pods share no disk. The folder only receives what a user reads (the report,
summary.json, an export of the history, the config as YAML).

A run remembers the config it was started with; re-opening it with a different config is
refused, naming the fields that differ, so a resume can never silently mix two experiments
(speed settings such as train.threads may change, and train.steps may grow: see
`npo.config.resume_conflicts`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from npo.config import ExperimentConfig, public_dump, resume_conflicts
from npo.store.artifacts import ArtifactStore, open_store
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB, RunRow, RunStatus, default_metadata_url
from npo.store.tracking import (
    NullTracker,
    Tracker,
    delete_tracked_run,
    end_tracked_run,
    make_tracker,
)
from npo.tasks import Task, make_task

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
"""progress(phase, done, total, latest_metrics): the CLI draws bars from it."""

NoticeFn = Callable[[str], None]
"""notify(text): a one-off line for the user (e.g. which checkpoint a resumed run starts at)."""


HISTORY = "metrics.jsonl"  # the export of a run's history in its output folder


class RunConflict(RuntimeError):
    """The run's stored state does not fit the config (or itself)."""


def _noop_progress(phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
    pass


@dataclass
class RunContext:
    """One open run. `run_id` is whose checkpoints the context reads and writes: the run, a
    rollback lineage (`<root>.r<k>`) or a look-ahead branch; `history_id` is whose history
    its metrics go to (lineages share the run's: global steps continue across them)."""

    cfg: ExperimentConfig
    run_id: str
    run_dir: Path
    task: Task
    store: ArtifactStore
    db: MetadataDB
    tracker: Tracker
    progress: ProgressFn = _noop_progress
    root_id: str = ""
    history_id: str = ""
    resume_note: str | None = None  # set by open_run: what reopening the run means (or None)

    def __post_init__(self) -> None:
        self.root_id = self.root_id or self.run_id
        self.history_id = self.history_id or self.run_id

    def history(self, until_step: int | None = None) -> list[dict[str, Any]]:
        """The metric history ({"step", "policy_step", **metrics} by global step)."""
        return self.db.history(self.history_id, until_step)

    def run_row(self) -> RunRow:
        row = self.db.get_run(self.root_id)
        assert row is not None, f"run {self.root_id} is not in the metadata DB"
        return row

    def lineage(self, k: int) -> RunContext:
        """The run continuing under a new checkpoint lineage (`<root>.r<k>`) after a
        rollback: replayed policy steps get their own checkpoints, never overwriting the
        ones they replace; metrics and tracker stay the run's."""
        run_id = f"{self.root_id}.r{k}"
        self.db.upsert_run(run_id, run_id, f"{self.cfg.method}-lineage", self.cfg.seed, {})
        return replace(self, run_id=run_id, history_id=self.root_id)

    def branch(self, name: str) -> RunContext:
        """A child run (`<root>.<name>`, e.g. a look-ahead) sharing stores and task.

        Its checkpoints and its history are its own; it logs nothing to the parent's
        tracker (the parent logs what the branch produced)."""
        run_id = f"{self.root_id}.{name}"
        self.db.upsert_run(run_id, run_id, f"{self.cfg.method}-branch", self.cfg.seed, {})
        return replace(self, run_id=run_id, history_id=run_id, tracker=NullTracker())

    def close(self, status: str = "FINISHED") -> None:
        self.tracker.finish(status)
        _close(self.db, self.task)


def is_main_line(root_id: str, run_id: str) -> bool:
    """True for the run itself and its rollback lineages, False for look-ahead branches."""
    return re.fullmatch(rf"{re.escape(root_id)}(\.r\d+)?", run_id) is not None


def is_branch(root_id: str, run_id: str) -> bool:
    """True for the run's own look-ahead branches (extra compute of this run)."""
    return run_id.startswith(f"{root_id}.") and not is_main_line(root_id, run_id)


def warmup_progress_id(run_id: str) -> str:
    """Where a warm-up keeps its checkpoints until checkpoint 0 (`<run>.warmup`): a run id
    of its own, so that its supervised steps never mix with policy steps."""
    return f"{run_id}.warmup"


def last_commit(db: MetadataDB, cfg: ExperimentConfig) -> str:
    """Where a rerun of run `cfg.name` continues from, in words: its newest committed
    checkpoint on the main line (a rollback's lineage included), else its warm-up's."""
    rows = db.family_checkpoints(cfg.name)
    main = [r for r in rows if is_main_line(cfg.name, r.run_id)]
    if main:
        last = main[-1]
        lineage = f" of lineage {last.run_id}" if last.run_id != cfg.name else ""
        if last.step == 0 and not lineage:
            return "its last checkpoint is the end of its warm-up (policy step 0)"
        return f"its last checkpoint is policy step {last.step}{lineage}"
    warm = [r for r in rows if r.run_id == warmup_progress_id(cfg.name)]
    if warm:
        return f"its last checkpoint is warm-up step {warm[-1].step} of {cfg.warmup.steps}"
    return "it has no checkpoint yet"


def _resume_note(db: MetadataDB, cfg: ExperimentConfig, row: RunRow | None) -> str | None:
    """What reopening the run means, for the user: None for a new run; `row` is the run's
    row as it was before this open."""
    if row is None:
        return None
    steps = row.config.get("train", {}).get("steps")  # train.steps may grow on resume
    if row.status == RunStatus.COMPLETED and steps == cfg.train.steps:
        return (
            f"run {cfg.name!r} is complete: its tasks return their committed results "
            "(--fresh runs it again)"
        )
    more = f"; on to policy step {cfg.train.steps}" if steps != cfg.train.steps else ""
    return f"resuming run {cfg.name!r} ({row.status}): {last_commit(db, cfg)}{more}"


def mark_stopped(cfg: ExperimentConfig, status: RunStatus) -> str:
    """Record that run `cfg.name` stopped without finishing (`interrupted` or `failed`) in
    the metadata DB and its MLflow run (KILLED or FAILED): whatever stopped its stage may
    have given that stage no chance to. Returns a line saying so, and where a rerun of the
    same command resumes. A run that completed meanwhile is left as it is."""
    root = cfg.store.root.resolve()
    with MetadataDB(metadata_url(cfg)) as db:
        row = db.get_run(cfg.name)
        if row is None:
            return f"run {cfg.name!r} had not started"
        if row.status == RunStatus.COMPLETED:
            return f"run {cfg.name!r} had completed"
        db.set_run_status(cfg.name, status)
        if row.mlflow_run_id:
            mlflow_status = "KILLED" if status == RunStatus.INTERRUPTED else "FAILED"
            end_tracked_run(cfg.tracking, root, row.mlflow_run_id, mlflow_status)
        where = last_commit(db, cfg)
    return f"run {cfg.name!r} marked {status.value}; {where}: the same command resumes it"


def metadata_url(cfg: ExperimentConfig) -> str:
    """NPO_METADATA_URL (from a Secret), else the config's URL, else SQLite under root."""
    url = os.environ.get("NPO_METADATA_URL") or cfg.store.metadata_url
    return url or default_metadata_url(cfg.store.root.resolve())


def artifacts_uri_of(cfg: ExperimentConfig) -> str:
    """NPO_ARTIFACTS_URI (from a Secret when it embeds keys), else the config's URI, else
    `<store.root>/artifacts`."""
    uri = os.environ.get("NPO_ARTIFACTS_URI") or cfg.store.artifacts_uri
    return uri or (cfg.store.root.resolve() / "artifacts").as_uri()


def _close(db: MetadataDB, task: Task) -> None:
    db.close()
    close = getattr(task, "close", None)
    if close:
        close()


def open_run(
    cfg: ExperimentConfig,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    lazy_tracking: bool = False,
) -> RunContext:
    """Create or re-open the run named `cfg.name` (fresh=True wipes a previous one).

    lazy_tracking: a re-opened run connects to MLflow only when something is logged (the
    pipeline's tasks: most checks log nothing)."""
    run_dir = (cfg.store.root / cfg.name).resolve()
    artifacts_uri = artifacts_uri_of(cfg)
    ours = public_dump(cfg)
    store = open_store(artifacts_uri)  # connects lazily: nothing is created yet
    # Validate every external thing before writing anything (the DB file included).
    if cfg.rollout.backend == "vllm":
        from npo.rollout.vllm import check_available

        check_available()
    task = make_task(cfg.task)
    db = MetadataDB(metadata_url(cfg))
    db.migrate()
    if fresh:
        old = db.get_run(cfg.name)
        if old is not None and old.mlflow_run_id:
            # one name, one MLflow run: the restarted run's old one goes to MLflow's trash
            delete_tracked_run(cfg.tracking, cfg.store.root.resolve(), old.mlflow_run_id)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        store.delete_prefix(f"runs/{cfg.name}/")  # the run's checkpoints, guidance, report
        store.delete_prefix(f"runs/{cfg.name}.")  # its look-ahead branches and lineages
        db.delete_run(cfg.name)  # and its rows (branches' and lineages'): AutoNPO replays them
    row = db.get_run(cfg.name)
    changed = resume_conflicts(row.config, ours) if row is not None else []
    if changed:
        _close(db, task)
        raise RunConflict(
            f"run {cfg.name!r} was started with a different config (metadata DB "
            f"{db.safe_url}): {'; '.join(changed)}. Resume it with the same values (only "
            "speed settings such as train.threads may change, and train.steps may grow), "
            "pick another name (--set name=...), or pass --fresh to restart it"
        )
    if row is None and list_checkpoints(store, cfg.name):
        # checkpoints without their run (a metadata DB deleted or swapped): resuming would
        # write a history that starts in the middle
        _close(db, task)
        raise RunConflict(
            f"the artifact store ({artifacts_uri}) holds checkpoints of run {cfg.name!r} but "
            f"the metadata DB ({db.safe_url}) has no such run; pass --fresh to start the run "
            "over"
        )
    note = _resume_note(db, cfg, row)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(ours, sort_keys=True))
    db.upsert_run(cfg.name, cfg.name, cfg.method, cfg.seed, ours)
    known = row.mlflow_run_id if row is not None else None
    tracker = make_tracker(
        cfg.tracking,
        cfg.store.root.resolve(),
        cfg.name,
        resume_run_id=known,
        lazy=lazy_tracking,
    )
    if tracker.run_id and tracker.run_id != known:
        db.set_run_info(cfg.name, mlflow_run_id=tracker.run_id)
    return RunContext(
        cfg=cfg,
        run_id=cfg.name,
        run_dir=run_dir,
        task=task,
        store=store,
        db=db,
        tracker=tracker,
        progress=progress or _noop_progress,
        resume_note=note,
    )
