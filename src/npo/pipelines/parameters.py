"""The pipeline parameters a researcher sets in the KFP UI, and how their values reach the
run's config.

Only fields that leave the DAG's shape alone are parameters (learning rate, clip bounds,
temperature, NPO's gate and IS switch, seeds, model and dataset URIs, the MLflow
experiment, ...), each named with its section's prefix (`algo_lr`, `rollout_temperature`,
`npo_gate`) and defaulting to the compiled config's value. Fields that shape the DAG
(method, train.steps, the NPO schedules, autonpo.max_interventions, name, store, cluster)
are compiled in: the UI cannot contradict them. A field whose value is null in the config
is not offered (a KFP parameter cannot be null).

The pipeline's first task (`configure`) writes the parameters' values into the compiled
config and validates it, so a bad value fails the run at once, naming the parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from npo.config import ConfigError, ExperimentConfig, public_dump


@dataclass(frozen=True)
class UiParameter:
    name: str
    field: str  # dotted config path
    methods: frozenset[str] | None = None  # offered for these methods only (None: all)


_NPO = frozenset({"npo", "autonpo"})
UI_PARAMETERS = (
    UiParameter("run_seed", "seed"),
    UiParameter("tracking_experiment", "tracking.experiment"),
    UiParameter("model_source", "model.source"),
    UiParameter("task_train_path", "task.train_path"),
    UiParameter("task_eval_path", "task.eval_path"),
    UiParameter("warmup_steps", "warmup.steps"),
    UiParameter("warmup_lr", "warmup.lr"),
    UiParameter("warmup_target_accuracy", "warmup.target_accuracy"),
    UiParameter("rollout_temperature", "rollout.temperature"),
    UiParameter("rollout_max_new_tokens", "rollout.max_new_tokens"),
    UiParameter("rollout_prompts_per_step", "rollout.prompts_per_step"),
    UiParameter("rollout_group_size", "rollout.group_size"),
    UiParameter("algo_lr", "algo.lr"),
    UiParameter("algo_lr_warmup_steps", "algo.lr_warmup_steps"),
    UiParameter("algo_clip_low", "algo.clip_low"),
    UiParameter("algo_clip_high", "algo.clip_high"),
    UiParameter("algo_kl_coef", "algo.kl_coef"),
    UiParameter("algo_entropy_coef", "algo.entropy_coef"),
    UiParameter("algo_adv_estimator", "algo.adv_estimator"),
    UiParameter("algo_loss_agg", "algo.loss_agg"),
    UiParameter("algo_ppo_epochs", "algo.ppo_epochs"),
    UiParameter("algo_minibatches", "algo.minibatches"),
    UiParameter("algo_weight_decay", "algo.weight_decay"),
    UiParameter("algo_max_grad_norm", "algo.max_grad_norm"),
    UiParameter("train_eval_every", "train.eval_every"),
    UiParameter("train_checkpoint_every", "train.checkpoint_every"),
    UiParameter("npo_gate", "npo.guidance.gate", _NPO),
    UiParameter("npo_importance_sampling", "npo.guidance.importance_sampling", _NPO),
    UiParameter("npo_tries", "npo.guidance.tries", _NPO | {"rlep"}),
    UiParameter("autonpo_check_every", "autonpo.check_every", frozenset({"autonpo"})),
    UiParameter("autonpo_window", "autonpo.window", frozenset({"autonpo"})),
    UiParameter("autonpo_ema_alpha", "autonpo.ema_alpha", frozenset({"autonpo"})),
    UiParameter("autonpo_min_reward_gain", "autonpo.min_reward_gain", frozenset({"autonpo"})),
    UiParameter("autonpo_min_entropy_drop", "autonpo.min_entropy_drop", frozenset({"autonpo"})),
    UiParameter("autonpo_mistake_below", "autonpo.mistake_below", frozenset({"autonpo"})),
    UiParameter("autonpo_confirm_below", "autonpo.confirm_below", frozenset({"autonpo"})),
    UiParameter("autonpo_cooldown", "autonpo.cooldown", frozenset({"autonpo"})),
    UiParameter("baselines_luffy_gamma", "baselines.luffy_gamma", frozenset({"luffy"})),
    UiParameter("baselines_exgrpo_fraction", "baselines.exgrpo_fraction", frozenset({"exgrpo"})),
    UiParameter("baselines_rlep_gate", "baselines.rlep_gate", frozenset({"rlep"})),
)
_KINDS = (bool, int, float, str)  # bool first: a bool is an int too
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _value(data: dict[str, Any], field: str) -> Any:
    node: Any = data
    for key in field.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def pipeline_parameters(cfg: ExperimentConfig) -> list[tuple[UiParameter, type, Any]]:
    """(parameter, type, default) of every parameter `cfg`'s pipeline offers, in order."""
    data = public_dump(cfg)
    found = []
    for p in UI_PARAMETERS:
        value = _value(data, p.field)
        if value is None or (p.methods is not None and cfg.method not in p.methods):
            continue
        kind = next(k for k in _KINDS if isinstance(value, k))
        found.append((p, kind, value))
    return found


def _coerce(name: str, kind: type, raw: Any) -> Any:
    """A parameter's value as its type (KFP may hand it over as text)."""
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        return kind(text)
    except ValueError:
        raise ConfigError(
            f"pipeline parameter {name}: {raw!r} is not {_KIND_NAMES[kind]}"
        ) from None


def apply_parameters(config: str, values: dict[str, Any]) -> str:
    """The config JSON `config` with the pipeline parameters' `values` ({field: value})
    written in, validated; ConfigError names the parameter and the field."""
    data = json.loads(config)
    cfg = ExperimentConfig.model_validate(data)
    offered = {p.field: (p, kind) for p, kind, _ in pipeline_parameters(cfg)}
    for field, raw in values.items():
        if field not in offered:
            raise ConfigError(f"{field} is not a pipeline parameter of this pipeline")
        parameter, kind = offered[field]
        node = data
        *parents, last = field.split(".")
        for key in parents:
            node = node[key]
        node[last] = _coerce(parameter.name, kind, raw)
    from pydantic import ValidationError

    try:
        merged = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            named = offered.get(loc)
            where = f"pipeline parameter {named[0].name} ({loc})" if named else loc
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("invalid pipeline parameters:\n" + "\n".join(lines)) from None
    return json.dumps(public_dump(merged))
