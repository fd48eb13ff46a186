"""Where the off-policy row of a group comes from: one plug-in point for NPO and baselines.

A source looks at a step's prompts and on-policy rewards and says which groups get their
last slot replaced, and by what trajectory:

- `CachedGuidance` (NPO, and RLEP's far-future replay): a guidance cache + the pass-rate gate;
- `GoldTeacher` (LUFFY with gold solutions as the external teacher): every group gets the
  gold response, no gate, and its tokens are trained with LUFFY's shaped objective
  f(w) = w/(w+γ) with the behaviour probability taken as 1 (`shaped = True`);
- `ExperienceReplay` (ExGRPO): half of each step's prompts come from a pool of the run's own
  past successes, whose groups get one stored trajectory (stateful: select / observe /
  state_files / restore are called by the trainer when a source has them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from npo.algo.npo import guidance_gate, pass_rates
from npo.guidance.cache import (
    GuidanceCache,
    GuideTrajectory,
    cache_from_bytes,
    cache_to_bytes,
    first_correct_rows,
    trajectory_from_row,
)
from npo.rollout import RolloutBatch
from npo.tasks import Problem
from npo.training.seeding import derive_seed


@dataclass
class Pick:
    """replacements: group index -> trajectory for its last slot; gated [N]: groups the
    source considered (below the gate), whether or not it had a trajectory for them."""

    replacements: dict[int, GuideTrajectory]
    gated: torch.Tensor


class TrajectorySource(Protocol):
    shaped: bool  # True: the replaced rows use LUFFY's shaped loss instead of the PPO ratio

    def pick(self, problems: list[Problem], rewards: torch.Tensor) -> Pick: ...

    def select(self, problems: list[Problem], step: int) -> list[Problem]: ...

    def observe(
        self, problems: list[Problem], batch: RolloutBatch, rewards: torch.Tensor
    ) -> None: ...

    def state_files(self) -> dict[str, bytes]: ...

    def restore(self, files: dict[str, bytes]) -> None: ...


class Stateless:
    """Defaults for sources that neither choose prompts nor remember anything."""

    def select(self, problems: list[Problem], step: int) -> list[Problem]:
        return problems

    def observe(self, problems: list[Problem], batch: RolloutBatch, rewards: torch.Tensor) -> None:
        pass

    def state_files(self) -> dict[str, bytes]:
        return {}

    def restore(self, files: dict[str, bytes]) -> None:
        pass


@dataclass
class CachedGuidance(Stateless):
    """NPO: replace slot G of groups below the on-policy pass-rate gate with a cached
    trajectory (the guide's log-probs are the behaviour policy)."""

    cache: GuidanceCache
    gate: float
    shaped: bool = False

    def pick(self, problems: list[Problem], rewards: torch.Tensor) -> Pick:
        n = len(problems)
        gated = guidance_gate(pass_rates(rewards), torch.ones(n, dtype=torch.bool), self.gate)
        chosen = {
            i: self.cache.entries[problems[i].id]
            for i in gated.nonzero().flatten().tolist()
            if problems[i].id in self.cache
        }
        return Pick(chosen, gated)


@dataclass
class GoldTeacher(Stateless):
    """LUFFY with gold solutions: every group gets the task's teacher response (the
    problem's `teacher` text where the task has an external solver's, else the gold
    `target`) + EOS."""

    tokenizer: PreTrainedTokenizerBase
    shaped: bool = True
    _memo: dict[str, GuideTrajectory] = field(default_factory=dict)

    def trajectory(self, problem: Problem) -> GuideTrajectory:
        if problem.id not in self._memo:
            text = problem.teacher or problem.target
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            # The tokenizer's EOS (the first stop id, which every policy has) ends it: any
            # stop id would do, and this keeps the trajectory independent of model.stop_tokens.
            ids = [*ids, self.tokenizer.eos_token_id]
            # Behaviour probability 1 (log-prob 0): LUFFY's convention for teacher tokens.
            self._memo[problem.id] = GuideTrajectory(problem.id, ids, [0.0] * len(ids), text, 1.0)
        return self._memo[problem.id]

    def pick(self, problems: list[Problem], rewards: torch.Tensor) -> Pick:
        chosen = {i: self.trajectory(p) for i, p in enumerate(problems)}
        return Pick(chosen, torch.ones(len(problems), dtype=torch.bool))


@dataclass
class ExperienceReplay:
    """ExGRPO-style own-past replay: an experience pool of the run's own successful rollouts
    (token ids + behaviour log-probs) for partially solved prompts.

    Each step, `fraction` of the prompts are drawn from the pool (seeded by the step) and
    their groups get one stored trajectory in slot G + G-1 fresh samples; the rest are
    fresh prompts. After the step, partially solved prompts (0 < pass rate < 1) store one
    successful rollout; fully solved ones leave the pool. The pool is saved inside every
    checkpoint, so a resumed run replays the same experience.
    """

    problems_by_id: dict[str, Problem]
    seed: int
    fraction: float = 0.5
    shaped: bool = False
    pool: dict[str, GuideTrajectory] = field(default_factory=dict)
    _from_pool: set[int] = field(default_factory=set)

    STATE_FILE = "experience.parquet"

    def select(self, problems: list[Problem], step: int) -> list[Problem]:
        """Swap the last `fraction` of the step's prompts for pool prompts (when enough)."""
        k = min(int(len(problems) * self.fraction), len(self.pool))
        rng = random.Random(derive_seed(self.seed, step, stream=7))
        chosen = rng.sample(sorted(self.pool), k)
        fresh = problems[: len(problems) - k]
        self._from_pool = set(range(len(fresh), len(problems)))
        return fresh + [self.problems_by_id[pid] for pid in chosen]

    def pick(self, problems: list[Problem], rewards: torch.Tensor) -> Pick:
        chosen = {i: self.pool[problems[i].id] for i in sorted(self._from_pool)}
        gated = torch.zeros(len(problems), dtype=torch.bool)
        gated[list(chosen)] = True
        return Pick(chosen, gated)

    def observe(self, problems: list[Problem], batch: RolloutBatch, rewards: torch.Tensor) -> None:
        """Update the pool from the step's on-policy samples. rewards [N, G]."""
        first = first_correct_rows(rewards)
        for i, (problem, rate) in enumerate(
            zip(problems, pass_rates(rewards).tolist(), strict=True)
        ):
            if rate >= 1.0:
                self.pool.pop(problem.id, None)
            elif rate > 0.0:
                row = first[i]
                assert row is not None  # rate > 0: some sample is correct
                reward = float(rewards[i].max())
                self.pool[problem.id] = trajectory_from_row(batch, row, problem.id, reward)

    def state_files(self) -> dict[str, bytes]:
        cache = GuidanceCache("experience", "self", -1, -1, dict(self.pool))
        return {self.STATE_FILE: cache_to_bytes(cache)}

    def restore(self, files: dict[str, bytes]) -> None:
        if self.STATE_FILE in files:
            self.pool = dict(cache_from_bytes(files[self.STATE_FILE]).entries)
