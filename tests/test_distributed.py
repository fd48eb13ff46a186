"""The train stage on several ranks (torchrun, gloo on CPU): a 2-rank segment computes what
one process computes on the same global batch, its checkpoint resumes on 1 rank, and the
pieces that make it so (sharding, per-prompt sampling seeds, the config's checks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_config

from npo import stages
from npo.config import ConfigError, load_config, public_dump, resume_conflicts
from npo.rollout import sample
from npo.steps.ranks import needs_ranks, rank_command
from npo.steps.train_segment import sampling_seeds
from npo.training.distributed import Ranks


def test_shards_cover_the_items_once_in_order() -> None:
    assert [Ranks(r, 4).shard(8) for r in range(4)] == [slice(2 * r, 2 * r + 2) for r in range(4)]
    with pytest.raises(ValueError, match="do not split evenly over 3 ranks"):
        Ranks(0, 3).shard(8)
    cover = [i for r in range(3) for i in range(11)[Ranks(r, 3).uneven_shard(11)]]
    assert cover == list(range(11))


def test_seeded_sampling_does_not_depend_on_the_shard(tiny_policy) -> None:
    model, tok = tiny_policy
    prompts = ["12+3=", "1+1=", "99+9=", "7+70="]
    seeds = sampling_seeds(0, 5, range(4))
    whole = sample(model, tok, prompts, n=3, max_new_tokens=6, seeds=seeds)
    halves = [
        sample(model, tok, prompts[s], n=3, max_new_tokens=6, seeds=seeds[s])
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert halves[0].texts + halves[1].texts == whole.texts
    assert len(set(whole.texts)) > 3, "sampling must vary for the comparison to mean much"
    chunked = sample(model, tok, prompts, n=3, max_new_tokens=6, seeds=seeds, batch_size=4)
    assert chunked.texts == whole.texts  # cut at whole groups: 3 rows per call
    torch.manual_seed(1)
    other = sample(model, tok, prompts, n=3, max_new_tokens=6, seeds=sampling_seeds(0, 6, range(4)))
    assert other.texts != whole.texts  # the next step draws afresh


def _cfg(tmp_path: Path, root: str, nproc: int, steps: int = 3, **extra: object):
    path = write_tiny_config(
        tmp_path / f"{root}-{nproc}.yaml",
        tmp_path / root,
        "dist",
        steps,
        tracking={"enabled": False},
        distributed={"nproc_per_node": nproc},
        **extra,
    )
    return load_config(path)


def test_the_ranks_must_split_the_prompts_evenly(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"3 ranks .* must divide rollout.prompts_per_step \(4\)"):
        _cfg(tmp_path, "a", 3)
    with pytest.raises(ConfigError, match=r"nproc_per_node \(2\) > cluster.accelerator_count"):
        _cfg(tmp_path, "a", 2, cluster={"accelerator_type": "nvidia.com/gpu"})


def test_the_rank_count_may_change_on_resume(tmp_path) -> None:
    one, two = _cfg(tmp_path, "a", 1), _cfg(tmp_path, "a", 2)
    assert resume_conflicts(public_dump(two), public_dump(one)) == []
    assert not needs_ranks(one) and needs_ranks(two)


def test_the_rank_command_reads_its_inputs_where_the_job_puts_them() -> None:
    local = rank_command("train", 2, (Path("/t/c.json"), Path("/t/p.json")))
    assert local[:3] == ["torchrun", "--standalone", "--nproc-per-node=2"]
    assert local[-4:] == ["--config-file", "/t/c.json", "--params-file", "/t/p.json"]
    job = rank_command("train", 8)  # rendezvous from the Trainer's PET_* variables
    assert "--standalone" not in job and "--config-file" not in job


STEP_KEYS = ("reward/mean", "actor/loss", "actor/entropy", "actor/grad_norm", "actor/ppo_kl")


def _history(cfg) -> list[dict]:
    from npo.steps.context import open_run

    ctx = open_run(cfg)
    try:
        return ctx.history()
    finally:
        ctx.close()


def _weights(cfg, step: int) -> dict[str, torch.Tensor]:
    from npo.steps.context import open_run
    from npo.training.state import load_train_state

    ctx = open_run(cfg)
    try:
        model = load_train_state(ctx.store, "dist", step, db=ctx.db).model
        return {k: v.detach().clone() for k, v in model.named_parameters()}
    finally:
        ctx.close()


def _assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in (*STEP_KEYS, "eval/accuracy"):
            if k in ra or k in rb:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)


@pytest.mark.slow
def test_two_ranks_train_what_one_does_and_resume_on_one(tmp_path) -> None:
    # minibatches 2 x micro-batches 3: each rank holds a varying share of each minibatch;
    # 1-digit sums after a longer warm-up: some groups have a reward spread to learn from
    extra = {
        "algo": {"minibatches": 2, "micro_batch_size": 3, "lr": 3e-3},
        "task": {"digits": 1, "n_train": 60, "n_eval": 16},
        "warmup": {"steps": 120, "lr": 1e-2},
    }
    one, two = _cfg(tmp_path, "one", 1, steps=6, **extra), _cfg(tmp_path, "two", 2, **extra)
    seconds = {}
    for cfg in (one, two):
        config = json.dumps(public_dump(cfg))
        stages.run_stage("prepare", config)
        t0 = time.perf_counter()
        out = stages.run_stage("train", config, run_id="dist", start=0, end=3)
        seconds[cfg.distributed.nproc_per_node] = time.perf_counter() - t0
        assert (out["policy_step"], out["global_step"]) == (3, 3)
    h1, h2 = _history(one), _history(two)
    assert [r["step"] for r in h2] == [0, 1, 2, 3]  # one row per step: rank 0 writes alone
    _assert_same_steps(h1[:4], h2)
    assert any(r["actor/grad_norm"] > 0 for r in h1[1:]), "the steps must train something"
    w1, w2 = _weights(one, 3), _weights(two, 3)
    before = _weights(one, 0)
    assert max(float((w1[k] - before[k]).abs().max()) for k in w1) > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)

    # the 2-rank checkpoint resumes on 1 rank, as if the run had been on one all along
    stages.run_stage("train", json.dumps(public_dump(one)), run_id="dist", start=3, end=6)
    resumed = _cfg(tmp_path, "two", 1, steps=6, **extra)
    stages.run_stage("train", json.dumps(public_dump(resumed)), run_id="dist", start=3, end=6)
    _assert_same_steps(_history(one), _history(resumed))
    print(f"\ntrain stage, 3 steps: 1 rank {seconds[1]:.1f}s, 2 ranks {seconds[2]:.1f}s")
