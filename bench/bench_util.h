/* Timing helpers shared by the benchmarks: a monotonic clock and medians. */
#ifndef LORA_BENCH_UTIL_H
#define LORA_BENCH_UTIL_H

#include <stdlib.h>
#include <time.h>

static inline double bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline int bench_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of t[0..n) (sorts t). */
static inline double bench_median(double *t, int n) {
    qsort(t, (size_t)n, sizeof *t, bench_cmp_double);
    return t[n / 2];
}

/* Runs `body` once to warm up, then `reps` (at most 64) timed times; `out` = the median. */
#define TIME_MEDIAN(reps, body, out) do { body; double t_[64]; int r_ = (reps) > 64 ? 64 : (reps); \
    for (int i_ = 0; i_ < r_; i_++) { double s_ = bench_now(); body; t_[i_] = bench_now() - s_; } \
    out = bench_median(t_, r_); } while (0)

#endif
