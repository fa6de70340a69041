"""Model cards: partial evaluation results update only their rows; other sections are kept."""

from __future__ import annotations

from sr_engine.cards import card, parse_evaluation_rows


def _result(mode: str, scale: int, gain: float, ensemble: bool) -> dict:
    return {"mode": mode, "scale": scale, "model": "fast", "baseline": "cubic",
            "self_ensemble": ensemble, "mean_psnr_gain_db": gain, "mean_ssim_gain": 0.01,
            "cases": [{"name": "case_a", "psnr": 30.0 + gain, "psnr_baseline": 30.0}]}


def test_partial_results_keep_other_rows_and_sections() -> None:
    planes = {"fast": {"sagittal": 1.0, "coronal": 2.0, "fused": 3.0, "cubic": 0.5}}
    first = card("fast", {}, [_result("volume", 2, 3.5, False), _result("volume", 4, 2.9, False)],
                 planes)
    rows = parse_evaluation_rows(first, "fast")
    assert [(r["mode"], r["scale"], r["mean_psnr_gain_db"], r["self_ensemble"]) for r in rows] == [
        ("volume", 2, 3.5, False), ("volume", 4, 2.9, False)]
    assert rows[0]["cases"] == [{"name": "case_a", "psnr": 33.5, "psnr_baseline": 30.0}]
    validation = [{"mode": "volume", "scale": 4, "model": "fast", "self_ensemble": True,
                   "mean_psnr_gain_db": 2.6, "mean_psnr_gain_ct_db": 3.2,
                   "mean_psnr_gain_mr_db": 2.0, "mean_ssim_gain": 0.0137}]
    second = card("fast", {}, [_result("volume", 4, 3.1, True)], None, first, validation)
    rows = {(r["mode"], r["scale"]): r for r in parse_evaluation_rows(second, "fast")}
    assert rows[("volume", 2)]["mean_psnr_gain_db"] == 3.5  # kept
    assert rows[("volume", 4)]["mean_psnr_gain_db"] == 3.1  # updated
    assert rows[("volume", 4)]["self_ensemble"] is True
    assert "## Plane fusion" in second and "| 1.00 | 2.00 | 3.00 | 0.50 |" in second
    assert "## Validation" in second and "| volume x4 | on | +2.60 | +3.20 | +2.00 |" in second
    third = card("fast", {}, [], None, second)
    assert "## Validation" in third and third.count("## Plane fusion") == 1
