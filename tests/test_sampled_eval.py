"""The sampled eval (train.eval_samples): k seeded samples per eval prompt, their mean reward
(eval/mean_at_k) and the share of prompts with a correct one (eval/pass_at_k)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from npo.config import ArithmeticTaskConfig, ExperimentConfig
from npo.rollout import sample
from npo.steps.evaluate import eval_settings, evaluate_policy, sampled_eval_seeds
from npo.tasks import Problem, Verdict, make_task

MAX_NEW = 4
K = 6


class FirstDigitOdd:
    """The arithmetic task's prompts, graded by a rule the random tiny policy meets about
    half the time: the response's first character is an odd digit."""

    def __init__(self) -> None:
        self.inner = make_task(ArithmeticTaskConfig(digits=2, n_train=4, n_eval=12))

    def eval_problems(self) -> list[Problem]:
        return self.inner.eval_problems()

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
        return [Verdict(float(r[:1] in "13579" and r[:1] != ""), "rule") for r in responses]


def test_mean_and_pass_at_k_are_the_seeded_samples_rewards(tiny_policy):
    model, tok = tiny_policy
    task = FirstDigitOdd()
    problems = task.eval_problems()
    got = evaluate_policy(model, tok, task, problems, MAX_NEW, samples=K, seed=3)

    # the same k samples drawn directly, graded by hand
    batch = sample(
        model, tok, [p.prompt for p in problems], n=K, temperature=1.0,
        max_new_tokens=MAX_NEW, seeds=sampled_eval_seeds(problems, 3),
    )  # fmt: skip
    rewards = [float(t[:1] in "13579" and t[:1] != "") for t in batch.texts]
    groups = [rewards[i * K : (i + 1) * K] for i in range(len(problems))]
    assert got["eval/mean_at_k"] == pytest.approx(sum(rewards) / len(rewards))
    assert got["eval/pass_at_k"] == pytest.approx(sum(max(g) for g in groups) / len(groups))
    assert 0 < got["eval/mean_at_k"] < got["eval/pass_at_k"] <= 1  # the rule is met sometimes

    # the same at every eval of the run; another seed draws other samples
    assert evaluate_policy(model, tok, task, problems, MAX_NEW, samples=K, seed=3) == got
    other = evaluate_policy(model, tok, task, problems, MAX_NEW, samples=K, seed=4)
    assert other["eval/mean_at_k"] != got["eval/mean_at_k"]
    assert other["eval/accuracy"] == got["eval/accuracy"]  # greedy is unchanged


def test_a_problem_draws_the_same_samples_in_any_share(tiny_policy):
    """Seeds follow the problem's id, so a rank's share (or train.eval_size) changes nothing."""
    model, tok = tiny_policy
    task = FirstDigitOdd()
    problems = task.eval_problems()
    whole = evaluate_policy(model, tok, task, problems, MAX_NEW, samples=K, seed=0)
    parts = [
        evaluate_policy(model, tok, task, share, MAX_NEW, samples=K, seed=0, batch_size=K * 2)
        for share in (problems[:5], problems[5:])
    ]
    mean = (5 * parts[0]["eval/mean_at_k"] + 7 * parts[1]["eval/mean_at_k"]) / 12
    assert mean == pytest.approx(whole["eval/mean_at_k"])


def test_greedy_only_by_default_and_the_run_settings_carry_k():
    cfg = ExperimentConfig()
    assert eval_settings(cfg)["samples"] == 0
    cfg = ExperimentConfig.model_validate({"train": {"eval_samples": 8}, "seed": 5})
    settings = eval_settings(cfg)
    assert (settings["samples"], settings["seed"], settings["temperature"]) == (8, 5, 1.0)


@pytest.mark.slow
def test_a_run_logs_mean_at_k_at_every_eval_and_summarizes_it(tmp_path):
    from helpers import write_tiny_config

    from npo.config import load_config
    from npo.experiment import run_experiment
    from npo.report import load_history

    cfg = load_config(
        write_tiny_config(
            tmp_path / "c.yaml", tmp_path / "runs", "k", 6,
            train={"eval_samples": 3}, tracking={"enabled": False},
        )
    )  # fmt: skip
    summary = run_experiment(cfg)
    rows = load_history(tmp_path / "runs" / "k" / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0 <= r["eval/mean_at_k"] <= r["eval/pass_at_k"] <= 1 for r in evals)
    assert summary["start mean@k (sampled pass@1)"] == evals[0]["eval/mean_at_k"]
    assert summary["final mean@k (sampled pass@1)"] == evals[-1]["eval/mean_at_k"]
