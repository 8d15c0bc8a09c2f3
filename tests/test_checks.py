"""Tests for anchor_lib.checks, the argument checks every public function shares.

Most of their cases are exercised through the public functions (tests/test_reliability.py counts
them); these pin the edges a mutation run of checks.py found unguarded (2026-11-27).
"""

from __future__ import annotations

import pytest
import torch

from anchor_lib.checks import check_labels, check_number


@pytest.mark.bad_input(cases=2)
def test_one_negative_label_among_good_ones_is_refused_by_its_value() -> None:
    with pytest.raises(ValueError, match=r"negative label \(-1\)"):
        check_labels(torch.tensor([0, 3, -1, 2]), 4, num_classes=10)
    with pytest.raises(ValueError, match=r"holds label 10 but the model has 10 classes"):
        check_labels(torch.tensor([0, 10, 2]), 3, num_classes=10)
    assert check_labels(torch.tensor([0, 9, 2], dtype=torch.uint8), 3, num_classes=10).dtype \
        == torch.int64


@pytest.mark.bad_input(cases=2)
def test_number_bounds_are_inclusive_unless_said_otherwise() -> None:
    assert check_number(1.0, "p", low=0.0, high=1.0) == 1.0
    assert check_number(0.0, "p", low=0.0, high=1.0) == 0.0
    with pytest.raises(ValueError, match=r"p must be <= 1.0, got 1.0001"):
        check_number(1.0001, "p", low=0.0, high=1.0)
    with pytest.raises(ValueError, match=r"eps must be > 0.0, got 0.0"):
        check_number(0.0, "eps", low=0.0, low_inclusive=False)
