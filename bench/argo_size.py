"""Estimate the Argo Workflow object the KFP v2 backend creates from a compiled pipeline.

    .venv/bin/python bench/argo_size.py                      # every pipelines/compiled/*.yaml
    .venv/bin/python bench/argo_size.py configs/toy_autonpo.yaml --set train.steps=2000

Kubernetes stores a run as ONE Workflow object, and etcd refuses requests over ~1.5 MiB
(kubeflow/pipelines#13738, #13422): a pipeline whose Workflow grows with the budget cannot
be submitted at a real budget. The estimate follows the backend's Argo compiler
(backend/src/v2/compiler/argocompiler in kubeflow/pipelines): every component spec and
container implementation is stored once in the Workflow's arguments, deduplicated by
content (`saveProtoToArguments`, keyed by a hash of the component), the Kubernetes
platform config once per component name; every task becomes a driver task and an executor
(or DAG) task, each carrying the task spec's JSON inline. Boilerplate per task and the
fixed system templates (container driver, executor with the launcher, DAG driver) are
counted generously from the shape of those templates. Prints bytes and the share of the
1.5 MiB limit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

LIMIT = int(1.5 * 1024 * 1024)  # etcd's default request limit, the Workflow's ceiling
TASK_BOILERPLATE = 1536  # driver + executor DAG tasks: names, templates, placeholders, depends
DAG_TEMPLATE = 512  # a sub-DAG's own template: name, inputs, outputs
FIXED = 24 * 1024  # entrypoint, root driver, system-container-driver/-executor, dag driver


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def estimate(text: str) -> dict[str, int]:
    """Bytes of the Workflow a compiled pipeline YAML becomes, by part."""
    docs = list(yaml.safe_load_all(text))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"] if len(docs) > 1 else {}
    executors = spec["deploymentSpec"]["executors"]
    stored: dict[str, int] = {}  # content hash -> size: one argument per distinct body
    tasks = dags = 0
    task_json = 0

    def walk(dag: dict[str, Any]) -> None:
        nonlocal tasks, dags, task_json
        for task in dag.get("tasks", {}).values():
            tasks += 1
            task_json += len(_json(task))
            component = spec["components"][task["componentRef"]["name"]]
            body = _json(component)
            stored[hashlib.sha256(body.encode()).hexdigest()] = len(body)
            if "dag" in component:
                dags += 1
                walk(component["dag"])
            else:
                impl = _json(executors[component["executorLabel"]])
                stored[hashlib.sha256(impl.encode()).hexdigest()] = len(impl)

    walk(spec["root"]["dag"])
    kubernetes = sum(
        len(_json(v)) for v in platform.get("deploymentSpec", {}).get("executors", {}).values()
    )
    parts = {
        "components and containers (deduplicated)": sum(stored.values()),
        "kubernetes configs": kubernetes,
        "task specs": task_json,
        "task boilerplate": tasks * TASK_BOILERPLATE + dags * DAG_TEMPLATE,
        "fixed templates": FIXED,
    }
    parts["total"] = sum(parts.values())
    parts["tasks"] = tasks
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "configs", nargs="*", type=Path, help="configs to compile (default: the committed YAML)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key.path=value"
    )
    args = parser.parse_args()
    if args.configs:
        from npo.config import load_config
        from npo.pipelines.compile import pipeline_yaml

        texts = {
            f"{p.name} {' '.join(args.overrides)}".strip(): pipeline_yaml(
                load_config(p, args.overrides), str(p)
            )
            for p in args.configs
        }
    else:
        texts = {p.name: p.read_text() for p in sorted(Path("pipelines/compiled").glob("*.yaml"))}
    print(f"{'pipeline':<48} {'tasks':>5} {'YAML KiB':>9} {'Workflow KiB':>13} {'of 1.5 MiB':>11}")
    for name, text in texts.items():
        parts = estimate(text)
        share = parts["total"] / LIMIT
        kib, workflow = len(text.encode()) / 1024, parts["total"] / 1024
        print(f"{name:<48} {parts['tasks']:>5} {kib:>9.1f} {workflow:>13.1f} {share:>10.1%}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
