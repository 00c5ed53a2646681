/* csr_impl.h -- CSR bodies of the GLM and softmax kernels, included by
 * loss_kernels.h once per (data type, index type, ISA).  Expects REAL (type of
 * data, coef, y and w), IDX (type of indices and indptr), CSUFFIX (e.g. _d_i32),
 * ISA (_base or _avx2) and ATTR.  No include guard on purpose.
 *
 * X is CSR (data, indices, indptr) with n rows; coef uses the Model layout
 * (w (p), b) or (W (p, K) row-major, b (K)).  Arithmetic is in double whatever
 * REAL is: the gathered z, the pointwise stage (the double pw_glm / pw_softmax
 * of loss_impl.h) and the gradient sums, which go straight into the caller's
 * zeroed double accumulator `acc` (same layout as coef).
 *
 * Per block of rows (dml_csr_block_rows): gather z_i = x_i . w + b (two
 * partial sums per row to split the add chain), the vectorised pointwise
 * stage, then scatter acc[j] += r_i x_ij.  Small blocks while coef and acc fit
 * in cache, so the scatter re-reads the entries from L1/L2; large ones beyond,
 * so that gather and scatter do not evict each other's array.
 */
#define CFN(name) DML_CAT(DML_CAT(name, CSUFFIX), ISA)
#define DFN(name) DML_CAT(DML_CAT(name, _d), ISA)

/* Squared (kind 0) / logistic (kind 1).  IN data, ind (nnz), indptr (n + 1),
 * y (n), w (n) or NULL, coef (p + 1); IN/OUT acc (p + 1, zeroed by the caller):
 * += sum_i w_i dloss_i/d(w, b) if compute_grad.  OUT *loss_out = sum_i w_i loss_i,
 * *bad_out = 1 if a logistic label is not 0/1. */
static ATTR int CFN(csr_glm)(int kind, const REAL *restrict data, const IDX *restrict ind,
                              const IDX *restrict indptr, int64_t n, int64_t p,
                              const REAL *restrict y, const REAL *restrict w,
                              const REAL *restrict coef, double *restrict acc,
                              int compute_grad, double *loss_out, int *bad_out) {
    const int64_t B = dml_csr_block_rows(n, p + 1, 1, indptr[n] - indptr[0], 4);
    double *buf = (double *)malloc(sizeof(double) * (size_t)(4 * B));
    if (!buf) return -1;
    double *z = buf, *r = z + B, *yb = r + B, *wb = yb + B;
    const double b = coef[p];
    double loss = 0, rsum = 0;
    int bad = 0;
    for (int64_t i0 = 0; i0 < n; i0 += B) {
        const int64_t m = n - i0 < B ? n - i0 : B;
        for (int64_t t = 0; t < m; t++) {
            int64_t k = indptr[i0 + t];
            const int64_t e = indptr[i0 + t + 1];
            double s0 = 0, s1 = 0;
            for (; k + 2 <= e; k += 2) {
                s0 += (double)data[k] * (double)coef[ind[k]];
                s1 += (double)data[k + 1] * (double)coef[ind[k + 1]];
            }
            if (k < e) s0 += (double)data[k] * (double)coef[ind[k]];
            z[t] = b + (s0 + s1);
            yb[t] = (double)y[i0 + t];
            wb[t] = w ? (double)w[i0 + t] : 1.0;
        }
        loss += DFN(pw_glm)(kind, z, yb, w ? wb : NULL, r, m, &rsum, &bad);
        if (!compute_grad) continue;
        for (int64_t t = 0; t < m; t++) {
            const double rt = r[t];
            for (int64_t k = indptr[i0 + t]; k < indptr[i0 + t + 1]; k++)
                acc[ind[k]] += (double)data[k] * rt;
        }
    }
    if (compute_grad) acc[p] += rsum;
    *loss_out = loss;
    *bad_out = bad;
    free(buf);
    return 0;
}

/* Softmax cross-entropy.  IN data, ind, indptr as above, y (n) int64 in [0, K),
 * w (n) or NULL, coef (p*K + K); IN/OUT acc (p*K + K, zeroed): += the weighted
 * gradient sums if compute_grad.  OUT *loss_out, *bad_out (a label outside
 * [0, K)).  Returns 0, or -1 if scratch memory could not be allocated. */
static ATTR int CFN(csr_softmax)(const REAL *restrict data, const IDX *restrict ind,
                                 const IDX *restrict indptr, int64_t n, int64_t p, int64_t K,
                                 const int64_t *restrict y, const REAL *restrict w,
                                 const REAL *restrict coef, double *restrict acc,
                                 int compute_grad, double *loss_out, int *bad_out) {
    const int64_t Kp = K + (4 - K % 4) % 4;       /* pw_softmax_d's 4-double vectors */
    const int64_t B = dml_csr_block_rows(n, p * K + K, K, indptr[n] - indptr[0], Kp + 4);
    const int64_t Bp = B + 4;
    double *buf = (double *)calloc((size_t)(B * Kp + 2 * Kp + 4 * Bp + 2 * K), sizeof(double));
    if (!buf) return -1;
    double *restrict Z = buf, *bp = Z + B * Kp, *gb = bp + Kp;
    double *s = gb + Kp, *zy = s + Bp, *ws = zy + Bp, *wb = ws + Bp, *ycount = wb + Bp;
    for (int64_t c = 0; c < Kp; c++) bp[c] = c < K ? (double)coef[p * K + c] : -INFINITY;
    double loss = 0;
    int bad = 0;
    for (int64_t i0 = 0; i0 < n; i0 += B) {
        const int64_t m = n - i0 < B ? n - i0 : B;
        for (int64_t t = 0; t < m; t++) {
            double *restrict zr = Z + t * Kp;
            for (int64_t c = 0; c < Kp; c++) zr[c] = bp[c];
            for (int64_t k = indptr[i0 + t]; k < indptr[i0 + t + 1]; k++) {
                const double x = (double)data[k];
                const REAL *restrict wr = coef + (int64_t)ind[k] * K;
                for (int64_t c = 0; c < K; c++) zr[c] += x * (double)wr[c];
            }
            if (w) wb[t] = (double)w[i0 + t];
        }
        loss += DFN(pw_softmax)(Z, m, Kp, y + i0, w ? wb : NULL, K, gb, ycount, s, zy, ws,
                                &bad);
        if (!compute_grad) continue;
        for (int64_t t = 0; t < m; t++) {
            const double *restrict zr = Z + t * Kp;
            for (int64_t k = indptr[i0 + t]; k < indptr[i0 + t + 1]; k++) {
                const double x = (double)data[k];
                double *restrict gr = acc + (int64_t)ind[k] * K;
                for (int64_t c = 0; c < K; c++) gr[c] += x * zr[c];
            }
        }
    }
    if (compute_grad)
        for (int64_t c = 0; c < K; c++) acc[p * K + c] += gb[c] - ycount[c];
    *loss_out = loss;
    *bad_out = bad;
    free(buf);
    return 0;
}

#undef CFN
#undef DFN
