"""Public benchmark of the SR engine on unseen real data (evaluation only, never training).

Slice mode: CT/MR images shipped with pydicom / pydicom-data.  Volume mode: the nilearn MNI152
T1 1 mm template (4 mm slabs for x4).  Prints a table and writes
benchmarks/results/eval_public.json.

Usage: .venv/bin/python -m benchmarks.eval_public [--models fast residual]
       [--tasks slice:2 volume:4] [--self-ensemble auto|on|off] [--threads 1]

Decisions (training length, self-ensemble) are taken on the held-out synthetic validation set
(``benchmarks/eval_validation.py``), not here: run this once for the final figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from sr_engine.evaluation import evaluate_volumes

SLICE_FILES = ["CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "eCT_Supplemental.dcm",
               "MR2_UNCR.dcm", "emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"]
RESULTS = Path(__file__).resolve().parent / "results"


def load_dicom_case(filename: str) -> tuple[str, np.ndarray, tuple[float, float, float], str]:
    path = get_testdata_file(filename)
    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    ps = ds.get("PixelSpacing")
    if ps is None:
        try:
            ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            ps = [1.0, 1.0]
    dz = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
    return filename.removesuffix(".dcm"), arr, (dz, float(ps[0]), float(ps[1])), ds.Modality


def load_mni_case() -> tuple[str, np.ndarray, tuple[float, float, float], str]:
    import nilearn

    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(), dtype=np.float32)  # (x, y, z) RAS
    zooms = img.header.get_zooms()
    vol = np.ascontiguousarray(data.transpose(2, 1, 0))  # (z, y, x): axial slices
    return "MNI152_T1_1mm", vol, (float(zooms[2]), float(zooms[1]), float(zooms[0])), "MR"


def plane_fusion(model: str, scale: int = 4) -> dict[str, float]:
    """PSNR of sagittal-only, coronal-only and fused through-plane SR on MNI152 (slabs of r)."""
    from sr_engine.evaluation import make_lr, normalise_for_metrics, psnr
    from sr_engine.models import load_model
    from sr_engine.normalise import mapping_for
    from sr_engine.tiling import upsample_planes

    _, vol, spacing, mod = load_mni_case()
    hr, lr, _, _ = make_lr(vol, spacing, "volume", scale)
    mapping = mapping_for(lr, mod)
    x = mapping.forward(lr)
    out = {}
    for tag, name in (("model", model), ("cubic", "cubic")):
        net, _ = load_model(name, "volume", scale)
        kw = dict(device="cpu", batch_size=8, tile_size=256, tile_overlap=16, margin=8)
        sag, _ = upsample_planes(net, np.ascontiguousarray(x.transpose(2, 0, 1)), scale, 1, **kw)
        cor, _ = upsample_planes(net, np.ascontiguousarray(x.transpose(1, 0, 2)), scale, 1, **kw)
        sag, cor = sag.transpose(1, 2, 0), cor.transpose(1, 0, 2)
        ref = normalise_for_metrics(hr, hr, mod)
        variants = {"sagittal": sag, "coronal": cor, "fused": 0.5 * (sag + cor)}
        for k, v in variants.items():
            score = psnr(normalise_for_metrics(mapping.inverse(v), hr, mod), ref)
            out[k if tag == "model" else f"cubic_{k}"] = round(score, 3)
    out["cubic"] = out.pop("cubic_fused")
    out.pop("cubic_sagittal")
    out.pop("cubic_coronal")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["fast", "srcnn", "residual", "srgan"])
    ap.add_argument("--tasks", nargs="+",
                    default=["slice:2", "slice:4", "volume:2", "volume:3", "volume:4"])
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_public.json")
    ap.add_argument("--weights-dir", type=Path, default=None)
    ap.add_argument("--planes", action="store_true",
                    help="also measure sagittal/coronal/fused volume x4 on MNI152")
    ap.add_argument("--self-ensemble", choices=["auto", "on", "off"], default="auto",
                    help="geometric self-ensemble (auto: on in volume mode, off in slice mode, "
                    "as in the node)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensemble = {"auto": None, "on": True, "off": False}[args.self_ensemble]
    slice_cases = [load_dicom_case(f) for f in SLICE_FILES]
    volume_cases = [load_mni_case()]
    results = []
    print(f"{'task':10} {'model':9} {'baseline':8} {'PSNR gain dB':>12} {'SSIM gain':>9}"
          f" {'min gain':>8}  per-case gains")
    for task in args.tasks:
        mode, scale = task.split(":")
        cases = slice_cases if mode == "slice" else volume_cases
        for model in args.models:
            t0 = time.perf_counter()
            res = evaluate_volumes(cases, mode, int(scale), model, weights_dir=args.weights_dir,
                                   self_ensemble=ensemble)
            res["wall_seconds"] = round(time.perf_counter() - t0, 1)
            results.append(res)
            gains = [c["psnr"] - c["psnr_baseline"] for c in res["cases"]]
            print(f"{task:10} {model:9} {res['baseline']:8} {res['mean_psnr_gain_db']:12.2f}"
                  f" {res['mean_ssim_gain']:9.4f} {min(gains):8.2f}  "
                  + " ".join(f"{c['name'][:12]}={g:+.2f}" for c, g in
                             zip(res["cases"], gains, strict=True)), flush=True)
    planes = {}
    if args.planes:
        print("volume x4 plane fusion on MNI152 (PSNR dB):")
        for model in args.models:
            planes[model] = plane_fusion(model)
            print(f"  {model:9} {planes[model]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "planes": planes}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
