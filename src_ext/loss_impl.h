/* loss_impl.h -- body of the loss kernels, included by loss_kernels.h once per
 * (REAL, ISA).  Expects REAL, VEC, IVEC, UVEC, VL, IS_DOUBLE, SUFFIX, ATTR.
 * No include guard on purpose.
 *
 * Layout conventions (row-major, as in the Model base class):
 *   X    (n, p)           rows of features
 *   coef GLM:     w (p), b (1)                  -> p + 1 entries
 *        softmax: W (p, K) row-major, b (K)     -> p*K + K entries
 *   grad same layout as coef (sums over rows).
 */
#define FN(name) DML_CAT(name, SUFFIX)
#define INL static inline __attribute__((always_inline)) ATTR

/* ---- constants ---------------------------------------------------------- */
#if IS_DOUBLE
#define C_LOG2E 1.4426950408889634
#define C_LN2HI 6.93147180369123816490e-01   /* ln2 high part, 21 trailing zero bits */
#define C_LN2LO 1.90821492927058770002e-10
#define C_SHIFT 6755399441055744.0           /* 1.5 * 2^52: round-to-int trick */
#define C_XMIN (-745.2)                      /* below: exp underflows to 0 */
#define C_XMAX 710.0                         /* above: exp overflows to inf */
#define C_EXPBIAS 1023
#define C_MANT 52
#define C_NHALF 2048                         /* > |n| so that n + C_NHALF >= 0 */
#define C_SQRTH_BITS 0x3fe6a09e667f3bcdLL    /* bits of sqrt(1/2) */
#define C_ONE_BITS 0x3ff0000000000000LL
#define C_MANT_MASK 0x000fffffffffffffLL
#define C_TINY 2.2250738585072014e-308       /* smallest normal */
#define C_TINY_SCALE 18014398509481984.0     /* 2^54 */
#define C_TINY_K 54
#else
#define C_LOG2E 1.44269504088896341f
#define C_LN2HI 0.693359375f                 /* Cephes expf split of ln2 */
#define C_LN2LO (-2.12194440e-4f)
#define C_SHIFT 12582912.0f                  /* 1.5 * 2^23 */
#define C_XMIN (-104.0f)
#define C_XMAX 89.0f
#define C_EXPBIAS 127
#define C_MANT 23
#define C_NHALF 256
#define C_SQRTH_BITS 0x3f3504f3
#define C_ONE_BITS 0x3f800000
#define C_MANT_MASK 0x007fffff
#define C_TINY 1.17549435e-38f
#define C_TINY_SCALE 33554432.0f             /* 2^25 */
#define C_TINY_K 25
#endif

/* ---- vector helpers ----------------------------------------------------- */
INL VEC FN(ld)(const REAL *p) { VEC v; __builtin_memcpy(&v, p, sizeof v); return v; }
INL void FN(st)(REAL *p, VEC v) { __builtin_memcpy(p, &v, sizeof v); }
INL VEC FN(splat)(REAL s) { VEC z = {0}; return s - z; }   /* s - 0 == s: folds to a broadcast */
INL VEC FN(sel)(IVEC m, VEC a, VEC b) {           /* m ? a : b, lane-wise */
    return (VEC)((m & (IVEC)a) | (~m & (IVEC)b));
}
INL REAL FN(hsum)(VEC v) {
    REAL s = v[0];
    for (int l = 1; l < VL; l++) s += v[l];
    return s;
}
INL REAL FN(hmax)(VEC v) {
    REAL s = v[0];
    for (int l = 1; l < VL; l++) s = v[l] > s ? v[l] : s;
    return s;
}
INL VEC FN(vmax)(VEC a, VEC b) { return FN(sel)((IVEC)(a > b), a, b); }

/* ---- vectorised exp ------------------------------------------------------
 * Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2 (n by the
 * round-to-nearest shift trick, exact in the default rounding mode), a
 * Taylor polynomial (degree 13 double / 7 float, truncation < 2^-56 / 2^-27
 * relative) and a two-step scale 2^n1 * 2^n2 (n1 + n2 = n) so results down to
 * the subnormal range are rounded once.  Overflow gives inf, x < -745.2
 * (-104 float) gives 0, NaN propagates.  About 1 ulp.
 */
INL VEC FN(vexp)(VEC x) {
    /* x < C_XMIN: the result is 0; compute on a benign 0 instead and blend,
     * so that no lane produces an underflow (a slow microcode assist on some
     * CPUs; it would hit every -inf padding lane of the softmax kernel). */
    IVEC zero = (IVEC)(x < C_XMIN);
    x = FN(sel)(zero, FN(splat)(0), x);
    x = FN(sel)((IVEC)(x > C_XMAX), FN(splat)(C_XMAX), x);
    VEC t = x * C_LOG2E + C_SHIFT;
    VEC nf = t - C_SHIFT;
    VEC r = (x - nf * C_LN2HI) - nf * C_LN2LO;
#if IS_DOUBLE
    VEC q = FN(splat)(1.0 / 6227020800.0);           /* 1/13! */
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
#else
    VEC q = FN(splat)(1.0f / 5040.0f);
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
#endif
    IVEC n = (IVEC)t - (IVEC)FN(splat)(C_SHIFT);
    IVEC n1 = (IVEC)(((UVEC)(n + C_NHALF)) >> 1) - (C_NHALF / 2);
    IVEC n2 = n - n1;
    VEC s1 = (VEC)((n1 + C_EXPBIAS) << C_MANT);
    VEC s2 = (VEC)((n2 + C_EXPBIAS) << C_MANT);
    return FN(sel)(zero, FN(splat)(0), (q * s1) * s2);
}

/* ---- vectorised log core -------------------------------------------------
 * fdlibm's e_log.c: u = 2^k m, m in [sqrt(1/2), sqrt(2)), f = m - 1,
 * s = f / (2 + f), log(1 + f) = f - hfsq + s (hfsq + R(s^2)).
 * `c` is a correction added to log(u) (used by log1p), k_extra adds to k.
 */
INL VEC FN(vlog_core)(VEC u, VEC c, IVEC k_extra) {
    IVEC ib = (IVEC)u + (C_ONE_BITS - C_SQRTH_BITS);
    IVEC k = (IVEC)((UVEC)ib >> C_MANT) - C_EXPBIAS + k_extra;
    VEC m = (VEC)((ib & C_MANT_MASK) + C_SQRTH_BITS);
    VEC f = m - 1;
    VEC kf = (VEC)(k + (IVEC)FN(splat)(C_SHIFT)) - C_SHIFT;   /* int -> float, exact */
    VEC hfsq = 0.5f * f * f;
    VEC s = f / (2 + f);
    VEC z = s * s;
    VEC w = z * z;
#if IS_DOUBLE
    VEC t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01
                  + w * 1.531383769920937332e-01));
    VEC t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01
                  + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const REAL ln2hi = 6.93147180369123816490e-01, ln2lo = 1.90821492927058770002e-10;
#else
    VEC t1 = w * (0.40000972152f + w * 0.24279078841f);
    VEC t2 = z * (0.66666662693f + w * 0.28498786688f);
    const REAL ln2hi = 6.9313812256e-01f, ln2lo = 9.0580006145e-06f;
#endif
    VEC R = t2 + t1;
    return kf * ln2hi - ((hfsq - (s * (hfsq + R) + (kf * ln2lo + c))) - f);
}

/* log(x): full range; subnormals rescaled; log(0) = -inf, log(<0) = NaN. */
INL VEC FN(vlog)(VEC x) {
    IVEC tiny = (IVEC)(x < C_TINY);
    VEC u = FN(sel)(tiny, x * C_TINY_SCALE, x);
    IVEC kadj = tiny & -C_TINY_K;                   /* -C_TINY_K where tiny */
    VEC res = FN(vlog_core)(u, FN(splat)(0), kadj);
    const REAL inf = (REAL)INFINITY;
    res = FN(sel)((IVEC)(x == 0), FN(splat)(-inf), res);
    res = FN(sel)((IVEC)(x < 0), FN(splat)((REAL)NAN), res);
    res = FN(sel)((IVEC)(x == inf), x, res);
    res = FN(sel)((IVEC)(x != x), x, res);
    return res;
}

/* log1p(x) for x >= -1 (fdlibm s_log1p.c style): u = 1 + x rounded, plus the
 * correction c = (x - (u - 1)) / u (or (1 - (u - x)) / u for u >= 2) for the
 * bits lost in 1 + x, so tiny x gives x exactly. */
INL VEC FN(vlog1p)(VEC x) {
    VEC u = 1 + x;
    IVEC big = (IVEC)(u >= 2);
    VEC c = FN(sel)(big, 1 - (u - x), x - (u - 1)) / u;
    VEC res = FN(vlog_core)(u, c, (IVEC)FN(splat)(0));
    const REAL inf = (REAL)INFINITY;
    res = FN(sel)((IVEC)(x == -1), FN(splat)(-inf), res);
    res = FN(sel)((IVEC)(x < -1), FN(splat)((REAL)NAN), res);
    res = FN(sel)((IVEC)(x == inf), x, res);
    res = FN(sel)((IVEC)(x != x), x, res);
    return res;
}

/* log1p(e) for e in [0, 1] (and NaN): the range log1p(exp(-|z|)) needs.
 * e <= sqrt(2) - 1: f = e exactly, k = 0; else 1 + e = 2 (1 + f) with
 * f = (e - 1) / 2 (one rounding, <= 2^-54 absolute), k = 1.  No correction
 * division and no special cases, unlike the general vlog1p. */
INL VEC FN(vlog1p_unit)(VEC e) {
#if IS_DOUBLE
    const REAL ln2hi = 6.93147180369123816490e-01, ln2lo = 1.90821492927058770002e-10;
    const REAL thr = 0.41421356237309503;
#else
    const REAL ln2hi = 6.9313812256e-01f, ln2lo = 9.0580006145e-06f;
    const REAL thr = 0.41421356f;
#endif
    IVEC big = (IVEC)(e > thr);
    VEC f = FN(sel)(big, (e - 1) * 0.5f, e);
    VEC kf = FN(sel)(big, FN(splat)(1), FN(splat)(0));
    VEC hfsq = 0.5f * f * f;
    VEC s = f / (2 + f);
    VEC z = s * s;
    VEC w = z * z;
#if IS_DOUBLE
    VEC t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01
                  + w * 1.531383769920937332e-01));
    VEC t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01
                  + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
#else
    VEC t1 = w * (0.40000972152f + w * 0.24279078841f);
    VEC t2 = z * (0.66666662693f + w * 0.28498786688f);
#endif
    VEC R = t2 + t1;
    return kf * ln2hi - ((hfsq - (s * (hfsq + R) + kf * ln2lo)) - f);
}

#define DML_ARRAY_MAP(fname, vfn)                                              \
static ATTR void FN(fname)(const REAL *x, REAL *out, int64_t n) {              \
    int64_t i = 0;                                                             \
    for (; i + VL <= n; i += VL) FN(st)(out + i, FN(vfn)(FN(ld)(x + i)));      \
    if (i < n) {                                                               \
        REAL tmp[VL];                                                          \
        for (int l = 0; l < VL; l++) tmp[l] = i + l < n ? x[i + l] : (REAL)1;  \
        VEC v = FN(vfn)(FN(ld)(tmp));                                          \
        for (int l = 0; i + l < n; l++) out[i + l] = v[l];                     \
    }                                                                          \
}
DML_ARRAY_MAP(exp_array, vexp)
DML_ARRAY_MAP(log_array, vlog)
DML_ARRAY_MAP(log1p_array, vlog1p)
DML_ARRAY_MAP(log1p_unit_array, vlog1p_unit)
#undef DML_ARRAY_MAP

/* ---- prefetch ----------------------------------------------------------- */
INL void FN(prefetch)(const REAL *p, int64_t nbytes) {
    const char *c = (const char *)p;
    for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

/* ---- GLM block kernels -------------------------------------------------- */

/* z[i] = X[i, :] . w + b for i < m.  IN X (m, p), w (p), b; OUT z (m).
 */
static ATTR void FN(gemv_rows)(const REAL *X, int64_t m, int64_t p, const REAL *w,
                               REAL b, REAL *z) {
    const int64_t pv = p - p % VL;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const REAL *x0 = X + i * p, *x1 = x0 + p, *x2 = x1 + p, *x3 = x2 + p;
        VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t j = 0; j < pv; j += VL) {
            VEC wv = FN(ld)(w + j);
            a0 += FN(ld)(x0 + j) * wv;
            a1 += FN(ld)(x1 + j) * wv;
            a2 += FN(ld)(x2 + j) * wv;
            a3 += FN(ld)(x3 + j) * wv;
        }
        REAL s0 = FN(hsum)(a0), s1 = FN(hsum)(a1), s2 = FN(hsum)(a2), s3 = FN(hsum)(a3);
        for (int64_t j = pv; j < p; j++) {
            s0 += x0[j] * w[j]; s1 += x1[j] * w[j];
            s2 += x2[j] * w[j]; s3 += x3[j] * w[j];
        }
        z[i] = s0 + b; z[i + 1] = s1 + b; z[i + 2] = s2 + b; z[i + 3] = s3 + b;
    }
    for (; i < m; i++) {
        const REAL *x0 = X + i * p;
        VEC a0 = {0};
        for (int64_t j = 0; j < pv; j += VL) a0 += FN(ld)(x0 + j) * FN(ld)(w + j);
        REAL s0 = FN(hsum)(a0);
        for (int64_t j = pv; j < p; j++) s0 += x0[j] * w[j];
        z[i] = s0 + b;
    }
}

/* g[j] += sum_i r[i] X[i, j].  IN X (m, p) (in cache), r (m); IN/OUT g (p).
 * pf: rows to prefetch into L2 meanwhile (the next block), or NULL: the
 * memory bus would otherwise idle while this in-cache pass runs. */
static ATTR void FN(gemvT_rows)(const REAL *X, int64_t m, int64_t p, const REAL *r,
                                REAL *g, const REAL *pf) {
    int64_t j = 0;
    const int64_t rowb = p * (int64_t)sizeof(REAL);
    for (; j + 4 * VL <= p; j += 4 * VL) {
        VEC a0 = FN(ld)(g + j), a1 = FN(ld)(g + j + VL);
        VEC a2 = FN(ld)(g + j + 2 * VL), a3 = FN(ld)(g + j + 3 * VL);
        const REAL *x = X + j;
        for (int64_t i = 0; i < m; i++, x += p) {
            if (pf) FN(prefetch)(pf + i * p, rowb);
            VEC rv = FN(splat)(r[i]);
            a0 += rv * FN(ld)(x);
            a1 += rv * FN(ld)(x + VL);
            a2 += rv * FN(ld)(x + 2 * VL);
            a3 += rv * FN(ld)(x + 3 * VL);
        }
        FN(st)(g + j, a0); FN(st)(g + j + VL, a1);
        FN(st)(g + j + 2 * VL, a2); FN(st)(g + j + 3 * VL, a3);
        pf = NULL;                               /* prefetched once, in the first sweep */
    }
    if (pf) FN(prefetch)(pf, m * rowb);
    for (; j + VL <= p; j += VL) {
        VEC a0 = FN(ld)(g + j);
        const REAL *x = X + j;
        for (int64_t i = 0; i < m; i++, x += p) a0 += FN(splat)(r[i]) * FN(ld)(x);
        FN(st)(g + j, a0);
    }
    for (; j < p; j++) {
        REAL s = g[j];
        for (int64_t i = 0; i < m; i++) s += r[i] * X[i * p + j];
        g[j] = s;
    }
}

/* Pointwise squared (kind 0) or logistic (kind 1) loss of one block.
 * IN z (m), y (m); OUT r (m) = dloss/dz; OUT *rsum += sum r; IN/OUT *bad |= a
 * label is not 0/1 (logistic).  Returns the sum of the m losses.
 *   squared:  l = (z - y)^2 / 2,                 r = z - y
 *   logistic: l = log1p(exp(-|z|)) + max(z, 0) - y z,
 *             r = sigmoid(z) - y,  e = exp(-|z|), written without cancellation
 */
INL VEC FN(pw_glm_vec)(int kind, VEC zv, VEC yv, VEC *rv, IVEC *badv) {
    if (kind == 0) {
        VEC d = zv - yv;
        *rv = d;
        return 0.5f * d * d;
    }
    IVEC neg = (IVEC)(zv < 0);
    VEC az = FN(sel)(neg, -zv, zv);
    VEC e = FN(vexp)(-az);
    VEC pos = FN(sel)(neg, FN(splat)(0), zv);          /* max(z, 0) */
    VEC l = FN(vlog1p_unit)(e) + (pos - yv * zv);  /* exact bracket for y in {0,1} */
    /* sigmoid(z) - y = (a (1 - y) - y c) / (1 + e) with (a, c) = (1, e) for
     * z >= 0 and (e, 1) for z < 0: no cancellation for y in {0, 1}. */
    VEC one = FN(splat)(1);
    VEC a = FN(sel)(neg, e, one), c = FN(sel)(neg, one, e);
    *rv = (a * (1 - yv) - yv * c) / (1 + e);
    *badv |= (IVEC)(yv != 0) & (IVEC)(yv != 1);
    return l;
}

/* The pointwise stage of one block: r = w * dloss/dz, returns sum w * loss
 * (w = NULL: unit weights).  IN z, y, w (m); OUT r (m); IN/OUT *rsum += sum r. */
static ATTR double FN(pw_glm)(int kind, const REAL *z, const REAL *y, const REAL *w,
                              REAL *r, int64_t m, double *rsum, int *bad) {
    VEC lacc = {0}, racc = {0};
    IVEC badv = {0};
    int64_t i = 0;
    for (; i + VL <= m; i += VL) {
        VEC rv;
        VEC lv = FN(pw_glm_vec)(kind, FN(ld)(z + i), FN(ld)(y + i), &rv, &badv);
        if (w) { VEC wv = FN(ld)(w + i); lv *= wv; rv *= wv; }
        lacc += lv;
        racc += rv;
        FN(st)(r + i, rv);
    }
    double loss = FN(hsum)(lacc), rs = FN(hsum)(racc);
    if (i < m) {
        REAL zt[VL], yt[VL], wt[VL];
        for (int l = 0; l < VL; l++) {
            zt[l] = i + l < m ? z[i + l] : 0;
            yt[l] = i + l < m ? y[i + l] : 0;
            wt[l] = i + l < m && w ? w[i + l] : 1;
        }
        VEC rv;
        VEC lv = FN(pw_glm_vec)(kind, FN(ld)(zt), FN(ld)(yt), &rv, &badv);
        if (w) { VEC wv = FN(ld)(wt); lv *= wv; rv *= wv; }
        for (int l = 0; i + l < m; l++) {
            loss += lv[l];
            rs += rv[l];
            r[i + l] = rv[l];
        }
    }
    for (int l = 0; l < VL; l++) *bad |= badv[l] != 0;
    *rsum += rs;
    return loss;
}

static int64_t FN(block_rows)(int64_t p, int64_t align) {
    int64_t B = dml_block_bytes / (p * (int64_t)sizeof(REAL));
    B -= B % align;
    if (B < align) B = align;
    if (B > 4096) B = 4096;
    return B;
}

/* Squared (kind 0) / logistic (kind 1) loss and gradient over all rows.
 * IN X (n, p), y (n), w (n) row weights or NULL (all 1), coef (p + 1);
 * OUT grad (p + 1): sum_i w_i dloss_i/d(w, b) (zeros if !compute_grad);
 * OUT *loss_out (sum_i w_i loss_i), *bad_out (1 if a logistic label is not 0/1).
 * Returns 0, or -1 if scratch memory could not be allocated. */
static ATTR int FN(glm_driver)(int kind, const REAL *X, const REAL *y, const REAL *w,
                               int64_t n, int64_t p, const REAL *coef, REAL *grad,
                               int compute_grad, double *loss_out, int *bad_out) {
    const int64_t B = FN(block_rows)(p, 4);
    REAL *buf = (REAL *)malloc(sizeof(REAL) * (size_t)(2 * B + p));
    double *gacc = (double *)calloc((size_t)(p + 1), sizeof(double));
    if (!buf || !gacc) { free(buf); free(gacc); return -1; }
    REAL *z = buf, *r = buf + B, *gblk = buf + 2 * B;
    memset(gblk, 0, sizeof(REAL) * (size_t)p);
    const REAL b = coef[p];
    double loss = 0, rsum = 0;
    int bad = 0, nb = 0;
    for (int64_t i0 = 0; i0 < n; i0 += B) {
        const int64_t m = n - i0 < B ? n - i0 : B;
        const REAL *Xb = X + i0 * p;
        const REAL *pf = (dml_prefetch_blocks > 0 && i0 + B * (1 + dml_prefetch_blocks) <= n)
                             ? Xb + dml_prefetch_blocks * B * p : NULL;
        FN(gemv_rows)(Xb, m, p, coef, b, z);
        loss += FN(pw_glm)(kind, z, y + i0, w ? w + i0 : NULL, r, m, &rsum, &bad);
        if (compute_grad) {
            FN(gemvT_rows)(Xb, m, p, r, gblk, pf);
            if (++nb == DML_FLUSH_BLOCKS) {
                for (int64_t j = 0; j < p; j++) { gacc[j] += gblk[j]; gblk[j] = 0; }
                nb = 0;
            }
        }
    }
    for (int64_t j = 0; j < p; j++) gacc[j] += gblk[j];
    gacc[p] = rsum;
    for (int64_t j = 0; j <= p; j++) grad[j] = compute_grad ? (REAL)gacc[j] : 0;
    *loss_out = loss;
    *bad_out = bad;
    free(buf);
    free(gacc);
    return 0;
}

/* ---- softmax block kernels ---------------------------------------------- */

/* Z[r, c] = b[c] + sum_j x[r, j] W[j, c] for r < MR rows and NV vectors of
 * columns.  IN x (MR, p) stride p, W (p, .) stride ldw, b; OUT Z stride ldz. */
INL void FN(mk_fwd)(const REAL *x, int64_t p, const REAL *W, int64_t ldw,
                    const REAL *b, REAL *Z, int64_t ldz, const int MR, const int NV) {
    VEC acc[4][3];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = FN(ld)(b + c * VL);
    for (int64_t j = 0; j < p; j++) {
        VEC wv[3];
        for (int c = 0; c < NV; c++) wv[c] = FN(ld)(W + j * ldw + c * VL);
        for (int r = 0; r < MR; r++) {
            VEC xv = FN(splat)(x[r * p + j]);
            for (int c = 0; c < NV; c++) acc[r][c] += xv * wv[c];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) FN(st)(Z + r * ldz + c * VL, acc[r][c]);
}

/* G[r, c] += sum_i x[i, r] R[i, c] for MR features r and NV vectors of columns.
 * IN x (m, .) stride p (pointing at feature j), R (m, .) stride ldr;
 * IN/OUT G stride ldg. */
INL void FN(mk_bwd)(const REAL *x, int64_t p, int64_t m, const REAL *R, int64_t ldr,
                    REAL *G, int64_t ldg, const int MR, const int NV) {
    VEC acc[4][3];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = FN(ld)(G + r * ldg + c * VL);
    for (int64_t i = 0; i < m; i++) {
        VEC rv[3];
        for (int c = 0; c < NV; c++) rv[c] = FN(ld)(R + i * ldr + c * VL);
        for (int r = 0; r < MR; r++) {
            VEC xv = FN(splat)(x[i * p + r]);
            for (int c = 0; c < NV; c++) acc[r][c] += xv * rv[c];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) FN(st)(G + r * ldg + c * VL, acc[r][c]);
}

/* Z (m, Kp) = Xb (m, p) . Wp (p, Kp) + bp, Kp a multiple of VL. */
static ATTR void FN(gemm_fwd)(const REAL *X, int64_t m, int64_t p, const REAL *Wp,
                              const REAL *bp, int64_t Kp, REAL *Z, const REAL *pf) {
    const int64_t rowb = p * (int64_t)sizeof(REAL);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const REAL *x = X + i * p;
        REAL *z = Z + i * Kp;
        if (pf) FN(prefetch)(pf + i * p, 4 * rowb);
        int64_t c0 = 0;
        for (; c0 + 3 * VL <= Kp; c0 += 3 * VL)
            FN(mk_fwd)(x, p, Wp + c0, Kp, bp + c0, z + c0, Kp, 4, 3);
        if (Kp - c0 == 2 * VL) FN(mk_fwd)(x, p, Wp + c0, Kp, bp + c0, z + c0, Kp, 4, 2);
        else if (Kp - c0 == VL) FN(mk_fwd)(x, p, Wp + c0, Kp, bp + c0, z + c0, Kp, 4, 1);
    }
    for (; i < m; i++) {
        const REAL *x = X + i * p;
        REAL *z = Z + i * Kp;
        if (pf) FN(prefetch)(pf + i * p, rowb);
        int64_t c0 = 0;
        for (; c0 + 3 * VL <= Kp; c0 += 3 * VL)
            FN(mk_fwd)(x, p, Wp + c0, Kp, bp + c0, z + c0, Kp, 1, 3);
        if (Kp - c0 == 2 * VL) FN(mk_fwd)(x, p, Wp + c0, Kp, bp + c0, z + c0, Kp, 1, 2);
        else if (Kp - c0 == VL) FN(mk_fwd)(x, p, Wp + c0, Kp, bp + c0, z + c0, Kp, 1, 1);
    }
}

/* G (p, Kp) += Xb^T (p, m) . R (m, Kp). */
static ATTR void FN(gemm_bwd)(const REAL *X, int64_t m, int64_t p, const REAL *R,
                              int64_t Kp, REAL *G) {
    int64_t j = 0;
    for (; j + 4 <= p; j += 4) {
        int64_t c0 = 0;
        for (; c0 + 3 * VL <= Kp; c0 += 3 * VL)
            FN(mk_bwd)(X + j, p, m, R + c0, Kp, G + j * Kp + c0, Kp, 4, 3);
        if (Kp - c0 == 2 * VL) FN(mk_bwd)(X + j, p, m, R + c0, Kp, G + j * Kp + c0, Kp, 4, 2);
        else if (Kp - c0 == VL) FN(mk_bwd)(X + j, p, m, R + c0, Kp, G + j * Kp + c0, Kp, 4, 1);
    }
    for (; j < p; j++) {
        int64_t c0 = 0;
        for (; c0 + 3 * VL <= Kp; c0 += 3 * VL)
            FN(mk_bwd)(X + j, p, m, R + c0, Kp, G + j * Kp + c0, Kp, 1, 3);
        if (Kp - c0 == 2 * VL) FN(mk_bwd)(X + j, p, m, R + c0, Kp, G + j * Kp + c0, Kp, 1, 2);
        else if (Kp - c0 == VL) FN(mk_bwd)(X + j, p, m, R + c0, Kp, G + j * Kp + c0, Kp, 1, 1);
    }
}

/* Softmax cross-entropy of one block, in place.
 * IN/OUT Z (m, Kp): logits in, R = softmax(Z) - onehot(y) out (padding
 * columns hold -inf logits and give 0).  IN y (m); IN/OUT gb (Kp): += column
 * sums of softmax(Z) (the -1 of the one-hot is counted in ycount);
 * IN/OUT ycount (K); scratch s, zy, ws (m rounded up to VL).  IN w (m) row
 * weights or NULL (all 1): R's rows, gb and ycount are weighted.
 * loss_i = log sum_k exp(z_ik - max_i) - (z_iy - max_i).  Returns sum w_i loss_i. */
static ATTR double FN(pw_softmax)(REAL *Z, int64_t m, int64_t Kp, const int64_t *y,
                                  const REAL *w, int64_t K, REAL *gb, double *ycount,
                                  REAL *s, REAL *zy, REAL *ws, int *bad) {
    const int64_t nv = Kp / VL;
    for (int64_t i = 0; i < m; i++) {
        REAL *zr = Z + i * Kp;
        VEC mv = FN(ld)(zr);
        for (int64_t c = 1; c < nv; c++) mv = FN(vmax)(mv, FN(ld)(zr + c * VL));
        const REAL mx = FN(hmax)(mv);
        int64_t yi = y[i];
        if (yi < 0 || yi >= K) { *bad = 1; yi = 0; }
        zy[i] = zr[yi] - mx;
        VEC sv = {0};
        for (int64_t c = 0; c < nv; c++) {
            VEC e = FN(vexp)(FN(ld)(zr + c * VL) - mx);
            FN(st)(zr + c * VL, e);
            sv += e;
        }
        s[i] = FN(hsum)(sv);
    }
    int64_t mp = m + (VL - m % VL) % VL;
    for (int64_t i = m; i < mp; i++) { s[i] = 1; zy[i] = 0; }
    double loss = 0;
    VEC lacc = {0};
    if (w) {
        for (int64_t i = 0; i < mp; i++) ws[i] = i < m ? w[i] : 0;
        for (int64_t i = 0; i < mp; i += VL)
            lacc += (FN(vlog)(FN(ld)(s + i)) - FN(ld)(zy + i)) * FN(ld)(ws + i);
    } else {
        for (int64_t i = 0; i < mp; i += VL) lacc += FN(vlog)(FN(ld)(s + i)) - FN(ld)(zy + i);
    }
    loss = FN(hsum)(lacc);
    for (int64_t i = 0; i < m; i++) {
        REAL *zr = Z + i * Kp;
        const REAL wi = w ? w[i] : 1;
        VEC inv = FN(splat)(wi / s[i]);
        for (int64_t c = 0; c < nv; c++) {
            VEC pr = FN(ld)(zr + c * VL) * inv;
            FN(st)(zr + c * VL, pr);
            FN(st)(gb + c * VL, FN(ld)(gb + c * VL) + pr);
        }
        int64_t yi = y[i];
        if (yi < 0 || yi >= K) yi = 0;
        zr[yi] -= wi;
        ycount[yi] += wi;
    }
    return loss;
}

/* Softmax cross-entropy loss and gradient over all rows.
 * IN X (n, p), y (n) int64 in [0, K), w (n) row weights or NULL (all 1),
 * coef (p*K + K); OUT grad (p*K + K): weighted sums (zeros if !compute_grad);
 * OUT *loss_out (sum_i w_i loss_i), *bad_out (1 if a label is outside
 * [0, K)).  Returns 0, or -1 if scratch memory could not be allocated. */
static ATTR int FN(softmax_driver)(const REAL *X, const int64_t *y, const REAL *w, int64_t n,
                                   int64_t p, int64_t K, const REAL *coef, REAL *grad,
                                   int compute_grad, double *loss_out, int *bad_out) {
    const int64_t Kp = K + (VL - K % VL) % VL;
    int64_t B = FN(block_rows)(p, VL);
    const int64_t Bp = B + VL;
    size_t nreal = (size_t)(p * Kp * 2 + Kp * 2 + B * Kp + 3 * Bp);
    REAL *buf = (REAL *)malloc(sizeof(REAL) * nreal);
    double *gacc = (double *)calloc((size_t)(p * K + 2 * K), sizeof(double));
    if (!buf || !gacc) { free(buf); free(gacc); return -1; }
    memset(buf, 0, sizeof(REAL) * nreal);
    REAL *Wp = buf, *G = Wp + p * Kp, *bp = G + p * Kp, *gb = bp + Kp;
    REAL *Z = gb + Kp, *s = Z + B * Kp, *zy = s + Bp, *ws = zy + Bp;
    double *ycount = gacc + p * K + K;
    for (int64_t j = 0; j < p; j++)
        for (int64_t k = 0; k < K; k++) Wp[j * Kp + k] = coef[j * K + k];
    for (int64_t k = 0; k < Kp; k++) bp[k] = k < K ? coef[p * K + k] : -(REAL)INFINITY;
    double loss = 0;
    int bad = 0, nb = 0;
    for (int64_t i0 = 0; i0 < n; i0 += B) {
        const int64_t m = n - i0 < B ? n - i0 : B;
        const REAL *Xb = X + i0 * p;
        const REAL *pf = (dml_prefetch_blocks > 0 && i0 + B * (1 + dml_prefetch_blocks) <= n)
                             ? Xb + dml_prefetch_blocks * B * p : NULL;
        FN(gemm_fwd)(Xb, m, p, Wp, bp, Kp, Z, pf);
        loss += FN(pw_softmax)(Z, m, Kp, y + i0, w ? w + i0 : NULL, K, gb, ycount, s, zy,
                                 ws, &bad);
        if (compute_grad) {
            FN(gemm_bwd)(Xb, m, p, Z, Kp, G);
            if (++nb == DML_FLUSH_BLOCKS) {
                for (int64_t j = 0; j < p; j++)
                    for (int64_t k = 0; k < K; k++) {
                        gacc[j * K + k] += G[j * Kp + k];
                        G[j * Kp + k] = 0;
                    }
                for (int64_t k = 0; k < K; k++) { gacc[p * K + k] += gb[k]; gb[k] = 0; }
                nb = 0;
            }
        }
    }
    for (int64_t j = 0; j < p; j++)
        for (int64_t k = 0; k < K; k++) gacc[j * K + k] += G[j * Kp + k];
    for (int64_t k = 0; k < K; k++) gacc[p * K + k] += gb[k] - ycount[k];
    for (int64_t t = 0; t < p * K + K; t++) grad[t] = compute_grad ? (REAL)gacc[t] : 0;
    *loss_out = loss;
    *bad_out = bad;
    free(buf);
    free(gacc);
    return 0;
}

#undef FN
#undef INL
#undef C_LOG2E
#undef C_LN2HI
#undef C_LN2LO
#undef C_SHIFT
#undef C_XMIN
#undef C_XMAX
#undef C_EXPBIAS
#undef C_MANT
#undef C_NHALF
#undef C_SQRTH_BITS
#undef C_ONE_BITS
#undef C_MANT_MASK
#undef C_TINY
#undef C_TINY_SCALE
#undef C_TINY_K
