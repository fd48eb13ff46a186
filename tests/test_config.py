"""The experiment config: defaults, YAML loading, `--set` overrides, and error messages.

Every rejected config must raise `ConfigError` whose message names the offending field, so a
user can fix it without reading a traceback. No torch here: this file runs in well under a
second.

Run: .venv/bin/python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from npo.config import (
    AdvEstimator,
    AnswerFormat,
    ArithmeticTaskConfig,
    ConfigError,
    ExperimentConfig,
    LossAgg,
    MathTaskConfig,
    apply_overrides,
    load_config,
)

DATA = Path(__file__).parent / "data"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*overrides: str, path: Path | None = None) -> str:
    """The message of the ConfigError that loading `path` with `overrides` must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------- defaults
def test_defaults_validate_and_match_the_documented_toy_setup():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert isinstance(cfg.task, ArithmeticTaskConfig)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (16, 8)
    assert cfg.rollout.max_new_tokens == 8
    assert cfg.model.source == "tiny"
    assert cfg.algo.adv_estimator is AdvEstimator.grpo
    # The defaults survive a dump/validate round trip (what show-config prints is loadable).
    assert ExperimentConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n", "{}\n"])
def test_a_file_that_sets_nothing_is_refused(tmp_path, text):
    # Most likely the wrong file: running every default would start the toy for minutes.
    path = write(tmp_path, text)
    msg = config_error(path=path)
    assert f"{path}: the file sets nothing (it is empty or only comments)" in msg
    assert "give no config file to run the defaults" in msg


# --------------------------------------------------------------------------- YAML
def test_yaml_file_sets_nested_fields_and_keeps_other_defaults(tmp_path):
    path = write(
        tmp_path,
        """
name: my-run
seed: 3
task: {kind: arithmetic, digits: 2, operation: mul, answer_format: plain}
model: {tiny: {hidden_size: 64, num_heads: 8}}
algo: {lr: 0.0005, clip_high: 0.3}
tracking: {enabled: false}
""",
    )
    cfg = load_config(path)
    assert cfg.name == "my-run"
    assert cfg.seed == 3
    assert cfg.task.digits == 2
    assert cfg.task.operation == "mul"
    assert cfg.task.answer_format is AnswerFormat.plain
    assert (cfg.model.tiny.hidden_size, cfg.model.tiny.num_heads) == (64, 8)
    assert cfg.model.tiny.num_layers == 4  # untouched sibling keeps its default
    assert cfg.algo.lr == pytest.approx(5e-4)
    assert cfg.algo.clip_high == pytest.approx(0.3)
    assert cfg.algo.clip_low == pytest.approx(0.2)
    assert cfg.tracking.enabled is False


def test_overrides_apply_on_top_of_the_yaml(tmp_path):
    path = write(tmp_path, "algo: {lr: 0.01}\ntrain: {steps: 10}\n")
    cfg = load_config(path, ["algo.lr=0.02"])
    assert cfg.algo.lr == pytest.approx(0.02)
    assert cfg.train.steps == 10


# --------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("train.steps=50", lambda c: c.train.steps, 50),
        ("algo.lr=3e-4", lambda c: c.algo.lr, 3e-4),
        ("algo.lr=0.5", lambda c: c.algo.lr, 0.5),
        ("algo.clip_high=1", lambda c: c.algo.clip_high, 1.0),
        ("tracking.enabled=false", lambda c: c.tracking.enabled, False),
        ("tracking.enabled=true", lambda c: c.tracking.enabled, True),
        ("warmup.target_accuracy=null", lambda c: c.warmup.target_accuracy, None),
        ("warmup.target_accuracy=0.9", lambda c: c.warmup.target_accuracy, 0.9),
        ("name=run-2", lambda c: c.name, "run-2"),
        ("tracking.experiment=a b", lambda c: c.tracking.experiment, "a b"),
        ("model.tiny.hidden_size=64", lambda c: c.model.tiny.hidden_size, 64),
        (
            "algo.loss_agg=seq-mean-token-mean",
            lambda c: c.algo.loss_agg,
            LossAgg.seq_mean_token_mean,
        ),
        ('tracking.experiment="a: b"', lambda c: c.tracking.experiment, "a: b"),
        ("tracking.experiment='123'", lambda c: c.tracking.experiment, "123"),
        ("store.root=/tmp/elsewhere", lambda c: c.store.root, Path("/tmp/elsewhere")),
        ("store.metadata_url=sqlite:///x.db", lambda c: c.store.metadata_url, "sqlite:///x.db"),
    ],
)
def test_set_override_parses_yaml_scalars(override, get, expected):
    value = get(load_config(None, [override]))
    assert value == expected
    assert type(value) is type(expected)


def test_apply_overrides_builds_missing_sections_and_types_values():
    data = apply_overrides({"algo": {"lr": 1.0}}, ["algo.lr=2", "model.tiny.num_layers=3", "x=y"])
    assert data == {"algo": {"lr": 2}, "model": {"tiny": {"num_layers": 3}}, "x": "y"}
    # The value may itself contain '=' (only the first one splits key from value).
    assert apply_overrides({}, ["name=a=b"]) == {"name": "a=b"}


def test_later_override_wins():
    cfg = load_config(None, ["algo.lr=0.1", "algo.lr=0.2"])
    assert cfg.algo.lr == pytest.approx(0.2)


@pytest.mark.parametrize("override", ["algo", "algo.lr", ""])
def test_override_without_equals_sign_is_rejected(override):
    msg = config_error(override)
    assert "expected key.path=value" in msg
    assert repr(override) in msg


def test_override_with_empty_key_is_rejected():
    assert "empty key" in config_error("=3")


def test_override_through_a_scalar_is_rejected():
    msg = config_error("algo.lr=0.1", "algo.lr.x=3")
    assert "lr is not a section" in msg


# --------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["lrr=1"], "lrr", "unknown key"),
        (["algo.lrr=1e-3"], "algo.lrr", "unknown key"),
        (["model.tiny.width=3"], "model.tiny.width", "unknown key"),
        (["rollout.group_size=abc"], "rollout.group_size", "integer"),
        (["algo.lr=fast"], "algo.lr", "number"),
        (["tracking.enabled=maybe"], "tracking.enabled", "boolean"),
        (["rollout.group_size=1"], "rollout.group_size", "greater than or equal to 2"),
        (["algo.clip_low=1.5"], "algo.clip_low", "less than 1"),
        (["algo.lr=-1e-3"], "algo.lr", "greater than 0"),
        (["algo.lr=0"], "algo.lr", "greater than 0"),
        (["rollout.temperature=0"], "rollout.temperature", "greater than 0"),
        (["warmup.target_accuracy=1.5"], "warmup.target_accuracy", "less than or equal to 1"),
        (["task.kind=arithmetic", "task.digits=0"], "task.arithmetic.digits", "greater than or"),
        (["task.kind=arithmetic", "task.operation=div"], "task.arithmetic.operation", "'add'"),
        (["algo.adv_estimator=ppo"], "algo.adv_estimator", "grpo"),
        (["name=bad name!"], "name", "pattern"),
        (["method=ppo"], "method", "grpo"),
        (["method=npo"], "npo needs a schedule", "npo.early.enabled"),
        (
            ["method=npo", "npo.late.enabled=true", "npo.late.at_step=140"],
            "npo.late.at_step + npo.late.lookahead (165) > train.steps (150)",
            "",
        ),
        (["autonpo.candidates=[]"], "autonpo", "candidates must be a non-empty list"),
        (
            ["model.tiny.hidden_size=30", "model.tiny.num_heads=4"],
            "model.tiny",
            "hidden_size (30) must be divisible by num_heads (4)",
        ),
        (["algo.minibatches=3"], "algo.minibatches (3) must divide the rollout batch", "128"),
        (
            ["model.dtype=bfloat16", "model.compute_dtype=float32"],
            "compute_dtype float32 needs dtype float32 (got bfloat16)",
            "",
        ),
        (["algo.micro_batch_size=0"], "algo.micro_batch_size", "greater than or equal to 1"),
        (["model.source=gs://b/m"], "model.source", "unsupported URI scheme (known: s3://"),
        (["model.source=''"], "model.source", "empty: give a local path or a store URI"),
    ],
)
def test_bad_value_names_the_field(overrides, field, words):
    msg = config_error(*overrides)
    assert msg.startswith("invalid config (<defaults>):")
    assert field in msg
    assert words in msg


def test_minibatches_must_divide_prompts_times_group():
    # 4 prompts x 3 responses = 12: 4 and 6 divide it, 8 does not.
    base = ["rollout.prompts_per_step=4", "rollout.group_size=3"]
    assert load_config(None, [*base, "algo.minibatches=4"]).algo.minibatches == 4
    assert load_config(None, [*base, "algo.minibatches=6"]).algo.minibatches == 6
    assert "= 12" in config_error(*base, "algo.minibatches=8")


def test_every_error_is_reported_at_once():
    msg = config_error("algo.lrr=1", "rollout.group_size=1", "train.steps=-1")
    for field in ("algo.lrr", "rollout.group_size", "train.steps"):
        assert field in msg


def test_unknown_key_in_yaml_names_the_file_and_field(tmp_path):
    path = write(tmp_path, "algo:\n  lr: 0.001\n  lrr: 0.002\n")
    msg = config_error(path=path)
    assert str(path) in msg
    assert "algo.lrr: unknown key" in msg


def test_wrong_type_in_yaml_names_the_field(tmp_path):
    msg = config_error(path=write(tmp_path, "rollout:\n  group_size: abc\n"))
    assert "rollout.group_size" in msg


def test_section_given_as_scalar_is_rejected(tmp_path):
    msg = config_error(path=write(tmp_path, "algo: 3\n"))
    assert "algo" in msg


# --------------------------------------------------------------------------- bad files
def test_bad_yaml_syntax_names_the_file(tmp_path):
    path = write(tmp_path, "algo: {lr: 0.1\ntrain: [\n")
    msg = config_error(path=path)
    assert str(path) in msg
    assert "not valid YAML" in msg


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    msg = config_error(path=path)
    assert str(path) in msg
    assert f"top level must be a mapping, got {kind}" in msg


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = config_error(path=path)
    assert "not found" in msg
    assert str(path) in msg


def test_directory_is_not_a_config_file(tmp_path):
    assert "not found" in config_error(path=tmp_path)


# --------------------------------------------------------------------------- task union
def test_math_task_requires_both_paths():
    msg = config_error("task.kind=math")
    assert "task.math.train_path" in msg
    assert "task.math.eval_path" in msg
    assert "Field required" in msg


def test_discriminator_picks_the_math_task(tmp_path):
    train, evals = DATA / "math_train.jsonl", DATA / "math_eval.jsonl"
    path = write(
        tmp_path,
        f"task:\n  kind: math\n  train_path: {train}\n  eval_path: {evals}\n  timeout_s: 2\n",
    )
    cfg = load_config(path)
    assert isinstance(cfg.task, MathTaskConfig)
    assert cfg.task.train_path == str(train)
    assert cfg.task.timeout_s == 2.0
    assert cfg.task.prompt_template == "{prompt}"


def test_discriminator_picks_the_arithmetic_task():
    cfg = load_config(None, ["task.kind=arithmetic", "task.digits=2"])
    assert isinstance(cfg.task, ArithmeticTaskConfig)
    assert cfg.task.digits == 2


def test_quoted_override_keeps_a_colon_inside_a_string():
    # Unquoted, "Q: {prompt}" is YAML for a mapping; quoting makes it the string it looks like.
    overrides = ["task.kind=math", "task.train_path=a", "task.eval_path=b"]
    cfg = load_config(None, [*overrides, 'task.prompt_template="Q: {prompt}"'])
    assert cfg.task.prompt_template == "Q: {prompt}"


@pytest.mark.parametrize("override", ["task.digits=2", "task.operation=sub"])
def test_task_section_without_kind_means_arithmetic(override):
    cfg = load_config(None, [override])
    assert isinstance(cfg.task, ArithmeticTaskConfig)
    assert cfg.task.digits == (2 if override == "task.digits=2" else 3)


def test_yaml_task_section_without_kind_means_arithmetic(tmp_path):
    cfg = load_config(write(tmp_path, "task: {digits: 4, n_eval: 10}\n"))
    assert isinstance(cfg.task, ArithmeticTaskConfig)
    assert (cfg.task.digits, cfg.task.n_eval) == (4, 10)


def test_keys_of_the_other_task_kind_are_unknown():
    # digits belongs to the arithmetic task: with kind=math it is an unknown key.
    msg = config_error("task.kind=math", "task.train_path=a", "task.eval_path=b", "task.digits=2")
    assert "task.math.digits: unknown key" in msg


def test_unknown_task_kind_lists_the_known_ones():
    msg = config_error("task.kind=chess")
    assert "task" in msg
    assert "'arithmetic'" in msg
    assert "'math'" in msg


def test_math_prompt_template_must_contain_placeholder():
    msg = config_error(
        "task.kind=math", "task.train_path=a", "task.eval_path=b", "task.prompt_template=Q {x}"
    )
    assert "task.math" in msg
    assert "{prompt}" in msg


# --------------------------------------------------------------------------- assignment
def test_assignment_is_validated_too():
    cfg = ExperimentConfig()
    with pytest.raises(ValueError, match="group_size"):
        cfg.rollout.group_size = 1


def test_public_dump_redacts_passwords_in_urls() -> None:
    from npo.config import public_dump, redact_url

    assert redact_url("postgresql+psycopg://npo:p%40ss@db:5432/x") == (
        "postgresql+psycopg://npo:***@db:5432/x"
    )
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact_url(None) is None
    cfg = load_config(
        None,
        [
            "store.metadata_url=postgresql+psycopg://u:hunter2@h/db",
            "tracking.tracking_uri=http://u:hunter2@mlflow:5000",
        ],
    )
    dumped = repr(public_dump(cfg))
    assert "hunter2" not in dumped
    assert "postgresql+psycopg://u:***@h/db" in dumped
    assert cfg.store.metadata_url == "postgresql+psycopg://u:hunter2@h/db"  # usable as given


# --------------------------------------------------------------------------- strict values
@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("train: {steps: true}\n", "train.steps", "expected an integer, got True"),
        ("train: {steps: '40'}\n", "train.steps", "expected an integer, got '40'"),
        ("train: {steps: 40.0}\n", "train.steps", "expected an integer, got 40.0"),
        ("train: {eval_size: false}\n", "train.eval_size", "expected an integer, got False"),
        ("algo: {lr: true}\n", "algo.lr", "expected a number, got True"),
        ("algo: {lr: '0.1'}\n", "algo.lr", "expected a number, got '0.1'"),
        ("tracking: {enabled: 1}\n", "tracking.enabled", "expected a boolean"),
        ("tracking: {enabled: 'true'}\n", "tracking.enabled", "expected a boolean"),
        ("autonpo: {candidates: [10, true]}\n", "autonpo.candidates", "got True"),
        ("algo: {lr: .inf}\n", "algo.lr", "finite number"),
        ("algo: {lr: .nan}\n", "algo.lr", "finite number"),
        ("warmup: {target_accuracy: .nan}\n", "warmup.target_accuracy", "finite number"),
    ],
)
def test_numbers_and_booleans_are_taken_as_written(tmp_path, text, field, words):
    """No lax conversions: `steps: true` does not run 1 step, nor `lr: .inf` anything."""
    msg = config_error(path=write(tmp_path, f"name: x\n{text}"))
    assert field in msg
    assert words in msg


def test_ints_are_numbers_and_exponents_are_floats(tmp_path):
    # An int is a float field's whole number; `1e-3` is a float as in YAML 1.2.
    cfg = load_config(
        write(tmp_path, "algo: {lr: 1e-3, clip_high: 1}\nrollout: {temperature: 2}\n")
    )
    assert (cfg.algo.lr, cfg.algo.clip_high, cfg.rollout.temperature) == (1e-3, 1.0, 2.0)
    assert type(load_config(None, ["algo.lr=1E-4"]).algo.lr) is float


def _float_fields(model: type, prefix: str = "") -> list[str]:
    """Dotted paths of every float field of a config model, its sections' included."""
    from pydantic import BaseModel

    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _float_fields(annotation, f"{prefix}{name}.")
        elif annotation in (float, float | None):
            paths.append(f"{prefix}{name}")
    return paths


FLOAT_FIELDS = _float_fields(ExperimentConfig)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_inf_and_nan_are_refused_in_every_float_field(value):
    assert len(FLOAT_FIELDS) > 20  # the walk found the sections' fields
    math = ["task.kind=math", "task.train_path=a", "task.eval_path=b"]
    for path in [*FLOAT_FIELDS, "task.timeout_s"]:
        extra = math if path.startswith("task.") else []
        msg = config_error(*extra, f"{path}={value}")
        assert "finite number" in msg, path
        assert path.replace("task.", "task.math.") in msg


def test_assignment_takes_values_as_written_too():
    cfg = ExperimentConfig()
    with pytest.raises(ValueError, match="expected an integer"):
        cfg.train.steps = True


# --------------------------------------------------------------------------- duplicates
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    path = write(tmp_path, "name: x\nalgo:\n  lr: 0.1\n  clip_low: 0.2\n  lr: 0.2\n")
    msg = config_error(path=path)
    assert f"{path}: duplicate key 'lr' at line 5 (first at line 3)" in msg


def test_a_section_given_twice_is_refused(tmp_path):
    msg = config_error(path=write(tmp_path, "train: {steps: 5}\nseed: 1\ntrain: {threads: 1}\n"))
    assert "duplicate key 'train' at line 3 (first at line 1)" in msg


def test_a_key_given_twice_in_an_override_is_refused():
    msg = config_error("task={kind: arithmetic, digits: 2, digits: 3}")
    assert "override 'task={kind: arithmetic, digits: 2, digits: 3}'" in msg
    assert "duplicate key 'digits'" in msg


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nalgo: {lr: 0.1\n")
    msg = config_error(path=path)
    assert f'in "{path}", line' in msg


# --------------------------------------------------------------------------- file encoding
def test_a_file_that_is_not_utf8_is_refused_naming_the_byte_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\n# café\n".encode("latin-1"))
    msg = config_error(path=path)
    assert f"{path}: not UTF-8 text (byte 0xe9 on line 2)" in msg


# --------------------------------------------------------------------------- key paths
@pytest.mark.parametrize("override", ["train..steps=5", ".train.steps=5", "train.=5"])
def test_an_override_with_an_empty_key_segment_is_refused(override):
    msg = config_error(override)
    assert f"override {override!r}: empty segment in the key" in msg


# --------------------------------------------------------------------------- task switch
MATH = [
    f"task.train_path={DATA / 'math_train.jsonl'}",
    f"task.eval_path={DATA / 'math_eval.jsonl'}",
]
CONFIGS = Path(__file__).parent.parent / "configs"


def test_setting_task_kind_switches_the_files_task_to_the_other_kind():
    """The README's recipe: the toy's arithmetic keys (digits, n_train, ...) are dropped."""
    cfg = load_config(CONFIGS / "toy_grpo.yaml", ["task.kind=math", *MATH])
    assert isinstance(cfg.task, MathTaskConfig)
    assert cfg.task.train_path == str(DATA / "math_train.jsonl")
    assert cfg.task.timeout_s == 5.0  # the math task's defaults
    assert cfg.rollout.group_size == 8  # the rest of the file stays


def test_the_switch_does_not_depend_on_the_order_of_the_overrides():
    first = load_config(CONFIGS / "toy_grpo.yaml", [*MATH, "task.kind=math", "task.timeout_s=2"])
    assert isinstance(first.task, MathTaskConfig)
    assert first.task.timeout_s == 2.0


def test_switching_a_math_file_to_arithmetic_drops_its_paths(tmp_path):
    path = write(tmp_path, "task: {kind: math, train_path: a, eval_path: b, timeout_s: 2}\n")
    cfg = load_config(path, ["task.kind=arithmetic", "task.digits=2"])
    assert cfg.task == ArithmeticTaskConfig(digits=2)


def test_the_same_kind_keeps_the_files_task_keys(tmp_path):
    cfg = load_config(CONFIGS / "toy_grpo.yaml", ["task.kind=arithmetic", "task.n_eval=10"])
    assert (cfg.task.digits, cfg.task.n_train, cfg.task.n_eval) == (3, 4096, 10)
    # A file without task.kind has the default kind: naming it again changes nothing.
    cfg = load_config(write(tmp_path, "task: {digits: 2}\n"), ["task.kind=arithmetic"])
    assert cfg.task.digits == 2


# --------------------------------------------------------------------------- resume
def _dump(*overrides: str) -> dict:
    from npo.config import public_dump

    return public_dump(load_config(None, ["train.steps=40", *overrides]))


@pytest.mark.parametrize(
    "overrides",
    [["train.threads=7"], ["algo.micro_batch_size=4"], ["train.steps=41"], ["train.steps=400"]],
)
def test_speed_settings_and_more_steps_may_change_on_resume(overrides):
    from npo.config import resume_conflicts

    assert resume_conflicts(_dump(), _dump(*overrides)) == []


@pytest.mark.parametrize(
    ("overrides", "conflict"),
    [
        (["algo.lr=1e-4"], "algo.lr: 5e-05 -> 0.0001"),
        (["train.steps=39"], "train.steps: 40 -> 39"),
        (["task.digits=2"], "task.digits: 3 -> 2"),
        (["task.kind=math", "task.train_path=a", "task.eval_path=b"], "task.kind: 'arithmetic'"),
    ],
)
def test_other_changes_on_resume_are_named(overrides, conflict):
    from npo.config import resume_conflicts

    conflicts = resume_conflicts(_dump(), _dump(*overrides))
    assert conflict in "; ".join(conflicts)
    both = resume_conflicts(_dump(), _dump(*overrides, "train.threads=7", "seed=3"))
    assert "seed: 0 -> 3" in both
    assert not any(c.startswith("train.threads") for c in both)
