"""What several methods' flows share: a guidance cache, built and then re-verified."""

from __future__ import annotations

from typing import Any

from npo import stages
from npo.flow import Flow, Outputs


def guide_and_verify(f: Flow, label: str, **params: Any) -> Outputs:
    """Cache the guide's trajectories (stages.guidance with `params`), then re-verify them;
    the verify outputs' `cache_id` is what a guided train reads."""
    cache = f.call(stages.guidance, f"{label} · guidance", **params)
    return f.call(stages.verify, f"{label} · verify", cache_id=cache["cache_id"])
