"""Few-shot subsets are exact and seeded; class splits and label remapping do what a transfer study needs."""

from __future__ import annotations

from collections import Counter

import pytest
from sklearn.datasets import load_digits

from spaces import DataError
from trainables.fewshot import remap_labels, shots_per_class_subset, split_classes

TRANSFER_CLASSES = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def digits_targets() -> list[int]:
    return load_digits().target.tolist()


@pytest.fixture(scope="module")
def transfer_targets(digits_targets) -> list[int]:
    """Labels of digits 5-9 only, as the transfer half of a 0-4 / 5-9 split sees them."""
    return [digits_targets[i] for i in split_classes(digits_targets, TRANSFER_CLASSES)]


@pytest.mark.parametrize("shots", [1, 5, 10])
def test_exact_shots_per_class(transfer_targets, shots):
    indices = shots_per_class_subset(transfer_targets, shots, seed=0)
    assert indices == sorted(set(indices))
    assert Counter(transfer_targets[i] for i in indices) == {c: shots for c in TRANSFER_CLASSES}


def test_same_seed_same_indices_other_seed_differs(transfer_targets):
    first = shots_per_class_subset(transfer_targets, 5, seed=3)
    assert shots_per_class_subset(transfer_targets, 5, seed=3) == first
    assert shots_per_class_subset(transfer_targets, 5, seed=4) != first


def test_fewer_shots_are_a_subset_of_more_with_the_same_seed(transfer_targets):
    one, five = (set(shots_per_class_subset(transfer_targets, s, seed=1)) for s in (1, 5))
    assert one < five


def test_too_many_shots_names_the_class_and_its_count():
    targets = [0] * 10 + [1] * 3 + [2] * 10
    with pytest.raises(DataError, match=r"^class 1 has 3 examples, fewer than shots=5$"):
        shots_per_class_subset(targets, 5, seed=0)


def test_too_many_shots_on_digits(transfer_targets):
    with pytest.raises(DataError, match=r"class \d has \d+ examples, fewer than shots=500"):
        shots_per_class_subset(transfer_targets, 500, seed=0)


@pytest.mark.parametrize("shots", [0, -1])
def test_shots_must_be_positive(shots):
    with pytest.raises(DataError, match=f"shots must be >= 1, but got {shots}"):
        shots_per_class_subset([0, 1], shots, seed=0)


def test_split_classes_keeps_only_those_classes(digits_targets):
    kept = split_classes(digits_targets, TRANSFER_CLASSES)
    assert kept == sorted(kept)
    assert {digits_targets[i] for i in kept} == set(TRANSFER_CLASSES)
    assert len(kept) == sum(1 for t in digits_targets if t >= 5)
    pretrain = split_classes(digits_targets, [0, 1, 2, 3, 4])
    assert not set(kept) & set(pretrain) and len(kept) + len(pretrain) == len(digits_targets)


def test_split_classes_rejects_absent_or_repeated_classes(digits_targets):
    with pytest.raises(DataError, match=r"classes \[12\] have no examples"):
        split_classes(digits_targets, [5, 12])
    with pytest.raises(DataError, match="must not repeat"):
        split_classes(digits_targets, [5, 5])
    with pytest.raises(DataError, match="at least one class"):
        split_classes(digits_targets, [])


def test_remap_follows_the_given_order():
    assert remap_labels([5, 9, 7, 5], [5, 6, 7, 8, 9]) == [0, 4, 2, 0]
    assert remap_labels([5, 9, 7, 5], [9, 8, 7, 6, 5]) == [4, 0, 2, 4]


def test_remap_of_a_split_gives_labels_0_to_n(transfer_targets):
    labels = remap_labels(transfer_targets, TRANSFER_CLASSES)
    assert sorted(set(labels)) == [0, 1, 2, 3, 4]
    assert [TRANSFER_CLASSES[k] for k in labels] == transfer_targets


def test_remap_rejects_a_label_outside_classes():
    with pytest.raises(DataError, match=r"^label 3 is not one of classes \[5, 6\]"):
        remap_labels([5, 3], [5, 6])
