"""Small pieces of the training loop: data order, seeding, step metrics, SFT targets."""

from __future__ import annotations

import torch

from npo.config import ArithmeticTaskConfig
from npo.policy import build_char_tokenizer
from npo.rollout import RolloutBatch
from npo.steps.train_segment import rollout_metrics
from npo.tasks import make_task
from npo.training.seeding import batch_indices, derive_seed
from npo.training.sft import encode_targets


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


def test_rollout_metrics_hand_values() -> None:
    eos = 2
    # 2 prompts x 2 samples; row 3 never emits EOS (truncated at R=3).
    ids = torch.tensor([[5, 2, 0], [5, 6, 2], [5, 2, 0], [5, 6, 7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    batch = RolloutBatch(
        prompt_ids=torch.ones(4, 2, dtype=torch.long),
        prompt_mask=torch.ones(4, 2, dtype=torch.long),
        response_ids=ids,
        response_mask=mask,
        logprobs=torch.zeros(4, 3),
        texts=["a", "b", "c", "d"],
        prompt_index=torch.tensor([0, 0, 1, 1]),
    )
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    m = rollout_metrics(rewards, batch, eos)
    assert m["reward/mean"] == 0.75
    assert m["reward/pass_at_g"] == 1.0
    assert m["reward/all_correct_frac"] == 0.5
    assert m["reward/zero_var_frac"] == 0.5
    assert m["response/length_mean"] == 2.5
    assert m["response/truncated_frac"] == 0.25


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
