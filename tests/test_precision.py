"""Mixed precision: float32 weights, forwards under autocast in `model.compute_dtype`.

On CPU, torch.autocast runs bfloat16, so the whole path (forward, generate, PPO update,
checkpoint, a tiny experiment) is checked here; bench/gpu_check.py runs it on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_tiny_config
from safetensors.torch import load_file

from npo.config import AlgoConfig, load_config
from npo.policy.compute import compute_context, forward_dtype, use_compute_dtype
from npo.policy.model import load_policy, save_policy
from npo.rollout import sample
from npo.training.forward import response_logits
from npo.training.rl_step import ppo_update, sequence_logprobs

PROMPTS = ["12+3=", "1+1=", "999+999="]


@pytest.fixture
def bf16_compute():
    """bfloat16 compute for the test; the process setting is restored (None) afterwards."""
    yield use_compute_dtype("bfloat16")
    use_compute_dtype(None)


def draw(model, tok, seed=0):
    torch.manual_seed(seed)
    return sample(model, tok, PROMPTS, n=2, temperature=1.0, max_new_tokens=6)


def test_forward_runs_in_the_compute_dtype_on_float32_weights(tiny_policy, bf16_compute):
    model, tok = tiny_policy
    batch = draw(model, tok)
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    assert forward_dtype(model) == torch.bfloat16 and model.dtype == torch.float32
    assert response_logits(model, *args).dtype == torch.bfloat16
    use_compute_dtype(None)
    assert forward_dtype(model) == torch.float32
    assert response_logits(model, *args).dtype == torch.float32
    use_compute_dtype("float32")  # the weights' own dtype: no autocast either
    assert response_logits(model, *args).dtype == torch.float32


def test_bf16_logprobs_stay_float32_and_near_the_float32_ones(tiny_policy, bf16_compute):
    model, tok = tiny_policy
    batch = draw(model, tok)
    low = sequence_logprobs(model, batch, 1.0)
    use_compute_dtype(None)
    full = sequence_logprobs(model, batch, 1.0)
    assert low.dtype == torch.float32
    assert not torch.equal(low, full), "bfloat16 compute must show in the numbers"
    # bf16 logits carry ~3 significant digits: log-probs move by hundredths, not more
    assert (low - full).abs().max() < 0.1


def test_generate_samples_in_the_compute_dtype(tiny_policy, bf16_compute):
    model, tok = tiny_policy
    low = draw(model, tok)
    use_compute_dtype(None)
    full = draw(model, tok)
    assert low.logprobs.dtype == torch.float32
    assert low.response_ids.shape[0] == full.response_ids.shape[0] == len(PROMPTS) * 2
    assert not torch.equal(low.logprobs, full.logprobs)
    # The recorded behaviour log-probs are those of the (bf16) distribution sampled from:
    # a bf16 teacher-forced pass agrees to bf16 precision.
    use_compute_dtype("bfloat16")
    forced = sequence_logprobs(model, low, 1.0)
    assert (forced - low.logprobs).abs().max() < 0.1


def test_update_keeps_float32_weights_and_checkpoints(tiny_policy, bf16_compute, tmp_path):
    model, tok = tiny_policy
    batch = draw(model, tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    algo = AlgoConfig(lr=1e-3, micro_batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=algo.lr)
    advantages = torch.linspace(-1, 1, len(batch))
    metrics = ppo_update(model, opt, batch, advantages, algo, temperature=1.0)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    state = opt.state[next(iter(model.parameters()))]
    assert state["exp_avg"].dtype == torch.float32
    save_policy(model, tok, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    loaded, _ = load_policy(tmp_path)
    assert loaded.dtype == torch.float32


def test_float32_compute_over_bfloat16_weights_is_refused(tiny_policy):
    model, _ = tiny_policy
    model = model.to(torch.bfloat16)
    use_compute_dtype("float32")
    try:
        with pytest.raises(ValueError, match=r"compute_dtype=float32 needs model\.dtype=float32"):
            compute_context(model)
    finally:
        use_compute_dtype(None)


@pytest.mark.slow
def test_tiny_experiment_with_bf16_compute(tmp_path: Path) -> None:
    from npo.experiment import run_experiment
    from npo.report import load_history
    from npo.store.artifacts import open_store
    from npo.store.checkpoint import list_checkpoints
    from npo.training.state import load_train_state

    root = tmp_path / "runs"
    sizes = {"algo": {"micro_batch_size": 5}, "rollout": {"hf_batch_size": 6}}
    off = {"tracking": {"enabled": False}}
    runs = {"bf16": {"compute_dtype": "bfloat16"}, "fp32": {}}
    try:
        for name, model in runs.items():
            path = tmp_path / f"{name}.yaml"
            write_tiny_config(path, root, name, steps=3, model=model, **sizes, **off)
            summary = run_experiment(load_config(path))
            assert 0.0 <= summary["final accuracy"] <= 1.0
    finally:
        use_compute_dtype(None)  # run_experiment set it for this process
    store = open_store((root / "artifacts").as_uri())
    assert list_checkpoints(store, "bf16") == [0, 3]
    loaded = load_train_state(store, "bf16", 3)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    # the compute dtype reached the run: its numbers are not the float32 run's
    bf16, fp32 = (load_history(root / name / "metrics.jsonl") for name in runs)
    assert bf16[1]["actor/entropy"] != fp32[1]["actor/entropy"]
