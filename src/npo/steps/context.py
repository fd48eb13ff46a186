"""What every step of a run shares: config, task, stores, tracker, progress sink.

`open_run(cfg)` creates (or re-opens, to resume) the run folder `<store.root>/<name>/`,
the artifact store, the metadata DB (migrated) and the tracker. A run folder remembers the
config it was started with; re-opening it with a different config is refused, so a resume
can never silently mix two experiments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from npo.config import ExperimentConfig, current_dump, public_dump
from npo.store.artifacts import ArtifactStore, open_store
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB, default_metadata_url
from npo.store.tracking import NullTracker, Tracker, make_tracker
from npo.tasks import Task, make_task

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
"""progress(phase, done, total, latest_metrics): the CLI draws bars from it."""


HISTORY = "metrics.jsonl"  # a run's metric history, one JSON object per line, in its folder


class RunConflict(RuntimeError):
    """The run's folder and stored state do not fit the config (or each other)."""


def _noop_progress(phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
    pass


@dataclass
class RunContext:
    cfg: ExperimentConfig
    run_id: str
    run_dir: Path
    task: Task
    store: ArtifactStore
    db: MetadataDB
    tracker: Tracker
    progress: ProgressFn = _noop_progress
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def history_path(self) -> Path:
        return self.run_dir / HISTORY

    @property
    def root_id(self) -> str:
        """The experiment's run id (a branch's or lineage's parent)."""
        return self.info.get("parent", self.run_id)

    def lineage(self, k: int) -> RunContext:
        """The run continuing under a new checkpoint lineage (`<root>.<name>`) after a
        rollback (`<root>.r<k>`): replayed policy steps get their own checkpoints, never
        overwriting the ones they replace; metrics and tracker stay the run's."""
        run_id = f"{self.root_id}.r{k}"
        self.db.upsert_run(run_id, run_id, f"{self.cfg.method}-lineage", self.cfg.seed, {})
        return replace(self, run_id=run_id, info={**self.info, "parent": self.root_id})

    def branch(self, name: str) -> RunContext:
        """A child run (`<run_id>.<name>`, e.g. a look-ahead) sharing stores and task.

        Its checkpoints live under its own run id, its metrics in its own folder; it logs
        nothing to the parent's tracker (the parent logs what the branch produced).
        """
        run_id = f"{self.root_id}.{name}"
        self.db.upsert_run(run_id, run_id, f"{self.cfg.method}-branch", self.cfg.seed, {})
        run_dir = self.run_dir / "branches" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        return replace(
            self,
            run_id=run_id,
            run_dir=run_dir,
            tracker=NullTracker(),
            info={"parent": self.run_id},
        )

    def close(self, status: str = "FINISHED") -> None:
        self.tracker.finish(status)
        self.db.close()
        close = getattr(self.task, "close", None)
        if close:
            close()


def _config_text(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(public_dump(cfg), sort_keys=True)


def _same_config(saved: str, text: str) -> bool:
    """Whether a run folder's config.yaml is `text`'s config, fields added since included."""
    return saved == text or current_dump(yaml.safe_load(saved)) == yaml.safe_load(text)


def is_main_line(root_id: str, run_id: str) -> bool:
    """True for the run itself and its rollback lineages, False for look-ahead branches."""
    return re.fullmatch(rf"{re.escape(root_id)}(\.r\d+)?", run_id) is not None


def is_branch(root_id: str, run_id: str) -> bool:
    """True for the run's own look-ahead branches (extra compute of this run)."""
    return run_id.startswith(f"{root_id}.") and not is_main_line(root_id, run_id)


def metadata_url(cfg: ExperimentConfig) -> str:
    """NPO_METADATA_URL (from a Secret), else the config's URL, else SQLite under root."""
    url = os.environ.get("NPO_METADATA_URL") or cfg.store.metadata_url
    return url or default_metadata_url(cfg.store.root.resolve())


def artifacts_uri_of(cfg: ExperimentConfig) -> str:
    """NPO_ARTIFACTS_URI (from a Secret when it embeds keys), else the config's URI, else
    `<store.root>/artifacts`."""
    uri = os.environ.get("NPO_ARTIFACTS_URI") or cfg.store.artifacts_uri
    return uri or (cfg.store.root.resolve() / "artifacts").as_uri()


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
    text = _config_text(cfg)
    saved = run_dir / "config.yaml"
    store = open_store(artifacts_uri)  # connects lazily: nothing is created yet
    if fresh:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        store.delete_prefix(f"runs/{cfg.name}/")  # the run's checkpoints and guidance
        store.delete_prefix(f"runs/{cfg.name}.")  # its look-ahead branches and lineages
    if saved.exists() and not _same_config(saved.read_text(), text):
        raise RunConflict(
            f"{run_dir} holds a run started with a different config; resume it with the "
            f"same config, pick another name (--set name=...), or pass --fresh to restart it"
        )
    # Validate every external thing before creating anything on disk.
    if cfg.rollout.backend == "vllm":
        from npo.rollout.vllm import check_available

        check_available()
    task = make_task(cfg.task)
    history = run_dir / HISTORY
    if not history.exists() and list_checkpoints(store, cfg.name):
        # checkpoints without their metric history (a run folder deleted by hand): resuming
        # would fail later, or write a history that starts in the middle
        raise RunConflict(
            f"the artifact store ({artifacts_uri}) holds checkpoints of run {cfg.name!r} but "
            f"its history {history} is gone; pass --fresh to start the run over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)
    db = MetadataDB(metadata_url(cfg))
    db.migrate()
    if fresh:  # and its rows (branches' and lineages' too): AutoNPO would replay them
        db.delete_run(cfg.name)
    db.upsert_run(cfg.name, cfg.name, cfg.method, cfg.seed, public_dump(cfg))

    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    tracker = make_tracker(
        cfg.tracking,
        cfg.store.root.resolve(),
        cfg.name,
        resume_run_id=info.get("mlflow_run_id"),
        lazy=lazy_tracking,
    )
    if tracker.run_id and info.get("mlflow_run_id") != tracker.run_id:
        info["mlflow_run_id"] = tracker.run_id
        info_path.write_text(json.dumps(info, indent=2))
    return RunContext(
        cfg=cfg,
        run_id=cfg.name,
        run_dir=run_dir,
        task=task,
        store=store,
        db=db,
        tracker=tracker,
        progress=progress or _noop_progress,
        info=info,
    )
