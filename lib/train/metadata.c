/* Saved-LoRA metadata and hashes (spec/kohya-lora.md §9): see metadata.h. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "train/metadata.h"

/* ---- hex ---- */

void md_hex(const uint8_t *d, size_t n, char *out) {
    static const char hx[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hx[d[i] >> 4];
        out[2 * i + 1] = hx[d[i] & 15];
    }
    out[2 * n] = 0;
}

/* ---- Python float repr ---- */

void md_py_float(double v, char out[32]) {
    if (isnan(v)) { strcpy(out, "nan"); return; }
    if (isinf(v)) { strcpy(out, v > 0 ? "inf" : "-inf"); return; }
    if (v == 0) { strcpy(out, signbit(v) ? "-0.0" : "0.0"); return; }
    /* shortest round-tripping digits, taken from %.*e */
    char e[40];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(e, sizeof e, "%.*e", p - 1, v);
        if (strtod(e, NULL) == v) break;
    }
    /* e = "[-]d.ddde[+-]XX": digits and decimal exponent */
    char digits[24];
    int nd = 0, neg = e[0] == '-';
    const char *q = e + neg;
    for (; *q && *q != 'e'; q++)
        if (*q >= '0' && *q <= '9') digits[nd++] = *q;
    digits[nd] = 0;
    int exp10 = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0') digits[--nd] = 0;
    char *o = out;
    if (neg) *o++ = '-';
    if (exp10 < -4 || exp10 >= 16) {
        *o++ = digits[0];
        if (nd > 1) {
            *o++ = '.';
            memcpy(o, digits + 1, (size_t)nd - 1);
            o += nd - 1;
        }
        sprintf(o, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
        return;
    }
    if (exp10 < 0) {
        *o++ = '0', *o++ = '.';
        for (int i = 0; i < -exp10 - 1; i++) *o++ = '0';
        memcpy(o, digits, (size_t)nd);
        o += nd;
    } else {
        for (int i = 0; i <= exp10; i++) *o++ = i < nd ? digits[i] : '0';
        *o++ = '.';
        if (nd > exp10 + 1) {
            memcpy(o, digits + exp10 + 1, (size_t)(nd - exp10 - 1));
            o += nd - exp10 - 1;
        } else {
            *o++ = '0';
        }
    }
    *o = 0;
}

/* ---- key/value list ---- */

void md_init(struct md_list *l, lora_ctx *ctx) {
    memset(l, 0, sizeof *l);
    l->ctx = ctx;
}

void md_free(struct md_list *l) {
    for (int64_t i = 0; i < l->n; i++) {
        lora_free(l->ctx, l->k[i]);
        lora_free(l->ctx, l->v[i]);
    }
    lora_free(l->ctx, l->k);
    lora_free(l->ctx, l->v);
    lora_ctx *ctx = l->ctx;
    memset(l, 0, sizeof *l);
    l->ctx = ctx;
}

const char *md_get(const struct md_list *l, const char *key) {
    for (int64_t i = 0; i < l->n; i++)
        if (strcmp(l->k[i], key) == 0) return l->v[i];
    return NULL;
}

lora_status md_set(struct md_list *l, const char *key, const char *value) {
    char *v = lora_strdup(l->ctx, value ? value : "None");
    if (!v) return LORA_E_NOMEM;
    for (int64_t i = 0; i < l->n; i++)
        if (strcmp(l->k[i], key) == 0) {
            lora_free(l->ctx, l->v[i]);
            l->v[i] = v;
            return LORA_OK;
        }
    if (l->n == l->cap) {
        int64_t cap = l->cap ? 2 * l->cap : 64;
        char **k = lora_malloc(l->ctx, (size_t)cap * sizeof *k), **vv = lora_malloc(l->ctx, (size_t)cap * sizeof *vv);
        if (!k || !vv) {
            lora_free(l->ctx, k);
            lora_free(l->ctx, vv);
            lora_free(l->ctx, v);
            return LORA_E_NOMEM;
        }
        if (l->n) {
            memcpy(k, l->k, (size_t)l->n * sizeof *k);
            memcpy(vv, l->v, (size_t)l->n * sizeof *vv);
        }
        lora_free(l->ctx, l->k);
        lora_free(l->ctx, l->v);
        l->k = k, l->v = vv, l->cap = cap;
    }
    char *k = lora_strdup(l->ctx, key);
    if (!k) {
        lora_free(l->ctx, v);
        return LORA_E_NOMEM;
    }
    l->k[l->n] = k;
    l->v[l->n] = v;
    l->n++;
    return LORA_OK;
}

lora_status md_setf(struct md_list *l, const char *key, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return md_set(l, key, buf);
}

lora_status md_set_float(struct md_list *l, const char *key, double v) {
    char b[32];
    md_py_float(v, b);
    return md_set(l, key, b);
}

/* ---- hashes ---- */

lora_status md_safetensors_hashes(lora_ctx *ctx, const uint8_t *file, uint64_t size, char model_hash[65],
                                  char legacy_hash[9]) {
    uint8_t d[32];
    model_hash[0] = legacy_hash[0] = 0;
    uint64_t n = 0;
    for (int i = 0; i < 8 && (uint64_t)i < size; i++) n |= (uint64_t)file[i] << (8 * i);
    uint64_t start = size >= 8 && n <= size - 8 ? 8 + n : size;
    /* no pointer arithmetic on the NULL an empty file maps to */
    LORA_TRY(lora_sha256(ctx, size ? file + start : file, (size_t)(size - start), d));
    char full[65];
    md_hex(d, 32, full);
    uint64_t a = size < 0x100000 ? size : 0x100000, e = size < 0x110000 ? size : 0x110000;
    LORA_TRY(lora_sha256(ctx, size ? file + a : file, (size_t)(e - a), d));
    memcpy(model_hash, full, 65);
    md_hex(d, 32, full);
    memcpy(legacy_hash, full, 8);
    legacy_hash[8] = 0;
    return LORA_OK;
}

lora_status md_file_hashes(lora_ctx *ctx, const char *path, int *is_file, char legacy[9], char full[65]) {
    struct stat sb;
    *is_file = 0;
    legacy[0] = full[0] = 0;
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) return LORA_OK;
    int fd = -1;
    uint64_t size = 0;
    LORA_TRY(io_open_read(ctx, path, &fd, &size));
    struct lora_sha256 all = {0}, leg = {0};
    size_t cap = 1 << 20;
    uint8_t *buf = lora_malloc(ctx, cap);
    lora_status s = buf ? LORA_OK : LORA_E_NOMEM;
    if (s == LORA_OK) s = lora_sha256_init(ctx, &all);
    if (s == LORA_OK) s = lora_sha256_init(ctx, &leg);
    uint64_t pos = 0;
    while (s == LORA_OK) {
        ssize_t r = read(fd, buf, cap);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { s = io_fail(ctx, errno, "read", path); break; }
        if (r == 0) break;
        if ((s = lora_sha256_update(&all, buf, (size_t)r)) != LORA_OK) break;
        /* the part of [0x100000, 0x110000) inside this chunk */
        uint64_t a = pos > 0x100000 ? pos : 0x100000, b = pos + (uint64_t)r < 0x110000 ? pos + (uint64_t)r : 0x110000;
        if (a < b && (s = lora_sha256_update(&leg, buf + (a - pos), (size_t)(b - a))) != LORA_OK) break;
        pos += (uint64_t)r;
        if ((s = lora_check_cancel(ctx)) != LORA_OK) break;
    }
    close(fd);
    lora_free(ctx, buf);
    uint8_t d[32], dl[32];
    if (s == LORA_OK) s = lora_sha256_final(&all, d);
    if (s == LORA_OK) s = lora_sha256_final(&leg, dl);
    lora_sha256_discard(&all);
    lora_sha256_discard(&leg);
    if (s != LORA_OK) return s;
    char hx[65];
    md_hex(d, 32, full);
    md_hex(dl, 32, hx);
    memcpy(legacy, hx, 8);
    legacy[8] = 0;
    *is_file = 1;
    return LORA_OK;
}

/* ---- the save ---- */

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* net_save of a view of `net` carrying the metadata (keys, vals) instead of its own. */
static lora_status save_view(const struct lora_network *net, const char *path, char **keys, char **vals, int64_t n,
                             lora_dtype dtype) {
    lora_ctx *ctx = net->ctx;
    struct lora_network view = *net;
    view.n_meta = n;
    view.meta_keys = keys;
    view.meta_vals = vals;
    /* the modules with their save dtype (net_save writes each module in its dtype) */
    struct net_module *mods = lora_malloc(ctx, (size_t)(net->n ? net->n : 1) * sizeof *mods);
    if (!mods) return LORA_E_NOMEM;
    for (int64_t i = 0; i < net->n; i++) {
        mods[i] = net->m[i];
        if (dtype) {
            mods[i].dtype = dtype;
            mods[i].alpha_dtype = dtype;
            mods[i].has_alpha = 1;
        }
    }
    view.m = mods;
    lora_status s = net_save(&view, path, NULL);
    lora_free(ctx, mods);
    return s;
}

lora_status md_save_network(const struct lora_network *net, const char *path, const struct md_list *meta,
                            lora_dtype dtype) {
    lora_ctx *ctx = net->ctx;
    if (!ends_with(path, ".safetensors")) return save_view(net, path, NULL, NULL, 0, dtype);
    int64_t nm = meta ? meta->n : 0;
    char **k = lora_calloc(ctx, (size_t)nm + 2, sizeof *k), **v = lora_calloc(ctx, (size_t)nm + 2, sizeof *v);
    size_t pl = strlen(path);
    char *tmp = lora_malloc(ctx, pl + 64);
    if (!k || !v || !tmp) {
        lora_free(ctx, k);
        lora_free(ctx, v);
        lora_free(ctx, tmp);
        return LORA_E_NOMEM;
    }
    /* 1. only the ss_* keys, to a sibling temp file (the hash input kohya builds in memory) */
    int64_t c = 0;
    for (int64_t i = 0; i < nm; i++)
        if (strncmp(meta->k[i], "ss_", 3) == 0 && strncmp(meta->k[i], "sshs_", 5) != 0) {
            k[c] = meta->k[i];
            v[c] = meta->v[i];
            c++;
        }
    const char *slash = strrchr(path, '/');
    size_t dl = slash ? (size_t)(slash - path + 1) : 0;
    /* pid and the network's address: distinct for concurrent saves in other processes/contexts */
    snprintf(tmp, pl + 64, "%.*s.%s.sshs-%ld-%lx.safetensors", (int)dl, path, path + dl, (long)getpid(),
             (unsigned long)(uintptr_t)net);
    lora_status s = save_view(net, tmp, k, v, c, dtype);
    char model_hash[65] = "", legacy[9] = "";
    if (s == LORA_OK) {
        int fd = -1;
        uint64_t size = 0;
        s = io_open_read(ctx, tmp, &fd, &size);
        if (s == LORA_OK) {
            void *map = size ? mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
            if (size && map == MAP_FAILED) s = io_fail(ctx, errno, "mmap", tmp);
            else s = md_safetensors_hashes(ctx, map, size, model_hash, legacy);
            if (size && map != MAP_FAILED) munmap(map, (size_t)size);
            close(fd);
        }
        unlink(tmp);
    }
    /* 2. the file: every key (sshs_* replaced by the new values) */
    if (s == LORA_OK) {
        c = 0;
        for (int64_t i = 0; i < nm; i++)
            if (strncmp(meta->k[i], "sshs_", 5) != 0) {
                k[c] = meta->k[i];
                v[c] = meta->v[i];
                c++;
            }
        k[c] = (char *)"sshs_model_hash", v[c] = model_hash, c++;
        k[c] = (char *)"sshs_legacy_hash", v[c] = legacy, c++;
        s = save_view(net, path, k, v, c, dtype);
    }
    lora_free(ctx, k);
    lora_free(ctx, v);
    lora_free(ctx, tmp);
    return s;
}
