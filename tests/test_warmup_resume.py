"""An interrupted warm-up resumes from its last checkpoint, with the same result as one run
through; checkpoint 0 replaces its progress checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_tiny_config

from npo.config import load_config
from npo.steps.context import open_run, warmup_progress_id
from npo.steps.warmup import latest_progress, warmup
from npo.store.checkpoint import list_checkpoints
from npo.training.state import load_train_state


class Stop(KeyboardInterrupt):
    """Ctrl-C at a chosen warm-up step."""


def _cfg(tmp_path: Path, name: str):
    path = write_tiny_config(
        tmp_path / f"{name}.yaml",
        tmp_path / "runs",
        name,
        steps=0,
        warmup={"steps": 12, "checkpoint_every": 5, "check_every": 4, "target_accuracy": None},
        tracking={"enabled": False},
    )
    return load_config(path)


def _weights(ctx) -> dict[str, torch.Tensor]:
    return load_train_state(ctx.store, ctx.run_id, 0, db=ctx.db).model.state_dict()


def test_a_warmup_stopped_at_step_8_resumes_at_6_and_ends_as_one_run_through(
    tmp_path: Path,
) -> None:
    whole = open_run(_cfg(tmp_path, "whole"))
    expected = warmup(whole)
    seen: list[int] = []

    def stop_at_8(phase: str, done: int, total: int, metrics: dict) -> None:
        seen.append(done)
        if done == 8:
            raise Stop

    first = open_run(_cfg(tmp_path, "cut"), progress=stop_at_8)
    with pytest.raises(Stop):
        warmup(first)
    # its commit at step 5 (not 10: it died at 8), under the warm-up's own run id
    assert list_checkpoints(first.store, warmup_progress_id("cut")) == [5]
    assert latest_progress(first) == 5
    assert list_checkpoints(first.store, "cut") == []
    first.close("KILLED")

    seen.clear()
    again = open_run(_cfg(tmp_path, "cut"), progress=lambda p, d, t, m: seen.append(d))
    result = warmup(again)
    assert seen[0] == 6 and seen[-1] == 12  # steps 1-5 were not redone
    # the same batches and AdamW state: the same weights and eval as the run through
    for key, value in _weights(whole).items():
        torch.testing.assert_close(_weights(again)[key], value, rtol=0, atol=0)
    assert result["eval/accuracy"] == expected["eval/accuracy"]
    assert result["warmup/train_loss"] == pytest.approx(expected["warmup/train_loss"], abs=0)
    assert result["warmup/steps"] == 12.0
    # checkpoint 0 supersedes the progress checkpoints: gone from the store and the DB
    assert list_checkpoints(again.store, warmup_progress_id("cut")) == []
    assert again.db.get_run(warmup_progress_id("cut")) is None
    assert latest_progress(again) is None
    again.close()
    whole.close()
