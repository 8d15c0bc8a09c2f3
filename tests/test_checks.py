"""Tests for anchor_lib.checks, the argument checks every public function shares.

Most of their cases are exercised through the public functions (tests/test_reliability.py counts
them); these pin the edges a mutation run of checks.py found unguarded (2026-11-27).
"""

from __future__ import annotations

import pytest
import torch

from anchor_lib.checks import check_images, check_labels, check_logits, check_number


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


@pytest.mark.bad_input(cases=2)
def test_images_just_outside_the_unit_range_are_refused() -> None:
    """Not only 0-255 images: a value a hair above 1 (a normalisation or blend gone wrong) too."""
    x = torch.full((1, 3, 4, 4), 0.5)
    assert check_images(x) is x
    for value, shown in ((1.01, r"\[0.5, 1.01\]"), (-0.01, r"\[-0.01, 0.5\]")):
        bad = x.clone()
        bad[0, 0, 0, 0] = value
        with pytest.raises(ValueError, match=r"values in \[0, 1\], got range " + shown):
            check_images(bad)


@pytest.mark.bad_input(cases=1)
def test_logits_of_the_wrong_class_count_are_refused_only_when_a_count_is_given() -> None:
    out = torch.zeros(2, 10)
    assert check_logits(out, 2) is out and check_logits(out, 2, num_classes=10) is out
    with pytest.raises(ValueError, match="returned 10 logits per image, expected 100"):
        check_logits(out, 2, num_classes=100)
