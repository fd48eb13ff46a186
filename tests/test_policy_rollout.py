"""Policy and rollout: the char tokenizer, the tiny model, sampling, and one PPO update.

The key check is that the behaviour log-probs `sample()` records (from `generate`'s logits)
are the log-probs of the tempered distribution the tokens were drawn from: a teacher-forced
forward pass (`sequence_logprobs`, what the trainer uses for ratios) must give the same
numbers, at every temperature, with left-padded prompts and in chunks. The model is a
~11k-parameter Llama with peaked outputs (see conftest.tiny_policy); the file runs in seconds.

Run: .venv/bin/python -m pytest tests/test_policy_rollout.py -q
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.testing import assert_close
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from npo.algo import token_logprobs
from npo.config import AlgoConfig, ModelConfig, RolloutConfig
from npo.policy.compute import use_attention
from npo.policy.model import (
    add_stop_tokens,
    init_policy,
    load_policy,
    save_policy,
    stop_token_id,
    stop_token_ids,
)
from npo.policy.tokenizer import build_char_tokenizer
from npo.rollout import RolloutBatch, hf, response_mask_from_ids, rollout, sample
from npo.training.forward import response_logits
from npo.training.rl_step import ppo_update, sequence_logprobs

# Different lengths on purpose: the batch is left-padded to the longest (8 chars + <bos>).
PROMPTS = ["12+3=", "1+1=", "999+999=", "7="]
N = 4  # responses per prompt
MAX_NEW = 8
TEXTS = ["12+3=", "999+999=", "0=", "+", ""]


def draw(model, tokenizer, temperature=1.0, seed=0, prompts=PROMPTS, n=N, **kw) -> RolloutBatch:
    torch.manual_seed(seed)
    return sample(
        model, tokenizer, prompts, n=n, temperature=temperature, max_new_tokens=MAX_NEW, **kw
    )


def lengths(batch: RolloutBatch) -> list[int]:
    return batch.response_mask.sum(dim=1).tolist()


# --------------------------------------------------------------------------- tokenizer
@pytest.fixture
def tok(alphabet):
    return build_char_tokenizer(alphabet)


def test_special_tokens_are_four_distinct_ids_and_each_char_is_one_token(tok, alphabet):
    special = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert len(set(special)) == 4
    assert len(tok) == 4 + len(alphabet)
    char_ids = [tok.convert_tokens_to_ids(c) for c in alphabet]
    assert len(set(char_ids)) == len(alphabet)
    assert not set(char_ids) & set(special)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_prepends_bos_and_decode_round_trips(tok, text):
    ids = tok(text)["input_ids"]
    assert ids == [tok.bos_token_id] + [tok.convert_tokens_to_ids(c) for c in text]
    assert tok.decode(ids, skip_special_tokens=True) == text
    # A response ending in EOS (then padding) decodes to just its characters.
    response = [*ids[1:], tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(response, skip_special_tokens=True) == text


def test_unknown_char_becomes_unk(tok):
    ids = tok("1x2")["input_ids"]
    one, two = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
    assert ids == [tok.bos_token_id, one, tok.unk_token_id, two]


def test_whitespace_chars_are_tokens_too():
    tok = build_char_tokenizer("ab \n")
    text = "a b\n\nb"
    ids = tok(text)["input_ids"]
    assert len(ids) == 1 + len(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_alphabet_is_deduplicated_and_must_not_be_empty():
    assert len(build_char_tokenizer("aab")) == 4 + 2
    with pytest.raises(ValueError, match="alphabet is empty"):
        build_char_tokenizer("")


def test_save_pretrained_then_auto_tokenizer_gives_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, "1x2"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(again, name) == getattr(tok, name)
    assert again.get_vocab() == tok.get_vocab()
    # Batches are left-padded, as generation needs.
    batch = again(["1", "123"], padding=True)
    pad, bos = tok.pad_token_id, tok.bos_token_id
    assert batch["input_ids"][0][:3] == [pad, pad, bos]
    assert batch["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


# --------------------------------------------------------------------------- tiny model
def test_default_tiny_model_has_about_a_million_parameters(alphabet):
    cfg = ModelConfig()
    model, tok = init_policy(cfg, alphabet, seed=0)
    t = cfg.tiny
    h, i, v = t.hidden_size, t.intermediate_size, len(tok)
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q,k,v,o + gate,up,down + two RMSNorms
    expected = t.num_layers * per_layer + v * h + h  # tied embeddings + final norm
    n = sum(p.numel() for p in model.parameters())
    assert n == expected
    assert 0.9e6 < n < 1.2e6


def test_init_is_deterministic_in_the_seed():
    def weights(seed):
        model, _ = init_policy(ModelConfig(tiny={"hidden_size": 16, "num_heads": 2}), "01", seed)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_save_then_load_policy_gives_identical_logits(tiny_policy, tmp_path):
    model, tok = tiny_policy
    save_policy(model, tok, tmp_path / "policy")
    loaded, loaded_tok = load_policy(tmp_path / "policy")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    enc2 = loaded_tok(PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    model.eval()
    with torch.no_grad():
        a = model(**enc).logits
        b = loaded(**enc2).logits
    assert torch.equal(a, b)
    # Sampling settings survive too: no top-k / top-p truncation after loading.
    assert loaded.generation_config.top_k is None
    assert loaded.generation_config.top_p is None
    assert loaded.generation_config.eos_token_id == [tok.eos_token_id]


def test_load_policy_in_another_dtype(tiny_policy, tmp_path):
    model, tok = tiny_policy
    save_policy(model, tok, tmp_path)
    loaded, _ = load_policy(tmp_path, "bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("source", ["tiny", "/some/hf/folder"])
def test_the_attention_kernels_a_run_asks_for(source):
    cfg = ModelConfig(source=source)
    assert cfg.attn_implementation() == ("eager" if source == "tiny" else None)
    assert ModelConfig(source=source, attention="sdpa").attn_implementation() == "sdpa"


def test_eager_attention_builds_and_loads_and_gives_the_sdpa_logits(tiny_policy, tmp_path):
    model, tok = tiny_policy
    save_policy(model, tok, tmp_path)
    batch = draw(model, tok)
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    try:
        use_attention("eager")
        built, _ = init_policy(ModelConfig(), "0123456789+=", seed=0)
        loaded, _ = load_policy(tmp_path)
    finally:
        use_attention(None)
    assert built.config._attn_implementation == loaded.config._attn_implementation == "eager"
    assert load_policy(tmp_path)[0].config._attn_implementation == "sdpa"
    with torch.no_grad():
        on = batch.response_mask.bool()
        assert_close(response_logits(loaded, *args)[on], response_logits(model, *args)[on])


def test_load_policy_without_config_json_names_the_folder(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json") as info:
        load_policy(folder)
    assert str(folder) in str(info.value)


# --------------------------------------------------------------------------- stop tokens
SMALL = {"hidden_size": 16, "num_heads": 2}


def test_init_policy_adds_stop_tokens_after_the_tokenizers_eos(alphabet):
    # Ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then "+0123456789=" from 4: "7" 12, "=" 15.
    cfg = ModelConfig(tiny=SMALL, stop_tokens=["=", "<eos>", "7", "="])
    model, tok = init_policy(cfg, alphabet, seed=0)
    assert tok.eos_token_id == 2
    assert stop_token_ids(model) == model.generation_config.eos_token_id == [2, 15, 12]
    plain, _ = init_policy(ModelConfig(tiny=SMALL), alphabet, seed=0)
    assert stop_token_ids(plain) == [2]


@pytest.mark.parametrize(
    ("token", "why"),
    [("x", "not in the vocabulary"), ("12", "encodes to 2 tokens"), ("", "encodes to 0")],
)
def test_a_stop_token_must_be_one_known_token(alphabet, token, why):
    cfg = ModelConfig(tiny=SMALL, stop_tokens=["7", token])
    with pytest.raises(ValueError, match=rf"model\.stop_tokens: '{token}' .*{why}"):
        init_policy(cfg, alphabet, seed=0)


def test_stop_ids_survive_save_and_load(alphabet, tmp_path):
    model, tok = init_policy(ModelConfig(tiny=SMALL, stop_tokens=["7"]), alphabet, seed=0)
    save_policy(model, tok, tmp_path)
    path = tmp_path / "generation_config.json"
    assert json.loads(path.read_text())["eos_token_id"] == [2, 12]
    loaded, _ = load_policy(tmp_path)
    assert stop_token_ids(loaded) == [2, 12]
    # A checkpoint's own EOS ids (an int or a list) stay, after the tokenizer's EOS.
    for shipped, expected in [(15, [2, 15]), ([15, 2, 12], [2, 15, 12]), (None, [2])]:
        path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": shipped}))
        assert stop_token_ids(load_policy(tmp_path)[0]) == expected


def test_stop_token_id_of_an_added_token_and_of_byte_level_text():
    """A real BPE vocabulary spells a newline "Ċ": the text "\n" is found by encoding it."""
    core = Tokenizer(models.BPE(vocab={"a": 0, "Ċ": 1, "<|endoftext|>": 2}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert stop_token_id(tok, "<|im_end|>") == 3
    assert stop_token_id(tok, "\n") == stop_token_id(tok, "Ċ") == 1
    with pytest.raises(ValueError, match=r"'aa' is not a single token.*encodes to 2 tokens"):
        stop_token_id(tok, "aa")


def test_sampling_stops_at_an_extra_stop_token(tiny_policy):
    """Same seed, "5" also stops: each response is the plain one cut after its first "5"."""
    model, tok = tiny_policy
    stopped = copy.deepcopy(model)
    add_stop_tokens(stopped, tok, ["5"])  # what init_policy does with model.stop_tokens
    five = tok.convert_tokens_to_ids("5")
    plain, cut = draw(model, tok, seed=0), draw(stopped, tok, seed=0)
    expected_mask = response_mask_from_ids(plain.response_ids, [tok.eos_token_id, five])
    shortened = 0
    for row in range(len(plain)):
        kept = cut.response_ids[row][cut.response_mask[row].bool()]
        assert kept.tolist() == plain.response_ids[row][expected_mask[row].bool()].tolist()
        assert_close(cut.logprobs[row][: len(kept)], plain.logprobs[row][: len(kept)])
        assert cut.texts[row] == tok.decode(kept, skip_special_tokens=True)
        if len(kept) < lengths(plain)[row]:
            assert kept[-1].item() == five
            shortened += 1
    assert shortened >= 3, "the fixture no longer draws a '5' mid-response"


# --------------------------------------------------------------------------- response mask
EOS = 2


@pytest.mark.parametrize(
    ("ids", "mask"),
    [
        ([2, 5, 6, 7], [1, 0, 0, 0]),  # EOS first: only the EOS counts
        ([5, 6, 7, 2], [1, 1, 1, 1]),  # EOS last
        ([5, 6, 7, 8], [1, 1, 1, 1]),  # no EOS: truncated at max_new_tokens, all kept
        ([5, 2, 6, 2], [1, 1, 0, 0]),  # two EOS: cut at the first
        ([2, 2, 5, 6], [1, 0, 0, 0]),  # EOS twice in a row
        ([0, 5, 2, 0], [1, 1, 1, 0]),  # a token equal to the pad id before EOS is kept
    ],
)
def test_response_mask_by_hand(ids, mask):
    out = response_mask_from_ids(torch.tensor([ids]), stop_ids=[EOS])
    assert out.tolist() == [mask]
    assert out.dtype == torch.long


def test_response_mask_rows_are_independent():
    ids = torch.tensor([[2, 5, 6], [5, 6, 7], [5, 2, 2]])
    assert response_mask_from_ids(ids, [EOS]).tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_response_mask_stops_at_the_first_of_two_stop_ids():
    ids = torch.tensor([[5, 7, 2, 6], [5, 2, 7, 6], [5, 6, 8, 9], [7, 7, 5, 2], [0, 5, 6, 7]])
    mask = response_mask_from_ids(ids, [EOS, 7])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert response_mask_from_ids(ids, []).tolist() == [[1] * 4] * 5  # no stop id: all kept


# --------------------------------------------------------------------------- sample()
def test_sample_shapes_and_grouping(tiny_policy):
    model, tok = tiny_policy
    batch = draw(model, tok)
    b = len(PROMPTS) * N
    p = 1 + max(len(x) for x in PROMPTS)
    assert len(batch) == b
    assert batch.prompt_ids.shape == batch.prompt_mask.shape == (b, p)
    r = batch.response_ids.shape[1]
    assert 1 <= r <= MAX_NEW
    assert batch.response_mask.shape == batch.logprobs.shape == (b, r)
    assert len(batch.texts) == b
    assert batch.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(N)]
    for row in range(b):
        i = row // N
        real = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        assert tok.decode(real, skip_special_tokens=True) == PROMPTS[i]
        # Left padding: pad ids, then the prompt starting with <bos>.
        n_pad = p - len(real)
        assert batch.prompt_mask[row].tolist() == [0] * n_pad + [1] * len(real)
        assert (batch.prompt_ids[row, :n_pad] == tok.pad_token_id).all()
        assert real[0].item() == tok.bos_token_id


def test_sample_masks_logprobs_padding_and_texts(tiny_policy):
    model, tok = tiny_policy
    batch = draw(model, tok)
    ids, mask, logp = batch.response_ids, batch.response_mask, batch.logprobs
    r = ids.shape[1]
    assert mask.tolist() == response_mask_from_ids(ids, [tok.eos_token_id]).tolist()
    on, off = mask.bool(), ~mask.bool()
    assert (logp[off] == 0).all()
    assert (logp[on] <= 0).all()
    assert torch.isfinite(logp).all()
    assert (ids[off] == tok.pad_token_id).all()
    ended = [row for row, n in enumerate(lengths(batch)) if n < r]
    full = [row for row, n in enumerate(lengths(batch)) if n == r]
    assert ended, "no response stopped early: the fixture no longer exercises EOS"
    assert full, "every response stopped early: the fixture no longer exercises truncation"
    for row in range(len(batch)):
        kept = ids[row][on[row]]
        # Only the last kept token may be EOS, and a response shorter than R must end in one.
        assert tok.eos_token_id not in kept[:-1].tolist()
        if row in ended:
            assert kept[-1].item() == tok.eos_token_id
        assert batch.texts[row] == tok.decode(kept, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_teacher_forced_logprobs(tiny_policy, temperature):
    model, tok = tiny_policy
    batch = draw(model, tok, temperature)
    recomputed = sequence_logprobs(model, batch, temperature)
    assert_close(batch.logprobs, recomputed, atol=1e-4, rtol=0)
    # The check has teeth: the other temperature's log-probs are far off.
    other = sequence_logprobs(model, batch, 1.0 if temperature != 1.0 else 0.7)
    assert (batch.logprobs - other).abs().max() > 0.05


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_left_padding_does_not_change_logprobs(tiny_policy, temperature):
    """Each row, run alone without any padding, gives the log-probs the padded batch recorded."""
    model, tok = tiny_policy
    batch = draw(model, tok, temperature)
    assert (batch.prompt_mask == 0).any(), "prompts must differ in length"
    model.eval()
    for row in range(len(batch)):
        n = int(batch.response_mask[row].sum())
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()][None]
        response = batch.response_ids[row, :n][None]
        with torch.no_grad():
            logits = response_logits(
                model, prompt, torch.ones_like(prompt), response, torch.ones_like(response)
            )
        alone = token_logprobs(logits, response, temperature)[0]
        assert_close(batch.logprobs[row, :n], alone, atol=1e-4, rtol=0)
    # The check has teeth: attending to the pad tokens changes the numbers.
    with torch.no_grad():
        leaky = response_logits(
            model,
            batch.prompt_ids,
            torch.ones_like(batch.prompt_mask),
            batch.response_ids,
            batch.response_mask,
        )
    leaky_logp = token_logprobs(leaky, batch.response_ids, temperature) * batch.response_mask
    assert (leaky_logp - batch.logprobs).abs().max() > 1e-2


def test_sample_restores_train_mode(tiny_policy):
    model, tok = tiny_policy
    model.train()
    draw(model, tok)
    assert model.training
    model.eval()
    draw(model, tok)
    assert not model.training


def test_greedy_is_deterministic_and_picks_the_argmax(tiny_policy):
    model, tok = tiny_policy
    a = draw(model, tok, temperature=0.0, seed=1)
    b = draw(model, tok, temperature=0.0, seed=2)
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.texts == b.texts
    # All N copies of a prompt get the same greedy answer.
    ids = a.response_ids.view(len(PROMPTS), N, -1)
    assert (ids == ids[:, :1]).all()
    # Greedy decoding (evaluation) records no log-probs, and every kept token is the argmax.
    assert not a.logprobs.any()
    model.eval()
    with torch.no_grad():
        logits = response_logits(
            model, a.prompt_ids, a.prompt_mask, a.response_ids, a.response_mask
        )
    on = a.response_mask.bool()
    assert torch.equal(logits.argmax(-1)[on], a.response_ids[on])


def test_seeded_sampling_is_reproducible(tiny_policy):
    model, tok = tiny_policy
    a, b = draw(model, tok, seed=123), draw(model, tok, seed=123)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert a.texts == b.texts
    c = draw(model, tok, seed=124)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_chunked_greedy_equals_one_batch(tiny_policy):
    model, tok = tiny_policy
    whole = draw(model, tok, temperature=0.0, n=2)
    # Chunks of 3 rows: uneven (3, 3, 2) and cutting through groups and prompt lengths.
    parts = draw(model, tok, temperature=0.0, n=2, batch_size=3)
    assert torch.equal(parts.prompt_ids, whole.prompt_ids)
    assert torch.equal(parts.prompt_mask, whole.prompt_mask)
    assert torch.equal(parts.response_ids, whole.response_ids)
    assert torch.equal(parts.response_mask, whole.response_mask)
    assert torch.equal(parts.prompt_index, whole.prompt_index)
    assert parts.texts == whole.texts
    assert_close(parts.logprobs, whole.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_sampling_keeps_grouping_and_logprobs(tiny_policy, temperature):
    model, tok = tiny_policy
    batch = draw(model, tok, temperature, batch_size=5)
    b = len(PROMPTS) * N
    assert batch.prompt_ids.shape == (b, 1 + max(len(x) for x in PROMPTS))
    assert batch.response_ids.shape[0] == b
    assert batch.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(N)]
    for row in range(b):
        real = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        assert tok.decode(real, skip_special_tokens=True) == PROMPTS[row // N]
    off = ~batch.response_mask.bool()
    assert (batch.logprobs[off] == 0).all()
    assert (batch.response_ids[off] == tok.pad_token_id).all()
    assert_close(batch.logprobs, sequence_logprobs(model, batch, temperature), atol=1e-4, rtol=0)


def test_checkpoint_sampling_knobs_do_not_change_what_is_sampled(tiny_policy, tmp_path):
    """Real HF checkpoints ship sampling defaults; sample() must draw from softmax(z / T)."""
    model, tok = tiny_policy
    save_policy(model, tok, tmp_path)
    path = tmp_path / "generation_config.json"
    knobs = {"do_sample": True, "min_p": 1.0, "repetition_penalty": 1.3, "top_k": 20}
    path.write_text(json.dumps(json.loads(path.read_text()) | knobs))
    loaded, loaded_tok = load_policy(tmp_path)
    plain, shipped = draw(model, tok, seed=5), draw(loaded, loaded_tok, seed=5)
    assert torch.equal(plain.response_ids, shipped.response_ids)


@pytest.fixture
def generate_calls(monkeypatch):
    """The number of sequences of each generate call sample() makes."""
    calls: list[int] = []
    real = hf._generate

    def spy(model, tokenizer, prompts, *args):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args)

    monkeypatch.setattr(hf, "_generate", spy)
    return calls


@pytest.mark.parametrize(("hf_batch_size", "calls"), [(None, [16]), (6, [6, 6, 4])])
def test_rollout_generates_hf_batch_size_sequences_at_a_time(
    tiny_policy, generate_calls, hf_batch_size, calls
):
    model, tok = tiny_policy
    cfg = RolloutConfig(max_new_tokens=MAX_NEW, hf_batch_size=hf_batch_size)
    torch.manual_seed(0)
    batch = rollout(cfg, model, tok, PROMPTS, n=N)
    assert generate_calls == calls
    assert batch.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(N)]
    assert batch.response_ids.shape[1] <= MAX_NEW
    assert_close(
        batch.logprobs, sequence_logprobs(model, batch, cfg.temperature), atol=1e-4, rtol=0
    )


def test_evaluate_policy_chunks_by_its_batch_size(tiny_policy, generate_calls):
    from npo.config import ArithmeticTaskConfig
    from npo.steps.evaluate import evaluate_policy
    from npo.tasks import make_task

    model, tok = tiny_policy
    task = make_task(ArithmeticTaskConfig(digits=2, n_train=4, n_eval=10))
    problems = task.eval_problems()
    whole = evaluate_policy(model, tok, task, problems, MAX_NEW)  # None: 512 at a time
    parts = evaluate_policy(model, tok, task, problems, MAX_NEW, batch_size=4)
    assert generate_calls == [10, 4, 4, 2]
    assert parts == pytest.approx(whole)


def test_sample_needs_a_prompt(tiny_policy):
    model, tok = tiny_policy
    with pytest.raises(ValueError, match="at least one prompt"):
        sample(model, tok, [])


# --------------------------------------------------------------------------- ppo_update
def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_zero_advantages_leave_the_parameters_unchanged(tiny_policy):
    model, tok = tiny_policy
    batch = draw(model, tok)
    before = snapshot(model)
    algo = AlgoConfig(lr=1e-2, weight_decay=0.0, ppo_epochs=2, minibatches=2)
    opt = torch.optim.AdamW(model.parameters(), lr=algo.lr, weight_decay=algo.weight_decay)
    metrics = ppo_update(model, opt, batch, torch.zeros(len(batch)), algo, temperature=1.0)
    after = snapshot(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert metrics["actor/pg_loss"] == 0.0
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert metrics["actor/entropy"] > 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_on_one_sequence_moves_its_logprob(tiny_policy, sign):
    model, tok = tiny_policy
    temperature = 1.0
    batch = draw(model, tok, temperature)
    row = max(range(len(batch)), key=lambda i: lengths(batch)[i])
    advantages = torch.zeros(len(batch))
    advantages[row] = sign
    algo = AlgoConfig(lr=1e-2, weight_decay=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=algo.lr, weight_decay=algo.weight_decay)
    before = sequence_logprobs(model, batch, temperature)[row].sum()
    for _ in range(3):
        metrics = ppo_update(model, opt, batch, advantages, algo, temperature)
        assert metrics["actor/grad_norm"] > 0
    after = sequence_logprobs(model, batch, temperature)[row].sum()
    assert sign * (after - before) > 0.1, (before, after)
