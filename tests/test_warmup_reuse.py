"""`warmup.init_from`: which config differences make another run's checkpoint 0 not ours."""

from __future__ import annotations

from npo.config import ExperimentConfig, public_dump
from npo.steps.warmup import warmup_mismatch


def _dump(**update: object) -> dict:
    cfg = ExperimentConfig.model_validate({"name": "a", **update})
    return public_dump(cfg)


def test_the_same_warmup_matches_whatever_runs_after_it() -> None:
    ours = _dump(method="autonpo", warmup={"init_from": "a"}, algo={"lr": 1e-4})
    assert warmup_mismatch(_dump(), ours) == []


def test_the_device_does_not_change_what_checkpoint_0_is() -> None:
    theirs = _dump()
    del theirs["model"]["device"]  # a run folder written before the field existed
    assert warmup_mismatch(theirs, _dump(model={"device": "cpu"})) == []


def test_mismatches_are_named() -> None:
    ours = _dump(seed=1, task={"n_eval": 64}, warmup={"lr": 3e-3})
    assert warmup_mismatch(_dump(), ours) == ["seed", "task", "warmup"]
    assert warmup_mismatch(_dump(), _dump(train={"eval_size": 8})) == ["eval_size"]


def test_fields_added_since_the_source_run_count_with_their_defaults() -> None:
    theirs = _dump()
    del theirs["model"]["stop_tokens"], theirs["model"]["compute_dtype"]  # written before them
    assert warmup_mismatch(theirs, _dump()) == []
    assert warmup_mismatch(theirs, _dump(model={"stop_tokens": ["1"]})) == ["model"]
