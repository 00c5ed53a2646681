# cython: language_level=3
"""float16 transfer of float32 gradients: pack and unpack with a power-of-two scale (nogil).

``pack(src, scale, out)``: ``out[i] = float16(src[i] / float32(scale))``;
``unpack(src, scale, out, add=False)``: ``out[i] = float32(src[i]) * float32(scale)``
(``add``: ``out[i] += ...``). The same bits as NumPy's ``astype`` casts and
float32 arithmetic (``src_ext/half_impl.h``), several times faster: F16C
converts 8 values an instruction where NumPy converts one at a time.

``SUPPORTED`` is False on CPUs without F16C (or off x86); there both
functions raise ``RuntimeError`` and ``dmlcore.compression`` uses NumPy.
float16 arrays are passed as their uint16 view (``a.view(np.uint16)``).
"""
from libc.stdint cimport uint16_t

cdef extern from "half_impl.h" nogil:
    int dml_half_supported()
    void dml_half_pack(const float *src, float scale, uint16_t *dst, Py_ssize_t n)
    void dml_half_unpack(const uint16_t *src, float scale, float *dst, Py_ssize_t n, int add)

SUPPORTED = bool(dml_half_supported())


cdef _check(str name, Py_ssize_t n_src, Py_ssize_t n_out):
    if not SUPPORTED:
        raise RuntimeError(f"codec.{name}: this CPU has no F16C")
    if n_out != n_src:
        raise ValueError(f"codec.{name}: out has {n_out} values for {n_src}")


def pack(const float[::1] src, double scale, uint16_t[::1] out):
    """``out`` (uint16 view of float16, shape of ``src``) = float16(src / scale)."""
    _check("pack", src.shape[0], out.shape[0])
    cdef float s = <float>scale
    with nogil:
        dml_half_pack(&src[0] if src.shape[0] else NULL, s,
                      &out[0] if out.shape[0] else NULL, src.shape[0])


def unpack(const uint16_t[::1] src, double scale, float[::1] out, bint add=False):
    """``out`` (float32) = float32(src) * scale, or ``+=`` that with ``add``."""
    _check("unpack", src.shape[0], out.shape[0])
    cdef float s = <float>scale
    with nogil:
        dml_half_unpack(&src[0] if src.shape[0] else NULL, s,
                        &out[0] if out.shape[0] else NULL, src.shape[0], add)
