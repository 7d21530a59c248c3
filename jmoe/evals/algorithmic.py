"""Algorithmic tasks scored by exact match: small enough for the `tiny` and `small` presets.

Each example is a line `prompt answer`; the prompt names the task, so one model can learn a
mixture and a fine-tune answers its task's prompts with `jmoe generate`.

  addition   "add 482+75=" -> "557" (operands of 1 to 3 digits)
  reversal   "reverse kxqpa=" -> "apqxk" (3 to 8 lowercase letters)
  sorting    "sort 7 2 9 2=" -> "2 2 7 9" (3 to 6 digits)
  kv_recall  "recall d=4 a=7 q=1 ?a=" -> "7" (3 to 5 pairs of distinct letters and digits)
  brackets   "balanced (()(]=" -> "no" (2 to 10 of ()[], half of them balanced)
"""

from __future__ import annotations

import string

import numpy as np

from jmoe.evals.base import Example, Task, register_task

LETTERS = string.ascii_lowercase


def _number(rng: np.random.Generator) -> int:
    digits = int(rng.integers(1, 4))
    return int(rng.integers(0, 10**digits))


def addition(rng: np.random.Generator) -> Example:
    """"add A+B=" -> the sum."""
    a, b = _number(rng), _number(rng)
    return Example(f"add {a}+{b}=", str(a + b))


def reversal(rng: np.random.Generator) -> Example:
    """"reverse S=" -> S backwards."""
    s = "".join(rng.choice(list(LETTERS), int(rng.integers(3, 9))))
    return Example(f"reverse {s}=", s[::-1])


def sorting(rng: np.random.Generator) -> Example:
    """"sort D D D=" -> the digits ascending."""
    xs = [int(v) for v in rng.integers(0, 10, int(rng.integers(3, 7)))]
    return Example("sort " + " ".join(map(str, xs)) + "=", " ".join(map(str, sorted(xs))))


def kv_recall(rng: np.random.Generator) -> Example:
    """"recall k=v k=v ... ?k=" -> the queried key's value."""
    n = int(rng.integers(3, 6))
    keys = rng.choice(list(LETTERS), n, replace=False)
    values = rng.integers(0, 10, n)
    q = int(rng.integers(0, n))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return Example(f"recall {pairs} ?{keys[q]}=", str(values[q]))


def _balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in "([":
            stack.append(c)
        elif not stack or stack.pop() != {")": "(", "]": "["}[c]:
            return False
    return not stack


def _balanced_string(rng: np.random.Generator, pairs: int) -> str:
    if pairs == 0:
        return ""
    inner = int(rng.integers(0, pairs))
    o, c = ("(", ")") if rng.random() < 0.5 else ("[", "]")
    return o + _balanced_string(rng, inner) + c + _balanced_string(rng, pairs - 1 - inner)


def brackets(rng: np.random.Generator) -> Example:
    """"balanced S=" -> "yes" or "no"; S is a balanced string, broken at one place half the time."""
    pairs = int(rng.integers(1, 6))
    s = _balanced_string(rng, pairs)
    if rng.random() < 0.5:  # break it: change one bracket
        i = int(rng.integers(0, len(s)))
        s = s[:i] + str(rng.choice([c for c in "()[]" if c != s[i]])) + s[i + 1:]
    return Example(f"balanced {s}=", "yes" if _balanced(s) else "no")


for _name, _draw, _desc in (
    ("addition", addition, "sum of two numbers of 1-3 digits"),
    ("reversal", reversal, "a string of 3-8 letters reversed"),
    ("sorting", sorting, "3-6 digits in ascending order"),
    ("kv_recall", kv_recall, "the value of a key among 3-5 pairs"),
    ("brackets", brackets, "whether a string of ()[] is balanced"),
):
    register_task(Task(_name, "exact_match", _desc, draw=_draw))
