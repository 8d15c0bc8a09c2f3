"""book/notation.md: every name it gives exists in anchor_lib, and every default it states is the
code's, so that the page cannot drift from the library."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest

from anchor_lib.train import TrainConfig

PAGE = Path(__file__).resolve().parent.parent / "book" / "notation.md"
FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def rows(text: str) -> list[dict[str, str]]:
    """The body rows of every table, as {column heading: cell}."""
    out, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("- "):
            out.append(dict(zip(header, cells, strict=True)))
    return out


EMPTY = object()   # a Default cell that states nothing


def stated_default(cell: str) -> object:
    """The value a Default cell opens with: ``8/255``, ``10 (training)``, ``128 dimensions``,
    ``True``, ``None``, a quoted string in backticks; ``EMPTY`` for an empty cell."""
    if not cell:
        return EMPTY
    first = cell.split()[0].strip("`")
    if first[:1] in "\"'" or first in ("True", "False", "None"):
        return ast.literal_eval(first)
    return float(Fraction(first))


def same(code: object, stated: object) -> bool:
    if isinstance(stated, float) and not isinstance(code, bool | str | type(None)):
        return math.isclose(float(code), stated)
    return code == stated and type(code) is type(stated)


def check_reference(ref: str) -> None:
    """``TrainConfig.field`` or ``module.name(param, ...)``: the field, or the function or class
    and each named parameter, exists."""
    if ref.startswith("TrainConfig."):
        assert ref.split(".", 1)[1] in FIELDS, f"{ref}: no such TrainConfig field"
        return
    match = re.fullmatch(r"(\w+)\.(\w+)\(([\w, ]*)\)", ref)
    assert match, f"{ref!r}: expected TrainConfig.field or module.name(param, ...)"
    module, name, params = match.groups()
    obj = getattr(importlib.import_module(f"anchor_lib.{module}"), name, None)
    assert obj is not None, f"{ref}: anchor_lib.{module} has no {name}"
    names = inspect.signature(obj).parameters
    for param in filter(None, (p.strip() for p in params.split(","))):
        assert param in names, f"{ref}: {module}.{name} takes no {param!r} ({list(names)})"


def test_the_page_is_in_the_table_of_contents():
    assert "file: book/notation" in (PAGE.parent.parent / "_toc.yml").read_text()


def check_page(text: str) -> set[str]:
    """Checks every row's names and stated default; returns the TrainConfig fields named."""
    table = rows(text)
    assert len(table) >= 20
    fields_named = set()
    for row in table:
        refs = re.findall(r"`([^`]+)`", row["In the code"])
        for ref in refs:
            check_reference(ref)
        fields = [r.split(".", 1)[1] for r in refs if r.startswith("TrainConfig.")]
        fields += re.findall(r"`TrainConfig\.(\w+)`", row["Default"])
        fields_named.update(fields)
        value = stated_default(re.sub(r"`TrainConfig\.\w+` = ", "", row["Default"]))
        if value is EMPTY:
            continue
        assert len(fields) == 1, f"{row}: a stated default must belong to one TrainConfig field"
        code = FIELDS[fields[0]]
        assert same(code, value), (
            f"notation.md says {fields[0]} defaults to {row['Default']!r}; TrainConfig says "
            f"{code!r}")
    return fields_named


def test_every_name_exists_and_every_default_is_the_codes():
    fields_named = check_page(PAGE.read_text())
    # The knobs a reader meets in the chapters are all on the page.
    assert {"eps", "alpha", "attack_steps", "temperature", "beta", "lam", "trades_beta",
            "adv_in_contrastive", "pretrain_fraction", "batch_size", "lr", "epochs",
            "val_attack_steps", "attack_bn", "compile"} <= fields_named


@pytest.mark.parametrize(("ref", "why"), [
    ("TrainConfig.gamma", "no such TrainConfig field"),
    ("losses.anchor_loss(gamma)", "takes no 'gamma'"),
    ("attacks.no_such_attack(x)", "has no no_such_attack"),
    ("anchor_loss", "expected TrainConfig.field"),
])
def test_the_check_catches_a_wrong_name(ref, why):
    with pytest.raises(AssertionError, match=re.escape(why)):
        check_reference(ref)


def test_the_check_catches_a_wrong_default():
    text = PAGE.read_text()
    wrong = text.replace("`TrainConfig.trades_beta`, `losses.trades_loss(beta)` | 6.0 |",
                         "`TrainConfig.trades_beta`, `losses.trades_loss(beta)` | 5.0 |")
    assert wrong != text
    with pytest.raises(AssertionError, match="trades_beta defaults to '5.0'"):
        check_page(wrong)
    assert stated_default("8/255") == pytest.approx(8 / 255) and stated_default("True") is True
    assert stated_default("128 dimensions") == 128 and stated_default("") is EMPTY
    assert stated_default('`"eval"`') == "eval" and stated_default("None") is None
    assert not same(None, 0.0) and not same("eval", "train") and not same(True, 1.0)
    assert same(0.2, 0.2) and same(10, 10.0)
