"""Every shipped nominal weights file keeps the gain recorded for it (sr_engine/weights/guard.json)
on fixed held-out phantoms, within 0.3 dB, and beats interpolation there."""

from __future__ import annotations

import json

import pytest

from benchmarks.weights_guard import GUARD_FILE, MARGIN_DB, all_tasks, measure

RECORDED = json.loads(GUARD_FILE.read_text())["gain_db"]


def test_every_shipped_weights_file_is_guarded() -> None:
    assert set(RECORDED) == {f"{m}_{mode}_x{s}" for m, mode, s in all_tasks()}


@pytest.mark.parametrize(("model", "mode", "scale"), all_tasks(),
                         ids=[f"{m}_{mode}_x{s}" for m, mode, s in all_tasks()])
def test_shipped_weights_keep_their_recorded_gain(model: str, mode: str, scale: int) -> None:
    gain = measure(model, mode, scale)
    recorded = RECORDED[f"{model}_{mode}_x{scale}"]
    assert gain >= recorded - MARGIN_DB, (gain, recorded)
    assert gain > 0.0, gain  # never below interpolation on its own degradation
