/* Writer for PyTorch zip checkpoints (spec/safety.md P14), shaped like torch 1.13's own
 * torch.save output so that torch.load (weights_only=True too) and restricted unpicklers such as
 * A1111's modules/safe.py read it:
 *
 *   archive/data.pkl     protocol-2 pickle: OrderedDict of _rebuild_tensor_v2(...) values, each
 *                        with persistent id ('storage', torch.<T>Storage, '<i>', 'cpu', numel),
 *                        optionally wrapped as {'state_dict': ..., 'epoch': 0, 'global_step': 0}
 *   archive/data/<i>     the bytes of tensor i, C order, little-endian
 *   archive/version      "3\n"
 *
 * Every record is STORED, its data starts at a multiple of 64 bytes (the local header's extra
 * field is padded with an "FB" field of 'Z' bytes, as torch's writer does), local headers carry
 * the CRC and sizes, and ZIP64 fields are used for records or offsets of 4 GiB and more; the
 * ZIP64 end record is always written, as torch does. No byteorder record: torch 1.13 does not
 * write one and older restricted unpicklers reject it. */
#include <stdio.h>
#include <string.h>

#include "core/checked.h"
#include "core/dtype.h"
#include "io/atomic_file.h"
#include "io/ckpt.h"
#include "core/utf8.h"

#define ALIGN 64
#define BATCH 1000   /* SETITEMS batch size, as Python's pickler */

struct pbuf {
    lora_ctx *ctx;
    uint8_t *p;
    size_t n, cap;
    int oom;
};

static void pb_put(struct pbuf *b, const void *d, size_t n) {
    if (b->oom) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        uint8_t *q = lora_malloc(b->ctx, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        if (b->n) memcpy(q, b->p, b->n);
        lora_free(b->ctx, b->p);
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void pb_byte(struct pbuf *b, uint8_t c) { pb_put(b, &c, 1); }

static void pb_le(struct pbuf *b, uint64_t v, int k) {
    uint8_t t[8];
    for (int i = 0; i < k; i++) t[i] = (uint8_t)(v >> (8 * i));
    pb_put(b, t, (size_t)k);
}

static void pb_int(struct pbuf *b, int64_t v) {
    if (v >= 0 && v < 256) {
        pb_byte(b, 'K');
        pb_byte(b, (uint8_t)v);
    } else if (v >= 0 && v < 65536) {
        pb_byte(b, 'M');
        pb_le(b, (uint64_t)v, 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        pb_byte(b, 'J');
        pb_le(b, (uint64_t)(uint32_t)(int32_t)v, 4);
    } else {   /* LONG1: shortest little-endian two's complement */
        uint64_t u = (uint64_t)v;
        int nb = 8;
        while (nb > 1) {
            uint8_t top = (uint8_t)(u >> (8 * (nb - 1))), next = (uint8_t)(u >> (8 * (nb - 2)));
            if ((top == 0x00 && !(next & 0x80)) || (top == 0xff && (next & 0x80))) nb--;
            else break;
        }
        pb_byte(b, 0x8a);
        pb_byte(b, (uint8_t)nb);
        pb_le(b, u, nb);
    }
}

static void pb_str(struct pbuf *b, const char *s) {
    size_t n = strlen(s);
    pb_byte(b, 'X');
    pb_le(b, n, 4);
    pb_put(b, s, n);
}

static void pb_put_memo(struct pbuf *b, uint32_t idx) {
    if (idx < 256) {
        pb_byte(b, 'q');
        pb_byte(b, (uint8_t)idx);
    } else {
        pb_byte(b, 'r');
        pb_le(b, idx, 4);
    }
}

static void pb_get_memo(struct pbuf *b, uint32_t idx) {
    if (idx < 256) {
        pb_byte(b, 'h');
        pb_byte(b, (uint8_t)idx);
    } else {
        pb_byte(b, 'j');
        pb_le(b, idx, 4);
    }
}

static void pb_int_tuple(struct pbuf *b, const int64_t *v, int n) {
    if (n == 0) {
        pb_byte(b, ')');
        return;
    }
    if (n > 3) pb_byte(b, '(');
    for (int i = 0; i < n; i++) pb_int(b, v[i]);
    pb_byte(b, n == 1 ? 0x85 : n == 2 ? 0x86 : n == 3 ? 0x87 : 't');
}

struct storage_name {
    lora_dtype dtype;
    const char *name;
};

static const struct storage_name storages[] = {
    {LORA_DTYPE_F32, "FloatStorage"}, {LORA_DTYPE_F16, "HalfStorage"},  {LORA_DTYPE_BF16, "BFloat16Storage"},
    {LORA_DTYPE_F64, "DoubleStorage"}, {LORA_DTYPE_I64, "LongStorage"}, {LORA_DTYPE_I32, "IntStorage"},
    {LORA_DTYPE_I16, "ShortStorage"}, {LORA_DTYPE_I8, "CharStorage"},   {LORA_DTYPE_U8, "ByteStorage"},
    {LORA_DTYPE_BOOL, "BoolStorage"},
};
#define N_STORAGES ((int)(sizeof storages / sizeof storages[0]))

static int storage_index(lora_dtype t) {
    for (int i = 0; i < N_STORAGES; i++)
        if (storages[i].dtype == t) return i;
    return -1;
}

/* Memo slots of values written once and fetched afterwards. */
struct memo {
    uint32_t next;
    int64_t odict, rebuild, storage_str, cpu, storage[N_STORAGES];
};

static void put_global(struct pbuf *b, struct memo *mm, int64_t *slot, const char *mod, const char *name) {
    if (*slot >= 0) {
        pb_get_memo(b, (uint32_t)*slot);
        return;
    }
    pb_byte(b, 'c');
    pb_put(b, mod, strlen(mod));
    pb_byte(b, '\n');
    pb_put(b, name, strlen(name));
    pb_byte(b, '\n');
    *slot = mm->next++;
    pb_put_memo(b, (uint32_t)*slot);
}

static void put_cached_str(struct pbuf *b, struct memo *mm, int64_t *slot, const char *s) {
    if (*slot >= 0) {
        pb_get_memo(b, (uint32_t)*slot);
        return;
    }
    pb_str(b, s);
    *slot = mm->next++;
    pb_put_memo(b, (uint32_t)*slot);
}

static void put_empty_odict(struct pbuf *b, struct memo *mm) {
    put_global(b, mm, &mm->odict, "collections", "OrderedDict");
    pb_byte(b, ')');
    pb_byte(b, 'R');
}

static void put_tensor(struct pbuf *b, struct memo *mm, const struct lora_tensor *t, int64_t key) {
    int si = storage_index(t->dtype);
    int64_t stride[TM_MAX_RANK], st = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {   /* torch's contiguous strides: empty dims count as 1 */
        stride[d] = st;
        st *= t->shape[d] > 1 ? t->shape[d] : 1;
    }
    char ks[24];
    snprintf(ks, sizeof ks, "%lld", (long long)key);
    put_global(b, mm, &mm->rebuild, "torch._utils", "_rebuild_tensor_v2");
    pb_byte(b, '(');
    pb_byte(b, '(');
    put_cached_str(b, mm, &mm->storage_str, "storage");
    put_global(b, mm, &mm->storage[si], "torch", storages[si].name);
    pb_str(b, ks);
    put_cached_str(b, mm, &mm->cpu, "cpu");
    pb_int(b, tmap_numel(t));
    pb_byte(b, 't');
    pb_byte(b, 'Q');
    pb_int(b, 0);                                /* storage_offset */
    pb_int_tuple(b, t->shape, t->ndim);
    pb_int_tuple(b, stride, t->ndim);
    pb_byte(b, 0x89);                            /* requires_grad False */
    put_empty_odict(b, mm);                      /* backward_hooks */
    pb_byte(b, 't');
    pb_byte(b, 'R');
}

static lora_status build_pickle(lora_ctx *ctx, const struct tensor_map *m, int wrap, struct pbuf *b) {
    struct memo mm;
    memset(&mm, 0xff, sizeof mm);
    mm.next = 0;
    memset(b, 0, sizeof *b);
    b->ctx = ctx;
    pb_byte(b, 0x80);
    pb_byte(b, 2);
    if (wrap) {
        pb_byte(b, '}');
        pb_put_memo(b, mm.next++);
        pb_byte(b, '(');
        pb_str(b, "state_dict");
    }
    put_empty_odict(b, &mm);
    pb_put_memo(b, mm.next++);
    for (int64_t i = 0; i < m->n; i += BATCH) {
        int64_t end = i + BATCH < m->n ? i + BATCH : m->n;
        if (end - i > 1) pb_byte(b, '(');
        for (int64_t k = i; k < end; k++) {
            pb_str(b, m->t[k].name);
            put_tensor(b, &mm, &m->t[k], k);
        }
        pb_byte(b, end - i > 1 ? 'u' : 's');
    }
    if (wrap) {
        pb_str(b, "epoch");
        pb_int(b, 0);
        pb_str(b, "global_step");
        pb_int(b, 0);
        pb_byte(b, 'u');
    }
    pb_byte(b, '.');
    if (b->oom) {
        lora_free(ctx, b->p);
        b->p = NULL;
        return LORA_E_NOMEM;
    }
    return LORA_OK;
}

/* ---- zip --------------------------------------------------------------------------------------- */
struct record {
    char name[48];
    const void *data;
    uint64_t size;
    uint32_t crc;
    uint64_t lho;
};

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }

#define DOS_DATE 0x0021   /* 1980-01-01; time 00:00 */
#define Z64 0xffffffffu

static lora_status write_record(struct atomic_file *af, struct record *r, uint64_t *pos) {
    uint8_t h[30 + 48 + 20 + 4 + ALIGN];
    size_t nl = strlen(r->name);
    int big = r->size >= Z64;
    r->lho = *pos;
    uint64_t start = *pos + 30 + nl + (big ? 20 : 0) + 4;
    size_t pad = (size_t)((ALIGN - start % ALIGN) % ALIGN);
    size_t xl = (big ? 20 : 0) + 4 + pad;
    memcpy(h, "PK\x03\x04", 4);
    put16(h + 4, big ? 45 : 20);
    put16(h + 6, 0);
    put16(h + 8, 0);
    put16(h + 10, 0);
    put16(h + 12, DOS_DATE);
    put32(h + 14, r->crc);
    put32(h + 18, big ? Z64 : (uint32_t)r->size);
    put32(h + 22, big ? Z64 : (uint32_t)r->size);
    put16(h + 26, (uint32_t)nl);
    put16(h + 28, (uint32_t)xl);
    memcpy(h + 30, r->name, nl);
    uint8_t *x = h + 30 + nl;
    if (big) {
        put16(x, 1);
        put16(x + 2, 16);
        put64(x + 4, r->size);
        put64(x + 12, r->size);
        x += 20;
    }
    put16(x, 0x4246);   /* "FB" */
    put16(x + 2, (uint32_t)pad);
    memset(x + 4, 'Z', pad);
    size_t hl = 30 + nl + xl;
    LORA_TRY(atomic_file_write(af, h, hl));
    if (r->size) LORA_TRY(atomic_file_write(af, r->data, (size_t)r->size));
    *pos += hl + r->size;
    return LORA_OK;
}

static size_t central_entry(const struct record *r, uint8_t *h) {
    size_t nl = strlen(r->name);
    int big_size = r->size >= Z64, big_off = r->lho >= Z64;
    size_t xl = (big_size || big_off) ? 4 + (big_size ? 16 : 0) + (big_off ? 8 : 0) : 0;
    memcpy(h, "PK\x01\x02", 4);
    put16(h + 4, 45);
    put16(h + 6, xl ? 45 : 20);
    put16(h + 8, 0);
    put16(h + 10, 0);
    put16(h + 12, 0);
    put16(h + 14, DOS_DATE);
    put32(h + 16, r->crc);
    put32(h + 20, big_size ? Z64 : (uint32_t)r->size);
    put32(h + 24, big_size ? Z64 : (uint32_t)r->size);
    put16(h + 28, (uint32_t)nl);
    put16(h + 30, (uint32_t)xl);
    put16(h + 32, 0);
    put16(h + 34, 0);
    put16(h + 36, 0);
    put32(h + 38, 0);
    put32(h + 42, big_off ? Z64 : (uint32_t)r->lho);
    memcpy(h + 46, r->name, nl);
    uint8_t *x = h + 46 + nl;
    if (xl) {
        put16(x, 1);
        put16(x + 2, (uint32_t)(xl - 4));
        x += 4;
        if (big_size) { put64(x, r->size); put64(x + 8, r->size); x += 16; }
        if (big_off) put64(x, r->lho);
    }
    return 46 + nl + xl;
}

/* ---- the streamed writer ------------------------------------------------------------------------ */

struct ckpt_stream {
    lora_ctx *ctx;
    struct atomic_file af;
    struct record *rec;      /* [0] data.pkl, [1..n] tensors, [n + 1] version */
    int64_t nrec, next;      /* next: the record the next ckpt_stream_tensor writes */
    uint64_t pos;
};

static lora_status check_map(lora_ctx *ctx, const char *path, const struct tensor_map *m) {
    const uint16_t one = 1;
    uint8_t lsb;
    memcpy(&lsb, &one, 1);
    if (lsb != 1)   /* the records hold the host's bytes; torch files are little-endian */
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: writing torch checkpoints needs a little-endian host", path);
    for (int64_t i = 0; i < m->n; i++) {
        const struct lora_tensor *t = &m->t[i];
        size_t bad = 0;
        if (storage_index(t->dtype) < 0)
            return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: tensor \"%s\": dtype %s cannot be saved in a .ckpt that torch "
                             "1.13 reads (it has no storage type for it); save as safetensors", path, t->name,
                             lora_dtype_name(t->dtype) ? lora_dtype_name(t->dtype) : "?");
        if (!utf8_valid((const uint8_t *)t->name, strlen(t->name), &bad))
            return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor name is not valid UTF-8 at byte %zu", path, bad);
        if (strlen(t->name) > UINT32_MAX) return lora_fail(ctx, LORA_E_LIMIT, "%s: tensor name too long", path);
        uint64_t want;
        if (!ck_mul_u64((uint64_t)tmap_numel(t), (uint64_t)(lora_dtype_bits(t->dtype) / 8), &want) || want != t->nbytes)
            return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor \"%s\": %llu bytes for its shape's %llu", path, t->name,
                             (unsigned long long)t->nbytes, (unsigned long long)want);
    }
    return LORA_OK;
}

void ckpt_stream_abort(struct ckpt_stream *cs) {
    if (!cs) return;
    if (cs->af.ctx) atomic_file_abort(&cs->af);
    lora_free(cs->ctx, cs->rec);
    lora_free(cs->ctx, cs);
}

lora_status ckpt_stream_begin(lora_ctx *ctx, const char *path, const struct tensor_map *m, int wrap_state_dict,
                              struct ckpt_stream **out) {
    *out = NULL;
    if (!path || !m) return lora_fail(ctx, LORA_E_INVALID_ARG, "ckpt_write: NULL argument");
    LORA_TRY(check_map(ctx, path, m));
    struct ckpt_stream *cs = lora_calloc(ctx, 1, sizeof *cs);
    if (!cs) return LORA_E_NOMEM;
    cs->ctx = ctx;
    cs->nrec = m->n + 2;
    if (!(cs->rec = lora_calloc(ctx, (size_t)cs->nrec, sizeof *cs->rec))) {
        lora_free(ctx, cs);
        return LORA_E_NOMEM;
    }
    snprintf(cs->rec[0].name, sizeof cs->rec[0].name, "archive/data.pkl");
    for (int64_t i = 0; i < m->n; i++) {
        snprintf(cs->rec[i + 1].name, sizeof cs->rec[i + 1].name, "archive/data/%lld", (long long)i);
        cs->rec[i + 1].size = m->t[i].nbytes;   /* what ckpt_stream_tensor must be given */
    }
    snprintf(cs->rec[cs->nrec - 1].name, sizeof cs->rec[cs->nrec - 1].name, "archive/version");
    struct pbuf pk;
    lora_status s = build_pickle(ctx, m, wrap_state_dict, &pk);
    if (s) {
        ckpt_stream_abort(cs);
        return s;
    }
    s = atomic_file_begin(ctx, path, &cs->af);
    if (s) {
        cs->af.ctx = NULL;   /* nothing to abort: begin cleaned up */
        lora_free(ctx, pk.p);
        ckpt_stream_abort(cs);
        return s;
    }
    cs->rec[0].data = pk.p;
    cs->rec[0].size = pk.n;
    cs->rec[0].crc = ckpt_crc32(0, pk.p, pk.n);
    s = write_record(&cs->af, &cs->rec[0], &cs->pos);
    cs->rec[0].data = NULL;
    lora_free(ctx, pk.p);
    if (s) {
        ckpt_stream_abort(cs);
        return s;
    }
    cs->next = 1;
    *out = cs;
    return LORA_OK;
}

lora_status ckpt_stream_tensor(struct ckpt_stream *cs, const void *data, uint64_t nbytes) {
    lora_ctx *ctx = cs->ctx;
    if (cs->next < 1 || cs->next >= cs->nrec - 1)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: more tensors than planned (%lld)", cs->af.path,
                         (long long)(cs->nrec - 2));
    struct record *r = &cs->rec[cs->next];
    if (nbytes != r->size || (nbytes && !data))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: record %s: %llu bytes given, %llu planned", cs->af.path, r->name,
                         (unsigned long long)nbytes, (unsigned long long)r->size);
    /* the CRC goes in the local header, before the data: one pass over the bytes first */
    r->crc = nbytes ? ckpt_crc32(0, data, (size_t)nbytes) : 0;
    r->data = data;
    lora_status s = write_record(&cs->af, r, &cs->pos);
    r->data = NULL;
    if (s) return s;
    if ((cs->next++ & 63) == 63) LORA_TRY(lora_check_cancel(ctx));
    return LORA_OK;
}

lora_status ckpt_stream_finish(struct ckpt_stream *cs) {
    lora_ctx *ctx = cs->ctx;
    int64_t nrec = cs->nrec;
    lora_status s = LORA_OK;
    if (cs->next != nrec - 1)
        s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: %lld of %lld tensors written", cs->af.path, (long long)(cs->next - 1),
                      (long long)(nrec - 2));
    struct record *v = &cs->rec[nrec - 1];
    v->data = "3\n";
    v->size = 2;
    v->crc = ckpt_crc32(0, v->data, 2);
    if (!s) s = write_record(&cs->af, v, &cs->pos);
    /* central directory: at most 46 + 48 + 28 bytes per entry */
    uint8_t *cd = NULL;
    size_t cd_cap;
    if (!s && !ck_mul_size((size_t)nrec, 46 + 48 + 28, &cd_cap)) s = LORA_E_NOMEM;
    else if (!s && !(cd = lora_malloc(ctx, cd_cap + 56 + 20 + 22))) s = LORA_E_NOMEM;
    if (!s) {
        const struct record *rec = cs->rec;
        uint64_t pos = cs->pos;
        size_t cn = 0;
        for (int64_t i = 0; i < nrec; i++) cn += central_entry(&rec[i], cd + cn);
        uint64_t cd_off = pos, cd_size = cn, z64 = pos + cn;
        uint8_t *e = cd + cn;
        memcpy(e, "PK\x06\x06", 4);            /* ZIP64 end of central directory */
        put64(e + 4, 44);
        put16(e + 12, 45);
        put16(e + 14, 45);
        put32(e + 16, 0);
        put32(e + 20, 0);
        put64(e + 24, (uint64_t)nrec);
        put64(e + 32, (uint64_t)nrec);
        put64(e + 40, cd_size);
        put64(e + 48, cd_off);
        e += 56;
        memcpy(e, "PK\x06\x07", 4);            /* ZIP64 locator */
        put32(e + 4, 0);
        put64(e + 8, z64);
        put32(e + 16, 1);
        e += 20;
        memcpy(e, "PK\x05\x06", 4);            /* end of central directory */
        put16(e + 4, 0);
        put16(e + 6, 0);
        put16(e + 8, nrec >= 0xffff ? 0xffff : (uint32_t)nrec);
        put16(e + 10, nrec >= 0xffff ? 0xffff : (uint32_t)nrec);
        put32(e + 12, cd_size >= Z64 ? Z64 : (uint32_t)cd_size);
        put32(e + 16, cd_off >= Z64 ? Z64 : (uint32_t)cd_off);
        put16(e + 20, 0);
        e += 22;
        s = atomic_file_write(&cs->af, cd, (size_t)(e - cd));
    }
    lora_free(ctx, cd);
    if (!s) {
        s = atomic_file_commit(&cs->af);   /* cleans up on failure too */
        cs->af.ctx = NULL;
    }
    ckpt_stream_abort(cs);                  /* frees; removes the temp file when it is still there */
    return s;
}

lora_status ckpt_write(lora_ctx *ctx, const char *path, const struct tensor_map *m, int wrap_state_dict) {
    if (!path || !m) return lora_fail(ctx, LORA_E_INVALID_ARG, "ckpt_write: NULL argument");
    for (int64_t i = 0; i < m->n; i++)
        if (m->t[i].nbytes && !m->t[i].data)
            return lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor \"%s\" has no data", path, m->t[i].name);
    struct ckpt_stream *cs = NULL;
    LORA_TRY(ckpt_stream_begin(ctx, path, m, wrap_state_dict, &cs));
    for (int64_t i = 0; i < m->n; i++) {
        lora_status s = ckpt_stream_tensor(cs, m->t[i].data, m->t[i].nbytes);
        if (s) {
            ckpt_stream_abort(cs);
            return s;
        }
    }
    return ckpt_stream_finish(cs);
}
