/* Atomic file replacement: write a sibling temp file, fsync, rename over the target, fsync
 * the directory. An interrupted or failed save leaves the previous file untouched and no
 * temp file behind (spec/safety.md T1, F1, F2, F9). */
#ifndef LORA_IO_ATOMIC_FILE_H
#define LORA_IO_ATOMIC_FILE_H

#include "internal.h"

struct atomic_file {
    lora_ctx *ctx;
    int fd;
    char *path;       /* final path */
    char *tmp_path;   /* sibling temp: ".<name>.lora-tmp-<pid>-<n>" */
};

lora_status atomic_file_begin(lora_ctx *ctx, const char *path, struct atomic_file *af);
lora_status atomic_file_write(struct atomic_file *af, const void *buf, size_t len);
/* fsync + close + rename + fsync(dir); on failure the temp file is removed. */
lora_status atomic_file_commit(struct atomic_file *af);
/* Discards the temp file (safe to call after a failed commit, and twice). */
void atomic_file_abort(struct atomic_file *af);

/* Opens `path` read-only and checks it is a regular file; *size gets its length. On failure
 * nothing stays open and the status names the file. */
lora_status io_open_read(lora_ctx *ctx, const char *path, int *fd, uint64_t *size);

/* Maps errno of a failed I/O call to a status with a message naming `path`. */
lora_status io_fail(lora_ctx *ctx, int err, const char *what, const char *path);

#endif
