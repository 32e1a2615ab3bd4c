/* Merge into a model, file to file, streamed (merge_lora.py --sd_model; spec/kohya-lora.md §6):
 * the output is written tensor by tensor from the memory-mapped input, each tensor converted to
 * float32, given the precision cast and the LoRA deltas that target it, and converted to its
 * output dtype. The arithmetic is the in-memory merge's (lora_model_cast + ops_merge_into_model
 * + lora_model_save) step for step, so both give the same bytes.
 *
 * Speed (spec/performance.md §6: the floor is the file I/O): the output is written at known
 * offsets by two threads at once. A copier thread takes the tensors whose bytes do not change
 * (the VAE, and with kohya's defaults every 16-bit tensor no module touches, once scanned for
 * NaNs) and copies them from the input file in the kernel (copy_file_range, as cp does); the
 * merging thread computes the others and writes each 1 MiB chunk itself right after computing
 * it; kohya's default case (fp16 weight, float32 merge, fp16 output, one module) is one pass
 * over the bytes after the sgemm (fused_prepare, fused_f16). Once its copies are done, the
 * copier computes fused-path tensors too, from the other end of the list (struct hjob). A
 * syncer thread starts the disk writeback as it goes, so the final fsync is short.
 * Memory: the input's mapping (page cache; pages this process read are released as it goes),
 * the up @ down product of the largest weight a network changes (float32; a second one for the
 * copier when it computes too), 2 MiB of chunks and, off the fused path, one more float32 copy
 * of that weight.
 *
 * .safetensors: the header is computed first (names, shapes and dtypes are known before any
 * value, so is every tensor's offset), then the tensors are written in the reference writer's
 * layout into the temp file of an atomic_file (fsync, rename). .ckpt: streamed by this thread
 * through ckpt_stream_* (the pickle first, then one record at a time, its CRC computed before
 * its local header): one buffer of the largest changed tensor; unchanged tensors are written
 * from the mapping. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
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

/* ratio * alpha / rank, as a float */
static float module_scale(const struct net_module *mm, double ratio) {
    return (float)ratio * nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, 1.0);
}

/* tmp[out, k] = up[out, rank] @ down[rank, k]: the layout of W (convs: in*kh*kw) */
static void module_product(const struct net_module *mm, float *tmp) {
    int64_t k = mm->in * mm->kh * mm->kw;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)k, (int)mm->rank, 1.0f, mm->up,
                (int)mm->rank, mm->down, (int)k, 0.0f, tmp, (int)k);
}

lora_status ops_apply_module(const struct net_module *mm, double ratio, float *w, float *tmp, int nt) {
    int64_t n = mm->out * mm->in * mm->kh * mm->kw;
    float scale = module_scale(mm, ratio);
    module_product(mm, tmp);
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
    for (int64_t e = 0; e < n; e++) w[e] += scale * tmp[e];
    return LORA_OK;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define MERGE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MERGE_ISA_CLONES
#endif

#define FUSE_BLOCK 2048   /* elements per pass: the float32 staging stays in L1 */

/* dst = fp16(float32(src) + scale * tmp): the to_f32 + ops_apply_module + ops_from_f32 chain of
 * one module onto an fp16 tensor merged in float32, element for element the same operations
 * (no contraction into an FMA: C11 mode), in one pass over the bytes instead of four. */
MERGE_ISA_CLONES static void fused_add_block(float *f, const float *tmp, float scale, int64_t n) {
    for (int64_t e = 0; e < n; e++) f[e] += scale * tmp[e];
}

static void fused_f16(const uint16_t *src, const float *tmp, float scale, uint16_t *dst, int64_t n, int nt) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
    for (int64_t b = 0; b < n; b += FUSE_BLOCK) {
        float f[FUSE_BLOCK];
        int64_t c = n - b < FUSE_BLOCK ? n - b : FUSE_BLOCK;
        lora_f16_to_f32_row(src + b, f, c);
        fused_add_block(f, tmp + b, scale, c);
        lora_f32_to_f16_row(f, dst + b, c);
    }
}

int ops_module_fits(const struct net_module *mm, const struct net_target *t) {
    if (mm->out != t->out || mm->in != t->in) return 0;
    if (t->kind == NET_LINEAR) return mm->kh == 1 && mm->kw == 1;   /* 4-D 1x1 onto a Linear: squeezed */
    return mm->kh == t->kh && mm->kw == t->kw;
}

int ops_is_float(lora_dtype t) {
    return t == LORA_DTYPE_F32 || t == LORA_DTYPE_F16 || t == LORA_DTYPE_BF16 || t == LORA_DTYPE_F64;
}

#define CONV_BLOCK 16384   /* elements per thread block of the row conversions */

void ops_from_f32(lora_dtype dt, const float *src, int64_t n, void *dst, int nt) {
    if (dt == LORA_DTYPE_F32) { memcpy(dst, src, (size_t)n * 4); return; }
    uint16_t *h = dst;
    if (dt == LORA_DTYPE_F16) {
#pragma omp parallel for num_threads(nt) if (n > PAR_MIN) schedule(static)
        for (int64_t b = 0; b < n; b += CONV_BLOCK)
            lora_f32_to_f16_row(src + b, h + b, n - b < CONV_BLOCK ? n - b : CONV_BLOCK);
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
        for (int64_t b = 0; b < n; b += CONV_BLOCK)
            lora_f16_to_f32_row(h + b, dst + b, n - b < CONV_BLOCK ? n - b : CONV_BLOCK);
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
    return !lora_half_has_nan(dt, src, n);
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
    int64_t max_numel;
    float *cf;               /* MERGE_CHUNK floats: casts of tensors without modules */
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
    if (!st->f && !(st->f = lora_malloc(ctx, (size_t)st->max_numel * 4 + 4))) return LORA_E_NOMEM;   /* not fused */
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

/* kohya's default case in one pass (fused_f16): an fp16 tensor of one part, merged in float32,
 * saved as fp16, with one module. Returns that module (its scale in *scale) when it applies,
 * NULL when the general path must (merged_f32). Reads the plan only: the helper's tensors are
 * chosen with it before the threads start. */
static const struct net_module *fused_module(const struct stream *st, const struct lora_tensor *t,
                                             const struct tplan *tp, float *scale) {
    if (tp->np != 1 || tp->mods != 1 || t->dtype != LORA_DTYPE_F16 || tp->cur != LORA_DTYPE_F32 ||
        tp->out != LORA_DTYPE_F16 || tp->p[0].off != 0)
        return NULL;
    int64_t tgi = (tp->p[0].is_te ? st->te_tg : st->un_tg)[tp->p[0].idx];
    if (tgi < 0) return NULL;
    const struct net_target *tg = &st->tg[tgi];
    int64_t n = tmap_numel(t);
    if (tg->out * tg->in * tg->kh * tg->kw != n || n > st->max_numel) return NULL;   /* the general path reports it */
    for (int64_t i = 0; i < st->n_nets; i++) {
        int64_t k = st->mod[i * st->nt + tgi];
        if (k < 0) continue;
        *scale = module_scale(&st->nets[i]->m[k], st->ratios[i]);
        return &st->nets[i]->m[k];
    }
    return NULL;
}

/* fused_module, with the module's up @ down in st->tmp when it applies (returns 1). */
static int fused_prepare(struct stream *st, const struct lora_tensor *t, const struct tplan *tp, float *scale) {
    const struct net_module *mm = fused_module(st, t, tp, scale);
    if (!mm) return 0;
    module_product(mm, st->tmp);
    return 1;
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
#define OUT_CHUNK ((int64_t)1 << 18)     /* elements per output chunk the computing threads write */

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

/* ---- the source file, for in-kernel copies ---------------------------------------------------- */

/* The file behind the read-only mapping `map` (which starts at file offset 0), opened again
 * read-only so that unchanged tensors can be copied with copy_file_range: found in
 * /proc/self/maps and accepted only when device and inode match the mapping's. -1 when not
 * found (no /proc, an unmapped input): the tensors are then written from the mapping. */
static int open_mapped_file(const void *map, uint64_t map_size) {
    if (!map || map_size == 0) return -1;
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return -1;
    char line[4400];
    int fd = -1;
    while (fd < 0 && fgets(line, sizeof line, f)) {
        unsigned long long lo, hi, off, ino;
        unsigned maj, mnr;
        int path_at = 0;
        if (sscanf(line, "%llx-%llx %*s %llx %x:%x %llu %n", &lo, &hi, &off, &maj, &mnr, &ino, &path_at) < 6) continue;
        if (lo != (uintptr_t)map || off != 0 || path_at <= 0 || line[path_at] != '/') continue;
        char *path = line + path_at;
        path[strcspn(path, "\n")] = 0;
        int cand = open(path, O_RDONLY | O_CLOEXEC);
        struct stat sb;
        if (cand >= 0 && fstat(cand, &sb) == 0 && S_ISREG(sb.st_mode) && (unsigned long long)sb.st_ino == ino &&
            major(sb.st_dev) == maj && minor(sb.st_dev) == mnr && (uint64_t)sb.st_size >= map_size)
            fd = cand;
        else if (cand >= 0) close(cand);
        break;
    }
    fclose(f);
    return fd;
}

/* ---- the copier thread (safetensors output) ---------------------------------------------------- */

/* The output file is written at known offsets by two threads at once: the merging thread
 * computes the tensors that change and writes them itself (pwrite of a small chunk just
 * converted: the bytes are still in its cache, where a handoff to another thread measured
 * 1.8x slower to write), while the copier thread takes every tensor whose bytes may be kept:
 * it scans the 16-bit ones for NaNs (the cast chain would make them canonical: those are
 * converted and written) and copies the others from the input file in the kernel
 * (copy_file_range: no page faults on the mapping, no copy through user space; what cp does),
 * adjacent ones in one call. A syncer thread starts the disk writeback of what was written
 * every 64 MiB (sync_file_range WRITE, which can block while the device queue is full: hence a
 * thread that only waits), so the final fsync finds most of the file on disk already. Neither
 * thread records errors in the context (one thread at a time): the copier keeps errno and the
 * failing call, which the merging thread reports after joining it.
 *
 * Once its copies are done, the copier computes changed tensors too (on 2 cores the merging
 * thread's one-thread sgemm is the bottleneck, by far with OpenBLAS's AVX2 kernels): the
 * tensors of kohya's default case (fused path) form a list in file order; the merging thread
 * claims them from the front as it reaches them, the copier from the back, one at a time under
 * the mutex, until they meet. Both compute a tensor with the same code (module_product with a
 * one-thread sgemm, fused_f16, 1 MiB pwrites), each with its own float32 product buffer, so
 * the bytes do not depend on which thread took it. Only on <= 2 CPU threads (where the
 * merging thread's sgemm runs on one thread too) and with OpenMP (the team size is set per
 * thread). */
struct hjob {                 /* a changed tensor either thread may compute */
    const uint16_t *src;      /* fp16 input */
    int64_t n;                /* elements */
    uint64_t dst_off;
    const struct net_module *mm;
    float scale;
    int64_t wi;               /* its index in the write order */
};

struct cjob {
    const void *data;
    uint64_t nbytes, dst_off;
    lora_dtype dt;
    int scan;                 /* F16/BF16 whose cast chain is the identity unless a NaN is there */
};

struct copier {
    pthread_t th, sth;
    int syncer;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop, done;           /* give up / the merging thread has finished */
    int err;                  /* errno of the copier's failure, 0 while none */
    const char *what;
    int out_fd, src_fd;
    int cfr;                  /* copy_file_range still worth trying */
    const void *map;          /* the input mapping */
    uint64_t map_size;
    const struct cjob *jobs;
    int64_t n_jobs;
    uint16_t *cb;             /* MERGE_CHUNK 16-bit values: a NaN tensor's canonical bytes */
    uint64_t written, synced; /* bytes written by both threads; those handed to writeback */
    const struct hjob *hjobs;
    int64_t n_hjobs;
    uint8_t *owner;           /* per hjob, under mu: 0 unclaimed, 1 the merging thread's, 2 the copier's */
    float *htmp;              /* the copier's up @ down product (the largest hjob's elements) */
    uint16_t *hob;            /* OUT_CHUNK fp16 values: its output chunk */
};

#define WRITEBACK_STEP ((uint64_t)64 << 20)

static void *syncer_main(void *arg) {
    struct copier *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->done && !c->stop && c->written - c->synced < WRITEBACK_STEP) pthread_cond_wait(&c->cv, &c->mu);
        if (c->done || c->stop) break;
        c->synced = c->written;
        pthread_mutex_unlock(&c->mu);
        sync_file_range(c->out_fd, 0, 0, SYNC_FILE_RANGE_WRITE);   /* advisory: the fsync reports errors */
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

static void add_written(struct copier *c, uint64_t n) {
    pthread_mutex_lock(&c->mu);
    c->written += n;
    if (c->written - c->synced >= WRITEBACK_STEP) pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static int pwrite_all(int fd, const void *buf, uint64_t len, uint64_t off) {
    const uint8_t *p = buf;
    while (len > 0) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t w = pwrite(fd, p, chunk, (off_t)off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return EIO;
        p += w;
        off += (uint64_t)w;
        len -= (uint64_t)w;
    }
    return 0;
}

/* Writes input bytes [data, data + len) at output offset dst: in the kernel from the input file
 * when they lie in its mapping, else (or when the kernel cannot: EXDEV, ENOSYS, EINVAL,
 * EOPNOTSUPP, EPERM on other filesystems and old kernels) from memory. */
static int copy_out(struct copier *c, const uint8_t *data, uint64_t len, uint64_t dst, const char **what) {
    uintptr_t b = (uintptr_t)c->map, p = (uintptr_t)data;
    int in_map = c->map && p >= b && p - b <= c->map_size && len <= c->map_size - (p - b);
    while (len > 0 && in_map && c->cfr) {
        loff_t in = (loff_t)(p - b), out = (loff_t)dst;
        size_t chunk = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t n = copy_file_range(c->src_fd, &in, c->out_fd, &out, chunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP || errno == EPERM)) {
            c->cfr = 0;
            break;
        }
        if (n < 0) { *what = "copy_file_range"; return errno; }
        if (n == 0) { *what = "copy_file_range (the input file shrank)"; return EIO; }
        p += (uint64_t)n;
        dst += (uint64_t)n;
        len -= (uint64_t)n;
    }
    if (len == 0) return 0;
    *what = "write";
    int e = pwrite_all(c->out_fd, (const void *)p, len, dst);
    if (!e) release_pages((const void *)p, len, c->map, c->map_size);
    return e;
}

/* A tensor holding NaNs: fp16/bf16 -> float32 -> the same dtype, chunk by chunk, as cast_range
 * does it (non-NaN values keep their bytes; NaNs become sign | the canonical quiet NaN). */
static int write_canonical(struct copier *c, const struct cjob *j, const char **what) {
    const uint16_t *h = j->data;
    int64_t n = (int64_t)(j->nbytes / 2);
    *what = "write";
    for (int64_t e = 0; e < n; e += MERGE_CHUNK) {
        int64_t k = n - e < MERGE_CHUNK ? n - e : MERGE_CHUNK;
        for (int64_t i = 0; i < k; i++)
            c->cb[i] = j->dt == LORA_DTYPE_F16 ? lora_f32_to_f16(lora_f16_to_f32(h[e + i]))
                                               : lora_f32_to_bf16(lora_bf16_to_f32(h[e + i]));
        int err = pwrite_all(c->out_fd, c->cb, (uint64_t)k * 2, j->dst_off + (uint64_t)e * 2);
        if (err) return err;
    }
    return 0;
}

/* The copier's share of the computing, after its copies: hjobs from the back until it meets
 * the merging thread (or stop). Returns an errno, 0 when fine. */
static int help_merge(struct copier *c, const char **what) {
#if LORA_HAVE_OPENMP
    omp_set_num_threads(1);   /* this thread's setting: OpenBLAS sizes the sgemm's team from it */
#endif
    for (int64_t k = c->n_hjobs - 1; k >= 0; k--) {
        pthread_mutex_lock(&c->mu);
        int mine = !c->stop && c->owner[k] == 0;
        if (mine) c->owner[k] = 2;
        pthread_mutex_unlock(&c->mu);
        if (!mine) return 0;   /* the merging thread has this one and every one before it */
        const struct hjob *h = &c->hjobs[k];
        module_product(h->mm, c->htmp);
        *what = "write";
        for (int64_t e = 0; e < h->n; e += OUT_CHUNK) {
            int64_t n = h->n - e < OUT_CHUNK ? h->n - e : OUT_CHUNK;
            fused_f16(h->src + e, c->htmp + e, h->scale, c->hob, n, 1);
            int err = pwrite_all(c->out_fd, c->hob, (uint64_t)n * 2, h->dst_off + (uint64_t)e * 2);
            if (err) return err;
            add_written(c, (uint64_t)n * 2);
        }
        release_pages(h->src, (uint64_t)h->n * 2, c->map, c->map_size);   /* read: done with its pages */
    }
    return 0;
}

/* 1 when the merging thread may compute hjob k (it claims it), 0 when the copier has it. */
static int claim_hjob(struct copier *c, int64_t k) {
    pthread_mutex_lock(&c->mu);
    int mine = c->owner[k] == 0;
    if (mine) c->owner[k] = 1;
    pthread_mutex_unlock(&c->mu);
    return mine;
}

static void *copier_main(void *arg) {
    struct copier *c = arg;
    const uint8_t *run = NULL;   /* pending copy: input bytes [run, run + run_len) to run_dst */
    uint64_t run_len = 0, run_dst = 0;
    const char *what = "write";
    int e = 0;
    for (int64_t i = 0; i <= c->n_jobs && !e; i++) {
        pthread_mutex_lock(&c->mu);
        int stop = c->stop;
        pthread_mutex_unlock(&c->mu);
        if (stop) break;
        const struct cjob *j = i < c->n_jobs ? &c->jobs[i] : NULL;
        int nan = j && j->scan && lora_half_has_nan(j->dt, j->data, (int64_t)(j->nbytes / 2));
        if (run_len && (!j || nan || (const uint8_t *)j->data != run + run_len || j->dst_off != run_dst + run_len)) {
            e = copy_out(c, run, run_len, run_dst, &what);   /* not adjacent: the run so far goes */
            if (!e) add_written(c, run_len);
            run_len = 0;
        }
        if (!j || e) continue;
        if (nan) {
            e = write_canonical(c, j, &what);
            if (!e) add_written(c, j->nbytes);
        } else if (run_len) run_len += j->nbytes;
        else {
            run = j->data;
            run_len = j->nbytes;
            run_dst = j->dst_off;
        }
        if (j->scan) release_pages(j->data, j->nbytes, c->map, c->map_size);   /* read: done with its pages */
    }
    if (!e && c->n_hjobs > 0) e = help_merge(c, &what);
    pthread_mutex_lock(&c->mu);
    if (e) {
        c->err = e;
        c->what = what;
        c->stop = 1;
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Ends the threads (after the copier's work when ok, else at once); returns the copier's errno. */
static int copier_join(struct copier *c, int ok) {
    pthread_mutex_lock(&c->mu);
    if (!ok) c->stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->th, NULL);
    pthread_mutex_lock(&c->mu);
    c->done = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (c->syncer) pthread_join(c->sth, NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    return c->err;
}

/* 0 once the copier has failed: the merging thread stops early. */
static int copier_ok(struct copier *c) {
    pthread_mutex_lock(&c->mu);
    int ok = !c->stop;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

/* ---- the driver ---------------------------------------------------------------------------- */

/* A tensor whose output bytes may be its input bytes: unchanged, or without modules with a cast
 * chain F16/BF16 -> float32 -> the same dtype (kohya's default: precision float, save_precision
 * the file's dtype), which gives back every value but a NaN (its payload would not survive). */
static int keeps_bytes(const struct lora_tensor *t, const struct tplan *tp, int *scan) {
    *scan = 0;
    if (!tp->changed) return 1;
    if (tp->mods || tp->out != t->dtype || tp->cur != LORA_DTYPE_F32) return 0;
    if (t->dtype != LORA_DTYPE_F16 && t->dtype != LORA_DTYPE_BF16) return 0;
    *scan = 1;
    return 1;
}

/* Sink of the computed bytes: a .ckpt's tensor buffer, or the .safetensors file at an offset. */
struct sink {
    int fd;                  /* >= 0: pwrite at off */
    uint8_t *buf;            /* else: the bytes go to buf + off */
    uint64_t off;
    struct copier *cp;
};

static lora_status sink_put(lora_ctx *ctx, const char *path, struct sink *k, const void *p, uint64_t n) {
    if (k->fd < 0) {
        memcpy(k->buf + k->off, p, (size_t)n);
    } else {
        int e = pwrite_all(k->fd, p, n, k->off);
        if (e) return io_fail(ctx, e, "write", path);
        add_written(k->cp, n);
    }
    k->off += n;
    return LORA_OK;
}

/* Computes tensor t (with modules, or cast) into the sink, chunk by chunk through `ob`
 * (OUT_CHUNK * 4 bytes). */
static lora_status compute_tensor(struct stream *st, const struct lora_tensor *t, const struct tplan *tp,
                                  const char *path, struct sink *k, void *ob) {
    int64_t ne = tmap_numel(t), oes = lora_dtype_bits(tp->out) / 8;
    float scale = 0;
    if (tp->mods && fused_prepare(st, t, tp, &scale)) {
        for (int64_t e = 0; e < ne; e += OUT_CHUNK) {
            int64_t c = ne - e < OUT_CHUNK ? ne - e : OUT_CHUNK;
            fused_f16((const uint16_t *)t->data + e, st->tmp + e, scale, ob, c, st->nt_cpu);
            LORA_TRY(sink_put(st->ctx, path, k, ob, (uint64_t)(c * oes)));
        }
    } else if (tp->mods) {
        LORA_TRY(merged_f32(st, t, tp));
        for (int64_t e = 0; e < ne; e += OUT_CHUNK) {
            int64_t c = ne - e < OUT_CHUNK ? ne - e : OUT_CHUNK;
            ops_from_f32(tp->out, st->f + e, c, ob, st->nt_cpu);
            LORA_TRY(sink_put(st->ctx, path, k, ob, (uint64_t)(c * oes)));
        }
    } else {
        for (int64_t e = 0; e < ne; e += MERGE_CHUNK) {
            int64_t c = ne - e < MERGE_CHUNK ? ne - e : MERGE_CHUNK;
            LORA_TRY(cast_range(st, t, tp, e, c, ob));
            LORA_TRY(sink_put(st->ctx, path, k, ob, (uint64_t)(c * oes)));
        }
    }
    return LORA_OK;
}

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
    struct tensor_map ldm, plan_map;
    tmap_init(&ldm, ctx);
    tmap_init(&plan_map, ctx);
    struct wslot *w = NULL;
    struct cjob *jobs = NULL;
    struct hjob *hjobs = NULL;
    char *hdr = NULL;
    size_t hlen = 0;
    struct atomic_file af;
    struct ckpt_stream *cs = NULL;
    struct copier cp;
    memset(&cp, 0, sizeof cp);
    cp.src_fd = -1;
    int begun = 0, threaded = 0;
    void *ob = NULL, *tb = NULL;   /* output chunk; .ckpt: a changed tensor's bytes */
    uint64_t tb_bytes = 1;
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
        else if (as_ckpt && tp.changed && w[i].nbytes > tb_bytes) tb_bytes = w[i].nbytes;   /* its CRC precedes it */
    }
    if (!s) {
        size_t fb;
        if (!ck_mul_size((size_t)st.max_numel + 1, 4, &fb) || tb_bytes > SIZE_MAX / 2) s = LORA_E_NOMEM;
        else if (!(st.tmp = lora_malloc(ctx, fb)) || !(st.cf = lora_malloc(ctx, (size_t)MERGE_CHUNK * 4)) ||
                 !(ob = lora_malloc(ctx, (size_t)OUT_CHUNK * 4)) || (as_ckpt && !(tb = lora_malloc(ctx, (size_t)tb_bytes))))
            s = LORA_E_NOMEM;
    }
    if (!s && !as_ckpt) {
        qsort(w, (size_t)ldm.n, sizeof *w, cmp_wslot);
        s = st_header(ctx, out_path, w, ldm.n, &hdr, &hlen);
        if (!s && !(jobs = lora_calloc(ctx, (size_t)ldm.n + 1, sizeof *jobs))) s = LORA_E_NOMEM;
        if (!s && !(cp.cb = lora_malloc(ctx, (size_t)MERGE_CHUNK * 2))) s = LORA_E_NOMEM;
        /* the copier computes too where both threads' sgemm runs on one thread (see hjob) */
        int help = LORA_HAVE_OPENMP && st.nt_cpu <= 2;
        if (!s && help && !(hjobs = lora_calloc(ctx, (size_t)ldm.n + 1, sizeof *hjobs))) s = LORA_E_NOMEM;
        uint64_t off = hlen;
        int64_t hmax = 0;
        for (int64_t i = 0; i < ldm.n && !s; i++) {   /* the copier's share, in file order */
            struct tplan tp;
            int scan;
            float scale = 0;
            const struct net_module *mm;
            classify(&st, w[i].t, &tp);
            if (keeps_bytes(w[i].t, &tp, &scan) && w[i].nbytes)
                jobs[cp.n_jobs++] = (struct cjob){w[i].t->data, w[i].nbytes, off, w[i].t->dtype, scan};
            else if (help && tp.mods && (mm = fused_module(&st, w[i].t, &tp, &scale))) {
                hjobs[cp.n_hjobs++] = (struct hjob){w[i].t->data, tmap_numel(w[i].t), off, mm, scale, i};
                if (tmap_numel(w[i].t) > hmax) hmax = tmap_numel(w[i].t);
            }
            off += w[i].nbytes;
        }
        /* its own product buffer: with the merging thread's st.tmp, two float32 copies of the
         * largest changed weight (SD1.5: ff.net.0.proj, 1280 x 10240, 52 MB each) */
        if (!s && cp.n_hjobs > 0 &&
            (!(cp.owner = lora_calloc(ctx, (size_t)cp.n_hjobs, 1)) || !(cp.htmp = lora_malloc(ctx, (size_t)hmax * 4)) ||
             !(cp.hob = lora_malloc(ctx, (size_t)OUT_CHUNK * 2))))
            s = LORA_E_NOMEM;
        cp.hjobs = hjobs;
        if (!s && !(s = atomic_file_begin(ctx, out_path, &af))) begun = 1;
        if (!s) {
            int e = pwrite_all(af.fd, hdr, hlen, 0);
            if (e) s = io_fail(ctx, e, "write", out_path);
        }
        if (!s) {
            cp.out_fd = af.fd;
            cp.map = map;
            cp.map_size = map ? map_size : 0;
            cp.src_fd = open_mapped_file(map, map_size);
            cp.cfr = cp.src_fd >= 0;
            cp.jobs = jobs;
            if (pthread_mutex_init(&cp.mu, NULL) != 0) s = lora_fail(ctx, LORA_E_NOMEM, "merge: pthread_mutex_init failed");
            else if (pthread_cond_init(&cp.cv, NULL) != 0) {
                pthread_mutex_destroy(&cp.mu);
                s = lora_fail(ctx, LORA_E_NOMEM, "merge: pthread_cond_init failed");
            } else if (pthread_create(&cp.th, NULL, copier_main, &cp) != 0) {
                pthread_mutex_destroy(&cp.mu);
                pthread_cond_destroy(&cp.cv);
                s = lora_fail(ctx, LORA_E_NOMEM, "merge: cannot start the copier thread");
            } else {
                threaded = 1;
                cp.syncer = pthread_create(&cp.sth, NULL, syncer_main, &cp) == 0;   /* optional */
            }
        }
    }
    if (!s && as_ckpt) {   /* the pickle needs only names, dtypes and shapes: the records stream after it */
        for (int64_t i = 0; i < ldm.n && !s; i++)
            s = tmap_add(&plan_map, w[i].t->name, w[i].dt, w[i].t->ndim, w[i].t->shape, NULL, w[i].nbytes, 0, 0);
        if (!s) s = ckpt_stream_begin(ctx, out_path, &plan_map, 1, &cs);
        tmap_clear(&plan_map);
    }
    /* With the copier on a core of its own, the merging thread computes on the others: on 2
     * cores the sgemm runs on one thread (SD1.5 + rank 128 on this shared 2-core machine: 1.3 -
     * 2.2 s against 1.8 - 13.8 s with OpenBLAS's 2 OpenMP threads, whose barrier spins starve
     * the copy). An OpenMP build of OpenBLAS sizes its team from the calling thread's setting:
     * set for this call, given back. (OpenBLAS's Haswell kernels round a few elements 1 ulp
     * differently with another team size; its AVX-512 kernels do not.) */
    int nt_all = st.nt_cpu;
    if (threaded) st.nt_cpu = nt_all > 2 ? nt_all - 1 : 1;
#if LORA_HAVE_OPENMP
    int omp_prev = omp_get_max_threads();
    if (omp_prev != st.nt_cpu) omp_set_num_threads(st.nt_cpu);
#endif
    uint64_t off = hlen;
    int64_t hk = 0;   /* the next hjob in write order */
    for (int64_t i = 0; i < ldm.n && !s; i++) {
        const struct lora_tensor *t = w[i].t;
        struct tplan tp;
        int scan;
        classify(&st, t, &tp);
        if (tp.out != w[i].dt) { s = lora_fail(ctx, LORA_E_INTERNAL, "merge: dtype plan of '%s' changed", t->name); break; }
        int keep = keeps_bytes(t, &tp, &scan);
        if (as_ckpt && keep && scan && lora_half_has_nan(t->dtype, t->data, tmap_numel(t))) keep = 0;
        int helped = 0;
        if (threaded && hk < cp.n_hjobs && cp.hjobs[hk].wi == i) helped = !claim_hjob(&cp, hk++);
        if ((!as_ckpt && keep) || helped) {
            /* the copier's */
        } else if (as_ckpt && keep) {
            s = ckpt_stream_tensor(cs, t->data, w[i].nbytes);
            release_pages(t->data, t->nbytes, map, map_size);
        } else {
            struct sink k = {.fd = as_ckpt ? -1 : af.fd, .buf = tb, .off = as_ckpt ? 0 : off, .cp = &cp};
            s = compute_tensor(&st, t, &tp, out_path, &k, ob);
            release_pages(t->data, t->nbytes, map, map_size);   /* read: its input pages are done */
            if (!s && as_ckpt) s = ckpt_stream_tensor(cs, tb, w[i].nbytes);
        }
        off += w[i].nbytes;
        if (!s && threaded && !copier_ok(&cp)) break;   /* its error is reported below */
        if (!s) s = lora_progress(ctx, LORA_PHASE_MERGE, i + 1, ldm.n, NAN);
    }
#if LORA_HAVE_OPENMP
    if (omp_prev != st.nt_cpu) omp_set_num_threads(omp_prev);
#endif
    if (threaded) {
        int e = copier_join(&cp, !s);
        if (e && !s) s = io_fail(ctx, e, cp.what ? cp.what : "write", out_path);
    }
    if (cp.src_fd >= 0) close(cp.src_fd);
    if (begun) {
        struct stat sb;   /* every byte was written at its offset: the size says so */
        memset(&sb, 0, sizeof sb);
        if (!s && (fstat(af.fd, &sb) != 0 || (uint64_t)sb.st_size != off))
            s = lora_fail(ctx, LORA_E_INTERNAL, "%s: %llu bytes written, %llu planned", out_path,
                          (unsigned long long)sb.st_size, (unsigned long long)off);
        if (!s) s = atomic_file_commit(&af);
        else atomic_file_abort(&af);
    }
    if (cs) {
        if (!s) s = ckpt_stream_finish(cs);
        else ckpt_stream_abort(cs);
    }
    lora_free(ctx, hdr);
    lora_free(ctx, w);
    lora_free(ctx, jobs);
    lora_free(ctx, hjobs);
    lora_free(ctx, cp.owner);
    lora_free(ctx, cp.htmp);
    lora_free(ctx, cp.hob);
    tmap_clear(&ldm);
    lora_free(ctx, st.f);
    lora_free(ctx, st.tmp);
    lora_free(ctx, st.cf);
    lora_free(ctx, ob);
    lora_free(ctx, tb);
    lora_free(ctx, cp.cb);
    lora_free(ctx, st.tg);
    lora_free(ctx, st.te_tg);
    lora_free(ctx, st.un_tg);
    lora_free(ctx, st.mod);
    lora_free(ctx, st.refs);
    return s;
}
