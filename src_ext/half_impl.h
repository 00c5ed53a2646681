/* float32 <-> float16 with a power-of-two scale, on x86's F16C instructions.
 *
 * dml_half_pack:   dst[i] = float16(src[i] / scale), round to nearest even
 * dml_half_unpack: dst[i] = float32(src[i]) * scale   (add != 0: dst[i] += ...)
 *
 * Every operation is the IEEE one NumPy performs for
 * ``(v / np.float32(s)).astype(np.float16)`` and
 * ``h.astype(np.float32) * np.float32(s)``: a float32 division or product
 * (correctly rounded, so a vector of 8 equals 8 scalars) and the round-to-
 * nearest-even conversion, subnormal halves included. Same bits as NumPy.
 *
 * dml_half_supported() says whether this CPU runs them (F16C and AVX, checked
 * at run time: the module is built without -mf16c); where it is 0 the
 * callers use NumPy.
 */
#ifndef DML_HALF_IMPL_H
#define DML_HALF_IMPL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

static int dml_half_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}

__attribute__((target("avx,f16c")))
static void dml_half_pack(const float *src, float scale, uint16_t *dst, ptrdiff_t n) {
    const __m256 s = _mm256_set1_ps(scale);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(src + i), s);
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) {
        __m128 v = _mm_div_ss(_mm_set_ss(src[i]), _mm_set_ss(scale));
        __m128i h = _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        dst[i] = (uint16_t)_mm_extract_epi16(h, 0);
    }
}

__attribute__((target("avx,f16c")))
static void dml_half_unpack(const uint16_t *src, float scale, float *dst, ptrdiff_t n,
                            int add) {
    const __m256 s = _mm256_set1_ps(scale);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))), s);
        if (add)
            v = _mm256_add_ps(_mm256_loadu_ps(dst + i), v);
        _mm256_storeu_ps(dst + i, v);
    }
    for (; i < n; i++) {
        __m128 v = _mm_mul_ss(_mm_cvtph_ps(_mm_cvtsi32_si128(src[i])), _mm_set_ss(scale));
        float f = _mm_cvtss_f32(v);
        dst[i] = add ? dst[i] + f : f;
    }
}

#else

static int dml_half_supported(void) { return 0; }

static void dml_half_pack(const float *src, float scale, uint16_t *dst, ptrdiff_t n) {
    (void)src; (void)scale; (void)dst; (void)n;
}

static void dml_half_unpack(const uint16_t *src, float scale, float *dst, ptrdiff_t n,
                            int add) {
    (void)src; (void)scale; (void)dst; (void)n; (void)add;
}
#endif

#endif /* DML_HALF_IMPL_H */
