"""The experiment as a Kubeflow pipeline: the method's flow, executed as a DAG builder.

`build_pipeline(cfg)` returns a `@dsl.pipeline` with the config compiled in (`public_dump`:
no credentials) and the fields that leave the DAG's shape alone as typed parameters for the
KFP UI (npo.pipelines.parameters). Its tasks are what `npo.methods.experiment` calls
through a `Graph`: one task per stage call, display names from the flow's labels, `when`
as dsl.If / dsl.Else merged by dsl.OneOf. The DAG grows with the method's decisions
(AutoNPO's rounds, NPO's guided segments), never with train.steps.

    from kfp import compiler
    compiler.Compiler().compile(build_pipeline(load_config("configs/toy_npo.yaml")), "x.yaml")

No `from __future__ import annotations`: KFP reads the pipeline function's annotations.
"""

import contextlib
import inspect
import json
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from kfp import dsl
from kfp.dsl import PipelineTask, pipeline_task
from kfp.dsl.base_component import BaseComponent

from npo import stages
from npo.config import ExperimentConfig, public_dump
from npo.flow import Branch, Outputs
from npo.methods import METHODS, experiment
from npo.pipelines.components import make_components
from npo.pipelines.kubernetes import apply_cluster, image_of
from npo.pipelines.parameters import pipeline_parameters
from npo.stages import STAGES


def pipeline_name(cfg: ExperimentConfig) -> str:
    """cfg.name in the form KFP accepts for pipeline names: [a-z0-9-], starting alnum."""
    return re.sub(r"[^a-z0-9-]", "-", cfg.name.lower())


class TaskOutputs(Mapping[str, Any]):
    """A task's outputs as a flow sees them: channels by output name."""

    def __init__(self, task: PipelineTask) -> None:
        self.task = task

    def __getitem__(self, key: str) -> Any:
        return self.task.outputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.task.outputs)

    def __len__(self) -> int:
        return len(self.task.outputs)


class Graph:
    """A `Flow` that adds a task per stage call to the pipeline being defined."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        components: dict[str, dict[str, BaseComponent]],  # image -> stage -> component
        config: Any,
        local: bool,
    ) -> None:
        self.cfg, self.components, self.config, self.local = cfg, components, config, local

    def call(
        self, stage: Callable[..., Any], label: str, *, after: Outputs | None = None, **params: Any
    ) -> Outputs:
        declared = STAGES[stage.__name__]
        if declared.opens_run:
            params = {"config": self.config, **params}
        task = self.components[image_of(declared, self.cfg.cluster)][declared.name](**params)
        task.set_display_name(label)
        if isinstance(after, TaskOutputs):
            task.after(after.task)
        if self.local:  # kfp.local: no Kubernetes, and no cache that would skip a stage
            task.set_caching_options(enable_caching=False)
        else:
            as_job = declared.name == "train" and self.cfg.distributed.nodes > 1
            apply_cluster(task, declared, self.cfg.cluster, as_job)
        return TaskOutputs(task)

    def when(self, condition: Any, then: Branch, otherwise: Branch, name: str) -> Outputs:
        with dsl.If(condition == True, name=name):  # noqa: E712  # a channel, not a bool
            taken = then()
        with dsl.Else(name=f"{name} · no"):
            not_taken = otherwise()
        return {key: dsl.OneOf(taken[key], not_taken[key]) for key in taken}


def build_pipeline(cfg: ExperimentConfig, *, local: bool = False) -> Any:
    """The experiment's `@dsl.pipeline`: the same graph for `kfp.compiler` and `kfp.local`.

    Its parameters are `pipeline_parameters(cfg)` (typed, defaulting to cfg's values); its
    first task, `configure`, writes them into the compiled config, which every later task
    gets; its output is the report's summary.

    local=True leaves out the `cluster:` settings: kfp.local ignores resources and Secrets
    (warning about each task) but honours retries, whose back-off would make a failing
    local stage wait minutes before the run fails."""
    images = {image_of(st, cfg.cluster) for st in STAGES.values()}
    components = {image: make_components(image) for image in sorted(images)}
    offered = pipeline_parameters(cfg)

    def pipeline(*values: Any) -> dict:
        overrides = {p.field: value for (p, _, _), value in zip(offered, values, strict=True)}
        graph = Graph(cfg, components, None, local)
        base = json.dumps(public_dump(cfg))
        graph.config = graph.call(stages.configure, "config", config=base, overrides=overrides)[
            "config"
        ]
        return experiment(graph)["summary"]

    # KFP reads the parameters from the signature and passes them positionally.
    pipeline.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=kind
            )
            for p, kind, value in offered
        ],
        return_annotation=dict,
    )
    pipeline.__name__ = pipeline_name(cfg).replace("-", "_")
    with _cheap_caller_lookup():  # dsl.pipeline runs `pipeline` to record its tasks
        return dsl.pipeline(
            name=pipeline_name(cfg),
            display_name=cfg.name,
            description=METHODS[cfg.method].description,
        )(pipeline)


@contextlib.contextmanager
def _cheap_caller_lookup() -> Iterator[None]:
    """kfp's PipelineTask setters (set_cpu_request & co) name their caller for an error
    message with `inspect.stack()`, which reads the source of every frame on the stack and
    scans sys.modules for each: under a deep stack with torch loaded (a test worker) that
    was most of a compile. While the pipeline is built, that module sees an `inspect` whose
    `stack()` gives the same names from the frames alone."""

    def stack(context: int = 1) -> list[tuple[Any, str, int, str]]:
        frames, frame = [], sys._getframe(1)
        for _ in range(2):  # kfp reads entry [1]: its setter's caller
            frames.append((frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back or frame
        return frames

    class Inspect(types.ModuleType):
        def __getattr__(self, name: str) -> Any:  # everything else: the real module
            return getattr(inspect, name)

    shim = Inspect("inspect")
    shim.stack = stack  # type: ignore[attr-defined]
    pipeline_task.inspect = shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        pipeline_task.inspect = inspect  # type: ignore[attr-defined]
