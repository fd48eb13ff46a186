"""Several experiments side by side: run each (resumably), then one comparison report.

    npo compare configs/toy_grpo.yaml configs/toy_autonpo.yaml --name toy

Later configs reuse the first one's warm-up (`warmup.init_from`) unless they name their own,
so every method starts from the same checkpoint 0. The report (`<root>/<name>/comparison.md`
and `.png`) overlays eval accuracy and train reward per run, marks each run's interventions,
and tabulates final/best accuracy, steps to a threshold and total updates.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from npo.config import ExperimentConfig
from npo.experiment import run_experiment
from npo.report_compare import RunCurves, write_comparison
from npo.report_ui import events_of
from npo.steps.context import NoticeFn, ProgressFn, metadata_url
from npo.store.metadata import MetadataDB


def _curves(cfg: ExperimentConfig, summary: dict[str, Any]) -> RunCurves:
    """The run's history and interventions, from the metadata DB."""
    with MetadataDB(metadata_url(cfg)) as db:
        return RunCurves(
            label=f"{cfg.name} ({cfg.method})",
            history=db.history(cfg.name),
            summary=summary,
            events=events_of(db.interventions(cfg.name)),
        )


def run_comparison(
    configs: list[ExperimentConfig],
    name: str,
    threshold: float | None = None,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    engine: str = "direct",
    notify: NoticeFn | None = None,
    runner: str = "subprocess",
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Run every config, then write the comparison; returns (png, md, summaries)."""
    if len(configs) < 2:
        raise ValueError(f"compare needs at least two configs, got {len(configs)}")
    if len({c.name for c in configs}) != len(configs):
        raise ValueError("compare: every config needs its own name (set name: in each file)")
    first = configs[0].name
    summaries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if engine == "pipeline":  # one warm step server for all the runs' pipelines
            from npo.pipelines.local import LocalPipelines

            pipelines = stack.enter_context(LocalPipelines(progress, runner, notify))
        for cfg in configs:
            if cfg.name != first and cfg.warmup.init_from is None:
                cfg = cfg.model_copy(
                    update={"warmup": cfg.warmup.model_copy(update={"init_from": first})}
                )
            if engine == "pipeline":
                summaries.append(pipelines.run(cfg, fresh=fresh))
            else:
                summaries.append(run_experiment(cfg, fresh, progress, engine, notify))
    curves = [_curves(cfg, s) for cfg, s in zip(configs, summaries, strict=True)]
    out = configs[0].store.root.resolve() / name
    out.mkdir(parents=True, exist_ok=True)
    png, md = write_comparison(out, curves, title=f"comparison · {name}", threshold=threshold)
    return png, md, summaries
