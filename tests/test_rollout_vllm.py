"""The vLLM backend's contract, checked on CPU without vLLM: its outputs become the same
RolloutBatch the HF backend returns, weights are synced into the engine before every call,
and a machine without vLLM (or a GPU) gets a clear error before anything is written.

A fake `vllm` module stands in for the engine: it samples with the HF backend from the
weights it was given, so the test exercises our side (prompt ids, conversion, weight
loading, seeding) exactly; vLLM itself is exercised on a GPU machine (bench/gpu_check.py).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import write_tiny_config

from npo.config import ConfigError, ModelConfig, load_config
from npo.policy.compute import use_compute_dtype
from npo.policy.model import init_policy
from npo.rollout import hf, rollout
from npo.rollout import vllm as vb
from npo.steps.context import open_run


class _Logprob:
    def __init__(self, logprob: float) -> None:
        self.logprob = logprob


class FakeLLM:
    """vllm.LLM's surface we use; samples with the HF backend from its own weights."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, model: str, **kwargs: object) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert kwargs["logprobs_mode"] == "processed_logprobs"
        self.model = AutoModelForCausalLM.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.kwargs = kwargs
        self.loads = 0
        FakeLLM.instances.append(self)

    def apply_model(self, fn):
        engine = self

        class Runner:
            def load_weights(self, weights):
                engine.loads += 1
                weights = dict(weights)
                engine.loaded_dtypes = {v.dtype for v in weights.values()}
                engine.model.load_state_dict(weights)

        return fn(Runner())

    def generate(self, prompts, params, use_tqdm=True):
        self.params = params
        # vLLM stops at its tokenizer's EOS and at params.stop_token_ids; so does the fake.
        stops = [self.tokenizer.eos_token_id, *(params.stop_token_ids or [])]
        self.model.generation_config.eos_token_id = stops
        torch.manual_seed(params.seed)
        outs = []
        for p in prompts:
            text = self.tokenizer.decode(p["prompt_token_ids"], skip_special_tokens=True)
            b = hf.sample(
                self.model, self.tokenizer, [text], params.n, params.temperature, params.max_tokens
            )
            completions = []
            for row in range(len(b)):
                m = b.response_mask[row].bool()
                ids = b.response_ids[row][m].tolist()
                lps = b.logprobs[row][m].tolist()
                per_token = [{t: _Logprob(lp)} for t, lp in zip(ids, lps, strict=True)]
                completions.append(types.SimpleNamespace(token_ids=ids, logprobs=per_token))
            outs.append(types.SimpleNamespace(outputs=completions))
        return outs


class FakeSamplingParams:
    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(vb, "check_available", lambda: None)
    monkeypatch.setattr(vb, "_ENGINE", None)
    FakeLLM.instances.clear()
    return mod


def test_completions_become_the_hf_batch_layout() -> None:
    model, tok = init_policy(load_config(None).model, "0123456789+=", seed=0)
    torch.manual_seed(0)
    ref = hf.sample(model, tok, ["12+34=", "5+6="], n=3, temperature=1.0, max_new_tokens=6)
    completions = []
    for i in range(2):
        rows = [r for r in range(len(ref)) if ref.prompt_index[r] == i]
        completions.append([
            vb.Completion(ref.response_ids[r][ref.response_mask[r].bool()].tolist(),
                          ref.logprobs[r][ref.response_mask[r].bool()].tolist())
            for r in rows
        ])  # fmt: skip
    prompt_ids = [tok(p)["input_ids"] for p in ["12+34=", "5+6="]]
    got = vb.batch_from_completions(
        prompt_ids, completions, [tok.eos_token_id], tok.pad_token_id,
        lambda rows: tok.batch_decode(rows, skip_special_tokens=True),
    )  # fmt: skip
    assert torch.equal(got.prompt_ids, ref.prompt_ids)
    assert torch.equal(got.prompt_mask, ref.prompt_mask)
    assert got.prompt_index.tolist() == ref.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    width = got.response_ids.shape[1]
    assert torch.equal(got.response_mask, ref.response_mask[:, :width])
    assert torch.equal(
        got.response_ids * got.response_mask, (ref.response_ids * ref.response_mask)[:, :width]
    )
    assert torch.allclose(got.logprobs, ref.logprobs[:, :width])
    assert got.texts == ref.texts


def test_tokens_after_eos_are_dropped_and_lengths_checked() -> None:
    decode = lambda rows: ["".join(map(str, r)) for r in rows]  # noqa: E731
    b = vb.batch_from_completions(
        [[9]], [[vb.Completion([4, 2, 7], [-1.0, -2.0, -3.0])]], [2], 0, decode
    )
    assert b.response_ids.tolist() == [[4, 2]] and b.logprobs.tolist() == [[-1.0, -2.0]]
    assert b.texts == ["42"]
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        vb.batch_from_completions([[9]], [[vb.Completion([4, 2], [-1.0])]], [2], 0, decode)


def test_responses_end_at_the_first_of_any_stop_id() -> None:
    decode = lambda rows: ["".join(map(str, r)) for r in rows]  # noqa: E731
    lp = [-1.0, -2.0, -3.0, -4.0]
    outs = [[vb.Completion([4, 7, 2, 5], lp), vb.Completion([4, 5, 2, 7], lp)],
            [vb.Completion([4, 5, 6, 8], lp)]]  # fmt: skip
    b = vb.batch_from_completions([[9], [9]], outs, [2, 7], 0, decode)
    assert b.response_ids.tolist() == [[4, 7, 0, 0], [4, 5, 2, 0], [4, 5, 6, 8]]
    assert b.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert b.logprobs.tolist() == [[-1.0, -2.0, 0, 0], [-1.0, -2.0, -3.0, 0], lp]
    assert b.texts == ["47", "452", "4568"]
    # vLLM is told the stop ids besides the tokenizer's EOS, which it stops at by itself
    assert vb.extra_stop_ids([2, 7, 9], eos_id=2) == [7, 9]
    assert vb.extra_stop_ids([2], eos_id=2) == []


def test_engine_stops_at_the_models_extra_stop_tokens(fake_vllm) -> None:
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.max_new_tokens=6"]).rollout
    model, tok = init_policy(ModelConfig(stop_tokens=["5"]), "0123456789+=", seed=0)
    five = tok.convert_tokens_to_ids("5")
    torch.manual_seed(0)
    batch = rollout(cfg, model, tok, ["12+34=", "5+6="], n=8)
    assert FakeLLM.instances[0].params.stop_token_ids == [five]
    ends = []
    for row in range(len(batch)):
        kept = batch.response_ids[row][batch.response_mask[row].bool()].tolist()
        assert not {five, tok.eos_token_id} & set(kept[:-1])
        ends.append(kept[-1] if kept else None)
    assert five in ends, "no response drew a '5': the seed no longer exercises the stop"


def test_engine_is_built_once_and_synced_with_the_trained_weights(fake_vllm) -> None:
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.max_new_tokens=5"]).rollout
    model, tok = init_policy(load_config(None).model, "0123456789+=", seed=0)
    torch.manual_seed(1)
    first = rollout(cfg, model, tok, ["12+34="], n=4)
    assert len(FakeLLM.instances) == 1 and FakeLLM.instances[0].loads == 0
    with torch.no_grad():  # "a training step": the engine must sample the new weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(2)
    second = rollout(cfg, model, tok, ["12+34="], n=4)
    engine = FakeLLM.instances[0]
    assert len(FakeLLM.instances) == 1 and engine.loads == 1
    assert engine.kwargs["dtype"] == "float32" and engine.loaded_dtypes == {torch.float32}
    for name, value in model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], value), name
    # the behaviour log-probs are the current policy's, tempered: recompute them with HF
    from npo.training.rl_step import sequence_logprobs

    recomputed = sequence_logprobs(model, second, cfg.temperature)
    assert torch.allclose(recomputed * second.response_mask, second.logprobs, atol=1e-5)
    assert first.response_ids.shape[0] == second.response_ids.shape[0] == 4


def test_engine_samples_in_the_compute_dtype_from_float32_weights(fake_vllm) -> None:
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.max_new_tokens=4"]).rollout
    model, tok = init_policy(load_config(None).model, "0123456789+=", seed=0)
    use_compute_dtype("bfloat16")
    try:
        rollout(cfg, model, tok, ["12+34="], n=2)
        rollout(cfg, model, tok, ["12+34="], n=2)  # the second call syncs the weights
    finally:
        use_compute_dtype(None)
    engine = FakeLLM.instances[0]
    assert engine.kwargs["dtype"] == "bfloat16"
    assert engine.loads == 1 and engine.loaded_dtypes == {torch.bfloat16}
    assert model.dtype == torch.float32  # the trained copy keeps its master weights


def test_greedy_eval_runs_on_vllm_when_asked_and_matches_hf(fake_vllm) -> None:
    from npo.steps.evaluate import eval_settings, evaluate_policy
    from npo.tasks import make_task

    base = ["rollout.backend=vllm", "rollout.max_new_tokens=5", "task.n_eval=16"]
    assert eval_settings(load_config(None, base))["vllm"] is None  # default: HF
    hf_on_vllm_run = load_config(None, ["train.eval_backend=rollout", "rollout.max_new_tokens=5"])
    assert eval_settings(hf_on_vllm_run)["vllm"] is None  # rollouts on HF: eval stays there
    cfg = load_config(None, [*base, "train.eval_backend=rollout"])
    settings = eval_settings(cfg)
    assert settings["vllm"] is cfg.rollout and settings["max_new_tokens"] == 5
    model, tok = init_policy(cfg.model, "0123456789+=", seed=0)
    task = make_task(cfg.task)
    problems = task.eval_problems()
    on_vllm = evaluate_policy(model, tok, task, problems, **settings)
    engine = FakeLLM.instances[0]
    assert (engine.params.temperature, engine.params.n) == (0.0, 1)  # greedy, once each
    on_hf = evaluate_policy(model, tok, task, problems, **eval_settings(load_config(None, base)))
    assert len(FakeLLM.instances) == 1  # the HF eval did not touch the engine
    assert on_vllm == on_hf  # the fake engine decodes with HF: the same greedy answers


def test_vllm_backend_without_vllm_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    if vb.importlib_available():
        pytest.skip("vllm is installed here")
    root = tmp_path / "runs"
    path = write_tiny_config(tmp_path / "v.yaml", root, "v", 3, rollout={"backend": "vllm"})
    with pytest.raises(vb.VllmUnavailable, match="pip install 'npo\\[vllm\\]'"):
        open_run(load_config(path))
    assert not (root / "v").exists()
    with pytest.raises(ConfigError, match=r"rollout\.backend"):
        load_config(path, ["rollout.backend=sglang"])
