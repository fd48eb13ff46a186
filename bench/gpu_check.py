"""GPU check: a short toy training in mixed precision, and rollout / training throughput of a
larger model.

On a CUDA machine (the `device` tool's H100/H200), both parts use the mixed precision a real
run uses: float32 weights (what AdamW updates and checkpoints hold) and bfloat16 compute
(`model.compute_dtype=bfloat16`: forwards and generate under torch.autocast); --smoke does
the same on CPU, whose autocast has bfloat16 too.

1. toy: the toy GRPO experiment (configs/toy_grpo.yaml) for --toy-steps RL steps on the GPU,
   through the same stages `npo run --engine direct` calls: warm-up, RL, evaluation.
   Prints the accuracy before/after and the step time.
2. throughput: a Qwen2-0.5B-shaped Llama-style model (random weights; no download is
   possible on the device machine) — HF `generate` rollouts (static KV cache, sampling at
   temperature 1) in generated tokens/s, and our PPO update (forward + backward + AdamW on
   prompt+response batches, in micro-batches of --micro-batch sequences) in tokens/s, each
   the median of --repeats timed calls after a warm-up call.
3. real_step_memory: peak GPU memory and time of one training step shaped like
   configs/math_autonpo.yaml's (a Qwen2.5-Math-1.5B-shaped model in float32 + AdamW, bf16
   autocast, the config's micro-batch size, full-length responses): checks the memory
   estimate in that config's comment.

    python bench/gpu_check.py                   # on the GPU machine, ~4 minutes
    python bench/gpu_check.py --smoke           # seconds on CPU: checks the script runs

The `device` tool's machine has torch and transformers but not pydantic, SQLAlchemy or
Alembic: `make gpu-wheels` puts them in `.whl/` here; carry `.whl` and run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site python3 bench/gpu_check.py --json $OUT/gpu-check.json
(tests/test_gpu_check.py runs the smoke size with our other dependencies hidden).
Writes --json (default gpu-check.json); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# The device machine has no installed copy of this package: run it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers.utils import logging as hf_logging

from npo.config import load_config

hf_logging.disable_progress_bar()

QWEN2_05B = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "intermediate_size": 4864}
# Qwen2.5-Math-1.5B's architecture (configs/math_autonpo.yaml's model), as Qwen2Config fields.
QWEN25_MATH_15B = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
}


def toy(steps: int, device: str, smoke: bool) -> dict[str, Any]:
    """The toy GRPO run on `device` (float32 weights, bfloat16 compute), through the stages,
    in a temporary store."""
    from npo import stages
    from npo.flow import InProcess
    from npo.methods import METHODS
    from npo.steps.context import open_run

    sets = [
        "tracking.enabled=false",
        f"train.steps={steps}",
        "train.checkpoint_every=10",
        "train.threads=4",
        "model.dtype=float32",
        "model.compute_dtype=bfloat16",
        f"model.device={device}",
    ]
    if smoke:
        # seconds, not numbers: CPU bfloat16 matmuls are slow (no AMX here)
        sets += ["warmup.steps=5", "warmup.batch_size=8", "warmup.target_accuracy=null"]
        sets += ["task.n_eval=16", "rollout.prompts_per_step=4", "rollout.group_size=4"]
        sets += ["train.threads=2"]
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config("configs/toy_grpo.yaml", [*sets, f"store.root={root}"])
        ctx = open_run(cfg)
        stages.use_compute(cfg)  # threads, device and compute dtype, as every stage does
        started = time.perf_counter()
        stages.prepare(ctx)
        warm = time.perf_counter() - started
        METHODS[cfg.method].flow(InProcess(ctx), ctx.run_id)
        summary = stages.report(ctx)["summary"]
        ctx.close()
    return {
        "param_dtype": cfg.model.dtype,
        "compute_dtype": cfg.model.compute_dtype or cfg.model.dtype,
        "warmup_s": warm,
        "rl_steps": steps,
        "rl_s": time.perf_counter() - started - warm,
        "start_accuracy": summary["warm-up accuracy"],
        "final_accuracy": summary["final accuracy"],
    }


def _median_time(fn: Any, repeats: int, device: str) -> tuple[float, Any]:
    out = fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def throughput(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Rollout and PPO-update tokens/s of a larger random-weight model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from npo.config import AlgoConfig
    from npo.policy.compute import compute_context, use_compute_dtype
    from npo.rollout.batch import RolloutBatch
    from npo.rollout.hf import response_mask_from_ids
    from npo.training.rl_step import ppo_update

    shape = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
    shape = shape if args.smoke else QWEN2_05B
    vocab = 512 if args.smoke else 151_936
    use_compute_dtype("bfloat16")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=max(1, shape["num_heads"] // 7),
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    batch, prompt_len, new = args.batch, args.prompt_len, args.new_tokens
    prompts = torch.randint(3, vocab, (batch, prompt_len), device=device)

    def generate() -> torch.Tensor:
        with torch.no_grad(), compute_context(model):
            return model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=1.0,
                top_k=None,
                top_p=None,
                max_new_tokens=new,
                min_new_tokens=new,  # fixed length: tokens/s comparable across runs
                cache_implementation="static" if device == "cuda" else None,
                pad_token_id=0,
            )

    gen_s, seqs = _median_time(generate, args.repeats, device)
    response = seqs[:, prompt_len:]
    rollout = RolloutBatch(
        prompt_ids=prompts.cpu(),
        prompt_mask=torch.ones_like(prompts).cpu(),
        response_ids=response.cpu(),
        response_mask=response_mask_from_ids(response, []).cpu(),
        logprobs=torch.zeros(response.shape, dtype=torch.float32),
        texts=[""] * batch,
        prompt_index=torch.arange(batch),
    ).to(device)
    algo = AlgoConfig(lr=1e-6, micro_batch_size=args.micro_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=algo.lr)
    advantages = torch.randn(batch, device=device)
    model.train()

    def update() -> dict[str, float]:
        return ppo_update(model, optimizer, rollout, advantages, algo, 1.0)

    train_s, _ = _median_time(update, args.repeats, device)
    out = {
        "params_m": params / 1e6,
        "param_dtype": "float32",
        "compute_dtype": "bfloat16",
        "batch": batch,
        "micro_batch": args.micro_batch,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "rollout_tokens_per_s": batch * new / gen_s,
        "train_tokens_per_s": batch * (prompt_len + new) / train_s,
    }
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def real_step_memory(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Peak GPU memory of one training step shaped like configs/math_autonpo.yaml's: a
    Qwen2.5-Math-1.5B-shaped model (random weights) in float32 with AdamW, bfloat16
    autocast, its micro-batch size, every response at the config's full length (the worst
    case). The config's memory estimate (its comment) is checked against this."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from npo.policy.compute import use_compute_dtype
    from npo.rollout.batch import RolloutBatch
    from npo.training.rl_step import ppo_update

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "math_autonpo.yaml")
    micro, response_len = cfg.algo.micro_batch_size, cfg.rollout.max_new_tokens
    shape = QWEN25_MATH_15B
    if args.smoke:
        shape = {**shape, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}
        shape |= {"num_attention_heads": 4, "vocab_size": 512}
        response_len = 16
    rows, prompt_len = 2 * (micro or 1), 256 if not args.smoke else 8
    use_compute_dtype("bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=4096))
    params = sum(p.numel() for p in model.parameters())
    vocab = shape["vocab_size"]
    batch = RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (rows, prompt_len)),
        prompt_mask=torch.ones(rows, prompt_len, dtype=torch.long),
        response_ids=torch.randint(3, vocab, (rows, response_len)),
        response_mask=torch.ones(rows, response_len, dtype=torch.long),
        logprobs=torch.zeros(rows, response_len),
        texts=[""] * rows,
        prompt_index=torch.arange(rows),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.algo.lr)
    algo = cfg.algo.model_copy(update={"minibatches": 1})
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    seconds, _ = _median_time(
        lambda: ppo_update(model, optimizer, batch, torch.randn(rows, device=device), algo, 1.0),
        1,
        device,
    )
    out = {
        "params_m": params / 1e6,
        "param_dtype": "float32",
        "compute_dtype": "bfloat16",
        "rows": rows,
        "micro_batch": micro,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "step_s": seconds,
    }
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="Tiny sizes, CPU allowed.")
    ap.add_argument("--toy-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--micro-batch", type=int, default=None, help="algo.micro_batch_size of the update."
    )
    ap.add_argument("--json", type=Path, default=Path("gpu-check.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run this on a GPU machine, or pass --smoke to check the script")
    if args.smoke:
        args.toy_steps, args.batch, args.prompt_len, args.new_tokens = 3, 4, 8, 8
        args.repeats, args.micro_batch = 1, 3  # 3 + 1 rows: the accumulation path runs
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    report["toy"] = toy(args.toy_steps, device, args.smoke)
    print(json.dumps({"toy": report["toy"]}), flush=True)
    report["throughput"] = throughput(args, device)
    print(json.dumps({"throughput": report["throughput"]}), flush=True)
    report["real_step_memory"] = real_step_memory(args, device)
    print(json.dumps({"real_step_memory": report["real_step_memory"]}), flush=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
