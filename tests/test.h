/* Minimal test harness: CHECK records a failure with file:line and keeps going; each test
 * program ends with test_finish(), which prints "N passed, N failed" and sets the exit code. */
#ifndef LORA_TEST_H
#define LORA_TEST_H

#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_passed_, test_failed_;

#define CHECK(cond) do { if (cond) test_passed_++; else { test_failed_++; \
    fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); } } while (0)
#define CHECK_MSG(cond, ...) do { if (cond) test_passed_++; else { test_failed_++; \
    fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); fprintf(stderr, __VA_ARGS__); \
    fprintf(stderr, "\n"); } } while (0)
#define CHECK_STATUS(expr, want) do { lora_status got_ = (expr); if (got_ == (want)) test_passed_++; \
    else { test_failed_++; fprintf(stderr, "FAIL %s:%d: %s returned %s (%d), want %s\n", __FILE__, __LINE__, \
    #expr, lora_status_name(got_), got_, lora_status_name(want)); } } while (0)
#define CHECK_NEAR(a, b, tol) do { double a_ = (a), b_ = (b); if (fabs(a_ - b_) <= (tol)) test_passed_++; \
    else { test_failed_++; fprintf(stderr, "FAIL %s:%d: %s = %.9g, want %.9g (tol %g)\n", __FILE__, __LINE__, \
    #a, a_, b_, (double)(tol)); } } while (0)

/* "dir/name" in a malloc'd string (the caller frees it). */
static inline char *test_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* The whole file in a malloc'd buffer (NULL if unreadable); *len gets its size. */
static inline uint8_t *test_slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(n > 0 ? (size_t)n : 1);
    if (b && n > 0 && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *len = n > 0 ? (size_t)n : 0;
    return b;
}

/* 1 when both files are readable and byte for byte equal. */
static inline int test_same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    uint8_t *x = test_slurp(a, &na), *y = test_slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Entries of `dir` whose name contains "lora-tmp" (the library's atomic-write temp files). */
static inline int test_temp_files(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strstr(e->d_name, "lora-tmp")) n++;
    if (d) closedir(d);
    return n;
}

static inline int test_finish(const char *name) {
    printf("%s: %d passed, %d failed\n", name, test_passed_, test_failed_);
    return test_failed_ ? 1 : 0;
}

#endif
