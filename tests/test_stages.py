"""The stage entry points the pipeline's tasks call: round trip through JSON config,
idempotent AutoNPO decisions read back from the DB, and guidance re-verification."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import write_tiny_config

from npo import stages
from npo.config import load_config, public_dump
from npo.guidance.cache import GuidanceCache, save_cache
from npo.guidance.sources import GoldTeacher
from npo.steps.context import open_run
from npo.store.checkpoint import list_checkpoints, read_manifest
from npo.training.state import load_train_state

pytestmark = pytest.mark.slow


def _auto_cfg(tmp_path: Path, steps: int = 9):
    return load_config(
        write_tiny_config(
            tmp_path / "auto.yaml",
            tmp_path / "runs",
            "auto",
            steps,
            method="autonpo",
            npo={"guidance": {"gate": 1.5, "tries": 4}},
            autonpo={
                "check_every": 3,
                "window": 2,
                "candidates": [3],
                "force_at": [6],
                "cooldown": 100,
                "mistake_below": 1.01,
                "confirm_prompts": 8,
            },
            tracking={"enabled": False},
        )
    )


def test_a_watching_train_stops_at_the_trigger_and_a_retry_returns_the_same(tmp_path):
    cfg = _auto_cfg(tmp_path)
    config = json.dumps(public_dump(cfg))
    stages.run_stage("prepare", config)
    watch = {"run_id": "auto", "start": 0, "end": 9, "phase": "autonpo", "watch": True}
    out = stages.run_stage("train", config, **watch)
    assert (out["policy_step"], out["global_step"], out["triggered"]) == (6, 6, True)
    assert json.loads(out["signals"])["forced"] is True  # force_at [6]; 3 had no trigger
    ctx = open_run(cfg)
    try:
        assert list_checkpoints(ctx.store, "auto") == [0, 3, 6]  # every check is a target
        assert read_manifest(ctx.store, "auto", 6)["meta"]["trigger"]["policy_step"] == 6
        rows = ctx.history()
        again = stages.run_stage("train", config, **watch)  # a retried task
        assert again == out
        assert ctx.history() == rows  # nothing trained twice
    finally:
        ctx.db.close()
    # an empty replay there (a skipped rollback) and the next round start where this one
    # stopped: that stop is not theirs
    empty = stages.run_stage("train", config, **{**watch, "start": 6, "end": 6})
    assert (empty["policy_step"], empty["triggered"]) == (6, False)
    on = stages.run_stage("train", config, **{**watch, "start": 6, "watch": False})
    assert (on["policy_step"], on["global_step"], on["triggered"]) == (9, 9, False)


def test_autonpo_stages_replay_recorded_decisions(tmp_path: Path) -> None:
    """detect and rollback, re-run after the intervention was recorded (a retried task or a
    resumed pipeline), return the same decision instead of re-deciding under the cooldown."""
    cfg = _auto_cfg(tmp_path)
    config = json.dumps(public_dump(cfg))
    assert stages.run_stage("prepare", config)["run_id"] == "auto"
    out = stages.run_stage("train", config, run_id="auto", start=0, end=6, phase="autonpo")
    assert (out["policy_step"], out["global_step"]) == (6, 6)
    assert "eval/accuracy" in out["metrics"] and "| 6 | 6 |" in out["markdown"]

    decision = stages.run_stage("detect", config, run_id="auto", t=6, global_step=6)
    assert decision["intervene"] and json.loads(decision["signals"])["forced"] is True
    back = stages.run_stage(
        "rollback", config, run_id="auto", t=6, global_step=6, signals=decision["signals"]
    )
    assert back == {
        "lineage_run_id": "auto.r1",
        "guide_run": "auto",
        "back_run": "auto",
        "rollback_to": 3,
        "delta": 3,
        "cache_id": "auto.auto000006",
        "skipped": False,
    }
    # the same tasks again: the recorded decision, not a fresh one (cooldown would say no)
    again = stages.run_stage("detect", config, run_id="auto", t=6, global_step=6)
    assert again["intervene"] is True
    assert stages.run_stage("rollback", config, run_id="auto", t=6, global_step=6) == back

    cache = stages.run_stage(
        "guidance", config, cache_id=back["cache_id"], guide_run="auto", guide_step=6,
        current_run="auto", current_step=3, start=3, end=6, pool_only=True, log_step=6,
    )  # fmt: skip
    checked = stages.run_stage("verify", config, cache_id=cache["cache_id"])
    assert checked["verified"] == checked["entries"] == cache["entries"]
    replay = stages.run_stage(
        "train", config, run_id="auto.r1", start=3, end=6, guidance=cache["cache_id"]
    )
    assert (replay["policy_step"], replay["global_step"]) == (6, 9)
    # a later check in cooldown does not fire; the interventions count comes from the DB
    assert (
        stages.run_stage("detect", config, run_id="auto.r1", t=6, global_step=9)["intervene"]
        is False
    )


def test_verify_rejects_a_cache_with_a_wrong_trajectory(tmp_path: Path) -> None:
    cfg = _auto_cfg(tmp_path)
    config = json.dumps(public_dump(cfg))
    stages.run_stage("prepare", config)
    ctx = open_run(cfg)
    try:
        teacher = GoldTeacher(load_train_state(ctx.store, "auto", 0).tokenizer)
        p, *rest = ctx.task.train_problems()
        q = next(r for r in rest if r.answer != p.answer)
        good = {p.id: teacher.trajectory(p)}
        wrong = replace(teacher.trajectory(q), prompt_id=p.id)  # q's answer under p's id
        stats = {"q_hat": 0.0}
        save_cache(ctx.store, "auto", GuidanceCache("auto.good", "auto", 0, 0, good, stats))
        bad = {q.id: teacher.trajectory(q), p.id: wrong}
        save_cache(ctx.store, "auto", GuidanceCache("auto.bad", "auto", 0, 0, bad, stats))
    finally:
        ctx.db.close()
    assert stages.run_stage("verify", config, cache_id="auto.good")["verified"] == 1
    with pytest.raises(stages.GuidanceInvalid, match=f"1 of 2 .*{p.id}"):
        stages.run_stage("verify", config, cache_id="auto.bad")


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    config = json.dumps(public_dump(_auto_cfg(tmp_path)))
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        stages.run_stage("trian", config)
