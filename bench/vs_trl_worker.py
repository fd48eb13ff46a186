"""One side of bench/vs_trl.py: a process that runs one GRPO step each time it reads `step`.

    python bench/vs_trl_worker.py project|trl WORKDIR

WORKDIR holds what bench/vs_trl.py prepared: `policy/` (the starting model and tokenizer,
an HF folder) and `bench.json` (the settings and the prompts with their answers, in the
order the steps take them). The worker loads everything, prints `{"ready": ...}`, then for
each `step` line on stdin runs one step and prints one JSON line: its seconds and response
length, plus the project's phase times. Other output (TRL's, transformers') goes to
stderr, so stdout carries only these lines. The `trl` side runs in TRL's own venv and does
not import this project.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _reply_channel() -> TextIO:
    """stdout for our JSON lines only; everything else printed from here on goes to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def _answer_of(response: str, answer: str) -> float:
    """The reversed-digits rule of the project's arithmetic verifier, for TRL's reward."""
    text = response.strip()
    if not (text and text.isascii() and text.isdigit()):
        return 0.0
    return float((text[::-1].lstrip("0") or "0") == answer)


def run_project(workdir: Path, spec: dict[str, Any], reply: TextIO) -> None:
    import torch

    from npo.algo import compute_advantages
    from npo.config import ExperimentConfig
    from npo.policy.model import load_policy
    from npo.stages import use_compute
    from npo.steps.train_segment import scored_rollout
    from npo.tasks import Problem, make_task
    from npo.training.rl_step import ppo_update

    cfg = ExperimentConfig.model_validate(spec["project_config"])
    use_compute(cfg)  # threads, device, attention kernels: as a train stage sets them
    task = make_task(cfg.task)
    model, tokenizer = load_policy(workdir / "policy")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.algo.lr, weight_decay=cfg.algo.weight_decay
    )
    rows = spec["problems"]
    n = cfg.rollout.prompts_per_step
    reply.write(json.dumps({"ready": "project", "torch_threads": torch.get_num_threads()}) + "\n")
    for step, line in enumerate(sys.stdin):
        if line.strip() != "step":
            break
        chunk = rows[(step * n) % len(rows) :][:n]
        problems = [Problem(r["id"], r["prompt"], r["answer"], r["target"]) for r in chunk]
        t0 = time.perf_counter()
        batch, rewards, _ = scored_rollout(cfg, model, tokenizer, task, problems)
        t1 = time.perf_counter()
        advantages = compute_advantages(cfg.algo.adv_estimator, rewards, cfg.algo.adv_eps)
        metrics = ppo_update(
            model, optimizer, batch, advantages.reshape(-1), cfg.algo, cfg.rollout.temperature
        )
        t2 = time.perf_counter()
        out = {
            "seconds": t2 - t0,
            "rollout_s": t1 - t0,
            "update_s": t2 - t1,
            "response_len": batch.num_response_tokens / len(batch),
            "reward": float(rewards.mean()),
            # groups whose rewards are all equal: zero advantage, so no backward pass
            "zero_var_frac": float((advantages == 0).all(dim=-1).float().mean()),
            "loss": metrics["actor/loss"],
        }
        reply.write(json.dumps(out) + "\n")


def run_trl(workdir: Path, spec: dict[str, Any], reply: TextIO) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = spec["settings"]
    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(workdir / "policy", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "policy", dtype=torch.float32, attn_implementation=spec["attention"]
    )
    rows = spec["problems"]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [_answer_of(c, a) for c, a in zip(completions, answer, strict=True)]

    class Stepper(TrainerCallback):
        """Waits for `step` before each optimizer step and reports its time after it."""

        t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if sys.stdin.readline().strip() != "step":
                os._exit(0)  # the driver is done: skip the trainer's end-of-training work
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.t0
            lengths = trainer._metrics["train"]["completions/mean_length"]
            rewards = trainer._metrics["train"]["reward"]
            out = {"seconds": seconds, "response_len": lengths[-1], "reward": rewards[-1]}
            reply.write(json.dumps(out) + "\n")

    completions = s["prompts"] * s["group"]
    args = GRPOConfig(
        output_dir=str(workdir / "trl-out"),
        per_device_train_batch_size=completions,  # the whole step's batch in one update
        gradient_accumulation_steps=1,
        num_generations=s["group"],
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        num_iterations=1,
        epsilon=s["clip_low"],
        epsilon_high=s["clip_high"],
        loss_type="dapo",  # token-mean over the batch, as the project's algo.loss_agg
        max_steps=s["steps"] + 1,
        logging_steps=1_000_000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        seed=s["seed"],
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Stepper()],
    )
    reply.write(json.dumps({"ready": "trl", "torch_threads": torch.get_num_threads()}) + "\n")
    trainer.train()


def main() -> None:
    reply = _reply_channel()
    side, workdir = sys.argv[1], Path(sys.argv[2])
    spec = json.loads((workdir / "bench.json").read_text())
    {"project": run_project, "trl": run_trl}[side](workdir, spec, reply)


if __name__ == "__main__":
    main()
