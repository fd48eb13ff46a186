"""End-to-end NPO on the tiny toy: early bootstrapping + late breakthrough, and Δ=0 control.

Checks what a user would look for after a run: the look-ahead branches and their
checkpoints, the guidance caches (payload + DB index), the recorded interventions, and the
guided fraction in the metrics of the guided segments only.
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


def _npo_config(tmp_path: Path, **npo: object) -> Path:
    return write_tiny_config(
        tmp_path / "npo.yaml",
        tmp_path / "runs",
        "npo",
        9,
        method="npo",
        npo=npo,
        # gate > 1: every cached prompt is guided, so the tiny run surely exercises it
        train={"eval_every": 3, "checkpoint_every": 3, "threads": 1},
    )


def test_npo_early_and_late(tmp_path: Path) -> None:
    cfg = load_config(
        _npo_config(
            tmp_path,
            guidance={"gate": 1.5, "tries": 4},
            early={"enabled": True, "scout_steps": 3, "window": 3},
            late={"enabled": True, "at_step": 6, "lookahead": 3},
        )
    )
    summary = run_experiment(cfg)
    root = tmp_path / "runs"
    store = open_store((root / "artifacts").as_uri())

    # look-ahead branches: forked at 0 and 6, trained 3 steps ahead
    assert list_checkpoints(store, "npo.early000000") == [0, 3]
    assert list_checkpoints(store, "npo.late000006") == [6, 9]
    assert list_checkpoints(store, "npo") == [0, 3, 6, 9]

    headers = list_cache_headers(store, "npo")
    assert [(h["cache_id"], h["guide_run_id"], h["guide_step"]) for h in headers] == [
        ("npo.early000000", "npo.early000000", 3),
        ("npo.late000006", "npo.late000006", 9),
    ]
    for h in headers:
        s = h["stats"]
        assert s["prompts"] == 3 * 4  # 3 steps x 4 prompts per step (distinct here)
        assert 0 <= s["q_hat"] <= 1 and 0 <= s["solved_frac"] <= 1
        assert s["sampled_tokens"] > 0

    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        caches = db.guidance_caches("npo")
        assert [c.id for c in caches] == ["npo.early000000", "npo.late000006"]
        for c, h in zip(caches, headers, strict=True):
            assert len(db.guidance_entries(c.id)) == int(h["stats"]["solved"])
        interventions = db.interventions("npo")
        assert [(i.kind, i.at_step, i.delta, i.guide_step) for i in interventions] == [
            ("early", 0, 3, 3),
            ("late", 6, 3, 9),
        ]

    rows = {r["step"]: r for r in load_history(root / "npo" / "metrics.jsonl")}
    assert sorted(rows) == list(range(10))
    guided_steps = {s for s, r in rows.items() if "npo/guided_frac" in r}
    assert guided_steps == {1, 2, 3, 7, 8, 9}
    solved = {h["policy_step"]: h["stats"]["solved"] for h in headers}
    if solved[0]:  # a guide that solved something is used: gate > 1 guides every cached prompt
        assert max(rows[s]["npo/guided_frac"] for s in (1, 2, 3)) > 0
    assert summary["look-ahead policy steps"] == 6
    assert summary["guidance caches"] == 2


def test_delta0_control_uses_the_current_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(
        _npo_config(
            tmp_path,
            guidance={"tries": 2},
            rolling={"enabled": True, "every": 5, "lookahead": 3},
            delta0_control=True,
        )
    )
    run_experiment(cfg)
    store = open_store((tmp_path / "runs" / "artifacts").as_uri())
    headers = list_cache_headers(store, "npo")
    assert [(h["guide_run_id"], h["guide_step"], h["policy_step"]) for h in headers] == [
        ("npo", 0, 0),
        ("npo", 5, 5),
    ]
    for h in headers:  # the guide is the current policy: no accuracy gap by construction
        assert h["stats"]["accuracy_gap"] == 0.0
    assert not list(store.list("runs/npo.rolling"))  # no look-ahead branch was trained


def test_baselines_luffy_and_rlep(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    train = {"eval_every": 2, "checkpoint_every": 2, "threads": 1}
    far = write_tiny_config(tmp_path / "far.yaml", root, "far", 6, train=train)
    run_experiment(load_config(far))  # the finished run RLEP replays from

    shared = {"train": train, "warmup": {"init_from": "far"}}
    luffy = write_tiny_config(tmp_path / "l.yaml", root, "luffy", 4, method="luffy", **shared)
    run_experiment(load_config(luffy))
    rows = load_history(root / "luffy" / "metrics.jsonl")
    assert rows[0] == load_history(root / "far" / "metrics.jsonl")[0]  # same warm-up
    assert [r["npo/guided_frac"] for r in rows[1:]] == [1.0] * 4  # a teacher in every group
    assert all(r["npo/guide_adv_mean"] >= 0 for r in rows[1:])  # gold answers never lose

    rlep = write_tiny_config(
        tmp_path / "r.yaml",
        root,
        "rlep",
        4,
        method="rlep",
        baselines={"rlep_run": "far"},
        **shared,
    )
    run_experiment(load_config(rlep))
    store = open_store((root / "artifacts").as_uri())
    headers = list_cache_headers(store, "rlep")
    # one cache for the whole budget from the finished run's last checkpoint
    assert [(h["guide_run_id"], h["guide_step"], h["policy_step"]) for h in headers] == [
        ("far", 6, 0),
    ]
    rows = load_history(root / "rlep" / "metrics.jsonl")
    assert [r["npo/gated_frac"] for r in rows[1:]] == [1.0] * 4  # gate 2.0: every group


def test_exgrpo_pool_survives_a_resume(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    cfg_path = write_tiny_config(
        tmp_path / "ex.yaml",
        root,
        "ex",
        6,
        method="exgrpo",
        train={"eval_every": 3, "checkpoint_every": 1, "threads": 1},
        # a pool fills only from partly solved prompts: let the toy warm up enough for some
        warmup={"steps": 150, "lr": 3e-3, "target_accuracy": None},
    )
    cfg = load_config(cfg_path)
    run_experiment(cfg)
    rows = load_history(root / "ex" / "metrics.jsonl")
    drawn = [r["npo/gated_frac"] for r in rows[1:]]  # share of groups drawn from the pool
    assert drawn[0] == 0.0  # step 1: the pool is still empty
    assert 0.0 < drawn[-1] <= 0.5  # by step 6 it replays past successes (at most half)
    assert all(r["npo/guided_frac"] == r["npo/gated_frac"] for r in rows[1:])

    # The pool is stored inside every checkpoint (covered by the manifest). Resuming from
    # checkpoint 5 must give the same step 6, whose draw needs the pool of steps 1..5.
    from npo.store.checkpoint import read_manifest

    store = open_store((root / "artifacts").as_uri())
    assert "extra/experience.parquet" in read_manifest(store, "ex", 5)["files"]
    store.delete_prefix("runs/ex/ckpt/000006/")
    run_experiment(cfg)
    again = load_history(root / "ex" / "metrics.jsonl")

    def strip(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]

    assert strip(again) == strip(rows)
