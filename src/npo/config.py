"""The experiment config: one validated pydantic model, loaded from YAML.

Every field is documented once, here. `load_config(path, overrides)` reads YAML (or the
embedded defaults when no path is given), applies `--set key.path=value` overrides and
validates; any error raises `ConfigError` whose message names the field.

    cfg = load_config("configs/toy_grpo.yaml", ["algo.lr=3e-4", "train.steps=50"])
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the problem."""


# What a bool, int or float field takes as is (an int is a float's whole number too).
_EXACT: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float)}
_KIND_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number"}


def _check_exact(value: Any, annotation: Any) -> None:
    """Refuse a value that pydantic's lax mode would convert into the bool, int or float
    `annotation` (also inside `X | None`, `list[X]` and `dict[str, X]`): `true` read as 1,
    "40" as 40, 1 as true, 40.0 as 40. Anything else is left to pydantic."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and isinstance(value, list):
        for item in value:
            _check_exact(item, args[0])
    elif origin is dict and isinstance(value, dict):
        for item in value.values():
            _check_exact(item, args[1])
    elif origin in (Union, UnionType):
        kinds = [a for a in args if a is not NoneType]
        if value is not None and len(kinds) == 1:
            _check_exact(value, kinds[0])
    elif annotation in _EXACT and (
        isinstance(value, bool) != (annotation is bool) or not isinstance(value, _EXACT[annotation])
    ):
        raise ValueError(f"expected {_KIND_NAMES[annotation]}, got {value!r}")


class _Strict(BaseModel):
    # No inf or nan in any float: an lr of .inf would train on garbage without a word.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _exact_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        # Written once for every field: a YAML typo (`steps: true`) must not run as 1.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            _check_exact(value, field.annotation)
        return value


# --------------------------------------------------------------------------- tasks
class AnswerFormat(StrEnum):
    plain = "plain"
    reversed = "reversed"  # least-significant digit first: learnable left-to-right


class ArithmeticTaskConfig(_Strict):
    kind: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(3, ge=1, le=9, description="Digits per operand.")
    operation: Literal["add", "sub", "mul"] = Field("add", description="Operation to learn.")
    answer_format: AnswerFormat = Field(
        AnswerFormat.reversed, description="How the answer is written in the response."
    )
    n_train: int = Field(4096, ge=1, description="Number of training prompts.")
    n_eval: int = Field(256, ge=1, description="Number of held-out eval prompts (disjoint).")
    seed: int = Field(1234, description="Seed of the prompt sets (independent of run seed).")


def _input_ref(value: str) -> str:
    """A local path, or a store URI of a kind `npo.store.inputs` fetches."""
    if not value:
        raise ValueError("empty: give a local path or a store URI (s3://bucket/key)")
    if "://" in value and value.split("://", 1)[0].lower() not in INPUT_SCHEMES:
        known = ", ".join(f"{s}://" for s in INPUT_SCHEMES)
        raise ValueError(f"{value!r}: unsupported URI scheme (known: {known}, or a local path)")
    return value


INPUT_SCHEMES = ("s3", "file")
InputRef = Annotated[
    str,
    BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v),
    AfterValidator(_input_ref),
]


class MathTaskConfig(_Strict):
    kind: Literal["math"] = "math"
    train_path: InputRef = Field(
        description="JSONL file with one {prompt, answer} per line: a local path or a store "
        "URI (s3://bucket/key, put there with `npo stage`), which every step fetches."
    )
    eval_path: InputRef = Field(
        description="JSONL file of held-out {prompt, answer} lines (a path or a store URI)."
    )
    timeout_s: float = Field(5.0, gt=0, description="Per-call timeout of math-verify.")
    batch_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time budget of grading one batch (a rollout step's responses): what is "
        "still ungraded when it is spent scores 0 as a timeout, so a batch of hard responses "
        "cannot take timeout_s each.",
    )
    prompt_template: str = Field(
        "{prompt}", description="Format string applied to each prompt; must contain {prompt}."
    )

    @model_validator(mode="after")
    def _template(self) -> MathTaskConfig:
        if "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{prompt}'")
        return self


class CountdownTaskConfig(_Strict):
    kind: Literal["countdown"] = "countdown"
    count: int = Field(3, ge=2, le=6, description="Numbers per prompt, each used once.")
    max_number: int = Field(20, ge=1, le=999, description="Numbers are drawn from 1..max_number.")
    max_target: int = Field(
        99, ge=1, le=9999, description="Targets above this are redrawn (difficulty, length)."
    )
    ops: str = Field(
        "+-*/",
        pattern=r"^[-+*/]+$",
        description="Operators the generated solutions use, e.g. '+-*' (responses may use "
        "all four).",
    )
    n_train: int = Field(4096, ge=1, description="Number of training prompts.")
    n_eval: int = Field(512, ge=1, description="Number of held-out eval prompts (disjoint).")
    seed: int = Field(1234, description="Seed of the prompt sets (independent of run seed).")

    @field_validator("ops")
    @classmethod
    def _distinct_ops(cls, ops: str) -> str:
        if len(set(ops)) != len(ops):
            raise ValueError(f"{ops!r} repeats an operator; list each once, e.g. '+-*/'")
        return ops


KIND = "kind"  # the key that picks the member of a union section (task)


def _task_kind(value: Any) -> str | None:
    """The member a task section is: its `kind`; a section without one is the default
    (arithmetic) task. A function, not Field(discriminator=...): pydantic refuses a
    `before` validator (_Strict._exact_scalars) on a discriminator field."""
    if isinstance(value, dict):
        return value.get(KIND, "arithmetic")
    return getattr(value, KIND, None)


TaskConfig = Annotated[
    Annotated[ArithmeticTaskConfig, Tag("arithmetic")]
    | Annotated[MathTaskConfig, Tag("math")]
    | Annotated[CountdownTaskConfig, Tag("countdown")],
    Discriminator(_task_kind),
]


# --------------------------------------------------------------------------- model
class TinyModelConfig(_Strict):
    hidden_size: int = Field(128, ge=8, description="Width of the built-in Llama-style model.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads (hidden_size % heads == 0).")
    intermediate_size: int = Field(512, ge=8, description="MLP width.")
    max_position: int = Field(64, ge=8, description="Longest prompt+response in tokens.")

    @model_validator(mode="after")
    def _heads(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        return self


class ModelConfig(_Strict):
    source: InputRef = Field(
        "tiny",
        description="'tiny' (built-in char-level model), a local HF model folder, or a store "
        "URI of one (s3://bucket/prefix, put there with `npo stage`), fetched by the warm-up.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Parameter dtype: what the weights are stored, updated and checkpointed "
        "in. Keep float32 for training: AdamW steps at lr ~1e-6 are below bfloat16's "
        "resolution and vanish when the weights themselves are bfloat16.",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Forward passes (training, rollouts, eval) run under torch.autocast in "
        "this dtype, and the vLLM engine samples in it; None = the parameter dtype. float32 "
        "weights + bfloat16 compute is the usual mixed precision on GPUs; prefer bfloat16 "
        "to float16, which gets no loss scaling here.",
    )

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the policy trains and samples: auto = cuda when visible."
    )
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto",
        description="The attention kernels (transformers' attn_implementation). auto = "
        "eager for the built-in tiny model, whose short sequences run faster as plain "
        "matmuls than through SDPA on CPU (a GRPO update ~25% faster), else transformers' "
        "default for the checkpoint.",
    )
    stop_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens that end a response besides the tokenizer's EOS, e.g. "
        "'<|im_end|>' when a base model gets chat-format prompts; each must be a single "
        "token of the tokenizer. The checkpoint's generation_config EOS ids also stop.",
    )

    def attn_implementation(self) -> str | None:
        """What `attention` asks transformers for (None = its default)."""
        if self.attention == "auto":
            return "eager" if self.source == "tiny" else None
        return self.attention

    @model_validator(mode="after")
    def _compute_not_wider(self) -> ModelConfig:
        # autocast only lowers precision: float32 compute over bf16 weights would be ignored
        if self.compute_dtype == "float32" and self.dtype != "float32":
            raise ValueError(
                f"compute_dtype float32 needs dtype float32 (got {self.dtype}): autocast "
                "cannot compute wider than the weights"
            )
        return self


# --------------------------------------------------------------------------- training
class WarmupConfig(_Strict):
    steps: int = Field(
        3000,
        ge=0,
        description="Most supervised steps on gold answers (0 = skip the warm-up); the "
        "3-digit toy's loss plateau ends after 900 to 2000 steps at lr 3e-4, by seed.",
    )
    batch_size: int = Field(64, ge=1, description="Prompts per supervised step.")
    lr: float = Field(
        3e-4,
        gt=0,
        description="Learning rate of the warm-up (AdamW). At 1e-3 the toy leaves its loss "
        "plateau sooner on some seeds but not within 3000 steps on others (seeds 1, 4).",
    )
    target_accuracy: float | None = Field(
        0.4,
        ge=0,
        le=1,
        description="Stop once greedy eval accuracy reaches this (None = run all steps): "
        "RL starts at the edge of competence, not at 0% or 90%.",
    )
    check_every: int = Field(20, ge=1, description="Steps between the target checks.")
    checkpoint_every: int = Field(
        200,
        ge=1,
        description="Commit the warm-up's progress every N supervised steps, so that an "
        "interrupted warm-up resumes there (where it is kept only: may change on resume).",
        json_schema_extra={"on_resume": "any"},
    )
    init_from: str | None = Field(
        None,
        description="Reuse checkpoint 0 of this run (same store) when its seed, task, model "
        "and warm-up settings equal ours: baselines share one warm-up.",
    )


class RolloutConfig(_Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Generation backend of training rollouts and guidance: hf "
        "(transformers, anywhere) or vllm (CUDA GPU, the vllm extra). Greedy evaluation uses "
        "train.eval_backend.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.5,
        gt=0,
        le=1,
        description="vllm: share of GPU memory for the engine (the rest: training).",
    )
    vllm_max_model_len: int = Field(
        2048, ge=8, description="vllm: longest prompt + response the engine reserves for."
    )
    prompts_per_step: int = Field(16, ge=1, description="Distinct prompts per policy step.")
    group_size: int = Field(8, ge=2, description="Responses sampled per prompt (G).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(8, ge=1, description="Longest response in tokens.")
    hf_batch_size: int | None = Field(
        None,
        ge=1,
        description="hf: sequences per generate call (None = the whole batch at once); "
        "bounds the KV cache's memory on a real model.",
    )


class AdvEstimator(StrEnum):
    grpo = "grpo"  # (r - mean) / (std + eps)
    drgrpo = "drgrpo"  # r - mean (Dr.GRPO: no std normalisation)


class LossAgg(StrEnum):
    token_mean = "token-mean"
    seq_mean_token_mean = "seq-mean-token-mean"


class KLEstimator(StrEnum):
    k1 = "k1"
    k3 = "k3"


class AlgoConfig(_Strict):
    adv_estimator: AdvEstimator = Field(AdvEstimator.grpo, description="Advantage estimator.")
    adv_eps: float = Field(1e-6, gt=0, description="Added to the group std.")
    loss_agg: LossAgg = Field(LossAgg.token_mean, description="How token losses are averaged.")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO clip below: ratio >= 1 - low.")
    clip_high: float = Field(0.28, ge=0, description="PPO clip above: ratio <= 1 + high.")
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL penalty (0 = no ref model).")
    kl_estimator: KLEstimator = Field(KLEstimator.k3, description="KL estimator when used.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per epoch.")
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per forward/backward pass: each minibatch's gradient is "
        "accumulated over micro-batches, weighted so it equals the whole minibatch's "
        "(None = the whole minibatch at once). Bounds activation memory on a real model "
        "(memory only: may change on resume, e.g. after running out of memory).",
        json_schema_extra={"on_resume": "any"},
    )
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate of the RL phase.")
    lr_warmup_steps: int = Field(
        10, ge=0, description="Policy steps of linear learning-rate warm-up at the RL start."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class TrainConfig(_Strict):
    steps: int = Field(
        150,
        ge=0,
        description="Policy steps (rollout batches) of the RL phase; a run resumed with more "
        "steps continues to them.",
        json_schema_extra={"on_resume": "grow"},
    )
    eval_every: int = Field(10, ge=1, description="Greedy pass@1 on the eval set every K steps.")
    checkpoint_every: int = Field(25, ge=1, description="Checkpoint every M steps.")
    no_signal_steps: int = Field(
        10,
        ge=1,
        description="Warn (progress, logs, summary) after this many policy steps in a row "
        "without a learning signal: every group all-correct or all-wrong, so every "
        "advantage is 0 and the update does nothing (a warning only: may change on resume).",
        json_schema_extra={"on_resume": "any"},
    )
    eval_size: int | None = Field(
        None, ge=1, description="Eval on the first N eval prompts (None = all)."
    )
    eval_samples: int = Field(
        0,
        ge=0,
        le=64,
        description="Also sample k responses per eval prompt at rollout.temperature and log "
        "their mean reward (eval/mean_at_k: the sampled pass@1, which RL moves before the "
        "greedy answer) and eval/pass_at_k; 0 = greedy eval only. Seeded per prompt, the "
        "same at every eval of the run.",
    )
    threads: int = Field(
        2,
        ge=1,
        description="torch intra-op threads (speed only: may change on resume).",
        json_schema_extra={"on_resume": "any"},
    )
    eval_backend: Literal["hf", "rollout"] = Field(
        "hf",
        description="Greedy evaluation on HF (the same numbers whatever rollout.backend), or "
        "on rollout.backend: with vllm much faster at long responses, though its kernels may "
        "break a near-tie between two tokens differently from HF.",
    )


# --------------------------------------------------------------------------- NPO
class GuidanceConfig(_Strict):
    gate: float = Field(
        0.6,
        ge=0,
        description="Replace slot G of a group whose on-policy pass rate is below this "
        "(the paper's 0.6); > 1 guides every cached prompt.",
    )
    importance_sampling: bool = Field(
        True,
        description="Guide rows use the guide's log-probs as pi_old (ratio pi/pi_guide, "
        "clipped); off: the current policy's own (ratio 1 at the first update).",
    )
    tries: int = Field(8, ge=1, description="Guide samples per prompt (k) to find a correct one.")


class EarlyScheduleConfig(_Strict):
    enabled: bool = Field(False, description="Early-stage bootstrapping.")
    scout_steps: int = Field(25, ge=1, description="Steps of the scout run from step 0 (S).")
    window: int = Field(25, ge=1, description="The guide covers policy steps [0, window].")


class LateScheduleConfig(_Strict):
    enabled: bool = Field(False, description="Late-stage plateau breakthrough.")
    at_step: int = Field(100, ge=0, description="Plateau step t: replay [t, t+lookahead].")
    lookahead: int = Field(25, ge=1, description="Steps trained past t for the guide (Δ).")


class RollingScheduleConfig(_Strict):
    enabled: bool = Field(False, description="Guide every window from a look-ahead of it.")
    every: int = Field(25, ge=1, description="Window length W.")
    lookahead: int = Field(25, ge=1, description="Steps trained ahead of each window (Δ).")


class NPOConfig(_Strict):
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    early: EarlyScheduleConfig = Field(default_factory=EarlyScheduleConfig)
    late: LateScheduleConfig = Field(default_factory=LateScheduleConfig)
    rolling: RollingScheduleConfig = Field(default_factory=RollingScheduleConfig)
    delta0_control: bool = Field(
        False,
        description="Control: the guide is the current checkpoint itself (same k tries), "
        "separating 'near future' from 'best of k'.",
    )


class AutoNPOConfig(_Strict):
    check_every: int = Field(10, ge=1, description="Policy steps between trigger checks.")
    window: int = Field(20, ge=2, description="Stagnation window W (needs 2W steps of history).")
    ema_alpha: float = Field(0.1, gt=0, le=1, description="EMA weight of the train reward.")
    min_reward_gain: float = Field(
        0.02, description="Reward EMA gain over W below this counts as stagnation."
    )
    min_entropy_drop: float = Field(
        0.05, ge=0, description="Relative entropy decline over W needed (exploration collapse)."
    )
    mistake_below: float = Field(
        0.5,
        ge=0,
        description="A prompt joins the mistake pool when its group pass rate is below this "
        "(> 1: every prompt).",
    )
    confirm_prompts: int = Field(
        32, ge=1, description="Pool prompts per slice rolled out to confirm."
    )
    confirm_below: float = Field(
        0.5, ge=0, le=1, description="Confirmed when the current pass rate on the pool is below."
    )
    candidates: list[int] = Field(
        default_factory=lambda: [10, 20, 40], description="Rollback distances Δ to score."
    )
    v_floor: float = Field(
        1e-6,
        gt=0,
        description="Floor of the variance proxy V̂(Δ), only to keep S = Q̂/V̂ finite; "
        "it must stay well below the V̂ of checkpoints apart, or it ranks Δ by Q̂ alone.",
    )
    cooldown: int = Field(
        30, ge=0, description="Updates (global steps) after an intervention before another."
    )
    max_interventions: int = Field(3, ge=0, description="At most this many interventions.")
    force_at: list[int] = Field(
        default_factory=list,
        description="Trigger (confirmed) at these policy steps whatever the signals: demos/tests.",
    )

    @model_validator(mode="after")
    def _candidates(self) -> AutoNPOConfig:
        if not self.candidates or min(self.candidates) < 1:
            raise ValueError("candidates must be a non-empty list of distances >= 1")
        return self


class BaselinesConfig(_Strict):
    luffy_gamma: float = Field(
        0.1, gt=0, description="LUFFY: teacher tokens are weighted f(w) = w / (w + γ)."
    )
    rlep_run: str | None = Field(
        None, description="RLEP: the finished run (same store) whose last checkpoint replays."
    )
    rlep_gate: float = Field(
        2.0, ge=0, description="RLEP: pass-rate gate of the replay slot (> 1: every group)."
    )
    exgrpo_fraction: float = Field(
        0.5, gt=0, le=1, description="ExGRPO: share of each step's prompts drawn from the pool."
    )


# --------------------------------------------------------------------------- storage
class StoreConfig(_Strict):
    root: Path = Field(Path("runs"), description="Local folder for runs (reports, SQLite, MLflow).")
    artifacts_uri: str | None = Field(
        None,
        description="Object store of every run under root (checkpoints, guidance): file:///path "
        "or s3://bucket/prefix (default <root>/artifacts).",
    )
    metadata_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the metadata DB; NPO_METADATA_URL wins when set (keep "
        "passwords there, not in the file); default sqlite:///<root>/npo.db.",
    )


class TrackingConfig(_Strict):
    enabled: bool = Field(True, description="Log to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; MLFLOW_TRACKING_URI wins when set; "
        "default sqlite:///<root>/mlflow.db with artifacts under <root>/mlartifacts.",
    )
    experiment: str = Field("npo", description="MLflow experiment name.")


# --------------------------------------------------------------------------- cluster
class SecretEnvConfig(_Strict):
    secret_name: str = Field(description="Kubernetes Secret in the run's namespace.")
    env: dict[str, str] = Field(
        description="Secret data key -> environment variable set in the step's container."
    )
    optional: bool = Field(False, description="Start the step even when the Secret is missing.")


class ConfigMapEnvConfig(_Strict):
    config_map_name: str = Field(description="Kubernetes ConfigMap in the run's namespace.")
    env: dict[str, str] = Field(
        description="ConfigMap data key -> environment variable set in the step's container."
    )
    optional: bool = Field(False, description="Start the step even when the ConfigMap is missing.")


class TolerationConfig(_Strict):
    key: str | None = Field(None, description="Taint key (None with Exists: every taint).")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="How value is matched.")
    value: str | None = Field(None, description="Taint value (with operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate (None: every effect)."
    )


class RetryConfig(_Strict):
    count: int = Field(2, ge=0, description="Retries of a failed stateful step (0 = none).")
    backoff: str = Field(
        "60s", pattern=r"^\d+s$", description="Wait before the first retry, e.g. '60s'."
    )
    factor: float = Field(2.0, ge=1, description="Each further wait is this times longer.")
    max_duration: str = Field(
        "3600s", pattern=r"^\d+s$", description="Stop retrying after this long, e.g. '3600s'."
    )


def _known_stages(names: list[str]) -> list[str]:
    from npo.stages import STAGES  # the stages are declared there, once

    unknown = [n for n in names if n not in STAGES or not STAGES[n].opens_run]
    if unknown:
        known = sorted(n for n, s in STAGES.items() if s.opens_run)
        raise ValueError(f"not stages that run the policy: {unknown}; the stages are {known}")
    return names


def _stage_names(by_stage: dict[str, Any]) -> dict[str, Any]:
    from npo.stages import STAGES  # the stages are declared there, once

    unknown = sorted(set(by_stage) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the stages are {sorted(STAGES)}")
    return by_stage


def _known_method(name: str) -> str:
    from npo.methods import METHODS  # the methods are declared there, once

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
    return name


# Kubernetes quantities in the forms KFP accepts for requests and limits.
_CPU = r"^([0-9]*[.])?[0-9]+m?$"
_MEMORY = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"


def _default_secrets() -> list[SecretEnvConfig]:
    # The credentials the code reads from the environment (store/s3.py, steps/context.py,
    # store/tracking.py); Secret keys are named after the variables they fill.
    named = {
        "npo-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        "npo-metadata-db": ["NPO_METADATA_URL"],
        "npo-mlflow": ["MLFLOW_TRACKING_URI"],
    }
    return [
        SecretEnvConfig(secret_name=name, env={v: v for v in variables})
        for name, variables in named.items()
    ]


def _default_config_maps() -> list[ConfigMapEnvConfig]:
    # The endpoints of a `make deploy` install (helm/npo's ConfigMap npo-config): where the
    # steps find the object store and the run's artifacts, keys named after the variables.
    variables = ["AWS_ENDPOINT_URL", "AWS_REGION", "NPO_ARTIFACTS_URI"]
    return [ConfigMapEnvConfig(config_map_name="npo-config", env={v: v for v in variables})]


_IMAGE = r"^\S+:[\w.-]+$|^\S+@sha256:[0-9a-f]{64}$"


class LightStagesConfig(_Strict):
    """Pods of the stages that never load the policy (configure, verify, keep, report):
    they read and write the store and the DB, so they need little and any node will do."""

    image: str | None = Field(
        None,
        pattern=_IMAGE,
        description="Their image, e.g. the CPU image when `cluster.image` is the CUDA one "
        "(None: cluster.image).",
    )
    cpu_request: str = Field(
        "250m", pattern=_CPU, coerce_numbers_to_str=True, description="Their CPU request."
    )
    memory_request: str = Field("1Gi", pattern=_MEMORY, description="Their memory request.")
    memory_limit: str | None = Field(
        "4Gi", pattern=_MEMORY, description="Their memory limit (None: no limit)."
    )
    timeout: int = Field(
        3600, ge=0, description="Their deadline in seconds (activeDeadlineSeconds; 0 = none)."
    )


class ClusterConfig(_Strict):
    """How `npo compile` / `npo submit` run the stages as Kubeflow Pipelines tasks. Only
    names of Secrets go into the compiled YAML, never their values."""

    image: str = Field(
        "ghcr.io/npo-project/npo:0.1.0-cpu",
        pattern=_IMAGE,
        description="Image of the steps that run the model (has npo and kfp installed): pin a "
        "tag or digest, never :latest.",
    )
    secrets: list[SecretEnvConfig] = Field(
        default_factory=_default_secrets,
        description="Secrets exposed as environment variables of every step: S3 keys, the "
        "metadata DB URL (with its password) and the MLflow tracking URI.",
    )
    config_maps: list[ConfigMapEnvConfig] = Field(
        default_factory=_default_config_maps,
        description="ConfigMaps exposed as environment variables of every step: the S3 "
        "endpoint and region and the artifacts URI of the chart's ConfigMap npo-config, so "
        "the compiled YAML runs as uploaded on a `make deploy` install.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain (non-secret) environment variables of every step, e.g. "
        "NPO_S3_INSECURE; a variable a Secret or ConfigMap sets must not be repeated here.",
    )
    accelerator_type: str | None = Field(
        None,
        description="Accelerator resource of the GPU steps, e.g. 'nvidia.com/gpu' "
        "(None: CPU only).",
    )
    accelerator_count: int = Field(1, ge=1, description="Accelerators per GPU step.")
    gpu_steps: Annotated[list[str], AfterValidator(_known_stages)] = Field(
        default_factory=lambda: ["train", "guidance", "schedule"],
        description="Stages that get the accelerator: train, guidance and schedule (NPO's "
        "rolling windows) train or sample the policy at length; the others mostly wait on "
        "the store.",
    )
    cpu_request: str = Field(
        "1",
        pattern=_CPU,
        coerce_numbers_to_str=True,
        description="CPU request of every step that runs the model, e.g. 2 or '500m'.",
    )
    memory_request: str = Field(
        "4Gi",
        pattern=_MEMORY,
        description="Memory request of every step that runs the model, e.g. '16Gi'.",
    )
    memory_limit: str | None = Field(
        None,
        pattern=_MEMORY,
        description="Memory limit of every step that runs the model (None: no limit).",
    )
    timeout: int = Field(
        172800,
        ge=0,
        description="Deadline in seconds of each step that runs the model "
        "(activeDeadlineSeconds, so a hung GPU step gives its GPU back; 0 = none). A retried "
        "step starts a new pod with a new deadline and resumes from its last checkpoint.",
    )
    timeouts: Annotated[dict[str, Annotated[int, Field(ge=0)]], AfterValidator(_stage_names)] = (
        Field(
            default_factory=dict,
            description="Per-stage deadlines in seconds that replace `timeout` (or "
            "light.timeout), e.g. {train: 604800} for long segments.",
        )
    )
    light: LightStagesConfig = Field(
        default_factory=LightStagesConfig,
        description="Image, requests and deadline of the stages that never load the model.",
    )
    run_as_user: int = Field(
        1000, ge=1, description="uid of every step's container (never root: runAsNonRoot)."
    )
    run_as_group: int = Field(1000, ge=0, description="gid of every step's container.")
    service_account: str = Field(
        "npo-pipeline",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="ServiceAccount `npo submit` runs the pipeline under (the chart's, with "
        "no API rights; choose it in the UI's run form too).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels every step's pod must match."
    )
    tolerations: list[TolerationConfig] = Field(
        default_factory=list, description="Taints every step's pod tolerates (e.g. GPU nodes)."
    )
    retry: RetryConfig = Field(
        default_factory=RetryConfig,
        description="Retry policy of the stateful steps (prepare, train, guidance, rollback, "
        "schedule): they resume from the last committed checkpoint.",
    )

    @model_validator(mode="after")
    def _pinned(self) -> ClusterConfig:
        # A moving tag would let two tasks of one run execute different code.
        for field, image in (
            ("cluster.image", self.image),
            ("cluster.light.image", self.light.image),
        ):
            if image and image.endswith(":latest"):
                raise ValueError(f"{field} must pin a version tag or digest, not :latest")
        return self

    @model_validator(mode="after")
    def _one_source_per_variable(self) -> ClusterConfig:
        # Kubernetes would keep one of two definitions of a variable without a word.
        seen: dict[str, str] = {}
        for variable, source in self._variables():
            if variable in seen:
                raise ValueError(
                    f"environment variable {variable} is set by both cluster.{seen[variable]} "
                    f"and cluster.{source}; keep one"
                )
            seen[variable] = source
        return self

    def _variables(self) -> list[tuple[str, str]]:
        """(variable, where it comes from) of every variable the steps get."""
        pairs = [(v, f"secrets[{s.secret_name}]") for s in self.secrets for v in s.env.values()]
        pairs += [
            (v, f"config_maps[{c.config_map_name}]")
            for c in self.config_maps
            for v in c.env.values()
        ]
        return pairs + [(v, "env") for v in self.env]

    def supplies(self, variable: str) -> bool:
        """Whether the steps get `variable` from a Secret, a ConfigMap or cluster.env."""
        return any(v == variable for v, _ in self._variables())


# --------------------------------------------------------------------------- distributed
class DistributedConfig(_Strict):
    """How the train stage spreads over processes (docs/distributed.md). With more than one
    rank the stage re-runs itself under torchrun (one node) or as a Kubeflow Trainer job
    (several nodes); each rank samples and trains its share of every step's prompt groups,
    and the update is the one a single process makes on the whole batch."""

    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Training processes per node (torchrun --nproc-per-node): one per GPU on "
        "a GPU node; on CPU each takes train.threads cores. 1 = no torch.distributed.",
        json_schema_extra={"on_resume": "any"},
    )
    nodes: int = Field(
        1,
        ge=1,
        description="Nodes of the train stage; more than 1 runs it as a cluster job "
        "(`launcher`), never in the pipeline's own pod.",
        json_schema_extra={"on_resume": "any"},
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend: auto = nccl on CUDA, gloo on CPU.",
        json_schema_extra={"on_resume": "any"},
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How ranks share the model: ddp (DistributedDataParallel, a full replica "
        "per rank, gradients all-reduced) or fsdp (FSDP2 fully_shard: weights, gradients and "
        "AdamW moments sharded per decoder block, weights all-gathered for each minibatch "
        "and for sampling). Checkpoints are the same either way.",
        json_schema_extra={"on_resume": "any"},
    )
    launcher: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob",
        description="Job kind of a multi-node train stage: a Kubeflow Trainer v2 TrainJob, or "
        "a Training Operator v1 PyTorchJob where only v1 is installed.",
        json_schema_extra={"on_resume": "any"},
    )
    trainer_runtime: str = Field(
        "torch-distributed",
        min_length=1,
        description="ClusterTrainingRuntime a TrainJob refers to (Trainer v2 ships "
        "torch-distributed).",
        json_schema_extra={"on_resume": "any"},
    )
    poll_seconds: float = Field(
        10.0,
        gt=0,
        description="Seconds between status polls of a cluster job.",
        json_schema_extra={"on_resume": "any"},
    )

    @property
    def world_size(self) -> int:
        """All ranks: nodes x nproc_per_node."""
        return self.nodes * self.nproc_per_node


# --------------------------------------------------------------------------- root
class ExperimentConfig(_Strict):
    name: str = Field(
        "toy-grpo",
        coerce_numbers_to_str=True,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Run name (letters, digits, _ and -; branches add .<suffix>).",
    )
    seed: int = Field(0, description="Seed of model init, sampling and data order.")
    method: Annotated[str, AfterValidator(_known_method)] = Field(
        "grpo",
        description="grpo; npo (manual schedules); autonpo; the paper's baselines: luffy "
        "(gold-solution teacher in every group), exgrpo (own-past replay), rlep (replay "
        "from a finished run). The registry npo.methods.METHODS defines each.",
    )
    task: TaskConfig = Field(default_factory=ArithmeticTaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    npo: NPOConfig = Field(default_factory=NPOConfig)
    autonpo: AutoNPOConfig = Field(default_factory=AutoNPOConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _combinations(self) -> ExperimentConfig:
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if batch % self.algo.minibatches:
            raise ValueError(
                f"algo.minibatches ({self.algo.minibatches}) must divide the rollout batch "
                f"(rollout.prompts_per_step * rollout.group_size = {batch})"
            )
        world = self.distributed.world_size
        if self.rollout.prompts_per_step % world:
            raise ValueError(
                f"distributed: {world} ranks (nodes x nproc_per_node) must divide "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step}): each rank "
                "samples whole prompt groups, the same number on every rank"
            )
        cluster = self.cluster
        if (
            cluster.accelerator_type
            and "train" in cluster.gpu_steps
            and self.distributed.nproc_per_node > cluster.accelerator_count
        ):
            raise ValueError(
                f"distributed.nproc_per_node ({self.distributed.nproc_per_node}) > "
                f"cluster.accelerator_count ({cluster.accelerator_count}): one rank per GPU; "
                "raise cluster.accelerator_count or lower nproc_per_node"
            )
        from npo.methods import METHODS

        METHODS[self.method].check(self)
        return self


# --------------------------------------------------------------------------- persisting
def redact_url(url: str | None) -> str | None:
    """`url` with any password replaced by ***, for anything that gets written or logged.

    >>> redact_url("postgresql+psycopg://npo:s3cret@db:5432/npo")
    'postgresql+psycopg://npo:***@db:5432/npo'
    """
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def public_dump(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data with credentials redacted: what run folders, the metadata DB
    and MLflow params get. Credentials belong in the environment (Kubernetes Secrets)."""
    data = cfg.model_dump(mode="json")
    data["store"]["metadata_url"] = redact_url(data["store"]["metadata_url"])
    data["store"]["artifacts_uri"] = redact_url(data["store"]["artifacts_uri"])
    data["tracking"]["tracking_uri"] = redact_url(data["tracking"]["tracking_uri"])
    return data


def current_dump(saved: dict[str, Any]) -> dict[str, Any] | None:
    """A config dump written by an earlier version, as this version dumps it: fields added
    since get their defaults, so a run started before them still matches its own config.
    None when it no longer validates (a field was removed or tightened)."""
    try:
        return public_dump(ExperimentConfig.model_validate(saved))
    except ValidationError:
        return None


# How a field may differ when a run resumes, marked on the field as
# json_schema_extra={"on_resume": ...}: "any" for speed and memory settings (train.threads,
# algo.micro_batch_size), "grow" for train.steps (more steps extend the run). Any other
# field must be equal: a resume must never mix two experiments.
_ON_RESUME = "on_resume"
_UNSET = object()


def _differences(saved: Any, ours: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, saved value, our value) of every leaf where two dumps differ."""
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(saved.keys() | ours.keys(), key=str):
            yield from _differences(saved.get(key, _UNSET), ours.get(key, _UNSET), f"{path}{key}.")
    elif saved != ours:
        yield path.rstrip("."), saved, ours


def _field_at(path: str) -> Any:
    """The FieldInfo of a dotted config path, or None (a union member's or unknown key)."""
    model: Any = ExperimentConfig
    field = None
    for key in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(key)
        if field is None:
            return None
        model = field.annotation
    return field


def _may_change(path: str, saved: Any, ours: Any) -> bool:
    field = _field_at(path)
    extra = field.json_schema_extra if field is not None else None
    rule = extra.get(_ON_RESUME) if isinstance(extra, dict) else None
    if rule == "grow":
        return isinstance(saved, int) and isinstance(ours, int) and ours > saved
    return rule == "any"


def resume_conflicts(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Why a run stored with the config dump `saved` cannot resume with `ours` (a
    `public_dump`): one "field: stored -> ours" per field that differs and may not change
    on resume (see _ON_RESUME); empty when it may resume. Fields added since `saved` was
    written count with their defaults."""
    saved = current_dump(saved) or saved

    def show(value: Any) -> str:
        return "(not set)" if value is _UNSET else repr(value)

    return [
        f"{path}: {show(old)} -> {show(new)}"
        for path, old, new in _differences(saved, ours)
        if not _may_change(path, old, new)
    ]


# --------------------------------------------------------------------------- loading
def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice (PyYAML would keep the last without a word)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first}); keep one")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where configs need it: a key given twice in one
    mapping is an error, and `3e-4` is a float as in YAML 1.2 (YAML 1.1 reads a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKey(key, line, first[key])
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                pass
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str, name: str) -> Any:
    """`text` parsed with _Loader; YAML errors say `name` and the line."""
    loader = _Loader(text)
    loader.name = name  # what the errors' marks call the text
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_scalar(raw: str, item: str) -> Any:
    # YAML scalars: ints, floats, bools, null, strings, [lists] all behave as in the file.
    try:
        return _load_yaml(raw, "the value")
    except _DuplicateKey as e:
        raise ConfigError(f"override {item!r}: {e}") from None
    except yaml.YAMLError:
        return raw


def _parse_override(item: str) -> tuple[list[str], Any]:
    """The key path and the value of one `key.path=value` string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    path, _, raw = item.partition("=")
    keys = path.strip().split(".")
    if keys == [""]:
        raise ConfigError(f"override {item!r}: empty key")
    if "" in keys:
        raise ConfigError(
            f"override {item!r}: empty segment in the key {path.strip()!r} (write section.key)"
        )
    return keys, _parse_scalar(raw, item)


def _switched(data: dict[str, Any], parsed: list[tuple[list[str], Any]]) -> list[str]:
    """The union sections (task) whose `kind` the overrides change from the file's."""
    switched = []
    for section, field in ExperimentConfig.model_fields.items():
        kinds = [value for keys, value in parsed if keys == [section, KIND]]
        kind_of = next(
            (m.discriminator for m in field.metadata if isinstance(m, Discriminator)), None
        )
        if kinds and callable(kind_of) and kinds[-1] != kind_of(data.get(section, {})):
            switched.append(section)
    return switched


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings to a nested dict (in place) and return it.

    An override that changes the kind of a union section (`task.kind=math` over a file's
    arithmetic task) first drops that section's keys from `data`: they belong to the other
    kind. The section's other overrides then apply, in any order."""
    parsed = [_parse_override(item) for item in overrides]
    for section in _switched(data, parsed):
        data.pop(section, None)
    for item, (keys, value) in zip(overrides, parsed, strict=True):
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _read_config_file(p: Path) -> dict[str, Any]:
    """The mapping a config file holds; ConfigError names the file and what is wrong."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} on line {line}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it: {e.strerror}") from None
    try:
        loaded = _load_yaml(text, str(p))
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if loaded is None or loaded == {}:
        # Most likely the wrong file: running every default would start the toy for minutes.
        raise ConfigError(
            f"{p}: the file sets nothing (it is empty or only comments): write the settings "
            "that differ from the defaults (e.g. name: my-run; `npo show-config` lists them "
            "all), or give no config file to run the defaults"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Read YAML at `path` (embedded defaults when None), apply overrides, validate."""
    source = str(path) if path else "<defaults>"
    data = _read_config_file(Path(path)) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
