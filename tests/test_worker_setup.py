"""The per-worker set-up (``dmlcore.cluster.prepare``) on real `dask worker` processes:
every BLAS library the kernels call runs one thread, on the workers present
and on one that joins later.

The MLP kernels call scipy's BLAS (``scipy.linalg.cython_blas``), a library
apart from numpy's; a limit set before scipy is loaded leaves it with its
default pool, and three such workers on two cores made a small fit 6x slower.
"""
import os

from distributed import Client

from dask_processes import dask_processes
from dmlcore.cluster import prepare


def test_every_blas_library_runs_one_thread_on_every_worker(tmp_path):
    def blas_threads():         # nested: it travels by value (workers lack this module)
        from threadpoolctl import threadpool_info

        import scipy.linalg  # noqa: F401 - whatever the set-up left unloaded counts too

        return sorted((p["filepath"], p["num_threads"]) for p in threadpool_info()
                      if p["user_api"] == "blas")

    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")    # a default the limit must undo
    with dask_processes(tmp_path, [([], None)], env=env) as procs, \
            Client(procs.address, timeout=30) as client:
        prepare(client)
        procs.start_worker()
        client.wait_for_workers(2, timeout=60)
        prepare(client)                 # a second fit's call: nothing changes
        seen = client.run(blas_threads)
    assert len(seen) == 2
    for worker, libraries in seen.items():
        assert len(libraries) >= 1, worker
        assert all(threads == 1 for _, threads in libraries), (worker, libraries)
