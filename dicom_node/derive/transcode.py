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

from dicom_node.codes import OUTPUT_TRANSFER_SYNTAX_BY_NAME
from dicom_node.derive.files import write_datasets


def transcode_files(paths: Sequence[Path], name: str, out_dir: Path) -> list[Path]:
    """Return ``paths`` encoded in the transfer syntax called ``name`` (written under ``out_dir``).

    Files already present in ``out_dir`` (from an earlier attempt) are reused.

    Raises
    ------
    ValueError
        Unknown transfer syntax name.
    """
    if name not in OUTPUT_TRANSFER_SYNTAX_BY_NAME:
        known = sorted(OUTPUT_TRANSFER_SYNTAX_BY_NAME)
        raise ValueError(f"unknown transfer syntax {name!r}; use one of {known}")
    ts = OUTPUT_TRANSFER_SYNTAX_BY_NAME[name]
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
