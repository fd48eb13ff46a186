r"""Child process that grades math answers with math-verify; started by `MathVerifier`.

It runs apart from the trainer because math-verify's own timeouts use signal.alarm (main
thread only) and nothing in-process can stop a hang inside C code: the parent kills this
process instead. It is run by path (`python -P _verify_worker.py`) and imports nothing from
npo. Protocol, JSON lines (ASCII):

    stdin   {"timeout_s": 5.0, "items": [{"gold": "3", "response": "\\boxed{3}"}, ...]}
    stdout  {"ready": true}                          once, after imports and a warm-up
            {"reward": 1.0, "reason": "correct"}     one per item, in order, as each is done

Each item gets a soft timeout here (SIGALRM -> "timeout", the process lives on); the parent
adds a hard one. Test hooks on an item: "sleep_s" sleeps before grading; with
"block_alarm": true SIGALRM is blocked meanwhile, which acts like a hang in C code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, TextIO

from math_verify import parse, verify

MEMORY_LIMIT_BYTES = 4 << 30  # an expression that wants more fails with MemoryError instead


def grade(gold: str, response: str) -> tuple[float, str]:
    r"""Reward 1.0 when `response` states an answer equal to `gold`; no timeout of its own.

    >>> grade("0.5", r"\frac{1}{2}")
    (1.0, 'correct')
    >>> grade("3", r"so the answer is $\boxed{4}$")
    (0.0, 'wrong: got 4, want 3')
    >>> grade("3", "no idea")
    (0.0, 'no answer found')
    """
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return 0.0, f"gold answer not parsable: {_head(gold)}"
    pred = parse(response, parsing_timeout=None)
    if not pred:
        return 0.0, "no answer found"
    if verify(list(gold_parsed), pred, timeout_seconds=None):
        return 1.0, "correct"
    # parse() returns [sympy object, matched text]; never str() the sympy object, which can
    # take forever for huge expressions.
    got = next((p for p in reversed(pred) if isinstance(p, str)), "?")
    return 0.0, f"wrong: got {_head(got)}, want {_head(gold)}"


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    # A bare gold like "x^2+1" is not found without delimiters; \boxed{} always is.
    text = gold if "\\boxed" in gold or "$" in gold else f"\\boxed{{{gold}}}"
    return tuple(parse(text, parsing_timeout=None))


def _head(text: str, n: int = 30) -> str:
    return text[:n] + "…" if len(text) > n else text


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so math-verify's `except Exception` lets it out."""


_armed = False  # whether a pending SIGALRM may still interrupt the current item


def _on_alarm(signum: int, frame: object) -> None:
    if _armed:
        raise _Timeout


def _grade_item(item: dict[str, Any], timeout_s: float) -> tuple[float, str]:
    global _armed
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        if item.get("sleep_s"):
            _test_sleep(float(item["sleep_s"]), bool(item.get("block_alarm")))
        return grade(str(item["gold"]), str(item["response"]))
    except _Timeout:
        return 0.0, "timeout"
    except Exception as e:  # model output must never take the worker down
        return 0.0, f"error: {type(e).__name__}"
    finally:
        _armed = False  # first, so an alarm already pending is ignored
        signal.setitimer(signal.ITIMER_REAL, 0)


def _test_sleep(seconds: float, block_alarm: bool) -> None:
    if block_alarm:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        time.sleep(seconds)
    finally:
        if block_alarm:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def _send(out: TextIO, msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def _die_with_parent() -> None:
    # Linux: have the kernel kill us if the parent dies, even while we hang in C code.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def main() -> None:
    out = os.fdopen(os.dup(1), "w", encoding="ascii")  # the protocol channel
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the protocol
    _die_with_parent()
    with contextlib.suppress(ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we handle timeouts ourselves
    signal.signal(signal.SIGALRM, _on_alarm)
    grade("1", "1")  # warm up lazy parsers so the first real item is not charged for them
    _send(out, {"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        for item in request["items"]:
            try:
                reward, reason = _grade_item(item, float(request["timeout_s"]))
            except _Timeout:  # the alarm fired inside an except clause above
                reward, reason = 0.0, "timeout"
            _send(out, {"reward": reward, "reason": reason})


if __name__ == "__main__":
    main()
