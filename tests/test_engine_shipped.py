"""Every shipped weights file keeps the gain recorded for it (sr_engine/weights/guard.json) on
fixed held-out phantoms, within 0.3 dB, and beats interpolation there: the nominal files through
the engine, the family and hedging files (``fast_<mode>_x<N>_<group>``) on a member of their
training degradations."""

from __future__ import annotations

import json

import pytest

from benchmarks.weights_guard import (
    GUARD_FILE,
    MARGIN_DB,
    all_tasks,
    group_files,
    measure,
    measure_group,
)

GUARD = json.loads(GUARD_FILE.read_text())
RECORDED = GUARD["gain_db"]
RECORDED_GROUPS = GUARD["group_gain_db"]


def test_every_shipped_weights_file_is_guarded() -> None:
    assert set(RECORDED) == {f"{m}_{mode}_x{s}" for m, mode, s in all_tasks()}
    assert set(RECORDED_GROUPS) == {f"fast_{mode}_x{s}_{g}" for mode, s, g in group_files()}


@pytest.mark.parametrize(("model", "mode", "scale"), all_tasks(),
                         ids=[f"{m}_{mode}_x{s}" for m, mode, s in all_tasks()])
def test_shipped_weights_keep_their_recorded_gain(model: str, mode: str, scale: int) -> None:
    gain = measure(model, mode, scale)
    recorded = RECORDED[f"{model}_{mode}_x{scale}"]
    assert gain >= recorded - MARGIN_DB, (gain, recorded)
    assert gain > 0.0, gain  # never below interpolation on its own degradation


@pytest.mark.parametrize(("mode", "scale", "group"), group_files(),
                         ids=[f"fast_{mode}_x{s}_{g}" for mode, s, g in group_files()])
def test_family_weights_keep_their_recorded_gain(mode: str, scale: int, group: str) -> None:
    gain = measure_group(mode, scale, group)
    recorded = RECORDED_GROUPS[f"fast_{mode}_x{scale}_{group}"]
    assert gain >= recorded - MARGIN_DB, (gain, recorded)
    assert gain > 0.0, gain
