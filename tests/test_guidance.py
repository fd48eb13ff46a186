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
from npo.guidance.sources import CachedGuidance, GoldTeacher
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
    pick = CachedGuidance(_cache("p0", "p1"), 0.6).pick(_problems(3), rewards)
    mixed = inject_guidance(_batch(3, 3), rewards, pick, PAD)

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
    rewards = torch.zeros(1, 2)
    pick = CachedGuidance(_cache("p0"), 0.6).pick(_problems(1), rewards)
    mixed = inject_guidance(batch, rewards, pick, PAD)
    assert mixed.batch.response_ids[1].tolist() == [4, 5, 2, PAD, PAD]
    assert mixed.batch.response_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert mixed.batch.logprobs[1, 3:].tolist() == [0.0, 0.0]


def test_inject_rejects_mismatched_shapes() -> None:
    pick = CachedGuidance(_cache(), 0.6).pick(_problems(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="does not match"):
        inject_guidance(_batch(2, 3), torch.zeros(3, 3), pick, PAD)


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
    from npo.steps.context import is_branch

    assert is_branch("run", "run.late000100") and not is_branch("run", "run.r2")
    assert not is_branch("run", "far")  # RLEP's finished source run is not our compute


def test_gold_teacher_guides_every_group_with_the_gold_response() -> None:
    from npo.policy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=")
    problems = [
        Problem(id="a", prompt="1+2=", answer="3", target="3"),
        Problem(id="b", prompt="5+6=", answer="11", target="11"),
    ]
    teacher = GoldTeacher(tok)
    pick = teacher.pick(problems, torch.ones(2, 4))  # even all-correct groups: no gate
    assert teacher.shaped and pick.gated.tolist() == [True, True]
    b = pick.replacements[1]
    assert b.response_ids == [*tok("11", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert b.logprobs == [0.0, 0.0, 0.0]  # behaviour probability 1
    assert b.text == "11" and b.reward == 1.0


def test_gold_teacher_writes_the_external_solvers_text_where_the_task_has_one() -> None:
    from npo.policy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+*(),:=")
    problem = Problem(id="c", prompt="3,7,9:30=", answer="30", target="3*7+9", teacher="((7*3)+9)")
    (guide,) = GoldTeacher(tok).pick([problem], torch.ones(1, 4)).replacements.values()
    assert guide.text == "((7*3)+9)"
    ids = tok("((7*3)+9)", add_special_tokens=False)["input_ids"]
    assert guide.response_ids == [*ids, tok.eos_token_id]


def test_experience_replay_pool_select_pick_and_state() -> None:
    from npo.guidance.sources import ExperienceReplay

    problems = _problems(4)
    source = ExperienceReplay({p.id: p for p in problems}, seed=0, fraction=0.5)
    assert source.select(problems, step=1) == problems  # empty pool: all fresh
    assert source.pick(problems, torch.zeros(4, 3)).replacements == {}

    # p0 partially solved (row 1 correct) -> stored; p1 all correct -> not stored;
    # p2 all wrong -> not stored; p3 partial (row 2) -> stored.
    rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    batch = _batch(4, 3)
    batch.response_ids[1] = torch.tensor([3, 2])
    source.observe(problems, batch, rewards)
    assert sorted(source.pool) == ["p0", "p3"]
    assert source.pool["p0"].response_ids == [3, 2] and source.pool["p0"].text == "r1"
    assert source.pool["p0"].logprobs == pytest.approx([-0.5, -0.5])

    chosen = source.select(problems, step=2)
    assert chosen[:2] == problems[:2]  # half stay fresh
    assert sorted(p.id for p in chosen[2:]) == ["p0", "p3"]  # half from the pool
    pick = source.pick(chosen, torch.zeros(4, 3))
    assert sorted(pick.replacements) == [2, 3] and pick.gated.tolist() == [False, False, True, True]
    assert source.select(problems, step=2) == chosen  # seeded by the step

    source.observe(problems[:1], _batch(1, 3), torch.ones(1, 3))  # p0 now fully solved
    assert sorted(source.pool) == ["p3"]
    files = source.state_files()
    again = ExperienceReplay({p.id: p for p in problems}, seed=0)
    again.restore(files)
    assert again.pool == source.pool
