/* Reading reference tensors (safetensors written by the tests/reference scripts) in parity tests. */
#ifndef LORA_TESTS_REF_FILE_H
#define LORA_TESTS_REF_FILE_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

/* Index of tensor `name`, or -1. */
static inline int64_t ref_find(const struct lora_file *f, const char *name) {
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return i;
    return -1;
}

/* A float32 tensor of the reference file (NULL if absent); *n gets its element count. */
static inline const float *ref_f32(const struct lora_file *f, const char *name, int64_t *n) {
    int64_t i = ref_find(f, name);
    if (i < 0 || f->tensors[i].dtype != LORA_DTYPE_F32) {
        fprintf(stderr, "reference tensor %s missing or not F32\n", name);
        return NULL;
    }
    if (n) *n = (int64_t)((f->tensors[i].end - f->tensors[i].begin) / 4);
    return (const float *)st_data(f, i);
}

/* A 2-D int64 ids tensor as int32 (malloc'd), with its rows and columns. */
static inline int32_t *ref_ids(const struct lora_file *f, const char *name, int64_t *rows, int64_t *cols) {
    int64_t i = ref_find(f, name);
    if (i < 0 || f->tensors[i].dtype != LORA_DTYPE_I64 || f->tensors[i].ndim != 2) return NULL;
    *rows = f->tensors[i].shape[0];
    *cols = f->tensors[i].shape[1];
    int32_t *out = malloc((size_t)(*rows * *cols) * sizeof *out);
    const uint8_t *p = st_data(f, i);
    for (int64_t k = 0; out && k < *rows * *cols; k++) {
        int64_t v;
        memcpy(&v, p + 8 * k, 8);
        out[k] = (int32_t)v;
    }
    return out;
}

/* An int64 or float64 tensor's elements as floats (at most `max`); returns the element count,
 * 0 when absent. */
static inline int64_t ref_as_floats(const struct lora_file *f, const char *name, float *out, int64_t max) {
    int64_t i = ref_find(f, name);
    if (i < 0) return 0;
    int64_t n = (int64_t)((f->tensors[i].end - f->tensors[i].begin) / 8);
    const uint8_t *p = st_data(f, i);
    for (int64_t k = 0; k < n && k < max; k++) {
        if (f->tensors[i].dtype == LORA_DTYPE_I64) { int64_t v; memcpy(&v, p + 8 * k, 8); out[k] = (float)v; }
        else { double v; memcpy(&v, p + 8 * k, 8); out[k] = (float)v; }
    }
    return n;
}

/* ||a - b|| / ||b|| in double (||a - b|| when b is all zeros). */
static inline double rel_l2(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Prints the relative L2 error of `got` against the reference and checks it (a missing
 * reference fails). Needs test.h included first. */
static inline void ref_compare(int ver, const char *what, const float *got, const float *want, int64_t n, double tol) {
    if (!want) { CHECK_MSG(0, "%s: reference missing", what); return; }
    double r = rel_l2(got, want, n);
    printf("v%d %-40s rel L2 %.2e\n", ver, what, r);
    CHECK_MSG(r <= tol, "v%d %s: rel L2 %.3e > %.1e", ver, what, r, tol);
}

/* Loads the tiny model <dir>/sd/v<ver>_diffusers and its reference outputs; 0 when either
 * failed (already reported). */
static inline int ref_open_version(lora_ctx *ctx, const char *dir, int ver, lora_model **model,
                                   struct lora_file **ref) {
    char path[1024];
    snprintf(path, sizeof path, "%s/sd/v%d_diffusers", dir, ver);
    *model = NULL;
    *ref = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, model), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v%d_reference_outputs.safetensors", dir, ver);
    CHECK_STATUS(st_open(ctx, path, ref), LORA_OK);
    return *model && *ref;
}

#endif
