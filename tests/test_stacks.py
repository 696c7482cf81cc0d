"""One series, several image stacks: grouping, the main stack, what is left out and why.

The choice must not depend on the order in which instances arrived: every test checks
every order it can afford.
"""

from __future__ import annotations

import itertools
import random

import pytest
from pydicom.dataset import Dataset

from inference.stacks import choose, completeness_problems, slice_info

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
SAGITTAL = [0, 1, 0, 0, 0, -1]


def image(
    z: float,
    *,
    iop=AXIAL,
    kind="ORIGINAL",
    size=(64, 64),
    spacing=(0.8, 0.8),
    acquisition=1,
    number=None,
    extra=(),
) -> Dataset:
    ds = Dataset()
    ds.ImageOrientationPatient = list(iop)
    normal_axis = {tuple(AXIAL): 2, tuple(CORONAL): 1, tuple(SAGITTAL): 0}.get(tuple(iop), 2)
    position = [0.0, 0.0, 0.0]
    position[normal_axis] = z if normal_axis != 1 else -z
    ds.ImagePositionPatient = position
    ds.Rows, ds.Columns = size
    ds.PixelSpacing = list(spacing)
    first = "DERIVED" if kind == "DERIVED" else "ORIGINAL"
    ds.ImageType = [first, "PRIMARY" if first == "ORIGINAL" else "SECONDARY", *extra] + (
        ["LOCALIZER"] if kind == "LOCALIZER" else ["AXIAL"]
    )
    ds.AcquisitionNumber = acquisition
    if number is not None:
        ds.InstanceNumber = number
    return ds


def axial_stack(count: int = 20, **kw) -> list[Dataset]:
    return [image(2.5 * i, number=i + 1, **kw) for i in range(count)]


def all_orders(items: list, limit: int = 24):
    rng = random.Random(5)
    orders = [items, list(reversed(items))]
    for _ in range(limit - 2):
        shuffled = items[:]
        rng.shuffle(shuffled)
        orders.append(shuffled)
    return orders


def main_and_left_out(headers: list[Dataset]) -> tuple[set[int], list[str]]:
    choice = choose([slice_info(h) for h in headers])
    assert choice.main is not None
    return {id(headers[i]) for i in choice.main.members}, choice.left_out_text()


@pytest.mark.parametrize(
    "others, reason",
    [
        ([image(0, iop=CORONAL, kind="LOCALIZER", size=(512, 512))], "localizer"),
        ([image(0, iop=SAGITTAL, kind="LOCALIZER")], "localizer"),
        ([image(float(y), iop=CORONAL) for y in range(30)], "coronal; the main stack is axial"),
        ([image(2.5 * i, kind="DERIVED") for i in range(40)], "DERIVED images"),
        ([image(2.5 * i, size=(32, 32)) for i in range(5)], "another matrix"),
        ([image(2.5 * i, spacing=(1.5, 1.5)) for i in range(5)], "another pixel spacing"),
        ([Dataset()], "not an image of a stack"),  # a dose screen without geometry
    ],
    ids=["localizer", "sagittal-scout", "coronal", "derived", "small", "spacing", "no-geometry"],
)
def test_main_axial_original_stack_is_chosen_whatever_else_shares_the_series(others, reason):
    axial = axial_stack()
    expected = {id(h) for h in axial}
    for order in all_orders(axial + others, limit=12):
        kept, left_out = main_and_left_out(order)
        assert kept == expected
        assert len(left_out) == 1 and reason in left_out[0], left_out


def test_a_repeated_acquisition_over_the_same_range_is_split_off():
    first = axial_stack(20, acquisition=1)
    monitoring = [image(25.0, acquisition=n, number=100 + n) for n in range(2, 8)]
    repeat = [image(2.5 * i + 10, acquisition=9, number=200 + i) for i in range(8)]
    expected = {id(h) for h in first}
    for order in all_orders(first + monitoring + repeat, limit=10):
        kept, left_out = main_and_left_out(order)
        assert kept == expected
        assert len(left_out) == 7
        assert all("repeats positions of acquisition 1" in line for line in left_out)


def test_two_equal_acquisitions_give_the_same_choice_in_every_order():
    one = axial_stack(10, acquisition=1)
    two = [image(2.5 * i, acquisition=2, number=20 + i) for i in range(10)]
    chosen = {frozenset(main_and_left_out(order)[0]) for order in all_orders(one + two)}
    assert chosen == {frozenset(id(h) for h in one)}


def test_only_localizers_give_no_main_stack():
    scouts = [image(0, iop=CORONAL, kind="LOCALIZER"), image(0, iop=SAGITTAL, kind="LOCALIZER")]
    choice = choose([slice_info(h) for h in scouts])
    assert choice.main is None and len(choice.left_out) == 2


def test_orientation_within_rounding_is_one_stack():
    axial = axial_stack(10)
    axial[3].ImageOrientationPatient = [1, 0.0000004, 0, 0, 1, -0.0000003]
    kept, left_out = main_and_left_out(axial)
    assert len(kept) == 10 and left_out == []


@pytest.mark.parametrize("edge", [0, 4, 9])
def test_orientation_across_a_rounding_boundary_is_one_stack(edge):
    """Cosines on either side of a rounding step of the key (0.0004999 / 0.0005001 give
    0.000 / 0.001): still one stack, in every order, whichever slice differs."""
    axial = axial_stack(10)
    for i, ds in enumerate(axial):
        y = 0.0005001 if (i == edge or i % 3 == 1) else 0.0004999
        ds.ImageOrientationPatient = [1, y, 0, -y, 1, 0]
    for order in all_orders(axial, limit=6):
        kept, left_out = main_and_left_out(order)
        assert len(kept) == 10 and left_out == []


def test_orientations_two_rounding_steps_apart_stay_two_stacks():
    """The joining is one step wide and never chains: 0.000 / 0.002 are two stacks,
    and a third orientation between them joins the first only."""
    first = axial_stack(10)
    second = [image(50 + 2.5 * i, iop=[1, 0.002, 0, -0.002, 1, 0]) for i in range(6)]
    between = [image(100 + 2.5 * i, iop=[1, 0.001, 0, -0.001, 1, 0]) for i in range(3)]
    choice = choose([slice_info(h) for h in first + second + between])
    sizes = sorted(len(s.members) for s in choice.stacks)
    assert sizes == [6, 13]


@pytest.mark.parametrize(
    "drop, numbers_given, expected",
    [
        (None, True, []),
        (7, True, ["slice positions jump", "InstanceNumbers 1..20 with 1 missing"]),
        (7, False, ["slice positions jump"]),
        (0, True, []),  # the end of a series cut short cannot be seen
    ],
)
def test_signs_of_missing_slices(drop, numbers_given, expected):
    headers = axial_stack(20)
    if drop is not None:
        del headers[drop]
    infos = [slice_info(h) for h in headers]
    main = choose(infos).main
    numbers = [h.InstanceNumber for h in headers] if numbers_given else [None] * len(headers)
    problems = completeness_problems(main, numbers)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem


def test_fewer_images_than_images_in_acquisition():
    headers = axial_stack(12)
    main = choose([slice_info(h) for h in headers]).main
    assert completeness_problems(main, list(range(1, 13)), images_in_acquisition=24) == [
        "12 of 24 images (ImagesInAcquisition)"
    ]


def test_permutations_of_a_small_mixed_series_agree():
    axial = axial_stack(4)
    mixed = axial + [image(0, iop=CORONAL, kind="LOCALIZER"), image(1.0, kind="DERIVED")]
    results = {
        frozenset(main_and_left_out(list(order))[0])
        for order in itertools.permutations(mixed)
    }
    assert results == {frozenset(id(h) for h in axial)}
