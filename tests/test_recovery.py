"""A worker SIGKILLed mid-fit: the fit goes on on the survivors, same bits.

Each case (``tests/recover_fit.py``) runs in its own process group under a
hard timeout, on a real `dask scheduler` and three `dask worker --no-nanny`
processes: the fit once undisturbed, then again with one worker killing
itself at a set ``loss_grad`` call (case ``nanny``: a LocalCluster, whose
nanny restarts the worker under a new address). The final parameters must be equal bit
for bit, and the history (and its netCDF file) must name the lost worker.
FedAvg (case ``fedavg``) drops the lost worker's clients for the round it
died in and trains them on a survivor from the next round. ``retire``: a
worker that ``client.retire_workers`` is asked to retire hands its executors
over at the next epoch and is retired; ``join`` / ``fedavg_join``: a worker that
joins gets partitions at the next epoch or round. ``at_start``: the victim dies
while the fit's pool starts (its executor's actor is lost with it).
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from dmlcore.recovery import looks_lost, reassign
from dmlcore.channel import DataPlaneTimeout, PeerLost

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYNC_CASES = ["replicas", "driver", "local_steps", "lbfgs", "nanny", "retire", "at_start"]
CASES = SYNC_CASES + ["fedavg", "join", "fedavg_join"]
WHAT = {"retire": "executor handed over by a retiring worker"}
PARALLEL, HARD_TIMEOUT = 4, 150   # mostly process start-up: 4 side by side


def _start(case, logdir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "recover_fit.py"), case, logdir],
                            env=env, cwd=HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _result(proc, deadline):
    """The JSON line the script printed; its whole process group (the dask
    processes it started too) is killed past ``deadline``."""
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (rc {proc.returncode}): {stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def recovered():
    """Every case's result, PARALLEL at a time."""
    results, running, pending = {}, [], list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            while pending or running:
                while pending and len(running) < PARALLEL:
                    case = pending.pop(0)
                    logdir = os.path.join(tmp, case)
                    os.mkdir(logdir)
                    running.append((case, _start(case, logdir),
                                    time.monotonic() + HARD_TIMEOUT))
                case, proc, deadline = running.pop(0)
                results[case] = _result(proc, deadline)
        finally:
            for _, proc, _ in running:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=30)
    return results


@pytest.mark.slow                   # ten fits on fresh dask processes
@pytest.mark.parametrize("case", SYNC_CASES)
def test_a_killed_worker_changes_no_bit_of_the_result(recovered, case):
    out = recovered[case]
    assert out["killed_at"] is not None, "the victim never reached its kill switch"
    assert out["identical"], f"max |difference| {out['max_abs_diff']}"
    assert out["steps"][0] == out["steps"][1]
    assert out["loss_calm"] == out["loss_hit"]


@pytest.mark.slow                   # ten fits on fresh dask processes
@pytest.mark.parametrize("case", SYNC_CASES + ["fedavg"])
def test_the_history_records_the_loss_and_where_its_partitions_went(recovered, case):
    out = recovered[case]
    events = out["events"]
    assert events["worker"] == [out["victim"]]
    assert events["what"] == [WHAT.get(case, "executor re-created on a survivor")]
    assert events["moved_to"][0] in out["workers_left"]
    assert out["victim"] not in out["workers_left"]
    assert events["time"][0] >= out["killed_at"]          # detected after the kill
    assert out["events_in_file"] == [out["victim"]]
    if case == "at_start":
        assert events["step"] == [0]


@pytest.mark.slow                   # ten fits on fresh dask processes
def test_fedavg_drops_the_lost_clients_for_one_round_then_trains_them_elsewhere(recovered):
    from recover_fit import KILL_ROUND, ROUNDS

    out = recovered["fedavg"]
    assert out["steps"] == [ROUNDS, ROUNDS]             # the run finished
    assert out["sampled"] == [6] * ROUNDS
    # the victim held two clients: dropped in the round it died, back after it
    assert out["failed"] == [2 if r == KILL_ROUND else 0 for r in range(ROUNDS)]
    assert out["participants"] == [4 if r == KILL_ROUND else 6 for r in range(ROUNDS)]
    calm, hit = out["losses"]
    assert hit[:KILL_ROUND] == calm[:KILL_ROUND]          # same rounds before the loss
    assert out["events"]["step"] == [KILL_ROUND]
    assert abs(hit[-1] - calm[-1]) < 0.01 * calm[-1]


@pytest.mark.slow                   # ten fits on fresh dask processes
def test_a_joining_worker_gets_partitions_at_the_next_epoch(recovered):
    out = recovered["join"]
    events = out["events"]
    assert out["victim"] is not None                   # the joined worker's address
    assert events["what"] == ["partitions regrouped over the live workers"]
    assert events["moved_to"] == [out["victim"]]
    assert events["step"] == [19.0]                    # 300 rows / 16: 19 steps an epoch
    assert out["steps"][0] == out["steps"][1]
    # three groups instead of two: the same sums, bracketed otherwise
    assert out["max_abs_diff"] < 1e-12


@pytest.mark.slow                   # ten fits on fresh dask processes
def test_a_joining_worker_gets_fedavg_clients_from_the_next_round(recovered):
    out = recovered["fedavg_join"]
    events = out["events"]
    assert events["what"] == ["partitions regrouped over the live workers"]
    assert events["moved_to"] == [out["victim"]] and events["step"] == [2.0]
    assert out["participants"] == out["sampled"] and not any(out["failed"])
    assert out["steps"][0] == out["steps"][1] and out["max_abs_diff"] < 1e-12


def test_grow_moves_whole_groups_first_then_regroups():
    from dmlcore.recovery import grow

    rows = np.full(6, 10)
    # a survivor hosting two groups: one moves to the new worker, nothing is regrouped
    assert grow([("a", [0, 3]), ("a", [1, 4]), ("c", [2, 5])], rows, ["a", "c", "d"]) == (
        [("d", [0, 3]), ("a", [1, 4]), ("c", [2, 5])], False)
    # one group each: the partitions are dealt p mod W over the live workers
    assert grow([("a", [0, 2, 4]), ("b", [1, 3, 5])], rows, ["a", "b", "c"]) == (
        [("a", [0, 3]), ("b", [1, 4]), ("c", [2, 5])], True)
    assert grow([("a", [0, 1]), ("b", [2, 3])], rows[:4], ["a", "b"]) is None


def test_lost_groups_move_whole_to_the_least_loaded_survivor():
    groups = [("a", [0, 3]), ("b", [1, 4]), ("c", [2, 5])]
    rows = np.array([10, 10, 10, 10, 10, 9])
    moved_groups, moved = reassign(groups, rows, ["a", "c"], ["b"])
    assert moved_groups == [("a", [0, 3]), ("c", [1, 4]), ("c", [2, 5])]
    assert moved == [([1, 4], "c")]
    with pytest.raises(RuntimeError, match="every worker was lost"):
        reassign(groups, rows, [], ["a", "b", "c"])


def test_only_connection_losses_count_as_a_lost_worker():
    assert looks_lost(PeerLost("peer closed the connection"))
    assert looks_lost(ConnectionResetError())
    wrapped = RuntimeError("on worker x")
    wrapped.__cause__ = ConnectionError("reset")
    assert looks_lost(wrapped)
    from distributed.client import FutureCancelledError  # an actor lost with its worker
    assert looks_lost(FutureCancelledError("k", reason="lost dependencies"))
    assert not looks_lost(MemoryError("injected"))
    assert not looks_lost(DataPlaneTimeout("frozen"))


@pytest.mark.parametrize("source", ["numpy", "dask", "in_place", "sparse"])
def test_rehost_makes_partitions_again_from_their_source(client, source):
    """What recovery relies on: a partition made again on another worker from
    the driver's array or the dask graph holds the same rows, labels and weights."""
    import dask.array as da
    import scipy.sparse as sp

    import dmlcore as dml

    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=240)
    w = rng.uniform(0.5, 2.0, size=240)
    if source == "sparse":
        X = sp.random(240, 50, density=0.1, format="csr", random_state=1, dtype=np.float32)
    Xs = da.from_array(X, chunks=(60, 5)) if source in ("dask", "in_place") else X
    if source == "in_place":
        from dmlcore.data import partition_in_place

        data = partition_in_place(Xs, y, client=client, sample_weight=w)
    else:
        data = dml.partition(Xs, y, n_partitions=4, seed=0, client=client, sample_weight=w)
    before = [tuple(None if f is None else client.gather(f) for f in fs)
              for fs in data.partition_futures()]
    p = 1
    target = next(a for a in sorted(client.nthreads()) if a != data.workers()[p])
    data.rehost([p], target)
    assert data.workers()[p] == target
    after = [tuple(None if f is None else client.gather(f) for f in fs)
             for fs in data.partition_futures()]
    for (xa, ya, wa), (xb, yb, wb) in zip(before, after):
        xa, xb = (a.toarray() if sp.issparse(a) else a for a in (xa, xb))
        assert xa.dtype == xb.dtype and np.array_equal(xa, xb)
        assert np.array_equal(ya, yb) and np.array_equal(wa, wb)
    # the dask arrays read the new blocks
    np.testing.assert_array_equal(data.y.compute(), np.concatenate([b[1] for b in before]))


def test_data_without_a_source_say_so(client):
    import dmlcore as dml

    data = dml.partition(np.ones((20, 2)), np.arange(20) % 2, client=client)
    data._source = None
    with pytest.raises(RuntimeError, match="keep no source"):
        data.rehost([0], sorted(client.nthreads())[0])
