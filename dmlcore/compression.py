"""Gradient and update compression: codecs and the top-k error-feedback residual.

A compression spec is None, ``"float16"``, ``"int8"`` or ``{"topk": ratio}``
(0 < ratio <= 1, optionally with ``"momentum_correction": False``); ``parse``
checks one. A ``Compressor`` belongs to ONE
sender (a replica, a client, a parameter-server loop): ``encode(vector, key)``
turns a 1-D float vector of n entries into a message of ``dmlcore.messages``
(``Half``, ``Int8Blocks`` or ``TopK``; the vector itself when it is not
finite), and ``decode(message, dtype)`` gives back a dense (n,) vector.
Sums of partials: each sender encodes its own contribution, the receiver
decodes each and adds them.

* float16: ``values * scale`` with a power-of-two ``scale`` putting the
  largest magnitude below 2**15 (sums of many rows do not overflow).
* int8: blocks of ``BLOCK`` entries, scale s = the block's largest
  magnitude; code = sign(x) * floor(127 |x| / s + u), u ~ U[0, 1) from
  ``default_rng((seed, *key))``: unbiased, |decoded - x| < s / 127.
* top-k: k = ceil(ratio * n) entries of largest magnitude of ``vector +
  residual`` (sorted uint32 indices, scaled float16 values); the residual
  becomes what was not sent (rounding included), so over any run
  sum(decoded) + residual == sum(inputs) to round-off.
* top-k with momentum correction (Deep Gradient Compression, Lin et al.
  2018): when synchronous SGD trains with momentum m (``momentum_correction``),
  each sender keeps the velocity u <- m u + g and adds u, not g, to the
  residual; the sent entries of u are zeroed (momentum factor masking) and
  the summed messages are applied by SGD without momentum. Error feedback
  alone feeds stale residual mass into the optimizer's momentum, which costs
  accuracy at 1%; with the correction each coordinate's momentum builds up
  on its sender, where nothing is lost.
"""
from __future__ import annotations

import copy
import math
import numbers

import numpy as np

from ._ext import codec as _codec
from .messages import Half, Int8Blocks, TopK

BLOCK = 512                 # int8 entries per scale
_LEVELS = 127
_FLOAT16_TOP = 14           # the largest magnitude is scaled into [2**14, 2**15)
_SPEC_HELP = ("None, 'float16', 'int8' or {'topk': ratio} with 0 < ratio <= 1 "
              "(and optionally 'momentum_correction': True or False)")


def parse(spec):
    """The normalised spec (None, "float16", "int8", {"topk": float} or, with the
    correction turned off, {"topk": float, "momentum_correction": False});
    ValueError naming ``compression`` otherwise."""
    if spec is None or (isinstance(spec, str) and spec in ("float16", "int8")):
        return spec
    if spec is np.float16:
        return "float16"
    if isinstance(spec, dict) and "topk" in spec and set(spec) <= {"topk", "momentum_correction"}:
        ratio, correct = spec["topk"], spec.get("momentum_correction", True)
        if isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) \
                and 0.0 < float(ratio) <= 1.0 and isinstance(correct, bool):
            return {"topk": float(ratio)} if correct else \
                {"topk": float(ratio), "momentum_correction": False}
    raise ValueError(f"compression must be {_SPEC_HELP}, got {spec!r}")


def _pow2_scale(vector):
    """A power of two s with max|vector| / s in [2**14, 2**15) (1.0 for zeros)."""
    # two reductions, no |vector| temporary (a fresh 0.8 MB page-faults every step)
    top = float(max(vector.max(), -vector.min())) if vector.size else 0.0
    if top == 0.0:
        return 1.0
    return math.ldexp(1.0, math.frexp(top)[1] - 1 - _FLOAT16_TOP)


def _f16c(*arrays):
    """Whether the compiled F16C codec (``dmlcore._ext.codec``: the bits of NumPy's
    casts) takes these 1-D contiguous arrays (the CPU has F16C)."""
    return _codec.SUPPORTED and all(a.ndim == 1 and a.flags.c_contiguous for a in arrays)


def _store(out, dense, add):
    """``out`` = ``dense`` (``out += dense`` with ``add``); returns ``out``."""
    if add:
        out += dense
    else:
        np.copyto(out, dense)
    return out


def _unscale(values, scale, dtype, out=None, add=False):
    """float16 ``values`` times the power of two ``scale`` (exact), in ``dtype``: a
    new array, or written into ``out`` (added to it with ``add``)."""
    if values.dtype == np.float16 and np.dtype(dtype) == np.float32 and (
            _f16c(values) if out is None else _f16c(values, out)):
        target = np.empty(values.shape[0], dtype=np.float32) if out is None else out
        _codec.unpack(values.view(np.uint16), scale, target, add and out is not None)
        return target
    dense = values.astype(dtype)
    dense *= np.asarray(scale, dtype=dtype)
    return dense if out is None else _store(out, dense, add)


def _half(vector):
    scale = _pow2_scale(vector)
    if vector.dtype == np.float32 and _f16c(vector):
        out = np.empty(vector.shape[0], dtype=np.float16)
        _codec.pack(vector, scale, out.view(np.uint16))
        return out, scale
    return (vector / scale).astype(np.float16), scale


def momentum_correction(spec, optimizer):
    """``(optimizer, momentum)`` for synchronous steps under ``spec``: top-k
    (correction not turned off) with ``optimizer`` an SGD with momentum m > 0
    and without Nesterov gives a copy of it without momentum and m, the
    momentum the senders' ``Compressor``s keep; anything else ``(optimizer, 0.0)``."""
    from .optim import SGD

    if not (isinstance(spec, dict) and spec.get("momentum_correction", True)
            and type(optimizer) is SGD and optimizer.momentum > 0 and not optimizer.nesterov):
        return optimizer, 0.0
    plain = copy.copy(optimizer)
    plain.momentum = 0.0
    return plain, optimizer.momentum


class Compressor:
    """One sender's encoder: ``spec`` (as ``parse`` takes), ``seed`` (int8's
    stream), ``momentum`` (top-k's momentum correction, 0 for none); keeps
    the top-k residual (``residual``) and velocity (``velocity``), both of the
    vector's dtype."""

    def __init__(self, spec, seed=0, momentum=0.0):
        self.spec = parse(spec)
        self.seed = int(seed)
        self.momentum = float(momentum)
        if self.momentum and not isinstance(self.spec, dict):
            raise ValueError(f"momentum correction needs top-k compression, not {self.spec!r}")
        self.residual = self.velocity = None

    def encode(self, vector, key=()):
        """The message for the 1-D float ``vector`` (not mutated); ``key``: ints
        that, with the seed, fix int8's random stream (e.g. step, sender)."""
        vector = np.asarray(vector)
        if self.spec is None:
            return vector
        if self.spec == "float16":
            return _finite_or_raw(vector, lambda: Half(*_half(vector)))
        if self.spec == "int8":
            rng = np.random.default_rng((self.seed, *[int(k) for k in key]))
            return _finite_or_raw(vector, lambda: quantize_int8(vector, rng))
        if not np.isfinite(vector).all():
            return vector.copy()
        if self.residual is None:
            self.residual = np.zeros_like(vector)
            self.velocity = np.zeros_like(vector) if self.momentum else None
        if self.momentum:
            self.velocity *= self.velocity.dtype.type(self.momentum)
            self.velocity += vector
            vector = self.velocity
        np.add(vector, self.residual, out=self.residual)    # the vector to send now
        message = topk(self.residual, self.spec["topk"])
        self.residual[message.indices] -= _unscale(message.values, message.scale,
                                                   self.residual.dtype)
        if self.momentum:
            self.velocity[message.indices] = 0              # momentum factor masking
        return message


def _finite_or_raw(vector, build):
    return build() if np.isfinite(vector).all() else vector.copy()


def quantize_int8(vector, rng, block=BLOCK):
    """``Int8Blocks``: unbiased stochastic int8 codes of ``vector`` per ``block``."""
    n = vector.shape[0]
    work = np.float32 if vector.dtype == np.float32 else np.float64
    n_blocks = -(-n // block)
    blocks = np.zeros(n_blocks * block, dtype=work)
    np.abs(vector, out=blocks[:n])
    blocks = blocks.reshape(n_blocks, block)
    scales = np.max(blocks, axis=1).astype(np.float32)
    # codes against the float32 scales the receiver will use
    blocks *= (_LEVELS / np.where(scales > 0, scales, 1.0)).astype(work)[:, None]
    blocks += rng.random(blocks.shape, dtype=work)
    np.floor(blocks, out=blocks)
    np.minimum(blocks, _LEVELS, out=blocks)
    levels = blocks.reshape(-1)[:n]
    np.copysign(levels, vector, out=levels)
    return Int8Blocks(levels.astype(np.int8), scales, int(block))


def topk(vector, ratio):
    """``TopK``: the k = ceil(ratio * n) largest magnitudes of ``vector``."""
    n = vector.shape[0]
    k = min(n, max(1, math.ceil(ratio * n)))
    if k == n:
        index = np.arange(n)
    else:
        magnitude = np.abs(vector)
        threshold = np.partition(magnitude, n - k)[n - k]
        index = np.flatnonzero(magnitude > threshold)
        ties = np.flatnonzero(magnitude == threshold)[:k - index.size]
        index = np.sort(np.concatenate([index, ties])) if ties.size else index
    values, scale = _half(vector[index])
    return TopK(n, index.astype(np.uint32), values, scale)


def decode(message, dtype):
    """The dense (n,) vector of ``dtype`` that ``message`` encodes (a raw array: itself)."""
    if isinstance(message, np.ndarray):
        return message.astype(dtype, copy=False)
    if isinstance(message, Half):
        if message.values.ndim != 1:
            raise ValueError(f"float16 message: values of shape {message.values.shape}")
        return _unscale(message.values, message.scale, dtype)
    if isinstance(message, Int8Blocks):
        return decode_into(message, np.empty(_check_int8(message)[0], dtype=dtype))
    if isinstance(message, TopK):
        return decode_into(message, np.empty(max(int(message.size), 0), dtype=dtype))
    raise TypeError(f"not a compressed vector: {type(message).__name__}")


def decode_into(message, out, add=False):
    """``out`` (1-D float, the message's length) = the vector ``message`` encodes,
    or ``out +=`` it with ``add``, without a dense temporary where it can: the
    bits of ``decode`` then ``np.copyto`` / ``+=``."""
    if isinstance(message, np.ndarray):
        return _store(out, message.astype(out.dtype, copy=False), add)
    if isinstance(message, Half):
        if message.values.shape != out.shape:
            raise ValueError(f"float16 message: values of shape {message.values.shape} "
                             f"for a vector of {out.shape[0]}")
        return _unscale(message.values, message.scale, out.dtype, out, add)
    if isinstance(message, Int8Blocks):
        n, block = _check_int8(message)
        if out.shape != (n,):
            raise ValueError(f"int8 message: {n} codes for a vector of {out.shape[0]}")
        # codes x their block's factor, written (or added) into out: whole blocks, the tail
        factors = (message.scales.astype(np.float64) / _LEVELS).astype(out.dtype)
        m = n - n % block
        for codes, dst, f in ((message.codes[:m].reshape(-1, block), out[:m].reshape(-1, block),
                               factors[:m // block, None]),
                              (message.codes[m:], out[m:], factors[m // block:])):
            if add:
                dst += codes * f
            else:
                np.multiply(codes, f, out=dst)
        return out
    if isinstance(message, TopK):
        _check_topk(message, out.shape[0])
        if max(int(message.size), 0) != out.shape[0]:
            raise ValueError(f"top-k message: a vector of {message.size}, not {out.shape[0]}")
        values = _unscale(message.values, message.scale, out.dtype)
        if add:                                 # only the k sent entries: out + 0 is out
            out[message.indices] += values      # indices are unique (strictly increasing)
        else:
            out[...] = 0
            out[message.indices] = values
        return out
    raise TypeError(f"not a compressed vector: {type(message).__name__}")


def _check_int8(message):
    """(n, block) of a well-formed int8 message, else ``ValueError``."""
    n, block = message.codes.shape[0], int(message.block)
    if block < 1 or message.codes.ndim != 1 or message.scales.ndim != 1 \
            or message.scales.shape[0] != -(-n // block):
        raise ValueError(f"int8 message: {message.scales.shape[0]} scales for "
                         f"{n} codes in blocks of {block}")
    return n, block


def _check_topk(message, size):
    """``ValueError`` unless the indices are ints, strictly increasing, within ``size``."""
    index = message.indices
    if (index.ndim != 1 or index.shape != message.values.shape or index.dtype.kind not in "iu"
            or (index.size and not 0 <= int(index.min()) <= int(index.max()) < size)):
        raise ValueError(f"top-k message: indices do not fit a vector of {message.size}")
    if index.size > 1 and not (index[1:] > index[:-1]).all():
        raise ValueError("top-k message: indices are not strictly increasing")


def nbytes(message):
    """The array bytes of ``message`` (what its raw frames carry)."""
    if isinstance(message, np.ndarray):
        return message.nbytes
    return sum(v.nbytes for v in message if isinstance(v, np.ndarray))
