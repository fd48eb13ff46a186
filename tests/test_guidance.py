"""NPO guidance: slot replacement, the cache payload, and the manual schedules."""

from __future__ import annotations

import pytest
import torch

from npo.algo import compute_advantages
from npo.config import load_config
from npo.guidance.cache import (
    GuidanceCache,
    GuideTrajectory,
    list_cache_headers,
    load_cache,
    save_cache,
)
from npo.guidance.inject import inject_guidance
from npo.guidance.schedule import Guide, Segment, plan_segments
from npo.rollout import RolloutBatch
from npo.store.artifacts import LocalStore
from npo.tasks import Problem

PAD = 0


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"q{i}", answer="1", target="1") for i in range(n)]


def _batch(n: int, g: int, width: int = 2) -> RolloutBatch:
    b = n * g
    return RolloutBatch(
        prompt_ids=torch.ones(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.full((b, width), 7),
        response_mask=torch.ones(b, width, dtype=torch.long),
        logprobs=torch.full((b, width), -0.5),
        texts=[f"r{i}" for i in range(b)],
        prompt_index=torch.arange(n).repeat_interleave(g),
    )


def _cache(*ids: str) -> GuidanceCache:
    entries = {
        pid: GuideTrajectory(pid, [4, 5, 2], [-0.1, -0.2, -0.3], f"guide-{pid}", 1.0) for pid in ids
    }
    return GuidanceCache("c1", "run.early000000", 3, 0, entries, {"q_hat": 0.5})


def test_gated_cached_groups_get_the_guide_in_the_last_slot() -> None:
    # group 0: pass 0/3 (gated, cached) -> replaced; group 1: 2/3 >= 0.6 -> kept;
    # group 2: 0/3 gated but not cached -> kept.
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mixed = inject_guidance(_batch(3, 3), rewards, _problems(3), _cache("p0", "p1"), 0.6, PAD)

    assert mixed.gated.tolist() == [True, False, True]
    assert mixed.replaced.tolist() == [True, False, False]
    assert mixed.is_guide.tolist() == [False, False, True] + [False] * 6
    assert mixed.rewards.tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]
    b = mixed.batch
    assert b.response_ids.shape == (9, 3)  # widened to the guide's 3 tokens
    assert b.response_ids[2].tolist() == [4, 5, 2]
    assert b.response_mask[2].tolist() == [1, 1, 1]
    assert b.logprobs[2].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert b.texts[2] == "guide-p0"
    # on-policy rows keep their tokens, padded with PAD / mask 0 / logprob 0
    assert b.response_ids[0].tolist() == [7, 7, PAD]
    assert b.response_mask[0].tolist() == [1, 1, 0]
    assert b.logprobs[0].tolist() == [-0.5, -0.5, 0.0]
    # advantages over the mixed group: only the guide row is positive in group 0
    adv = compute_advantages("grpo", mixed.rewards)
    assert adv[0, 2] > 0 and (adv[0, :2] < 0).all()
    assert adv[2].abs().max() == 0


def test_shorter_guide_row_is_padded() -> None:
    batch = _batch(1, 2, width=5)
    mixed = inject_guidance(batch, torch.zeros(1, 2), _problems(1), _cache("p0"), 0.6, PAD)
    assert mixed.batch.response_ids[1].tolist() == [4, 5, 2, PAD, PAD]
    assert mixed.batch.response_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert mixed.batch.logprobs[1, 3:].tolist() == [0.0, 0.0]


def test_inject_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="does not match"):
        inject_guidance(_batch(2, 3), torch.zeros(3, 3), _problems(3), _cache(), 0.6, PAD)


def test_cache_payload_round_trip(tmp_path) -> None:
    store = LocalStore(tmp_path)
    cache = _cache("p0", "p1")
    key = save_cache(store, "run", cache)
    assert key == "runs/run/guidance/c1.parquet"
    back = load_cache(store, "run", "c1")
    assert back.entries.keys() == cache.entries.keys()
    assert back.entries["p1"].response_ids == [4, 5, 2]
    assert back.entries["p1"].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert (back.guide_run_id, back.guide_step, back.stats) == (
        "run.early000000",
        3,
        {"q_hat": 0.5},
    )
    assert [h["cache_id"] for h in list_cache_headers(store, "run")] == ["c1"]


def _plan(*overrides: str) -> list[tuple[int, int, Guide | None]]:
    cfg = load_config(None, ["method=npo", "train.steps=100", *overrides])
    return [(s.start, s.end, s.guide) for s in plan_segments(cfg)]


def test_plans_for_each_schedule() -> None:
    assert plan_segments(load_config(None, ["train.steps=10"])) == [Segment(0, 10)]
    assert _plan("npo.early.enabled=true", "npo.early.scout_steps=20", "npo.early.window=30") == [
        (0, 30, Guide("early", 0, 20)),
        (30, 100, None),
    ]
    assert _plan(
        "npo.early.enabled=true",
        "npo.late.enabled=true",
        "npo.late.at_step=60",
        "npo.late.lookahead=20",
    ) == [
        (0, 25, Guide("early", 0, 25)),
        (25, 60, None),
        (60, 80, Guide("late", 60, 20)),
        (80, 100, None),
    ]
    rolling = _plan("npo.rolling.enabled=true", "npo.rolling.every=40", "npo.rolling.lookahead=10")
    assert rolling == [
        (0, 40, Guide("rolling", 0, 10)),
        (40, 80, Guide("rolling", 40, 10)),
        (80, 100, Guide("rolling", 80, 10)),
    ]
    control = _plan("npo.rolling.enabled=true", "npo.rolling.every=50", "npo.delta0_control=true")
    assert [g.lookahead for _, _, g in control] == [0, 0]
    assert Guide("late", 60, 20).branch == "late000060"
    assert Guide("late", 60, 20).guide_step == 80


def test_main_line_vs_branches() -> None:
    from npo.steps.context import is_main_line

    assert is_main_line("run", "run") and is_main_line("run", "run.r12")
    assert not is_main_line("run", "run.rolling000025")  # a look-ahead branch
    assert not is_main_line("run", "run.late000100")
    assert not is_main_line("run", "other.r1")
