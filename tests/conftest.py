"""Shared pytest fixtures and markers.

``client``: one 2-worker, process-based ``LocalCluster`` for the whole session
(1 thread per worker, no dashboard), closed at teardown. Tests that use it
must not restart or close it and should drop their futures when done.

``fashion_mnist_available()`` and ``FASHION_MNIST_SKIP``: the files that read
the real Fashion-MNIST files (directly or in a subprocess, which inherits
``DMLCORE_DATA``) skip those tests with ``pytest.mark.skipif(not
fashion_mnist_available(), reason=FASHION_MNIST_SKIP)`` when the four files
are not where ``dmlcore.datasets.fashion_mnist`` looks; the reason says how to
install them. Pointing ``DMLCORE_DATA`` at an empty directory hides the
installed files, so ``DMLCORE_DATA=$(mktemp -d) pytest`` shows what a machine
without them runs.
"""
import pytest

FASHION_MNIST_SKIP = (
    "needs the Fashion-MNIST files: `apt-get install dataset-fashion-mnist` (Debian; "
    "files land in /usr/share/datasets/fashion-mnist) or set DMLCORE_DATA to a directory "
    "holding the four *-ubyte.gz files")


def fashion_mnist_available(default_location: bool = False) -> bool:
    """Whether all four Fashion-MNIST files are where the loader looks."""
    from pathlib import Path

    from dmlcore import datasets

    directory = (Path(datasets.FASHION_MNIST_DIR) if default_location
                 else datasets._fashion_mnist_dir())
    return all(datasets._find_idx(directory, stem) is not None
               for pair in datasets._FMNIST_FILES.values() for stem in pair)


@pytest.fixture(scope="session")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
