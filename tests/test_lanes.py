"""Same-host shared-memory lanes under the peer mesh: the arrays of a message
go through ``/dev/shm``, the header through the socket; every array arrives
bit for bit, a lane is offered and mapped only where it checks out, and no
lane file outlives the mesh's set-up."""
import glob
import os

import numpy as np
import pytest

from dmlcore import lanes
from dmlcore.channel import PeerLost, PeerMesh
from test_channel import connect_all, run_all

pytestmark = pytest.mark.skipif(not lanes.lanes_available(), reason="needs /dev/shm (Linux)")


def _lane_files():
    return set(glob.glob(os.path.join(lanes.SHM_DIR, "dmlcore-lane-*")))


def _connected(options):
    return connect_all([PeerMesh("127.0.0.1", timeout=10, **kw) for kw in options])


def _exchange_all(meshes, make, rounds):
    """``rounds`` exchanges of ``make(i, r)`` on every mesh at once; each
    mesh's received lists (arrays copied out before the next round)."""
    got, errors = [[] for _ in meshes], []

    def run(i):
        try:
            for r in range(rounds):
                everyone = meshes[i].exchange(make(i, r))
                got[i].append([(loss, vec.copy()) for loss, vec in everyone])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    run_all(run, [(i,) for i in range(len(meshes))], timeout=60)
    assert not errors, errors
    return got


def test_lanes_carry_every_array_exactly_and_larger_messages_go_by_socket():
    before = _lane_files()
    meshes = _connected([{"lanes": True, "lane_bytes": 1 << 20}] * 3)
    try:
        assert [m.lane_peers for m in meshes] == [[1, 2], [0, 2], [0, 1]]
        assert _lane_files() == before              # unlinked once mapped
        sizes = [7, 70_001, 300_000]                # 300,000 float32 > the 1 MiB slot

        def make(i, r):
            rng = np.random.default_rng(100 * r + i)
            return float(i + r), rng.normal(size=sizes[(i + r) % 3]).astype(np.float32)

        got = _exchange_all(meshes, make, rounds=12)
        for r in range(12):
            expected = [make(j, r) for j in range(3)]
            for i in range(3):
                assert [loss for loss, _ in got[i][r]] == [e[0] for e in expected]
                for (_, vec), (_, sent) in zip(got[i][r], expected):
                    np.testing.assert_array_equal(vec, sent)
    finally:
        for m in meshes:
            m.close()


def test_a_peer_without_lanes_gets_none_and_both_use_the_socket():
    meshes = _connected([{"lanes": True}, {"lanes": False}])
    try:
        assert [m.lane_peers for m in meshes] == [[], []]
        got = _exchange_all(meshes, lambda i, r: (float(i), np.full(1000, i + r, np.float64)), 3)
        assert [float(v[0]) for _, v in got[0][2]] == [2.0, 3.0]
    finally:
        for m in meshes:
            m.close()


def test_a_lane_message_on_a_connection_without_a_lane_closes_it():
    meshes = _connected([{"lanes": True}] * 2)
    try:
        for lane in meshes[1]._in_lanes.values():   # peer 1 forgets the lane it mapped
            lane.close()
        meshes[1]._in_lanes = {}
        errors = []

        def run(m):
            try:
                m.exchange((0.0, np.zeros(100)))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                m.close()

        run_all(run, [(m,) for m in meshes])
        assert any(isinstance(e, PeerLost) and "without one" in str(e) for e in errors), errors
    finally:
        for m in meshes:
            m.close()


def test_a_peer_dying_with_lanes_open_is_peer_lost():
    meshes = _connected([{"lanes": True}] * 2)
    try:
        assert meshes[0].lane_peers == [1]
        meshes[1].close()
        with pytest.raises(PeerLost, match="peer"):
            meshes[0].exchange((0.0, np.zeros(1000)))
    finally:
        meshes[0].close()


def test_an_offer_that_does_not_check_out_is_not_mapped():
    lane = lanes.OutLane(4096)
    try:
        offer = lane.offer()
        assert lanes.InLane.open(offer) is not None
        for bad in ({**offer, "name": "../../etc/passwd"},
                    {**offer, "name": "dmlcore-lane-" + "0" * 32},          # no such file
                    {**offer, "nonce": "00" * 16},
                    {**offer, "netns": -1},                                # another namespace
                    {**offer, "slot_bytes": 8192},                         # not its size
                    {"name": offer["name"]}):
            assert lanes.InLane.open(bad) is None, bad
        os.chmod(os.path.join(lanes.SHM_DIR, lane.name), 0o644)            # readable by others
        assert lanes.InLane.open(offer) is None
    finally:
        lane.close()
    assert not os.path.exists(os.path.join(lanes.SHM_DIR, lane.name))
