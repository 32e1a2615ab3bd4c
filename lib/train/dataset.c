/* kohya DreamBooth dataset (dataset.h): folder scan, captions, reg balancing, buckets,
 * per-epoch batch order, caption processing, augmentation and the latent cache.
 *
 * Order of images: kohya lists folders with Path.iterdir() and images with glob() (file-system
 * order, i.e. unspecified). We sort folder names and, per extension in kohya's IMAGE_EXTENSIONS
 * order (png, jpg, jpeg, webp, bmp), file names with strcmp, so runs are reproducible; every
 * count kohya derives (bucket sizes, num_train_images, reg balancing, len(dataloader)) follows
 * from that order exactly as in train_util.py. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "train/dataset.h"
#include "train/image_resize.h"
#include "io/image_read.h"
#include "io/atomic_file.h"
#include "core/rng.h"
#include "core/utf8.h"

#define CAPTION_FILE_MAX   (16u << 20)   /* bigger caption files are refused unread */
#define CAPTION_LINE_MAX   (64u << 10)   /* safety.md C2 */
#define PROBE_HEAD_BYTES   (256u << 10)

static const char *const IMAGE_EXTS[] = { ".png", ".jpg", ".jpeg", ".webp", ".bmp" };
#define N_IMAGE_EXTS 5

struct ds_image {
    char *path;
    char *caption;
    int32_t repeats;          /* after reg balancing */
    int32_t is_reg, folder;
    int32_t w, h;             /* decoded size (after EXIF orientation) */
    int32_t bw, bh, rw, rh;   /* bucket and resized size */
    int32_t bucket;
    int32_t face[4];          /* cx, cy, w, h from "..._cx_cy_w_h" (face_crop_aug_range), else 0 */
    float *lat, *lat_flip;    /* cached latents [4, bh/8, bw/8] */
};

struct ds_folder {
    char *name;               /* basename, e.g. "10_sks dog" */
    int32_t repeats, img_count, is_reg;
    int32_t canon;            /* first folder of the same name: kohya's tag_frequency key */
    int64_t tag_head, tag_tail;   /* its tags in insertion order (canonical folders only) */
};

struct ds_bucket {
    int32_t w, h;
    int64_t n;                /* images including repeats */
    int64_t *items;           /* image indices, kohya order before shuffling */
};

struct ds_tag {
    int32_t folder;           /* canonical folder */
    int64_t count, next;      /* next tag of the same folder, -1 at the end */
    size_t len;
    uint64_t hash;
    char *tag;
};

struct ds_skip {
    char *msg;
};

struct lora_dataset {
    lora_ctx *ctx;
    struct ds_opts o;
    char *caption_ext, *train_dir, *reg_dir;

    struct ds_image *img;
    int64_t n_img, cap_img;
    struct ds_folder *fold;
    int32_t n_fold, cap_fold;
    struct ds_bucket *bk;
    int32_t n_bk;
    int64_t n_train, n_reg;

    int64_t n_batches;
    int32_t *batch_bucket;    /* unshuffled (bucket, batch index) list */
    int64_t *batch_index;

    /* Per-epoch shuffle, recomputed from (seed, epoch) when another epoch is asked for. */
    int64_t perm_epoch;
    int64_t *perm;            /* [n_batches] */
    int64_t **bucket_perm;    /* [n_bk][bucket n] */

    struct ds_tag *tags;
    int64_t n_tags, cap_tags;
    int64_t *tag_ht;          /* open addressing over tags[], -1 = empty; size a power of 2 */
    size_t tag_ht_cap;

    struct ds_skip *skips;
    int64_t n_skips, cap_skips;

    int32_t cached;           /* ds_cache_latents ran */

    /* batch buffers */
    float *pix, *lat;
    size_t pix_cap, lat_cap;
    char **caps;
    float *lw;
    int32_t *isreg;
};

void ds_opts_default(struct ds_opts *o) {
    memset(o, 0, sizeof *o);
    o->caption_extension = ".caption";
    o->width = o->height = 512;
    o->min_bucket_reso = 256;
    o->max_bucket_reso = 1024;
    o->bucket_reso_steps = 64;
    o->prior_loss_weight = 1.0;
    o->batch_size = 1;
    o->bad_input = DS_BAD_SKIP;
    o->cache = DS_CACHE_NONE;
}

/* OpenCV's saturate_cast<uchar>(float): round half to even, clamp. */
static uint8_t sat_u8(float v) {
    long i = lrintf(v);
    return (uint8_t)(i < 0 ? 0 : i > 255 ? 255 : i);
}

/* ---- counter-based randomness ------------------------------------------------------------- */

/* Stream (seed; epoch, kind, a, b): Philox blocks with counter {epoch, kind, a, b<<20 | block}
 * (b < 4096, block < 2^20) or, for bucket shuffles, {epoch, kind, a, block}. */
struct ds_rng {
    uint32_t key[2], ctr[4];
    uint32_t out[4];
    int pos;
};

#define RNG_EPOCH_ORDER  1
#define RNG_BUCKET       2
#define RNG_SAMPLE       3

static void rng_init(struct ds_rng *r, uint64_t seed, int64_t epoch, uint32_t kind, uint32_t a, uint32_t b_shifted) {
    r->key[0] = (uint32_t)seed;
    r->key[1] = (uint32_t)(seed >> 32);
    r->ctr[0] = (uint32_t)epoch;
    r->ctr[1] = kind | (uint32_t)((uint64_t)epoch >> 32) << 8;
    r->ctr[2] = a;
    r->ctr[3] = b_shifted;
    r->pos = 4;
}
static uint32_t rng_u32(struct ds_rng *r) {
    if (r->pos == 4) {
        lora_philox4x32_10(r->ctr, r->key, r->out);
        r->ctr[3]++;
        r->pos = 0;
    }
    return r->out[r->pos++];
}
static uint64_t rng_u64(struct ds_rng *r) {
    uint64_t hi = rng_u32(r);
    return hi << 32 | rng_u32(r);
}
/* Uniform in [0, 1) with 53 bits, as Python's random.random(). */
static double rng_uniform(struct ds_rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }
/* Uniform integer in [0, n] (inclusive, as random.randint(0, n)). */
static int64_t rng_int(struct ds_rng *r, int64_t n) { return n <= 0 ? 0 : (int64_t)(rng_u64(r) % (uint64_t)(n + 1)); }

static void shuffle_i64(struct ds_rng *r, int64_t *v, int64_t n) {
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = rng_int(r, i);
        int64_t t = v[i]; v[i] = v[j]; v[j] = t;
    }
}

/* ---- small helpers ------------------------------------------------------------------------ */

static char *path_join(lora_ctx *ctx, const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b), n;
    while (na > 1 && a[na - 1] == '/') na--;     /* as pathlib drops trailing slashes */
    if (!ck_add_size(na, nb, &n) || !ck_add_size(n, 2, &n)) return NULL;
    char *p = lora_malloc(ctx, n);
    if (!p) return NULL;
    memcpy(p, a, na);
    p[na] = '/';
    memcpy(p + na + 1, b, nb + 1);
    return p;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

struct name_list {
    char **v;
    int64_t n, cap;
};

static void names_free(lora_ctx *ctx, struct name_list *l) {
    for (int64_t i = 0; i < l->n; i++) lora_free(ctx, l->v[i]);
    lora_free(ctx, l->v);
    memset(l, 0, sizeof *l);
}

static lora_status names_push(lora_ctx *ctx, struct name_list *l, const char *s) {
    if (l->n == l->cap) {
        int64_t nc = l->cap ? 2 * l->cap : 64;
        char **nv = lora_malloc(ctx, (size_t)nc * sizeof *nv);
        if (!nv) return LORA_E_NOMEM;
        if (l->n) memcpy(nv, l->v, (size_t)l->n * sizeof *nv);
        lora_free(ctx, l->v);
        l->v = nv;
        l->cap = nc;
    }
    l->v[l->n] = lora_strdup(ctx, s);
    if (!l->v[l->n]) return LORA_E_NOMEM;
    l->n++;
    return LORA_OK;
}

/* Sorted entry names of `dir` (no "." / ".."); want_dirs: 1 folders only, 0 regular files. */
static lora_status list_dir(lora_ctx *ctx, const char *dir, int want_dirs, struct name_list *out) {
    memset(out, 0, sizeof *out);
    DIR *d = opendir(dir);
    if (!d) return lora_fail(ctx, errno == ENOENT ? LORA_E_NOT_FOUND : LORA_E_IO, "%s: cannot list folder: %s", dir, strerror(errno));
    struct dirent *e;
    lora_status s = LORA_OK;
    while (s == LORA_OK && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char *p = path_join(ctx, dir, e->d_name);
        if (!p) { s = LORA_E_NOMEM; break; }
        struct stat sb;
        int ok = stat(p, &sb) == 0 && (want_dirs ? S_ISDIR(sb.st_mode) : S_ISREG(sb.st_mode));
        lora_free(ctx, p);
        if (ok) s = names_push(ctx, out, e->d_name);
    }
    closedir(d);
    if (s != LORA_OK) { names_free(ctx, out); return s; }
    if (out->n > 1) qsort(out->v, (size_t)out->n, sizeof *out->v, cmp_str);
    return LORA_OK;
}

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

static int ends_with_ci(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    if (n < m) return 0;
    for (size_t i = 0; i < m; i++) {
        char c = s[n - m + i];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        if (c != suf[i]) return 0;
    }
    return 1;
}

/* Python int() of the first "_" token: optional blanks and sign around decimal digits. */
static int parse_repeats(const char *s, size_t n, int64_t *out) {
    size_t i = 0;
    while (i < n && (s[i] == ' ' || s[i] == '\t')) i++;
    int neg = 0;
    if (i < n && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
    size_t d0 = i;
    int64_t v = 0;
    while (i < n && s[i] >= '0' && s[i] <= '9') {
        if (v > (INT64_MAX - 9) / 10) return 0;
        v = v * 10 + (s[i++] - '0');
    }
    if (i == d0) return 0;
    while (i < n && (s[i] == ' ' || s[i] == '\t')) i++;
    if (i != n) return 0;
    *out = neg ? -v : v;
    return 1;
}

/* Records a bad file: skip (log + remember) or refuse (keep the error). */
static lora_status bad_file(struct lora_dataset *ds, lora_status s) {
    if (s == LORA_E_NOMEM || ds->o.bad_input == DS_BAD_REFUSE) return s;
    lora_ctx *ctx = ds->ctx;
    const char *msg = ctx ? ctx->errmsg : "(no context)";
    lora_log(ctx, LORA_LOG_WARN, "dataset: skipping: %s", msg);
    if (ds->n_skips == ds->cap_skips) {
        int64_t nc = ds->cap_skips ? 2 * ds->cap_skips : 16;
        struct ds_skip *nv = lora_malloc(ctx, (size_t)nc * sizeof *nv);
        if (!nv) return LORA_E_NOMEM;
        if (ds->n_skips) memcpy(nv, ds->skips, (size_t)ds->n_skips * sizeof *nv);
        lora_free(ctx, ds->skips);
        ds->skips = nv;
        ds->cap_skips = nc;
    }
    ds->skips[ds->n_skips].msg = lora_strdup(ctx, msg);
    if (!ds->skips[ds->n_skips].msg) return LORA_E_NOMEM;
    ds->n_skips++;
    lora_clear_error(ctx);
    return LORA_OK;
}

/* ---- captions ----------------------------------------------------------------------------- */

/* Length of a Python-whitespace code point at s (0 if none); s is valid UTF-8. */
static size_t py_space_at(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    unsigned c = s[0];
    if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) return 1;
    if (c == 0xC2 && n >= 2 && (s[1] == 0x85 || s[1] == 0xA0)) return 2;
    if (c == 0xE1 && n >= 3 && s[1] == 0x9A && s[2] == 0x80) return 3;                  /* U+1680 */
    if (c == 0xE2 && n >= 3 && s[1] == 0x80 && (s[2] <= 0x8A || s[2] == 0xA8 || s[2] == 0xA9 || s[2] == 0xAF)) return 3;
    if (c == 0xE2 && n >= 3 && s[1] == 0x81 && s[2] == 0x9F) return 3;                  /* U+205F */
    if (c == 0xE3 && n >= 3 && s[1] == 0x80 && s[2] == 0x80) return 3;                  /* U+3000 */
    return 0;
}

/* Python str.strip() on [*b, *e). */
static void py_strip(const char *s, size_t *b, size_t *e) {
    const unsigned char *u = (const unsigned char *)s;
    size_t k;
    while (*b < *e && (k = py_space_at(u + *b, *e - *b)) > 0) *b += k;
    for (;;) {
        size_t found = 0;
        /* step back over one code point and test it */
        size_t p = *e;
        if (p == *b) break;
        size_t q = p - 1;
        while (q > *b && (u[q] & 0xC0) == 0x80) q--;
        if ((k = py_space_at(u + q, p - q)) == p - q) found = k;
        if (!found) break;
        *e = q;
    }
}

/* Reads caption file `cap` into *out (malloc'd, first line, stripped). *absent = 1 if the file
 * does not exist. Errors name the file. */
static lora_status read_caption_file(lora_ctx *ctx, const char *cap, char **out, int *absent) {
    *out = NULL;
    *absent = 0;
    struct stat sb;
    if (stat(cap, &sb) != 0 || !S_ISREG(sb.st_mode)) { *absent = 1; return LORA_OK; }
    if ((uint64_t)sb.st_size > CAPTION_FILE_MAX)
        return lora_fail(ctx, LORA_E_CAPTION_TOO_LONG, "%s: caption file of %lld bytes is too long", cap, (long long)sb.st_size);
    FILE *f = fopen(cap, "rb");
    if (!f) return lora_fail(ctx, LORA_E_IO, "%s: cannot open caption: %s", cap, strerror(errno));
    size_t n = (size_t)sb.st_size;
    char *b = lora_malloc(ctx, n + 1);
    if (!b) { fclose(f); return LORA_E_NOMEM; }
    size_t got = fread(b, 1, n, f);
    fclose(f);
    if (got != n) { lora_free(ctx, b); return lora_fail(ctx, LORA_E_IO, "%s: short read of caption", cap); }
    b[n] = 0;
    lora_status s = LORA_OK;
    size_t at = 0, bad;
    if (n == 0) {
        s = lora_fail(ctx, LORA_E_CAPTION_ENCODING, "%s: caption file is empty (kohya refuses it too)", cap);
    } else if (n >= 2 && (((uint8_t)b[0] == 0xFF && (uint8_t)b[1] == 0xFE) || ((uint8_t)b[0] == 0xFE && (uint8_t)b[1] == 0xFF))) {
        s = lora_fail(ctx, LORA_E_CAPTION_ENCODING, "%s: caption is UTF-16 (byte-order mark %02x %02x); save it as UTF-8",
                      cap, (uint8_t)b[0], (uint8_t)b[1]);
    } else {
        if (n >= 3 && memcmp(b, "\xEF\xBB\xBF", 3) == 0) at = 3;   /* one UTF-8 BOM */
        if (!utf8_valid((const uint8_t *)b + at, n - at, &bad))
            s = lora_fail(ctx, LORA_E_CAPTION_ENCODING, "%s: caption is not valid UTF-8 (byte offset %zu)", cap, bad + at);
    }
    if (s == LORA_OK) {
        size_t e = at;
        while (e < n && b[e] != '\n' && b[e] != '\r') e++;   /* universal newlines: first line */
        if (memchr(b + at, 0, e - at))
            s = lora_fail(ctx, LORA_E_CAPTION_ENCODING, "%s: caption contains a NUL byte", cap);
        else if (e - at > CAPTION_LINE_MAX)
            s = lora_fail(ctx, LORA_E_CAPTION_TOO_LONG, "%s: caption line of %zu bytes is above %u", cap, e - at, CAPTION_LINE_MAX);
        else {
            size_t sb0 = at, se = e;
            py_strip(b, &sb0, &se);
            char *c = lora_malloc(ctx, se - sb0 + 1);
            if (!c) s = LORA_E_NOMEM;
            else {
                memcpy(c, b + sb0, se - sb0);
                c[se - sb0] = 0;
                *out = c;
            }
        }
    }
    lora_free(ctx, b);
    return s;
}

/* kohya's read_caption: "<path minus ext><ext>", then the face-crop stem (path split on "_"
 * with >= 5 tokens: the last four dropped). NULL caption when neither exists. */
static lora_status read_caption(lora_ctx *ctx, const char *img_path, const char *ext, char **out) {
    *out = NULL;
    const char *slash = strrchr(img_path, '/');
    const char *dot = strrchr(img_path, '.');
    size_t base_n = dot && (!slash || dot > slash + 1) ? (size_t)(dot - img_path) : strlen(img_path);
    size_t ext_n = strlen(ext);
    char *cand[2] = { NULL, NULL };
    size_t need;
    if (!ck_add_size(base_n, ext_n, &need) || !ck_add_size(need, 1, &need)) return LORA_E_LIMIT;
    for (int k = 0; k < 2; k++) {
        cand[k] = lora_malloc(ctx, need);
        if (!cand[k]) { lora_free(ctx, cand[0]); return LORA_E_NOMEM; }
    }
    memcpy(cand[0], img_path, base_n);
    memcpy(cand[0] + base_n, ext, ext_n + 1);
    int tokens = 1;
    for (size_t i = 0; i < base_n; i++) tokens += img_path[i] == '_';
    size_t face_n = base_n;
    if (tokens >= 5) {
        int seen = 0;
        for (size_t i = base_n; i-- > 0;) {
            if (img_path[i] == '_' && ++seen == 4) { face_n = i; break; }
        }
    }
    memcpy(cand[1], img_path, face_n);
    memcpy(cand[1] + face_n, ext, ext_n + 1);
    lora_status s = LORA_OK;
    for (int k = 0; k < 2; k++) {
        int absent;
        s = read_caption_file(ctx, cand[k], out, &absent);
        if (s != LORA_OK || !absent) break;
    }
    lora_free(ctx, cand[0]);
    lora_free(ctx, cand[1]);
    return s;
}

/* ---- tag frequency ------------------------------------------------------------------------- */

static uint64_t tag_hash(int32_t folder, const char *t, size_t n) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)(uint32_t)folder;
    for (size_t i = 0; i < n; i++) { h ^= (uint8_t)t[i]; h *= 1099511628211ull; }
    return h;
}

static lora_status tag_ht_grow(struct lora_dataset *ds) {
    size_t nc = ds->tag_ht_cap ? 2 * ds->tag_ht_cap : 1024;
    int64_t *ht = lora_malloc(ds->ctx, nc * sizeof *ht);
    if (!ht) return LORA_E_NOMEM;
    for (size_t i = 0; i < nc; i++) ht[i] = -1;
    for (int64_t k = 0; k < ds->n_tags; k++) {
        size_t at = (size_t)ds->tags[k].hash & (nc - 1);
        while (ht[at] >= 0) at = (at + 1) & (nc - 1);
        ht[at] = k;
    }
    lora_free(ds->ctx, ds->tag_ht);
    ds->tag_ht = ht;
    ds->tag_ht_cap = nc;
    return LORA_OK;
}

/* Counts tag t[0..n) of `folder` (merged into its canonical folder, as kohya's dict by name). */
static lora_status tag_add(struct lora_dataset *ds, int32_t folder, const char *t, size_t n) {
    int32_t cf = ds->fold[folder].canon;
    uint64_t h = tag_hash(cf, t, n);
    if (2 * (size_t)(ds->n_tags + 1) > ds->tag_ht_cap) LORA_TRY(tag_ht_grow(ds));
    size_t mask = ds->tag_ht_cap - 1, at = (size_t)h & mask;
    for (; ds->tag_ht[at] >= 0; at = (at + 1) & mask) {
        struct ds_tag *g = &ds->tags[ds->tag_ht[at]];
        if (g->hash == h && g->folder == cf && g->len == n && memcmp(g->tag, t, n) == 0) { g->count++; return LORA_OK; }
    }
    if (ds->n_tags == ds->cap_tags) {
        int64_t nc = ds->cap_tags ? 2 * ds->cap_tags : 64;
        struct ds_tag *nv = lora_malloc(ds->ctx, (size_t)nc * sizeof *nv);
        if (!nv) return LORA_E_NOMEM;
        if (ds->n_tags) memcpy(nv, ds->tags, (size_t)ds->n_tags * sizeof *nv);
        lora_free(ds->ctx, ds->tags);
        ds->tags = nv;
        ds->cap_tags = nc;
    }
    char *c = lora_malloc(ds->ctx, n + 1);
    if (!c) return LORA_E_NOMEM;
    memcpy(c, t, n);
    c[n] = 0;
    int64_t k = ds->n_tags++;
    ds->tags[k] = (struct ds_tag){ cf, 1, -1, n, h, c };
    ds->tag_ht[at] = k;
    struct ds_folder *f = &ds->fold[cf];
    if (f->tag_tail >= 0) ds->tags[f->tag_tail].next = k;
    else f->tag_head = k;
    f->tag_tail = k;
    return LORA_OK;
}

/* FEB's set_tag_frequency: split on ",", skip empty and all-blank tags, lower-case, count WITHOUT
 * stripping (" blue hair" and "blue hair" are different tags; later kohya strips). Lower-casing
 * is ASCII-only (Python's str.lower also folds non-ASCII letters). */
static lora_status tag_count_caption(struct lora_dataset *ds, int32_t folder, const char *cap) {
    size_t n = strlen(cap);
    char *low = lora_malloc(ds->ctx, n + 1);
    if (!low) return LORA_E_NOMEM;
    for (size_t i = 0; i <= n; i++) low[i] = cap[i] >= 'A' && cap[i] <= 'Z' ? (char)(cap[i] - 'A' + 'a') : cap[i];
    size_t b = 0;
    lora_status s = LORA_OK;
    for (size_t i = 0; i <= n && s == LORA_OK; i++) {
        if (i == n || low[i] == ',') {
            size_t x = b, y = i;
            py_strip(low, &x, &y);
            if (x < y) s = tag_add(ds, folder, low + b, i - b);   /* `if tag and not tag.isspace()` */
            b = i + 1;
        }
    }
    lora_free(ds->ctx, low);
    return s;
}

/* ---- JSON (Python json.dumps: ", " / ": " separators, ensure_ascii) ------------------------ */

struct sbuf {
    lora_ctx *ctx;
    char *p;
    size_t n, cap;
    int err;
};

static void sb_put(struct sbuf *b, const char *s, size_t n) {
    if (b->err) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *np = lora_malloc(b->ctx, nc);
        if (!np) { b->err = 1; return; }
        if (b->n) memcpy(np, b->p, b->n);
        lora_free(b->ctx, b->p);
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(struct sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_json_string(struct sbuf *b, const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    char tmp[16];
    sb_put(b, "\"", 1);
    for (size_t i = 0; u[i];) {
        uint32_t c = u[i];
        size_t k = 1;
        if (c >= 0xF0) { c = (c & 7u) << 18 | (u[i + 1] & 63u) << 12 | (u[i + 2] & 63u) << 6 | (u[i + 3] & 63u); k = 4; }
        else if (c >= 0xE0) { c = (c & 15u) << 12 | (u[i + 1] & 63u) << 6 | (u[i + 2] & 63u); k = 3; }
        else if (c >= 0xC0) { c = (c & 31u) << 6 | (u[i + 1] & 63u); k = 2; }
        i += k;
        if (c == '"') sb_str(b, "\\\"");
        else if (c == '\\') sb_str(b, "\\\\");
        else if (c == '\n') sb_str(b, "\\n");
        else if (c == '\r') sb_str(b, "\\r");
        else if (c == '\t') sb_str(b, "\\t");
        else if (c == '\b') sb_str(b, "\\b");
        else if (c == '\f') sb_str(b, "\\f");
        else if (c < 0x20 || c > 0x7e) {   /* json.dumps ensure_ascii escapes DEL too */
            if (c >= 0x10000) {
                uint32_t v = c - 0x10000;
                snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
            } else {
                snprintf(tmp, sizeof tmp, "\\u%04x", c);
            }
            sb_str(b, tmp);
        } else {
            char ch = (char)c;
            sb_put(b, &ch, 1);
        }
    }
    sb_put(b, "\"", 1);
}

lora_status ds_tag_frequency_json(const struct lora_dataset *ds, char **out) {
    if (!ds || !out) return LORA_E_INVALID_ARG;
    struct sbuf b = { ds->ctx, NULL, 0, 0, 0 };
    char num[32];
    sb_str(&b, "{");
    int first_f = 1;
    for (int32_t f = 0; f < ds->n_fold; f++) {
        /* kohya keys by folder basename; a name seen twice (train and reg) merges */
        if (ds->fold[f].canon != f) continue;
        if (!first_f) sb_str(&b, ", ");
        first_f = 0;
        sb_json_string(&b, ds->fold[f].name);
        sb_str(&b, ": {");
        int first_t = 1;
        for (int64_t i = ds->fold[f].tag_head; i >= 0; i = ds->tags[i].next) {
            if (!first_t) sb_str(&b, ", ");
            first_t = 0;
            sb_json_string(&b, ds->tags[i].tag);
            snprintf(num, sizeof num, ": %lld", (long long)ds->tags[i].count);
            sb_str(&b, num);
        }
        sb_str(&b, "}");
    }
    sb_str(&b, "}");
    if (b.err) { lora_free(ds->ctx, b.p); return LORA_E_NOMEM; }
    *out = b.p;
    return LORA_OK;
}

lora_status ds_dataset_dirs_json(const struct lora_dataset *ds, const char *which, char **out) {
    if (!ds || !out || !which) return LORA_E_INVALID_ARG;
    int reg = strcmp(which, "reg") == 0;
    if (!reg && strcmp(which, "train") != 0)
        return lora_fail(ds->ctx, LORA_E_INVALID_ARG, "ds_dataset_dirs_json: which is \"%s\", want \"train\" or \"reg\"", which);
    struct sbuf b = { ds->ctx, NULL, 0, 0, 0 };
    char num[96];
    sb_str(&b, "{");
    int first = 1;
    for (int32_t f = 0; f < ds->n_fold; f++) {
        const struct ds_folder *d = &ds->fold[f];
        if (d->is_reg != reg || d->img_count == 0) continue;
        int later = 0;      /* a dict assignment: the last folder of a name wins, at the first's place */
        for (int32_t g = f + 1; g < ds->n_fold; g++)
            if (ds->fold[g].is_reg == reg && ds->fold[g].img_count > 0 && strcmp(ds->fold[g].name, d->name) == 0) later = 1;
        if (later) continue;
        if (!first) sb_str(&b, ", ");
        first = 0;
        sb_json_string(&b, d->name);
        snprintf(num, sizeof num, ": {\"n_repeats\": %d, \"img_count\": %d}", d->repeats, d->img_count);
        sb_str(&b, num);
    }
    sb_str(&b, "}");
    if (b.err) { lora_free(ds->ctx, b.p); return LORA_E_NOMEM; }
    *out = b.p;
    return LORA_OK;
}

/* numpy's pairwise summation (what np.mean adds with), for bit-equal metadata. */
static double np_pairwise_sum(const double *a, int64_t n) {
    if (n < 8) {
        double r = 0.;   /* numpy starts from -0.0 only for the empty case */
        for (int64_t i = 0; i < n; i++) r += a[i];
        return r;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int k = 0; k < 8; k++) r[k] = a[k];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++) r[k] += a[i + k];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return np_pairwise_sum(a, n2) + np_pairwise_sum(a + n2, n - n2);
}

/* Python's repr(float): the shortest digits that read back to the same double. */
static void py_float_repr(double v, char *out, size_t cap) {
    if (!isfinite(v)) { snprintf(out, cap, "%s", isnan(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity"); return; }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v) break;
    }
    /* %g drops ".0" and writes e-05 as Python does; add ".0" to integral values */
    if (!strpbrk(out, ".eni")) {
        size_t n = strlen(out);
        if (n + 2 < cap) memcpy(out + n, ".0", 3);
    }
}

/* ---- buckets -------------------------------------------------------------------------------- */

static int cmp_reso(const void *a, const void *b) {
    const struct ds_reso *x = a, *y = b;
    if (x->w != y->w) return x->w < y->w ? -1 : 1;
    return x->h < y->h ? -1 : x->h > y->h;
}

/* model_util.make_bucket_resolutions. Returns the count (<= cap). */
int32_t ds_bucket_resolutions(int32_t max_w, int32_t max_h, int32_t min_size, int32_t max_size,
                                   int32_t divisible, struct ds_reso *out, int32_t cap) {
    int64_t max_area = (int64_t)(max_w / divisible) * (max_h / divisible);
    int32_t n = 0;
#define ADD_RESO(W, H) do { struct ds_reso r_ = { (W), (H) }; int dup_ = 0; \
        for (int32_t q_ = 0; q_ < n; q_++) if (out[q_].w == r_.w && out[q_].h == r_.h) dup_ = 1; \
        if (!dup_ && n < cap) out[n++] = r_; } while (0)
    int32_t sq = (int32_t)sqrt((double)max_area) * divisible;
    ADD_RESO(sq, sq);
    for (int32_t size = min_size; size <= max_size; size += divisible) {
        int32_t wd = size / divisible;
        int64_t hh = wd > 0 ? (max_area / wd) * divisible : max_size;
        int32_t height = (int32_t)(hh < max_size ? hh : max_size);
        ADD_RESO(size, height);
        ADD_RESO(height, size);
    }
#undef ADD_RESO
    qsort(out, (size_t)n, sizeof *out, cmp_reso);
    return n;
}

static int32_t round_to_steps(double x, int32_t steps) {
    int64_t v = (int64_t)(x + .5);
    return (int32_t)(v - v % steps);
}

/* BucketManager.select_bucket: bucket (bw, bh) and resized size (rw, rh). */
static void select_bucket(const struct ds_opts *o, const struct ds_reso *pre, int32_t n_pre, int32_t w, int32_t h,
                          int32_t *bw, int32_t *bh, int32_t *rw, int32_t *rh) {
    double ar = (double)w / (double)h;
    if (!o->enable_bucket || !o->bucket_no_upscale) {
        struct ds_reso r = pre[0];
        int exact = 0;
        for (int32_t i = 0; i < n_pre; i++) if (pre[i].w == w && pre[i].h == h) { r = pre[i]; exact = 1; break; }
        if (!exact) {
            double best = INFINITY;
            for (int32_t i = 0; i < n_pre; i++) {
                double e = fabs((double)pre[i].w / (double)pre[i].h - ar);
                if (e < best) { best = e; r = pre[i]; }       /* first minimum, as np.argmin */
            }
        }
        double ar_r = (double)r.w / (double)r.h;
        double scale = ar > ar_r ? (double)r.h / h : (double)r.w / w;
        *rw = (int32_t)(w * scale + .5);
        *rh = (int32_t)(h * scale + .5);
        *bw = r.w;
        *bh = r.h;
        return;
    }
    int32_t st = o->bucket_reso_steps;
    int64_t max_area = (int64_t)o->width * o->height;
    if ((int64_t)w * h > max_area) {
        double rwd = sqrt((double)max_area * ar), rhd = (double)max_area / rwd;
        int32_t bwr = round_to_steps(rwd, st);
        int32_t bhw = round_to_steps(bwr / ar, st);
        double ar_wr = (double)bwr / bhw;
        int32_t bhr = round_to_steps(rhd, st);
        int32_t bwh = round_to_steps(bhr * ar, st);
        double ar_hr = (double)bwh / bhr;
        if (fabs(ar_wr - ar) < fabs(ar_hr - ar)) { *rw = bwr; *rh = (int32_t)(bwr / ar + .5); }
        else { *rw = (int32_t)(bhr * ar + .5); *rh = bhr; }
    } else {
        *rw = w;
        *rh = h;
    }
    *bw = *rw - *rw % st;
    *bh = *rh - *rh % st;
}

/* Plain decimal "12", "1.5", ".5" without locale (strtod follows LC_NUMERIC). */
static const char *parse_plain_double(const char *c, double *out) {
    double v = 0, scale = 1;
    int digits = 0;
    while (*c >= '0' && *c <= '9') { v = v * 10 + (*c++ - '0'); digits++; }
    if (*c == '.') {
        c++;
        while (*c >= '0' && *c <= '9') { scale /= 10; v += (*c++ - '0') * scale; digits++; }
    }
    *out = v;
    return digits ? c : NULL;
}

lora_status ds_parse_face_crop_range(lora_ctx *ctx, const char *s, double out[2]) {
    out[0] = out[1] = 0;
    if (!s || !s[0]) return LORA_OK;
    const char *c = s;
    while (*c == ' ') c++;
    c = parse_plain_double(c, &out[0]);
    if (c) { while (*c == ' ') c++; }
    if (c && *c == ',') {
        c++;
        while (*c == ' ') c++;
        c = parse_plain_double(c, &out[1]);
        if (c) while (*c == ' ') c++;
    } else {
        c = NULL;
    }
    if (!c || *c || !(out[0] > 0 && out[0] <= out[1])) {
        out[0] = out[1] = 0;
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "face_crop_aug_range \"%s\": want \"a,b\" with 0 < a <= b", s);
    }
    return LORA_OK;
}

lora_status ds_assign_bucket(lora_ctx *ctx, const struct ds_opts *o, int32_t w, int32_t h, int32_t out[4]) {
    if (w <= 0 || h <= 0) return lora_fail(ctx, LORA_E_INVALID_ARG, "ds_assign_bucket: size %dx%d", w, h);
    struct ds_reso pre[512];
    int32_t n_pre = 1;
    pre[0] = (struct ds_reso){ o->width, o->height };
    if (o->enable_bucket && !o->bucket_no_upscale) {
        if (o->bucket_reso_steps < 1 || (o->max_bucket_reso - o->min_bucket_reso) / o->bucket_reso_steps > 250)
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "ds_assign_bucket: too many buckets");
        n_pre = ds_bucket_resolutions(o->width, o->height, o->min_bucket_reso, o->max_bucket_reso, o->bucket_reso_steps, pre, 512);
    }
    select_bucket(o, pre, n_pre, w, h, &out[0], &out[1], &out[2], &out[3]);
    return LORA_OK;
}

/* ---- open ------------------------------------------------------------------------------------ */

static lora_status push_image(struct lora_dataset *ds, struct ds_image *im) {
    if (ds->n_img == ds->cap_img) {
        int64_t nc = ds->cap_img ? 2 * ds->cap_img : 64;
        struct ds_image *nv = lora_malloc(ds->ctx, (size_t)nc * sizeof *nv);
        if (!nv) return LORA_E_NOMEM;
        if (ds->n_img) memcpy(nv, ds->img, (size_t)ds->n_img * sizeof *nv);
        lora_free(ds->ctx, ds->img);
        ds->img = nv;
        ds->cap_img = nc;
    }
    ds->img[ds->n_img++] = *im;
    return LORA_OK;
}

static lora_status push_folder(struct lora_dataset *ds, const char *name, int32_t repeats, int32_t is_reg) {
    if (ds->n_fold == ds->cap_fold) {
        int32_t nc = ds->cap_fold ? 2 * ds->cap_fold : 16;
        struct ds_folder *nv = lora_malloc(ds->ctx, (size_t)nc * sizeof *nv);
        if (!nv) return LORA_E_NOMEM;
        if (ds->n_fold) memcpy(nv, ds->fold, (size_t)ds->n_fold * sizeof *nv);
        lora_free(ds->ctx, ds->fold);
        ds->fold = nv;
        ds->cap_fold = nc;
    }
    char *c = lora_strdup(ds->ctx, name);
    if (!c) return LORA_E_NOMEM;
    int32_t canon = ds->n_fold;
    for (int32_t g = 0; g < ds->n_fold; g++)
        if (strcmp(ds->fold[g].name, name) == 0) { canon = g; break; }
    ds->fold[ds->n_fold] = (struct ds_folder){ c, repeats, 0, is_reg, canon, -1, -1 };
    ds->n_fold++;
    return LORA_OK;
}

/* Header probe with a bounded read; the full file only when the head is not enough. */
static lora_status probe_image(lora_ctx *ctx, const char *path, int verify, int32_t *w, int32_t *h) {
    struct img_limits lim;
    img_limits_default(&lim);
    if (verify) {
        struct img_rgb8 im;
        LORA_TRY(img_load_rgb8(ctx, path, &lim, &im));
        *w = im.width;
        *h = im.height;
        img_free(ctx, &im);
        return LORA_OK;
    }
    FILE *f = fopen(path, "rb");
    if (!f) return lora_fail(ctx, LORA_E_IO, "%s: cannot open image: %s", path, strerror(errno));
    uint8_t *head = lora_malloc(ctx, PROBE_HEAD_BYTES);
    if (!head) { fclose(f); return LORA_E_NOMEM; }
    size_t n = fread(head, 1, PROBE_HEAD_BYTES, f);
    int more = n == PROBE_HEAD_BYTES && fgetc(f) != EOF;
    /* A PNG whose last chunk is not IEND was cut off (PIL refuses it when loading). */
    int png_cut = 0;
    if (img_sniff(head, n) == IMG_FMT_PNG) {
        uint8_t tail[12];
        if (fseek(f, -12, SEEK_END) != 0 || fread(tail, 1, 12, f) != 12 || memcmp(tail + 4, "IEND", 4) != 0) png_cut = 1;
    }
    fclose(f);
    lora_status s;
    if (n == 0) s = lora_fail(ctx, LORA_E_IMG_DECODE, "%s: empty file (0 bytes)", path);
    else if (png_cut) s = lora_fail(ctx, LORA_E_IMG_DECODE, "%s: PNG is truncated (no IEND chunk at the end)", path);
    else {
        s = img_probe_mem(ctx, path, head, n, &lim, w, h);
        if (s == LORA_E_IMG_DECODE && more) {
            lora_clear_error(ctx);
            s = img_probe(ctx, path, &lim, w, h);
        }
    }
    lora_free(ctx, head);
    return s;
}

/* kohya's load_image_with_face_info: the file stem split on "_"; with >= 5 tokens the last four
 * are int(cx), int(cy), int(w), int(h). 0 when absent or not integers (kohya would raise). */
static void parse_face_info(const char *path, int32_t face[4]) {
    memset(face, 0, 4 * sizeof face[0]);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t n = dot && dot > base ? (size_t)(dot - base) : strlen(base);
    int tokens = 1;
    for (size_t i = 0; i < n; i++) tokens += base[i] == '_';
    if (tokens < 5) return;
    size_t end = n;
    int32_t v[4];
    for (int k = 3; k >= 0; k--) {
        size_t b = end;
        while (b > 0 && base[b - 1] != '_') b--;
        int64_t x;
        if (!parse_repeats(base + b, end - b, &x) || x < INT32_MIN || x > INT32_MAX) return;
        v[k] = (int32_t)x;
        end = b - 1;
    }
    memcpy(face, v, sizeof v);
}

static int has_face(const struct ds_opts *o, const struct ds_image *im) {
    return o->face_crop_aug_range[1] > 0 && !o->enable_bucket && im->face[0] > 0 &&
           (im->face[2] > 0 || im->face[3] > 0);
}

/* One "<repeats>_<caption>" folder: its images with captions and sizes. */
static lora_status load_folder(struct lora_dataset *ds, const char *base, const char *name, int32_t repeats,
                               const char *class_tokens, int is_reg) {
    lora_ctx *ctx = ds->ctx;
    char *dir = path_join(ctx, base, name);
    if (!dir) return LORA_E_NOMEM;
    struct name_list files;
    lora_status s = list_dir(ctx, dir, 0, &files);
    if (s != LORA_OK) { lora_free(ctx, dir); return s; }
    s = push_folder(ds, name, repeats, is_reg);
    if (s != LORA_OK) { names_free(ctx, &files); lora_free(ctx, dir); return s; }
    int32_t fi = ds->n_fold - 1;
    int64_t found = 0, first_img = ds->n_img;
    for (int e = 0; e < N_IMAGE_EXTS && s == LORA_OK; e++) {
        for (int64_t i = 0; i < files.n && s == LORA_OK; i++) {
            const char *fn = files.v[i];
            if (fn[0] == '.' || !ends_with(fn, IMAGE_EXTS[e])) continue;   /* glob skips dot files */
            found++;
            struct ds_image im;
            memset(&im, 0, sizeof im);
            im.path = path_join(ctx, dir, fn);
            if (!im.path) { s = LORA_E_NOMEM; break; }
            im.repeats = repeats;
            im.is_reg = is_reg;
            im.folder = fi;
            lora_status r = read_caption(ctx, im.path, ds->caption_ext, &im.caption);
            if (r == LORA_OK && !im.caption) {
                im.caption = lora_strdup(ctx, class_tokens);
                if (!im.caption) r = LORA_E_NOMEM;
            }
            if (r == LORA_OK) r = probe_image(ctx, im.path, ds->o.verify_images, &im.w, &im.h);
            parse_face_info(im.path, im.face);
            if (r == LORA_OK && !ds->o.enable_bucket && ds->o.cache == DS_CACHE_NONE) {
                int larger = im.w >= ds->o.width && im.h >= ds->o.height;
                int fits = (im.w == ds->o.width && im.h == ds->o.height) ||
                           ((ds->o.random_crop || has_face(&ds->o, &im)) && larger);
                if (!fits)
                    r = lora_fail(ctx, LORA_E_CONFIG_RANGE,
                                  "%s: image is %dx%d but bucketing is off and the resolution is %dx%d "
                                  "(use enable_bucket, random_crop for larger images, or resize the image)",
                                  im.path, im.w, im.h, ds->o.width, ds->o.height);
            }
            if (r != LORA_OK) {
                lora_free(ctx, im.path);
                lora_free(ctx, im.caption);
                s = bad_file(ds, r);
                continue;
            }
            s = push_image(ds, &im);
            if (s != LORA_OK) { lora_free(ctx, im.path); lora_free(ctx, im.caption); break; }
            ds->fold[fi].img_count++;
        }
    }
    /* Upper-case extensions are not globbed by kohya on Linux either: say so. */
    for (int64_t i = 0; i < files.n && s == LORA_OK; i++) {
        const char *fn = files.v[i];
        int lower = 0, any = 0;
        for (int e = 0; e < N_IMAGE_EXTS; e++) {
            lower |= ends_with(fn, IMAGE_EXTS[e]);
            any |= ends_with_ci(fn, IMAGE_EXTS[e]);
        }
        if (any && !lower)
            lora_log(ctx, LORA_LOG_WARN, "dataset: ignoring %s/%s: only lower-case extensions (.png .jpg .jpeg .webp .bmp) are read, as kohya does",
                     dir, fn);
    }
    if (s == LORA_OK)
        lora_log(ctx, LORA_LOG_INFO, "dataset: %s: %lld image files, %d usable, repeats %d%s", dir, (long long)found,
                 ds->fold[fi].img_count, repeats, is_reg ? " (regularization)" : "");
    if (s == LORA_OK) {
        /* tag frequency over the captions of this folder's usable images */
        for (int64_t i = first_img; i < ds->n_img && s == LORA_OK; i++) s = tag_count_caption(ds, fi, ds->img[i].caption);
    }
    names_free(ctx, &files);
    lora_free(ctx, dir);
    return s;
}

static lora_status scan_root(struct lora_dataset *ds, const char *root, int is_reg) {
    lora_ctx *ctx = ds->ctx;
    const char *what = is_reg ? "reg_data_dir" : "train_data_dir";
    struct stat sb;
    if (stat(root, &sb) != 0)
        return lora_fail(ctx, LORA_E_NOT_FOUND, "%s '%s' does not exist", what, root);
    if (!S_ISDIR(sb.st_mode))
        return lora_fail(ctx, LORA_E_NOT_FOUND, "%s '%s' is not a folder", what, root);
    struct name_list dirs;
    LORA_TRY(list_dir(ctx, root, 1, &dirs));
    lora_status s = LORA_OK;
    int32_t used = 0;
    for (int64_t i = 0; i < dirs.n && s == LORA_OK; i++) {
        const char *nm = dirs.v[i];
        const char *us = strchr(nm, '_');
        size_t tok_n = us ? (size_t)(us - nm) : strlen(nm);
        int64_t rep;
        if (!parse_repeats(nm, tok_n, &rep)) {
            lora_log(ctx, LORA_LOG_INFO, "dataset: ignoring folder without repeats: %s/%s (expected \"<repeats>_<caption>\")", root, nm);
            continue;
        }
        if (rep < 1) {
            lora_log(ctx, LORA_LOG_INFO, "dataset: ignoring folder %s/%s: repeats %lld is less than 1", root, nm, (long long)rep);
            continue;
        }
        if (rep > 1000000) {
            s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "%s/%s: repeats %lld is above 1000000", root, nm, (long long)rep);
            break;
        }
        s = load_folder(ds, root, nm, (int32_t)rep, us ? us + 1 : "", is_reg);
        used++;
    }
    names_free(ctx, &dirs);
    if (s != LORA_OK) return s;
    if (used == 0 && !is_reg) {
        /* The most common mistake: pointing at the image folder itself. */
        struct name_list files;
        int has_images = 0;
        if (list_dir(ctx, root, 0, &files) == LORA_OK) {
            for (int64_t i = 0; i < files.n; i++)
                for (int e = 0; e < N_IMAGE_EXTS; e++) has_images |= ends_with_ci(files.v[i], IMAGE_EXTS[e]);
            names_free(ctx, &files);
        }
        lora_clear_error(ctx);
        return lora_fail(ctx, LORA_E_NOT_FOUND,
                         "%s '%s' has no \"<repeats>_<caption>\" sub-folders%s; the expected layout is "
                         "%s/<repeats>_<caption>/<image>.png (e.g. %s/10_sks dog/001.png), as kohya's train_network.py",
                         what, root, has_images ? " but holds images itself: point it at the parent folder" : "",
                         root, root);
    }
    return LORA_OK;
}

static lora_status make_buckets(struct lora_dataset *ds) {
    lora_ctx *ctx = ds->ctx;
    const struct ds_opts *o = &ds->o;
    int32_t cap = 4 + 2 * ((o->max_bucket_reso - o->min_bucket_reso) / (o->bucket_reso_steps > 0 ? o->bucket_reso_steps : 1) + 2);
    struct ds_reso *pre = lora_malloc(ctx, (size_t)cap * sizeof *pre);
    struct ds_reso *used = lora_malloc(ctx, (size_t)(ds->n_img + 1) * sizeof *used);
    if (!pre || !used) { lora_free(ctx, pre); lora_free(ctx, used); return LORA_E_NOMEM; }
    int32_t n_pre;
    if (o->enable_bucket) {
        n_pre = o->bucket_no_upscale ? 0
              : ds_bucket_resolutions(o->width, o->height, o->min_bucket_reso, o->max_bucket_reso, o->bucket_reso_steps, pre, cap);
    } else {
        pre[0] = (struct ds_reso){ o->width, o->height };
        n_pre = 1;
    }
    int32_t n_used = 0;
    for (int64_t i = 0; i < ds->n_img; i++) {
        struct ds_image *im = &ds->img[i];
        select_bucket(o, pre, n_pre, im->w, im->h, &im->bw, &im->bh, &im->rw, &im->rh);
        if (im->bw <= 0 || im->bh <= 0) {
            lora_free(ctx, pre); lora_free(ctx, used);
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "%s: image %dx%d is smaller than one bucket step (%d)",
                             im->path, im->w, im->h, o->bucket_reso_steps);
        }
        int found = 0;
        for (int32_t k = 0; k < n_used; k++) if (used[k].w == im->bw && used[k].h == im->bh) found = 1;
        if (!found) used[n_used++] = (struct ds_reso){ im->bw, im->bh };
    }
    qsort(used, (size_t)n_used, sizeof *used, cmp_reso);
    ds->bk = lora_calloc(ctx, (size_t)(n_used ? n_used : 1), sizeof *ds->bk);
    if (!ds->bk) { lora_free(ctx, pre); lora_free(ctx, used); return LORA_E_NOMEM; }
    ds->n_bk = n_used;
    for (int32_t k = 0; k < n_used; k++) { ds->bk[k].w = used[k].w; ds->bk[k].h = used[k].h; }
    lora_free(ctx, pre);
    lora_free(ctx, used);
    for (int64_t i = 0; i < ds->n_img; i++) {
        struct ds_image *im = &ds->img[i];
        for (int32_t k = 0; k < ds->n_bk; k++)
            if (ds->bk[k].w == im->bw && ds->bk[k].h == im->bh) im->bucket = k;
        ds->bk[im->bucket].n += im->repeats;
    }
    for (int32_t k = 0; k < ds->n_bk; k++) {
        ds->bk[k].items = lora_malloc(ctx, (size_t)(ds->bk[k].n ? ds->bk[k].n : 1) * sizeof(int64_t));
        if (!ds->bk[k].items) return LORA_E_NOMEM;
        ds->bk[k].n = 0;
    }
    for (int64_t i = 0; i < ds->n_img; i++) {
        struct ds_bucket *b = &ds->bk[ds->img[i].bucket];
        for (int32_t r = 0; r < ds->img[i].repeats; r++) b->items[b->n++] = i;
    }
    int64_t nb = 0, bs = o->batch_size;
    for (int32_t k = 0; k < ds->n_bk; k++) nb += (ds->bk[k].n + bs - 1) / bs;
    ds->n_batches = nb;
    ds->batch_bucket = lora_malloc(ctx, (size_t)(nb ? nb : 1) * sizeof *ds->batch_bucket);
    ds->batch_index = lora_malloc(ctx, (size_t)(nb ? nb : 1) * sizeof *ds->batch_index);
    ds->perm = lora_malloc(ctx, (size_t)(nb ? nb : 1) * sizeof *ds->perm);
    ds->bucket_perm = lora_calloc(ctx, (size_t)(ds->n_bk ? ds->n_bk : 1), sizeof *ds->bucket_perm);
    if (!ds->batch_bucket || !ds->batch_index || !ds->perm || !ds->bucket_perm) return LORA_E_NOMEM;
    for (int32_t k = 0; k < ds->n_bk; k++) {
        ds->bucket_perm[k] = lora_malloc(ctx, (size_t)(ds->bk[k].n ? ds->bk[k].n : 1) * sizeof(int64_t));
        if (!ds->bucket_perm[k]) return LORA_E_NOMEM;
    }
    int64_t j = 0;
    for (int32_t k = 0; k < ds->n_bk; k++) {
        int64_t c = (ds->bk[k].n + bs - 1) / bs;
        for (int64_t t = 0; t < c; t++) { ds->batch_bucket[j] = k; ds->batch_index[j] = t; j++; }
    }
    ds->perm_epoch = -1;
    if (o->enable_bucket) {
        for (int32_t k = 0; k < ds->n_bk; k++)
            lora_log(ctx, LORA_LOG_INFO, "dataset: bucket %d: resolution (%d, %d), count: %lld", k, ds->bk[k].w, ds->bk[k].h,
                     (long long)ds->bk[k].n);
    }
    return LORA_OK;
}

/* kohya's reg balancing: register reg images in order adding their repeats until the total
 * reaches num_train_images (the rest are unused); if still short, add 1 repeat to each in turn. */
static void balance_reg(struct lora_dataset *ds, int64_t first_reg) {
    int64_t n = 0, n_reg_imgs = ds->n_img - first_reg, keep = 0;
    if (n_reg_imgs == 0 || ds->n_train == 0) {
        ds->n_img = first_reg;      /* no reg images used (freed by the caller's bookkeeping) */
        return;
    }
    int first = 1;
    while (n < ds->n_train) {
        for (int64_t i = first_reg; i < first_reg + n_reg_imgs; i++) {
            if (first) { n += ds->img[i].repeats; keep = i - first_reg + 1; }
            else { ds->img[i].repeats++; n++; }
            if (n >= ds->n_train) break;
        }
        first = 0;
    }
    ds->n_reg = n;
    ds->n_img = first_reg + keep;
}

void ds_free(struct lora_dataset *ds) {
    if (!ds) return;
    lora_ctx *ctx = ds->ctx;
    for (int64_t i = 0; i < ds->n_img; i++) {
        lora_free(ctx, ds->img[i].path);
        lora_free(ctx, ds->img[i].caption);
        lora_free(ctx, ds->img[i].lat);
        lora_free(ctx, ds->img[i].lat_flip);
    }
    lora_free(ctx, ds->img);
    for (int32_t f = 0; f < ds->n_fold; f++) lora_free(ctx, ds->fold[f].name);
    lora_free(ctx, ds->fold);
    for (int32_t k = 0; k < ds->n_bk; k++) {
        lora_free(ctx, ds->bk[k].items);
        if (ds->bucket_perm) lora_free(ctx, ds->bucket_perm[k]);
    }
    lora_free(ctx, ds->bk);
    lora_free(ctx, ds->bucket_perm);
    lora_free(ctx, ds->batch_bucket);
    lora_free(ctx, ds->batch_index);
    lora_free(ctx, ds->perm);
    for (int64_t i = 0; i < ds->n_tags; i++) lora_free(ctx, ds->tags[i].tag);
    lora_free(ctx, ds->tags);
    lora_free(ctx, ds->tag_ht);
    for (int64_t i = 0; i < ds->n_skips; i++) lora_free(ctx, ds->skips[i].msg);
    lora_free(ctx, ds->skips);
    if (ds->caps) for (int32_t i = 0; i < ds->o.batch_size; i++) lora_free(ctx, ds->caps[i]);
    lora_free(ctx, ds->caps);
    lora_free(ctx, ds->pix);
    lora_free(ctx, ds->lat);
    lora_free(ctx, ds->lw);
    lora_free(ctx, ds->isreg);
    lora_free(ctx, ds->caption_ext);
    lora_free(ctx, ds->train_dir);
    lora_free(ctx, ds->reg_dir);
    lora_free(ctx, ds);
}

static lora_status check_opts(lora_ctx *ctx, const struct ds_opts *o) {
    if (!o->train_data_dir || !o->train_data_dir[0])
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "train_data_dir is not set");
    if (o->width < 64 || o->height < 64 || o->width > 8192 || o->height > 8192)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "resolution %dx%d is outside 64..8192", o->width, o->height);
    if (o->batch_size < 1 || o->batch_size > 1024)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "train_batch_size %d is outside 1..1024", o->batch_size);
    if (o->keep_tokens < 0) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "keep_tokens %d is negative", o->keep_tokens);
    if (!(o->caption_dropout_rate >= 0 && o->caption_dropout_rate <= 1) || !(o->caption_tag_dropout_rate >= 0 && o->caption_tag_dropout_rate <= 1))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "caption dropout rates must be in 0..1");
    if (o->caption_dropout_every_n_epochs < 0)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "caption_dropout_every_n_epochs %d is negative", o->caption_dropout_every_n_epochs);
    if (o->face_crop_aug_range[1] > 0 && !(o->face_crop_aug_range[0] > 0 && o->face_crop_aug_range[0] <= o->face_crop_aug_range[1]))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "face_crop_aug_range %g,%g: want 0 < a <= b",
                         o->face_crop_aug_range[0], o->face_crop_aug_range[1]);
    if (o->bad_input != DS_BAD_SKIP && o->bad_input != DS_BAD_REFUSE)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "bad_input policy %d is not skip (0) or refuse (1)", o->bad_input);
    if (o->enable_bucket) {
        if (o->bucket_reso_steps < 1 || o->min_bucket_reso < 1 || o->max_bucket_reso < o->min_bucket_reso)
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "bucket settings min %d max %d steps %d are inconsistent",
                             o->min_bucket_reso, o->max_bucket_reso, o->bucket_reso_steps);
        int32_t mn = o->width < o->height ? o->width : o->height, mx = o->width > o->height ? o->width : o->height;
        if (mn < o->min_bucket_reso)
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "min_bucket_reso %d must be <= the smaller resolution side %d", o->min_bucket_reso, mn);
        if (mx > o->max_bucket_reso)
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "max_bucket_reso %d must be >= the larger resolution side %d", o->max_bucket_reso, mx);
    }
    return LORA_OK;
}

lora_status ds_open(struct lora_dataset **out, lora_ctx *ctx, const struct ds_opts *o) {
    if (!out || !o) return lora_fail(ctx, LORA_E_INVALID_ARG, "ds_open: NULL argument");
    *out = NULL;
    LORA_TRY(check_opts(ctx, o));
    struct lora_dataset *ds = lora_calloc(ctx, 1, sizeof *ds);
    if (!ds) return LORA_E_NOMEM;
    ds->ctx = ctx;
    ds->o = *o;
    ds->caption_ext = lora_strdup(ctx, o->caption_extension ? o->caption_extension : ".caption");
    ds->train_dir = lora_strdup(ctx, o->train_data_dir);
    ds->reg_dir = o->reg_data_dir && o->reg_data_dir[0] ? lora_strdup(ctx, o->reg_data_dir) : NULL;
    if (!ds->caption_ext || !ds->train_dir || (o->reg_data_dir && o->reg_data_dir[0] && !ds->reg_dir)) {
        ds_free(ds);
        return LORA_E_NOMEM;
    }
    ds->o.caption_extension = ds->caption_ext;
    ds->o.train_data_dir = ds->train_dir;
    ds->o.reg_data_dir = ds->reg_dir;
    lora_status s = scan_root(ds, ds->train_dir, 0);
    int64_t first_reg = ds->n_img;
    if (s == LORA_OK) {
        for (int64_t i = 0; i < ds->n_img; i++) ds->n_train += ds->img[i].repeats;
        if (ds->n_train == 0)
            s = lora_fail(ctx, LORA_E_NOT_FOUND, "train_data_dir '%s': no usable images found in its \"<repeats>_<caption>\" folders%s",
                          ds->train_dir, ds->n_skips ? " (all were skipped as unreadable)" : "");
    }
    if (s == LORA_OK && ds->reg_dir) s = scan_root(ds, ds->reg_dir, 1);
    if (s == LORA_OK) {
        int64_t before = ds->n_img;
        balance_reg(ds, first_reg);
        for (int64_t i = ds->n_img; i < before; i++) {       /* unused reg images */
            lora_free(ctx, ds->img[i].path);
            lora_free(ctx, ds->img[i].caption);
        }
        lora_log(ctx, LORA_LOG_INFO, "dataset: %lld train images with repeating, %lld reg images after balancing",
                 (long long)ds->n_train, (long long)ds->n_reg);
    }
    if (s == LORA_OK) s = make_buckets(ds);
    if (s == LORA_OK) {
        int32_t bs = o->batch_size;
        ds->caps = lora_calloc(ctx, (size_t)bs, sizeof *ds->caps);
        ds->lw = lora_malloc(ctx, (size_t)bs * sizeof *ds->lw);
        ds->isreg = lora_malloc(ctx, (size_t)bs * sizeof *ds->isreg);
        if (!ds->caps || !ds->lw || !ds->isreg) s = LORA_E_NOMEM;
    }
    if (s != LORA_OK) { ds_free(ds); return s; }
    *out = ds;
    return LORA_OK;
}

int64_t ds_num_train_images(const struct lora_dataset *ds) { return ds ? ds->n_train : 0; }
int64_t ds_num_reg_images(const struct lora_dataset *ds) { return ds ? ds->n_reg : 0; }
int64_t ds_batches_per_epoch(const struct lora_dataset *ds) { return ds ? ds->n_batches : 0; }

int64_t ds_num_reg_images_kohya(const struct lora_dataset *ds) {
    int64_t n = 0;
    for (int32_t f = 0; ds && f < ds->n_fold; f++)
        if (ds->fold[f].is_reg) n += (int64_t)ds->fold[f].repeats * ds->fold[f].img_count;
    return n;
}

int32_t ds_max_batch_pixels(const struct lora_dataset *ds, int32_t *max_w, int32_t *max_h) {
    int32_t mw = 0, mh = 0;
    int64_t mp = 0;
    for (int32_t k = 0; ds && k < ds->n_bk; k++) {
        if (ds->bk[k].w > mw) mw = ds->bk[k].w;
        if (ds->bk[k].h > mh) mh = ds->bk[k].h;
        if ((int64_t)ds->bk[k].w * ds->bk[k].h > mp) mp = (int64_t)ds->bk[k].w * ds->bk[k].h;
    }
    if (max_w) *max_w = mw;
    if (max_h) *max_h = mh;
    return (int32_t)(mp > INT32_MAX ? INT32_MAX : mp);
}

int64_t ds_num_skipped(const struct lora_dataset *ds) { return ds ? ds->n_skips : 0; }
const char *ds_skipped_message(const struct lora_dataset *ds, int64_t i) {
    return ds && i >= 0 && i < ds->n_skips ? ds->skips[i].msg : NULL;
}

int32_t ds_num_buckets(const struct lora_dataset *ds) { return ds ? ds->n_bk : 0; }
int64_t ds_bucket_info(const struct lora_dataset *ds, int32_t k, int32_t *w, int32_t *h) {
    if (!ds || k < 0 || k >= ds->n_bk) return -1;
    if (w) *w = ds->bk[k].w;
    if (h) *h = ds->bk[k].h;
    return ds->bk[k].n;
}
int64_t ds_num_images(const struct lora_dataset *ds) { return ds ? ds->n_img : 0; }
const char *ds_image_info(const struct lora_dataset *ds, int64_t i, struct ds_image_info *info) {
    if (!ds || i < 0 || i >= ds->n_img) return NULL;
    const struct ds_image *im = &ds->img[i];
    if (info) {
        info->width = im->w; info->height = im->h;
        info->bucket_w = im->bw; info->bucket_h = im->bh;
        info->resized_w = im->rw; info->resized_h = im->rh;
        info->repeats = im->repeats; info->is_reg = im->is_reg;
        info->caption = im->caption;
    }
    return im->path;
}

lora_status ds_bucket_info_json(const struct lora_dataset *ds, char **out) {
    if (!ds || !out) return LORA_E_INVALID_ARG;
    struct sbuf b = { ds->ctx, NULL, 0, 0, 0 };
    if (!ds->o.enable_bucket) {
        sb_str(&b, "null");
    } else {
        char num[160];
        sb_str(&b, "{\"buckets\": {");
        int first = 1;
        for (int32_t k = 0; k < ds->n_bk; k++) {
            if (ds->bk[k].n == 0) continue;
            snprintf(num, sizeof num, "%s\"%d\": {\"resolution\": [%d, %d], \"count\": %lld}", first ? "" : ", ", k,
                     ds->bk[k].w, ds->bk[k].h, (long long)ds->bk[k].n);
            sb_str(&b, num);
            first = 0;
        }
        double *err = lora_malloc(ds->ctx, (size_t)(ds->n_img ? ds->n_img : 1) * sizeof *err);
        if (!err) { lora_free(ds->ctx, b.p); return LORA_E_NOMEM; }
        for (int64_t i = 0; i < ds->n_img; i++) {
            const struct ds_image *im = &ds->img[i];
            err[i] = fabs((double)im->bw / (double)im->bh - (double)im->w / (double)im->h);
        }
        double mean = ds->n_img ? np_pairwise_sum(err, ds->n_img) / (double)ds->n_img : NAN;
        lora_free(ds->ctx, err);
        char fr[40];
        py_float_repr(mean, fr, sizeof fr);
        snprintf(num, sizeof num, "}, \"mean_img_ar_error\": %s}", fr);
        sb_str(&b, num);
    }
    if (b.err) { lora_free(ds->ctx, b.p); return LORA_E_NOMEM; }
    *out = b.p;
    return LORA_OK;
}

/* ---- per-epoch order --------------------------------------------------------------------------- */

static void ensure_epoch(struct lora_dataset *ds, int64_t epoch) {
    if (ds->perm_epoch == epoch) return;
    struct ds_rng r;
    for (int64_t j = 0; j < ds->n_batches; j++) ds->perm[j] = j;
    rng_init(&r, ds->o.seed, epoch, RNG_EPOCH_ORDER, 0, 0);
    shuffle_i64(&r, ds->perm, ds->n_batches);
    for (int32_t k = 0; k < ds->n_bk; k++) {
        memcpy(ds->bucket_perm[k], ds->bk[k].items, (size_t)ds->bk[k].n * sizeof(int64_t));
        rng_init(&r, ds->o.seed, epoch, RNG_BUCKET, (uint32_t)k, 0);
        shuffle_i64(&r, ds->bucket_perm[k], ds->bk[k].n);
    }
    ds->perm_epoch = epoch;
}

/* ---- caption processing ------------------------------------------------------------------------ */

/* process_caption: dropout (rate, every n epochs), else split/strip/keep/shuffle/tag-dropout.
 * Returns a lora_malloc'd string. */
static char *process_caption(struct lora_dataset *ds, struct ds_rng *r, int64_t epoch, const char *cap) {
    lora_ctx *ctx = ds->ctx;
    const struct ds_opts *o = &ds->o;
    int drop = o->caption_dropout_rate > 0 && rng_uniform(r) < o->caption_dropout_rate;
    drop = drop || (o->caption_dropout_every_n_epochs > 0 && epoch % o->caption_dropout_every_n_epochs == 0);
    if (drop) return lora_strdup(ctx, "");
    if (!o->shuffle_caption && !(o->caption_tag_dropout_rate > 0)) return lora_strdup(ctx, cap);
    size_t n = strlen(cap), b = 0, e = n;
    py_strip(cap, &b, &e);
    int64_t nt = 1;
    for (size_t i = b; i < e; i++) nt += cap[i] == ',';
    size_t *tb = lora_malloc(ctx, (size_t)nt * sizeof *tb), *te = lora_malloc(ctx, (size_t)nt * sizeof *te);
    int64_t *ord = lora_malloc(ctx, (size_t)nt * sizeof *ord);
    char *outs = lora_malloc(ctx, n + 2 * (size_t)nt + 1);
    if (!tb || !te || !ord || !outs) {
        lora_free(ctx, tb); lora_free(ctx, te); lora_free(ctx, ord); lora_free(ctx, outs);
        return NULL;
    }
    int64_t k = 0;
    size_t s0 = b;
    for (size_t i = b; i <= e; i++) {
        if (i == e || cap[i] == ',') {
            size_t x = s0, y = i;
            py_strip(cap, &x, &y);
            tb[k] = x; te[k] = y; ord[k] = k; k++;
            s0 = i + 1;
        }
    }
    int64_t keep = o->keep_tokens < nt ? o->keep_tokens : nt;
    if (o->shuffle_caption) shuffle_i64(r, ord + keep, nt - keep);
    size_t on = 0;
    int first = 1;
    for (int64_t i = 0; i < nt; i++) {
        if (i >= keep && o->caption_tag_dropout_rate > 0 && !(rng_uniform(r) >= o->caption_tag_dropout_rate)) continue;
        if (!first) { outs[on++] = ','; outs[on++] = ' '; }
        first = 0;
        memcpy(outs + on, cap + tb[ord[i]], te[ord[i]] - tb[ord[i]]);
        on += te[ord[i]] - tb[ord[i]];
    }
    outs[on] = 0;
    lora_free(ctx, tb); lora_free(ctx, te); lora_free(ctx, ord);
    return outs;
}

/* Exposed for tests: caption processing of `cap` as sample `slot` of batch `index`. */
lora_status ds_process_caption(struct lora_dataset *ds, int64_t epoch, int64_t index, int32_t slot,
                               const char *cap, char **out) {
    struct ds_rng r;
    rng_init(&r, ds->o.seed, epoch, RNG_SAMPLE, (uint32_t)index, (uint32_t)slot << 20);
    (void)rng_uniform(&r);          /* the same draws as ds_batch: flip/latent choice first */
    *out = process_caption(ds, &r, epoch, cap);
    return *out ? LORA_OK : LORA_E_NOMEM;
}

/* ---- pixels ------------------------------------------------------------------------------------ */

/* albumentations' HueSaturationValue on uint8 RGB (hue only): cv2 RGB2HSV (H in 0..179, 12-bit
 * fixed-point tables), hue through the LUT mod(i + shift, 180) truncated to uint8, cv2 HSV2RGB
 * (float, hscale 6/180). The integer and float steps follow OpenCV's scalar code. */
void ds_aug_hue_shift(uint8_t *p, size_t npix, double shift) {
    uint8_t lut[256];
    for (int i = 0; i < 256; i++) {
        double v = fmod(i + shift, 180.0);
        if (v < 0) v += 180.0;
        lut[i] = (uint8_t)v;
    }
    enum { SHIFT = 12 };
    int sdiv[256], hdiv[256];
    sdiv[0] = hdiv[0] = 0;
    for (int i = 1; i < 256; i++) {
        sdiv[i] = (int)lrint((255 << SHIFT) / (1. * i));
        hdiv[i] = (int)lrint((180 << SHIFT) / (6. * i));
    }
    static const int sector_data[6][3] = { {1, 3, 0}, {1, 0, 2}, {3, 0, 1}, {0, 2, 1}, {0, 1, 3}, {2, 1, 0} };
    for (size_t i = 0; i < npix; i++) {
        int r = p[3 * i], g = p[3 * i + 1], b = p[3 * i + 2];
        int v = r > g ? r : g, vmin = r < g ? r : g;
        if (b > v) v = b;
        if (b < vmin) vmin = b;
        int diff = v - vmin;
        int vr = v == r ? -1 : 0, vg = v == g ? -1 : 0;
        int sv = (diff * sdiv[v] + (1 << (SHIFT - 1))) >> SHIFT;
        int h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + ((~vg) & (r - g + 4 * diff))));
        h = (h * hdiv[diff] + (1 << (SHIFT - 1))) >> SHIFT;
        h += h < 0 ? 180 : 0;
        float hf = (float)lut[(uint8_t)h] * (6.f / 180.f), sf = (float)sv * (1.f / 255.f), vf = (float)v * (1.f / 255.f);
        float bo, go, ro;
        if (sf == 0) {
            bo = go = ro = vf;
        } else {
            while (hf < 0) hf += 6;
            while (hf >= 6) hf -= 6;
            int sector = (int)floorf(hf);
            hf -= (float)sector;
            if ((unsigned)sector >= 6u) { sector = 0; hf = 0.f; }
            float tab[4] = { vf, vf * (1.f - sf), vf * (1.f - sf * hf), vf * (1.f - sf * (1.f - hf)) };
            bo = tab[sector_data[sector][0]];
            go = tab[sector_data[sector][1]];
            ro = tab[sector_data[sector][2]];
        }
        p[3 * i] = sat_u8(ro * 255.f);
        p[3 * i + 1] = sat_u8(go * 255.f);
        p[3 * i + 2] = sat_u8(bo * 255.f);
    }
}

/* albumentations' gamma_transform on uint8: LUT of (arange(0, 256/255, 1/255) ** gamma) * 255,
 * truncated by astype(uint8). */
void ds_aug_gamma(uint8_t *p, size_t n, double gamma) {
    uint8_t lut[256];
    for (int i = 0; i < 256; i++) lut[i] = (uint8_t)(pow(i * (1.0 / 255), gamma) * 255.0);
    for (size_t i = 0; i < n; i++) p[i] = lut[p[i]];
}

static int64_t floordiv(int64_t a, int64_t b) { int64_t q = a / b; return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q; }

/* kohya's crop_target: scale so the face lands between size/b and size/a (never above 1, never
 * below covering the target), then crop around the face (jitter, or the triangular offset of
 * random_crop). src is consumed. */
static lora_status face_crop(struct lora_dataset *ds, const struct ds_image *im, struct ds_rng *r,
                             struct img_rgb8 *src, struct img_rgb8 *out) {
    lora_ctx *ctx = ds->ctx;
    const struct ds_opts *o = &ds->o;
    int32_t W = o->width, H = o->height, size = W < H ? W : H;
    if (src->width == W && src->height == H) { *out = *src; return LORA_OK; }
    double a = o->face_crop_aug_range[0], b = o->face_crop_aug_range[1];
    int32_t fs = im->face[2] > im->face[3] ? im->face[2] : im->face[3];
    double min_scale = fmax((double)H / src->height, (double)W / src->width);
    min_scale = fmin(1.0, fmax(min_scale, size / (fs * b)));
    double max_scale = fmin(1.0, fmax(min_scale, size / (fs * a)));
    double scale = min_scale >= max_scale ? min_scale : min_scale + (max_scale - min_scale) * rng_uniform(r);
    int32_t nh = (int32_t)(src->height * scale + .5), nw = (int32_t)(src->width * scale + .5);
    if (nh < H || nw < W) {
        img_free(ctx, src);
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "%s: face crop scale %g leaves %dx%d, below %dx%d", im->path, scale, nw, nh, W, H);
    }
    struct img_rgb8 rs = {0};
    rs.data = lora_malloc(ctx, (size_t)nw * (size_t)nh * 3);
    if (!rs.data) { img_free(ctx, src); return LORA_E_NOMEM; }
    rs.width = nw;
    rs.height = nh;
    lora_status s = img_resize_area_u8(ctx, src->data, src->width, src->height, rs.data, nw, nh, 3);
    img_free(ctx, src);
    if (s != LORA_OK) { img_free(ctx, &rs); return s; }
    int32_t fc[2] = { (int32_t)(im->face[1] * scale + .5), (int32_t)(im->face[0] * scale + .5) };   /* y, x */
    int32_t tgt[2] = { H, W }, len[2] = { nh, nw }, p1[2];
    for (int axis = 0; axis < 2; axis++) {
        int64_t p = fc[axis] - tgt[axis] / 2;
        if (o->random_crop) {
            int64_t range = len[axis] - fc[axis] > fc[axis] ? len[axis] - fc[axis] : fc[axis];
            p = p + (rng_int(r, range) + rng_int(r, range)) - range;
        } else if (a != b && fs > size / 10 && fs >= 40) {
            int64_t lo = floordiv(-fs, 20), hi = floordiv(fs, 20);
            p += lo + rng_int(r, hi - lo);
        }
        if (p > len[axis] - tgt[axis]) p = len[axis] - tgt[axis];
        if (p < 0) p = 0;
        p1[axis] = (int32_t)p;
    }
    struct img_rgb8 c = {0};
    c.data = lora_malloc(ctx, (size_t)W * (size_t)H * 3);
    if (!c.data) { img_free(ctx, &rs); return LORA_E_NOMEM; }
    c.width = W;
    c.height = H;
    for (int32_t y = 0; y < H; y++)
        memcpy(c.data + (size_t)y * W * 3, rs.data + ((size_t)(y + p1[0]) * nw + p1[1]) * 3, (size_t)W * 3);
    img_free(ctx, &rs);
    *out = c;
    return LORA_OK;
}

/* Decode, resize to cover and crop to the bucket (kohya's trim_and_resize_if_required, or the
 * no-bucket random crop), into *out (bw x bh RGB8). */
static lora_status load_cropped(struct lora_dataset *ds, const struct ds_image *im, struct ds_rng *r,
                                int force_resize, struct img_rgb8 *out) {
    lora_ctx *ctx = ds->ctx;
    struct img_limits lim;
    img_limits_default(&lim);
    struct img_rgb8 src;
    LORA_TRY(img_load_rgb8(ctx, im->path, &lim, &src));
    if (src.width != im->w || src.height != im->h) {
        int32_t w = src.width, h = src.height;
        img_free(ctx, &src);
        return lora_fail(ctx, LORA_E_IMG_DECODE, "%s: image changed since the dataset was opened (%dx%d, was %dx%d)",
                         im->path, w, h, im->w, im->h);
    }
    if (!force_resize && has_face(&ds->o, im)) return face_crop(ds, im, r, &src, out);
    struct img_rgb8 rs = src;
    int32_t tw = im->bw, th = im->bh;
    if (ds->o.enable_bucket || force_resize) {
        if (src.width != im->rw || src.height != im->rh) {
            struct img_rgb8 t = {0};
            size_t bytes;
            if (!ck_mul_size((size_t)im->rw * 3, (size_t)im->rh, &bytes)) { img_free(ctx, &src); return LORA_E_LIMIT; }
            t.data = lora_malloc(ctx, bytes);
            if (!t.data) { img_free(ctx, &src); return LORA_E_NOMEM; }
            t.width = im->rw;
            t.height = im->rh;
            lora_status s = img_resize_area_u8(ctx, src.data, src.width, src.height, t.data, t.width, t.height, 3);
            img_free(ctx, &src);
            if (s != LORA_OK) { img_free(ctx, &t); return s; }
            rs = t;
        }
    }
    if (rs.width < tw || rs.height < th) {
        img_free(ctx, &rs);
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "%s: image %dx%d is smaller than its target %dx%d", im->path,
                         rs.width, rs.height, tw, th);
    }
    int32_t px = 0, py = 0;
    if (ds->o.enable_bucket || force_resize) {
        /* width first, then height, as trim_and_resize_if_required */
        if (rs.width > tw) px = ds->o.random_crop ? (int32_t)rng_int(r, rs.width - tw) : (rs.width - tw) / 2;
        if (rs.height > th) py = ds->o.random_crop ? (int32_t)rng_int(r, rs.height - th) : (rs.height - th) / 2;
    } else {
        if (rs.height > th) py = (int32_t)rng_int(r, rs.height - th);
        if (rs.width > tw) px = (int32_t)rng_int(r, rs.width - tw);
    }
    if (px == 0 && py == 0 && rs.width == tw && rs.height == th) { *out = rs; return LORA_OK; }
    struct img_rgb8 c = {0};
    c.data = lora_malloc(ctx, (size_t)tw * (size_t)th * 3);
    if (!c.data) { img_free(ctx, &rs); return LORA_E_NOMEM; }
    c.width = tw;
    c.height = th;
    for (int32_t y = 0; y < th; y++)
        memcpy(c.data + (size_t)y * tw * 3, rs.data + ((size_t)(y + py) * rs.width + px) * 3, (size_t)tw * 3);
    img_free(ctx, &rs);
    *out = c;
    return LORA_OK;
}

static void to_chw(const struct img_rgb8 *im, int flip, float *dst) {
    size_t hw = (size_t)im->width * im->height;
    for (int32_t y = 0; y < im->height; y++)
        for (int32_t x = 0; x < im->width; x++) {
            int32_t sx = flip ? im->width - 1 - x : x;
            const uint8_t *s = im->data + ((size_t)y * im->width + sx) * 3;
            size_t o = (size_t)y * im->width + x;
            for (int c = 0; c < 3; c++) dst[c * hw + o] = ((float)s[c] / 255.0f - 0.5f) / 0.5f;  /* ToTensor + Normalize */
        }
}

lora_status ds_batch(struct lora_dataset *ds, int64_t epoch, int64_t index, struct ds_batch *b) {
    if (!ds || !b) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = ds->ctx;
    if (index < 0 || index >= ds->n_batches)
        return lora_fail(ctx, LORA_E_INVALID_ARG, "ds_batch: index %lld outside 0..%lld", (long long)index, (long long)ds->n_batches - 1);
    ensure_epoch(ds, epoch);
    int64_t j = ds->perm[index];
    int32_t k = ds->batch_bucket[j];
    const struct ds_bucket *bk = &ds->bk[k];
    int64_t start = ds->batch_index[j] * ds->o.batch_size;
    int64_t n = bk->n - start < ds->o.batch_size ? bk->n - start : ds->o.batch_size;
    memset(b, 0, sizeof *b);
    b->n = (int32_t)n;
    b->width = bk->w;
    b->height = bk->h;
    size_t per = (size_t)3 * bk->w * bk->h, lat_per = (size_t)4 * (bk->w / 8) * (bk->h / 8);
    int use_lat = ds->cached;
    if (use_lat) {
        if (lat_per * (size_t)n > ds->lat_cap) {
            lora_free(ctx, ds->lat);
            int32_t mw, mh;
            int64_t mp = ds_max_batch_pixels(ds, &mw, &mh);
            ds->lat_cap = (size_t)4 * (size_t)(mp / 64 + 1) * (size_t)ds->o.batch_size;
            if (ds->lat_cap < lat_per * (size_t)n) ds->lat_cap = lat_per * (size_t)n;
            ds->lat = lora_malloc(ctx, ds->lat_cap * sizeof(float));
            if (!ds->lat) { ds->lat_cap = 0; return LORA_E_NOMEM; }
        }
    } else if (per * (size_t)n > ds->pix_cap) {
        lora_free(ctx, ds->pix);
        int64_t mp = ds_max_batch_pixels(ds, NULL, NULL);
        ds->pix_cap = (size_t)3 * (size_t)mp * (size_t)ds->o.batch_size;
        if (ds->pix_cap < per * (size_t)n) ds->pix_cap = per * (size_t)n;
        ds->pix = lora_malloc(ctx, ds->pix_cap * sizeof(float));
        if (!ds->pix) { ds->pix_cap = 0; return LORA_E_NOMEM; }
    }
    for (int32_t i = 0; i < ds->o.batch_size; i++) { lora_free(ctx, ds->caps[i]); ds->caps[i] = NULL; }
    for (int64_t s = 0; s < n; s++) {
        const struct ds_image *im = &ds->img[ds->bucket_perm[k][start + s]];
        struct ds_rng r;
        rng_init(&r, ds->o.seed, epoch, RNG_SAMPLE, (uint32_t)index, (uint32_t)s << 20);
        double u_flip = rng_uniform(&r);   /* first draw: flip (or flipped-latent choice) */
        ds->lw[s] = im->is_reg ? (float)ds->o.prior_loss_weight : 1.0f;
        ds->isreg[s] = im->is_reg;
        ds->caps[s] = process_caption(ds, &r, epoch, im->caption);
        if (!ds->caps[s]) return LORA_E_NOMEM;
        if (use_lat) {
            const float *src = (!ds->o.flip_aug || u_flip < .5) ? im->lat : im->lat_flip;
            memcpy(ds->lat + (size_t)s * lat_per, src, lat_per * sizeof(float));
            continue;
        }
        struct img_rgb8 px;
        lora_status st = load_cropped(ds, im, &r, 0, &px);
        if (st != LORA_OK) return st;
        if (ds->o.color_aug && rng_uniform(&r) < 0.33) {
            if (rng_uniform(&r) < 0.5) ds_aug_hue_shift(px.data, (size_t)px.width * px.height, -8.0 + 16.0 * rng_uniform(&r));
            else ds_aug_gamma(px.data, (size_t)px.width * px.height * 3, (95.0 + 10.0 * rng_uniform(&r)) / 100.0);
        }
        to_chw(&px, ds->o.flip_aug && u_flip < .5, ds->pix + (size_t)s * per);
        img_free(ctx, &px);
    }
    b->pixels = use_lat ? NULL : ds->pix;
    b->latents = use_lat ? ds->lat : NULL;
    b->captions = (const char **)ds->caps;
    b->loss_weights = ds->lw;
    b->is_reg = ds->isreg;
    return LORA_OK;
}

/* ---- latent cache ------------------------------------------------------------------------------ */

#define LAT_MAGIC "LORALAT1"

struct lat_key {
    uint64_t file_size;
    int64_t mtime_ns;
    uint64_t hash;           /* FNV-1a 64 of the file bytes */
    int32_t bw, bh, rw, rh, n_sets;
};

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ull; }
    return h;
}

static lora_status image_key(lora_ctx *ctx, const struct ds_image *im, int n_sets, struct lat_key *k) {
    struct stat sb;
    if (stat(im->path, &sb) != 0) return lora_fail(ctx, LORA_E_IO, "%s: cannot stat: %s", im->path, strerror(errno));
    uint8_t *buf;
    size_t n;
    LORA_TRY(img_read_file(ctx, im->path, &buf, &n));
    memset(k, 0, sizeof *k);
    k->file_size = n;
    k->mtime_ns = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;
    k->hash = fnv1a(buf, n);
    lora_free(ctx, buf);
    k->bw = im->bw; k->bh = im->bh; k->rw = im->rw; k->rh = im->rh;
    k->n_sets = n_sets;
    return LORA_OK;
}

static char *cache_path(lora_ctx *ctx, const char *img) {
    size_t n = strlen(img);
    char *p = lora_malloc(ctx, n + 16);
    if (p) snprintf(p, n + 16, "%s.lora_latents", img);
    return p;
}

/* 1 and the latents filled when the cache file matches the key; 0 otherwise. */
static int cache_read(lora_ctx *ctx, const char *path, const struct lat_key *k, float *a, float *b, size_t count) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char magic[8];
    struct lat_key fk;
    int ok = fread(magic, 1, 8, f) == 8 && memcmp(magic, LAT_MAGIC, 8) == 0 && fread(&fk, sizeof fk, 1, f) == 1 &&
             fk.file_size == k->file_size && fk.mtime_ns == k->mtime_ns && fk.hash == k->hash && fk.bw == k->bw &&
             fk.bh == k->bh && fk.rw == k->rw && fk.rh == k->rh && fk.n_sets == k->n_sets &&
             fread(a, sizeof(float), count, f) == count && (k->n_sets < 2 || fread(b, sizeof(float), count, f) == count) &&
             fgetc(f) == EOF;
    fclose(f);
    for (size_t i = 0; ok && i < count; i++)
        if (!isfinite(a[i]) || (k->n_sets > 1 && !isfinite(b[i]))) ok = 0;
    (void)ctx;
    return ok;
}

static lora_status cache_write(lora_ctx *ctx, const char *path, const struct lat_key *k, const float *a, const float *b, size_t count) {
    struct atomic_file af;
    LORA_TRY(atomic_file_begin(ctx, path, &af));
    lora_status s = atomic_file_write(&af, LAT_MAGIC, 8);
    if (s == LORA_OK) s = atomic_file_write(&af, k, sizeof *k);
    if (s == LORA_OK) s = atomic_file_write(&af, a, count * sizeof(float));
    if (s == LORA_OK && k->n_sets > 1) s = atomic_file_write(&af, b, count * sizeof(float));
    if (s == LORA_OK) return atomic_file_commit(&af);
    atomic_file_abort(&af);
    return s;
}

lora_status ds_cache_latents(struct lora_dataset *ds, ds_encode_fn encode, void *user) {
    if (!ds || !encode) return LORA_E_INVALID_ARG;
    lora_ctx *ctx = ds->ctx;
    if (ds->o.color_aug || ds->o.random_crop)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "cache_latents cannot be used with color_aug or random_crop (kohya refuses it too)");
    int disk = ds->o.cache == DS_CACHE_DISK;
    int n_sets = ds->o.flip_aug ? 2 : 1;
    for (int64_t i = 0; i < ds->n_img; i++) {
        struct ds_image *im = &ds->img[i];
        size_t hw = (size_t)im->bw * im->bh, count = (size_t)4 * (im->bw / 8) * (im->bh / 8);
        lora_free(ctx, im->lat); lora_free(ctx, im->lat_flip);
        im->lat = lora_malloc(ctx, count * sizeof(float));
        im->lat_flip = n_sets > 1 ? lora_malloc(ctx, count * sizeof(float)) : NULL;
        if (!im->lat || (n_sets > 1 && !im->lat_flip)) return LORA_E_NOMEM;
        struct lat_key key;
        char *cp = NULL;
        if (disk) {
            LORA_TRY(image_key(ctx, im, n_sets, &key));
            cp = cache_path(ctx, im->path);
            if (!cp) return LORA_E_NOMEM;
            if (cache_read(ctx, cp, &key, im->lat, im->lat_flip, count)) { lora_free(ctx, cp); continue; }
        }
        struct img_rgb8 px = {0};
        lora_status s = load_cropped(ds, im, NULL, 1, &px);
        float *pix = s == LORA_OK ? lora_malloc(ctx, 3 * hw * sizeof(float)) : NULL;
        if (s == LORA_OK && !pix) s = LORA_E_NOMEM;
        for (int f = 0; s == LORA_OK && f < n_sets; f++) {
            to_chw(&px, f, pix);
            s = encode(user, pix, 1, im->bh, im->bw, f ? im->lat_flip : im->lat);
            float *l = f ? im->lat_flip : im->lat;
            for (size_t q = 0; s == LORA_OK && q < count; q++)
                if (!isfinite(l[q])) s = lora_fail(ctx, LORA_E_NONFINITE_LATENT, "%s: the encoded latent is not finite (element %zu)", im->path, q);
        }
        img_free(ctx, &px);
        lora_free(ctx, pix);
        if (s == LORA_OK && disk) s = cache_write(ctx, cp, &key, im->lat, im->lat_flip, count);
        lora_free(ctx, cp);
        if (s != LORA_OK) return s;
        LORA_TRY(lora_progress(ctx, LORA_PHASE_CACHE_LATENTS, i + 1, ds->n_img, NAN));
    }
    ds->cached = 1;
    return LORA_OK;
}
