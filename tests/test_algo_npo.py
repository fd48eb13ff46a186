"""Hand-checked numbers for npo.algo.npo: gate, mixed rewards and advantages, π_old of the
guide slot, LUFFY shaping, guide-row metrics.

Run: .venv/bin/python -m pytest tests/test_algo_npo.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from npo.algo import (
    compute_advantages,
    guidance_gate,
    luffy_shaped_loss,
    mix_group_rewards,
    offpolicy_stats,
    old_logprobs_for_mix,
    pass_rates,
    policy_loss,
)

torch.set_num_threads(1)
EPS = 1e-6


# --------------------------------------------------------------------------- pass rate + gate
def test_pass_rates_mean_per_group():
    rewards = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    # 3/5, 0/5, 5/5; ints accepted, result float
    assert_close(pass_rates(rewards), torch.tensor([0.6, 0.0, 1.0]))
    assert_close(pass_rates(torch.tensor([[0.5, 1.0]])), torch.tensor([0.75]))
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        pass_rates(torch.zeros(4))


def test_guidance_gate_truth_table_at_paper_threshold():
    p = torch.tensor([0.0, 0.59, 0.6, 0.61, 1.0, 0.0, 0.6])
    has = torch.tensor([True, True, True, True, True, False, False])
    # strictly below 0.6 AND cached: 0.6 exactly is not gated; no cache -> never gated
    expected = torch.tensor([True, True, False, False, False, False, False])
    assert torch.equal(guidance_gate(p, has, 0.6), expected)


def test_guidance_gate_boundary_from_counted_pass_rate():
    # 3 of 5 correct = 0.6 exactly as computed by pass_rates -> not gated; 2 of 5 -> gated
    rates = pass_rates(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]))
    assert guidance_gate(rates, torch.tensor([True, True]), 0.6).tolist() == [False, True]


def test_guidance_gate_luffy_like_and_disabled():
    p = torch.tensor([0.0, 0.5, 1.0])
    has = torch.tensor([True, True, True])
    assert guidance_gate(p, has, 1.01).tolist() == [True, True, True]  # always when cached
    assert guidance_gate(p, has, 1.0).tolist() == [True, True, False]  # fully solved skipped
    assert guidance_gate(p, has, 0.0).tolist() == [False, False, False]
    assert guidance_gate(p, torch.tensor([1, 0, 1]), 1.01).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="has_guide"):
        guidance_gate(p, torch.tensor([True, True]), 0.6)


# --------------------------------------------------------------------------- mixed rewards
def test_mix_group_rewards_only_last_slot_of_replaced_groups():
    rewards = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    before = rewards.clone()
    got = mix_group_rewards(rewards, torch.tensor([True, False, True]))
    expected = torch.tensor([[0.0, 0, 0, 1], [1, 0, 1, 0], [0, 0, 0, 1]])
    assert torch.equal(got, expected)
    assert got.dtype == torch.float32
    assert torch.equal(rewards, before)  # input untouched


def test_mix_group_rewards_per_group_guide_reward():
    rewards = torch.zeros(3, 2)
    got = mix_group_rewards(rewards, torch.tensor([True, True, False]), torch.tensor([1, 0.5, 9]))
    # group 2 is not replaced, so its guide reward 9 is ignored
    assert torch.equal(got, torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.0, 0.0]]))


def test_mix_group_rewards_shape_errors():
    with pytest.raises(ValueError, match="replace"):
        mix_group_rewards(torch.zeros(3, 4), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="guide_reward"):
        mix_group_rewards(torch.zeros(3, 4), torch.ones(3, dtype=torch.bool), torch.ones(2))


def test_mixed_group_restores_grpo_signal():
    # 7 on-policy failures + the guide in slot 8: r = [0]*7 + [1]
    # mean 1/8; unbiased var = (7·(1/8)² + (7/8)²)/7 = (7/64 + 49/64)/7 = 1/8 → std = 1/√8
    # guide A = (7/8)/(1/√8 + eps) = 7/√8 ≈ 2.4749; on-policy A = -(1/8)·√8 ≈ -0.35355
    rewards = torch.zeros(2, 8)
    gate = guidance_gate(pass_rates(rewards), torch.tensor([True, False]), 0.6)
    adv = compute_advantages("grpo", mix_group_rewards(rewards, gate))
    std = 1 / math.sqrt(8)
    assert adv[0, -1].item() == pytest.approx((7 / 8) / (std + EPS), rel=1e-6)
    assert adv[0, -1].item() == pytest.approx(2.474874, abs=1e-5)
    assert_close(adv[0, :-1], torch.full((7,), -(1 / 8) / (std + EPS)))
    assert torch.equal(adv[1], torch.zeros(8))  # no cache: all-wrong group keeps A = 0


# --------------------------------------------------------------------------- π_old of the mix
def _mix_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    current = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    behaviour = torch.tensor([[-5.0, -5.0], [-3.0, -3.0]])
    return current, behaviour, torch.tensor([False, True])


def test_old_logprobs_for_mix_with_is_uses_behaviour_on_guide_rows():
    current, behaviour, off = _mix_inputs()
    got = old_logprobs_for_mix(current, behaviour, off, importance_sampling=True)
    assert torch.equal(got, torch.tensor([[-1.0, -1.0], [-3.0, -3.0]]))  # row 0 stays current
    assert not got.requires_grad


def test_old_logprobs_for_mix_without_is_is_current_everywhere():
    current, behaviour, off = _mix_inputs()
    got = old_logprobs_for_mix(current, behaviour, off, importance_sampling=False)
    assert torch.equal(got, current.detach())
    assert not got.requires_grad


def test_old_logprobs_for_mix_ratio_in_policy_loss():
    # guide row: logp = -2, guide logp = -3 -> IS ratio e ≈ 2.718, clipped at 1.28 for A = 1
    current, behaviour, off = _mix_inputs()
    logp = current.detach().clone()
    adv, mask = torch.tensor([0.0, 1.0]), torch.ones(2, 2)
    old_is = old_logprobs_for_mix(current, behaviour, off, importance_sampling=True)
    loss_is, m_is = policy_loss(logp, old_is, adv, mask, 0.2, 0.28)
    assert loss_is.item() == pytest.approx(-1.28 * 2 / 4)  # 2 guide tokens at -1.28, 2 at 0
    assert m_is["actor/ratio_max"] == pytest.approx(math.e, rel=1e-5)
    old_no = old_logprobs_for_mix(current, behaviour, off, importance_sampling=False)
    loss_no, m_no = policy_loss(logp, old_no, adv, mask, 0.2, 0.28)
    assert loss_no.item() == pytest.approx(-1.0 * 2 / 4)  # ratio 1 everywhere
    assert m_no["actor/ratio_max"] == pytest.approx(1.0)


def test_old_logprobs_for_mix_shape_errors():
    current, behaviour, off = _mix_inputs()
    with pytest.raises(ValueError, match="behaviour"):
        old_logprobs_for_mix(current, behaviour[:, :1], off, importance_sampling=True)
    with pytest.raises(ValueError, match="is_offpolicy"):
        old_logprobs_for_mix(current, behaviour, torch.tensor([True]), importance_sampling=True)


# --------------------------------------------------------------------------- LUFFY shaping
def test_luffy_shaped_loss_value_and_gradient():
    # w = 0.5: f = .5/.6 = 0.8333, A = 2 -> loss -1.6667; grad -A·γ·w/(w+γ)² = -2·.1·.5/.36
    # w = 0.1: f = .1/.2 = 0.5 -> loss -1.0; grad -2·.1·.1/.04 = -0.5 (larger: low-prob token)
    # third token masked: loss 0, grad 0, even with a huge logp there
    logp = torch.tensor([[math.log(0.5), math.log(0.1), 1e4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = luffy_shaped_loss(logp, torch.tensor([2.0]), mask, gamma=0.1)
    assert_close(loss, torch.tensor([[-2 * 0.5 / 0.6, -1.0, 0.0]]))
    loss.sum().backward()
    assert_close(logp.grad, torch.tensor([[-2 * 0.1 * 0.5 / 0.36, -0.5, 0.0]]))
    assert logp.grad[0, 0].item() == pytest.approx(-0.277778, abs=1e-5)


def test_luffy_shaped_loss_per_token_advantages_and_errors():
    logp = torch.log(torch.tensor([[0.9, 0.9]]))
    got = luffy_shaped_loss(logp, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), gamma=0.1)
    assert_close(got, torch.tensor([[-0.9, 0.9]]))  # f(.9) = .9/1.0
    with pytest.raises(ValueError, match="gamma"):
        luffy_shaped_loss(logp, torch.tensor([1.0]), torch.ones(1, 2), gamma=0.0)
    with pytest.raises(ValueError, match="advantages"):
        luffy_shaped_loss(logp, torch.ones(1, 1), torch.ones(1, 2))


# --------------------------------------------------------------------------- guide metrics
def test_offpolicy_stats_guide_tokens_only():
    # row 0 on-policy (ratio 10, excluded); row 1 guide, second token masked (garbage);
    # row 2 guide. Guide tokens: ratios 2, 1, .5 -> mean 3.5/3, max 2, min .5;
    # advantages per token 1, -2, -2 -> mean -1; logp -1, -2, -3 -> mean -2
    logp = torch.tensor([[0.0, 0.0], [-1.0, 100.0], [-2.0, -3.0]])
    ratio = torch.tensor([[10.0, 10.0], [2.0, 1e30], [1.0, 0.5]])
    old = logp - torch.log(ratio)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    off = torch.tensor([False, True, True])
    got = offpolicy_stats(logp, old, torch.tensor([5.0, 1.0, -2.0]), mask, off)
    assert got == pytest.approx(
        {
            "npo/guide_adv_mean": -1.0,
            "npo/guide_ratio_mean": 3.5 / 3,
            "npo/guide_ratio_max": 2.0,
            "npo/guide_ratio_min": 0.5,
            "npo/guide_logp_mean": -2.0,
        },
        rel=1e-5,
    )
    assert all(isinstance(v, float) for v in got.values())
    # guide ratios all above 1 (2 and 4): min is 2, never a non-guide token's ratio
    old2 = logp - torch.log(torch.tensor([[1.0, 1.0], [2.0, 1.0], [4.0, 4.0]]))
    assert offpolicy_stats(logp, old2, torch.zeros(3), mask, off)["npo/guide_ratio_min"] == (
        pytest.approx(2.0)
    )


def test_offpolicy_stats_empty_without_guide_tokens():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    adv = torch.ones(2)
    assert offpolicy_stats(logp, logp, adv, mask, torch.tensor([False, False])) == {}
    # a guide row with no response token is empty too
    row_mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert offpolicy_stats(logp, logp, adv, row_mask, torch.tensor([False, True])) == {}


def test_policy_loss_shaped_rows_use_luffy_objective() -> None:
    from npo.algo import policy_loss
    from npo.config import LossAgg

    # Row 0: PPO token with ratio 1 and A=1 -> loss -1. Row 1: teacher token with
    # pi = 0.5, A = 2, gamma = 0.1 -> loss -2 * 0.5 / 0.6. Token-mean over the 2 tokens.
    logp = torch.log(torch.tensor([[0.3], [0.5]])).requires_grad_()
    old = logp.detach().clone()
    adv = torch.tensor([1.0, 2.0])
    mask = torch.ones(2, 1)
    loss, m = policy_loss(
        logp,
        old,
        adv,
        mask,
        0.2,
        0.28,
        LossAgg.token_mean,
        shaped_rows=torch.tensor([False, True]),
        shaping_gamma=0.1,
    )
    assert loss.item() == pytest.approx((-1.0 - 2 * 0.5 / 0.6) / 2)
    loss.backward()
    # d/dlogp of -A w/(w+g) = -A g w/(w+g)^2, halved by the token-mean
    assert logp.grad[1, 0].item() == pytest.approx(-2 * 0.1 * 0.5 / 0.6**2 / 2)
    assert logp.grad[0, 0].item() == pytest.approx(-1.0 / 2)
    assert m["actor/ratio_mean"] == pytest.approx(1.0)  # ratio stats: the PPO row only
