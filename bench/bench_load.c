/* Checkpoint load time against the bytes on disk: for each file, the time to read it raw
 * (read() into one buffer: the I/O floor with a warm page cache) and the time of
 * lora_model_load (median of REPS). Prints "name seconds" lines for scripts/bench.sh. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lora/lora.h>

#include "bench_util.h"



static double raw_read(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    struct stat sb;
    fstat(fd, &sb);
    char *buf = malloc((size_t)sb.st_size);
    double t = bench_now();
    size_t got = 0;
    while (buf && got < (size_t)sb.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)sb.st_size - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    t = bench_now() - t;
    close(fd);
    free(buf);
    return t;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_load REPS FILE...\n");
        return 2;
    }
    int reps = atoi(argv[1]);
    if (reps < 1 || reps > 31) reps = 3;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    for (int f = 2; f < argc; f++) {
        const char *path = argv[f];
        const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
        raw_read(path);   /* warm the page cache */
        printf("raw_read:%s %.3f\n", base, raw_read(path));
        double t[31];
        for (int r = 0; r < reps; r++) {
            lora_model *m = NULL;
            double s = bench_now();
            lora_status st = lora_model_load(ctx, path, NULL, &m);
            t[r] = bench_now() - s;
            if (st != LORA_OK) {
                fprintf(stderr, "%s: %s\n", path, lora_errmsg(ctx));
                return 1;
            }
            lora_model_free(m);
        }
        printf("lora_model_load:%s %.3f\n", base, bench_median(t, reps));
    }
    lora_ctx_free(ctx);
    return 0;
}
