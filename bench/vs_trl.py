"""GRPO step time of this project against TRL's GRPOTrainer: same model, task, batch and
hyper-parameters, measured in one run with the two sides alternating step by step.

The setup: the tiny Llama-style policy (hidden 128, 4 layers, 4
heads, FFN 512, char tokenizer), 3-digit addition with reversed answers, 32 prompts x 8
completions per step, at most 8 new tokens, temperature 1, one optimizer update per batch
(no old-log-prob pass is needed then: the ratio is 1), token-mean loss, no KL, 2 torch
threads in each process, the same attention kernels (the project's `model.attention`).
Both sides start from the same weights (saved once, loaded by each) and take the same
prompts in the same order.

Each side is a process of bench/vs_trl_worker.py that runs one step each time the driver
asks; the driver asks the project, then TRL, then the project again ..., so both see the
same machine load. A step is timed from its first rollout to its optimizer step inclusive
(TRL: from `on_step_begin` to `on_step_end`). The report is the median over steps
[--skip, --skip + --steps) and the ratio project / TRL (the target is <= 0.5).

The project skips the backward pass of zero-advantage rows (npo.training.rl_step); TRL does
not. A new, untrained policy solves nothing, so every group is zero-variance and the
project's update is a forward pass only: the report prints the share of such groups, and
`--policy` with a warmed-up checkpoint gives the mix a real run sees.

TRL lives in its own venv (default `.bench/trl-venv`, made on first use with pip's own
configuration: `torch` and `transformers` at this project's pinned versions, `trl` at
TRL_VERSION); it never enters the project's lock. This script only measures; it asserts
nothing.

Run:
    .venv/bin/python bench/vs_trl.py [--steps 25] [--skip 5] [--threads 2] [--json out.json]
    .venv/bin/python bench/vs_trl.py --policy runs/toy-comparison-warmup/...  # a trained start
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

TRL_VERSION = "1.16.0"
HERE = Path(__file__).resolve().parent
WORKER = HERE / "vs_trl_worker.py"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25, help="timed steps per side")
    p.add_argument("--skip", type=int, default=5, help="untimed first steps per side")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--policy", type=Path, default=None, help="start from this HF model folder (default: new)"
    )
    p.add_argument("--trl-venv", type=Path, default=HERE.parent / ".bench" / "trl-venv")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args()


def ensure_trl_venv(venv: Path) -> Path:
    """The venv's python with trl==TRL_VERSION and this project's torch and transformers."""
    python = venv / "bin" / "python"
    pins = [
        f"torch=={version('torch').split('+')[0]}",
        f"transformers=={version('transformers')}",
        f"trl=={TRL_VERSION}",
    ]
    stamp = venv / ".pins"
    if python.exists() and stamp.exists() and stamp.read_text() == " ".join(pins):
        return python
    print(f"making TRL's venv {venv} ({' '.join(pins)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-qq", *pins], check=True)
    stamp.write_text(" ".join(pins))
    return python


def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Save the starting policy and write bench.json (settings, config, prompts)."""
    from npo.config import ExperimentConfig
    from npo.policy.model import init_policy, load_policy, save_policy
    from npo.tasks import make_task

    settings = {
        "prompts": args.prompts,
        "group": args.group,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "lr": 5.0e-5,
        "clip_low": 0.2,
        "clip_high": 0.28,
        "threads": args.threads,
        "seed": args.seed,
        "steps": args.skip + args.steps,
    }
    config = {
        "seed": args.seed,
        "task": {"kind": "arithmetic", "digits": 3, "operation": "add"},
        "model": {
            "tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}
        },
        "rollout": {
            "prompts_per_step": args.prompts,
            "group_size": args.group,
            "max_new_tokens": args.max_new_tokens,
            "temperature": settings["temperature"],
        },
        "algo": {
            "lr": settings["lr"],
            "lr_warmup_steps": 0,
            "clip_low": settings["clip_low"],
            "clip_high": settings["clip_high"],
            "kl_coef": 0.0,
            "loss_agg": "token-mean",
            "ppo_epochs": 1,
            "minibatches": 1,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
        "train": {"threads": args.threads},
    }
    cfg = ExperimentConfig.model_validate(config)
    task = make_task(cfg.task)
    if args.policy is None:
        model, tokenizer = init_policy(cfg.model, task.alphabet(), cfg.seed)
    else:
        model, tokenizer = load_policy(args.policy)
    save_policy(model, tokenizer, workdir / "policy")
    params = sum(p.numel() for p in model.parameters())
    problems = task.train_problems()[: args.prompts * settings["steps"]]
    spec = {
        "settings": settings,
        "project_config": config,
        "params": params,
        "attention": cfg.model.attn_implementation(),  # the same kernels on both sides
        "problems": [
            {"id": p.id, "prompt": p.prompt, "answer": p.answer, "target": p.target}
            for p in problems
        ],
    }
    (workdir / "bench.json").write_text(json.dumps(spec))
    return spec


class Side:
    """One worker process: `step()` runs a step there and returns its JSON line."""

    def __init__(self, name: str, python: Path, workdir: Path, threads: int, log: IO[str]):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
        if name == "project":
            env["PYTHONPATH"] = str(HERE.parent / "src")
        self.name = name
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), name, str(workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (see its log)")
        return json.loads(line)

    def step(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    args = parse_args()
    trl_python = ensure_trl_venv(args.trl_venv)
    with tempfile.TemporaryDirectory(prefix="npo-vs-trl-") as tmp:
        workdir = Path(tmp)
        spec = prepare(workdir, args)
        log_path = workdir / "workers.log"
        with log_path.open("w") as log:
            sides = [
                Side("project", Path(sys.executable), workdir, args.threads, log),
                Side("trl", trl_python, workdir, args.threads, log),
            ]
            rows: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
            try:
                for _ in range(args.skip + args.steps):
                    for side in sides:
                        rows[side.name].append(side.step())
            except (RuntimeError, json.JSONDecodeError):
                print(log_path.read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                for side in sides:
                    side.close()
    timed = {name: r[args.skip :] for name, r in rows.items()}
    project, trl = (median_of(timed[n], "seconds") for n in ("project", "trl"))
    report = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "trl": TRL_VERSION,
        "params": spec["params"],
        "attention": spec["attention"],
        "settings": spec["settings"],
        "median_s_per_step": {"project": project, "trl": trl},
        "ratio_project_over_trl": project / trl,
        "response_len": {n: median_of(timed[n], "response_len") for n in timed},
        "project_phases_s": {k: median_of(timed["project"], k) for k in ("rollout_s", "update_s")},
        "reward_mean": {n: statistics.fmean(r["reward"] for r in timed[n]) for n in timed},
        "zero_var_frac": statistics.fmean(r["zero_var_frac"] for r in timed["project"]),
        "steps": rows,
    }
    print(
        f"GRPO step, {spec['params'] / 1e6:.2f}M params, {args.prompts}x{args.group}, "
        f"max {args.max_new_tokens} new tokens, {spec['attention']} attention, "
        f"{args.threads} threads, median of steps "
        f"{args.skip}-{args.skip + args.steps - 1}, alternating in one run"
    )
    for name, sec in report["median_s_per_step"].items():
        length = report["response_len"][name]
        print(f"  {name:<8} {sec:.3f} s/step   response length {length:.2f} tokens")
    phases = report["project_phases_s"]
    rollout_s, update_s = phases["rollout_s"], phases["update_s"]
    print(f"  project phases: rollout {rollout_s:.3f} s, update {update_s:.3f} s")
    rewards = ", ".join(f"{n} {r:.3f}" for n, r in report["reward_mean"].items())
    print(
        f"  mean reward: {rewards}; zero-variance groups (no backward pass): "
        f"{report['zero_var_frac']:.0%}"
    )
    print(f"project / TRL: {report['ratio_project_over_trl']:.2f} (target <= 0.50)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
