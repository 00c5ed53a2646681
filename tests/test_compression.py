"""Compression: the codecs against independent truths, then each strategy.

Codecs: int8 is unbiased (the mean of many quantizations approaches x) and
within one level of its block's scale; top-k keeps exactly the k largest
magnitudes; error feedback conserves mass (what was sent plus the residual
is what came in); messages survive the wire and malformed ones are refused.
Strategies (the session's 2-worker cluster): each compression trains to near
the uncompressed accuracy, and ``bytes_sent`` falls by the encoding's factor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

import dmlcore as dml
from dmlcore import compression as codecs
from dmlcore import wire
from dmlcore.messages import Half, Int8Blocks, Partial, TopK
from dmlcore.strategies.ps import ParameterServer

from bytes_check import HEADER

TOPK = {"topk": 0.01}


# ---- codecs ------------------------------------------------------------------------------
def test_int8_is_unbiased_and_within_one_level_of_its_block():
    rng = np.random.default_rng(1)
    n = 3 * codecs.BLOCK + 77                       # a short last block
    x = (rng.standard_normal(n) * np.repeat([1e-3, 1.0, 50.0, 7.0], codecs.BLOCK)[:n]
         ).astype(np.float32)
    coder = codecs.Compressor("int8", seed=3)
    draws = np.stack([codecs.decode(coder.encode(x, (t,)), np.float64) for t in range(400)])
    scales = np.array([np.abs(x[i:i + codecs.BLOCK]).max()
                       for i in range(0, n, codecs.BLOCK)])
    level = np.repeat(scales / 127, codecs.BLOCK)[:n]
    assert np.all(np.abs(draws - x) <= level * (1 + 1e-6))
    # each draw is x's lower or upper level with the right odds: sd <= level / 2
    assert np.all(np.abs(draws.mean(0) - x) <= 5 * level / 2 / math.sqrt(len(draws)))
    assert np.abs(draws.mean(0) - x).max() < np.abs(draws[0] - x).max() / 5
    # reproducible from (seed, key); another key is another draw
    again = codecs.Compressor("int8", seed=3).encode(x, (0,))
    assert np.array_equal(codecs.decode(again, np.float64), draws[0])
    assert not np.array_equal(draws[1], draws[0])


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    rng = np.random.default_rng(2)
    x = (rng.permutation(np.arange(1.0, 1002.0)) * rng.choice([-1, 1], 1001)
         ).astype(np.float32)                                  # distinct magnitudes
    for ratio in (0.01, 0.1, 0.5, 1.0):
        message = codecs.topk(x, ratio)
        k = math.ceil(ratio * x.size)
        expected = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
        assert np.array_equal(message.indices, expected)
        dense = codecs.decode(message, np.float32)
        np.testing.assert_allclose(dense[expected], x[expected], rtol=1e-3)
        assert np.count_nonzero(dense) == k - np.count_nonzero(x[expected] == 0)
        assert np.all(dense[np.setdiff1d(np.arange(x.size), expected)] == 0)


def test_error_feedback_conserves_mass():
    """Sum of what was sent over T steps plus the final residual == sum of the inputs."""
    rng = np.random.default_rng(3)
    coder = codecs.Compressor({"topk": 0.02}, seed=0)
    inputs = rng.standard_normal((60, 2000)).astype(np.float32) + np.linspace(-1, 1, 2000)
    sent = sum(codecs.decode(coder.encode(v), np.float64) for v in inputs)
    total = inputs.sum(0, dtype=np.float64)
    np.testing.assert_allclose(sent + coder.residual, total, rtol=0, atol=1e-3)
    assert np.abs(coder.residual).max() > 1          # something was held back
    # without the residual most of the mass would never be sent
    plain = sum(codecs.decode(codecs.topk(v, 0.02), np.float64) for v in inputs)
    assert np.abs(plain - total).sum() > 2 * np.abs(coder.residual).sum()


def test_momentum_correction_matches_a_numpy_reference_of_deep_gradient_compression():
    """u <- m u + g; v <- v + u; send the top-k of v; v and u lose the sent entries."""
    rng = np.random.default_rng(4)
    m, ratio, n = 0.9, 0.02, 3000
    inputs = rng.standard_normal((40, n)) + np.linspace(-2, 2, n)
    coder = codecs.Compressor({"topk": ratio}, seed=0, momentum=m)
    u, v = np.zeros(n), np.zeros(n)
    k = math.ceil(ratio * n)
    for g in inputs:
        message = coder.encode(g)
        u = m * u + g
        v += u
        chosen = np.sort(np.argsort(-np.abs(v), kind="stable")[:k])
        np.testing.assert_array_equal(message.indices, chosen)
        sent = codecs.decode(message, np.float64)
        np.testing.assert_allclose(sent[chosen], v[chosen], rtol=1e-3)
        assert np.all(np.delete(sent, chosen) == 0)
        v[chosen] -= sent[chosen]               # the float16 rounding stays behind
        u[chosen] = 0
        np.testing.assert_allclose(coder.residual, v, rtol=0, atol=1e-9)
        np.testing.assert_allclose(coder.velocity, u, rtol=0, atol=1e-9)


def test_momentum_moves_into_top_k_senders_only_for_sgd_with_plain_momentum():
    sgd = dml.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
    plain, momentum = codecs.momentum_correction(TOPK, sgd)
    assert momentum == 0.9 and plain.momentum == 0.0
    assert (plain.lr, plain.weight_decay, plain.schedule) == (0.1, 1e-4, sgd.schedule)
    assert sgd.momentum == 0.9                   # the user's optimizer is not changed
    off = codecs.parse({"topk": 0.01, "momentum_correction": False})
    assert off == {"topk": 0.01, "momentum_correction": False}
    assert codecs.parse({"topk": 0.01, "momentum_correction": True}) == TOPK
    for spec, optimizer in ((off, sgd), ("int8", sgd), (None, sgd),
                            (TOPK, dml.optim.SGD(lr=0.1)), (TOPK, dml.optim.Adam()),
                            (TOPK, dml.optim.SGD(lr=0.1, momentum=0.9, nesterov=True))):
        assert codecs.momentum_correction(spec, optimizer) == (optimizer, 0.0)
    with pytest.raises(ValueError, match="momentum correction needs top-k"):
        codecs.Compressor("int8", momentum=0.9)


def test_float16_scales_sums_past_its_range_and_non_finite_vectors_travel_raw():
    x = np.array([1e7, -3e6, 2.5, 0.0, 1e-3], dtype=np.float32)
    coder = codecs.Compressor("float16")
    message = coder.encode(x)
    assert isinstance(message, Half) and message.values.dtype == np.float16
    np.testing.assert_allclose(codecs.decode(message, np.float32), x, rtol=1e-3, atol=1e7 * 1e-7)
    bad = x.copy()
    bad[1] = np.nan
    for spec in ("float16", "int8", TOPK):
        raw = codecs.Compressor(spec).encode(bad, (0,))
        assert isinstance(raw, np.ndarray)
        np.testing.assert_array_equal(codecs.decode(raw, np.float32), bad)


@pytest.mark.skipif(not codecs._codec.SUPPORTED, reason="this CPU has no F16C: NumPy packs")
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 203_530])
def test_the_compiled_float16_codec_gives_numpys_bits(n):
    from dmlcore._ext import codec

    rng = np.random.default_rng(n)
    # magnitudes over 2**-40 .. 2**20: after the scale some halves are subnormal or 0
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-40, 20, n)).astype(np.float32)
    if n > 8:
        x[:4] = [0.0, -0.0, 2.0 ** -24 * 3, 65519.0 * 2.0 ** -10]   # ties to even, signed 0
    scale = codecs._pow2_scale(x)
    half = np.empty(n, dtype=np.float16)
    codec.pack(x, scale, half.view(np.uint16))
    want = (x / scale).astype(np.float16)
    np.testing.assert_array_equal(half.view(np.uint16), want.view(np.uint16))
    back = np.empty(n, dtype=np.float32)
    codec.unpack(half.view(np.uint16), scale, back)
    np.testing.assert_array_equal(back.view(np.uint32),
                                  (want.astype(np.float32) * np.float32(scale)).view(np.uint32))
    total = x.copy()
    codec.unpack(half.view(np.uint16), scale, total, add=True)
    np.testing.assert_array_equal(total, x + want.astype(np.float32) * np.float32(scale))
    # through the Compressor: the same message as NumPy's casts, read-only frames decode
    message = codecs.Compressor("float16").encode(x)
    np.testing.assert_array_equal(message.values.view(np.uint16), want.view(np.uint16))
    frozen = message.values.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(codecs.decode(Half(frozen, message.scale), np.float32), back)
    with pytest.raises(ValueError, match="out has"):
        codec.pack(x, scale, np.empty(n + 1, dtype=np.uint16))


def test_without_f16c_numpy_packs_float16_with_the_same_bits(monkeypatch):
    x = np.random.default_rng(11).standard_normal(1001).astype(np.float32)
    fast = codecs.Compressor("float16").encode(x)
    fast_sum = codecs.decode_into(fast, np.ones(1001, np.float32), add=True)
    monkeypatch.setattr(codecs._codec, "SUPPORTED", False)    # a CPU without F16C
    slow = codecs.Compressor("float16").encode(x)
    np.testing.assert_array_equal(slow.values.view(np.uint16), fast.values.view(np.uint16))
    assert slow.scale == fast.scale
    np.testing.assert_array_equal(codecs.decode(slow, np.float32), codecs.decode(fast, np.float32))
    np.testing.assert_array_equal(codecs.decode_into(slow, np.ones(1001, np.float32), add=True),
                                  fast_sum)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_into_gives_decode_then_copy_or_add(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(3001).astype(dtype)      # 5 whole int8 blocks and a tail
    base = rng.standard_normal(3001).astype(dtype)
    for spec in (None, "float16", "int8", TOPK):
        message = codecs.Compressor(spec).encode(x, (0,))
        dense = codecs.decode(message, dtype)
        out = np.full(3001, np.nan, dtype=dtype)
        np.testing.assert_array_equal(codecs.decode_into(message, out), dense)
        out = base.copy()
        codecs.decode_into(message, out, add=True)
        np.testing.assert_array_equal(out, base + dense)
    # a top-k message whose indices repeat (or run backwards) is refused, not summed twice
    twice = TopK(3001, np.array([5, 5], dtype=np.uint32), np.ones(2, np.float16), 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        codecs.decode_into(twice, base.copy(), add=True)


def test_messages_travel_as_raw_frames_and_bad_ones_are_refused():
    x = np.random.default_rng(4).standard_normal(5000).astype(np.float32)
    for spec in ("float16", "int8", TOPK):
        message = codecs.Compressor(spec).encode(x, (1,))
        header, buffers = wire.encode(Partial(1.0, message, 3.0))
        assert sum(memoryview(b).nbytes for b in buffers) == codecs.nbytes(message)
        back = wire.decode(header, buffers)
        assert type(back.grad) is type(message)
        np.testing.assert_array_equal(codecs.decode(back.grad, np.float32),
                                      codecs.decode(message, np.float32))
    with pytest.raises(ValueError, match="indices do not fit"):
        codecs.decode(TopK(10, np.array([3, 10], np.uint32), np.ones(2, np.float16), 1.0),
                      np.float32)
    with pytest.raises(ValueError, match="indices do not fit"):
        codecs.decode(TopK(10, np.array([-1.0, 2.0]), np.ones(2, np.float16), 1.0), np.float32)
    with pytest.raises(ValueError, match="scales for"):
        codecs.decode(Int8Blocks(np.zeros(600, np.int8), np.ones(1, np.float32), 512),
                      np.float32)


@pytest.mark.parametrize("bad", ["int4", "fp16", {"topk": 0}, {"topk": 1.5}, {"topk": "a"},
                                 {"topk": True}, {"top": 0.1}, {"topk": 0.1, "x": 1}, True, 8,
                                 {"topk": 0.1, "momentum_correction": "no"},
                                 {"momentum_correction": False}])
def test_bad_values_are_one_clear_error(bad):
    for make in (dml.SyncSGD, dml.FedAvg, ParameterServer):
        with pytest.raises(ValueError, match=r"^compression must be None, 'float16', 'int8' "
                                             r"or \{'topk': ratio\}.*got"):
            make(compression=bad)


def test_conflicting_or_impossible_combinations_are_refused():
    assert ParameterServer(transfer_dtype="float16").compression == "float16"
    assert ParameterServer(transfer_dtype="float16", compression="float16").transfer == "float16"
    with pytest.raises(ValueError, match="transfer_dtype='float16'.*conflicts with "
                                         "compression='int8'"):
        ParameterServer(transfer_dtype="float16", compression="int8")
    with pytest.raises(ValueError, match="compression needs transport="):
        dml.SyncSGD(transport="tasks", compression="int8")


def test_a_batch_solver_refuses_compression(client):
    X = np.random.default_rng(0).standard_normal((40, 3))
    data = dml.partition(X, (X[:, 0] > 0).astype(np.int64), n_partitions=2, client=client)
    with pytest.raises(ValueError, match="compression='int8' needs an \\(init, update\\)"):
        dml.fit(dml.models.Logistic(3), data, dml.SyncSGD(compression="int8"),
                dml.optim.LBFGS(), steps=2, client=client, progress=False)


# ---- strategies ---------------------------------------------------------------------------
D, HIDDEN, K = 256, 256, 4


@pytest.fixture(scope="module")
def problem(client):
    """Four Gaussian classes in 256-D; an MLP of 66,820 float32 parameters."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((K, D)) * 0.25
    y = rng.integers(0, K, 2400)
    X = (centres[y] + rng.standard_normal((len(y), D))).astype(np.float32)
    data = dml.partition(X[:2000], y[:2000], n_partitions=4, seed=0, client=client)
    model = dml.models.MLP([D, HIDDEN, K])
    return model, data, (X[2000:], y[2000:])


def _fit(problem, client, strategy, steps, lr=0.05):
    model, data, (Xt, yt) = problem
    result = dml.fit(model, data, strategy, dml.optim.SGD(lr=lr, momentum=0.9), steps=steps,
                     client=client, progress=False, init_params=model.init(0))
    accuracy = float((model.predict(result.params, Xt).argmax(1) == yt).mean())
    return result, accuracy, result.history.bytes_sent.values


def test_sync_replicas_compress_their_exchange(problem, client):
    model = problem[0]
    ef_only = {"topk": 0.01, "momentum_correction": False}
    runs = {str(c): _fit(problem, client, dml.SyncSGD(batch_size=16, compression=c), 120)
            for c in (None, "float16", "int8", TOPK, ef_only)}
    # a replica run's first step also carries the driver's calls: the steps
    # after an epoch's end are left out
    epoch = dml.SyncSGD(batch_size=16).steps_per_epoch(problem[1])
    inner = np.arange(120) % epoch != 0
    base_acc, base_bytes = runs["None"][1], runs["None"][2][inner]
    vector = model.n_params * 4
    # from the second step on, each of the 2 replicas sends its partial to the other
    assert np.all(np.abs(base_bytes - 2 * vector) <= 2 * HEADER)
    k = math.ceil(0.01 * model.n_params)
    expected = {"float16": 2 * model.n_params,
                "int8": model.n_params + 4 * math.ceil(model.n_params / codecs.BLOCK),
                str(TOPK): 6 * k, str(ef_only): 6 * k}
    for name, payload in expected.items():
        _, accuracy, sent = runs[name]
        assert np.all(sent[inner] >= 2 * payload)
        assert np.all(sent[inner] <= 2 * (payload + HEADER))
        assert accuracy >= base_acc - 0.01, (name, accuracy, base_acc)
    ratio = lambda name: base_bytes.mean() / runs[name][2][inner].mean()     # noqa: E731
    assert 3.8 < ratio("int8") < 4.1
    assert ratio(str(TOPK)) >= 50
    assert base_acc > 0.8
    # momentum correction: the senders keep the momentum, the optimizer's stays zero
    assert not np.any(runs[str(TOPK)][0].opt_state.velocity)
    assert np.any(runs[str(ef_only)][0].opt_state.velocity)
    assert runs[str(TOPK)][0].optimizer.momentum == 0.9     # what the user gave is kept


@pytest.mark.parametrize("compression", ["int8", TOPK])
def test_the_driver_path_gives_the_replicas_bits(problem, client, compression):
    """Both paths decode the executors' messages and add them in the same order."""
    runs = [_fit(problem, client, dml.SyncSGD(batch_size=16, compression=compression,
                                               apply_on=where, transport=transport), 15)[0]
            for where, transport in (("driver", "actors"), ("workers", "actors"),
                                     ("workers", "actor-calls"))]
    assert np.array_equal(runs[0].params, runs[1].params)
    assert np.array_equal(runs[0].params, runs[2].params)      # through Dask actor calls
    # the driver path sends the parameters down and the encoded partials up
    n_params, n_workers = problem[0].n_params, 2
    up = (n_params + 4 * math.ceil(n_params / codecs.BLOCK) if compression == "int8"
          else 6 * math.ceil(0.01 * n_params))
    sent = runs[0].history.bytes_sent.values
    assert np.all(sent >= n_workers * (4 * n_params + up))
    assert np.all(sent <= n_workers * (4 * n_params + up + 2 * HEADER))


class _StopAt:
    sync_every = None

    def __init__(self, step):
        self.step = step

    def __call__(self, step, record, params):
        return step == self.step


def test_resume_is_exact_for_int8_and_restarts_top_k_residuals(problem, client, tmp_path):
    """int8's draws are a function of (seed, step, sender); top-k's residuals start at zero."""
    model, data, _ = problem

    def run(compression, folder, **kw):
        return dml.fit(model, data, dml.SyncSGD(batch_size=16, compression=compression),
                       dml.optim.SGD(lr=0.05), steps=12, checkpoint_every=4, progress=False,
                       client=client, init_params=model.init(0), checkpoint_dir=folder, **kw)

    for compression in ("int8", TOPK):
        folder = tmp_path / str(len(str(compression)))
        straight = run(compression, None)
        run(compression, folder, callbacks=[_StopAt(8)])
        resumed = run(compression, folder, resume=True)
        assert list(resumed.history.step.values) == list(range(1, 13))
        if compression == "int8":
            np.testing.assert_array_equal(resumed.params, straight.params)
        else:
            assert not np.array_equal(resumed.params, straight.params)
            np.testing.assert_allclose(resumed.params, straight.params, atol=0.05)


def test_local_sgd_compresses_each_clients_delta(problem, client):
    model = problem[0]
    runs = [_fit(problem, client, dml.SyncSGD(batch_size=16, local_steps=4, compression=c), 20)
            for c in (None, TOPK)]
    assert runs[1][1] >= runs[0][1] - 0.03, (runs[1][1], runs[0][1])
    # per round: parameters down (4n) and uploads back per executor; two clients each
    n, executors = model.n_params, 2
    up = runs[1][2] - executors * 4 * n
    # (headers: the call, and the reply's two encoded uploads)
    assert np.all(up <= executors * (2 * 6 * math.ceil(0.01 * n) + 3 * HEADER))
    assert np.all(runs[0][2] - executors * 4 * n >= executors * 8 * n)


def test_fedavg_compresses_client_uploads(problem, client):
    model, workers = problem[0], problem[1].workers()
    n = model.n_params
    runs = {str(c): _fit(problem, client, dml.FedAvg(clients_per_round=2, local_epochs=1,
                                                     batch_size=32, compression=c), 8, lr=0.05)
            for c in (None, "int8", TOPK)}
    base = runs["None"]
    participants = base[0].history.participants.values
    for name in ("int8", str(TOPK)):
        result, accuracy, sent = runs[name]
        assert np.array_equal(result.history.participants.values, participants)
        assert accuracy >= base[1] - 0.03, (name, accuracy, base[1])
        # each round: parameters down to the clients' executors (4n each), uploads back
        executors = [len(set(_executors_of(result, r, workers))) for r in range(len(sent))]
        down = np.array(executors) * 4 * n
        up = sent - down
        base_up = base[2] - down
        assert np.all(base_up >= np.array(executors) * 8 * n)      # float64 weighted sums
        per_client = n + 4 * math.ceil(n / codecs.BLOCK) if name == "int8" \
            else 6 * math.ceil(0.01 * n)
        assert np.all(up >= 2 * per_client) and np.all(up <= 2 * per_client + 2 * HEADER * 2)
        if name == str(TOPK):
            assert base_up.sum() / up.sum() >= 50
    assert base[1] > 0.8


def _executors_of(result, round_, workers):
    """The worker of each client counted in ``round_``, from the history."""
    counted = np.flatnonzero(result.history.participation.values[round_] == 1)
    return [workers[c] for c in counted]


def test_parameter_server_compresses_its_pushes(problem, client):
    model = problem[0]
    n = model.n_params
    runs = {str(c): _fit(problem, client, ParameterServer("bsp", batch_size=16, compression=c),
                         60, lr=0.05)
            for c in (None, "float16", "int8", TOPK)}
    base_acc = runs["None"][1]
    # BSP, 2 partitions per worker: per clock the remote worker pulls once and
    # pushes twice (the server's worker travels in-process); arrays only
    pushes = {"None": 4 * n, "float16": 2 * n,
              "int8": n + 4 * math.ceil(n / codecs.BLOCK), str(TOPK): 6 * math.ceil(0.01 * n)}
    for name, push in pushes.items():
        _, accuracy, sent = runs[name]
        pull = 2 * n if name == "float16" else 4 * n
        assert np.all(sent[1:] == pull + 2 * push), (name, sent[:4], pull + 2 * push)
        assert accuracy >= base_acc - 0.03, (name, accuracy, base_acc)
    assert base_acc > 0.8


# ---- workflow ----------------------------------------------------------------------------
WORKFLOW = """\
name: t
data:
  source:
    synthetic: {kind: classification, n_samples: 1000, n_features: 5, n_classes: 3}
  partitions: 2
model: {kind: mlp, hidden: [8]}
strategy: {kind: KIND, batch_size: 32, compression: COMPRESSION}
optimizer: {kind: sgd, lr: 0.1}
train: {LENGTH: 2}
"""


def _strategy(kind, compression):
    from dmlcore import workflow

    text = WORKFLOW.replace("KIND", kind).replace("COMPRESSION", compression).replace(
        "LENGTH", "rounds" if kind == "fedavg" else "steps")
    spec = workflow.validate(workflow.Workflow(config=yaml.safe_load(text), name="wf.yaml")).runs[0]
    return workflow.build_strategy(spec.strategy_kind, spec.strategy_kwargs)


def test_a_bad_compression_in_a_file_is_one_line_naming_the_key(tmp_path, capsys):
    from dmlcore import cli

    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW.replace("KIND", "ps").replace("COMPRESSION", "{topk: 0}").replace(
        "LENGTH", "steps"))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}:7: strategy.compression: compression must be" in err, err
    path.write_text(WORKFLOW.replace("KIND", "sync").replace("COMPRESSION", "int8").replace(
        "LENGTH", "steps"))
    assert cli.main(["validate", str(path), "--set", "strategy.compression={topk: 0.05}"]) == 0


def test_workflow_strategy_compression_key():
    from dmlcore.workflow import WorkflowError

    for kind in ("sync", "ps", "fedavg"):
        assert _strategy(kind, "int8").compression == "int8"
        assert _strategy(kind, "{topk: 0.01}").compression == {"topk": 0.01}
        assert _strategy(kind, "null").compression is None
    for bad in ("int4", "{topk: 0}", "{topk: 2}", "{top: 0.1}"):
        with pytest.raises(WorkflowError) as info:
            _strategy("sync", bad)
        message = str(info.value)
        assert message.count("\n") == 0
        assert message.startswith("wf.yaml: strategy.compression: compression must be"), message
