"""How a method's flow is written once and executed two ways.

A flow is a plain function of a `Flow` that calls stages through it:

    trained = f.call(stages.train, "train", run_id=run_id, start=0, end=150, watch=True)
    at = f.when(trained["triggered"], intervene, carry_on, name="intervene")

`InProcess(ctx)` runs each call at once and hands back the stage's result dict;
`npo.pipelines.build.Graph` adds a Kubeflow task per call (its outputs are channels) and
turns `when` into dsl.If / dsl.Else merged by dsl.OneOf. So the DAG a cluster runs and the
in-process engine (`npo run --engine direct`, the rolling schedule's task) execute the same
code, task for task. A flow may loop over config values only (they unroll the same in
both); every decision taken on a stage's output goes through `when`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from npo.config import ExperimentConfig
    from npo.steps.context import RunContext

Outputs = Mapping[str, Any]
Branch = Callable[[], Outputs]


class Flow(Protocol):
    """What a flow calls stages through."""

    cfg: ExperimentConfig

    def call(
        self, stage: Callable[..., Any], label: str, *, after: Outputs | None = None, **params: Any
    ) -> Outputs:
        """Run (or add) `stage` with `params`; `label` names it in the UI and progress;
        `after`: another call's outputs it must follow when no value links them."""
        ...

    def when(self, condition: Any, then: Branch, otherwise: Branch, name: str) -> Outputs:
        """`then()` if the boolean stage output `condition` holds, else `otherwise()`; both
        return outputs with the same keys, of which the result holds the taken branch's."""
        ...


class InProcess:
    """A flow executed in this process on one open run: each call runs its stage now."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg

    def call(
        self, stage: Callable[..., Any], label: str, *, after: Outputs | None = None, **params: Any
    ) -> Outputs:
        from npo.stages import STAGES

        if STAGES[stage.__name__].opens_run:
            return stage(self.ctx, **params)
        return stage(**params)

    def when(self, condition: Any, then: Branch, otherwise: Branch, name: str) -> Outputs:
        return then() if condition else otherwise()
