/* Minimal test harness: CHECK records a failure with file:line and keeps going; each test
 * program ends with test_finish(), which prints "N passed, N failed" and sets the exit code. */
#ifndef LORA_TEST_H
#define LORA_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

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

static inline int test_finish(const char *name) {
    printf("%s: %d passed, %d failed\n", name, test_passed_, test_failed_);
    return test_failed_ ? 1 : 0;
}

#endif
