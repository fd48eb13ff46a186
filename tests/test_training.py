"""Small pieces of the training loop: data order, seeding, step metrics, SFT targets, and
micro-batched updates (PPO and SFT) against the whole-minibatch ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from npo.config import AlgoConfig, ArithmeticTaskConfig, LossAgg
from npo.policy.tokenizer import build_char_tokenizer
from npo.rollout import RolloutBatch, sample
from npo.steps.train_segment import rollout_metrics
from npo.tasks import make_task
from npo.training import forward, rl_step
from npo.training.rl_step import agg_denominator, ppo_update, sequence_logprobs
from npo.training.seeding import batch_indices, derive_seed
from npo.training.sft import encode_targets, sft_step


def test_batch_indices_walk_epochs_without_repeats() -> None:
    n, per_step = 10, 4
    first_epoch = [i for s in range(2) for i in batch_indices(n, per_step, s, seed=3)]
    first_epoch += batch_indices(n, per_step, 2, seed=3)[:2]  # step 2 crosses the boundary
    assert sorted(first_epoch) == list(range(n))
    assert batch_indices(n, per_step, 5, seed=3) == batch_indices(n, per_step, 5, seed=3)
    assert batch_indices(n, per_step, 0, seed=3) != batch_indices(n, per_step, 0, seed=4)


def test_derive_seed_is_stable_and_separates_streams() -> None:
    assert derive_seed(0, 1) == derive_seed(0, 1)
    seeds = {derive_seed(0, s, k) for s in range(50) for k in range(3)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**63 for s in seeds)


def _two_groups_of_two(ids: torch.Tensor, mask: torch.Tensor) -> RolloutBatch:
    """2 prompts x 2 samples with these responses [4, 3]."""
    return RolloutBatch(
        prompt_ids=torch.ones(4, 2, dtype=torch.long),
        prompt_mask=torch.ones(4, 2, dtype=torch.long),
        response_ids=ids,
        response_mask=mask,
        logprobs=torch.zeros(4, 3),
        texts=["a", "b", "c", "d"],
        prompt_index=torch.tensor([0, 0, 1, 1]),
    )


def test_rollout_metrics_hand_values() -> None:
    eos = 2
    # 2 prompts x 2 samples; row 3 never emits EOS (truncated at R=3).
    ids = torch.tensor([[5, 2, 0], [5, 6, 2], [5, 2, 0], [5, 6, 7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    batch = _two_groups_of_two(ids, mask)
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    m = rollout_metrics(rewards, batch, [eos])
    assert m["reward/mean"] == 0.75
    assert m["reward/pass_at_g"] == 1.0
    assert m["reward/all_correct_frac"] == 0.5
    assert m["reward/zero_var_frac"] == 0.5
    assert m["response/length_mean"] == 2.5
    assert m["response/truncated_frac"] == 0.25


def test_rollout_metrics_count_any_stop_id_as_an_end() -> None:
    # Stop ids [2, 7]: row 0 ends at the second stop id, row 1 at EOS, rows 2-3 run to R=3;
    # row 3's 7 lies outside its mask, so it does not count.
    ids = torch.tensor([[5, 7, 0], [5, 6, 2], [5, 6, 8], [5, 6, 7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    batch = _two_groups_of_two(ids, mask)
    rewards = torch.zeros(2, 2)
    assert rollout_metrics(rewards, batch, [2, 7])["response/truncated_frac"] == 0.5
    assert rollout_metrics(rewards, batch, [2])["response/truncated_frac"] == 0.75


def test_sft_targets_end_with_eos_and_mask_only_the_target() -> None:
    task = make_task(ArithmeticTaskConfig(digits=2, n_train=4, n_eval=2))
    tok = build_char_tokenizer(task.alphabet())
    problems = task.train_problems()[:2]
    batch = encode_targets(tok, problems)
    for row, p in enumerate(problems):
        n = len(p.target) + 1
        assert int(batch["response_mask"][row].sum()) == n
        ids = batch["response_ids"][row, :n].tolist()
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == p.target
    assert batch["prompt_ids"][:, 0].tolist() == [tok.bos_token_id] * 2


# --------------------------------------------------------------------------- micro-batches
def test_agg_denominator_is_what_agg_loss_divides_by() -> None:
    from npo.algo import agg_loss

    values = torch.tensor([[1.0, 2.0, 9.0], [5.0, 5.0, 5.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    # token-mean: (1 + 2 + 4) / 3 tokens; seq-mean-token-mean: (1.5 + 4) / 2 sequences
    assert agg_denominator(mask, LossAgg.token_mean) == 3
    assert agg_denominator(mask, LossAgg.seq_mean_token_mean) == 2
    assert agg_loss(values, mask, LossAgg.token_mean).item() == pytest.approx(7 / 3)
    assert agg_loss(values, mask, LossAgg.seq_mean_token_mean).item() == pytest.approx(5.5 / 2)


@pytest.fixture
def scored_batch(tiny_policy):
    """(model, ref model, batch, advantages, old log-probs): 12 responses of mixed lengths,
    one of them emptied (no valid token), old log-probs off-policy enough that some clip."""
    model, tok = tiny_policy
    torch.manual_seed(0)
    batch = sample(model, tok, ["12+3=", "1+1=", "999+999=", "7="], n=3, max_new_tokens=8)
    batch.response_mask[4] = 0
    batch.logprobs[4] = 0
    gen = torch.Generator().manual_seed(1)
    noise = 0.5 * torch.randn(batch.logprobs.shape, generator=gen)
    old = (sequence_logprobs(model, batch, 1.0) + noise) * batch.response_mask
    advantages = torch.randn(len(batch), generator=gen)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    assert len(set(batch.response_mask.sum(dim=1).tolist())) >= 3, "lengths must differ"
    return model, ref, batch, advantages, old


def _update(scored_batch, micro: int | None, agg: LossAgg, shaped: bool):
    model, ref, batch, advantages, old = scored_batch
    model = copy.deepcopy(model)
    algo = AlgoConfig(
        loss_agg=agg,
        kl_coef=0.1,
        entropy_coef=0.01,
        ppo_epochs=2,
        minibatches=2,  # 6 rows each
        micro_batch_size=micro,
        max_grad_norm=0.5,
    )
    # SGD, not AdamW: Adam's first step is ~lr·sign(grad), blind to how grads are scaled.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = torch.tensor([i % 3 == 0 for i in range(len(batch))]) if shaped else None
    metrics = ppo_update(
        model,
        opt,
        batch,
        advantages,
        algo,
        temperature=1.0,
        ref_model=ref,
        old_logprobs=old,
        generator=torch.Generator().manual_seed(7),
        shaped_rows=rows,
    )
    return {k: v.detach().clone() for k, v in model.named_parameters()}, metrics


@pytest.mark.parametrize("agg", [LossAgg.token_mean, LossAgg.seq_mean_token_mean])
@pytest.mark.parametrize("shaped", [False, True], ids=["ppo", "shaped"])
@pytest.mark.parametrize("micro", [1, 4])
def test_micro_batches_give_the_whole_minibatch_update(scored_batch, agg, shaped, micro):
    # micro 4 splits each 6-row minibatch 4 + 2; micro 1 gives the empty row a part of its own
    whole_params, whole = _update(scored_batch, None, agg, shaped)
    parts_params, parts = _update(scored_batch, micro, agg, shaped)
    before = {k: v.detach() for k, v in scored_batch[0].named_parameters()}
    moved = max(float((whole_params[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3, "the update must move the weights for the comparison to mean much"
    for k in whole_params:
        assert_close(parts_params[k], whole_params[k], atol=1e-6, rtol=1e-5, msg=k)
    assert sorted(parts) == sorted(whole)
    assert {"actor/kl_ref", "actor/entropy", "actor/pg_clipfrac"} <= set(whole)
    assert whole["actor/pg_clipfrac"] > 0 and whole["actor/kl_ref"] > 0
    for k, v in whole.items():
        assert parts[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_one_micro_batch_is_bit_identical_to_none(scored_batch):
    whole_params, whole = _update(scored_batch, None, LossAgg.token_mean, True)
    big_params, big = _update(scored_batch, 64, LossAgg.token_mean, True)
    assert all(torch.equal(big_params[k], whole_params[k]) for k in whole_params)
    assert big == whole


@pytest.mark.parametrize("micro", [None, 4])
def test_one_update_takes_the_old_logprobs_from_its_own_forward(scored_batch, monkeypatch, micro):
    """ppo_epochs = minibatches = 1: the same update as with the recomputed old log-probs
    passed in, and no separate no-grad pass over the batch."""
    model, _, batch, advantages, _ = scored_batch
    algo = AlgoConfig(micro_batch_size=micro, entropy_coef=0.01)

    def run(old):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        metrics = ppo_update(m, opt, batch, advantages, algo, 1.0, old_logprobs=old)
        return {k: v.detach().clone() for k, v in m.named_parameters()}, metrics

    given_params, given = run(sequence_logprobs(model, batch, 1.0))
    calls: list[int] = []
    forward = rl_step._forward
    monkeypatch.setattr(rl_step, "_forward", lambda m, b: calls.append(len(b)) or forward(m, b))
    own_params, own = run(None)
    assert sum(calls) == len(batch)  # each row forwarded once: the update's own pass
    for k in given_params:
        assert_close(own_params[k], given_params[k], atol=1e-7, rtol=1e-6, msg=k)
    assert own["actor/ratio_mean"] == pytest.approx(1.0) and own["actor/pg_clipfrac"] == 0
    for k, v in given.items():
        assert own[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def _update_with_idle_rows(scored_batch, monkeypatch, zero_rows, skip: bool, micro=None):
    """Two AdamW updates (a real one, then one with `zero_rows`' advantages set to 0), with
    or without the zero-advantage rows' backward skipped; returns (params, metrics, grads
    enabled per forwarded row count)."""
    model, _, batch, advantages, old = scored_batch
    model = copy.deepcopy(model)
    advantages = advantages.clone()
    advantages[zero_rows] = 0
    algo = AlgoConfig(ppo_epochs=2, minibatches=2, micro_batch_size=micro, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=algo.weight_decay)
    shaped = torch.tensor([i % 4 == 1 for i in range(len(batch))])
    ppo_update(
        model,
        opt,
        batch,
        torch.ones(len(batch)),
        algo,
        1.0,
        old_logprobs=old,
        generator=torch.Generator().manual_seed(2),
    )
    if not skip:
        monkeypatch.setattr(
            rl_step, "rows_without_gradient", lambda a, _: torch.zeros_like(a, dtype=torch.bool)
        )
    grads: list[tuple[int, bool]] = []
    forward = rl_step._forward
    monkeypatch.setattr(
        rl_step,
        "_forward",
        lambda m, b: grads.append((len(b), torch.is_grad_enabled())) or forward(m, b),
    )
    metrics = ppo_update(
        model,
        opt,
        batch,
        advantages,
        algo,
        1.0,
        old_logprobs=old,
        generator=torch.Generator().manual_seed(3),
        shaped_rows=shaped,
    )
    monkeypatch.undo()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, metrics, grads


@pytest.mark.parametrize("micro", [None, 2])
def test_zero_advantage_rows_skip_their_backward_and_change_nothing(
    scored_batch, monkeypatch, micro
):
    zero = torch.tensor([i % 3 != 1 for i in range(len(scored_batch[2]))])  # 8 of 12 rows
    full_params, full, full_grads = _update_with_idle_rows(
        scored_batch, monkeypatch, zero, False, micro
    )
    skip_params, skip, skip_grads = _update_with_idle_rows(
        scored_batch, monkeypatch, zero, True, micro
    )
    # every row is still forwarded once per epoch, but only the 4 nonzero ones with autograd
    assert sum(n for n, _ in full_grads) == sum(n for n, _ in skip_grads) == 2 * 12
    assert all(g for _, g in full_grads)
    assert sum(n for n, g in skip_grads if g) == 2 * 4
    for k in full_params:
        assert_close(skip_params[k], full_params[k], atol=1e-6, rtol=1e-5, msg=k)
    assert sorted(skip) == sorted(full)
    assert full["actor/pg_clipfrac"] > 0 and full["actor/entropy"] > 0
    for k, v in full.items():
        assert skip[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_all_zero_advantages_still_take_the_optimizers_step(scored_batch, monkeypatch):
    """No backward at all, yet AdamW steps on a zero gradient (momentum and weight decay
    move the weights) exactly as after a backward of zeros."""
    everything = torch.ones(len(scored_batch[2]), dtype=torch.bool)
    before = {k: v.detach().clone() for k, v in scored_batch[0].named_parameters()}
    full_params, full, _ = _update_with_idle_rows(scored_batch, monkeypatch, everything, False)
    skip_params, skip, grads = _update_with_idle_rows(scored_batch, monkeypatch, everything, True)
    assert not any(g for _, g in grads)
    assert skip["actor/grad_norm"] == full["actor/grad_norm"] == 0
    moved = max(float((full_params[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3
    for k in full_params:
        assert_close(skip_params[k], full_params[k], atol=1e-7, rtol=1e-6, msg=k)
    for k, v in full.items():
        assert skip[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_each_micro_batch_is_forwarded_at_its_own_width(scored_batch, monkeypatch):
    """Trailing padding no row of a micro-batch uses is not computed (batch.trimmed)."""
    widths: list[int] = []
    forward = rl_step._forward

    def recording(model, batch):
        if model is not ref:  # the reference model's log-probs are recorded apart
            widths.append(batch.response_ids.shape[1])
        return forward(model, batch)

    ref = scored_batch[1]
    monkeypatch.setattr(rl_step, "_forward", recording)
    _update(scored_batch, 1, LossAgg.token_mean, False)
    lengths = scored_batch[2].response_mask.sum(dim=1)
    full = scored_batch[2].response_ids.shape[1]
    updates = widths
    assert len(updates) == 2 * len(lengths)  # 2 epochs, one row per micro-batch
    assert sorted(set(updates)) == sorted({max(int(n), 1) for n in lengths})
    assert min(updates) < full


def test_sequence_logprobs_in_chunks(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(0)
    batch = sample(model, tok, ["12+3=", "1+1=", "999+999="], n=3, max_new_tokens=6)
    assert_close(
        sequence_logprobs(model, batch, 0.7, chunk=2),
        sequence_logprobs(model, batch, 0.7),
        atol=1e-6,
        rtol=1e-6,  # chunks of 2 cut the groups of 3: some prompt passes are shared, some not
    )


def test_micro_batched_sft_step_equals_the_whole_batch(tiny_policy):
    model, tok = tiny_policy
    task = make_task(ArithmeticTaskConfig(digits=3, n_train=16, n_eval=2))
    problems = task.train_problems()[:7]  # targets of 3 and 4 digits: uneven token counts
    results = []
    for micro in (None, 3):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        metrics = sft_step(m, opt, tok, problems, max_grad_norm=0.5, micro_batch_size=micro)
        results.append(({k: v.detach() for k, v in m.named_parameters()}, metrics))
    (whole_params, whole), (parts_params, parts) = results
    for k in whole_params:
        assert_close(parts_params[k], whole_params[k], atol=1e-6, rtol=1e-5, msg=k)
    assert parts["sft/loss"] == pytest.approx(whole["sft/loss"], rel=1e-6)
    assert parts["sft/grad_norm"] == pytest.approx(whole["sft/grad_norm"], rel=1e-5)


def test_rows_that_share_a_prompt_share_its_pass(tiny_policy, monkeypatch):
    """The logits and gradients of the shared-prompt pass are those of whole sequences, and
    each distinct prompt is run once."""
    model, tok = tiny_policy
    torch.manual_seed(0)
    batch = sample(model, tok, ["12+3=", "1+1=", "999+999=", "7="], n=3, max_new_tokens=8)
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    on = batch.response_mask.bool()
    assert (batch.prompt_mask == 0).any() and len(set(on.sum(1).tolist())) > 1

    def grads(logits):
        picked = logits.log_softmax(-1).gather(-1, batch.response_ids[..., None])[..., 0]
        return torch.autograd.grad(picked[on].sum(), list(model.parameters()))

    seen: list[tuple[int, ...]] = []
    real = model.forward
    monkeypatch.setattr(
        model, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or real(**kw)
    )
    shared = forward.response_logits(model, *args)
    assert seen == [(4, batch.prompt_ids.shape[1]), (12, batch.response_ids.shape[1] - 1)]
    whole = forward._whole_pass(model, *args)
    assert_close(shared[on], whole[on], atol=1e-5, rtol=0)
    for a, b in zip(grads(shared), grads(whole), strict=True):
        assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The check has teeth: rows given one another's prompt caches get other logits.
    wrong = forward._shared_prompt_pass(
        model,
        (batch.prompt_ids[::3], batch.prompt_mask[::3]),
        torch.arange(len(batch)).flip(0) // 3,
        batch.response_ids,
        batch.response_mask,
    )
    assert (wrong[on] - whole[on]).abs().max() > 1e-2
