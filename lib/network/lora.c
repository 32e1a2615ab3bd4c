/* The lora_network object: kohya networks/lora.py's LoRANetwork as data (spec/kohya-lora.md §1). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "core/dtype.h"
#include "core/rng.h"
#include "io/ckpt.h"
#include "io/st_map.h"
#include "network/network.h"

lora_status net_to_f32(lora_ctx *ctx, const char *name, lora_dtype dt, const void *src, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++) {
        switch (dt) {
        case LORA_DTYPE_F32: { float v; memcpy(&v, (const char *)src + 4 * i, 4); dst[i] = v; break; }
        case LORA_DTYPE_F16: { uint16_t v; memcpy(&v, (const char *)src + 2 * i, 2); dst[i] = lora_f16_to_f32(v); break; }
        case LORA_DTYPE_BF16: { uint16_t v; memcpy(&v, (const char *)src + 2 * i, 2); dst[i] = lora_bf16_to_f32(v); break; }
        case LORA_DTYPE_F64: { double v; memcpy(&v, (const char *)src + 8 * i, 8); dst[i] = (float)v; break; }
        case LORA_DTYPE_I64: { int64_t v; memcpy(&v, (const char *)src + 8 * i, 8); dst[i] = (float)v; break; }
        case LORA_DTYPE_I32: { int32_t v; memcpy(&v, (const char *)src + 4 * i, 4); dst[i] = (float)v; break; }
        case LORA_DTYPE_I16: { int16_t v; memcpy(&v, (const char *)src + 2 * i, 2); dst[i] = (float)v; break; }
        case LORA_DTYPE_I8: dst[i] = (float)((const int8_t *)src)[i]; break;
        case LORA_DTYPE_U8: dst[i] = (float)((const uint8_t *)src)[i]; break;
        default:
            return lora_fail(ctx, LORA_E_UNSUPPORTED, "tensor '%s': dtype %s cannot be used as a LoRA weight",
                             name, lora_dtype_name(dt) ? lora_dtype_name(dt) : "?");
        }
    }
    return LORA_OK;
}

/* float32 -> dtype (F32, F16, BF16), n elements. */
static void from_f32(lora_dtype dt, const float *src, int64_t n, void *dst) {
    for (int64_t i = 0; i < n; i++) {
        if (dt == LORA_DTYPE_F16) { uint16_t v = lora_f32_to_f16(src[i]); memcpy((char *)dst + 2 * i, &v, 2); }
        else if (dt == LORA_DTYPE_BF16) { uint16_t v = lora_f32_to_bf16(src[i]); memcpy((char *)dst + 2 * i, &v, 2); }
        else memcpy((char *)dst + 4 * i, &src[i], 4);
    }
}

void net_module_bind(struct net_module *mm) {
    mm->nn.in = mm->in * mm->kh * mm->kw;
    mm->nn.out = mm->out;
    mm->nn.rank = mm->rank;
    mm->nn.scale = nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, 1.0);
    mm->nn.down = mm->down;
    mm->nn.up = mm->up;
    mm->nn.d_down = NULL;
    mm->nn.d_up = NULL;
}

lora_status net_alloc(lora_ctx *ctx, int64_t n, struct lora_network **out) {
    struct lora_network *net = lora_calloc(ctx, 1, sizeof *net);
    if (!net) return LORA_E_NOMEM;
    net->magic = LORA_NETWORK_MAGIC;
    net->ctx = ctx;
    if (n > 0) {
        net->m = lora_calloc(ctx, (size_t)n, sizeof *net->m);
        if (!net->m) { lora_free(ctx, net); return LORA_E_NOMEM; }
    }
    *out = net;
    return LORA_OK;
}

void net_free(struct lora_network *net) {
    if (!net) return;
    lora_ctx *ctx = net->ctx;
    for (int64_t i = 0; i < net->n; i++) {
        lora_free(ctx, net->m[i].name);
        lora_free(ctx, net->m[i].down);
        lora_free(ctx, net->m[i].up);
    }
    lora_free(ctx, net->m);
    for (int64_t i = 0; i < net->n_meta; i++) {
        lora_free(ctx, net->meta_keys[i]);
        lora_free(ctx, net->meta_vals[i]);
    }
    lora_free(ctx, net->meta_keys);
    lora_free(ctx, net->meta_vals);
    net->magic = 0;
    lora_free(ctx, net);
}

int64_t net_find(const struct lora_network *net, const char *name) {
    for (int64_t i = 0; i < net->n; i++)
        if (strcmp(net->m[i].name, name) == 0) return i;
    return -1;
}

static lora_status alloc_factors(lora_ctx *ctx, struct net_module *mm) {
    int64_t nd, nu;
    if (!ck_mul_i64(mm->rank, mm->in * mm->kh * mm->kw, &nd) || !ck_mul_i64(mm->out, mm->rank, &nu))
        return lora_fail(ctx, LORA_E_LIMIT, "LoRA module '%s' is too large", mm->name);
    mm->down = lora_malloc(ctx, (size_t)nd * 4);
    mm->up = lora_calloc(ctx, (size_t)nu, 4);
    if (!mm->down || !mm->up) return LORA_E_NOMEM;
    return LORA_OK;
}

/* torch's CPU uniform_(from, to) on float32 with the default mt19937 generator: 24 random bits
 * per element, the affine map in double, from/to rounded to float first. */
static void torch_uniform(struct lora_mt19937 *g, float *dst, int64_t n, double bound) {
    float from = (float)-bound, to = (float)bound;
    float range = to - from;
    for (int64_t i = 0; i < n; i++) {
        uint32_t r = lora_mt_next(g);
        double x = (double)(r & 0xffffffu) * (1.0 / 16777216.0);
        float v = (float)(x * (double)range + (double)from);
        if (dst) dst[i] = v;
    }
}

/* kaiming_uniform_(a=sqrt(5)) bound: sqrt(3) * sqrt(2 / (1 + a^2)) / sqrt(fan_in) = 1/sqrt(fan_in). */
static double kaiming_bound(int64_t fan_in) {
    double a = sqrt(5.0);
    double gain = sqrt(2.0 / (1.0 + a * a));
    double std = gain / sqrt((double)fan_in);
    return sqrt(3.0) * std;
}

lora_status net_create(struct sd_model *m, const lora_params *opts, struct lora_network **out) {
    lora_ctx *ctx = m->ctx;
    int64_t dim = lora_params_int(opts, LORA_P_NETWORK_DIM);
    double alpha = lora_params_float(opts, LORA_P_NETWORK_ALPHA);
    int64_t conv_dim = lora_params_int(opts, LORA_P_CONV_DIM);
    double conv_alpha = lora_params_float(opts, LORA_P_CONV_ALPHA);
    int unet_only = (int)lora_params_int(opts, LORA_P_NETWORK_TRAIN_UNET_ONLY);
    int te_only = (int)lora_params_int(opts, LORA_P_NETWORK_TRAIN_TEXT_ENCODER_ONLY);
    int64_t seed = lora_params_int(opts, LORA_P_SEED);
    if (unet_only && te_only)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE,
                         "network_train_unet_only and network_train_text_encoder_only are both set");
    struct net_target *t = NULL;
    int64_t nt = 0;
    LORA_TRY(net_targets(m, conv_dim > 0, &t, &nt));
    struct lora_network *net = NULL;
    lora_status s = net_alloc(ctx, nt, &net);
    if (s) { lora_free(ctx, t); return s; }
    struct lora_mt19937 g;
    lora_mt_seed(&g, seed < 0 ? 1234u : (uint64_t)seed);
    for (int64_t i = 0; i < nt && !s; i++) {
        if ((t[i].is_te && unet_only) || (!t[i].is_te && te_only)) continue;
        struct net_module *mm = &net->m[net->n++];
        int kxk = t[i].kind == NET_CONVKXK;
        mm->name = lora_strdup(ctx, t[i].name);
        if (!mm->name) { s = LORA_E_NOMEM; break; }
        mm->is_te = t[i].is_te;
        mm->kind = t[i].kind;
        mm->rank = kxk ? conv_dim : dim;
        mm->alpha = kxk ? conv_alpha : alpha;
        /* kohya: alpha 0 or None is stored as the rank */
        if (mm->alpha <= 0) mm->alpha = (double)mm->rank;
        mm->has_alpha = 1;
        mm->in = t[i].in;
        mm->out = t[i].out;
        mm->kh = t[i].kh;
        mm->kw = t[i].kw;
        mm->down_ndim = mm->up_ndim = t[i].kind == NET_LINEAR ? 2 : 4;
        mm->dtype = LORA_DTYPE_F32;
        mm->alpha_dtype = LORA_DTYPE_F32;
        s = alloc_factors(ctx, mm);
        if (s) break;
        /* The generator stream as torch.manual_seed(seed) + kohya's LoRAModule: the
         * lora_down and lora_up layer constructors each run their default init, then down
         * is re-initialised with kaiming_uniform_(a=sqrt(5)) and up zeroed. */
        int64_t fan_in = mm->in * mm->kh * mm->kw;
        double b = kaiming_bound(fan_in);
        torch_uniform(&g, NULL, mm->rank * fan_in, b);
        torch_uniform(&g, NULL, mm->out * mm->rank, kaiming_bound(mm->rank));
        torch_uniform(&g, mm->down, mm->rank * fan_in, b);
        net_module_bind(mm);
    }
    lora_free(ctx, t);
    if (s) { net_free(net); return s; }
    *out = net;
    return LORA_OK;
}

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && memcmp(s + n - k, suf, k) == 0;
}

static lora_status check_finite(lora_ctx *ctx, const char *key, const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return lora_fail(ctx, LORA_E_NONFINITE_INPUT, "LoRA tensor '%s' holds a non-finite value (%g at element %lld)",
                             key, (double)v[i], (long long)i);
    return LORA_OK;
}

static lora_status load_module(lora_ctx *ctx, const char *path, const struct tensor_map *map, int64_t di,
                               struct net_module *mm) {
    const struct lora_tensor *d = &map->t[di];
    size_t bl = strlen(d->name) - strlen(".lora_down.weight");
    char key[600];
    if (bl >= 500) return lora_fail(ctx, LORA_E_LIMIT, "%s: key '%s' too long", path, d->name);
    mm->name = lora_malloc(ctx, bl + 1);
    if (!mm->name) return LORA_E_NOMEM;
    memcpy(mm->name, d->name, bl);
    mm->name[bl] = 0;
    snprintf(key, sizeof key, "%s.lora_up.weight", mm->name);
    int64_t ui = tmap_find(map, key);
    if (ui < 0) return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: '%s' has no matching '%s'", path, d->name, key);
    const struct lora_tensor *u = &map->t[ui];
    if ((d->ndim != 2 && d->ndim != 4) || u->ndim != d->ndim)
        return lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "%s: '%s' is %d-D and '%s' %d-D (want both 2-D or 4-D)",
                         path, d->name, d->ndim, u->name, u->ndim);
    if (u->shape[1] != d->shape[0] || d->shape[0] < 1 ||
        (u->ndim == 4 && (u->shape[2] != 1 || u->shape[3] != 1)))
        return lora_fail(ctx, LORA_E_SHAPE_MISMATCH,
                         "%s: '%s' has rank %lld but '%s' has shape [%lld, %lld%s] (want [out, %lld(, 1, 1)])",
                         path, d->name, (long long)d->shape[0], u->name, (long long)u->shape[0],
                         (long long)u->shape[1], u->ndim == 4 ? ", ..." : "", (long long)d->shape[0]);
    mm->is_te = strncmp(mm->name, "lora_te", 7) == 0;
    mm->rank = d->shape[0];
    mm->in = d->shape[1];
    mm->out = u->shape[0];
    mm->kh = d->ndim == 4 ? d->shape[2] : 1;
    mm->kw = d->ndim == 4 ? d->shape[3] : 1;
    mm->kind = d->ndim == 2 ? NET_LINEAR : (mm->kh * mm->kw == 1 ? NET_CONV1X1 : NET_CONVKXK);
    mm->down_ndim = d->ndim;
    mm->up_ndim = u->ndim;
    mm->dtype = d->dtype == LORA_DTYPE_F16 || d->dtype == LORA_DTYPE_BF16 ? d->dtype : LORA_DTYPE_F32;
    LORA_TRY(alloc_factors(ctx, mm));
    LORA_TRY(net_to_f32(ctx, d->name, d->dtype, d->data, tmap_numel(d), mm->down));
    LORA_TRY(net_to_f32(ctx, u->name, u->dtype, u->data, tmap_numel(u), mm->up));
    LORA_TRY(check_finite(ctx, d->name, mm->down, tmap_numel(d)));
    LORA_TRY(check_finite(ctx, u->name, mm->up, tmap_numel(u)));
    snprintf(key, sizeof key, "%s.alpha", mm->name);
    int64_t ai = tmap_find(map, key);
    mm->alpha_dtype = mm->dtype;
    if (ai >= 0) {
        const struct lora_tensor *a = &map->t[ai];
        if (tmap_numel(a) != 1)
            return lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "%s: '%s' has %lld elements (want a scalar)", path, key,
                             (long long)tmap_numel(a));
        if (a->dtype == LORA_DTYPE_F64) {
            memcpy(&mm->alpha, a->data, 8);
        } else if (a->dtype == LORA_DTYPE_I64) {
            int64_t v;
            memcpy(&v, a->data, 8);
            mm->alpha = (double)v;
        } else {
            float v;
            LORA_TRY(net_to_f32(ctx, key, a->dtype, a->data, 1, &v));
            mm->alpha = v;
        }
        if (!isfinite(mm->alpha) || mm->alpha < 0)
            return lora_fail(ctx, LORA_E_NONFINITE_INPUT, "%s: '%s' is %g (want a finite value >= 0)", path, key,
                             mm->alpha);
        mm->has_alpha = 1;
        mm->alpha_dtype = a->dtype;
    } else {
        /* files from before 2023-01-21: no alpha, scale 1 */
        mm->alpha = (double)mm->rank;
        mm->has_alpha = 0;
    }
    net_module_bind(mm);
    return LORA_OK;
}

/* Tensor-name suffixes of network types other than kohya's LoRA/LoCon (LyCORIS and others):
 * such files are refused by name rather than loaded as "no matching keys". */
static const char *foreign_kind(const char *key) {
    static const struct { const char *suffix, *kind; } k[] = {
        {".hada_w1_a", "LyCORIS LoHa"}, {".hada_w1_b", "LyCORIS LoHa"}, {".hada_w2_a", "LyCORIS LoHa"},
        {".hada_w2_b", "LyCORIS LoHa"}, {".hada_t1", "LyCORIS LoHa (Tucker)"}, {".hada_t2", "LyCORIS LoHa (Tucker)"},
        {".lokr_w1", "LyCORIS LoKr"}, {".lokr_w1_a", "LyCORIS LoKr"}, {".lokr_w1_b", "LyCORIS LoKr"},
        {".lokr_w2", "LyCORIS LoKr"}, {".lokr_w2_a", "LyCORIS LoKr"}, {".lokr_w2_b", "LyCORIS LoKr"},
        {".lokr_t2", "LyCORIS LoKr (Tucker)"}, {".lora_mid.weight", "LyCORIS LoCon with Tucker decomposition"},
        {".dora_scale", "DoRA"}, {".oft_blocks", "OFT"}, {".oft_diag", "OFT"}, {".a1.weight", "GLoRA"},
        {".diff", "LyCORIS full-difference"}, {".diff_b", "LyCORIS full-difference"}, {".w_norm", "LyCORIS norm"},
        {".lora_A.weight", "PEFT/diffusers LoRA (lora_A/lora_B)"}, {".lora.down.weight", "diffusers LoRA"},
        {"_lora.down.weight", "diffusers attention-processor LoRA"},
    };
    for (size_t i = 0; i < sizeof k / sizeof *k; i++)
        if (ends_with(key, k[i].suffix)) return k[i].kind;
    return NULL;
}

lora_status net_load(lora_ctx *ctx, const char *path, struct lora_network **out) {
    struct tensor_map map;
    tmap_init(&map, ctx);
    lora_status s = LORA_OK;
    int is_st = ends_with(path, ".safetensors");
    s = is_st ? st_read_map(ctx, path, &map, NULL) : ckpt_read(ctx, path, &map);
    if (s) return s;
    for (int64_t i = 0; i < map.n; i++) {
        const char *kind = foreign_kind(map.t[i].name);
        if (!kind) continue;
        s = lora_fail(ctx, LORA_E_UNSUPPORTED,
                      "%s: tensor '%s' belongs to a %s network, which liblora does not apply: only kohya "
                      "LoRA/LoCon files (<name>.lora_down.weight, .lora_up.weight, .alpha) are supported",
                      path, map.t[i].name, kind);
        tmap_clear(&map);
        return s;
    }
    int64_t n = 0;
    for (int64_t i = 0; i < map.n; i++)
        if (ends_with(map.t[i].name, ".lora_down.weight")) n++;
    if (n == 0) {
        s = lora_fail(ctx, LORA_E_NO_MATCHING_KEYS, "%s: no '<name>.lora_down.weight' tensors (%lld tensors%s%s)",
                      path, (long long)map.n, map.n ? ", first: " : "", map.n ? map.t[0].name : "");
        tmap_clear(&map);
        return s;
    }
    struct lora_network *net = NULL;
    s = net_alloc(ctx, n, &net);
    for (int64_t i = 0; i < map.n && !s; i++) {
        if (!ends_with(map.t[i].name, ".lora_down.weight")) {
            const char *nm = map.t[i].name;
            if (!ends_with(nm, ".lora_up.weight") && !ends_with(nm, ".alpha"))
                lora_log(ctx, LORA_LOG_WARN, "%s: ignoring tensor '%s' (not a kohya LoRA key)", path, nm);
            continue;
        }
        s = load_module(ctx, path, &map, i, &net->m[net->n++]);
    }
    /* metadata (safetensors only) */
    if (!s && is_st) {
        struct lora_file *f = NULL;
        s = st_open(ctx, path, &f);
        for (int64_t i = 0; !s && i < f->n_meta; i++) s = net_meta_set(net, f->meta_keys[i], f->meta_vals[i]);
        if (f) st_close(f);
    }
    tmap_clear(&map);
    if (s) { net_free(net); return s; }
    *out = net;
    return LORA_OK;
}

lora_status net_meta_set(struct lora_network *net, const char *key, const char *value) {
    lora_ctx *ctx = net->ctx;
    for (int64_t i = 0; i < net->n_meta; i++)
        if (strcmp(net->meta_keys[i], key) == 0) {
            char *v = lora_strdup(ctx, value);
            if (!v) return LORA_E_NOMEM;
            lora_free(ctx, net->meta_vals[i]);
            net->meta_vals[i] = v;
            return LORA_OK;
        }
    char **k = lora_malloc(ctx, (size_t)(net->n_meta + 1) * sizeof *k);
    char **v = lora_malloc(ctx, (size_t)(net->n_meta + 1) * sizeof *v);
    char *ks = lora_strdup(ctx, key), *vs = lora_strdup(ctx, value);
    if (!k || !v || !ks || !vs) {
        lora_free(ctx, k); lora_free(ctx, v); lora_free(ctx, ks); lora_free(ctx, vs);
        return LORA_E_NOMEM;
    }
    if (net->n_meta) {
        memcpy(k, net->meta_keys, (size_t)net->n_meta * sizeof *k);
        memcpy(v, net->meta_vals, (size_t)net->n_meta * sizeof *v);
    }
    lora_free(ctx, net->meta_keys);
    lora_free(ctx, net->meta_vals);
    k[net->n_meta] = ks;
    v[net->n_meta] = vs;
    net->meta_keys = k;
    net->meta_vals = v;
    net->n_meta++;
    return LORA_OK;
}

const char *net_meta_get(const struct lora_network *net, const char *key) {
    for (int64_t i = 0; i < net->n_meta; i++)
        if (strcmp(net->meta_keys[i], key) == 0) return net->meta_vals[i];
    return NULL;
}

/* Python's str(float) for the values kohya writes: "1.0", "0.5", "1e-05". */
static void py_float(char *b, size_t cap, double v) {
    snprintf(b, cap, "%.17g", v);
    for (int p = 1; p <= 17; p++) {   /* shortest repr that round-trips */
        char t[64];
        snprintf(t, sizeof t, "%.*g", p, v);
        if (strtod(t, NULL) == v) { snprintf(b, cap, "%s", t); break; }
    }
    if (!strpbrk(b, ".eni")) {
        size_t n = strlen(b);
        if (n + 3 <= cap) memcpy(b + n, ".0", 3);
    }
}

lora_status net_save(const struct lora_network *net, const char *path, const lora_params *opts) {
    lora_ctx *ctx = net->ctx;
    const char *prec = lora_params_str(opts, LORA_P_SAVE_PRECISION);
    lora_dtype force = 0;
    if (prec && strcmp(prec, "float") == 0) force = LORA_DTYPE_F32;
    else if (prec && strcmp(prec, "fp16") == 0) force = LORA_DTYPE_F16;
    else if (prec && strcmp(prec, "bf16") == 0) force = LORA_DTYPE_BF16;
    struct tensor_map map;
    tmap_init(&map, ctx);
    lora_status s = LORA_OK;
    char key[600];
    for (int64_t i = 0; i < net->n && !s; i++) {
        const struct net_module *mm = &net->m[i];
        lora_dtype dt = force ? force : mm->dtype;
        int64_t es = dt == LORA_DTYPE_F32 ? 4 : 2;
        int64_t dsh[4] = {mm->rank, mm->in, mm->kh, mm->kw}, ush[4] = {mm->out, mm->rank, 1, 1};
        int64_t nd = mm->rank * mm->in * mm->kh * mm->kw, nu = mm->out * mm->rank;
        void *bd = lora_malloc(ctx, (size_t)(nd * es)), *bu = lora_malloc(ctx, (size_t)(nu * es));
        if (!bd || !bu) { lora_free(ctx, bd); lora_free(ctx, bu); s = LORA_E_NOMEM; break; }
        from_f32(dt, mm->down, nd, bd);
        from_f32(dt, mm->up, nu, bu);
        snprintf(key, sizeof key, "%s.lora_down.weight", mm->name);
        s = tmap_add(&map, key, dt, mm->down_ndim, dsh, bd, (uint64_t)(nd * es), 0, 1);
        if (s) { lora_free(ctx, bd); lora_free(ctx, bu); break; }
        snprintf(key, sizeof key, "%s.lora_up.weight", mm->name);
        s = tmap_add(&map, key, dt, mm->up_ndim, ush, bu, (uint64_t)(nu * es), 0, 1);
        if (s) { lora_free(ctx, bu); break; }
        if (!mm->has_alpha && !force) continue;   /* a legacy file stays legacy unless cast */
        /* alpha: the stored dtype, or the save precision (kohya casts every tensor) */
        lora_dtype adt = force ? force : mm->alpha_dtype;
        uint8_t ab[8];
        uint64_t an;
        if (adt == LORA_DTYPE_I64) { int64_t v = (int64_t)mm->alpha; memcpy(ab, &v, 8); an = 8; }
        else if (adt == LORA_DTYPE_F64) { memcpy(ab, &mm->alpha, 8); an = 8; }
        else if (adt == LORA_DTYPE_I32) { int32_t v = (int32_t)mm->alpha; memcpy(ab, &v, 4); an = 4; }
        else {
            if (adt != LORA_DTYPE_F16 && adt != LORA_DTYPE_BF16) adt = LORA_DTYPE_F32;
            float a = (float)mm->alpha;
            from_f32(adt, &a, 1, ab);
            an = adt == LORA_DTYPE_F32 ? 4 : 2;
        }
        snprintf(key, sizeof key, "%s.alpha", mm->name);
        s = tmap_add(&map, key, adt, 0, NULL, ab, an, 1, 1);
    }
    if (!s) {
        if (ends_with(path, ".safetensors")) {
            char dim[32], alpha[64];
            snprintf(dim, sizeof dim, "%lld", net->n ? (long long)net->m[0].rank : 0LL);
            py_float(alpha, sizeof alpha, net->n ? net->m[0].alpha : 0.0);
            int64_t nm = 3 + net->n_meta;
            const char **k = lora_malloc(ctx, (size_t)nm * sizeof *k);
            const char **v = lora_malloc(ctx, (size_t)nm * sizeof *v);
            if (!k || !v) s = LORA_E_NOMEM;
            else {
                int64_t c = 0;
                const char *fk[3] = {"ss_network_module", "ss_network_dim", "ss_network_alpha"};
                const char *fv[3] = {"networks.lora", dim, alpha};
                for (int j = 0; j < 3; j++)
                    if (!net_meta_get(net, fk[j])) { k[c] = fk[j]; v[c] = fv[j]; c++; }
                for (int64_t j = 0; j < net->n_meta; j++) { k[c] = net->meta_keys[j]; v[c] = net->meta_vals[j]; c++; }
                s = st_write_map(ctx, path, &map, k, v, c);
            }
            lora_free(ctx, k);
            lora_free(ctx, v);
        } else {
            s = ckpt_write(ctx, path, &map, 0);
        }
    }
    tmap_clear(&map);
    return s;
}

/* Base tensor for module `mm` in the model, with its target; NULL when the name is not a target. */
static const struct net_target *find_target(const struct net_target *t, int64_t nt, const char *name) {
    for (int64_t i = 0; i < nt; i++)
        if (strcmp(t[i].name, name) == 0) return &t[i];
    return NULL;
}

static int shapes_ok(const struct net_module *mm, const struct net_target *t) {
    if (mm->out != t->out || mm->in != t->in) return 0;
    if (t->kind == NET_LINEAR) return mm->kh == 1 && mm->kw == 1;   /* 4-D 1x1 onto Linear: squeezed */
    return mm->kh == t->kh && mm->kw == t->kw;
}

static int all_zero(const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (v[i] != 0.0f) return 0;
    return 1;
}

/* SDXL LoRA names (kohya HEAD, spec §2.6): lora_te1_/lora_te2_ and LDM-style U-Net blocks. */
static int is_sdxl_name(const char *n) {
    return strncmp(n, "lora_te1_", 9) == 0 || strncmp(n, "lora_te2_", 9) == 0 ||
           strncmp(n, "lora_unet_input_blocks_", 23) == 0 || strncmp(n, "lora_unet_middle_block_", 23) == 0 ||
           strncmp(n, "lora_unet_output_blocks_", 24) == 0;
}

lora_status net_coverage(const struct lora_network *net, const struct sd_model *m, int64_t *matched,
                         int64_t *unused, int64_t *mismatch) {
    lora_ctx *ctx = net->ctx;
    struct net_target *t = NULL;
    int64_t nt = 0;
    LORA_TRY(net_targets(m, 1, &t, &nt));
    int64_t nm = 0, nu = 0, nx = 0, n_sdxl = 0, n_zero = 0;
    char first[600] = "";
    size_t fl = 0;
    for (int64_t i = 0; i < net->n; i++) {
        const struct net_module *mm = &net->m[i];
        const struct net_target *tg = find_target(t, nt, mm->name);
        const char *why = NULL;
        if (!tg) {
            nu++;
            why = "no such module";
            if (is_sdxl_name(mm->name)) { n_sdxl++; why = "no such module: an SDXL (LDM-named) module"; }
        } else if (!shapes_ok(mm, tg)) {
            nx++;
            why = "shape mismatch";
        } else {
            nm++;
            if (all_zero(mm->up, mm->out * mm->rank) || all_zero(mm->down, mm->rank * mm->in * mm->kh * mm->kw)) n_zero++;
        }
        if (why) {
            if (tg)
                lora_log(ctx, LORA_LOG_WARN, "LoRA module '%s': [%lld, %lld, %lld, %lld] does not fit '%s' [%lld, %lld, %lld, %lld]",
                         mm->name, (long long)mm->out, (long long)mm->in, (long long)mm->kh, (long long)mm->kw,
                         tg->weight, (long long)tg->out, (long long)tg->in, (long long)tg->kh, (long long)tg->kw);
            else
                lora_log(ctx, LORA_LOG_WARN, "LoRA module '%s' matches no module of the model", mm->name);
            if (nu + nx <= 3 && fl < sizeof first - 2) {
                int w = snprintf(first + fl, sizeof first - fl, "%s'%s' (%s)", fl ? ", " : "", mm->name, why);
                if (w > 0) fl += (size_t)w;
                if (fl >= sizeof first) fl = sizeof first - 1;
            }
        }
    }
    lora_free(ctx, t);
    if (matched) *matched = nm;
    if (unused) *unused = nu;
    if (mismatch) *mismatch = nx;
    /* the likely reason, for the "network does nothing" reports users send */
    const char *hint = "";
    if (n_sdxl > 0 && n_sdxl * 2 >= nu + nx) hint = " (lora_te1_/lora_te2_/input_blocks names: a network for SDXL, "
                                                     "not SD v1/v2)";
    else if (nx > 0 && nx >= nu) hint = " (the widths differ: a network for another model, e.g. SD v1 vs v2)";
    else if (nu > 0 && nm == 0) hint = " (the names are not kohya's diffusers-based module names of this model)";
    if (nm == 0 && net->n > 0)
        return lora_fail(ctx, LORA_E_NO_MATCHING_KEYS,
                         "none of the %lld LoRA modules fits the model (%lld unknown, %lld shape mismatches)%s: %s%s",
                         (long long)net->n, (long long)nu, (long long)nx, hint, first, nu + nx > 3 ? ", ..." : "");
    if (n_zero == nm && nm > 0)
        lora_log(ctx, LORA_LOG_WARN,
                 "the network does nothing: every matching module has an all-zero lora_up or lora_down (a freshly "
                 "created or untrained network)");
    else if (n_zero > 0)
        lora_log(ctx, LORA_LOG_INFO, "%lld of %lld matching LoRA modules are all-zero (no effect)", (long long)n_zero,
                 (long long)nm);
    if (nu + nx)
        lora_log(ctx, LORA_LOG_WARN, "%lld of %lld LoRA modules do not fit the model%s: %s%s", (long long)(nu + nx),
                 (long long)net->n, hint, first, nu + nx > 3 ? ", ..." : "");
    return LORA_OK;
}

lora_status net_merge(const struct lora_network *net, struct sd_model *m, double multiplier) {
    lora_ctx *ctx = net->ctx;
    if (!isfinite(multiplier))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "merge multiplier is not finite");
    struct net_target *t = NULL;
    int64_t nt = 0;
    LORA_TRY(net_targets(m, 1, &t, &nt));
    lora_status s = LORA_OK;
    for (int64_t i = 0; i < net->n && !s; i++) {
        const struct net_module *mm = &net->m[i];
        const struct net_target *tg = find_target(t, nt, mm->name);
        if (!tg || !shapes_ok(mm, tg)) continue;
        struct tensor_map *map = tg->is_te ? &m->te : &m->unet;
        int64_t wi = tmap_find(map, tg->weight);
        struct lora_tensor *w = &map->t[wi];
        if (w->dtype != LORA_DTYPE_F32 && w->dtype != LORA_DTYPE_F16 && w->dtype != LORA_DTYPE_BF16) {
            s = lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot merge into '%s': dtype %s", tg->weight,
                          lora_dtype_name(w->dtype));
            break;
        }
        int64_t n = tmap_numel(w), k = mm->in * mm->kh * mm->kw;
        float *wf = lora_malloc(ctx, (size_t)n * 4);
        if (!wf) { s = LORA_E_NOMEM; break; }
        s = net_to_f32(ctx, tg->weight, w->dtype, w->data, n, wf);
        float scale = (float)multiplier * nn_lora_scale(mm->has_alpha ? mm->alpha : 0.0, mm->rank, 1.0);
        /* W[out, in*kh*kw] += scale * up[out, r] @ down[r, in*kh*kw] (the layout of W), one
         * sgemm as kohya's torch matmul: a strided scalar loop took seconds per SD model */
        if (!s)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)k, (int)mm->rank, scale,
                        mm->up, (int)mm->rank, mm->down, (int)k, 1.0f, wf, (int)k);
        if (!s) {
            void *dst = w->data;
            if (!w->owned) {   /* borrowed from a mapped file: take an owned copy */
                dst = lora_malloc(ctx, (size_t)w->nbytes);
                if (!dst) s = LORA_E_NOMEM;
            }
            if (!s) {
                from_f32(w->dtype, wf, n, dst);
                if (dst != w->data) sd_release_borrowed(m, w->data, w->nbytes);
                w->data = dst;
                w->owned = 1;
            }
        }
        lora_free(ctx, wf);
    }
    lora_free(ctx, t);
    return s;
}
