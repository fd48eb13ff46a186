r"""Math word problems from JSONL files, graded by math-verify in a child process.

Each non-blank line of `task.train_path` / `task.eval_path` is one JSON object with a string
"prompt" and an "answer" (a string, or a JSON number which is read as its text); other keys
are ignored:

    {"prompt": "What is 1/4 + 1/4?", "answer": "\\frac{1}{2}"}
    {"prompt": "How many legs do 3 cats have?", "answer": 12}

A malformed line raises `TaskError` naming the file and its 1-based line number, e.g.
`data/train.jsonl:7: missing key 'answer'`. The model sees
`task.prompt_template` with "{prompt}" replaced (other braces are left alone), and the
supervised warm-up target is the answer text itself.

Grading parses the gold answer and the response with math-verify, so "0.5", "1/2",
"\frac{1}{2}" and "... the answer is $\boxed{0.5}$" all match a gold "1/2". It runs in a
persistent worker process (see `_verify_worker.py`) because math-verify's timeouts rely on
signal.alarm, which only works in the main thread and cannot stop a hang inside C code.
Each item gets `task.timeout_s` (a soft timeout in the worker); if the worker still has not
answered `grace_s` later it is killed and restarted, and the item gets "timeout". Use
`verify_batch` to grade a whole rollout batch in one round-trip, and close the task (or use
it as a context manager) to stop the worker; it is also stopped at exit.

    with MathTask(MathTaskConfig(train_path="train.jsonl", eval_path="eval.jsonl")) as task:
        verdicts = task.verify_batch(problems, responses)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npo.config import MathTaskConfig
from npo.store.inputs import InputError, fetch_file
from npo.tasks.base import Problem, TaskError, Verdict, check_batch, clip

MAX_RESPONSE_CHARS = 4000  # longer responses get "too long" without being parsed
BUDGET_SPENT = "timeout: batch budget spent"  # as _verify_worker.py says it
_WORKER = Path(__file__).with_name("_verify_worker.py")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


# --------------------------------------------------------------------------- dataset
def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), "number")


def _parse_line(line: str, where: str) -> tuple[str, str]:
    """(prompt, answer) of one JSONL line; TaskError prefixed with `where` if malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    values = []
    for key in ("prompt", "answer"):
        if key not in obj:
            raise TaskError(f"{where}: missing key {key!r}")
        value = obj[key]
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if key == "answer" and is_number and math.isfinite(value):
            value = str(value)
        if not isinstance(value, str):
            raise TaskError(f"{where}: {key!r} must be a string, got {_json_type(value)}")
        if not value.strip():
            raise TaskError(f"{where}: empty {key!r}")
        values.append(value)
    return values[0], values[1].strip()


def load_problems(path: str | Path, split: str, prompt_template: str = "{prompt}") -> list[Problem]:
    """Read one JSONL split into Problems with ids "math-<split>-000000", ... .

    `path` is a local path or a store URI (fetched first); errors name it as given, with the
    line number."""
    return [problem for _, problem in _read_problems(path, split, prompt_template)]


def _read_problems(path: str | Path, split: str, prompt_template: str) -> list[tuple[str, Problem]]:
    """load_problems, each problem with where it was read ("path:line")."""
    try:
        local = fetch_file(str(path))
    except InputError as e:
        raise TaskError(str(e)) from None
    try:
        data = local.read_bytes()
    except FileNotFoundError:
        raise TaskError(f"{path}: file not found") from None
    except OSError as e:
        raise TaskError(f"{path}: cannot read ({e.strerror})") from None
    problems: list[tuple[str, Problem]] = []
    # Split bytes on "\n" only: str.splitlines would also split inside JSON on U+2028 etc.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            raise TaskError(f"{where}: not valid UTF-8") from None
        if not line.strip():
            continue
        prompt, answer = _parse_line(line, where)
        problem = Problem(
            id=f"math-{split}-{len(problems):06d}",
            prompt=prompt_template.replace("{prompt}", prompt),
            answer=answer,
            target=answer,
        )
        problems.append((where, problem))
    if not problems:
        raise TaskError(f"{path}: no problems in file")
    return problems


def check_gold_answers(verifier: MathVerifier, problems: Sequence[tuple[str, Problem]]) -> None:
    """Refuse answers that do not verify against themselves: the warm-up teaches the target
    (the answer's text), and a response equal to it would score 0 on every step. Each
    distinct answer is graded once, without the batch budget."""
    answers = sorted({p.answer for _, p in problems})
    verdicts = dict(zip(answers, verifier.grade([(a, a) for a in answers], math.inf), strict=True))
    bad = [(where, p.answer) for where, p in problems if verdicts[p.answer].reward <= 0]
    if bad:
        lines = "; ".join(f"{w}: {a!r} ({verdicts[a].reason})" for w, a in bad[:3])
        raise TaskError(
            f"{len(bad)} gold answer(s) do not verify against themselves, so a response "
            f"equal to one scores 0: {lines}; write them as math-verify reads them "
            "(a number, a LaTeX expression, or $...$)"
        )


# --------------------------------------------------------------------------- worker client
class _LineReader:
    """Reads lines from a pipe with a deadline (no thread: selectors on the raw fd)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(fd, selectors.EVENT_READ)

    def readline(self, timeout_s: float) -> bytes | None:
        """The next line, None when `timeout_s` passes first; EOFError when the pipe closes."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                return None
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        self._sel.close()


def _stop_process(proc: subprocess.Popen[bytes], graceful: bool) -> None:
    """End the worker: EOF on stdin lets it exit by itself; kill it if that is not enough."""
    if proc.poll() is None:
        if graceful:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None and not pipe.closed:
            with contextlib.suppress(OSError):
                pipe.close()


class MathVerifier:
    """Grades (gold, response) pairs in a persistent math-verify worker with hard timeouts.

    The worker starts on first use and restarts after a hard timeout or a crash, so a
    verifier stays usable after `close()` too. Safe to share between threads (calls queue).
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        grace_s: float = 1.0,
        start_timeout_s: float = 120.0,
        batch_budget_s: float | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        # one `grade` call's total time: with 128 hard responses x timeout_s a step could
        # take minutes; what is left ungraded when it is spent scores 0 ("timeout: ...")
        self.batch_budget_s = batch_budget_s
        self.grace_s = grace_s  # the worker's own timeout comes first; this covers C hangs
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: _LineReader | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, None when none runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def grade(
        self, pairs: Sequence[tuple[str, str]], budget_s: float | None = None
    ) -> list[Verdict]:
        """Verdicts for (gold, response) pairs, in order; never raises on a response. The
        call takes at most `budget_s` (default batch_budget_s; None: no cap) plus a grace."""
        verdicts: list[Verdict | None] = []
        items: list[dict[str, Any]] = []
        for gold, response in pairs:
            if not response.strip():
                verdicts.append(Verdict(0.0, "empty"))
            elif len(response) > MAX_RESPONSE_CHARS:
                verdicts.append(Verdict(0.0, "too long"))
            else:
                verdicts.append(None)
                items.append({"gold": gold, "response": response})
        budget = self.batch_budget_s if budget_s is None else budget_s
        graded = iter(self._run(items, budget) if items else [])
        return [v if v is not None else next(graded) for v in verdicts]

    def _run(self, items: list[dict[str, Any]], budget_s: float | None = None) -> list[Verdict]:
        """Send raw worker items (see _verify_worker.py) and collect one verdict per item,
        within `budget_s` in all (None: no cap)."""
        deadline = time.monotonic() + (budget_s if budget_s is not None else math.inf)
        with self._lock:
            out: list[Verdict] = []
            while len(out) < len(items):  # each pass grades at least one item
                rest = items[len(out) :]
                left = max(deadline - time.monotonic(), 0.0)
                if left == 0:  # spent while a restarted worker was starting
                    out += [Verdict(0.0, BUDGET_SPENT)] * len(rest)
                    break
                budget = None if math.isinf(left) else left
                reader = self._send(
                    {"timeout_s": self.timeout_s, "budget_s": budget, "items": rest}
                )
                for _ in rest:
                    wait = min(self.timeout_s, max(deadline - time.monotonic(), 0.0))
                    try:
                        line = reader.readline(wait + self.grace_s)
                    except EOFError:
                        out.append(Verdict(0.0, "verifier crashed"))
                        self._stop(graceful=False)
                        break
                    if line is None:  # hung where its own alarm cannot reach: kill it
                        out.append(Verdict(0.0, "timeout"))
                        self._stop(graceful=False)
                        break
                    msg = json.loads(line)
                    out.append(Verdict(float(msg["reward"]), clip(str(msg["reason"]), 200)))
            return out

    def _send(self, request: dict[str, Any]) -> _LineReader:
        data = (json.dumps(request) + "\n").encode("ascii")
        for _ in range(2):  # a worker that died while idle is restarted once
            reader = self._start()
            try:
                self._proc.stdin.write(data)  # type: ignore[union-attr]
                self._proc.stdin.flush()  # type: ignore[union-attr]
                return reader
            except OSError:
                self._stop(graceful=False)
        raise RuntimeError("math-verify worker keeps dying (see its stderr)")

    def _start(self) -> _LineReader:
        if self._proc is not None and self._proc.poll() is None and self._reader is not None:
            return self._reader
        self._stop(graceful=False)
        # -P: do not put this package's folder first on sys.path (its modules would shadow).
        proc = subprocess.Popen(
            [sys.executable, "-P", str(_WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        # Stop the worker when this verifier is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_process, proc, False)
        self._proc, self._reader = proc, _LineReader(proc.stdout.fileno())  # type: ignore[union-attr]
        try:
            ready = self._reader.readline(self.start_timeout_s)
        except EOFError:
            ready = None
        if ready is None or json.loads(ready) != {"ready": True}:
            self._stop(graceful=False)
            raise RuntimeError("math-verify worker did not start (see its stderr)")
        return self._reader

    def _stop(self, graceful: bool) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._proc is not None:
            _stop_process(self._proc, graceful)
        if self._reader is not None:
            self._reader.close()
        self._proc = self._reader = self._finalizer = None

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        with self._lock:
            self._stop(graceful=True)

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- task
class MathTask:
    """Problems from two JSONL files, verified by math-verify (see the module docstring)."""

    name = "math"

    def __init__(self, cfg: MathTaskConfig) -> None:
        self.cfg = cfg
        self._read = _read_problems(cfg.train_path, "train", cfg.prompt_template)
        self._read += _read_problems(cfg.eval_path, "eval", cfg.prompt_template)
        self.verifier = MathVerifier(cfg.timeout_s, batch_budget_s=cfg.batch_timeout_s)
        self._train = [p for _, p in self._read if p.id.startswith("math-train-")]
        self._eval = [p for _, p in self._read if p.id.startswith("math-eval-")]

    def check_gold_answers(self) -> None:
        """Refuse gold answers that do not verify against themselves (TaskError naming the
        lines). About 2 ms per distinct answer, so the run's first stage calls it once
        (the warm-up), not every task that builds the task."""
        check_gold_answers(self.verifier, self._read)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def verify(self, problem: Problem, response: str) -> Verdict:
        return self.verify_batch([problem], [response])[0]

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
        check_batch(problems, responses)
        return self.verifier.grade(
            [(p.answer, r) for p, r in zip(problems, responses, strict=True)]
        )

    def alphabet(self) -> str:
        chars = {c for p in self._train + self._eval for c in p.prompt + p.target}
        return "".join(sorted(chars))

    def close(self) -> None:
        self.verifier.close()

    def __enter__(self) -> MathTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
