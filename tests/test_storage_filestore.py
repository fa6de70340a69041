from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.errors import InvalidUIDError, StorageError, StorageIOError
from storage.filestore import FileStore, validate_uid

GOOD = ["1.2.840.10008.1.2", "0", "1.0.3", "2.25.329800735698586629295641978511506172918"]
BAD = [
    "",
    "1.02.3",
    "1..2",
    ".1.2",
    "1.2.",
    "1.2.a",
    "1.2 ",
    "../../etc/passwd",
    "1/2",
    "1\\2",
    "..",
    "1.2.3\x00",
    "1." + "1" * 63,
    "-1.2",
]


@pytest.mark.parametrize("uid", GOOD)
def test_valid_uids_accepted(uid: str) -> None:
    assert validate_uid(uid) == uid


@pytest.mark.parametrize("uid", BAD)
def test_invalid_uids_rejected(uid: str) -> None:
    with pytest.raises(InvalidUIDError):
        validate_uid(uid)


def test_non_string_uid_rejected() -> None:
    with pytest.raises(InvalidUIDError):
        validate_uid(123)  # type: ignore[arg-type]


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=8))
def test_generated_uids_roundtrip(components: list[int]) -> None:
    uid = ".".join(str(c) for c in components)
    if len(uid) <= 64:
        assert validate_uid(uid) == uid
    else:
        with pytest.raises(InvalidUIDError):
            validate_uid(uid)


@given(st.text(alphabet="0123456789./\\ ab", min_size=1, max_size=20))
def test_accepted_uids_are_safe_path_components(text: str) -> None:
    try:
        validate_uid(text)
    except InvalidUIDError:
        return
    assert "/" not in text and "\\" not in text and ".." not in text
    assert not text.startswith(".") and not text.endswith(".")


def test_instance_path_layout(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    path = store.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == (tmp_path / "store").resolve() / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


@pytest.mark.parametrize(
    "uids",
    [
        ("..", "1.2", "1.2.3"),
        ("1.2", "../../x", "1.2.3"),
        ("1.2", "1.2", "../../../tmp/evil"),
        ("/abs", "1.2", "1.2.3"),
        ("1.2", "1.2", "1.2.3/../../4"),
    ],
)
def test_path_trick_uids_rejected(tmp_path: Path, uids: tuple[str, str, str]) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(InvalidUIDError):
        store.instance_path(*uids)


def test_write_atomic_bytes_and_callable(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    path = store.instance_path("1.2", "1.2.3", "1.2.3.4")
    assert store.write_atomic(path, b"first") == 5
    assert path.read_bytes() == b"first"

    def writer(fh: BinaryIO) -> None:
        fh.write(b"second-")
        fh.write(b"version")

    assert store.write_atomic(path, writer) == len(b"second-version")
    assert path.read_bytes() == b"second-version"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_write_atomic_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    path = store.instance_path("1.2", "1.2.3", "1.2.3.4")

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half of a file")
        raise RuntimeError("association aborted")

    with pytest.raises(RuntimeError, match="association aborted"):
        store.write_atomic(path, broken)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []

    store.write_atomic(path, b"complete old content")
    with pytest.raises(RuntimeError):
        store.write_atomic(path, broken)
    assert path.read_bytes() == b"complete old content"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_write_outside_root_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    with pytest.raises(StorageError):
        store.write_atomic(tmp_path / "elsewhere.dcm", b"x")
    assert not (tmp_path / "elsewhere.dcm").exists()


def test_write_error_is_storage_error(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    blocker = store.root / "1.2"
    blocker.write_bytes(b"a file where a folder should be")
    with pytest.raises(StorageIOError) as info:
        store.write_atomic(store.instance_path("1.2", "1.2.3", "1.2.3.4"), b"x")
    assert isinstance(info.value, OSError) and isinstance(info.value, StorageError)
    assert info.value.errno is not None and "Errno" not in str(info.value)


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    keep = store.instance_path("1.2", "1.2.3", "1.2.3.4")
    store.write_atomic(keep, b"keep me")
    stale = [keep.parent / ".tmp-1.2.3.5.dcm.abc.part", store.root / "1.2" / ".tmp-x.part"]
    for p in stale:
        p.write_bytes(b"partial")
    assert store.remove_stale_temp_files() == 2
    assert all(not p.exists() for p in stale)
    assert keep.read_bytes() == b"keep me"
    assert store.remove_stale_temp_files() == 0


def test_free_bytes(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    free = store.free_bytes()
    st_ = os.statvfs(tmp_path)
    assert free > 0
    assert abs(free - st_.f_bavail * st_.f_frsize) < 64 * 1024 * 1024
