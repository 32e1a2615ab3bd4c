/* lora_file_hash throughput on a file in the page cache (A1111's "Model hash" of a 2-7 GB
 * checkpoint is computed on every `lora generate`): MB/s of LORA_HASH_SHA256 and
 * LORA_HASH_ADDNET (median of REPS), with read() of the same file in 1 MiB chunks as the
 * floor. Prints "name MB/s" lines for scripts/bench.sh hash. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lora/lora.h>

#include "bench_util.h"

static double read_all(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    size_t cap = 1u << 20;
    char *buf = malloc(cap);
    double t = bench_now();
    while (buf && read(fd, buf, cap) > 0) {}
    t = bench_now() - t;
    close(fd);
    free(buf);
    return t;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_hash REPS FILE\n");
        return 2;
    }
    int reps = atoi(argv[1]);
    if (reps < 1 || reps > 31) reps = 3;
    const char *path = argv[2];
    struct stat sb;
    if (stat(path, &sb) != 0 || sb.st_size <= 0) {
        fprintf(stderr, "%s: missing or empty\n", path);
        return 1;
    }
    double mb = (double)sb.st_size / 1e6;
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    read_all(path);   /* warm the page cache */
    double t[31];
    for (int r = 0; r < reps; r++) t[r] = read_all(path);
    printf("# file: %s, %.0f MB, page cache warm, median of %d\n", path, mb, reps);
    printf("read_1MiB %.0f\n", mb / bench_median(t, reps));
    static const struct { int32_t kind; const char *name; } k[] = {
        {LORA_HASH_SHA256, "sha256"}, {LORA_HASH_ADDNET, "sha256_addnet"},
    };
    char hex[65];
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        for (int r = 0; r < reps; r++) {
            double s = bench_now();
            lora_status st = lora_file_hash(ctx, path, k[i].kind, hex, sizeof hex);
            t[r] = bench_now() - s;
            /* addnet needs a safetensors header: a raw file is refused, so skip that row */
            if (st != LORA_OK && k[i].kind == LORA_HASH_ADDNET) goto next;
            if (st != LORA_OK) {
                fprintf(stderr, "%s: %s\n", path, lora_errmsg(ctx));
                lora_ctx_free(ctx);
                return 1;
            }
        }
        printf("%s %.0f\n", k[i].name, mb / bench_median(t, reps));
        if (k[i].kind == LORA_HASH_SHA256) printf("# sha256 %s\n", hex);
    next:;
    }
    lora_ctx_free(ctx);
    return 0;
}
