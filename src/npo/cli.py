"""The `npo` command.

    npo run [CONFIG] [--set key.path=value ...] [--fresh]   warm-up + RL, report, resumable
    npo compare CONFIG CONFIG ... [--name NAME]            several runs, one comparison
    npo eval CHECKPOINT [--config CONFIG]                   greedy pass@1 of a checkpoint
    npo show-config [CONFIG] [--set ...]                    the validated config as YAML
    npo compile [CONFIG ...] [--out pipelines/compiled]     Kubeflow pipeline YAML per config
    npo components [--out components]                       a component YAML per stage
    npo submit CONFIG --host URL [--experiment N] [--wait]  run it on a Kubeflow cluster

Exit codes: 0 ok, 1 the run failed, 2 bad input (config, paths) or an unreachable endpoint,
130 / 143 stopped by Ctrl-C / SIGTERM (marked interrupted; the same command resumes it).
Progress: bars on a terminal, plain lines in a pipe or file, `--log-format json` for machines.
`npo --version` prints the version; `-h` is `--help` on every command.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from npo.config import ConfigError, ExperimentConfig, load_config, public_dump
from npo.experiment import Engine
from npo.progress import LogFormat, RunOutput

EXIT_CODES = (
    "Exit codes: 0 ok; 1 the run failed (the message names the failed task and its log); "
    "2 bad input (config, paths, datasets, a run name started with another config) or an "
    "unreachable endpoint (S3, database, MLflow); 130 stopped by Ctrl-C, 143 by SIGTERM (the "
    "run is marked interrupted and the same command resumes it)."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Near-Future Policy Optimization experiments.",
    epilog=EXIT_CODES,
    # -h as well as --help, on every command (subcommands inherit the context settings).
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"npo {package_version('npo')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Near-Future Policy Optimization experiments."""


console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[
    Path | None, typer.Argument(help="Experiment YAML (embedded defaults when omitted).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field: key.path=value (repeatable)."),
]


def _quiet_libraries(engine: str = "direct") -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if engine != "direct":  # the pipeline's tasks quiet themselves: no transformers here
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: object) -> NoReturn:
    """Report bad input (exit code 2). Text, not markup: messages may hold [brackets]."""
    err_console.print(Text("error: ", style="bold red") + Text(str(message)))
    raise typer.Exit(2)


def _unreachable() -> tuple[type[Exception], ...]:
    """Errors that already name an unreachable or refusing endpoint (S3, database, MLflow):
    shown as one line, no traceback."""
    from npo.store.metadata import MetadataDBUnavailable
    from npo.store.tracking import TrackingUnavailable

    errors: list[type[Exception]] = [MetadataDBUnavailable, TrackingUnavailable]
    try:
        from npo.store.s3 import StoreError

        errors.append(StoreError)
    except ImportError:  # minio is an optional extra
        pass
    return tuple(errors)


def _load(config: Path | None, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _fail(e)


def _preflight(cfg: ExperimentConfig, source: object = None, **scope: Any) -> None:
    """Refuse (exit 2) what npo.preflight finds before anything is written, and print its
    warnings; `source` (a config path) prefixes the messages, `scope` goes to the check."""
    from npo.preflight import PreflightError, check_before_start

    prefix = f"{source}: " if source is not None else ""
    try:
        warnings = check_before_start(cfg, **scope)
    except PreflightError as e:
        _fail(f"{prefix}{e}")
    for warning in warnings:
        err_console.print(Text("warning: ", style="yellow") + Text(prefix + warning))


def _summary_table(summary: dict) -> Table:
    table = Table(title="run summary", show_header=False)
    for key, value in summary.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, text)
    return table


EngineOpt = Annotated[
    Engine,
    typer.Option(
        help="pipeline: the Kubeflow pipeline through kfp.local (what a cluster runs); "
        "direct: the same stages called in this process.",
    ),
]
Runner = Literal["subprocess", "docker"]  # npo.pipelines.local.RUNNERS
RunnerOpt = Annotated[
    Runner,
    typer.Option(
        help="How kfp.local runs the pipeline's tasks: subprocess (warm, on this machine) or "
        "docker (each in its container of cluster.image, built by `make images`).",
    ),
]


@contextlib.contextmanager
def _pinned_console() -> Iterator[None]:
    """Keep the bars on the terminal while kfp.local's task logs go to pipeline.log (it
    redirects sys.stdout; rich otherwise follows sys.stdout)."""
    console.file = sys.stdout
    try:
        yield
    finally:
        console.file = None  # type: ignore[assignment]  # back to following sys.stdout


def _bad_input() -> tuple[type[Exception], ...]:
    from npo.rollout.vllm import VllmUnavailable
    from npo.steps.context import RunConflict
    from npo.store.inputs import InputError
    from npo.tasks import TaskError

    return (RunConflict, TaskError, VllmUnavailable, InputError, *_unreachable())


@contextlib.contextmanager
def _run_errors(output: RunOutput) -> Iterator[None]:
    """Bad input or endpoints: exit 2; a pipeline task that failed: exit 1; Ctrl-C or
    SIGTERM: exit 130 or 143. A run that stopped ends with one line that says how, how it
    was marked, and where a rerun resumes."""
    from npo.interrupts import exit_code, signal_of, terminate_as_interrupt
    from npo.pipelines.local import PipelineFailed

    def said(e: BaseException) -> str:  # its message and the notes the run added to it
        return "; ".join(part for part in [str(e), *getattr(e, "__notes__", [])] if part)

    try:
        with terminate_as_interrupt():
            yield
    except KeyboardInterrupt as e:
        output.stopped("interrupted", "; ".join(p for p in (signal_of(e).name, said(e)) if p))
        raise typer.Exit(exit_code(e)) from None
    except _bad_input() as e:
        _fail(e)
    except PipelineFailed as e:
        output.stopped("failed", said(e))
        raise typer.Exit(1) from None


LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        help="auto: bars on a terminal, plain lines elsewhere (a pipe, a log file); rich: "
        "bars; plain: one full line per step or few seconds; json: one JSON object per "
        "line and event.",
    ),
]
QuietOpt = Annotated[bool, typer.Option(help="No progress, only messages and the summary.")]


@app.command(epilog=EXIT_CODES)
def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    fresh: Annotated[bool, typer.Option(help="Delete a previous run of this name first.")] = False,
    quiet: QuietOpt = False,
    engine: EngineOpt = "pipeline",
    runner: RunnerOpt = "subprocess",
    log_format: LogFormatOpt = "auto",
) -> None:
    """Run (or resume) an experiment locally: warm-up, RL, evaluation, report."""
    if runner != "subprocess" and engine != "pipeline":
        _fail(f"--runner {runner} runs the pipeline's tasks: it needs --engine pipeline")
    cfg = _load(config, set_)
    _preflight(cfg, fresh=fresh)
    _quiet_libraries(engine)
    from npo.experiment import run_experiment
    from npo.progress import make_output

    output = make_output(log_format, console, err_console, quiet)
    output.notice(f"npo run {cfg.name}: method={cfg.method} task={cfg.task.kind} engine={engine}")
    with _run_errors(output), _pinned_console(), output:
        summary = run_experiment(cfg, fresh, output, engine, notify=output.notice, runner=runner)
    output.summary(summary)
    output.notice(f"report: {summary['report']}")


@app.command(epilog=EXIT_CODES)
def compare(
    configs: Annotated[
        list[Path], typer.Argument(help="Two or more experiment YAMLs, baseline first.")
    ],
    name: Annotated[str, typer.Option(help="Folder (under store.root) of the report.")] = (
        "comparison"
    ),
    set_: SetOpt = None,
    threshold: Annotated[
        float | None, typer.Option(help="Eval accuracy for the steps-to-threshold column.")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Delete previous runs of these names.")] = False,
    quiet: QuietOpt = False,
    engine: EngineOpt = "pipeline",
    runner: RunnerOpt = "subprocess",
    log_format: LogFormatOpt = "auto",
) -> None:
    """Run several experiments (sharing the first one's warm-up) and compare them."""
    if len(configs) < 2:
        # One config is `npo run`; starting it as a comparison of one would train for nothing.
        _fail(f"compare needs at least two configs (a baseline and another), got {len(configs)}")
    if runner != "subprocess" and engine != "pipeline":
        _fail(f"--runner {runner} runs the pipeline's tasks: it needs --engine pipeline")
    cfgs = [_load(c, set_) for c in configs]
    if len({c.name for c in cfgs}) != len(cfgs):
        _fail("compare: every config needs its own name (set name: in each file)")
    for i, (path, cfg) in enumerate(zip(configs, cfgs, strict=True)):
        # a run may name an earlier one of the comparison: it will exist by then
        _preflight(cfg, path, fresh=fresh, planned={c.name for c in cfgs[:i]})
    _quiet_libraries(engine)
    from npo.compare import run_comparison
    from npo.progress import make_output

    output = make_output(log_format, console, err_console, quiet)
    output.notice(f"npo compare {', '.join(f'{c.name} ({c.method})' for c in cfgs)}")
    with _run_errors(output), _pinned_console(), output:
        png, md, summaries = run_comparison(
            cfgs, name, threshold, fresh, output, engine, notify=output.notice, runner=runner
        )
    for summary in summaries:
        output.summary(summary)
    output.comparison(md.read_text(), {"markdown": str(md), "plot": str(png)})


@app.command("eval", epilog=EXIT_CODES)
def eval_(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint folder (with policy/) or an HF model folder.")
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="Config naming the task (default: the run's config.yaml)."),
    ] = None,
    set_: SetOpt = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N problems.")] = None,
) -> None:
    """Greedy pass@1 of a checkpoint on the task's held-out problems."""
    from npo.steps.checkpoint_eval import find_run_config, resolve_policy_dir
    from npo.store.checkpoint import CheckpointError

    try:
        policy_dir = resolve_policy_dir(checkpoint)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        _fail(e)
    cfg = _load(config or find_run_config(checkpoint), set_)
    _quiet_libraries()
    from npo.policy.model import load_policy
    from npo.stages import use_compute
    from npo.steps.evaluate import eval_settings, evaluate_policy
    from npo.tasks import TaskError, make_task

    try:
        use_compute(cfg)  # the run's device and compute dtype, as its evaluations had
        task = make_task(cfg.task)
    except (TaskError, RuntimeError) as e:
        _fail(e)
    model, tokenizer = load_policy(policy_dir, cfg.model.dtype)
    problems = task.eval_problems()[:limit]
    result = evaluate_policy(model, tokenizer, task, problems, **eval_settings(cfg))
    console.print(_summary_table({"checkpoint": str(checkpoint), **result}))


@app.command("show-config", epilog=EXIT_CODES)
def show_config(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Print the validated config (defaults filled in) as YAML."""
    cfg = _load(config, set_)
    # Plain echo: rich would hard-wrap long values and break the YAML when piped to a file.
    typer.echo(yaml.safe_dump(public_dump(cfg), sort_keys=False), nl=False)


@app.command("compile", epilog=EXIT_CODES)
def compile_(
    configs: Annotated[
        list[Path] | None,
        typer.Argument(help="Experiment YAMLs (default: every configs/*.yaml)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder of the compiled YAML.")] = Path(
        "pipelines/compiled"
    ),
    set_: SetOpt = None,
) -> None:
    """Compile configs to Kubeflow pipeline YAML: <out>/<config stem>.yaml each."""
    from npo.pipelines.compile import DEFAULT_CONFIGS, compile_config, shipped_configs

    paths = configs or shipped_configs(DEFAULT_CONFIGS)
    if not paths:
        _fail(f"no configs given and none in {DEFAULT_CONFIGS}/")
    for path in paths:
        try:
            target = compile_config(path, out, set_ or [])
        except ConfigError as e:
            _fail(e)
        console.print(f"{path} -> {target}", markup=False, highlight=False)


@app.command("components", epilog=EXIT_CODES)
def components_(
    out: Annotated[Path, typer.Option(help="Folder of the component folders.")] = Path(
        "components"
    ),
) -> None:
    """Compile every stage to <out>/<stage>/component.yaml with a README (kfp-loadable)."""
    from npo.pipelines.compile import write_components

    for path in write_components(out):
        console.print(str(path), markup=False, highlight=False)


@app.command("prompt-template", epilog=EXIT_CODES)
def prompt_template(
    model: Annotated[str, typer.Argument(help="A model folder, or a store URI of one.")],
    system: Annotated[
        str | None, typer.Option(help="A system message before the user's turn.")
    ] = None,
) -> None:
    """Print the model's chat format as a task.prompt_template, to paste into a config."""
    from transformers import AutoTokenizer

    from npo.policy.chat import chat_prompt_template
    from npo.store.inputs import InputError, fetch_folder

    try:
        folder = fetch_folder(model)
        if not (folder / "tokenizer_config.json").is_file():
            _fail(f"{model}: no tokenizer_config.json, not a model folder")
        text = chat_prompt_template(AutoTokenizer.from_pretrained(folder), system)
    except (InputError, ValueError, *_unreachable()) as e:
        _fail(e)
    # YAML, so that newlines and quotes survive the paste; plain echo: no rich wrapping.
    typer.echo(yaml.safe_dump({"task": {"prompt_template": text}}, width=1 << 16), nl=False)


@app.command(epilog=EXIT_CODES)
def stage(
    source: Annotated[Path, typer.Argument(help="A model folder or a dataset file.")],
    uri: Annotated[str, typer.Argument(help="Destination in the object store: s3://bucket/key.")],
) -> None:
    """Upload a model folder or a dataset file to the object store, for runs on a cluster:
    configs then name the URI in model.source or task.train_path / eval_path."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from npo.store.inputs import InputError
    from npo.store.inputs import stage as stage_input

    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    with Progress(
        TextColumn("stage"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.description}"),
        console=err_console,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=sum(p.stat().st_size for p in files))

        def advance(rel: str, size: int) -> None:
            bar.update(task, advance=size, description=rel)

        try:
            done = stage_input(source, uri, advance)
        except (InputError, *_unreachable()) as e:
            _fail(e)
        except ValueError as e:  # the S3 SDK refuses a bad name, e.g. a bucket of < 3 chars
            _fail(f"{uri}: {e}")
    console.print(
        f"{source} -> {done['uri']}: {done['files']} files, {done['bytes'] / 1e6:.1f} MB",
        markup=False,
        highlight=False,
        soft_wrap=True,  # paths and URIs stay whole, to copy from
    )


@app.command(epilog=EXIT_CODES)
def submit(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    host: Annotated[
        str,
        typer.Option(envvar="KFP_HOST", help="Kubeflow Pipelines API, e.g. http://localhost:8080."),
    ],
    experiment: Annotated[
        str | None, typer.Option(help="KFP experiment (default: tracking.experiment).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the run; exit 1 unless it succeeds.")] = (
        False
    ),
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 24 * 3600.0,
    set_: SetOpt = None,
) -> None:
    """Compile CONFIG, upload it to Kubeflow Pipelines and start a run (prints its link)."""
    cfg = _load(config, set_)
    _preflight(cfg, where="cluster")  # the cluster's machines, files and DB are not ours
    from npo.pipelines.submit import (
        FINAL_STATES,
        HostUnreachable,
        cluster_warnings,
        connect,
        submit_experiment,
        wait_for_run,
    )

    for warning in cluster_warnings(cfg):
        err_console.print(Text("warning: ", style="yellow") + Text(warning))
    try:
        client = connect(host)
        done = submit_experiment(client, cfg, host, experiment or cfg.tracking.experiment)
        console.print(f"run: {done.url}", markup=False, highlight=False)
        state = wait_for_run(client, host, done.run_id, timeout) if wait else None
    except HostUnreachable as e:
        _fail(e)
    if state is None:
        return
    if state == "SUCCEEDED":
        console.print(f"run {done.run_id} succeeded", markup=False)
        return
    if state in FINAL_STATES:
        err_console.print(f"run {done.run_id} ended {state}: {done.url}", markup=False)
    else:
        err_console.print(f"run {done.run_id} still {state} after {timeout:g} s", markup=False)
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
