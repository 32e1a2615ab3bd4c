/* safetensors reader and writer. The header is parsed with jansson (strict JSON, duplicate
 * keys rejected at every level); every size and offset is checked with overflow-checked
 * arithmetic before any byte of tensor data is touched. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "core/dtype.h"
#include "core/utf8.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"

/* ---- dtype table: every dtype the reference accepts, in the reference's enum order (which
 * is increasing alignment; the writer sorts by it, descending). ---------------------------- */
struct st_dtype {
    const char *name;
    int bits;
    lora_dtype type;
};

static const struct st_dtype st_dtypes[] = {
    {"BOOL", 8, LORA_DTYPE_BOOL},       {"F4", 4, LORA_DTYPE_OTHER},
    {"F6_E2M3", 6, LORA_DTYPE_OTHER},   {"F6_E3M2", 6, LORA_DTYPE_OTHER},
    {"U8", 8, LORA_DTYPE_U8},           {"I8", 8, LORA_DTYPE_I8},
    {"F8_E5M2", 8, LORA_DTYPE_F8_E5M2}, {"F8_E4M3", 8, LORA_DTYPE_F8_E4M3},
    {"F8_E8M0", 8, LORA_DTYPE_OTHER},   {"F8_E4M3FNUZ", 8, LORA_DTYPE_OTHER},
    {"F8_E5M2FNUZ", 8, LORA_DTYPE_OTHER},
    {"I16", 16, LORA_DTYPE_I16},        {"U16", 16, LORA_DTYPE_U16},
    {"F16", 16, LORA_DTYPE_F16},        {"BF16", 16, LORA_DTYPE_BF16},
    {"I32", 32, LORA_DTYPE_I32},        {"U32", 32, LORA_DTYPE_U32},
    {"F32", 32, LORA_DTYPE_F32},        {"C64", 64, LORA_DTYPE_OTHER},
    {"F64", 64, LORA_DTYPE_F64},        {"I64", 64, LORA_DTYPE_I64},
    {"U64", 64, LORA_DTYPE_U64},
};
#define N_ST_DTYPES ((int)(sizeof st_dtypes / sizeof st_dtypes[0]))

static int st_dtype_index_by_name(const char *s) {
    for (int i = 0; i < N_ST_DTYPES; i++)
        if (strcmp(st_dtypes[i].name, s) == 0) return i;
    return -1;
}

static int st_dtype_index_by_type(lora_dtype t) {
    if (t == LORA_DTYPE_OTHER) return -1;
    for (int i = 0; i < N_ST_DTYPES; i++)
        if (st_dtypes[i].type == t) return i;
    return -1;
}


/* ---- file kind sniffing: used when the 8-byte length is impossible, or when a plausible
 * length is followed by a header that is not UTF-8 JSON ---------------------------------- */
static const char *sniff_not_a_model(const uint8_t *b, uint64_t n) {
    if (n >= 7 && memcmp(b, "version", 7) == 0) return "a Git LFS pointer, not the model: download the real file (git lfs pull)";
    if (n >= 3 && b[0] == 0x1f && b[1] == 0x8b && b[2] == 8) return "a gzip file";
    if (n >= 6 && memcmp(b, "7z\xbc\xaf\x27\x1c", 6) == 0) return "a 7z archive";
    if (n >= 4 && memcmp(b, "PK\x03\x04", 4) == 0) return "a zip archive (a PyTorch .ckpt/.pt?), not safetensors";
    if (n >= 5 && memcmp(b, "%PDF-", 5) == 0) return "a PDF document";
    for (uint64_t i = 0; i < n && i < 64; i++) {
        if (b[i] == '<') {
            if (n - i >= 5 && (strncasecmp((const char *)b + i, "<html", 5) == 0 ||
                               strncasecmp((const char *)b + i, "<!doc", 5) == 0))
                return "an HTML page (a login or error page saved instead of the model?)";
            break;
        }
        if (b[i] != ' ' && b[i] != '\t' && b[i] != '\r' && b[i] != '\n' && b[i] != 0xef && b[i] != 0xbb && b[i] != 0xbf) break;
    }
    return NULL;
}

/* ---- parse ------------------------------------------------------------------------------ */
void st_close(struct lora_file *f) {
    if (!f) return;
    lora_ctx *ctx = f->ctx;
    for (int64_t i = 0; i < f->n_tensors; i++) lora_free(ctx, f->tensors[i].name);
    lora_free(ctx, f->tensors);
    for (int64_t i = 0; i < f->n_meta; i++) {
        lora_free(ctx, f->meta_keys[i]);
        lora_free(ctx, f->meta_vals[i]);
    }
    lora_free(ctx, f->meta_keys);
    lora_free(ctx, f->meta_vals);
    if (f->mapped && f->size > 0) munmap((void *)f->base, (size_t)f->size);
    lora_free(ctx, f->path);
    lora_free(ctx, f);
}

static int cmp_offsets(const void *a, const void *b) {
    const struct st_tensor *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Reads a JSON array of non-negative integers into out[0..n). */
static int json_uint_array(json_t *arr, uint64_t *out, size_t cap, size_t *n) {
    if (!json_is_array(arr)) return 0;
    size_t len = json_array_size(arr);
    if (len > cap) return -1;
    for (size_t i = 0; i < len; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
        out[i] = (uint64_t)json_integer_value(v);
    }
    *n = len;
    return 1;
}

static lora_status parse_metadata(lora_ctx *ctx, const char *label, json_t *meta, struct lora_file *f) {
    if (!json_is_object(meta))
        return lora_fail(ctx, LORA_E_ST_METADATA_TYPE, "%s: __metadata__ is not an object", label);
    size_t n = json_object_size(meta);
    f->meta_keys = lora_calloc(ctx, n ? n : 1, sizeof(char *));
    f->meta_vals = lora_calloc(ctx, n ? n : 1, sizeof(char *));
    if (!f->meta_keys || !f->meta_vals) return LORA_E_NOMEM;
    const char *key;
    json_t *val;
    json_object_foreach(meta, key, val) {
        if (!json_is_string(val))
            return lora_fail(ctx, LORA_E_ST_METADATA_TYPE,
                             "%s: __metadata__ value of \"%s\" is not a string (all metadata values must be strings)",
                             label, key);
        int64_t i = f->n_meta;
        f->meta_keys[i] = lora_strdup(ctx, key);
        f->meta_vals[i] = lora_strdup(ctx, json_string_value(val));
        if (!f->meta_keys[i] || !f->meta_vals[i]) {
            f->n_meta++;
            return LORA_E_NOMEM;
        }
        f->n_meta++;
    }
    return LORA_OK;
}

static lora_status parse_tensor(lora_ctx *ctx, const char *label, const char *name, json_t *info,
                                struct st_tensor *t) {
    if (strlen(name) > ST_MAX_NAME)
        return lora_fail(ctx, LORA_E_LIMIT, "%s: tensor name of %zu bytes exceeds %d", label, strlen(name), ST_MAX_NAME);
    if (!json_is_object(info))
        return lora_fail(ctx, LORA_E_ST_HEADER_JSON, "%s: tensor \"%s\": entry is not an object", label, name);
    json_t *dt = json_object_get(info, "dtype");
    json_t *shape = json_object_get(info, "shape");
    json_t *offs = json_object_get(info, "data_offsets");
    if (!dt || !shape || !offs)
        return lora_fail(ctx, LORA_E_ST_HEADER_JSON, "%s: tensor \"%s\": missing %s", label, name,
                         !dt ? "\"dtype\"" : !shape ? "\"shape\"" : "\"data_offsets\"");
    /* Unknown fields are ignored, as the reference reader does. */
    int di = json_is_string(dt) ? st_dtype_index_by_name(json_string_value(dt)) : -1;
    if (di < 0)
        return lora_fail(ctx, LORA_E_ST_DTYPE, "%s: tensor \"%s\": unknown dtype %s%s%s", label, name,
                         json_is_string(dt) ? "\"" : "", json_is_string(dt) ? json_string_value(dt) : "(not a string)",
                         json_is_string(dt) ? "\"" : "");
    uint64_t dims[ST_MAX_RANK], off[2];
    size_t nd = 0, no = 0;
    int r = json_uint_array(shape, dims, ST_MAX_RANK, &nd);
    if (r < 0)
        return lora_fail(ctx, LORA_E_LIMIT, "%s: tensor \"%s\": rank %zu exceeds %d", label, name,
                         json_array_size(shape), ST_MAX_RANK);
    if (r == 0)
        return lora_fail(ctx, LORA_E_ST_HEADER_JSON, "%s: tensor \"%s\": shape must be an array of non-negative integers",
                         label, name);
    if (json_uint_array(offs, off, 2, &no) != 1 || no != 2)
        return lora_fail(ctx, LORA_E_ST_HEADER_JSON,
                         "%s: tensor \"%s\": data_offsets must be two non-negative integers", label, name);
    t->name = lora_strdup(ctx, name);
    if (!t->name) return LORA_E_NOMEM;
    t->dtype = st_dtypes[di].type;
    t->dtype_name = st_dtypes[di].name;
    t->bits = st_dtypes[di].bits;
    t->ndim = (int32_t)nd;
    for (size_t i = 0; i < nd; i++) t->shape[i] = (int64_t)dims[i];   /* <= INT64_MAX: jansson ints */
    t->begin = off[0];
    t->end = off[1];
    return LORA_OK;
}

static lora_status validate_layout(lora_ctx *ctx, const char *label, struct lora_file *f) {
    qsort(f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, cmp_offsets);
    uint64_t pos = 0;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        struct st_tensor *t = &f->tensors[i];
        if (t->begin != pos || t->end < t->begin)
            return lora_fail(ctx, LORA_E_ST_OFFSETS,
                             "%s: tensor \"%s\": data_offsets [%llu, %llu] do not start at byte %llu of the data "
                             "(tensors must tile the data with no gap or overlap)",
                             label, t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                             (unsigned long long)pos);
        uint64_t nel = 1, nbits;
        for (int d = 0; d < t->ndim; d++)
            if (!ck_mul_u64(nel, (uint64_t)t->shape[d], &nel))
                return lora_fail(ctx, LORA_E_ST_SHAPE_OVERFLOW, "%s: tensor \"%s\": element count overflows 64 bits",
                                 label, t->name);
        if (!ck_mul_u64(nel, (uint64_t)t->bits, &nbits))
            return lora_fail(ctx, LORA_E_ST_SHAPE_OVERFLOW, "%s: tensor \"%s\": size in bits overflows 64 bits",
                             label, t->name);
        if (nbits % 8 != 0)
            return lora_fail(ctx, LORA_E_ST_SUBBYTE, "%s: tensor \"%s\": %llu elements of %s do not fill whole bytes",
                             label, t->name, (unsigned long long)nel, t->dtype_name);
        if (t->end - t->begin != nbits / 8)
            return lora_fail(ctx, LORA_E_ST_SIZE_MISMATCH,
                             "%s: tensor \"%s\": data_offsets [%llu, %llu] span %llu bytes, but its shape and %s need %llu",
                             label, t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                             (unsigned long long)(t->end - t->begin), t->dtype_name, (unsigned long long)(nbits / 8));
        pos = t->end;
    }
    uint64_t data_len = f->size - f->data_start;
    if (pos != data_len)
        return lora_fail(ctx, LORA_E_ST_INCOMPLETE,
                         "%s: tensor data ends at byte %llu of the data but the file holds %llu data bytes "
                         "(truncated, or extra bytes appended)",
                         label, (unsigned long long)pos, (unsigned long long)data_len);
    return LORA_OK;
}

static lora_status parse_header_json(lora_ctx *ctx, const char *label, const uint8_t *hdr, uint64_t n,
                                     struct lora_file *f) {
    size_t bad = 0;
    if (!utf8_valid(hdr, (size_t)n, &bad))
        return lora_fail(ctx, LORA_E_ST_HEADER_UTF8, "%s: header byte %llu (file offset %llu) is not valid UTF-8",
                         label, (unsigned long long)bad, (unsigned long long)(bad + 8));
    json_error_t jerr;
    json_t *root = json_loadb((const char *)hdr, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        enum json_error_code code = json_error_code(&jerr);
        lora_status s = LORA_E_ST_HEADER_JSON;
        if (code == json_error_duplicate_key) s = LORA_E_ST_DUPLICATE_KEY;
        else if (code == json_error_numeric_overflow) s = LORA_E_ST_SHAPE_OVERFLOW;
        else if (code == json_error_out_of_memory) s = LORA_E_NOMEM;
        return lora_fail(ctx, s, "%s: header JSON at file offset %llu: %s", label,
                         (unsigned long long)(jerr.position + 8), jerr.text);
    }
    lora_status s = LORA_OK;
    if (!json_is_object(root)) {
        s = lora_fail(ctx, LORA_E_ST_HEADER_JSON, "%s: header is not a JSON object", label);
        goto out;
    }
    size_t count = json_object_size(root);
    json_t *meta = json_object_get(root, "__metadata__");
    size_t n_tensors = count - (meta ? 1 : 0);
    if (n_tensors > ST_MAX_TENSORS) {
        s = lora_fail(ctx, LORA_E_LIMIT, "%s: %zu tensors exceed the limit of %d", label, n_tensors, ST_MAX_TENSORS);
        goto out;
    }
    if (meta && (s = parse_metadata(ctx, label, meta, f)) != LORA_OK) goto out;
    f->tensors = lora_calloc(ctx, n_tensors ? n_tensors : 1, sizeof *f->tensors);
    if (!f->tensors) {
        s = LORA_E_NOMEM;
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) continue;
        s = parse_tensor(ctx, label, key, val, &f->tensors[f->n_tensors]);
        if (f->tensors[f->n_tensors].name) f->n_tensors++;
        if (s != LORA_OK) goto out;
    }
out:
    json_decref(root);
    return s;
}

lora_status st_parse(lora_ctx *ctx, const char *label, const uint8_t *buf, uint64_t len, struct lora_file **out) {
    *out = NULL;
    if (len < 8)
        return lora_fail(ctx, LORA_E_ST_HEADER_TOO_SMALL, "%s: %llu bytes, fewer than the 8-byte header length%s",
                         label, (unsigned long long)len, len == 0 ? " (the file is empty)" : "");
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | buf[i];
    uint64_t end;
    int too_large = n > ST_MAX_HEADER;
    int too_long = !ck_add_u64(n, 8, &end) || end > len;
    if (too_large || too_long) {
        const char *kind = sniff_not_a_model(buf, len);
        if (kind) return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: not a safetensors file: it is %s", label, kind);
        if (too_large)
            return lora_fail(ctx, LORA_E_ST_HEADER_TOO_LARGE, "%s: header length %llu exceeds %u bytes", label,
                             (unsigned long long)n, ST_MAX_HEADER);
        return lora_fail(ctx, LORA_E_ST_HEADER_LENGTH, "%s: header length %llu runs past the end of the %llu-byte file",
                         label, (unsigned long long)n, (unsigned long long)len);
    }
    struct lora_file *f = lora_calloc(ctx, 1, sizeof *f);
    if (!f) return LORA_E_NOMEM;
    f->ctx = ctx;
    f->base = buf;
    f->size = len;
    f->data_start = end;
    f->path = lora_strdup(ctx, label);
    lora_status s = f->path ? LORA_OK : LORA_E_NOMEM;
    if (s == LORA_OK) s = parse_header_json(ctx, label, buf + 8, n, f);
    if (s == LORA_E_ST_HEADER_UTF8 || s == LORA_E_ST_HEADER_JSON) {
        /* A plausible length does not make it safetensors: a gzip file written with MTIME=0 and
         * FLG=0 (gzip -n, Python's gzip.compress(..., mtime=0)) reads as N = 559,903. */
        const char *kind = sniff_not_a_model(buf, len);
        if (kind) s = lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: not a safetensors file: it is %s", label, kind);
    }
    if (s == LORA_OK) s = validate_layout(ctx, label, f);
    if (s != LORA_OK) {
        st_close(f);
        return s;
    }
    *out = f;
    return LORA_OK;
}

lora_status st_open(lora_ctx *ctx, const char *path, struct lora_file **out) {
    *out = NULL;
    int fd;
    uint64_t size;
    LORA_TRY(io_open_read(ctx, path, &fd, &size));
    const uint8_t *map = NULL;
    if (size > 0) {
        void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            lora_status s = io_fail(ctx, errno, "mmap", path);
            close(fd);
            return s;
        }
        map = m;
    }
    close(fd);   /* the mapping stays valid */
    static const uint8_t empty[1] = {0};
    lora_status s = st_parse(ctx, path, map ? map : empty, size, out);
    if (s != LORA_OK) {
        if (map) munmap((void *)map, (size_t)size);
        return s;
    }
    (*out)->mapped = map != NULL;
    return LORA_OK;
}

/* ---- write ------------------------------------------------------------------------------ */
struct write_order {
    const struct st_write_tensor *t;
    int dtype_rank;
    uint64_t nbytes;
};

static int cmp_write_order(const void *a, const void *b) {
    const struct write_order *x = a, *y = b;
    if (x->dtype_rank != y->dtype_rank) return x->dtype_rank > y->dtype_rank ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

static lora_status build_header(lora_ctx *ctx, const char *path, struct write_order *ord, int64_t n,
                                const char *const *mk, const char *const *mv, int64_t n_meta, char **out_json,
                                size_t *out_len) {
    lora_status s = LORA_OK;
    json_t *root = json_object();
    json_t *meta = n_meta > 0 ? json_object() : NULL;
    if (!root || (n_meta > 0 && !meta)) { s = LORA_E_NOMEM; goto fail; }
    for (int64_t i = 0; i < n_meta; i++) {
        if (!mk[i] || !mv[i]) { s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: metadata entry %lld is NULL", path, (long long)i); goto fail; }
        json_t *v = json_string(mv[i]);
        if (!v) { s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: metadata value of \"%s\" is not valid UTF-8", path, mk[i]); goto fail; }
        if (json_object_get(meta, mk[i])) {
            json_decref(v);
            s = lora_fail(ctx, LORA_E_ST_DUPLICATE_KEY, "%s: metadata key \"%s\" given twice", path, mk[i]);
            goto fail;
        }
        if (json_object_set_new(meta, mk[i], v) != 0) {
            s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: metadata key \"%s\" is not valid UTF-8", path, mk[i]);
            goto fail;
        }
    }
    if (meta) {
        json_object_set_new(root, "__metadata__", meta);
        meta = NULL;
    }
    uint64_t pos = 0;
    for (int64_t i = 0; i < n; i++) {
        const struct st_write_tensor *t = ord[i].t;
        json_t *shape = json_array(), *offs = json_array();
        json_t *info = json_object();
        if (!shape || !offs || !info) { json_decref(shape); json_decref(offs); json_decref(info); s = LORA_E_NOMEM; goto fail; }
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_array_append_new(offs, json_integer((json_int_t)pos));
        json_array_append_new(offs, json_integer((json_int_t)(pos + ord[i].nbytes)));
        json_object_set_new(info, "dtype", json_string(lora_dtype_name(t->dtype)));
        json_object_set_new(info, "shape", shape);
        json_object_set_new(info, "data_offsets", offs);
        if (json_object_get(root, t->name)) {
            json_decref(info);
            s = lora_fail(ctx, LORA_E_ST_DUPLICATE_KEY, "%s: tensor \"%s\" given twice", path, t->name);
            goto fail;
        }
        if (json_object_set_new(root, t->name, info) != 0) {
            s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor name \"%s\" is not valid UTF-8", path, t->name);
            goto fail;
        }
        pos += ord[i].nbytes;
    }
    char *js = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!js) { s = LORA_E_NOMEM; goto fail; }
    /* jansson writes control characters as \u001F, the reference writer (serde_json) as
     * \u001f: lowercase the hex digits so both headers are byte-identical. Every backslash in
     * the dump starts an escape, so skipping the escaped character keeps us in step. */
    for (size_t i = 0; js[i]; i++) {
        if (js[i] != '\\' || !js[i + 1]) continue;
        if (js[++i] == 'u')
            for (int k = 1; k <= 4 && js[i + k]; k++)
                if (js[i + k] >= 'A' && js[i + k] <= 'F') js[i + k] = (char)(js[i + k] - 'A' + 'a');
    }
    size_t len = strlen(js);
    size_t padded = (len + 7) & ~(size_t)7;
    if (padded > ST_MAX_HEADER) {
        free(js);
        s = lora_fail(ctx, LORA_E_ST_HEADER_TOO_LARGE,
                      "%s: the header would be %zu bytes, above the %u readers accept; nothing was written "
                      "(drop bulky metadata such as ss_tag_frequency)", path, padded, ST_MAX_HEADER);
        goto fail;
    }
    char *hdr = lora_malloc(ctx, padded);
    if (!hdr) { free(js); s = LORA_E_NOMEM; goto fail; }
    memcpy(hdr, js, len);
    memset(hdr + len, ' ', padded - len);
    free(js);
    *out_json = hdr;
    *out_len = padded;
fail:
    json_decref(meta);
    json_decref(root);
    return s;
}

lora_status st_write(lora_ctx *ctx, const char *path, const struct st_write_tensor *tensors, int64_t n,
                     const char *const *meta_keys, const char *const *meta_vals, int64_t n_meta) {
    if (!path || n < 0 || n_meta < 0 || (n > 0 && !tensors) || (n_meta > 0 && (!meta_keys || !meta_vals)))
        return lora_fail(ctx, LORA_E_INVALID_ARG, "safetensors write: invalid arguments");
    if (n > ST_MAX_TENSORS)
        return lora_fail(ctx, LORA_E_LIMIT, "%s: %lld tensors exceed the limit of %d", path, (long long)n, ST_MAX_TENSORS);
    struct write_order *ord = lora_calloc(ctx, (size_t)(n ? n : 1), sizeof *ord);
    if (!ord) return LORA_E_NOMEM;
    lora_status s = LORA_OK;
    for (int64_t i = 0; i < n; i++) {
        const struct st_write_tensor *t = &tensors[i];
        int di = st_dtype_index_by_type(t->dtype);
        if (!t->name || di < 0 || t->ndim < 0 || t->ndim > ST_MAX_RANK || (t->ndim > 0 && !t->shape)) {
            s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor %lld (\"%s\"): bad name, dtype or rank", path,
                          (long long)i, t->name ? t->name : "(null)");
            goto out;
        }
        int64_t nel;
        uint64_t nbytes;
        if (!ck_numel(t->shape, t->ndim, &nel) || !ck_mul_u64((uint64_t)nel, (uint64_t)(st_dtypes[di].bits / 8), &nbytes)) {
            s = lora_fail(ctx, LORA_E_ST_SHAPE_OVERFLOW, "%s: tensor \"%s\": shape is negative or overflows", path, t->name);
            goto out;
        }
        if (strcmp(t->name, "__metadata__") == 0) {
            /* the key is the metadata map (S4): such a file would be unreadable */
            s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor %lld: the name \"__metadata__\" is reserved", path,
                          (long long)i);
            goto out;
        }
        if (nbytes > 0 && !t->data) {
            s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor \"%s\": data is NULL", path, t->name);
            goto out;
        }
        ord[i].t = t;
        ord[i].dtype_rank = di;
        ord[i].nbytes = nbytes;
    }
    qsort(ord, (size_t)n, sizeof *ord, cmp_write_order);

    char *hdr = NULL;
    size_t hlen = 0;
    if ((s = build_header(ctx, path, ord, n, meta_keys, meta_vals, n_meta, &hdr, &hlen)) != LORA_OK) goto out;

    struct atomic_file af;
    if ((s = atomic_file_begin(ctx, path, &af)) != LORA_OK) {
        lora_free(ctx, hdr);
        goto out;
    }
    uint8_t lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    s = atomic_file_write(&af, lenbuf, 8);
    if (s == LORA_OK) s = atomic_file_write(&af, hdr, hlen);
    lora_free(ctx, hdr);
    for (int64_t i = 0; s == LORA_OK && i < n; i++) s = atomic_file_write(&af, ord[i].t->data, (size_t)ord[i].nbytes);
    if (s == LORA_OK) s = atomic_file_commit(&af);
    else atomic_file_abort(&af);
out:
    lora_free(ctx, ord);
    return s;
}
