"""Lossless re-encoding of a written derived series for a destination's transfer syntax.

An x2 in-plane series is four times the size of its source, so a destination may ask for RLE
or JPEG 2000 lossless (``[[destinations]] transfer_syntax``).  The derived series is written once
in explicit VR little endian; each other encoding is made once per job, next to it, and reused
when a send is retried.  SOP Instance UIDs are kept: the pixel values are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from dicom_node.pipeline import write_datasets

#: ``[[destinations]] transfer_syntax`` names and the transfer syntaxes they stand for.
TRANSFER_SYNTAX_BY_NAME: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000-lossless": JPEG2000Lossless,
}


def transcode_files(paths: Sequence[Path], name: str, out_dir: Path) -> list[Path]:
    """Return ``paths`` encoded in the transfer syntax called ``name`` (written under ``out_dir``).

    Files already present in ``out_dir`` (from an earlier attempt) are reused.

    Raises
    ------
    ValueError
        Unknown transfer syntax name.
    """
    if name not in TRANSFER_SYNTAX_BY_NAME:
        known = sorted(TRANSFER_SYNTAX_BY_NAME)
        raise ValueError(f"unknown transfer syntax {name!r}; use one of {known}")
    ts = TRANSFER_SYNTAX_BY_NAME[name]
    if name == "explicit":
        return list(paths)
    for path in paths:
        if (out_dir / path.name).exists():
            continue
        ds = pydicom.dcmread(path)
        if ts.is_compressed:
            ds.compress(ts, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = ts
        write_datasets([ds], out_dir)  # one at a time: a series can be large
    return [out_dir / path.name for path in paths]
