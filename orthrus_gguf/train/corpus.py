"""The orthrus-tiny corpus: this interpreter's standard library sources plus generated,
step-by-step arithmetic (labelled as such), with held-out prompts of both kinds.

Everything is deterministic given the interpreter: files are sorted, the held-out split
is by content hash, and the arithmetic comes from a seeded generator.
"""
from __future__ import annotations

import hashlib
import os
import platform
import random
import re
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELDOUT_EVERY = 25  # one file (and one arithmetic problem) in 25 is held out
NO_PROMPTS_FROM = ("encodings/",)  # near-copies of each other: a held-out one is not new text
DEF = re.compile(r"^[ \t]*def \w+\(.*\)(?: -> .+)?:[ \t]*$", re.M)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [Path(d) / f for f in files if f.endswith(".py")]
    return sorted(out)


def is_heldout(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def code_prompts(text: str, n: int = 2, max_chars: int = 360) -> list[str]:
    """Up to n prompts: the lines before a function's `def` line (up to max_chars), ending with it."""
    defs = list(DEF.finditer(text))
    picks = sorted({len(defs) * (i + 1) // (n + 1) for i in range(n)}) if defs else []
    out = []
    for m in (defs[i] for i in picks):
        start = max(0, m.start() - max_chars)
        start = text.find("\n", start) + 1 if start else 0
        out.append(text[start:m.end() + 1])
    return out


# ---------------------------------------------------------------- arithmetic

def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def solve_add(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        lhs = f"{x} + {y}" + (f" + {carry}" if carry else "")
        steps.append(f"{lhs} = {s}, write {s % 10}" + (f" carry {s // 10}." if s >= 10 else "."))
        carry = s // 10
    if carry:
        steps.append(f"write the carry {carry}.")
    return " ".join(steps) + f" So {a} + {b} = {a + b}."


def solve_sub(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        top = f"{da[i]} - 1" if borrow else f"{da[i]}"
        if x < y:
            steps.append(f"{top} - {y} needs a borrow: {x + 10} - {y} = {x + 10 - y}.")
            borrow = 1
        else:
            steps.append(f"{top} - {y} = {x - y}.")
            borrow = 0
    return " ".join(steps) + f" So {a} - {b} = {a - b}."


def solve_mul(a: int, b: int) -> str:
    if b < 10:
        steps, carry = [], 0
        for x in _digits(a):
            s = b * x + carry
            lhs = f"{b} * {x}" + (f" + {carry}" if carry else "")
            steps.append(f"{lhs} = {s}, write {s % 10}" + (f" carry {s // 10}." if s >= 10 else "."))
            carry = s // 10
        if carry:
            steps.append(f"write the carry {carry}.")
        return " ".join(steps) + f" So {a} * {b} = {a * b}."
    lo, hi = b % 10, b - b % 10
    return (f"{a} * {b} = {a} * {lo} + {a} * {hi}. {a} * {lo} = {a * lo}. {a} * {hi} = {a * hi}. "
            f"{a * lo} + {a * hi} = {a * b}. So {a} * {b} = {a * b}.")


def math_problem(rng: random.Random) -> tuple[str, str]:
    """(question, worked answer) of one random problem."""
    kind = rng.choice(["add", "add", "sub", "sub", "mul1", "mul2"])
    if kind == "add":
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        return f"{a} + {b}", solve_add(a, b)
    if kind == "sub":
        a, b = sorted((rng.randint(10, 9999), rng.randint(10, 9999)), reverse=True)
        return f"{a} - {b}", solve_sub(a, b)
    if kind == "mul1":
        a, b = rng.randint(10, 999), rng.randint(2, 9)
    else:
        a, b = rng.randint(10, 99), rng.randint(11, 99)
    return f"{a} * {b}", solve_mul(a, b)


def math_text(question: str, answer: str | None = None) -> str:
    """The document (or, without an answer, the prompt) of one problem."""
    return f"Q: {question} = ?\nA:" + (f" {answer}" if answer is not None else "")


def math_corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n training documents and the held-out questions (never in training)."""
    rng, train, held, seen = random.Random(seed), [], [], set()
    while len(train) < n:
        q, a = math_problem(rng)
        if q in seen:
            continue
        seen.add(q)
        if is_heldout("math:" + q):
            held.append(q)
        else:
            train.append(math_text(q, a))
    return train, held


# ---------------------------------------------------------------- the whole corpus

def build(n_math: int = 24000, n_prompts: int = 32) -> dict:
    """Texts of the training and validation splits, held-out prompts and the manifest."""
    files, train, val, prompts = stdlib_files(), [], [], []
    root = Path(sysconfig.get_paths()["stdlib"])
    listing = []
    for f in files:
        raw = f.read_bytes()
        rel = str(f.relative_to(root))
        text = raw.decode("utf-8", errors="replace")
        held = is_heldout("code:" + rel)
        listing.append({"path": rel, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                        "split": "heldout" if held else "train"})
        if held:
            val.append(text)
            if not rel.startswith(NO_PROMPTS_FROM):
                prompts += code_prompts(text)
        else:
            train.append(text)
    math_train, math_held = math_corpus(n_math)
    manifest = {
        "python": sys.version, "python_version": platform.python_version(),
        "implementation": platform.python_implementation(), "stdlib": f"lib/{root.name}",  # relative: no machine's path
        "excluded_dirs": sorted(SKIP_DIRS), "heldout_rule": f"sha256('code:'+path) % {HELDOUT_EVERY} == 0",
        "code_files": len(files), "code_bytes": sum(x["bytes"] for x in listing),
        "code_train_bytes": sum(x["bytes"] for x in listing if x["split"] == "train"),
        "generated_math": {"label": "GENERATED: synthetic worked arithmetic, not from any dataset",
                           "documents": len(math_train), "bytes": sum(len(t) for t in math_train),
                           "seed": 0, "example": math_train[0]},
        "files": listing,
    }
    held_prompts = {"code": prompts[:n_prompts], "math": [math_text(q) for q in math_held[:n_prompts]]}
    return {"code": train, "val": val, "math": math_train, "prompts": held_prompts, "manifest": manifest}
