/* csr_types.h -- includes csr_impl.h once per (data type, index type) for the
 * ISA and ATTR that loss_kernels.h defines.  No include guard on purpose. */
#define REAL double
#define IDX int32_t
#define CSUFFIX _d_i32
#include "csr_impl.h"
#undef IDX
#undef CSUFFIX
#define IDX int64_t
#define CSUFFIX _d_i64
#include "csr_impl.h"
#undef IDX
#undef CSUFFIX
#undef REAL
#define REAL float
#define IDX int32_t
#define CSUFFIX _f_i32
#include "csr_impl.h"
#undef IDX
#undef CSUFFIX
#define IDX int64_t
#define CSUFFIX _f_i64
#include "csr_impl.h"
#undef IDX
#undef CSUFFIX
#undef REAL
