r"""Child process that grades math answers with math-verify; started by `MathVerifier`.

It runs apart from the trainer because math-verify's own timeouts use signal.alarm (main
thread only) and nothing in-process can stop a hang inside C code: the parent kills this
process instead. It is run by path (`python -P _verify_worker.py`) and imports nothing from
npo. Protocol, JSON lines (ASCII):

    stdin   {"timeout_s": 5.0, "budget_s": 60.0,
             "items": [{"gold": "3", "response": "\\boxed{3}"}, ...]}
    stdout  {"ready": true}                          once, after imports and a warm-up
            {"reward": 1.0, "reason": "correct"}     one per item, in order, as each is done

Each item gets a soft timeout here (SIGALRM -> "timeout", the process lives on), cut to what
is left of the request's `budget_s` (optional; items after it is spent get "timeout: batch
budget spent" at once); the parent adds a hard one. Test hooks on an item: "sleep_s"
sleeps before grading; with "block_alarm": true SIGALRM is blocked meanwhile, which acts
like a hang in C code.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, TextIO

from math_verify import parse, verify

MEMORY_LIMIT_BYTES = 4 << 30  # an expression that wants more fails with MemoryError instead
# A number in E notation (1e5, 2.5E-3), not part of a word or a longer number; math-verify
# reads "1e5" as 1. Exponents past MAX_EXPONENT are left alone (no million-digit strings).
_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
MAX_EXPONENT = 30
BUDGET_SPENT = "timeout: batch budget spent"
_DELIMITED = re.compile(r"\$|\\boxed|\\\(|\\\[")


def grade(gold: str, response: str) -> tuple[float, str]:
    r"""Reward 1.0 when `response` states an answer equal to `gold`; no timeout of its own.

    >>> grade("0.5", r"\frac{1}{2}")
    (1.0, 'correct')
    >>> grade("3", r"so the answer is $\boxed{4}$")
    (0.0, 'wrong: got 4, want 3')
    >>> grade("3", "no idea")
    (0.0, 'no answer found')
    """
    gold_parsed = _parse_gold(expand_e_notation(gold))
    if not gold_parsed:
        return 0.0, f"gold answer not parsable: {_head(gold)}"
    text = expand_e_notation(response)
    pred = parse(text, parsing_timeout=None)
    if pred and verify(list(gold_parsed), pred, timeout_seconds=None):
        return 1.0, "correct"
    # A bare answer (no $, \boxed, \( or \[) is also read the way a bare gold is: in
    # \boxed{}, else math-verify takes "3\sqrt{2}" for 3; what the warm-up teaches is bare.
    if not _DELIMITED.search(text):
        boxed = parse(f"\\boxed{{{text}}}", parsing_timeout=None)
        if boxed and verify(list(gold_parsed), boxed, timeout_seconds=None):
            return 1.0, "correct"
    if not pred:
        return 0.0, "no answer found"
    # parse() returns [sympy object, matched text]; never str() the sympy object, which can
    # take forever for huge expressions.
    got = next((p for p in reversed(pred) if isinstance(p, str)), "?")
    return 0.0, f"wrong: got {_head(got)}, want {_head(gold)}"


def expand_e_notation(text: str) -> str:
    """Numbers in E notation written out as decimals, exactly; the rest of `text` as is.

    >>> expand_e_notation("1e5 and 2.5E-3, not e5, x2e3 or 1e99")
    '100000 and 0.0025, not e5, x2e3 or 1e99'
    """

    def plain(m: re.Match[str]) -> str:
        if abs(int(m.group(2))) > MAX_EXPONENT:
            return m.group(0)
        return format(decimal.Decimal(m.group(0)), "f")

    return _E_NOTATION.sub(plain, text)


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
        deadline = time.monotonic() + float(request.get("budget_s") or "inf")
        for item in request["items"]:
            left = min(float(request["timeout_s"]), deadline - time.monotonic())
            if left <= 0:
                _send(out, {"reward": 0.0, "reason": BUDGET_SPENT})
                continue
            try:
                reward, reason = _grade_item(item, left)
            except _Timeout:  # the alarm fired inside an except clause above
                reward, reason = 0.0, "timeout"
            _send(out, {"reward": reward, "reason": reason})


if __name__ == "__main__":
    main()
