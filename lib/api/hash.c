/* lora_file_hash: the file hashes A1111, sd-webui-additional-networks and kohya-ss print or
 * store (spec/kohya-lora.md §9.2), streamed through core/sha256 (libcrypto) in 1 MiB chunks so
 * multi-GB checkpoints need no whole-file buffer. */
#include <errno.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "core/sha256.h"
#include "io/atomic_file.h"
#include "train/metadata.h"   /* md_hex */

#define HASH_CHUNK    (1u << 20)
#define LEGACY_START  0x100000u   /* A1111's old model hash: 64 KiB at 1 MiB */
#define LEGACY_LEN    0x10000u

/* Reads [start, end) of fd into the hash, reporting progress over the bytes read. */
static lora_status hash_range(lora_ctx *ctx, int fd, const char *path, uint64_t start, uint64_t end, uint8_t *buf,
                              struct lora_sha256 *c) {
    uint64_t pos = start;
    while (pos < end) {
        size_t want = end - pos < HASH_CHUNK ? (size_t)(end - pos) : HASH_CHUNK;
        ssize_t r = pread(fd, buf, want, (off_t)pos);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return io_fail(ctx, errno, "read", path);
        if (r == 0) return lora_fail(ctx, LORA_E_IO, "%s: the file ended at byte %llu while hashing (it shrank)",
                                     path, (unsigned long long)pos);
        LORA_TRY(lora_sha256_update(c, buf, (size_t)r));
        pos += (uint64_t)r;
        LORA_TRY(lora_progress(ctx, LORA_PHASE_LOAD, (int64_t)(pos - start), (int64_t)(end - start), NAN));
    }
    return LORA_OK;
}

/* The data region of a safetensors file: after the 8-byte little-endian length N and the N
 * header bytes (kohya's addnet_hash_safetensors); the header must at least look like JSON. */
static lora_status addnet_start(lora_ctx *ctx, int fd, const char *path, uint64_t size, uint64_t *start) {
    uint8_t h[9];
    if (size < 8)
        return lora_fail(ctx, LORA_E_ST_HEADER_TOO_SMALL, "%s: %llu bytes, shorter than a safetensors header "
                         "length (8 bytes)", path, (unsigned long long)size);
    size_t got = 0;
    while (got < sizeof h && got < size) {
        ssize_t r = pread(fd, h + got, sizeof h - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return io_fail(ctx, errno, "read", path);
        if (r == 0) break;
        got += (size_t)r;
    }
    if (got < 8) return lora_fail(ctx, LORA_E_IO, "%s: could not read the safetensors header length", path);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)h[i] << (8 * i);
    if (n > size - 8)
        return lora_fail(ctx, LORA_E_ST_HEADER_LENGTH, "%s: safetensors header length %llu runs past the end of "
                         "the file (%llu bytes): not a safetensors file, or truncated", path, (unsigned long long)n,
                         (unsigned long long)size);
    if (n < 2 || got < 9 || h[8] != '{')
        return lora_fail(ctx, LORA_E_ST_HEADER_JSON, "%s: the %llu-byte header at offset 8 is not a JSON object: "
                         "not a safetensors file", path, (unsigned long long)n);
    *start = 8 + n;
    return LORA_OK;
}

static lora_status file_hash(lora_ctx *ctx, const char *path, int32_t kind, char *hex_out, size_t cap) {
    size_t need = kind == LORA_HASH_LEGACY ? 9 : 65;
    if (!path || !hex_out)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_file_hash: path and hex_out must not be NULL");
    if (kind != LORA_HASH_SHA256 && kind != LORA_HASH_ADDNET && kind != LORA_HASH_LEGACY)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_file_hash: unknown hash kind %d", (int)kind);
    if (cap < need)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "lora_file_hash: hex_out holds %zu bytes, this hash needs %zu",
                         cap, need);
    int fd = -1;
    uint64_t size = 0;
    LORA_TRY(io_open_read(ctx, path, &fd, &size));
    uint64_t start = 0, end = size;
    lora_status s = LORA_OK;
    if (kind == LORA_HASH_ADDNET) {
        s = addnet_start(ctx, fd, path, size, &start);
    } else if (kind == LORA_HASH_LEGACY) {
        /* file.seek(0x100000); read(0x10000): whatever part of the window exists */
        start = size < LEGACY_START ? size : LEGACY_START;
        end = size < LEGACY_START + LEGACY_LEN ? size : LEGACY_START + LEGACY_LEN;
    }
    uint8_t *buf = s == LORA_OK ? lora_malloc(ctx, HASH_CHUNK) : NULL;
    if (s == LORA_OK && !buf) s = LORA_E_NOMEM;
    struct lora_sha256 c = {0};
    if (s == LORA_OK) s = lora_sha256_init(ctx, &c);
    if (s == LORA_OK) s = hash_range(ctx, fd, path, start, end, buf, &c);
    close(fd);
    lora_free(ctx, buf);
    uint8_t d[32];
    if (s == LORA_OK) s = lora_sha256_final(&c, d);
    lora_sha256_discard(&c);
    if (s != LORA_OK) return s;
    char hex[65];
    md_hex(d, 32, hex);
    memcpy(hex_out, hex, need - 1);
    hex_out[need - 1] = '\0';
    return LORA_OK;
}

LORA_API lora_status lora_file_hash(lora_ctx *ctx, const char *path, int32_t kind, char *hex_out, size_t cap) {
    if (hex_out && cap) hex_out[0] = '\0';
    LORA_TRY(lora_enter(ctx));
    lora_status s = file_hash(ctx, path, kind, hex_out, cap);
    if (s != LORA_OK && hex_out && cap) hex_out[0] = '\0';
    lora_leave(ctx);
    return s;
}
