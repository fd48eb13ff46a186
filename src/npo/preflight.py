"""What a config is known to fail at, found before anything of the run is written.

`check_before_start(cfg)` looks at

- the machine: `model.device=cuda` without a visible CUDA device, `rollout.backend=vllm`
  (so also `train.eval_backend=rollout`) without vLLM or a GPU (npo.rollout.vllm's check);
- the runs the config names: `warmup.init_from` (its checkpoint 0) and `baselines.rlep_run`
  (a checkpoint to replay) must be runs of the metadata DB, read and never written (a DB
  file that does not exist has no runs);
- the files: a math task's local `train_path` / `eval_path` exist and every line parses (a
  store URI is only checked for its scheme, by the config: no network here), and a local
  `model.source` is a folder;
- settings that contradict each other: a section that the method ignores turned on
  (`method=grpo` with `npo.early.enabled`), an AutoNPO budget whose trigger can never fire;
- token budgets of the built-in tiny model, whose tokens are characters: the longest answer
  and its stop token within `rollout.max_new_tokens`, the longest prompt plus
  `rollout.max_new_tokens` within `model.tiny.max_position` (a Hugging Face tokenizer is
  not loaded for this).

It raises one `PreflightError` that lists every problem, each naming the field and what to
set; what is allowed but likely unintended comes back as warnings. It takes well under a
second, plus torch's import when CUDA or vLLM is asked for. `where="cluster"` (npo submit)
checks only what this machine can know of a cluster's run: the settings and the budgets.

    warnings = check_before_start(cfg)                # npo run, before open_run
    check_before_start(cfg, where="cluster")          # npo submit
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from npo.config import ArithmeticTaskConfig, ExperimentConfig, MathTaskConfig

if TYPE_CHECKING:
    from npo.store.metadata import MetadataDB

Where = Literal["local", "cluster"]  # where the run executes: this machine, or a cluster


class PreflightError(ValueError):
    """A config that cannot run as it is; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"the run cannot start ({count}; nothing was written):\n{listed}")


def check_before_start(
    cfg: ExperimentConfig,
    where: Where = "local",
    fresh: bool = False,
    planned: Collection[str] = (),
) -> list[str]:
    """Raise PreflightError listing what `cfg` is known to fail at (module docstring);
    return warnings about settings that run but likely not as meant.

    where: "cluster" skips what only the machine that runs it can check (device, vLLM,
    local files, other runs in its metadata DB). fresh: the run is restarted (--fresh), so
    its own checkpoints do not count. planned: runs that will exist by the time this one
    starts (earlier runs of one `npo compare`)."""
    problems = _settings(cfg) + _budgets(cfg, _task_texts(cfg, where))
    if where == "local":
        problems += _machine(cfg) + _files(cfg) + _references(cfg, fresh, set(planned))
    if problems:
        raise PreflightError(problems)
    return _warnings(cfg)


# --------------------------------------------------------------------------- machine
def _machine(cfg: ExperimentConfig) -> list[str]:
    """The device and the vLLM engine the config asks this machine for."""
    problems = []
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(
                "model.device=cuda but no CUDA device is visible on this machine: set "
                "model.device=cpu (or auto: cuda where one is visible)"
            )
    if cfg.rollout.backend == "vllm":
        from npo.rollout.vllm import VllmUnavailable, check_available

        try:
            check_available()
        except VllmUnavailable as e:
            problems.append(str(e))
    return problems


# --------------------------------------------------------------------------- files
def _files(cfg: ExperimentConfig) -> list[str]:
    """A local model.source must be a folder; datasets are read by _task_texts."""
    from npo.store.inputs import is_uri

    source = cfg.model.source
    if source == "tiny" or is_uri(source) or Path(source).is_dir():
        return []
    return [
        f"model.source: no folder {source!r}: set it to a Hugging Face model folder, a "
        "store URI of one (s3://...), or tiny"
    ]


def _dataset(field: str, path: str, split: str, template: str) -> tuple[list[Any], str | None]:
    """The problems of one local JSONL split, or the problem with it (naming `field`)."""
    from npo.tasks import TaskError
    from npo.tasks.math_jsonl import load_problems

    local = Path(path)
    if not local.exists():
        return [], f"{field}: {path}: file not found; set {field} to a JSONL file of problems"
    if not local.is_file():
        return [], f"{field}: {path}: not a file; set {field} to a JSONL file of problems"
    if not os.access(local, os.R_OK):
        return [], f"{field}: {path}: not readable (its permissions); make it readable"
    try:
        return load_problems(local, split, template), None
    except TaskError as e:  # names the file and the line
        return [], f"{field}: {e}"


_Texts = tuple[list[str], list[str], list[str]]  # prompts, targets, problems found


def _task_texts(cfg: ExperimentConfig, where: Where) -> _Texts:
    """The prompts and warm-up targets of the task, as far as they are cheap to know (an
    arithmetic task's widest problem; a math task's local files, every line parsed), and
    the problems met reading them."""
    from npo.store.inputs import is_uri

    task = cfg.task
    if isinstance(task, ArithmeticTaskConfig):
        from npo.tasks.arithmetic import arithmetic_problem

        # 0 op 0 is written as wide as any: operands and result are zero-padded
        widest = arithmetic_problem(
            0, 0, operation=task.operation, digits=task.digits, answer_format=task.answer_format
        )
        return [widest.prompt], [widest.target], []
    prompts, targets, problems = [], [], []
    if isinstance(task, MathTaskConfig) and where == "local":  # other kinds: not checked here
        for field, path, split in (
            ("task.train_path", task.train_path, "train"),
            ("task.eval_path", task.eval_path, "eval"),
        ):
            if is_uri(path):  # a store URI: fetched by the steps, its scheme checked already
                continue
            found, problem = _dataset(field, path, split, task.prompt_template)
            prompts += [p.prompt for p in found]
            targets += [p.target for p in found]
            problems += [problem] if problem else []
    return prompts, targets, problems


# --------------------------------------------------------------------------- budgets
def _budgets(cfg: ExperimentConfig, texts: _Texts) -> list[str]:
    """Token budgets of the tiny model (one token per character, <bos> before a prompt,
    <eos> after a response); with another model, only the problems reading the data."""
    prompts, targets, problems = texts
    if cfg.model.source != "tiny" or not targets:
        return problems
    new, positions = cfg.rollout.max_new_tokens, cfg.model.tiny.max_position
    answer = max(len(t) for t in targets) + 1  # the stop token ends the response
    if answer > new:
        what = (
            f"task.operation={cfg.task.operation} with task.digits={cfg.task.digits} answers in "
            f"{answer - 1} characters"
            if isinstance(cfg.task, ArithmeticTaskConfig)
            else f"the longest gold answer of the task's files has {answer - 1} characters"
        )
        problems.append(
            f"rollout.max_new_tokens={new} cannot hold the answers: {what}, {answer} tokens "
            f"with the stop token; set rollout.max_new_tokens >= {answer}"
        )
    prompt = max(len(p) for p in prompts) + 1  # <bos>
    if prompt + new > positions:
        fit = positions - prompt
        lower = f" or rollout.max_new_tokens <= {fit}" if fit >= answer else ""
        problems.append(
            f"model.tiny.max_position={positions} is shorter than the longest prompt "
            f"({prompt} tokens) + rollout.max_new_tokens ({new}) = {prompt + new}: set "
            f"model.tiny.max_position >= {prompt + new}{lower}"
        )
    return problems


# --------------------------------------------------------------------------- settings
# Settings only one method reads (npo.methods, npo.guidance.schedule): turned on under
# another method, they would be ignored without a word.
_ONE_METHOD: tuple[tuple[str, str, Any], ...] = (
    ("npo.early.enabled", "npo", lambda c: c.npo.early.enabled),
    ("npo.late.enabled", "npo", lambda c: c.npo.late.enabled),
    ("npo.rolling.enabled", "npo", lambda c: c.npo.rolling.enabled),
    ("npo.delta0_control", "npo", lambda c: c.npo.delta0_control),
    ("autonpo.force_at", "autonpo", lambda c: bool(c.autonpo.force_at)),
    ("baselines.rlep_run", "rlep", lambda c: c.baselines.rlep_run is not None),
)


def _settings(cfg: ExperimentConfig) -> list[str]:
    """Settings that contradict the method or each other."""
    problems = [
        f"{field} is set but method {cfg.method} ignores it (only method {method} reads it): "
        f"set method={method}, or leave {field} at its default"
        for field, method, is_on in _ONE_METHOD
        if cfg.method != method and is_on(cfg)
    ]
    return problems + _autonpo(cfg)


def autonpo_checks(cfg: ExperimentConfig) -> list[int]:
    """The policy steps where AutoNPO's trigger is asked: every autonpo.check_every steps
    before the last (npo.stages.train's watch; the last step ends the segment anyway)."""
    every = cfg.autonpo.check_every
    return list(range(every, cfg.train.steps, every))


def _autonpo(cfg: ExperimentConfig) -> list[str]:
    """An AutoNPO run whose trigger can fire at some check: the stagnation test needs
    2 x autonpo.window steps of history (npo.algo.autonpo.detect_stagnation), force_at
    fires only at a check. The cooldown only spaces later interventions, and a check
    evaluates by itself (train.eval_every does not matter)."""
    if cfg.method != "autonpo":
        return []
    a, steps = cfg.autonpo, cfg.train.steps
    checks = autonpo_checks(cfg)
    problems = []
    if a.max_interventions == 0:
        problems.append(
            "autonpo.max_interventions=0: method autonpo never intervenes (it trains as GRPO): "
            "set autonpo.max_interventions >= 1, or method=grpo"
        )
    history = 2 * a.window
    first = -(-history // a.check_every) * a.check_every  # the first check with the history
    if not any(t >= history or t in a.force_at for t in checks):
        problems.append(
            f"method autonpo with train.steps={steps} can never intervene: its trigger is "
            f"asked every autonpo.check_every={a.check_every} steps before the last and needs "
            f"2 x autonpo.window = {history} steps of history, so the first check that can "
            f"fire is at step {first}; set train.steps >= {first + 1} (or lower "
            "autonpo.window or autonpo.check_every)"
        )
    idle = [t for t in a.force_at if t not in checks]
    if idle:
        problems.append(
            f"autonpo.force_at {idle}: not steps where the trigger is asked (multiples of "
            f"autonpo.check_every={a.check_every} below train.steps={steps}), so they never "
            "fire: use such steps"
        )
    return problems


def _warnings(cfg: ExperimentConfig) -> list[str]:
    """Settings that run, but likely not as meant."""
    steps, every = cfg.train.steps, cfg.train.checkpoint_every
    if 0 < steps < every:
        return [
            f"train.checkpoint_every={every} > train.steps={steps}: the RL phase commits no "
            "checkpoint before its last step, so an interrupted run redoes it from the "
            f"warm-up; set train.checkpoint_every <= {steps} to resume within it"
        ]
    return []


# --------------------------------------------------------------------------- references
def _existing_db(cfg: ExperimentConfig) -> tuple[MetadataDB | None, str]:
    """The run's metadata DB, opened only when it exists (a SQLite file not there yet has
    no runs and is not created), and its URL without password."""
    import sqlalchemy as sa

    from npo.steps.context import metadata_url
    from npo.store.metadata import MetadataDB

    url = metadata_url(cfg)
    parsed = sa.make_url(url)
    safe = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or not Path(path).is_file():
            return None, safe
    db = MetadataDB(url, retries=1)
    if db.revision() is None:  # an empty DB: never migrated, so no runs
        db.close()
        return None, safe
    return db, safe


def _references(cfg: ExperimentConfig, fresh: bool, planned: set[str]) -> list[str]:
    """warmup.init_from and baselines.rlep_run name runs that exist (module docstring)."""
    source = cfg.warmup.init_from if cfg.warmup.init_from not in planned else None
    replay = cfg.baselines.rlep_run if cfg.method == "rlep" else None
    replay = replay if replay not in planned else None
    if replay == cfg.name:
        return [f"baselines.rlep_run={replay} is this run itself: name a finished run to replay"]
    if source is None and replay is None:
        return []
    from npo.store.metadata import MetadataDBUnavailable

    try:
        db, url = _existing_db(cfg)
        if db is None:
            return _missing(source, replay, url, [])
        with db:
            return _check_runs(db, cfg, fresh, source, replay, url)
    except MetadataDBUnavailable as e:
        return [f"store.metadata_url: cannot read the runs that the config names: {e}"]


def _missing(source: str | None, replay: str | None, url: str, have: list[str]) -> list[str]:
    """Problems of the referenced runs the DB does not have (all of them when `have` is
    empty because there is no DB yet)."""
    problems = []
    if source is not None and source not in have:
        problems.append(
            f"warmup.init_from={source}: no run {source!r} in the metadata DB ({url}); run "
            "it first with the same store settings, or unset warmup.init_from "
            "(--set warmup.init_from=null) to warm up this run itself"
        )
    if replay is not None and replay not in have:
        problems.append(
            f"baselines.rlep_run={replay}: no run {replay!r} in the metadata DB ({url}); run "
            "it to its end first with the same store settings (e.g. npo run "
            "configs/toy_grpo.yaml), or name a finished run"
        )
    return problems


def _check_runs(
    db: MetadataDB,
    cfg: ExperimentConfig,
    fresh: bool,
    source: str | None,
    replay: str | None,
    url: str,
) -> list[str]:
    """The referenced runs exist and hold the checkpoints this run will read."""
    steps = {name: [c.step for c in db.checkpoints(name)] for name in (source, replay) if name}
    if source is not None and not fresh and 0 in [c.step for c in db.checkpoints(cfg.name)]:
        source = None  # this run has its own warm-up already: init_from is not read again
    have = [name for name in (source, replay) if name and db.get_run(name) is not None]
    problems = _missing(source, replay, url, have)
    if source in have and 0 not in steps[source]:
        problems.append(
            f"warmup.init_from={source}: run {source!r} has no warm-up checkpoint (step 0) "
            "yet: let its warm-up finish first, or unset warmup.init_from"
        )
    if replay in have and not steps[replay]:
        problems.append(
            f"baselines.rlep_run={replay}: run {replay!r} has no checkpoint to replay: run "
            "it to its end first, or name a finished run"
        )
    return problems
