"""Build (or reuse) a project image: what `make images` and `make container-test` run.

    python3 images/build.py cpu ghcr.io/npo-project/npo:0.1.0-cpu [--base auto] [-- ARGS]

1. Puts what the build reads from the host into build/image-inputs/ (ignored by git, kept
   in the build context by .dockerignore): `ca.pem`, the CA bundle the host's pip trusts
   (its `cert` setting, PIP_CERT, SSL_CERT_FILE, else pip's own certifi bundle), and for the
   CPU flavor `wheels/torch-<lock's version>+cpu-...whl`, fetched by `pip download` where
   pip's configuration points, else from TORCH_INDEX_URL (PyTorch's CPU index), and
   `runtime.in`, what the CPU image installs for npo[cluster] (`runtime_requirements`: the
   pod's side only, so mlflow's client distribution); requirements.lock pins its versions.
2. Chooses the base: `--base IMAGE` as given; `--base auto` the Dockerfile's default if the
   engine has it or can pull it, else the Debian-built base of images/base-image.sh (made
   once, `make base-image`); no `--base`: the Dockerfile's default.
3. Reuses the tagged image when its `org.npo.inputs` label equals the hash of everything the
   build reads (Dockerfile, locks, pyproject.toml, README.md, .dockerignore, src/, configs/,
   the inputs above, the base's image id, the extra build arguments); else builds it with
   host networking (a build container gets no network of its own under
   `dockerd --bridge=none`) and that label.

Stdlib only: runs with the host's python3 before any venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS = REPO / "build" / "image-inputs"
LABEL = "org.npo.inputs"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
DEBIAN_BASE = "npo-base:bookworm-python3.11"
# A pipeline pod only talks to an MLflow server: mlflow-skinny, the same `mlflow` module
# without the server's dependencies (Flask, gunicorn, pandas, scipy, scikit-learn: 250 MB
# of the CPU image). The lock pins it, at mlflow's version, as mlflow's own dependency.
CLIENT_ONLY = {"mlflow": "mlflow-skinny"}
# What the Dockerfiles COPY from the context, besides build/image-inputs/.
HASHED = ["requirements.lock", "images/requirements-cuda.lock", "pyproject.toml", "README.md",
          ".dockerignore", "src", "configs"]  # fmt: skip


def log(message: str) -> None:
    print(f"images/build.py: {message}", flush=True)


def docker(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    command = [os.environ.get("DOCKER", "docker"), *args]
    return subprocess.run(command, check=check, text=True, capture_output=capture)


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], text=True, capture_output=True)


# --------------------------------------------------------------------------- inputs
def ca_bundle() -> Path:
    """The CA bundle this host's pip uses."""
    configured = [os.environ.get("PIP_CERT", "")]
    listing = pip("config", "list").stdout
    configured += re.findall(r"^[\w:.-]*\bcert='([^']+)'", listing, re.M)
    configured += [os.environ.get("SSL_CERT_FILE", ""), os.environ.get("REQUESTS_CA_BUNDLE", "")]
    for path in configured:
        if path and Path(path).is_file():
            return Path(path)
    # None configured: pip's own default, its vendored certifi bundle.
    where = "from pip._vendor import certifi; print(certifi.where())"
    out = subprocess.run([sys.executable, "-c", where], text=True, capture_output=True, check=True)
    return Path(out.stdout.strip())


def torch_version() -> str:
    lock = (REPO / "requirements.lock").read_text()
    match = re.search(r"^torch==(\S+)$", lock, re.M)
    if not match:
        raise SystemExit("requirements.lock pins no torch")
    return match.group(1)


def torch_wheel(folder: Path, index_url: str) -> Path:
    """torch's CPU wheel for the image's Python (CPython 3.11, x86-64 manylinux)."""
    spec = f"torch=={torch_version()}+cpu"
    pattern = f"torch-{torch_version()}+cpu-cp311-cp311-*.whl"
    for old in folder.glob("torch-*.whl"):
        if not old.match(pattern):
            old.unlink()
    have = sorted(folder.glob(pattern))
    if have:
        return have[-1]
    target = ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
              "--platform", "manylinux_2_28_x86_64", "--no-deps", "-d", str(folder)]  # fmt: skip
    for extra in ([], ["--index-url", index_url]):  # pip's own configuration first
        where = " ".join(extra) or "pip's configuration"
        log(f"fetching {spec} ({where})")
        result = pip("download", "-q", *target, *extra, spec)
        have = sorted(folder.glob(pattern))
        if result.returncode == 0 and have:
            return have[-1]
    raise SystemExit(f"cannot fetch {spec}: {result.stderr.strip()[-2000:]}")


def lock_pins() -> dict[str, str]:
    """name -> version of requirements.lock, names normalised as pip does."""
    lock = (REPO / "requirements.lock").read_text()
    return {normalise(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock, re.M)}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements() -> list[str]:
    """What the CPU image installs besides torch: npo's dependencies and its cluster extra
    (pyproject.toml), mlflow as its client (CLIENT_ONLY). Each must be
    in requirements.lock, which the image installs as constraints: the versions the tests
    ran with, and no pin to keep in step by hand."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["cluster"]]
    pins = lock_pins()
    out = []
    for text in wanted:
        name = normalise(re.match(r"[A-Za-z0-9._-]+", text).group())
        if name == "torch":  # the CPU wheel, installed by its own pin (Dockerfile.cpu)
            continue
        if name in CLIENT_ONLY:
            client = CLIENT_ONLY[name]
            if pins.get(client) != pins.get(name):
                raise SystemExit(f"requirements.lock: {client} is not at {name}'s version")
            text = client
        elif name not in pins:
            raise SystemExit(f"requirements.lock pins no {name}: `make lock`")
        out.append(text)
    return out


def prepare_inputs(flavor: str, index_url: str) -> None:
    wheels = INPUTS / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    bundle = ca_bundle()
    shutil.copyfile(bundle, INPUTS / "ca.pem")
    log(f"CA bundle: {bundle}")
    if flavor == "cpu":
        log(f"torch wheel: {torch_wheel(wheels, index_url).name}")
        (INPUTS / "runtime.in").write_text("\n".join(runtime_requirements()) + "\n")


# --------------------------------------------------------------------------- base image
def image_id(ref: str) -> str | None:
    result = docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def dockerfile_base(dockerfile: Path) -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.M)
    if not match:
        raise SystemExit(f"{dockerfile} has no ARG BASE_IMAGE default")
    return match.group(1)


def choose_base(requested: str | None, dockerfile: Path) -> str:
    default = dockerfile_base(dockerfile)
    if requested and requested != "auto":
        return requested
    if requested is None or image_id(default):
        return default
    log(f"pulling {default}")
    try:
        if docker("pull", "-q", default, check=False).returncode == 0:
            return default
    except subprocess.TimeoutExpired:
        pass
    if not image_id(DEBIAN_BASE):
        log(f"no registry: building {DEBIAN_BASE} from Debian packages (images/base-image.sh)")
        subprocess.run(["sh", str(REPO / "images" / "base-image.sh"), DEBIAN_BASE], check=True)
    return DEBIAN_BASE


# --------------------------------------------------------------------------- reuse
def inputs_hash(dockerfile: Path, base_id: str, extra: list[str]) -> str:
    digest = hashlib.sha256()
    paths = [dockerfile, *(REPO / p for p in HASHED), INPUTS]
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
                continue
            digest.update(str(path.relative_to(REPO)).encode() + b"\0")
            if path.suffix == ".whl":  # a wheel is named by its version: skip 200 MB of reading
                digest.update(str(path.stat().st_size).encode())
            else:
                digest.update(path.read_bytes())
    digest.update(json.dumps([base_id, extra]).encode())
    return digest.hexdigest()[:32]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s FLAVOR TAG [options] [-- ARGS]"
    )
    parser.add_argument("flavor", choices=["cpu", "cuda"])
    parser.add_argument("tag")
    parser.add_argument("--base", help="base image, or 'auto' (see the module docstring)")
    parser.add_argument("--torch-index-url", default=TORCH_INDEX_URL)
    parser.add_argument("--rebuild", action="store_true", help="build even if up to date")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.build_args = argv[split + 1 :]  # more `docker build` arguments, after --

    dockerfile = REPO / "images" / f"Dockerfile.{args.flavor}"
    prepare_inputs(args.flavor, args.torch_index_url)
    base = choose_base(args.base or None, dockerfile)
    base_id = image_id(base) or base  # not pulled yet: the build pulls it
    wanted = inputs_hash(dockerfile, base_id, args.build_args)
    current = docker(
        "image", "inspect", "--format", f'{{{{ index .Config.Labels "{LABEL}" }}}}', args.tag,
        check=False,
    ).stdout.strip()  # fmt: skip
    if current == wanted and not args.rebuild:
        log(f"{args.tag} is up to date (inputs {wanted}): reused")
        return 0
    log(f"building {args.tag} on {base}")
    start = time.monotonic()
    command = ["build", "--network", "host", "-f", str(dockerfile), "-t", args.tag,
               "--label", f"{LABEL}={wanted}", "--build-arg", f"BASE_IMAGE={base}",
               *args.build_args, str(REPO)]  # fmt: skip
    docker(*command, capture=False)
    size = docker("image", "inspect", "--format", "{{.Size}}", args.tag).stdout.strip()
    log(f"built {args.tag} in {time.monotonic() - start:.0f} s, {int(size) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
