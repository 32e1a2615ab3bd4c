/* Overflow-checked size arithmetic. Every size computed from file contents or user input
 * goes through these: they return 0 and leave *out untouched on overflow. */
#ifndef LORA_CORE_CHECKED_H
#define LORA_CORE_CHECKED_H

#include <stddef.h>
#include <stdint.h>

static inline int ck_add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}
static inline int ck_mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline int ck_add_size(size_t a, size_t b, size_t *out) {
    return !__builtin_add_overflow(a, b, out);
}
static inline int ck_mul_size(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline int ck_mul_i64(int64_t a, int64_t b, int64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
/* Product of `n` non-negative dims; 0 on overflow or a negative dim. */
static inline int ck_numel(const int64_t *dims, int n, int64_t *out) {
    int64_t p = 1;
    for (int i = 0; i < n; i++) {
        if (dims[i] < 0 || !ck_mul_i64(p, dims[i], &p)) return 0;
    }
    *out = p;
    return 1;
}

#endif
