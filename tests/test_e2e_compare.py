"""`npo compare`: a GRPO baseline and AutoNPO from one shared warm-up, one report."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_tiny_config
from typer.testing import CliRunner

from npo.cli import app
from npo.report import load_history

pytestmark = pytest.mark.slow


def test_compare_shares_the_warmup_and_writes_one_report(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    base = write_tiny_config(tmp_path / "grpo.yaml", root, "base", 6)
    auto = write_tiny_config(
        tmp_path / "auto.yaml",
        root,
        "auto",
        6,
        method="autonpo",
        autonpo={
            "check_every": 3,
            "window": 2,
            "candidates": [3],
            "force_at": [3],
            "mistake_below": 1.01,
            "confirm_prompts": 4,
        },
    )
    result = CliRunner().invoke(
        app, ["compare", str(base), str(auto), "--name", "cmp", "--threshold", "0.5", "--quiet"]
    )
    assert result.exit_code == 0, result.output

    base_rows = load_history(root / "base" / "metrics.jsonl")
    auto_rows = load_history(root / "auto" / "metrics.jsonl")
    assert auto_rows[0] == base_rows[0]  # the same checkpoint 0 and its eval, not a re-run
    assert (root / "artifacts" / "runs" / "auto" / "ckpt" / "000000" / "manifest.json").exists()

    md = (root / "cmp" / "comparison.md").read_text()
    assert "base (grpo)" in md and "auto (autonpo)" in md
    assert "| auto | Δ=3, from 0 |" in md  # the forced intervention is listed
    assert (root / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    report = (root / "auto" / "report.md").read_text()
    assert "Interventions" in report


def test_compare_refuses_duplicate_names(tmp_path: Path) -> None:
    cfg = write_tiny_config(tmp_path / "a.yaml", tmp_path / "runs", "same", 2)
    result = CliRunner().invoke(app, ["compare", str(cfg), str(cfg), "--quiet"])
    assert result.exit_code == 2
    assert "own name" in result.output
    assert not (tmp_path / "runs").exists()
