/* Merge into a model, file to file, streamed (merge_lora.py --sd_model; spec/kohya-lora.md §6):
 * the output is written tensor by tensor from the memory-mapped input, each tensor converted to
 * float32, given the precision cast and the LoRA deltas that target it, and converted to its
 * output dtype, so the memory in use is the input's mapping (page cache; a written tensor's
 * pages are released from this process) plus three float32 copies of the largest weight a
 * network changes and a 1 MiB chunk for the casts of the others. The arithmetic is the
 * in-memory merge's (lora_model_cast + ops_merge_into_model + lora_model_save) step for step,
 * so both give the same bytes.
 *
 * .safetensors: the header is computed first (names, shapes and dtypes are known before any
 * value), then the tensors are written in the reference writer's order into the temp file of
 * an atomic_file (fsync, rename). .ckpt: the zip writer needs every record (and its CRC)
 * before the central directory, so the changed tensors are kept in memory until the end and
 * the unchanged ones stay borrowed from the mapping (memory: the changed tensors' size). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cblas.h>
#include <jansson.h>

#include "core/dtype.h"
#include "io/atomic_file.h"
#include "io/ckpt.h"
#include "io/keymap.h"
#include "io/safetensors.h"
#include "ops/ops.h"

#if LORA_HAVE_OPENMP
#include <omp.h>
#endif

#define PAR_MIN 32768   /* elements below which threads cost more than they save */

/* ---- the per-module step shared with the in-memory merge ---------------------------------- */

lora_status ops_apply_module(const struct net_module *mm, double ratio, float *w, float *tmp, int nt) {
    int64_t k = mm->in * mm->kh * mm->kw, n = mm->out * k;
    float scale = (float)ratio * nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, 1.0);
    /* tmp[out, k] = up[out, rank] @ down[rank, k]: the layout of W (convs: in*kh*kw) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)k, (int)mm->rank, 1.0f, mm->up,
                (int)mm->rank, mm->down, (int)k, 0.0f, tmp, (int)k);
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
    for (int64_t e = 0; e < n; e++) w[e] += scale * tmp[e];
    return LORA_OK;
}

int ops_module_fits(const struct net_module *mm, const struct net_target *t) {
    if (mm->out != t->out || mm->in != t->in) return 0;
    if (t->kind == NET_LINEAR) return mm->kh == 1 && mm->kw == 1;   /* 4-D 1x1 onto a Linear: squeezed */
    return mm->kh == t->kh && mm->kw == t->kw;
}

int ops_is_float(lora_dtype t) {
    return t == LORA_DTYPE_F32 || t == LORA_DTYPE_F16 || t == LORA_DTYPE_BF16 || t == LORA_DTYPE_F64;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_F16C_PATH 1
/* float32 -> fp16 with the F16C instruction (round to nearest even, as lora_f32_to_f16; a
 * block holding a NaN goes through lora_f32_to_f16, which writes the canonical quiet NaN). */
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *src, int64_t n, uint16_t *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) {
            for (int k = 0; k < 8; k++) dst[i + k] = lora_f32_to_f16(src[i + k]);
            continue;
        }
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) dst[i] = lora_f32_to_f16(src[i]);
}
#endif

void ops_from_f32(lora_dtype dt, const float *src, int64_t n, void *dst, int nt) {
    if (dt == LORA_DTYPE_F32) { memcpy(dst, src, (size_t)n * 4); return; }
    uint16_t *h = dst;
#ifdef HAVE_F16C_PATH
    if (dt == LORA_DTYPE_F16 && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
        const int64_t blk = 16384;
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t b = 0; b < n; b += blk) f32_to_f16_f16c(src + b, n - b < blk ? n - b : blk, h + b);
        return;
    }
#endif
    if (dt == LORA_DTYPE_F16) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) h[i] = lora_f32_to_f16(src[i]);
    } else {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) h[i] = lora_f32_to_bf16(src[i]);
    }
}

/* F32/F16/BF16 -> float32 as net_to_f32 converts them, on `nt` threads; other dtypes through it. */
static lora_status to_f32(lora_ctx *ctx, const char *name, lora_dtype dt, const void *src, int64_t n, float *dst,
                          int nt) {
    const uint16_t *h = src;
    if (dt == LORA_DTYPE_F32) memcpy(dst, src, (size_t)n * 4);
    else if (dt == LORA_DTYPE_F16) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) dst[i] = lora_f16_to_f32(h[i]);
    } else if (dt == LORA_DTYPE_BF16) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) dst[i] = lora_bf16_to_f32(h[i]);
    } else return net_to_f32(ctx, name, dt, src, n, dst);
    return LORA_OK;
}

/* Rounds float32 values to `dt` (F16/BF16) and back in place: what storing in a tensor of that
 * dtype and reading it again does. */
static void round_to(lora_dtype dt, float *f, int64_t n, int nt) {
    if (dt == LORA_DTYPE_F16) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) f[i] = lora_f16_to_f32(lora_f32_to_f16(f[i]));
    } else if (dt == LORA_DTYPE_BF16) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) f[i] = lora_bf16_to_f32(lora_f32_to_bf16(f[i]));
    }
}

/* 16-bit floats without a NaN go through float32 and back unchanged, so a cast chain
 * F16/BF16 -> F32 -> the same dtype can copy their bytes (a NaN's payload might not survive). */
static int no_nan16(lora_dtype dt, const void *src, int64_t n) {
    const uint16_t *h = src;
    uint16_t exp = dt == LORA_DTYPE_F16 ? 0x7c00 : 0x7f80, man = dt == LORA_DTYPE_F16 ? 0x03ff : 0x007f;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) nan |= (h[i] & exp) == exp && (h[i] & man) != 0;
    return !nan;
}

/* ---- the plan: where each output tensor's values come from -------------------------------- */

struct src_ref {             /* one diffusers tensor of sd.te / sd.unet */
    const void *data;
    int32_t is_te;
    int64_t idx;
};

struct out_part {            /* the elements of a te/unet tensor inside an output tensor, from `off` on */
    int32_t is_te;
    int64_t idx;
    int64_t off;             /* element offset in the output tensor */
};

struct stream {
    lora_ctx *ctx;
    struct sd_model *sd;
    const struct lora_network *const *nets;
    const double *ratios;
    int64_t n_nets;
    struct net_target *tg;
    int64_t nt;
    int64_t *te_tg, *un_tg;  /* target index per te / unet tensor, -1 when none */
    int64_t *mod;            /* [n_nets * nt]: module index of net i on target t, -1 when none */
    struct src_ref *refs;    /* te + unet tensors sorted by data pointer */
    int64_t n_refs;
    lora_dtype prec, save;   /* save 0: keep */
    float *f, *tmp;          /* work buffers of max_numel floats (the largest merge target) */
    void *outb;              /* its converted bytes */
    int64_t max_numel;
    float *cf;               /* MERGE_CHUNK floats: casts of tensors without modules */
    void *cb;                /* their converted bytes */
    int nt_cpu;              /* threads for the element loops */
};

static int cmp_ref(const void *a, const void *b) {
    const struct src_ref *x = a, *y = b;
    uintptr_t p = (uintptr_t)x->data, q = (uintptr_t)y->data;
    return (p > q) - (p < q);
}

static const struct src_ref *find_ref(const struct stream *st, const struct lora_tensor *t) {
    if (!t->data || t->nbytes == 0) return NULL;
    struct src_ref key = {t->data, 0, 0};
    const struct src_ref *r = bsearch(&key, st->refs, (size_t)st->n_refs, sizeof key, cmp_ref);
    if (!r) return NULL;
    /* a pointer can repeat (tensors sharing a storage in a .ckpt): take the one of the same shape */
    while (r > st->refs && r[-1].data == t->data) r--;
    for (; r < st->refs + st->n_refs && r->data == t->data; r++) {
        const struct lora_tensor *s = &(r->is_te ? &st->sd->te : &st->sd->unet)->t[r->idx];
        if (s->nbytes == t->nbytes && s->dtype == t->dtype && s->ndim == t->ndim &&
            memcmp(s->shape, t->shape, (size_t)t->ndim * sizeof t->shape[0]) == 0)
            return r;
    }
    return NULL;
}

/* The parts of LDM tensor `t`: one te/unet tensor, or for v2's packed
 * cond_stage_model.model.transformer.resblocks.N.attn.in_proj_{weight,bias} the q, k and v
 * tensors of layer N. Returns the part count (0: a VAE or extra tensor). */
static int parts_of(const struct stream *st, const struct lora_tensor *t, struct out_part *p) {
    const struct src_ref *r = find_ref(st, t);
    if (r) {
        p[0].is_te = r->is_te;
        p[0].idx = r->idx;
        p[0].off = 0;
        return 1;
    }
    static const char pre[] = "cond_stage_model.model.transformer.resblocks.";
    if (strncmp(t->name, pre, sizeof pre - 1) != 0) return 0;
    char *end;
    long layer = strtol(t->name + sizeof pre - 1, &end, 10);
    const char *leaf = strcmp(end, ".attn.in_proj_weight") == 0 ? "weight" : strcmp(end, ".attn.in_proj_bias") == 0 ? "bias" : NULL;
    if (!leaf || end == t->name + sizeof pre - 1) return 0;
    static const char *qkv[3] = {"q", "k", "v"};
    int64_t off = 0;
    for (int j = 0; j < 3; j++) {
        char nm[160];
        snprintf(nm, sizeof nm, "text_model.encoder.layers.%ld.self_attn.%s_proj.%s", layer, qkv[j], leaf);
        int64_t i = tmap_find(&st->sd->te, nm);
        if (i < 0 || st->sd->te.t[i].dtype != t->dtype) return 0;   /* the last OpenCLIP block: extra */
        p[j].is_te = 1;
        p[j].idx = i;
        p[j].off = off;
        off += tmap_numel(&st->sd->te.t[i]);
    }
    return off == tmap_numel(t) ? 3 : 0;
}

static lora_status plan(struct stream *st) {
    lora_ctx *ctx = st->ctx;
    struct sd_model *sd = st->sd;
    LORA_TRY(net_targets(sd, 1, &st->tg, &st->nt));
    st->te_tg = lora_malloc(ctx, (size_t)(sd->te.n + 1) * sizeof(int64_t));
    st->un_tg = lora_malloc(ctx, (size_t)(sd->unet.n + 1) * sizeof(int64_t));
    st->mod = lora_malloc(ctx, (size_t)(st->n_nets * st->nt + 1) * sizeof(int64_t));
    st->refs = lora_malloc(ctx, (size_t)(sd->te.n + sd->unet.n + 1) * sizeof *st->refs);
    if (!st->te_tg || !st->un_tg || !st->mod || !st->refs) return LORA_E_NOMEM;
    for (int64_t i = 0; i < sd->te.n; i++) st->te_tg[i] = -1;
    for (int64_t i = 0; i < sd->unet.n; i++) st->un_tg[i] = -1;
    for (int64_t t = 0; t < st->nt; t++) {
        struct tensor_map *map = st->tg[t].is_te ? &sd->te : &sd->unet;
        int64_t wi = tmap_find(map, st->tg[t].weight);
        if (wi >= 0) (st->tg[t].is_te ? st->te_tg : st->un_tg)[wi] = t;
    }
    for (int64_t i = 0; i < st->n_nets; i++)
        for (int64_t t = 0; t < st->nt; t++) {
            int64_t k = net_find(st->nets[i], st->tg[t].name);
            st->mod[i * st->nt + t] = k >= 0 && ops_module_fits(&st->nets[i]->m[k], &st->tg[t]) ? k : -1;
        }
    for (int is_te = 0; is_te <= 1; is_te++) {
        const struct tensor_map *map = is_te ? &sd->te : &sd->unet;
        for (int64_t i = 0; i < map->n; i++)
            if (map->t[i].data && map->t[i].nbytes) st->refs[st->n_refs++] = (struct src_ref){map->t[i].data, is_te, i};
    }
    qsort(st->refs, (size_t)st->n_refs, sizeof *st->refs, cmp_ref);
    return LORA_OK;
}

/* What happens to one output tensor: its parts, dtype after the precision cast (`cur`), output
 * dtype, and how many network modules add to it. */
struct tplan {
    struct out_part p[3];
    int np;
    lora_dtype cur, out;
    int64_t mods;
    int changed;             /* 0: the output is the input's bytes */
};

static void classify(const struct stream *st, const struct lora_tensor *t, struct tplan *tp) {
    tp->np = parts_of(st, t, tp->p);
    int fl = t->dtype == LORA_DTYPE_F32 || t->dtype == LORA_DTYPE_F16 || t->dtype == LORA_DTYPE_BF16;
    /* lora_model_cast: text encoder and U-Net tensors of a 16/32-bit float dtype */
    tp->cur = tp->np && fl ? st->prec : t->dtype;
    tp->mods = 0;
    for (int j = 0; j < tp->np; j++) {
        int64_t tgi = (tp->p[j].is_te ? st->te_tg : st->un_tg)[tp->p[j].idx];
        for (int64_t i = 0; tgi >= 0 && i < st->n_nets; i++) tp->mods += st->mod[i * st->nt + tgi] >= 0;
    }
    tp->out = st->save && ops_is_float(tp->cur) ? st->save : tp->cur;
    tp->changed = tp->cur != t->dtype || tp->mods > 0 || tp->out != t->dtype;
}

/* The merged values of a tensor with modules, as float32 in st->f (then ops_from_f32). */
static lora_status merged_f32(struct stream *st, const struct lora_tensor *t, const struct tplan *tp) {
    lora_ctx *ctx = st->ctx;
    int fl = t->dtype == LORA_DTYPE_F32 || t->dtype == LORA_DTYPE_F16 || t->dtype == LORA_DTYPE_BF16;
    if (!fl)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot merge into '%s': dtype %s", t->name, lora_dtype_name(t->dtype));
    int64_t n = tmap_numel(t);
    if (n > st->max_numel) return lora_fail(ctx, LORA_E_INTERNAL, "merge: tensor '%s' larger than planned", t->name);
    LORA_TRY(to_f32(ctx, t->name, t->dtype, t->data, n, st->f, st->nt_cpu));
    if (tp->cur != t->dtype) round_to(tp->cur, st->f, n, st->nt_cpu);
    for (int j = 0; j < tp->np; j++) {
        int64_t tgi = (tp->p[j].is_te ? st->te_tg : st->un_tg)[tp->p[j].idx];
        if (tgi < 0) continue;
        const struct net_target *tg = &st->tg[tgi];
        int64_t pn = tmap_numel(&(tp->p[j].is_te ? &st->sd->te : &st->sd->unet)->t[tp->p[j].idx]);
        if (tg->out * tg->in * tg->kh * tg->kw != pn)
            return lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "merge: '%s' has %lld elements, module '%s' wants %lld",
                             tg->weight, (long long)pn, tg->name, (long long)(tg->out * tg->in * tg->kh * tg->kw));
        /* in network order, each stored (rounded to the tensor's dtype) before the next */
        for (int64_t i = 0; i < st->n_nets; i++) {
            int64_t k = st->mod[i * st->nt + tgi];
            if (k < 0) continue;
            LORA_TRY(ops_apply_module(&st->nets[i]->m[k], st->ratios[i], st->f + tp->p[j].off, st->tmp, st->nt_cpu));
            round_to(tp->cur, st->f + tp->p[j].off, pn, st->nt_cpu);
        }
    }
    return LORA_OK;
}

/* Elements [e0, e0 + n) of a tensor without modules, cast (precision, then save precision) into
 * `dst` in tp->out: element by element, so it goes in chunks through a small buffer. */
static lora_status cast_range(struct stream *st, const struct lora_tensor *t, const struct tplan *tp, int64_t e0,
                              int64_t n, void *dst) {
    int64_t es = lora_dtype_bits(t->dtype) / 8;
    const char *src = (const char *)t->data + e0 * es;
    /* kohya's default (precision float, save_precision = the file's 16-bit dtype): no change */
    if (tp->out == t->dtype && tp->cur == LORA_DTYPE_F32 && (t->dtype == LORA_DTYPE_F16 || t->dtype == LORA_DTYPE_BF16) &&
        no_nan16(t->dtype, src, n)) {
        memcpy(dst, src, (size_t)(n * es));
        return LORA_OK;
    }
    LORA_TRY(to_f32(st->ctx, t->name, t->dtype, src, n, st->cf, st->nt_cpu));
    if (tp->cur != t->dtype) round_to(tp->cur, st->cf, n, st->nt_cpu);
    ops_from_f32(tp->out, st->cf, n, dst, st->nt_cpu);
    return LORA_OK;
}

#define MERGE_CHUNK ((int64_t)1 << 18)   /* elements per cast chunk (1 MiB of float32) */

/* Pages of the input mapping a written tensor came from are dropped from this process (the
 * page cache keeps them), so the resident set stays near one tensor. */
static void release_pages(const void *data, uint64_t nbytes, const void *map, uint64_t map_size) {
    if (!map || !data || nbytes == 0) return;
    uintptr_t b = (uintptr_t)map, p = (uintptr_t)data;
    if (p < b || p + nbytes > b + map_size) return;
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0) return;
    uintptr_t lo = (p + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1), hi = (p + nbytes) & ~((uintptr_t)pg - 1);
    /* (glibc's posix_madvise ignores POSIX_MADV_DONTNEED; on a read-only file mapping
     * MADV_DONTNEED only drops pages, which a later touch reads from the file again) */
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* ---- safetensors header (the reference writer's layout, as io/safetensors.c writes it) ----- */

/* Position of the dtype in the safetensors dtype list: the writer orders tensors by it,
 * descending (alignment), then by name. */
static int st_rank(lora_dtype t) {
    switch (t) {
    case LORA_DTYPE_BOOL: return 0;
    case LORA_DTYPE_U8: return 4;
    case LORA_DTYPE_I8: return 5;
    case LORA_DTYPE_F8_E5M2: return 6;
    case LORA_DTYPE_F8_E4M3: return 7;
    case LORA_DTYPE_I16: return 11;
    case LORA_DTYPE_U16: return 12;
    case LORA_DTYPE_F16: return 13;
    case LORA_DTYPE_BF16: return 14;
    case LORA_DTYPE_I32: return 15;
    case LORA_DTYPE_U32: return 16;
    case LORA_DTYPE_F32: return 17;
    case LORA_DTYPE_F64: return 19;
    case LORA_DTYPE_I64: return 20;
    case LORA_DTYPE_U64: return 21;
    default: return -1;
    }
}

struct wslot {
    const struct lora_tensor *t;
    lora_dtype dt;           /* output dtype */
    int rank;
    uint64_t nbytes;         /* output bytes */
};

static int cmp_wslot(const void *a, const void *b) {
    const struct wslot *x = a, *y = b;
    if (x->rank != y->rank) return x->rank > y->rank ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

static lora_status st_header(lora_ctx *ctx, const char *path, const struct wslot *w, int64_t n, char **out,
                             size_t *out_len) {
    json_t *root = json_object();
    if (!root) return LORA_E_NOMEM;
    lora_status s = LORA_OK;
    uint64_t pos = 0;
    for (int64_t i = 0; i < n && !s; i++) {
        json_t *shape = json_array(), *offs = json_array(), *info = json_object();
        if (!shape || !offs || !info) { json_decref(shape); json_decref(offs); json_decref(info); s = LORA_E_NOMEM; break; }
        for (int d = 0; d < w[i].t->ndim; d++) json_array_append_new(shape, json_integer(w[i].t->shape[d]));
        json_array_append_new(offs, json_integer((json_int_t)pos));
        json_array_append_new(offs, json_integer((json_int_t)(pos + w[i].nbytes)));
        json_object_set_new(info, "dtype", json_string(lora_dtype_name(w[i].dt)));
        json_object_set_new(info, "shape", shape);
        json_object_set_new(info, "data_offsets", offs);
        if (json_object_get(root, w[i].t->name) || json_object_set_new(root, w[i].t->name, info) != 0)
            s = lora_fail(ctx, LORA_E_INVALID_ARG, "%s: tensor name \"%s\" repeated or not UTF-8", path, w[i].t->name);
        pos += w[i].nbytes;
    }
    char *js = s ? NULL : json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (s) return s;
    if (!js) return LORA_E_NOMEM;
    for (size_t i = 0; js[i]; i++) {   /* \u001F -> \u001f, as serde_json writes it */
        if (js[i] != '\\' || !js[i + 1]) continue;
        if (js[++i] == 'u')
            for (int k = 1; k <= 4 && js[i + k]; k++)
                if (js[i + k] >= 'A' && js[i + k] <= 'F') js[i + k] = (char)(js[i + k] - 'A' + 'a');
    }
    size_t len = strlen(js), padded = (len + 7) & ~(size_t)7;
    if (padded > ST_MAX_HEADER) {
        free(js);
        return lora_fail(ctx, LORA_E_ST_HEADER_TOO_LARGE, "%s: the header would be %zu bytes, above the %u readers accept",
                         path, padded, ST_MAX_HEADER);
    }
    char *h = lora_malloc(ctx, padded + 8);
    if (!h) { free(js); return LORA_E_NOMEM; }
    for (int i = 0; i < 8; i++) h[i] = (char)(uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(h + 8, js, len);
    memset(h + 8 + len, ' ', padded - len);
    free(js);
    *out = h;
    *out_len = padded + 8;
    return LORA_OK;
}

/* ---- the driver ---------------------------------------------------------------------------- */

lora_status ops_merge_file(struct sd_model *sd, const struct lora_network *const *nets, const double *ratios,
                           int64_t n, const char *out_path, lora_dtype prec, lora_dtype save, int as_ckpt,
                           const void *map, uint64_t map_size) {
    lora_ctx *ctx = sd->ctx;
    if (prec != LORA_DTYPE_F32 && prec != LORA_DTYPE_F16 && prec != LORA_DTYPE_BF16)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "merge precision must be float, fp16 or bf16");
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(ratios[i]))
            return lora_fail(ctx, LORA_E_CONFIG_RANGE, "ratio %lld is not finite", (long long)i);
        int64_t matched = 0;
        LORA_TRY(net_coverage(nets[i], sd, &matched, NULL, NULL));   /* warns; none fits: error */
    }
    struct stream st = {.ctx = ctx, .sd = sd, .nets = nets, .ratios = ratios, .n_nets = n, .prec = prec, .save = save,
                        .nt_cpu = lora_threads(ctx) > 0 ? lora_threads(ctx) : 1};
    struct tensor_map ldm, keep;
    tmap_init(&ldm, ctx);
    tmap_init(&keep, ctx);
    struct wslot *w = NULL;
    char *hdr = NULL;
    size_t hlen = 0;
    struct atomic_file af;
    int begun = 0;
    lora_status s = plan(&st);
    if (!s) s = sd_to_ldm(sd, &ldm);   /* borrows sd's data (v2's packed in_proj: owned copies) */
    if (!s && !(w = lora_calloc(ctx, (size_t)ldm.n + 1, sizeof *w))) s = LORA_E_NOMEM;
    for (int64_t i = 0; i < ldm.n && !s; i++) {
        const struct lora_tensor *t = &ldm.t[i];
        struct tplan tp;
        classify(&st, t, &tp);
        if (tp.mods && tmap_numel(t) > st.max_numel) st.max_numel = tmap_numel(t);
        w[i].t = t;
        w[i].dt = tp.out;
        w[i].rank = st_rank(w[i].dt);
        if (w[i].rank < 0 && !as_ckpt)
            s = lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: tensor \"%s\": dtype %s cannot be written", out_path, t->name,
                          lora_dtype_name(t->dtype) ? lora_dtype_name(t->dtype) : "?");
        else if (!ck_mul_u64((uint64_t)tmap_numel(t), (uint64_t)(lora_dtype_bits(w[i].dt) / 8), &w[i].nbytes))
            s = lora_fail(ctx, LORA_E_LIMIT, "%s: tensor \"%s\" is too large", out_path, t->name);
    }
    if (!s) {
        size_t fb;
        if (!ck_mul_size((size_t)st.max_numel + 1, 4, &fb)) s = LORA_E_NOMEM;
        else if (!(st.f = lora_malloc(ctx, fb)) || !(st.tmp = lora_malloc(ctx, fb)) || !(st.outb = lora_malloc(ctx, fb)) ||
                 !(st.cf = lora_malloc(ctx, (size_t)MERGE_CHUNK * 4)) || !(st.cb = lora_malloc(ctx, (size_t)MERGE_CHUNK * 8)))
            s = LORA_E_NOMEM;
    }
    if (!s && !as_ckpt) {
        qsort(w, (size_t)ldm.n, sizeof *w, cmp_wslot);
        s = st_header(ctx, out_path, w, ldm.n, &hdr, &hlen);
        if (!s && !(s = atomic_file_begin(ctx, out_path, &af))) begun = 1;
        if (!s) s = atomic_file_write(&af, hdr, hlen);
    }
    for (int64_t i = 0; i < ldm.n && !s; i++) {
        const struct lora_tensor *t = w[i].t;
        struct tplan tp;
        classify(&st, t, &tp);
        if (tp.out != w[i].dt) { s = lora_fail(ctx, LORA_E_INTERNAL, "merge: dtype plan of '%s' changed", t->name); break; }
        int64_t ne = tmap_numel(t), oes = lora_dtype_bits(tp.out) / 8;
        void *own = NULL;   /* .ckpt: the changed tensor's bytes, handed to `keep` */
        if (tp.changed && as_ckpt && !(own = lora_malloc(ctx, (size_t)w[i].nbytes + 1))) { s = LORA_E_NOMEM; break; }
        if (!tp.changed) {
            if (!as_ckpt) s = w[i].nbytes ? atomic_file_write(&af, t->data, (size_t)w[i].nbytes) : LORA_OK;
            else s = tmap_add(&keep, t->name, tp.out, t->ndim, t->shape, t->data, w[i].nbytes, 0, 0);
        } else if (tp.mods) {
            s = merged_f32(&st, t, &tp);
            if (!s) ops_from_f32(tp.out, st.f, ne, as_ckpt ? own : st.outb, st.nt_cpu);
            if (!s && !as_ckpt) s = atomic_file_write(&af, st.outb, (size_t)w[i].nbytes);
        } else {
            for (int64_t e = 0; e < ne && !s; e += MERGE_CHUNK) {
                int64_t c = ne - e < MERGE_CHUNK ? ne - e : MERGE_CHUNK;
                s = cast_range(&st, t, &tp, e, c, as_ckpt ? (char *)own + e * oes : st.cb);
                if (!s && !as_ckpt) s = atomic_file_write(&af, st.cb, (size_t)(c * oes));
            }
        }
        if (own) {
            if (!s) s = tmap_add(&keep, t->name, tp.out, t->ndim, t->shape, own, w[i].nbytes, 0, 1);
            if (s) lora_free(ctx, own);
        }
        if (!s && !as_ckpt) release_pages(t->data, t->nbytes, map, map_size);
        if (!s) s = lora_progress(ctx, LORA_PHASE_MERGE, i + 1, ldm.n, NAN);
    }
    if (!s && as_ckpt) s = ckpt_write(ctx, out_path, &keep, 1);
    if (begun) {
        if (!s) s = atomic_file_commit(&af);
        else atomic_file_abort(&af);
    }
    lora_free(ctx, hdr);
    lora_free(ctx, w);
    tmap_clear(&keep);
    tmap_clear(&ldm);
    lora_free(ctx, st.f);
    lora_free(ctx, st.tmp);
    lora_free(ctx, st.outb);
    lora_free(ctx, st.cf);
    lora_free(ctx, st.cb);
    lora_free(ctx, st.tg);
    lora_free(ctx, st.te_tg);
    lora_free(ctx, st.un_tg);
    lora_free(ctx, st.mod);
    lora_free(ctx, st.refs);
    return s;
}
