"""Orchestration overhead of the local Kubeflow pipeline against calling the stages directly.

Runs the toy comparison of `make run` (GRPO and AutoNPO from one shared warm-up) twice, from
scratch, in fresh store roots: once with the stages called in this process ("direct": the
same stages, same order, no orchestration) and once as Kubeflow pipelines through kfp.local
("pipeline": what `npo run` / `make run` do). Both do the same training (same seeds: their
final accuracies must match), so the difference in wall time is the orchestration cost:
the step server start-up, kfp.local's bookkeeping, a process fork per task, and each task
reopening the run (config, metadata DB, MLflow run, checkpoint) on its own.

    overhead = (pipeline wall - direct wall) / pipeline wall     target: <= 10%

Run:
    .venv/bin/python bench/pipeline_overhead.py [--configs A.yaml B.yaml] [--root /tmp/x]
        [--set key=value ...] [--order direct,pipeline]
It prints a table and writes bench-overhead.json; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from npo.compare import run_comparison
from npo.config import load_config

CONFIGS = ["configs/toy_grpo.yaml", "configs/toy_autonpo.yaml"]


def _run(engine: str, configs: list[str], root: Path, overrides: list[str]) -> dict[str, Any]:
    sets = [*overrides, f"store.root={root / engine}"]
    cfgs = [load_config(c, sets) for c in configs]
    started = time.perf_counter()
    _, _, summaries = run_comparison(cfgs, "comparison", fresh=True, engine=engine)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "runs": {
            s["run"]: {"final": s["final accuracy"], "steps": s["policy steps"]} for s in summaries
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--root", type=Path, default=None, help="Store roots (default: a tmp dir).")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--order", default="direct,pipeline", help="Which engine runs first.")
    ap.add_argument("--json", type=Path, default=Path("bench-overhead.json"))
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="npo-overhead-"))
    results = {}
    for engine in args.order.split(","):
        results[engine] = _run(engine, args.configs, root, args.overrides)
        print(f"{engine}: {results[engine]['wall_s']:.1f} s", flush=True)
    direct, pipe = results["direct"]["wall_s"], results["pipeline"]["wall_s"]
    overhead = (pipe - direct) / pipe
    same = results["direct"]["runs"] == results["pipeline"]["runs"]
    print("\n| engine | wall (s) | final accuracies |\n|---|---|---|")
    for engine, r in results.items():
        finals = ", ".join(f"{k} {v['final']:.3f}" for k, v in r["runs"].items())
        print(f"| {engine} | {r['wall_s']:.1f} | {finals} |")
    print(f"\norchestration overhead: {100 * overhead:.1f}% of the pipeline's wall time")
    print(f"same training results: {same}")
    args.json.write_text(json.dumps({**results, "overhead": overhead, "same": same}, indent=2))


if __name__ == "__main__":
    main()
