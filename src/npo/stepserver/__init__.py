"""Run pipeline stages in a warm process: a task costs milliseconds, not an import of torch
and transformers.

Task side (every pipeline component): `call_stage(name, config=..., **params)`. With
NPO_STEP_SERVER set it asks that server; otherwise it runs the stage here. Either way the
stage sees the same parameters, environment, working directory and stdout/stderr, and a
failure raises `StageFailed` with the stage's traceback.

Parent side (`npo run`): `with StepServer(on_progress=...) as server:` starts one worker
(`python -m npo.stepserver.worker`) that imports the stages once and runs the calls in
turn, behind a `multiprocessing.connection` listener; `server.env()` is what tasks need.

Importing this package stays light (stdlib only); `StepServer` loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from npo.stepserver.client import (
    DEFAULT_RUNNER,
    ENV_RUNNER,
    ENV_SERVER,
    ENV_SERVER_KEY,
    ProgressLogger,
    StageFailed,
    call_stage,
    resolve_runner,
)

if TYPE_CHECKING:
    from npo.stepserver.server import StepServer

__all__ = [
    "DEFAULT_RUNNER",
    "ENV_RUNNER",
    "ENV_SERVER",
    "ENV_SERVER_KEY",
    "ProgressLogger",
    "StageFailed",
    "StepServer",
    "call_stage",
    "resolve_runner",
]


def __getattr__(name: str) -> Any:
    # The server side (subprocess, threading) is not needed by tasks: load it lazily.
    if name == "StepServer":
        from npo.stepserver.server import StepServer

        return StepServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
