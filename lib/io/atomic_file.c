#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/atomic_file.h"

lora_status io_fail(lora_ctx *ctx, int err, const char *what, const char *path) {
    lora_status s = LORA_E_IO;
    if (err == ENOSPC || err == EDQUOT) s = LORA_E_NOSPACE;
    else if (err == ENOENT || err == ENOTDIR) s = LORA_E_NOT_FOUND;
    else if (err == ETXTBSY || err == EBUSY) s = LORA_E_DEST_BUSY;
    else if (err == ENOMEM) s = LORA_E_NOMEM;
    return lora_fail(ctx, s, "%s: %s failed: %s", path, what, strerror(err));
}

lora_status io_open_read(lora_ctx *ctx, const char *path, int *fd, uint64_t *size) {
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0) return io_fail(ctx, errno, "open", path);
    struct stat sb;
    lora_status s = LORA_OK;
    if (fstat(*fd, &sb) != 0) s = io_fail(ctx, errno, "stat", path);
    else if (!S_ISREG(sb.st_mode)) s = lora_fail(ctx, LORA_E_IO, "%s: not a regular file", path);
    if (s != LORA_OK) {
        close(*fd);
        *fd = -1;
        return s;
    }
    *size = (uint64_t)sb.st_size;
    return LORA_OK;
}

static char *dir_of(lora_ctx *ctx, const char *path) {
    char *copy = lora_strdup(ctx, path);
    if (!copy) return NULL;
    char *d = dirname(copy);   /* may return a static "." or point into copy */
    char *out = lora_strdup(ctx, d);
    lora_free(ctx, copy);
    return out;
}

lora_status atomic_file_begin(lora_ctx *ctx, const char *path, struct atomic_file *af) {
    memset(af, 0, sizeof *af);
    af->ctx = ctx;
    af->fd = -1;
    af->path = lora_strdup(ctx, path);
    if (!af->path) return LORA_E_NOMEM;
    char *copy = lora_strdup(ctx, path);
    char *dir = dir_of(ctx, path);
    size_t cap = strlen(path) + 64;
    af->tmp_path = lora_malloc(ctx, cap);
    if (!copy || !dir || !af->tmp_path) {
        lora_free(ctx, copy);
        lora_free(ctx, dir);
        atomic_file_abort(af);
        return LORA_E_NOMEM;
    }
    const char *base = basename(copy);
    lora_status s = LORA_OK;
    for (int attempt = 0; attempt < 100; attempt++) {
        snprintf(af->tmp_path, cap, "%s/.%s.lora-tmp-%ld-%d", dir, base, (long)getpid(), attempt);
        af->fd = open(af->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (af->fd >= 0 || errno != EEXIST) break;
    }
    if (af->fd < 0) {
        int err = errno;
        s = io_fail(ctx, err, "creating a temp file beside it", path);
    }
    lora_free(ctx, copy);
    lora_free(ctx, dir);
    if (s != LORA_OK) {
        lora_free(ctx, af->tmp_path);
        af->tmp_path = NULL;   /* nothing was created: nothing to unlink */
        atomic_file_abort(af);
    }
    return s;
}

lora_status atomic_file_write(struct atomic_file *af, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len > 0) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : len;
        ssize_t w = write(af->fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return io_fail(af->ctx, errno, "write", af->path);
        }
        if (w == 0) return io_fail(af->ctx, EIO, "write", af->path);
        p += w;
        len -= (size_t)w;
    }
    return LORA_OK;
}

lora_status atomic_file_commit(struct atomic_file *af) {
    lora_status s = LORA_OK;
    if (fsync(af->fd) != 0) s = io_fail(af->ctx, errno, "fsync", af->path);
    int fd = af->fd;
    af->fd = -1;
    if (close(fd) != 0 && s == LORA_OK) s = io_fail(af->ctx, errno, "close", af->path);
    if (s == LORA_OK && rename(af->tmp_path, af->path) != 0) s = io_fail(af->ctx, errno, "rename", af->path);
    if (s != LORA_OK) {
        atomic_file_abort(af);
        return s;
    }
    /* The rename is durable only once the directory entry is on disk. */
    char *dir = dir_of(af->ctx, af->path);
    if (dir) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);   /* some filesystems refuse directory fsync: not an error */
            close(dfd);
        }
        lora_free(af->ctx, dir);
    }
    lora_free(af->ctx, af->tmp_path);
    af->tmp_path = NULL;
    atomic_file_abort(af);
    return LORA_OK;
}

void atomic_file_abort(struct atomic_file *af) {
    if (af->fd >= 0) close(af->fd);
    af->fd = -1;
    if (af->tmp_path) unlink(af->tmp_path);
    lora_free(af->ctx, af->tmp_path);
    lora_free(af->ctx, af->path);
    af->tmp_path = NULL;
    af->path = NULL;
}
