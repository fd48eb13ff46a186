"""``python -m npo.devservices``: S3 + PostgreSQL + MLflow on 127.0.0.1 for `npo run`.

    python -m npo.devservices            # start, print the export lines, wait for Ctrl-C
    python -m npo.devservices --check    # start, verify each endpoint, print status, stop

Progress goes to stderr; stdout carries only the export lines (and, with --check, one
status line per service), so `... > env.sh` captures them. The same lines are written to
<state-dir>/env.sh (mode 0600) for a second shell: `source .services/env.sh`.
Exit status: 0 ok; 1 a service failed (to start, a check, or while running); 2 bad usage
(also a stack already running from the same state dir).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from npo.devservices.stack import DEFAULT_PORTS, DEFAULT_STATE_DIR, DevStack, StackError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m npo.devservices",
        description="Start a local S3 (SeaweedFS), PostgreSQL and MLflow server on 127.0.0.1 "
        "and print the environment that points `npo run` at them.",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="data, logs and credentials; reused by the next start (default: %(default)s)",
    )
    p.add_argument("--check", action="store_true", help="start, verify every endpoint, print, stop")
    p.add_argument(
        "--fresh", action="store_true", help="delete the state dir's data and credentials first"
    )
    for name, port in DEFAULT_PORTS.items():
        p.add_argument(
            f"--{name.replace('postgres', 'pg')}-port",
            dest=f"{name}_port",
            type=int,
            default=None,
            metavar="N",
            help=f"{name} port (default: the last one, else {port}, else any free one; 0: any)",
        )
    return p


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP (terminal closed) all stop the stack cleanly.

    SIGINT is set explicitly: a shell without job control starts `cmd &` with SIGINT
    ignored, and Python then keeps it ignored."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    stack = DevStack(args.state_dir, ports=ports, fresh=args.fresh, say=_say)
    _stop_on_signals()
    try:
        _say(f"starting S3, PostgreSQL and MLflow under {stack.state_dir} ...")
        try:
            stack.start()
        except StackError as e:
            _say(f"error: {e}")
            return 2 if "already run" in str(e) or "in use" in str(e) else 1
        except Exception as e:
            _say(f"error: a service failed to start: {type(e).__name__}: {e}")
            return 1
        for line in stack.export_lines():
            print(line, flush=True)
        if args.check:
            statuses = stack.check()
            for status in statuses:
                print(status.line(), flush=True)
            return 0 if all(s.ok for s in statuses) else 1
        _say(
            f"\nready; in another shell: source {stack.state_dir / 'env.sh'}\n"
            "Ctrl-C stops all three (data and credentials stay for the next start)"
        )
        while True:
            time.sleep(0.5)
            dead = stack.dead()
            if dead:
                _say(f"error: {', '.join(dead)} stopped unexpectedly; see the logs under "
                     f"{stack.state_dir}")  # fmt: skip
                return 1
    except KeyboardInterrupt:
        _say("stopping ...")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        try:
            stack.stop()
        except StackError as e:
            _say(f"error while stopping: {e}")
        _say("stopped")


if __name__ == "__main__":
    sys.exit(main())
