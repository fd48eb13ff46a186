"""What every step of a run shares: config, task, stores, tracker, progress sink.

`open_run(cfg)` creates (or re-opens, to resume) the run folder `<store.root>/<name>/`,
the artifact store, the metadata DB (migrated) and the tracker. A run folder remembers the
config it was started with; re-opening it with a different config is refused, so a resume
can never silently mix two experiments.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from npo.config import ExperimentConfig, public_dump
from npo.store.artifacts import ArtifactStore, open_store
from npo.store.metadata import MetadataDB, default_metadata_url
from npo.store.tracking import Tracker, make_tracker
from npo.tasks import Task, make_task

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
"""progress(phase, done, total, latest_metrics): the CLI draws bars from it."""


class RunConflict(RuntimeError):
    """The run folder exists with a different config."""


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
        return self.run_dir / "metrics.jsonl"

    def close(self, status: str = "FINISHED") -> None:
        self.tracker.finish(status)
        self.db.close()
        close = getattr(self.task, "close", None)
        if close:
            close()


def _config_text(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(public_dump(cfg), sort_keys=True)


def open_run(
    cfg: ExperimentConfig, fresh: bool = False, progress: ProgressFn | None = None
) -> RunContext:
    """Create or re-open the run named `cfg.name` (fresh=True wipes a previous one)."""
    run_dir = (cfg.store.root / cfg.name).resolve()
    artifacts_uri = cfg.store.artifacts_uri or (run_dir / "artifacts").as_uri()
    text = _config_text(cfg)
    saved = run_dir / "config.yaml"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
        if cfg.store.artifacts_uri:
            open_store(artifacts_uri).delete_prefix(f"runs/{cfg.name}/")
    if saved.exists() and saved.read_text() != text:
        raise RunConflict(
            f"{run_dir} holds a run started with a different config; resume it with the "
            f"same config, pick another name (--set name=...), or pass --fresh to restart it"
        )
    # Validate every external thing before creating anything on disk.
    task = make_task(cfg.task)
    store = open_store(artifacts_uri)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)
    db_url = os.environ.get("NPO_METADATA_URL") or cfg.store.metadata_url
    db = MetadataDB(db_url or default_metadata_url(cfg.store.root.resolve()))
    db.migrate()
    db.upsert_run(cfg.name, cfg.name, cfg.method, cfg.seed, public_dump(cfg))

    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    tracker = make_tracker(
        cfg.tracking, cfg.store.root.resolve(), cfg.name, resume_run_id=info.get("mlflow_run_id")
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
