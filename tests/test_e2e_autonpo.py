"""End-to-end AutoNPO on the tiny toy: a forced trigger executes a rollback and a replay.

`autonpo.force_at` makes the trigger fire (confirmed) at a chosen step, so the test covers
the whole intervention: Δ* chosen from the S(Δ) table, guidance cached from the current
checkpoint on mistake-pool prompts, a new checkpoint lineage forked at t − Δ*, the segment
replayed with guidance (global step keeps counting while the policy step rewinds), and
everything recorded in the metadata DB, the artifact store and the metrics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_tiny_config

from npo.config import load_config
from npo.experiment import run_experiment
from npo.guidance.cache import list_cache_headers
from npo.report import load_history
from npo.store.artifacts import open_store
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB

pytestmark = pytest.mark.slow


def test_forced_trigger_rolls_back_and_replays_with_guidance(tmp_path: Path) -> None:
    cfg = load_config(
        write_tiny_config(
            tmp_path / "auto.yaml",
            tmp_path / "runs",
            "auto",
            12,
            method="autonpo",
            npo={"guidance": {"gate": 1.5, "tries": 4}},
            autonpo={
                "check_every": 3,
                "window": 2,
                "candidates": [3, 6],
                "force_at": [6],
                "cooldown": 100,
                "mistake_below": 1.01,  # every prompt joins the pool: the toy fails most
                "confirm_prompts": 8,
            },
            train={"eval_every": 3, "checkpoint_every": 3, "threads": 1},
        )
    )
    summary = run_experiment(cfg)
    root = tmp_path / "runs"
    store = open_store((root / "artifacts").as_uri())

    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        (iv,) = db.interventions("auto")
        assert (iv.kind, iv.at_step, iv.guide_step) == ("auto", 6, 6)
        delta = iv.delta
        assert delta in (3, 6) and iv.rollback_to == 6 - delta
        assert sorted(r["delta"] for r in iv.s_table) == [3, 6]
        # the chosen row: "chosen", or "chosen (floored)" when its V̂ was under the floor
        chosen = [r for r in iv.s_table if r["reason"].startswith("chosen")]
        assert [r["delta"] for r in chosen] == [delta]
        assert iv.signals["policy_step"] == 6 and iv.signals["allowed"] is True
        assert db.mistakes_by_step("auto")  # the pool was filled during training
        (cache,) = db.guidance_caches("auto")
        assert (cache.guide_run_id, cache.guide_step) == ("auto", 6)

    # the original lineage stops at 6; the replay lineage starts at 6 - Δ* and runs to 12
    assert list_checkpoints(store, "auto") == [0, 3, 6]
    replay = list_checkpoints(store, "auto.r1")
    assert replay[0] == 6 - delta and replay[-1] == 12

    headers = list_cache_headers(store, "auto")
    assert [h["cache_id"] for h in headers] == ["auto.auto000006"]

    assert summary["replayed policy steps"] == delta  # replays are counted as updates...
    assert summary["look-ahead policy steps"] == 0  # ...and there is no look-ahead branch

    rows = load_history(root / "auto" / "metrics.jsonl")
    total = 12 + delta  # every update counts, replays included
    assert [r["step"] for r in rows] == list(range(total + 1))
    policy = [r["policy_step"] for r in rows]
    assert policy[6] == 6 and policy[7] == 6 - delta + 1  # the rewind after step 6
    replayed = [r for r in rows if 6 < r["step"] <= 6 + delta]
    assert all("npo/guided_frac" in r for r in replayed)
    assert not any("npo/guided_frac" in r for r in rows if r["step"] > 6 + delta)

    again = run_experiment(cfg)  # a re-run replays the decisions and changes nothing
    assert len(load_history(root / "auto" / "metrics.jsonl")) == total + 1
    assert again["policy steps"] == 12
