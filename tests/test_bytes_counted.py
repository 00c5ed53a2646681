"""The transport's byte counters against the kernel's: what ``bytes_sent`` says
crossed is what the driver's TCP sockets carried (Linux ``TCP_INFO``)."""
import socket
import struct
import sys

import numpy as np
import pytest

import dmlcore as dml
from dmlcore import channel

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not hasattr(socket, "TCP_INFO"),
                                reason="TCP_INFO byte counters are Linux's")

# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked at 120, u64 tcpi_bytes_received at 128
_TCP_INFO_LEN, _ACKED, _RECEIVED = 136, 120, 128
_SYN = 1          # the SYN counts as one acknowledged byte
_TOKEN = 16       # the channel's opening token, sent before any counted message


def _kernel_counts(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return (struct.unpack_from("Q", info, _ACKED)[0],
            struct.unpack_from("Q", info, _RECEIVED)[0])


@pytest.fixture
def closed_channels(monkeypatch):
    """Every driver-side channel closed during the test, as
    (counted sent, counted received, kernel acked, kernel received)."""
    seen = []
    close = channel.Channel.close

    def recording_close(self):
        if self._sock is not None:
            acked, received = _kernel_counts(self._sock)
            seen.append((self.bytes_sent, self.bytes_received, acked, received))
        close(self)

    monkeypatch.setattr(channel.Channel, "close", recording_close)
    return seen


def test_counters_equal_the_bytes_the_sockets_carried(client, closed_channels):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 20))
    y = (X[:, 0] > 0).astype(np.float64)
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    model = dml.models.MLP([20, 64, 2])
    steps = 15
    result = dml.fit(model, data, dml.SyncSGD(batch_size=32, apply_on="driver"),
                     dml.optim.SGD(lr=0.1), steps=steps, client=client, progress=False,
                     timeout=30)
    assert len(closed_channels) == len(client.scheduler_info()["workers"])
    sent = received = 0
    for counted_out, counted_in, acked, kernel_in in closed_channels:
        assert acked - _SYN - _TOKEN == counted_out, (acked, counted_out)
        assert kernel_in == counted_in, (kernel_in, counted_in)
        sent, received = sent + counted_out, received + counted_in
    # the steps' bytes are part of the channels' traffic (the rest: opening and
    # closing calls), and each step moved at least params out and a gradient back
    per_step = np.asarray(result.history.bytes_sent)
    assert per_step.sum() <= sent + received
    assert np.all(per_step >= 2 * model.n_params * 8 * len(closed_channels))
