"""Functional-group lookup of multi-frame (enhanced) instances: per-frame first, then shared."""

from __future__ import annotations

from pydicom.dataset import Dataset


def functional_group_items(ds: Dataset, frame_index: int, keyword: str) -> list[Dataset]:
    """Return the items of one functional group for a frame (per-frame first, then shared).

    Parameters
    ----------
    ds
        The enhanced instance.
    frame_index
        0-based frame index.
    keyword
        Functional group sequence keyword (e.g. ``PlanePositionSequence``).

    Returns
    -------
    list of pydicom.dataset.Dataset
        The per-frame group's items followed by the shared group's (either may be missing).
    """
    items: list[Dataset] = []
    for fg_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(fg_keyword)
        if groups is not None and len(groups) > index and keyword in groups[index]:
            items.extend(groups[index][keyword])
    return items


def first_group_item(ds: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """Return the item of functional group ``keyword`` that applies to a frame, if any."""
    items = functional_group_items(ds, frame_index, keyword)
    return items[0] if items else None
