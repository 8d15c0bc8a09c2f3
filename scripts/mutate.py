"""Mutation testing: change one site of a module at a time and see whether its tests notice.

A *site* is an operator (``+`` for ``-``, ``<`` for ``<=``, ``and`` for ``or``, ...), a number
or boolean constant (bumped), a call such as ``.max`` / ``.sum`` / ``.detach`` (swapped for its
counterpart) or a unary ``-`` / ``not`` (dropped). Docstrings, annotations, f-strings, ``raise``
statements and ``print`` / ``warn`` calls are left alone. For every site the module is rewritten
with that one change and the given tests run (``pytest -x``); the mutant is *killed* when they
fail and *survives* when they pass. A survivor is either an equivalent change (a ``<`` that
meets ``<=`` only on a float tie, a ``.detach()`` of a tensor without grad) or a gap in the tests.

The work happens in a throwaway clone of this repository's HEAD (``../shared`` linked beside
it when it exists), so the working tree is never touched and a killed run leaves nothing
behind. Results go to a JSON file keyed ``"line:node:change"`` with ``"killed"`` or
``"SURVIVED"``, written after every site, so a stopped run resumes where it was; ``--recheck``
runs only the recorded survivors again (after new tests).

Usage::

    python scripts/mutate.py anchor_lib/data.py --tests tests/test_data.py --out data.json
    python scripts/mutate.py anchor_lib/train.py --tests tests/test_train.py --lines 217-577 \\
        --out train.json
    python scripts/mutate.py anchor_lib/data.py --tests tests/test_data.py --out data.json --recheck
    python scripts/mutate.py anchor_lib/models.py --tests "tests/test_models.py -k normalise" \
        --out models.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
            ast.Pow: ast.Mult, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv}
CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
            ast.In: ast.NotIn, ast.NotIn: ast.In}
ATTR_SWAP = {"max": "min", "min": "max", "amax": "amin", "amin": "amax", "argmax": "argmin",
             "argmin": "argmax", "sum": "mean", "mean": "sum", "logsumexp": "amax",
             "clamp_min": "clamp_max", "clamp_max": "clamp_min", "sign": "abs", "abs": "sign",
             "softmax": "log_softmax", "log_softmax": "softmax", "exp": "log", "log": "exp",
             "sqrt": "abs", "relu": "abs", "detach": "clone", "t": "clone"}
NAME_SWAP = {"min": "max", "max": "min", "True": "False", "False": "True", "any": "all",
             "all": "any"}


def _skipped_lines(tree: ast.Module) -> set[int]:
    """Lines of docstrings, raise statements, f-strings and print / warn calls."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
        if isinstance(node, ast.Raise) or isinstance(node, ast.JoinedStr) or (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("print", "warn")):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def _annotation_nodes(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
            args = node.args
            annotations += [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs]
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for a in annotations:
            if a is not None:
                ids.update(id(n) for n in ast.walk(a))
    return ids


def _bump(value: int | float) -> int | float:
    if isinstance(value, int):
        return value + 1
    return value * 2 if value != 0 else 1.0


def sites(tree: ast.Module) -> list[tuple[int, str, int]]:
    """``(node index in ast.walk order, change, line)`` of every site of ``tree``."""
    skip, annotations = _skipped_lines(tree), _annotation_nodes(tree)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", 0)
        if line in skip or id(node) in annotations:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
            change = f"{type(node.op).__name__}->{BIN_SWAP[type(node.op)].__name__}"
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMP_SWAP:
            change = f"{type(node.ops[0]).__name__}->{CMP_SWAP[type(node.ops[0])].__name__}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            change = f"const {node.value}->{not node.value}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            change = f"const {node.value!r}->{_bump(node.value)!r}"
        elif isinstance(node, ast.BoolOp):
            change = f"{type(node.op).__name__}->{'Or' if isinstance(node.op, ast.And) else 'And'}"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            change = f"drop {type(node.op).__name__}"
        elif isinstance(node, ast.Attribute) and node.attr in ATTR_SWAP and isinstance(node.ctx, ast.Load):
            change = f".{node.attr}->.{ATTR_SWAP[node.attr]}"
        elif isinstance(node, ast.Name) and node.id in NAME_SWAP and isinstance(node.ctx, ast.Load):
            change = f"{node.id}->{NAME_SWAP[node.id]}"
        else:
            continue
        out.append((i, change, line))
    return out


def mutate(tree: ast.Module, index: int) -> ast.Module:
    """A copy of ``tree`` with the site at ``index`` (see :func:`sites`) changed."""
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[index]
    if isinstance(node, ast.BinOp):
        node.op = BIN_SWAP[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops = [CMP_SWAP[type(node.ops[0])]()]
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else _bump(node.value)
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):  # replace the operation by its operand, in its parent
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                    return tree
                if isinstance(value, list) and any(item is node for item in value):
                    value[[item is node for item in value].index(True)] = node.operand
                    return tree
    elif isinstance(node, ast.Attribute):
        node.attr = ATTR_SWAP[node.attr]
    elif isinstance(node, ast.Name):
        node.id = NAME_SWAP[node.id]
    return tree


def _clone(repo: Path, scratch: Path) -> Path:
    """HEAD of ``repo`` in ``scratch/p``, with ``repo/../shared`` beside it if there is one."""
    subprocess.run(["git", "clone", "-q", str(repo), str(scratch / "p")], check=True)
    shared = repo.parent / "shared"
    if shared.is_dir():
        (scratch / "shared").symlink_to(shared)
    return scratch / "p"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the module to mutate, relative to the repository root")
    parser.add_argument("--tests", required=True,
                        help="pytest arguments, one string (e.g. 'tests/test_data.py -k cache')")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (resumed if present)")
    parser.add_argument("--lines", help="only sites on lines FIRST-LAST")
    parser.add_argument("--recheck", action="store_true", help="run the recorded survivors again")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    parser.add_argument("--repo", type=Path, default=REPO, help="the git repository (this one)")
    args = parser.parse_args(argv)

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="anchor-mutate-") as scratch:
        clone = _clone(args.repo, Path(scratch))
        path = clone / args.module
        tree = ast.parse(path.read_text())
        found = sites(tree)
        if args.lines:
            first, last = map(int, args.lines.split("-"))
            found = [s for s in found if first <= s[2] <= last]
        env = {**os.environ, "PYTHONPATH": str(clone)}

        def run_tests() -> tuple[str, float]:
            start = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                       "no:cacheprovider", *shlex.split(args.tests)],
                                      cwd=clone, env=env,
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                return "timeout", time.perf_counter() - start
            return ("killed" if done.returncode else "SURVIVED"), time.perf_counter() - start

        # The baseline runs the unparsed module, which is what every mutant is compared with.
        path.write_text(ast.unparse(tree))
        verdict, seconds = run_tests()
        if verdict != "SURVIVED":
            print(f"the tests do not pass on the unmutated module ({verdict})", file=sys.stderr)
            return 1
        print(f"baseline passes in {seconds:.1f} s; {len(found)} sites", flush=True)
        for index, change, line in found:
            key = f"{line}:{index}:{change}"
            if (results.get(key) != "SURVIVED") if args.recheck else (key in results):
                continue
            path.write_text(ast.unparse(mutate(tree, index)))
            results[key], seconds = run_tests()
            print(f"{results[key]:8s} {args.module}:{line} {change} ({seconds:.0f} s)", flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    counts = {v: list(results.values()).count(v) for v in sorted(set(results.values()))}
    print(f"{args.module}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
