/* UTF-8 validation shared by every parser (safetensors headers, pickle strings, parameter
 * values, tensor names). */
#ifndef LORA_CORE_UTF8_H
#define LORA_CORE_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* 1 when s[0..n) is well-formed UTF-8: no overlong forms, nothing above U+10FFFF, and no
 * encoded surrogates unless `allow_surrogates` (Python's "surrogatepass", which pickles use).
 * Else 0 and *bad_at (optional) = offset of the first bad byte. */
int utf8_check(const uint8_t *s, size_t n, int allow_surrogates, size_t *bad_at);

/* Strict form (no surrogates), as JSON and safetensors require. */
static inline int utf8_valid(const uint8_t *s, size_t n, size_t *bad_at) { return utf8_check(s, n, 0, bad_at); }

#endif
