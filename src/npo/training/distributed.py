"""torch.distributed for the train stage: which rank this is, its share of a step, and the
reductions that make N ranks compute what one process computes on the whole batch.

Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment) `init_ranks(cfg)` joins
the process group (gloo on CPU, nccl on CUDA) and `Ranks` describes it; without torchrun
`Ranks.single()` is the one-process case, for which every helper here is the identity.

Sharding is by prompt group: rank r samples groups [r*N/W, (r+1)*N/W) of the step's N
prompts, so GRPO's per-group advantages never need another rank's rewards. The model is
wrapped (`wrap_model`, `distributed.strategy`) in DistributedDataParallel (a replica per
rank, gradients all-reduced) or sharded in place with FSDP2 (`fully_shard`: each rank holds
1/W of every weight, gradient and AdamW moment; the weights are all-gathered for use).
Both average the ranks' gradients: the loss aggregation (npo.training.rl_step) divides by
the *global* token or sequence count and multiplies by the world size, so the average is
the one-process gradient.

FSDP2 all-gathers a block's weights in its forward, a collective, while ranks run
different numbers of forwards (sampling stops at a rank's own longest response, evaluation
shares are uneven, only rank 0 runs the AutoNPO watch). So no-grad work and each
minibatch's forwards and backwards run inside `full_weights`: one all-gather of every
block at a point all ranks reach, no collective inside but the one gradient
reduce-scatter of the minibatch's syncing backward, the shards restored before the
optimizer steps. Checkpoints are gathered to rank 0 (`to_save`) as the one-process state,
and loaded by every rank before sharding (`load_optimizer`), so neither depends on W.

Only rank 0 writes (metadata DB, MLflow, checkpoints, progress): `Ranks.main`.

    torchrun --standalone --nproc-per-node 2 -m npo.steps.ranks ...   # what the stage runs
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from npo.config import ExperimentConfig

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank in [0, world), local_rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def single() -> Ranks:
        return Ranks()

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank (collectives needed)."""
        return self.world > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of `n` items (n divisible by world).

        >>> Ranks(1, 2).shard(8), Ranks(0, 1).shard(8)
        (slice(4, 8, None), slice(0, 8, None))
        """
        if n % self.world:
            raise ValueError(f"{n} items do not split evenly over {self.world} ranks")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def uneven_shard(self, n: int) -> slice:
        """A share of `n` items that need not divide evenly (evaluation prompts): the first
        n % world ranks take one more.

        >>> [Ranks(r, 3).uneven_shard(7) for r in range(3)]
        [slice(0, 3, None), slice(3, 5, None), slice(5, 7, None)]
        """
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    # -- reductions (identity on one rank) -------------------------------------------
    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over ranks (a new tensor; `x` is unchanged)."""
        if not self.active:
            return x
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def sum_values(
        self, values: dict[str, float], maxima: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """Each value summed over ranks, the keys in `maxima` maxed. Every rank must hold
        the same keys."""
        if not self.active:
            return dict(values)
        keys = sorted(values)
        if self.gather_object(keys) != [keys] * self.world:
            raise RuntimeError("ranks reduce different metric keys")
        summed = [k for k in keys if k not in maxima]
        maxed = [k for k in keys if k in maxima]
        out: dict[str, float] = {}
        for names, op in ((summed, dist.ReduceOp.SUM), (maxed, dist.ReduceOp.MAX)):
            if names:
                t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)
                dist.all_reduce(t, op=op)
                out |= dict(zip(names, t.tolist(), strict=True))
        return out

    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks: the whole batch's value for a mean over equal
        shards (rewards per group, lengths per row)."""
        return {k: v / self.world for k, v in self.sum_values(values).items()}

    def gather_object(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (picklable plain data only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or a Trainer job) as one of several."""
    return all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def current() -> Ranks:
    """The ranks of the joined process group, or the single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks.single()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def backend_for(cfg: ExperimentConfig) -> str:
    """gloo on CPU, nccl on CUDA (or what distributed.backend names)."""
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    wants_cuda = cfg.model.device == "cuda" or (
        cfg.model.device == "auto" and torch.cuda.is_available()
    )
    return "nccl" if wants_cuda else "gloo"


def init_ranks(cfg: ExperimentConfig, timeout_s: float = 1800.0) -> Ranks:
    """Join the process group torchrun set up (idempotent); on CUDA each rank takes GPU
    LOCAL_RANK. Refuses a world size other than the config's."""
    if not launched_by_torchrun():
        return Ranks.single()
    if not dist.is_initialized():
        backend = backend_for(cfg)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    ranks = current()
    if ranks.world != cfg.distributed.world_size:
        raise RuntimeError(
            f"torchrun started {ranks.world} ranks but distributed.nodes x nproc_per_node is "
            f"{cfg.distributed.world_size}"
        )
    return ranks


def close_ranks() -> None:
    """Leave the process group (at the end of a rank's work)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ranks: Ranks, strategy: str = "ddp") -> torch.nn.Module:
    """The model as `strategy` shares it over `ranks` (itself on one rank): "ddp" wraps it
    in DistributedDataParallel, "fsdp" shards it in place (`shard_model`). Create the
    optimizer after this call, from the returned model's parameters.

    DDP copies rank 0's weights to every rank at construction. No buffer broadcast per
    forward (the rotary tables are the same everywhere), so forwards without gradients
    (sampling, evaluation, old log-probs) involve no collective and ranks may run different
    numbers of them; every rank must run the same number of gradient-syncing backward
    passes. With FSDP the same holds inside `full_weights`."""
    if not ranks.active:
        return model
    if strategy == "fsdp":
        return shard_model(model)
    device_ids = [ranks.local_rank] if model.device.type == "cuda" else None
    return Replica(model, device_ids=device_ids, forward_sync_buffers=False)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the default process group, in place: each decoder block (the classes a
    Hugging Face model lists in `_no_split_modules`) is one unit, the root holds the rest
    (embeddings, a tied head, the final norm). Every rank must hold the same weights: each
    loads the same checkpoint before sharding."""
    from torch.distributed.fsdp import fully_shard  # ~1 s to import: only where it shards

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is FSDP2-sharded (never, while nothing has imported FSDP)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """FSDP: every unit's weights all-gathered on entry and kept until exit, so forwards
    and backwards inside run no all-gather and ranks may run different numbers of them
    (module docstring). Every rank must enter at the same point. The exit restores the
    shards, which the optimizer steps on. Without FSDP: nothing."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_backward(True)
        for unit in units:
            unit.reshard()


@contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Backward passes inside accumulate their gradient locally, reduced over the ranks
    with the next syncing backward's (DDP's `no_sync`; FSDP2's gradient sync off)."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ over the model's parameters; the global norm as a float (FSDP's
    gradients are shards: the norm comes back as a replicated DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order its state_dict() numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a one-process optimizer state_dict() (parameters numbered; what a checkpoint
    holds) into `optimizer`: as is, or under FSDP this rank's shard of it (every rank
    holds the whole `state`; no collective)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def to_save(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ranks: Ranks
) -> tuple[PreTrainedModel | None, dict[str, Any] | None]:
    """What rank 0 saves: the plain model and the one-process optimizer state_dict()
    (parameters numbered), the same whatever the rank count; (None, None) on other ranks.
    Under FSDP a collective every rank must call: the full weights and moments are
    gathered to rank 0's CPU memory, and a plain model of the same class takes them."""
    if not is_sharded(model):
        if not ranks.main:
            return None, None
        return unwrap(model), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    if not ranks.main:
        return None, None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no second copy: the gathered tensors become its weights
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    numbered = None
    if moments is not None:
        index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
        numbered = {
            "state": {index[n]: s for n, s in moments["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in moments["param_groups"]
            ],
        }
    return plain, numbered


class Replica(DistributedDataParallel):
    """DDP whose wrapped model's attributes (device, dtype, config) read through, so the
    forward helpers (npo.training.forward) take it where they take the model itself."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def unwrap(model: torch.nn.Module) -> Any:
    """The model inside a DDP wrapper (what is sampled from and saved; an FSDP model is
    sharded in place: itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
