"""The guidance cache: one verified-correct trajectory per prompt from a guide checkpoint.

NPO replaces one slot of a struggling group with a trajectory the near-future policy
produced. A cache holds, per prompt id, the guide's response token ids (EOS included), its
per-token behaviour log-probs (post-temperature, as sampled), the text and the reward, plus
the cache-level numbers that tell whether the guide is really ahead (Q̂, accuracy gap) and
what it cost (sampled tokens).

Payload: `runs/<run_id>/guidance/<cache_id>.parquet` in the artifact store (one row per
prompt, stats in the schema metadata); the metadata DB indexes caches and entries.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from npo.store.artifacts import ArtifactStore

if TYPE_CHECKING:  # annotations only: the verify stage reads caches without torch
    import torch

    from npo.rollout import RolloutBatch


@dataclass(frozen=True)
class GuideTrajectory:
    prompt_id: str
    response_ids: list[int]
    logprobs: list[float]
    text: str
    reward: float


def trajectory_from_row(
    batch: RolloutBatch, row: int, prompt_id: str, reward: float
) -> GuideTrajectory:
    """The masked response of `row` (ids up to EOS, behaviour log-probs, text)."""
    keep = batch.response_mask[row].bool()
    return GuideTrajectory(
        prompt_id=prompt_id,
        response_ids=batch.response_ids[row][keep].tolist(),
        logprobs=batch.logprobs[row][keep].tolist(),
        text=batch.texts[row],
        reward=reward,
    )


def first_correct_rows(rewards: torch.Tensor) -> list[int | None]:
    """rewards [N, n] of n samples per prompt -> per prompt the batch row (i*n + j) of its
    first correct sample, None when all n fail.

    >>> import torch
    >>> first_correct_rows(torch.tensor([[0., 1., 1.], [0., 0., 0.]]))
    [1, None]
    """
    n = rewards.shape[1]
    return [
        i * n + int(hits[0]) if len(hits) else None
        for i, hits in enumerate(row.nonzero().flatten() for row in rewards > 0)
    ]


@dataclass
class GuidanceCache:
    """Guide trajectories by prompt id, and where they came from."""

    cache_id: str
    guide_run_id: str
    guide_step: int
    policy_step: int
    entries: dict[str, GuideTrajectory] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self.entries

    def get(self, prompt_id: str) -> GuideTrajectory | None:
        return self.entries.get(prompt_id)

    @property
    def header(self) -> dict[str, Any]:
        return {
            "cache_id": self.cache_id,
            "guide_run_id": self.guide_run_id,
            "guide_step": self.guide_step,
            "policy_step": self.policy_step,
            "stats": self.stats,
        }


def payload_key(run_id: str, cache_id: str) -> str:
    return f"runs/{run_id}/guidance/{cache_id}.parquet"


def save_cache(store: ArtifactStore, run_id: str, cache: GuidanceCache) -> str:
    """Write the cache as one parquet object (atomic per object); returns its key."""
    key = payload_key(run_id, cache.cache_id)
    store.put_bytes(key, cache_to_bytes(cache))
    return key


def load_cache(store: ArtifactStore, run_id: str, cache_id: str) -> GuidanceCache:
    """Read a cache written by `save_cache`."""
    return cache_from_bytes(store.get_bytes(payload_key(run_id, cache_id)))


def cache_to_bytes(cache: GuidanceCache) -> bytes:
    """The cache as parquet: one row per prompt, the header in the schema metadata."""
    rows = [asdict(t) for t in cache.entries.values()]
    schema = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("response_ids", pa.list_(pa.int32())),
            ("logprobs", pa.list_(pa.float32())),
            ("text", pa.string()),
            ("reward", pa.float32()),
        ],
        metadata={"npo": json.dumps(cache.header)},
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def cache_from_bytes(data: bytes) -> GuidanceCache:
    table = pq.read_table(io.BytesIO(data))
    header = json.loads(table.schema.metadata[b"npo"])
    entries = {
        row["prompt_id"]: GuideTrajectory(
            prompt_id=row["prompt_id"],
            response_ids=list(row["response_ids"]),
            logprobs=[float(x) for x in row["logprobs"]],
            text=row["text"],
            reward=float(row["reward"]),
        )
        for row in table.to_pylist()
    }
    return GuidanceCache(
        cache_id=header["cache_id"],
        guide_run_id=header["guide_run_id"],
        guide_step=header["guide_step"],
        policy_step=header["policy_step"],
        entries=entries,
        stats=header["stats"],
    )


def list_cache_headers(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """Headers (ids, guide, stats) of every cache of the run, from the store itself."""
    headers = []
    for key in store.list(f"runs/{run_id}/guidance/"):
        if key.endswith(".parquet"):
            schema = pq.read_schema(io.BytesIO(store.get_bytes(key)))
            headers.append({**json.loads(schema.metadata[b"npo"]), "payload": key})
    return sorted(headers, key=lambda h: h["policy_step"])
