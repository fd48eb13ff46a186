"""Scan the rendered chart with checkov; fail on any finding that baseline.yaml does not accept.

`make chart-check` runs it with the checkov of .tools/checkov-venv (pinned, kept out of the
project's lock). It renders helm/npo with the default values and with the production values
(a stand-in digest), runs `checkov --framework kubernetes` on both, and compares the failed
checks, as (check id, Kind.namespace.name), with baseline.yaml, where each accepted finding
has a one-line reason. A finding not in the baseline fails the check, and so does a baseline
entry nothing matches any more (delete it: the baseline lists what is accepted now).

    python helm/checkov/gate.py [--checkov PATH] [--helm PATH] [--counts]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "npo"
BASELINE = Path(__file__).with_name("baseline.yaml")
NAMESPACE = "kubeflow"
VARIANTS = {
    "default": ["--set", "credentials.offlineGeneration=generate"],
    "production": [
        "-f", str(ROOT / "helm" / "values-production.yaml"),
        "--set", "image.digest=sha256:" + "5e" * 32,  # stand-in: production requires one
    ],
}  # fmt: skip


def render(helm: str, chart: Path, out: Path, kube_version: str) -> None:
    for name, values in VARIANTS.items():
        done = subprocess.run(
            [helm, "template", "npo", str(chart), "--namespace", NAMESPACE,
             "--kube-version", kube_version, *values],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"chart-check: helm template ({name}) failed:\n{done.stderr}")
        (out / f"{name}.yaml").write_text(done.stdout)


def scan(checkov: str, folder: Path) -> set[tuple[str, str]]:
    """{(check id, resource)} of checkov's failed checks on the manifests in ``folder``."""
    done = subprocess.run(
        [checkov, "--directory", str(folder), "--framework", "kubernetes", "--output", "json",
         "--compact", "--quiet", "--skip-download"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode not in (0, 1):  # 1: there are failed checks
        sys.exit(f"chart-check: checkov failed ({done.returncode}):\n{done.stderr[-3000:]}")
    reports = json.loads(done.stdout or "[]")
    if isinstance(reports, dict):
        reports = [reports]
    found = set()
    for report in reports:
        for check in report.get("results", {}).get("failed_checks", []):
            found.add((check["check_id"], check["resource"]))
    return found


def load_baseline() -> dict[tuple[str, str], str]:
    entries = yaml.safe_load(BASELINE.read_text()) or []
    accepted = {}
    for entry in entries:
        if not str(entry.get("reason", "")).strip():
            sys.exit(f"chart-check: {BASELINE.name}: {entry} has no reason")
        accepted[(entry["check"], entry["resource"])] = entry["reason"]
    return accepted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkov", default=str(ROOT / ".tools" / "checkov-venv" / "bin" / "checkov"))
    p.add_argument("--helm", default=str(ROOT / ".tools" / "bin" / "helm"))
    p.add_argument("--chart", type=Path, default=CHART, help="another copy of the chart")
    p.add_argument("--kube-version", default="1.31.0")
    p.add_argument("--counts", action="store_true", help="only print the findings per check")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="npo-chart-check-") as tmp:
        render(args.helm, args.chart, Path(tmp), args.kube_version)
        found = scan(args.checkov, Path(tmp))
    if args.counts:
        counts: dict[str, int] = {}
        for check, _ in found:
            counts[check] = counts.get(check, 0) + 1
        for check, n in sorted(counts.items()):
            print(f"{check}\t{n}")
        print(f"total\t{len(found)}")
        return 0
    accepted = load_baseline()
    new = sorted(found - set(accepted))
    stale = sorted(set(accepted) - found)
    print(f"chart-check: checkov: {len(found)} findings, {len(found) - len(new)} accepted")
    for check, resource in new:
        print(f"  NEW    {check} {resource}: fix it, or accept it in {BASELINE.name} with a reason")
    for check, resource in stale:
        print(f"  STALE  {check} {resource}: no longer found; delete it from {BASELINE.name}")
    return 1 if new or stale else 0


if __name__ == "__main__":
    sys.exit(main())
