/* loss_kernels.h -- fused one-pass loss + gradient kernels for dmlcore._ext.loss.
 *
 * Design (see also the comment block at the top of loss.pyx):
 *
 *   X is read in blocks of rows small enough to stay in L1/L2 (BLOCK_BYTES).
 *   For each block:   z  = Xb . w + b            (streams the block from memory)
 *                     r, loss = pointwise(z, y)  (vectorised exp/log, in registers)
 *                     g += Xb^T . r              (re-reads the block from cache)
 *   so X crosses the memory bus exactly once.  Optionally the next block is
 *   software-prefetched while the current one is processed.
 *
 *   All vector code uses GCC/Clang vector extensions (32-byte vectors: 4 doubles
 *   or 8 floats), so it builds on any target: the compiler splits a 32-byte
 *   vector into two SSE2 or NEON registers where AVX is absent.  On x86_64 a
 *   second copy of every kernel is compiled with target("avx2,fma") and chosen
 *   at run time (__builtin_cpu_supports); no global -march / -ffast-math.
 *
 *   The body lives in loss_impl.h and is included four times:
 *   {double, float} x {baseline, avx2+fma}.  Names get the suffix
 *   _d_base, _d_avx2, _f_base, _f_avx2; the public dispatchers below are
 *   dml_<name>_d / dml_<name>_f.
 *
 *   Accumulation: per-block sums in the working precision, flushed into double
 *   accumulators every FLUSH_BLOCKS blocks, so float32 inputs keep a float64
 *   quality total over millions of rows.
 */
#ifndef DML_LOSS_KERNELS_H
#define DML_LOSS_KERNELS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

typedef double dml_vd __attribute__((vector_size(32)));
typedef long long dml_vdi __attribute__((vector_size(32)));
typedef unsigned long long dml_vdu __attribute__((vector_size(32)));
typedef float dml_vf __attribute__((vector_size(32)));
typedef int dml_vfi __attribute__((vector_size(32)));
typedef unsigned int dml_vfu __attribute__((vector_size(32)));

/* Tunables (module-level so the benchmark can explore them). */
static int64_t dml_block_bytes = 16384;   /* bytes of X per block (L1-sized) */
static int64_t dml_prefetch_blocks = 1;   /* prefetch this many blocks ahead (0 = off) */
#define DML_FLUSH_BLOCKS 16

/* -DDML_NO_AVX2_CLONE builds only the portable path (what non-x86 targets get). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DML_NO_AVX2_CLONE)
#define DML_HAVE_AVX2_CLONE 1
#else
#define DML_HAVE_AVX2_CLONE 0
#endif

/* -1: auto-detect, 0: baseline, 1: avx2+fma (only if the CPU has it). */
static int dml_simd_request = -1;

static inline int dml_cpu_has_avx2(void) {
#if DML_HAVE_AVX2_CLONE
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
#else
    return 0;
#endif
}

static inline int dml_use_avx2(void) {
    if (dml_simd_request == 0) return 0;
    return dml_cpu_has_avx2();
}

#define DML_CAT2(a, b) a##b
#define DML_CAT(a, b) DML_CAT2(a, b)

/* ---- instantiations ---------------------------------------------------- */
#define REAL double
#define VEC dml_vd
#define IVEC dml_vdi
#define UVEC dml_vdu
#define VL 4
#define IS_DOUBLE 1
#define SUFFIX _d_base
#define ATTR
#include "loss_impl.h"
#undef SUFFIX
#undef ATTR
#if DML_HAVE_AVX2_CLONE
#define SUFFIX _d_avx2
#define ATTR __attribute__((target("avx2,fma")))
#include "loss_impl.h"
#undef SUFFIX
#undef ATTR
#endif
#undef REAL
#undef VEC
#undef IVEC
#undef UVEC
#undef VL
#undef IS_DOUBLE

#define REAL float
#define VEC dml_vf
#define IVEC dml_vfi
#define UVEC dml_vfu
#define VL 8
#define IS_DOUBLE 0
#define SUFFIX _f_base
#define ATTR
#include "loss_impl.h"
#undef SUFFIX
#undef ATTR
#if DML_HAVE_AVX2_CLONE
#define SUFFIX _f_avx2
#define ATTR __attribute__((target("avx2,fma")))
#include "loss_impl.h"
#undef SUFFIX
#undef ATTR
#endif
#undef REAL
#undef VEC
#undef IVEC
#undef UVEC
#undef VL
#undef IS_DOUBLE

/* ---- CSR instantiations: {double, float} x {int32, int64} x ISA ------- */
/* CSR rows per block.  While coef and the gradient (2 x ncoef doubles) fit in
 * cache, small blocks (64 rows): the scatter re-reads the block's entries from
 * L1/L2.  Beyond that, fusing makes the gather (coef) and the scatter (gradient)
 * evict each other, so the blocks grow until each phase touches every
 * coefficient row ~32 times (up to 64 MB of scratch): two cheap re-reads of
 * the entries instead of cache misses on both arrays.  Measured in
 * benchmarks/bench_sparse.py.  dml_csr_block > 0 forces a size. */
static int64_t dml_csr_block = 0;
#define DML_CSR_CACHE_BYTES (8 << 20)
#define DML_CSR_SCRATCH_BYTES (64 << 20)
static int64_t dml_csr_block_rows(int64_t n, int64_t ncoef, int64_t K, int64_t nnz,
                                  int64_t doubles_per_row) {
    if (dml_csr_block > 0) return dml_csr_block;
    if (2 * ncoef * (int64_t)sizeof(double) <= DML_CSR_CACHE_BYTES || n <= 0 || nnz <= 0)
        return 64;
    const int64_t per_row = nnz / n > 0 ? nnz / n : 1;
    int64_t B = 32 * (ncoef / K) / per_row;
    const int64_t cap = DML_CSR_SCRATCH_BYTES / ((int64_t)sizeof(double) * doubles_per_row);
    if (B > cap) B = cap;
    if (B > n) B = n;
    return B < 64 ? 64 : B;
}

#define ATTR
#define ISA _base
#include "csr_types.h"
#undef ISA
#undef ATTR
#if DML_HAVE_AVX2_CLONE
#define ATTR __attribute__((target("avx2,fma")))
#define ISA _avx2
#include "csr_types.h"
#undef ISA
#undef ATTR
#endif

/* ---- run-time dispatch ------------------------------------------------- */
#if DML_HAVE_AVX2_CLONE
#define DML_DISPATCH(name, sfx, args) \
    (dml_use_avx2() ? name##sfx##_avx2 args : name##sfx##_base args)
#else
#define DML_DISPATCH(name, sfx, args) (name##sfx##_base args)
#endif

#define DML_DEFINE_PUBLIC(sfx, T)                                                  \
static inline int dml_glm##sfx(int kind, const T *X, const T *y, const T *w, int64_t n,   \
                        int64_t p, const T *coef, T *grad, int compute_grad,       \
                        double *loss_out, int *bad_out) {                          \
    return DML_DISPATCH(glm_driver, sfx,                                           \
        (kind, X, y, w, n, p, coef, grad, compute_grad, loss_out, bad_out));       \
}                                                                                  \
static inline int dml_softmax##sfx(const T *X, const int64_t *y, const T *w, int64_t n,   \
                            int64_t p, int64_t K, const T *coef, T *grad,          \
                            int compute_grad, double *loss_out, int *bad_out) {    \
    return DML_DISPATCH(softmax_driver, sfx,                                       \
        (X, y, w, n, p, K, coef, grad, compute_grad, loss_out, bad_out));          \
}                                                                                  \
static inline void dml_vexp##sfx(const T *x, T *out, int64_t n) {                         \
    DML_DISPATCH(exp_array, sfx, (x, out, n));                                     \
}                                                                                  \
static inline void dml_vlog##sfx(const T *x, T *out, int64_t n) {                         \
    DML_DISPATCH(log_array, sfx, (x, out, n));                                     \
}                                                                                  \
static inline void dml_vlog1p##sfx(const T *x, T *out, int64_t n) {                       \
    DML_DISPATCH(log1p_array, sfx, (x, out, n));                                   \
}                                                                                  \
static inline void dml_vlog1p_unit##sfx(const T *x, T *out, int64_t n) {                  \
    DML_DISPATCH(log1p_unit_array, sfx, (x, out, n));                              \
}

DML_DEFINE_PUBLIC(_d, double)
DML_DEFINE_PUBLIC(_f, float)

/* The CSR kernels for any (data, index) type pair, on the run-time ISA: f64
 * picks double data (else float), i64 int64 indices (else int32); the
 * pointers are of those types. */
static inline int dml_csr_glm(int f64, int i64, int kind, const void *data, const void *ind,
                              const void *indptr, int64_t n, int64_t p, const void *y,
                              const void *w, const void *coef, double *acc, int compute_grad,
                              double *loss_out, int *bad_out) {
#define DML_CSR_GLM(sfx) DML_DISPATCH(csr_glm, sfx, (kind, data, ind, indptr, n, p, y, w, \
                                                     coef, acc, compute_grad, loss_out, bad_out))
    return f64 ? (i64 ? DML_CSR_GLM(_d_i64) : DML_CSR_GLM(_d_i32))
               : (i64 ? DML_CSR_GLM(_f_i64) : DML_CSR_GLM(_f_i32));
#undef DML_CSR_GLM
}
static inline int dml_csr_softmax(int f64, int i64, const void *data, const void *ind,
                                  const void *indptr, int64_t n, int64_t p, int64_t K,
                                  const int64_t *y, const void *w, const void *coef,
                                  double *acc, int compute_grad, double *loss_out,
                                  int *bad_out) {
#define DML_CSR_SM(sfx) DML_DISPATCH(csr_softmax, sfx, (data, ind, indptr, n, p, K, y, w, \
                                                        coef, acc, compute_grad, loss_out, \
                                                        bad_out))
    return f64 ? (i64 ? DML_CSR_SM(_d_i64) : DML_CSR_SM(_d_i32))
               : (i64 ? DML_CSR_SM(_f_i64) : DML_CSR_SM(_f_i32));
#undef DML_CSR_SM
}

#endif /* DML_LOSS_KERNELS_H */
