"""Manual NPO schedules as a plan of segments (pure: config in, segments out).

A segment trains policy steps (start, end]. A guided segment first gets a guide: a branch
of the run forked at `start` trains `lookahead` steps ahead (the near-future policy; with
the Δ=0 control the guide is the checkpoint at `start` itself), the guide rolls out the
prompts of the segment, and the segment is trained from `start` with that guidance:

- early bootstrapping: a scout of S steps from step 0 guides the window (0, W];
- late plateau breakthrough: train past the plateau t to t+Δ on a branch, replay (t, t+Δ]
  with guidance;
- rolling: every window (t, t+W] is guided by a look-ahead of Δ steps from t.

Because prompts are a pure function of (seed, step), a look-ahead branch from t trains on
exactly the prompts the main run will see in (t, t+Δ]: it is literally the run's near future.
"""

from __future__ import annotations

from dataclasses import dataclass

from npo.config import ExperimentConfig


@dataclass(frozen=True)
class Guide:
    kind: str  # "early" | "late" | "rolling"
    branch_from: int  # policy step the guide branch forks at
    lookahead: int  # steps the branch trains ahead (0: the guide is the fork point itself)

    @property
    def branch(self) -> str:
        return f"{self.kind}{self.branch_from:06d}"

    @property
    def guide_step(self) -> int:
        return self.branch_from + self.lookahead


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    guide: Guide | None = None


def plan_segments(cfg: ExperimentConfig) -> list[Segment]:
    """The segments of the run, in order, covering (0, train.steps] without gaps.

    >>> from npo.config import load_config
    >>> cfg = load_config(None, ["method=npo", "npo.late.enabled=true", "train.steps=150"])
    >>> [(s.start, s.end, s.guide and s.guide.kind) for s in plan_segments(cfg)]
    [(0, 100, None), (100, 125, 'late'), (125, 150, None)]
    """
    steps = cfg.train.steps
    if cfg.method != "npo":
        return [Segment(0, steps)] if steps else []
    npo = cfg.npo
    ahead = (lambda n: 0) if npo.delta0_control else (lambda n: n)
    guided: list[Segment] = []
    if npo.rolling.enabled:
        for t in range(0, steps, npo.rolling.every):
            end = min(t + npo.rolling.every, steps)
            guided.append(Segment(t, end, Guide("rolling", t, ahead(npo.rolling.lookahead))))
    if npo.early.enabled:
        w = npo.early.window
        guided.append(Segment(0, w, Guide("early", 0, ahead(npo.early.scout_steps))))
    if npo.late.enabled:
        t, d = npo.late.at_step, npo.late.lookahead
        guided.append(Segment(t, t + d, Guide("late", t, ahead(d))))
    plan: list[Segment] = []
    cursor = 0
    for seg in sorted(guided, key=lambda s: s.start):
        if seg.start > cursor:
            plan.append(Segment(cursor, seg.start))
        plan.append(seg)
        cursor = seg.end
    if cursor < steps:
        plan.append(Segment(cursor, steps))
    return plan
