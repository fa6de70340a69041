"""A short, bounded fuzz of the receive path: valid encoded CT/MR data sets mutated (bit flips,
truncation, insertion, overwrite, deletion) and pushed through ``StorageSCP.receive`` (the whole
per-instance C-STORE path), plus a subset over a real association.  The longer run is
``fuzz/fuzz_receive.py``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE, build_context
from sqlalchemy import func, select

from dicom_node.app import Node
from storage.models import Instance
from tests.support import db as db_support
from tests.support.malformed import (
    FAILURE_STATUSES,
    Seed,
    check_received,
    instance_from,
    mutate,
    receive_seeds,
)
from tests.support.node import node_config, running_node

SEEDS = receive_seeds()
db_url = db_support.db_url

_op = st.tuples(
    st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "overwrite", "delete"]),
    st.integers(min_value=0, max_value=2**20),
    st.binary(min_size=1, max_size=16),
)


@pytest.fixture()
def node(tmp_path: Path, db_url: str) -> Iterator[Node]:
    """A node on SQLite and on PostgreSQL, not started: ``receive()`` needs no network."""
    n = Node(node_config(tmp_path, node={"database_url": db_url}))
    try:
        yield n
    finally:
        n.db.dispose()


def test_seeds_are_received(node: Node) -> None:
    """Unmutated seeds are valid: success, so the fuzz starts from real instances."""
    for i, seed in enumerate(SEEDS):
        data, uid = instance_from(seed, seed.body, 10**6 + i)
        assert check_received(node, data, uid, seed.sop_class_uid) == 0, seed.name


def test_mutated_instances_never_escape_and_success_means_stored(node: Node) -> None:
    tokens = itertools.count(1)
    seen: set[int] = set()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(seed=st.sampled_from(SEEDS), ops=st.lists(_op, min_size=1, max_size=4))
    def run(seed: Seed, ops: list[tuple[str, int, bytes]]) -> None:
        data, uid = instance_from(seed, mutate(seed.body, ops), next(tokens))
        seen.add(check_received(node, data, uid, seed.sop_class_uid))

    run()
    assert seen - {0}, "no mutation was refused: the fuzz did not reach the checks"
    assert seen <= {0} | set(FAILURE_STATUSES)


def test_mutated_instances_over_a_real_association(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom._config

    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    rng = random.Random(20261125)
    cases = []
    for i in range(40):
        seed = SEEDS[i % len(SEEDS)]
        ops = [(rng.choice(["flip", "truncate", "insert", "overwrite"]), rng.randrange(2**20),
                rng.randbytes(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        data, uid = instance_from(seed, mutate(seed.body, ops), 2 * 10**6 + i)
        path = tmp_path / "in" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        cases.append((seed, uid, path))
    cfg = node_config(tmp_path / "node")
    with running_node(cfg) as node:
        ae = AE(ae_title="FUZZSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        contexts = [build_context(s.sop_class_uid, [s.transfer_syntax_uid]) for s in SEEDS]
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SRNODE", contexts=contexts)
        assert assoc.is_established
        statuses = []
        for _seed, uid, path in cases:
            rsp = assoc.send_c_store(path)
            status = int(rsp.Status)
            statuses.append(status)
            with node.db.session() as s:
                row = s.execute(select(Instance.path).where(
                    Instance.sop_instance_uid == uid)).scalar_one_or_none()
            if status == 0:
                assert row is not None
            else:
                assert status in FAILURE_STATUSES and row is None, hex(status)
        assert assoc.is_established  # never aborted by a bad instance
        assoc.release()
        with node.db.session() as s:
            assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == \
                statuses.count(0)
    assert any(s != 0 for s in statuses)
