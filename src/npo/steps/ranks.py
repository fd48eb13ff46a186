"""A stage on several ranks: the torchrun entry point, and the launch from the stage's task.

A stage whose config asks for more than one rank (distributed.nproc_per_node or nodes > 1):
train and prepare (the SFT warm-up) re-run themselves: on one node `launch_local` starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m npo.steps.ranks \
        --stage train --config-file CFG --params-file PARAMS

and waits; on several nodes a Kubeflow Trainer job runs the same module on every node
(npo.pipelines.trainjob). Rank 0 runs the stage as any task does (`run_stage`: it opens the
run, and writes its metrics, checkpoints and status); the other ranks open a context that
writes nothing (no tracker) and run the same stage function (for prepare, only the
warm-up), which splits the work (npo.steps.train_segment, npo.steps.warmup). The task that
launched them then runs the stage once more in its own process, where the finished segment
(or checkpoint 0) is read back from the store and the metadata DB (no weights are loaded):
its result is the task's result, as on one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from npo.config import ExperimentConfig
    from npo.steps.context import RunContext

CONFIG_ENV = "NPO_STAGE_CONFIG"  # the config JSON, where no file can be shared (a cluster job)
PARAMS_ENV = "NPO_STAGE_PARAMS"


class RanksFailed(RuntimeError):
    """The ranks of a stage did not all finish."""


def needs_ranks(cfg: ExperimentConfig) -> bool:
    """Whether the config asks for more than one rank and this process is not one of them."""
    from npo.training.distributed import launched_by_torchrun

    return cfg.distributed.world_size > 1 and not launched_by_torchrun()


def rank_command(stage: str, nproc: int, files: tuple[Path, Path] | None = None) -> list[str]:
    """The command that runs `stage` on `nproc` local ranks; `files` (config, params): read
    them from there, else from NPO_STAGE_CONFIG / NPO_STAGE_PARAMS. Without `files` the
    rendezvous comes from torchrun's PET_* variables (a Trainer job sets them).

    >>> rank_command("train", 2)[-4:]
    ['-m', 'npo.steps.ranks', '--stage', 'train']
    """
    rendezvous = ["--standalone"] if files is not None else []
    cmd = ["torchrun", *rendezvous, f"--nproc-per-node={nproc}", "-m", "npo.steps.ranks"]
    cmd += ["--stage", stage]
    if files is not None:
        cmd += ["--config-file", str(files[0]), "--params-file", str(files[1])]
    return cmd


def launch_local(stage: str, cfg: ExperimentConfig, params: dict[str, Any]) -> None:
    """Run `stage` with `params` on distributed.nproc_per_node ranks of this machine
    (torchrun, a rendezvous on a free local port) and wait for them; RanksFailed names the
    exit status. The ranks' output goes to this process's (the task log)."""
    nproc = cfg.distributed.nproc_per_node
    if cfg.distributed.nodes > 1:
        raise RanksFailed(
            f"distributed.nodes = {cfg.distributed.nodes}: a multi-node stage runs as a "
            "cluster job (npo submit), not on this machine"
        )
    with tempfile.TemporaryDirectory(prefix="npo-ranks-") as tmp:
        config, args = Path(tmp) / "config.json", Path(tmp) / "params.json"
        # the config as the task got it (credentials stay in the environment); 0600 files
        for path, data in ((config, cfg.model_dump(mode="json")), (args, params)):
            path.touch(mode=0o600)
            path.write_text(json.dumps(data))
        cmd = rank_command(stage, nproc, (config, args))
        # torchrun as this interpreter's module: the venv's, whatever PATH says
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.train.threads)}
        done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise RanksFailed(
            f"stage {stage}: {nproc} ranks under torchrun exited with status "
            f"{done.returncode} (see the ranks' output above)"
        )


def run_on_ranks(cfg: ExperimentConfig, stage: str, params: dict[str, Any]) -> None:
    """Run `stage` on the config's ranks and wait: torchrun here (one node), or a Kubeflow
    Trainer job (several nodes: npo.pipelines.trainjob)."""
    if cfg.distributed.nodes > 1:
        from npo.pipelines.cluster_job import run_train_job

        run_train_job(cfg, stage, params)
    else:
        launch_local(stage, cfg, params)


def reader_context(cfg: ExperimentConfig) -> RunContext:
    """The run for a rank other than 0: the same stores and task, no tracker; it must not
    write (the stage functions leave writing to rank 0)."""
    from npo.steps.context import RunContext, artifacts_uri_of, metadata_url
    from npo.store.artifacts import open_store
    from npo.store.metadata import MetadataDB
    from npo.store.tracking import NullTracker
    from npo.tasks import make_task

    return RunContext(
        cfg=cfg,
        run_id=cfg.name,
        run_dir=(cfg.store.root / cfg.name).resolve(),
        task=make_task(cfg.task),
        store=open_store(artifacts_uri_of(cfg)),
        db=MetadataDB(metadata_url(cfg)),
        tracker=NullTracker(),
    )


def rank_function(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """What a rank other than 0 runs for `stage`: the stage's function, but for the warm-up
    only its training (the prepare stage also records the run's start)."""
    if stage == "prepare":
        from npo.steps.warmup import warmup

        return warmup
    return fn


def run_rank(stage: str, config: str, params: dict[str, Any]) -> None:
    """What each rank runs: join the process group, run the stage (rank 0 as a task would,
    the others read-only), leave."""
    from npo.stages import STAGES, config_from_json, run_stage, use_compute
    from npo.training.distributed import close_ranks, init_ranks

    cfg = config_from_json(config)
    ranks = init_ranks(cfg)
    try:
        if ranks.main:
            run_stage(stage, config, **params)
        else:
            use_compute(cfg)
            ctx = reader_context(cfg)
            try:
                rank_function(stage, STAGES[stage].fn)(ctx, **params)
            finally:
                ctx.db.close()
    finally:
        close_ranks()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m npo.steps.ranks", description=__doc__)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--config-file", type=Path, help=f"else ${CONFIG_ENV}")
    parser.add_argument("--params-file", type=Path, help=f"else ${PARAMS_ENV}")
    args = parser.parse_args(argv)
    config = args.config_file.read_text() if args.config_file else os.environ[CONFIG_ENV]
    params = args.params_file.read_text() if args.params_file else os.environ[PARAMS_ENV]
    run_rank(args.stage, config, json.loads(params))


if __name__ == "__main__":
    main()
