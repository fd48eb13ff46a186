"""The train stage on several ranks (torchrun, gloo on CPU): a 2-rank segment computes what
one process computes on the same global batch, its checkpoint resumes on 1 rank, and the
pieces that make it so (sharding, per-prompt sampling seeds, the config's checks)."""

from __future__ import annotations

import json
import statistics
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
from npo.steps.warmup import on_ranks
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


def _cfg(
    tmp_path: Path, root: str, nproc: int, steps: int = 3, strategy: str = "ddp", **extra: object
):
    path = write_tiny_config(
        tmp_path / f"{root}-{nproc}-{strategy}.yaml",
        tmp_path / root,
        "dist",
        steps,
        tracking={"enabled": False},
        distributed={"nproc_per_node": nproc, "strategy": strategy},
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
    assert not on_ranks(one) and on_ranks(two)  # the warm-up too (gloo: no GPU needed)


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


def _checkpoint_dir(cfg, step: int) -> Path:
    return cfg.store.root / "artifacts" / "runs" / "dist" / "ckpt" / f"{step:06d}"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _step_time(cfg) -> float:
    return statistics.median(r["perf/step_time_s"] for r in _history(cfg)[1:])


# minibatches 2 x micro-batches 3: each rank holds a varying share of each minibatch;
# 1-digit sums after a longer warm-up: some groups have a reward spread to learn from
EXTRA = {
    "algo": {"minibatches": 2, "micro_batch_size": 3, "lr": 3e-3},
    "task": {"digits": 1, "n_train": 60, "n_eval": 16},
    "warmup": {"steps": 120, "lr": 1e-2},
}


@pytest.mark.slow
def test_two_ranks_train_what_one_does_and_resume_on_one(tmp_path) -> None:
    one, two = _cfg(tmp_path, "one", 1, steps=6, **EXTRA), _cfg(tmp_path, "two", 2, **EXTRA)
    # the same warm-up (in one process): 120 AdamW steps would amplify the float noise of
    # the ranks' sums (a 2-rank warm-up: test_two_ranks_warm_up_as_one_does)
    seconds = {}
    for prep, cfg in ((one, one), (_cfg(tmp_path, "two", 1, **EXTRA), two)):
        stages.run_stage("prepare", json.dumps(public_dump(prep)))
        t0 = time.perf_counter()
        out = stages.run_stage("train", json.dumps(public_dump(cfg)), run_id="dist", start=0, end=3)
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
    resumed = _cfg(tmp_path, "two", 1, steps=6, **EXTRA)
    stages.run_stage("train", json.dumps(public_dump(resumed)), run_id="dist", start=3, end=6)
    _assert_same_steps(_history(one), _history(resumed))
    print(f"\ntrain stage, 3 steps: 1 rank {seconds[1]:.1f}s, 2 ranks {seconds[2]:.1f}s")
    median = statistics.median(r["perf/step_time_s"] for r in h2[1:])
    print(f"median step: 1 rank {_step_time(one):.2f}s, 2 DDP ranks {median:.2f}s")


@pytest.mark.slow
def test_fsdp_ranks_train_what_one_does_and_hand_over_to_one(tmp_path) -> None:
    """FSDP2 on 2 gloo ranks: steps (2, 4] of a run whose (0, 2] and (4, 6] ran on one rank
    (its AdamW state loaded into shards, and gathered back) = the run on one rank."""
    one = _cfg(tmp_path, "one", 1, steps=6, **EXTRA)
    solo = _cfg(tmp_path, "fsdp", 1, steps=6, **EXTRA)
    fsdp = _cfg(tmp_path, "fsdp", 2, steps=6, strategy="fsdp", **EXTRA)
    for cfg in (one, solo):
        stages.run_stage("prepare", json.dumps(public_dump(cfg)))
    stages.run_stage("train", json.dumps(public_dump(one)), run_id="dist", start=0, end=6)
    for cfg, start, end in ((solo, 0, 2), (fsdp, 2, 4), (solo, 4, 6)):
        out = stages.run_stage(
            "train", json.dumps(public_dump(cfg)), run_id="dist", start=start, end=end
        )
        assert out["policy_step"] == end
    h1, h2 = _history(one), _history(fsdp)
    assert [r["step"] for r in h2] == list(range(7))
    for ra, rb in zip(h1, h2, strict=True):  # evaluations differ: (2, 4] evaluates at 4 too
        for k in {*STEP_KEYS, "eval/accuracy"} & ra.keys() & rb.keys():
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)
    assert "eval/accuracy" in h2[3]  # evaluated on the sharded model, its prompts split
    w1, w2 = _weights(one, 6), _weights(fsdp, 6)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3, msg=k)
    # the FSDP checkpoint is the one-process format: same files, same model config
    sharded, plain = _checkpoint_dir(fsdp, 4), _checkpoint_dir(one, 3)
    assert _files(sharded) == _files(plain)
    config = json.loads((sharded / "policy" / "config.json").read_text())
    assert config == json.loads((plain / "policy" / "config.json").read_text())
    moments = torch.load(sharded / "optimizer.pt", weights_only=True)
    assert sorted(moments["state"]) == list(range(len(w1)))
    median = statistics.median(r["perf/step_time_s"] for r in h2[3:5])
    print(f"\nmedian step: 1 rank {_step_time(one):.2f}s, 2 FSDP ranks {median:.2f}s")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_warm_up_as_one_does(tmp_path, strategy) -> None:
    """The SFT warm-up on 2 ranks: 9 problems a step in micro-batches of 2 (ranks of 5 and
    4 problems, 3 and 2 chunks), sharded evaluations (the target checks), a progress
    checkpoint at step 2 (with the AdamW state): checkpoint 0 and its row = 1 rank's."""
    extra = {
        "algo": {"micro_batch_size": 2},
        "warmup": {
            "steps": 4,
            "batch_size": 9,
            "lr": 1e-2,
            "check_every": 2,
            "target_accuracy": 1.0,
            "checkpoint_every": 2,
        },
        "task": {"digits": 1, "n_train": 60, "n_eval": 15},
    }
    one = _cfg(tmp_path, "one", 1, **extra)
    two = _cfg(tmp_path, "two", 2, strategy=strategy, **extra)
    for cfg in (one, two):
        stages.run_stage("prepare", json.dumps(public_dump(cfg)))
    (r1,), (r2,) = (_history(cfg) for cfg in (one, two))
    for k in ("eval/accuracy", "eval/response_length", "warmup/train_loss"):
        assert r2[k] == pytest.approx(r1[k], rel=1e-5), k
    w1, w2 = _weights(one, 0), _weights(two, 0)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)
