"""The README's recipes, as documented: every `npo run / show-config / compare / compile /
submit` command in its bash blocks loads its config, and the math-task recipes train (a
step, with budgets appended as later `--set`s) on tests/data's tiny JSONL files.

Run: .venv/bin/python -m pytest tests/test_recipes.py -q
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from npo.cli import app
from npo.config import MathTaskConfig, load_config

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
CHECKED = ("run", "show-config", "compare", "compile", "submit")  # commands that load configs


def readme_commands() -> list[list[str]]:
    """Every `npo ...` command of README.md's bash blocks, as the arguments after `npo`."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("npo", ".venv/bin/npo"):
                found.append(words[1:])
    return found


def parsed(args: list[str]) -> dict[str, Any]:
    """The CLI's own parse of `args` (a command and its options): its parameters by name."""
    command = typer.main.get_command(app).commands[args[0]]  # type: ignore[attr-defined]
    return command.make_context(args[0], args[1:], resilient_parsing=True).params


def with_test_data(overrides: list[str]) -> list[str]:
    """The overrides with the recipe's dataset paths replaced by tests/data's files."""
    files = {
        "task.train_path": DATA / "math_train.jsonl",
        "task.eval_path": DATA / "math_eval.jsonl",
    }
    out = []
    for item in overrides:
        key = item.partition("=")[0]
        out.append(f"{key}={files[key]}" if key in files else item)
    return out


RECIPES = [c for c in readme_commands() if c[0] in CHECKED]
MATH = [c for c in RECIPES if c[0] == "run" and "task.kind=math" in c]


def test_the_readme_has_the_recipes() -> None:
    assert len(RECIPES) >= 6
    assert MATH, "the README documents a math-task recipe"


@pytest.mark.parametrize("args", RECIPES, ids=[" ".join(c)[:60] for c in RECIPES])
def test_every_readme_recipe_loads_its_config(args: list[str]) -> None:
    params = parsed(args)
    configs = params.get("configs") or [params.get("config")]
    for config in configs:
        path = ROOT / config if config is not None else None
        load_config(path, with_test_data(params.get("set_") or []))


def _budget(root: Path) -> list[str]:
    """Later overrides that cut a recipe to seconds: one warm-up and one RL step."""
    settings = [
        f"store.root={root}",
        "tracking.enabled=false",
        "warmup.steps=1",
        "warmup.batch_size=2",
        "train.steps=1",
        "train.threads=1",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
    ]
    return [word for s in settings for word in ("--set", s)]


@pytest.mark.slow
@pytest.mark.parametrize("args", MATH, ids=[" ".join(c)[:60] for c in MATH])
def test_the_math_recipes_run_and_leave_no_temporary_files(
    args: list[str], tmp_path: Path, monkeypatch, one_thread
) -> None:
    """The documented command, as given (config path from the repository root; `npo run`'s
    default engine, the kfp.local pipeline), trains. kfp.local's tasks write their code to
    `$(mktemp -d)/ephemeral_component.py`, which must not stay behind in $TMPDIR."""
    params = parsed(args)
    assert isinstance(
        load_config(ROOT / params["config"], with_test_data(params["set_"])).task, MathTaskConfig
    )
    temp = Path(tempfile.mkdtemp(prefix="npo-t-"))  # short: the step server's socket is in it
    try:
        monkeypatch.setenv("TMPDIR", str(temp))
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        monkeypatch.chdir(ROOT)
        argv = [*with_test_data(args), "--quiet", *_budget(tmp_path / "runs")]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        assert "task=math engine=pipeline" in result.stdout
        name = load_config(params["config"], with_test_data(params["set_"])).name
        assert (tmp_path / "runs" / name / "report.md").is_file()
        assert list(temp.rglob("ephemeral_component.py")) == []
        # Neither kfp's tmp.* folders nor the tasks' own temp folder stay (torch's caches may).
        assert [p.name for p in temp.iterdir() if p.name.startswith(("tmp.", "npo-"))] == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)
