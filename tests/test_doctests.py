"""Every docstring example in the library runs: each module under src/npo whose source holds
a `>>> ` line is doctested here (a new example is picked up without a list to keep)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import npo

ROOT = Path(npo.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        if ">>> " in path.read_text():
            parts = path.relative_to(ROOT.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found() -> None:
    assert {"npo.policy.tokenizer", "npo.rollout.hf", "npo.training.rl_step"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: a '>>> ' line that doctest does not run"
    assert result.failed == 0, f"{name}: {result.failed} failing example(s); see the output"
