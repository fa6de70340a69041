"""Coverage-guided fuzzing of srnode's receive path with atheris (libFuzzer).

Each input is one received data set: the first byte picks the presentation context (a seed's
SOP class and transfer syntax), the rest is the encoded data set.  It goes through
``StorageSCP.receive`` - exactly what the C-STORE handler runs - against a real SQLite index and
file store in a temporary folder.  A crash is an exception escaping ``receive``, a status outside
success/0xA700-0xCFFF, or a success whose stored file does not parse, differs from what was
received or has no index row (see ``tests.support.malformed.check_received``).

Run from the repository root (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_receive.py -atheris_runs=20000 fuzz/corpus
"""

from __future__ import annotations

import itertools
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import dicom_node.network.scp  # noqa: F401
    import dicom_node.receive.validation  # noqa: F401
    import storage.ingest  # noqa: F401

from dicom_node.app import Node  # noqa: E402
from tests.support.malformed import (  # noqa: E402
    check_received,
    instance_from,
    receive_seeds,
)
from tests.support.node import node_config  # noqa: E402

SEEDS = receive_seeds()
_TOKENS = itertools.count(1)
_NODE: Node | None = None


def _node() -> Node:
    global _NODE
    if _NODE is None:
        # libFuzzer ends the process without running atexit handlers: wipe at start instead
        tmp = Path(tempfile.gettempdir()) / "srnode-fuzz-node"
        shutil.rmtree(tmp, ignore_errors=True)
        _NODE = Node(node_config(tmp, node={"audit_log": str(tmp / "audit.log")}))
    return _NODE


def write_seed_corpus(folder: Path) -> None:
    """Write one corpus file per seed (context byte + valid data set) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS):
        (folder / f"seed-{seed.name}").write_bytes(bytes([i]) + seed.body)


def test_one_input(data: bytes) -> None:
    """Fuzz target: receive one data set and check the invariants."""
    if not data:
        return
    seed = SEEDS[data[0] % len(SEEDS)]
    instance, uid = instance_from(seed, data[1:], next(_TOKENS))
    check_received(_node(), instance, uid, seed.sop_class_uid)


def main(argv: list[str]) -> None:
    """Write the seed corpus into the first corpus folder given (if any), then fuzz."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    folders = [a for a in argv[1:] if not a.startswith("-")]
    if folders:
        write_seed_corpus(Path(folders[0]))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
