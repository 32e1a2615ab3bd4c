/* Merge, extract and resize: kohya sd-scripts' networks/merge_lora.py, svd_merge_lora.py,
 * extract_lora_from_models.py and resize_lora.py (commit 75d1883d) as library code. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <lapacke.h>

#include "core/dtype.h"
#include "core/rng.h"
#include "ops/ops.h"

#if LORA_HAVE_OPENMP
#include <omp.h>
#endif

/* ---- small helpers ------------------------------------------------------------------------ */



/* Fills module `mm` (name copied) with shape facts; factors allocated (zeroed). */
static lora_status init_module(lora_ctx *ctx, struct net_module *mm, const char *name, int32_t is_te, int32_t kind,
                               int64_t rank, int64_t in, int64_t out, int64_t kh, int64_t kw) {
    mm->name = lora_strdup(ctx, name);
    if (!mm->name) return LORA_E_NOMEM;
    mm->is_te = is_te;
    mm->kind = kind;
    mm->rank = rank;
    mm->in = in;
    mm->out = out;
    mm->kh = kh;
    mm->kw = kw;
    mm->down_ndim = mm->up_ndim = kind == NET_LINEAR ? 2 : 4;
    mm->dtype = LORA_DTYPE_F32;
    mm->alpha_dtype = LORA_DTYPE_F32;
    mm->has_alpha = 1;
    mm->alpha = (double)rank;
    mm->down = lora_calloc(ctx, (size_t)(rank * in * kh * kw), 4);
    mm->up = lora_calloc(ctx, (size_t)(out * rank), 4);
    if (!mm->down || !mm->up) return LORA_E_NOMEM;
    return LORA_OK;
}

static double mod_scale(const struct net_module *mm) { return (mm->has_alpha ? mm->alpha : (double)mm->rank) / (double)mm->rank; }

/* dst[out, k] (+)= s * up[out, rank] @ down[rank, k] */
static void add_product(float *dst, const struct net_module *mm, float s) {
    int64_t k = mm->in * mm->kh * mm->kw;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mm->out, (int)k, (int)mm->rank, s, mm->up,
                (int)mm->rank, mm->down, (int)k, 1.0f, dst, (int)k);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* torch.quantile(cat(up, down), q) (linear interpolation, float32 arithmetic) and the clamp to
 * [-q, q] of both, as kohya's extract/svd_merge do. */
static lora_status clamp_quantile(lora_ctx *ctx, float *up, int64_t nu, float *down, int64_t nd, double q) {
    int64_t n = nu + nd;
    if (n == 0 || q >= 1.0 + 1e-12 || q <= 0) return LORA_OK;
    float *v = lora_malloc(ctx, (size_t)n * 4);
    if (!v) return LORA_E_NOMEM;
    memcpy(v, up, (size_t)nu * 4);
    memcpy(v + nu, down, (size_t)nd * 4);
    qsort(v, (size_t)n, 4, cmp_float);
    float rank = (float)q * (float)(n - 1);
    int64_t lo = (int64_t)rank, hi = (int64_t)ceilf(rank);
    if (hi > n - 1) hi = n - 1;
    float w = rank - (float)lo, a = v[lo], b = v[hi];
    float hv = w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
    lora_free(ctx, v);
    float lv = -hv;
    for (int64_t i = 0; i < nu; i++) up[i] = fminf(fmaxf(up[i], lv), hv);
    for (int64_t i = 0; i < nd; i++) down[i] = fminf(fmaxf(down[i], lv), hv);
    return LORA_OK;
}

/* Economy SVD of a[m, n] (row-major, destroyed) with LAPACK sgesdd. u [m, k], s [k], vt [k, n],
 * k = min(m, n). */
static lora_status svd(lora_ctx *ctx, const char *what, float *a, int64_t m, int64_t n, float **u, float **s,
                       float **vt) {
    int64_t k = m < n ? m : n;
    *u = lora_malloc(ctx, (size_t)(m * k) * 4);
    *s = lora_malloc(ctx, (size_t)k * 4);
    *vt = lora_malloc(ctx, (size_t)(k * n) * 4);
    if (!*u || !*s || !*vt) return LORA_E_NOMEM;
    lapack_int info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', (lapack_int)m, (lapack_int)n, a, (lapack_int)n, *s, *u,
                                     (lapack_int)k, *vt, (lapack_int)n);
    if (info != 0)
        return lora_fail(ctx, info < 0 ? LORA_E_INTERNAL : LORA_E_NONFINITE_WEIGHTS,
                         "SVD of '%s' [%lld, %lld] failed (LAPACK sgesdd info %d)", what, (long long)m, (long long)n,
                         (int)info);
    return LORA_OK;
}

/* Keeps `r` singular triplets of the SVD of a[m, n]: up = U_r diag(S_r) [m, r], down = Vh_r [r, n].
 * `sv` (optional) receives all min(m, n) singular values (caller frees). */
static lora_status factor(lora_ctx *ctx, const char *what, float *a, int64_t m, int64_t n, int64_t r, float *up,
                          float *down) {
    float *u = NULL, *s = NULL, *vt = NULL;
    int64_t k = m < n ? m : n;
    lora_status st = svd(ctx, what, a, m, n, &u, &s, &vt);
    if (!st) {
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < r; j++) up[i * r + j] = u[i * k + j] * s[j];
        memcpy(down, vt, (size_t)(r * n) * 4);
    }
    lora_free(ctx, u);
    lora_free(ctx, s);
    lora_free(ctx, vt);
    return st;
}

/* ---- merge into a model ------------------------------------------------------------------- */

static lora_status cast_map(lora_ctx *ctx, struct tensor_map *map, lora_dtype dt) {
    for (int64_t i = 0; i < map->n; i++) {
        struct lora_tensor *t = &map->t[i];
        int fl = t->dtype == LORA_DTYPE_F32 || t->dtype == LORA_DTYPE_F16 || t->dtype == LORA_DTYPE_BF16;
        if (!fl || t->dtype == dt) continue;
        int64_t n = tmap_numel(t);
        float *f = lora_malloc(ctx, (size_t)n * 4 + 1);
        if (!f) return LORA_E_NOMEM;
        lora_status s = net_to_f32(ctx, t->name, t->dtype, t->data, n, f);
        void *dst = f;
        if (!s && dt != LORA_DTYPE_F32) {
            uint16_t *h = lora_malloc(ctx, (size_t)n * 2 + 1);
            if (!h) s = LORA_E_NOMEM;
            else {
                for (int64_t j = 0; j < n; j++) h[j] = dt == LORA_DTYPE_F16 ? lora_f32_to_f16(f[j]) : lora_f32_to_bf16(f[j]);
                lora_free(ctx, f);
                f = NULL;
                dst = h;
            }
        }
        if (s) { lora_free(ctx, f); return s; }
        if (t->owned) lora_free(ctx, t->data);
        t->data = dst;
        t->owned = 1;
        t->dtype = dt;
        t->nbytes = (uint64_t)n * (dt == LORA_DTYPE_F32 ? 4u : 2u);
    }
    return LORA_OK;
}

lora_status ops_cast_model(struct sd_model *m, lora_dtype dt) {
    if (dt != LORA_DTYPE_F32 && dt != LORA_DTYPE_F16 && dt != LORA_DTYPE_BF16)
        return lora_fail(m->ctx, LORA_E_CONFIG_RANGE, "merge precision must be float32, float16 or bfloat16 (got %s)",
                         lora_dtype_name(dt) ? lora_dtype_name(dt) : "?");
    LORA_TRY(cast_map(m->ctx, &m->te, dt));
    return cast_map(m->ctx, &m->unet, dt);
}

lora_status ops_merge_into_model(struct sd_model *m, const struct lora_network *const *nets, const double *ratios,
                                 int64_t n) {
    lora_ctx *ctx = m->ctx;
    struct net_target *t = NULL;
    int64_t nt = 0;
    LORA_TRY(net_targets(m, 1, &t, &nt));
    lora_status s = LORA_OK;
    for (int64_t i = 0; i < n && !s; i++) {
        if (!isfinite(ratios[i])) {
            s = lora_fail(ctx, LORA_E_CONFIG_RANGE, "ratio %lld is not finite", (long long)i);
            break;
        }
        int64_t matched = 0;
        s = net_coverage(nets[i], m, &matched, NULL, NULL);
        /* the step ops_merge_file streams: W in float32 += ratio * alpha/rank * up @ down, stored
         * back in W's dtype */
        for (int64_t k = 0; k < nets[i]->n && !s; k++) {
            const struct net_module *mm = &nets[i]->m[k];
            const struct net_target *tg = NULL;
            for (int64_t j = 0; j < nt && !tg; j++)
                if (strcmp(t[j].name, mm->name) == 0) tg = &t[j];
            if (!tg || !ops_module_fits(mm, tg)) continue;
            struct tensor_map *map = tg->is_te ? &m->te : &m->unet;
            int64_t wi = tmap_find(map, tg->weight);
            if (wi < 0) continue;
            struct lora_tensor *w = &map->t[wi];
            if (w->dtype != LORA_DTYPE_F32 && w->dtype != LORA_DTYPE_F16 && w->dtype != LORA_DTYPE_BF16) {
                s = lora_fail(ctx, LORA_E_UNSUPPORTED, "cannot merge into '%s': dtype %s", tg->weight,
                              lora_dtype_name(w->dtype));
                break;
            }
            int64_t ne = tmap_numel(w);
            if (ne != mm->out * mm->in * mm->kh * mm->kw) {
                s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "merge: '%s' has %lld elements, module '%s' wants %lld",
                              tg->weight, (long long)ne, mm->name, (long long)(mm->out * mm->in * mm->kh * mm->kw));
                break;
            }
            float *wf = lora_malloc(ctx, (size_t)ne * 4 + 4), *tmp = lora_malloc(ctx, (size_t)ne * 4 + 4);
            void *dst = wf && tmp ? (w->owned ? w->data : lora_malloc(ctx, (size_t)w->nbytes + 1)) : NULL;
            if (!dst) s = LORA_E_NOMEM;
            if (!s) s = net_to_f32(ctx, tg->weight, w->dtype, w->data, ne, wf);
            if (!s) s = ops_apply_module(mm, ratios[i], wf, tmp, lora_threads(ctx) > 0 ? lora_threads(ctx) : 1);
            if (!s) {
                ops_from_f32(w->dtype, wf, ne, dst, 1);
                if (dst != w->data) sd_release_borrowed(m, w->data, w->nbytes);
                w->data = dst;
                w->owned = 1;
            } else if (dst && dst != w->data) {
                lora_free(ctx, dst);
            }
            lora_free(ctx, wf);
            lora_free(ctx, tmp);
        }
        if (!s) s = lora_progress(ctx, LORA_PHASE_MERGE, i + 1, n, NAN);
    }
    lora_free(ctx, t);
    return s;
}

/* ---- LoRA + LoRA ---------------------------------------------------------------------------- */

struct mslot {               /* one output module while merging */
    const struct net_module *first;
    double base_alpha;
    float *w;                /* svd: dense sum [out, in*kh*kw] */
    int64_t idx;             /* kohya rule: index in the output network */
};

static lora_status merge_kohya(lora_ctx *ctx, const struct lora_network *const *nets, const double *ratios, int64_t n,
                               struct lora_network *o, struct mslot *sl, int64_t ns) {
    lora_status s = LORA_OK;
    for (int64_t j = 0; j < ns && !s; j++) {
        const struct net_module *f = sl[j].first;
        s = init_module(ctx, &o->m[o->n], f->name, f->is_te, f->kind, f->rank, f->in, f->out, f->kh, f->kw);
        o->m[o->n].down_ndim = f->down_ndim;
        o->m[o->n].up_ndim = f->up_ndim;
        o->m[o->n].alpha = sl[j].base_alpha;
        o->n++;
    }
    uint8_t *seen = s ? NULL : lora_calloc(ctx, (size_t)ns + 1, 1);
    if (!s && !seen) s = LORA_E_NOMEM;
    for (int64_t i = 0; i < n && !s; i++) {
        for (int64_t k = 0; k < nets[i]->n && !s; k++) {
            const struct net_module *mm = &nets[i]->m[k];
            int64_t j = net_find(o, mm->name);
            struct net_module *d = &o->m[j];
            if (mm->rank != d->rank || mm->in != d->in || mm->out != d->out || mm->kh != d->kh || mm->kw != d->kw) {
                s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH,
                              "LoRA %lld module '%s': rank %lld [%lld, %lld, %lld, %lld] differs from the first file's "
                              "rank %lld [%lld, %lld, %lld, %lld] (v1 and v2, or different dims, cannot be merged "
                              "without new_rank)",
                              (long long)i, mm->name, (long long)mm->rank, (long long)mm->out, (long long)mm->in,
                              (long long)mm->kh, (long long)mm->kw, (long long)d->rank, (long long)d->out,
                              (long long)d->in, (long long)d->kh, (long long)d->kw);
                break;
            }
            double alpha = mm->has_alpha ? mm->alpha : (double)mm->rank;
            float sc = (float)(sqrt(alpha / d->alpha) * ratios[i]);
            int64_t nd = mm->rank * mm->in * mm->kh * mm->kw, nu = mm->out * mm->rank;
            if (!seen[j]) {
                for (int64_t e = 0; e < nd; e++) d->down[e] = mm->down[e] * sc;
                for (int64_t e = 0; e < nu; e++) d->up[e] = mm->up[e] * sc;
                seen[j] = 1;
            } else {
                for (int64_t e = 0; e < nd; e++) { float p = mm->down[e] * sc; d->down[e] = d->down[e] + p; }
                for (int64_t e = 0; e < nu; e++) { float p = mm->up[e] * sc; d->up[e] = d->up[e] + p; }
            }
        }
        if (!s) s = lora_progress(ctx, LORA_PHASE_MERGE, i + 1, n, NAN);
    }
    lora_free(ctx, seen);
    for (int64_t j = 0; j < o->n; j++) net_module_bind(&o->m[j]);
    return s;
}

static lora_status merge_svd(lora_ctx *ctx, const struct lora_network *const *nets, const double *ratios, int64_t n,
                             int64_t new_rank, int64_t new_conv_rank, struct lora_network *o, struct mslot *sl,
                             int64_t ns) {
    lora_status s = LORA_OK;
    for (int64_t j = 0; j < ns && !s; j++) {
        const struct net_module *f = sl[j].first;
        sl[j].w = lora_calloc(ctx, (size_t)(f->out * f->in * f->kh * f->kw), 4);
        if (!sl[j].w) s = LORA_E_NOMEM;
    }
    for (int64_t i = 0; i < n && !s; i++)
        for (int64_t k = 0; k < nets[i]->n && !s; k++) {
            const struct net_module *mm = &nets[i]->m[k];
            int64_t j = 0;
            while (strcmp(sl[j].first->name, mm->name) != 0) j++;
            const struct net_module *f = sl[j].first;
            if (mm->in != f->in || mm->out != f->out || mm->kh != f->kh || mm->kw != f->kw) {
                s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "LoRA %lld module '%s': [%lld, %lld, %lld, %lld] differs from "
                              "[%lld, %lld, %lld, %lld] in an earlier file", (long long)i, mm->name,
                              (long long)mm->out, (long long)mm->in, (long long)mm->kh, (long long)mm->kw,
                              (long long)f->out, (long long)f->in, (long long)f->kh, (long long)f->kw);
                break;
            }
            add_product(sl[j].w, mm, (float)(ratios[i] * mod_scale(mm)));
        }
    for (int64_t j = 0; j < ns && !s; j++) {
        const struct net_module *f = sl[j].first;
        int kxk = f->kh * f->kw > 1;
        int64_t r = kxk ? new_conv_rank : new_rank;
        if (r > f->in) r = f->in;
        if (r > f->out) r = f->out;
        struct net_module *d = &o->m[o->n];
        s = init_module(ctx, d, f->name, f->is_te, f->kind, r, f->in, f->out, f->kh, f->kw);
        o->n++;
        if (s) break;
        d->down_ndim = d->up_ndim = (f->down_ndim == 4 || kxk) ? 4 : 2;
        d->alpha_dtype = LORA_DTYPE_I64;   /* torch.tensor(module_new_rank) */
        s = factor(ctx, f->name, sl[j].w, f->out, f->in * f->kh * f->kw, r, d->up, d->down);
        if (!s) s = clamp_quantile(ctx, d->up, f->out * r, d->down, r * f->in * f->kh * f->kw, 0.99);
        net_module_bind(d);
        if (!s) s = lora_progress(ctx, LORA_PHASE_MERGE, j + 1, ns, NAN);
    }
    return s;
}

lora_status ops_merge_networks(lora_ctx *ctx, const struct lora_network *const *nets, const double *ratios,
                               int64_t n, int64_t new_rank, int64_t new_conv_rank, struct lora_network **out) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(ratios[i])) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "ratio %lld is not finite", (long long)i);
        total += nets[i]->n;
    }
    struct mslot *sl = lora_calloc(ctx, (size_t)total + 1, sizeof *sl);
    if (!sl) return LORA_E_NOMEM;
    int64_t ns = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < nets[i]->n; k++) {
            const struct net_module *mm = &nets[i]->m[k];
            int64_t j = 0;
            while (j < ns && strcmp(sl[j].first->name, mm->name) != 0) j++;
            if (j == ns) {
                sl[ns].first = mm;
                sl[ns].base_alpha = mm->has_alpha ? mm->alpha : (double)mm->rank;
                ns++;
            }
        }
    struct lora_network *o = NULL;
    lora_status s = net_alloc(ctx, ns, &o);
    if (!s) {
        if (new_rank <= 0) s = merge_kohya(ctx, nets, ratios, n, o, sl, ns);
        else s = merge_svd(ctx, nets, ratios, n, new_rank, new_conv_rank > 0 ? new_conv_rank : new_rank, o, sl, ns);
    }
    for (int64_t j = 0; j < ns; j++) lora_free(ctx, sl[j].w);
    lora_free(ctx, sl);
    if (!s && o->n) {
        char b[64];
        snprintf(b, sizeof b, "%lld", (long long)o->m[0].rank);
        s = net_meta_set(o, "ss_network_dim", b);
        if (!s) {
            snprintf(b, sizeof b, "%.9g", o->m[0].alpha);
            if (!strpbrk(b, ".e")) strcat(b, ".0");
            s = net_meta_set(o, "ss_network_alpha", b);
        }
    }
    if (s) { net_free(o); return s; }
    *out = o;
    return LORA_OK;
}

/* ---- randomized SVD ------------------------------------------------------------------------ */

/* The test matrix: random signs om[i] = +-1 for i in [0, count), bit i % 128 of Philox4x32-10
 * block i / 128 under key seed. Sign (Rademacher) test matrices do as well as Gaussian ones for
 * randomized range finders, and cost 1/128 of a Philox block each instead of a Box-Muller
 * log + sincos (Gaussians were 7% of a module's time). */
static void rsvd_signs(uint64_t seed, float *om, int64_t count) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    for (int64_t i0 = 0; i0 < count; i0 += 128) {
        uint32_t ctr[4] = {(uint32_t)(i0 / 128), (uint32_t)((uint64_t)(i0 / 128) >> 32), 0, 0}, bits[4];
        lora_philox4x32_10(ctr, key, bits);
        int64_t ne = count - i0 < 128 ? count - i0 : 128;
        for (int64_t i = 0; i < ne; i++) om[i0 + i] = (bits[i >> 5] >> (i & 31)) & 1u ? -1.f : 1.f;
    }
}

/* In-place thin QR of y[m, l] (row-major, m >= l): y <- Q. */
static lora_status orthonormalize(lora_ctx *ctx, const char *what, float *y, int64_t m, int64_t l, float *tau) {
    lapack_int info = LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, (lapack_int)m, (lapack_int)l, y, (lapack_int)l, tau);
    if (!info) info = LAPACKE_sorgqr(LAPACK_ROW_MAJOR, (lapack_int)m, (lapack_int)l, (lapack_int)l, y, (lapack_int)l, tau);
    if (info)
        return lora_fail(ctx, info < 0 ? LORA_E_INTERNAL : LORA_E_NONFINITE_WEIGHTS,
                         "QR in the randomized SVD of '%s' [%lld, %lld] failed (LAPACK info %d)", what, (long long)m,
                         (long long)l, (int)info);
    return LORA_OK;
}

static lora_status factor_gram(lora_ctx *ctx, const float *a, int64_t m, int64_t n, int64_t r, float *up,
                               float *down, int *fallback);

/* A Krylov space of factor_lanczos's size (in A's column space), built with Householder QR
 * (sgeqrf/sorgqr, slow on tall-skinny blocks) and B = K^T A formed by extra passes: the fallback
 * for blocks that CholeskyQR refuses (a rank-deficient or zero dW). Blocks of l columns, q power steps,
 * K = qr([Q_0 .. Q_q]) [m, (q+1) l], B factored exactly, up = K up_B. */
static lora_status factor_krylov_qr(lora_ctx *ctx, const char *what, const float *a, int64_t m, int64_t n,
                                    int64_t r, int64_t l, int q, uint64_t seed, float *up, float *down) {
    int64_t L = l * (q + 1);
    float *om = lora_malloc(ctx, (size_t)(n * l) * 4), *y = lora_malloc(ctx, (size_t)(m * l) * 4);
    float *z = lora_malloc(ctx, (size_t)(n * l) * 4), *tau = lora_malloc(ctx, (size_t)L * 4);
    float *kb = lora_malloc(ctx, (size_t)(m * L) * 4), *b = lora_malloc(ctx, (size_t)(L * n) * 4);
    float *ub = lora_malloc(ctx, (size_t)(L * r) * 4);
    float *u = NULL, *s = NULL, *vt = NULL;
    lora_status st = om && y && z && tau && kb && b && ub ? LORA_OK : LORA_E_NOMEM;
    if (!st) {
        rsvd_signs(seed, om, n * l);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)l, (int)n, 1.f, a, (int)n, om, (int)l,
                    0.f, y, (int)l);
        st = orthonormalize(ctx, what, y, m, l, tau);
    }
    for (int it = 0; !st; it++) {
        for (int64_t i = 0; i < m; i++) memcpy(kb + i * L + it * l, y + i * l, (size_t)l * 4);
        if (it == q) break;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n, (int)l, (int)m, 1.f, a, (int)n, y, (int)l, 0.f,
                    z, (int)l);
        st = orthonormalize(ctx, what, z, n, l, tau);
        if (st) break;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)l, (int)n, 1.f, a, (int)n, z, (int)l,
                    0.f, y, (int)l);
        st = orthonormalize(ctx, what, y, m, l, tau);
    }
    if (!st) st = orthonormalize(ctx, what, kb, m, L, tau);
    if (!st) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)L, (int)n, (int)m, 1.f, kb, (int)L, a, (int)n, 0.f,
                    b, (int)n);
        int fallback = 1;
        if (r < L) st = factor_gram(ctx, b, L, n, r, ub, down, &fallback);
        if (!st && fallback) {
            st = svd(ctx, what, b, L, n, &u, &s, &vt);   /* u [L, L], s [L], vt [L, n] */
            for (int64_t i = 0; !st && i < L; i++)
                for (int64_t j = 0; j < r; j++) ub[i * r + j] = u[i * L + j] * s[j];
            if (!st) memcpy(down, vt, (size_t)(r * n) * 4);
        }
    }
    if (!st)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)L, 1.f, kb, (int)L, ub, (int)r,
                    0.f, up, (int)r);
    lora_free(ctx, om); lora_free(ctx, y); lora_free(ctx, z); lora_free(ctx, tau); lora_free(ctx, kb);
    lora_free(ctx, b); lora_free(ctx, ub); lora_free(ctx, u); lora_free(ctx, s); lora_free(ctx, vt);
    return st;
}

/* CholeskyQR of the block y[m, b] (leading dimension ld): R^T R = y^T y in float64 (dsyrk on a
 * float64 copy gd [m, b]; g, rf [b, b] scratch), y <- y R^-1 with R^-1 formed in float64 (dtrtri)
 * and applied by sgemm through gd's memory (strsm ran at a fifth of sgemm's rate on these
 * shapes: 11% of a 768 x 768 module). Householder QR costs several times more on 2 cores for these
 * tall-skinny blocks. Returns 1 (y partly changed) when y is numerically rank-deficient:
 * Cholesky fails or R's diagonal spans more than 1e5. */
static int chol_qr(float *y, int64_t m, int64_t b, int64_t ld, double *gd, double *g, float *rf) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < b; j++) gd[i * b + j] = y[i * ld + j];
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)b, (int)m, 1.0, gd, (int)b, 0.0, g, (int)b);
    /* g's upper triangle (row-major) is the lower one column-major: L = R^T there, and its
     * inverse L^-1 = (R^-1)^T is R^-1 row-major, without LAPACKE's transposed copies */
    if (LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', (lapack_int)b, g, (lapack_int)b) != 0) return 1;
    double hi = 0, lo = INFINITY;
    for (int64_t j = 0; j < b; j++) {
        hi = fmax(hi, g[j * b + j]);
        lo = fmin(lo, g[j * b + j]);
    }
    if (!(lo > hi * 1e-5)) return 1;
    if (LAPACKE_dtrtri_work(LAPACK_COL_MAJOR, 'L', 'N', (lapack_int)b, g, (lapack_int)b) != 0) return 1;
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < b; j++) rf[i * b + j] = j >= i ? (float)g[i * b + j] : 0.f;
    float *yr = (float *)gd;   /* y R^-1 [m, b]: gd's float64 copy of y is spent */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)b, (int)b, 1.f, y, (int)ld, rf, (int)b, 0.f,
                yr, (int)b);
    for (int64_t i = 0; i < m; i++) memcpy(y + i * ld, yr + i * b, (size_t)b * 4);
    return 0;
}

/* Block Gram-Schmidt, twice (BCGS2): y[m, b] (ld) <- an orthonormal basis of the part of y
 * orthogonal to the orthonormal columns k[m, lp] (same ld); t [lp, b] scratch. 1: rank-deficient. */
static int block_orth(float *y, int64_t m, int64_t b, const float *k, int64_t lp, int64_t ld, float *t, double *gd,
                      double *g, float *rf) {
    for (int pass = 0; pass < 2; pass++) {
        if (lp > 0) {
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)lp, (int)b, (int)m, 1.f, k, (int)ld, y, (int)ld,
                        0.f, t, (int)b);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)b, (int)lp, -1.f, k, (int)ld, t,
                        (int)b, 1.f, y, (int)ld);
        }
        if (chol_qr(y, m, b, ld, gd, g, rf)) return 1;
    }
    return 0;
}

/* Randomized block Lanczos SVD (Musco & Musco 2015's block Krylov method with full
 * reorthogonalisation): rank-r factors of a[m, n] (row-major, kept). op(A) [s, t] is A, or A^T
 * when m > n, so that the basis lives in the short dimension s. Omega [t, b] is random signs from
 * Philox(seed) (rsvd_signs); Q_0 = orth(op(A) Omega), and for i = 1..q: W_{i-1} = op(A)^T Q_{i-1},
 * Q_i = orth(op(A) cholqr(W_{i-1})) against Q_0..Q_{i-1}; W_q = op(A)^T Q_q. With K = [Q_0..Q_q]
 * [s, L] orthonormal, B = K^T op(A) = W^T: the products A^T Q_i of the iteration are B's rows,
 * so 2q + 2 passes over A of b columns each make the whole factorisation (the QR form takes
 * 3q + 2). B's top r triplets come from the float64 Gram W^T W [L, L] (dsytrd, dstedc, dormtr):
 * B B^T = Y S^2 Y^T, op(A) ~ K Y Y^T W^T. *fallback = 1 (outputs unset) when a block is
 * rank-deficient, the eigensolver fails or s_r is ~0. `ws` holds factor_lanczos_floats. */
static int64_t factor_lanczos_floats(int64_t m, int64_t n, int64_t r, int64_t b, int q) {
    int64_t s = m > n ? n : m, t = m > n ? m : n, L = b * (q + 1);
    /* floats: om, z [t, b]; K [s, L]; W [t, L]; tp [L, b]; rf [b, b]; yf, yt [L, r];
     * doubles (2 floats each): gd [t, b], g [b, b], c [L, L], w [L], the eigensolver's work
     * [1 + 6 L + 2 L^2] and integer work [3 + 5 L] (as many doubles: aligned, ample) */
    return 2 * t * b + s * L + t * L + L * b + b * b + 2 * L * r +
           2 * (t * b + b * b + L * L + L + (1 + 6 * L + 2 * L * L) + (3 + 5 * L));
}

static void factor_lanczos(const float *a, int64_t m, int64_t n, int64_t r, int64_t b, int q, uint64_t seed,
                           float *ws, float *up, float *down, int *fallback) {
    int tall = m > n;
    int64_t s = tall ? n : m, t = tall ? m : n, L = b * (q + 1);
    /* op(A) X = sgemm(ta, a), op(A)^T X = sgemm(tat, a); lda n either way */
    CBLAS_TRANSPOSE ta = tall ? CblasTrans : CblasNoTrans, tat = tall ? CblasNoTrans : CblasTrans;
    double *gd = (double *)ws, *g = gd + t * b, *c = g + b * b, *w = c + L * L;   /* doubles first: aligned */
    double *ew = w + L;
    lapack_int lew = (lapack_int)(1 + 6 * L + 2 * L * L), liw = (lapack_int)(3 + 5 * L);
    lapack_int *iw = (lapack_int *)(ew + lew);
    float *om = (float *)(ew + lew + liw), *z = om + t * b, *k = z + t * b, *wb = k + s * L, *tp = wb + t * L;
    float *rf = tp + L * b, *yf = rf + b * b, *yt = yf + L * r;
    *fallback = 1;
    rsvd_signs(seed, om, t * b);
    cblas_sgemm(CblasRowMajor, ta, CblasNoTrans, (int)s, (int)b, (int)t, 1.f, a, (int)n, om, (int)b, 0.f, k, (int)L);
    if (block_orth(k, s, b, NULL, 0, L, tp, gd, g, rf)) return;
    for (int i = 0; i <= q; i++) {
        float *qi = k + i * b, *wi = wb + i * b;
        cblas_sgemm(CblasRowMajor, tat, CblasNoTrans, (int)t, (int)b, (int)s, 1.f, a, (int)n, qi, (int)L, 0.f, wi,
                    (int)L);
        if (i == q) break;
        /* z = cholqr(W_i) keeps the next block's columns at a sane scale; its basis is what counts */
        for (int64_t e = 0; e < t; e++) memcpy(z + e * b, wi + e * L, (size_t)b * 4);
        if (chol_qr(z, t, b, b, gd, g, rf)) return;
        cblas_sgemm(CblasRowMajor, ta, CblasNoTrans, (int)s, (int)b, (int)t, 1.f, a, (int)n, z, (int)b, 0.f,
                    qi + b, (int)L);
        if (block_orth(qi + b, s, b, k, (i + 1) * b, L, tp, gd, g, rf)) return;
    }
    /* c = W^T W in float64, in row chunks of W that fit gd */
    int64_t ch = t * b / L > 0 ? t * b / L : 1;
    for (int64_t e0 = 0; e0 < t; e0 += ch) {
        int64_t ne = t - e0 < ch ? t - e0 : ch;
        for (int64_t i = 0; i < ne * L; i++) gd[i] = wb[e0 * L + i];
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)L, (int)ne, 1.0, gd, (int)L, e0 ? 1.0 : 0.0, c,
                    (int)L);
    }
    /* c's upper triangle (row-major) is the lower one column-major: no transposed copies, and the
     * workspace is ours. dsyevd in steps, so that the back-transformation (dormtr) applies to the
     * r eigenvectors used only: tridiagonal (dsytrd), all its eigenpairs by divide and conquer
     * (dstedc; MRRR/bisection for r of them, dstemr or dsyevr 'I', measured 1.5-2x slower at
     * L = 204), then Q z for the top r (measured 1.7 ms against 1.95-2.4 for dsyevd, one
     * thread, L = 204). ew holds z [L, L], then dsytrd's/dstedc's/dormtr's work
     * [1 + 4 L + L^2], then e and tau [L] each. */
    double *zv = ew, *sw = ew + L * L, *e = sw + 1 + 4 * L + L * L, *tau = e + L;
    lapack_int lsw = (lapack_int)(1 + 4 * L + L * L);
    if (LAPACKE_dsytrd_work(LAPACK_COL_MAJOR, 'L', (lapack_int)L, c, (lapack_int)L, w, e, tau, sw, lsw) != 0 ||
        LAPACKE_dstedc_work(LAPACK_COL_MAJOR, 'I', (lapack_int)L, w, e, zv, (lapack_int)L, sw, lsw, iw, liw) != 0 ||
        LAPACKE_dormtr_work(LAPACK_COL_MAJOR, 'L', 'L', 'N', (lapack_int)L, (lapack_int)r, c, (lapack_int)L, tau,
                            zv + (L - r) * L, (lapack_int)L, sw, lsw) != 0)
        return;
    /* ascending: eigenvector j is zv[j L ..] (column-major), triplet j is eigenpair L-1-j; refuse a
     * (numerically) zero s_r */
    if (!(w[L - r] > w[L - 1] * 1e-12) || !(w[L - 1] > 0)) return;
    for (int64_t j = 0; j < r; j++) {
        int64_t cj = L - 1 - j;
        double sv = tall ? 1.0 : sqrt(w[cj]);
        for (int64_t i = 0; i < L; i++) {
            yf[i * r + j] = (float)(zv[cj * L + i] * sv);
            yt[j * L + i] = (float)(zv[cj * L + i] / sv);
        }
    }
    if (tall) {   /* up = W Y [m, r], down = Y^T K^T [r, n] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)L, 1.f, wb, (int)L, yf, (int)r,
                    0.f, up, (int)r);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)r, (int)n, (int)L, 1.f, yt, (int)L, k, (int)L, 0.f,
                    down, (int)n);
    } else {      /* up = K Y S [m, r], down = S^-1 Y^T W^T [r, n] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)L, 1.f, k, (int)L, yf, (int)r,
                    0.f, up, (int)r);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)r, (int)n, (int)L, 1.f, yt, (int)L, wb, (int)L,
                    0.f, down, (int)n);
    }
    *fallback = 0;
}

/* Block size and power steps for rank r on [m, n]: the Krylov span L is 6 OPS_RSVD_BLOCK(r) either way. */
static void rsvd_plan(int64_t m, int64_t n, int64_t r, int64_t *b, int *q) {
    int64_t lo = m < n ? m : n, hi = m < n ? n : m;
    int lng = hi >= OPS_RSVD_LONG_ASPECT * lo && m * n >= OPS_RSVD_LONG_NUMEL;
    *b = OPS_RSVD_BLOCK(r) * (lng ? (OPS_RSVD_POWER + 1) / (OPS_RSVD_POWER_LONG + 1) : 1);
    *q = lng ? OPS_RSVD_POWER_LONG : OPS_RSVD_POWER;
}

static lora_status factor_randomized(lora_ctx *ctx, const char *what, const float *a, int64_t m, int64_t n,
                                     int64_t r, uint64_t seed, float *up, float *down) {
    int64_t b = 0;
    int q = 0;
    rsvd_plan(m, n, r, &b, &q);
    float *ws = lora_malloc(ctx, (size_t)factor_lanczos_floats(m, n, r, b, q) * 4);
    if (!ws) return LORA_E_NOMEM;
    int fallback = 1;
    factor_lanczos(a, m, n, r, b, q, seed, ws, up, down, &fallback);
    lora_free(ctx, ws);
    if (!fallback) return LORA_OK;
    return factor_krylov_qr(ctx, what, a, m, n, r, b, q, seed, up, down);
}

/* ---- exact SVD through the Gram matrix -------------------------------------------------------- */

/* Rank-r factors of a[m, n] from the top r eigenpairs of the smaller Gram matrix, in float64:
 * m >= n: G = A^T A [n, n] = V S^2 V^T, down = V_r^T, up = A V_r (= U_r S_r);
 * m < n:  G = A A^T [m, m] = U S^2 U^T, up = U_r S_r, down = S_r^-1 U_r^T A (= V_r^T).
 * The float64 Gram (dsyrk) and its partial eigensolver (dsyevr, r of k eigenpairs) cost about
 * a third of sgesdd's bidiagonalisation of the full matrix; squaring the condition number is
 * harmless in float64 for the top r triplets (relative accuracy ~ 1e-16 * (s_0 / s_r)^2).
 * *fallback = 1 (nothing written) when s_r is too small for that, or LAPACK refuses. */
static lora_status factor_gram(lora_ctx *ctx, const float *a, int64_t m, int64_t n, int64_t r, float *up,
                               float *down, int *fallback) {
    int tall = m >= n;
    int64_t k = tall ? n : m;
    *fallback = 1;
    double *ad = lora_malloc(ctx, (size_t)(m * n) * 8), *g = lora_malloc(ctx, (size_t)(k * k) * 8);
    double *w = lora_malloc(ctx, (size_t)k * 8), *z = lora_malloc(ctx, (size_t)(k * r) * 8);
    double *p = lora_malloc(ctx, (size_t)((tall ? m : n) * r) * 8);
    lapack_int *sup = lora_malloc(ctx, (size_t)(2 * r) * sizeof *sup);
    lora_status st = ad && g && w && z && p && sup ? LORA_OK : LORA_E_NOMEM;
    if (!st) {
        for (int64_t i = 0; i < m * n; i++) ad[i] = a[i];
        if (tall) cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)n, (int)m, 1.0, ad, (int)n, 0.0, g, (int)n);
        else cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)m, (int)n, 1.0, ad, (int)n, 0.0, g, (int)m);
        lapack_int found = 0;
        lapack_int info = LAPACKE_dsyevr(LAPACK_ROW_MAJOR, 'V', 'I', 'U', (lapack_int)k, g, (lapack_int)k, 0.0, 0.0,
                                         (lapack_int)(k - r + 1), (lapack_int)k, 0.0, &found, w, z, (lapack_int)r, sup);
        /* ascending: eigenpair j of the result is column r-1-j; refuse a near-singular s_r */
        if (info == 0 && found == r && w[r - 1] > 0 && w[0] > w[r - 1] * 1e-10) {
            *fallback = 0;
            if (tall) {
                /* p[m, r] = A V_r (columns reversed), down[j, c] = V[c, r-1-j] */
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)n, 1.0, ad, (int)n, z,
                            (int)r, 0.0, p, (int)r);
                for (int64_t i = 0; i < m; i++)
                    for (int64_t j = 0; j < r; j++) up[i * r + j] = (float)p[i * r + (r - 1 - j)];
                for (int64_t j = 0; j < r; j++)
                    for (int64_t c = 0; c < n; c++) down[j * n + c] = (float)z[c * r + (r - 1 - j)];
            } else {
                /* p[r, n] = U_r^T A, down = S^-1 p, up = U_r S */
                cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)r, (int)n, (int)m, 1.0, z, (int)r, ad, (int)n,
                            0.0, p, (int)n);
                for (int64_t j = 0; j < r; j++) {
                    int64_t q = r - 1 - j;
                    double sv = sqrt(w[q]);
                    for (int64_t c = 0; c < n; c++) down[j * n + c] = (float)(p[q * n + c] / sv);
                    for (int64_t i = 0; i < m; i++) up[i * r + j] = (float)(z[i * r + q] * sv);
                }
            }
        }
    }
    lora_free(ctx, ad); lora_free(ctx, g); lora_free(ctx, w); lora_free(ctx, z); lora_free(ctx, p); lora_free(ctx, sup);
    return st;
}

lora_status ops_svd_factor(lora_ctx *ctx, const char *what, float *a, int64_t m, int64_t n, int64_t r,
                           int32_t method, uint64_t seed, float *up, float *down) {
    int64_t k = m < n ? m : n;
    if (method == OPS_SVD_RANDOMIZED && OPS_RSVD_SPAN(r) < k)
        return factor_randomized(ctx, what, a, m, n, r, seed, up, down);
    if (method == OPS_SVD_GRAM && r < k) {
        int fallback = 1;
        LORA_TRY(factor_gram(ctx, a, m, n, r, up, down, &fallback));
        if (!fallback) return LORA_OK;
    }
    return factor(ctx, what, a, m, n, r, up, down);   /* exact; also when L would reach min(m, n) */
}

/* Jobs of at most this many elements run side by side, one per thread with single-threaded BLAS
 * (an OpenMP build of OpenBLAS runs one thread inside a parallel region): the skinny sgemms and
 * the L x L eigensolver gain little from a second BLAS thread, whose barrier spins cost most on
 * a busy machine (measured on 2 shared cores under load 4-5: 10240 x 1280, 0.19 CPU s per module
 * side by side against 0.35-0.40 with 2-thread BLAS). Larger ones get all threads. */
#define OPS_SVD_PAR_NUMEL (4096 * 4096)

lora_status ops_svd_factor_many(lora_ctx *ctx, const struct ops_svd_job *jobs, int64_t n, int32_t method, int nt) {
    if (nt < 1) nt = 1;
    /* workspace: one per thread for the side-by-side jobs, one for the others, reused */
    int64_t wsmall = 0, wbig = 0, npar = 0;
    for (int64_t j = 0; j < n && method == OPS_SVD_RANDOMIZED; j++) {
        const struct ops_svd_job *jb = &jobs[j];
        int64_t k = jb->m < jb->n ? jb->m : jb->n, b = 0;
        int q = 0;
        if (OPS_RSVD_SPAN(jb->r) >= k) continue;
        rsvd_plan(jb->m, jb->n, jb->r, &b, &q);
        int64_t f = factor_lanczos_floats(jb->m, jb->n, jb->r, b, q);
        if (nt > 1 && jb->m * jb->n <= OPS_SVD_PAR_NUMEL) {
            if (f > wsmall) wsmall = f;
            npar++;
        }
        if (f > wbig) wbig = f;
    }
    int par = npar > 0;   /* even a lone one: a job's path must not depend on its neighbours */
    wsmall = (wsmall + 15) / 16 * 16;   /* each thread's workspace starts 64-byte aligned (doubles first) */
    size_t need = 0;
    if (par && !ck_mul_size((size_t)wsmall * 4, (size_t)nt, &need))
        return lora_fail(ctx, LORA_E_NOMEM, "randomized SVD workspace overflows");
    if ((size_t)wbig * 4 > need) need = (size_t)wbig * 4;
    float *ws = need ? lora_malloc(ctx, need) : NULL;
    int *done = lora_calloc(ctx, (size_t)n + 1, sizeof *done);
    int64_t *order = lora_calloc(ctx, (size_t)n + 1, sizeof *order);
    if ((need && !ws) || !done || !order) {
        lora_free(ctx, ws);
        lora_free(ctx, done);
        lora_free(ctx, order);
        return LORA_E_NOMEM;
    }
    /* largest first (stable insertion sort by m n), so that the threads' last jobs are small
     * ones and they finish together; a job's result does not depend on its thread or turn */
    for (int64_t j = 0; j < n; j++) {
        int64_t i = j, sz = jobs[j].m * jobs[j].n;
        for (; i > 0 && jobs[order[i - 1]].m * jobs[order[i - 1]].n < sz; i--) order[i] = order[i - 1];
        order[i] = j;
    }
    if (par) {   /* the parallel region touches no ctx state: workspaces and outputs only */
#if LORA_HAVE_OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
#endif
        for (int64_t oj = 0; oj < n; oj++) {
            int64_t j = order[oj];
            const struct ops_svd_job *jb = &jobs[j];
            int64_t k = jb->m < jb->n ? jb->m : jb->n, b = 0;
            int q = 0, fallback = 1;
            if (OPS_RSVD_SPAN(jb->r) >= k || jb->m * jb->n > OPS_SVD_PAR_NUMEL) continue;
#if LORA_HAVE_OPENMP
            float *w = ws + (size_t)wsmall * (size_t)omp_get_thread_num();
#else
            float *w = ws;
#endif
            rsvd_plan(jb->m, jb->n, jb->r, &b, &q);
            factor_lanczos(jb->a, jb->m, jb->n, jb->r, b, q, jb->seed, w, jb->up, jb->down, &fallback);
            done[j] = !fallback;
        }
    }
    /* the rest (and the fallbacks of the side-by-side ones) one after the other, all threads each */
    lora_status st = LORA_OK;
    for (int64_t j = 0; j < n && !st; j++) {
        const struct ops_svd_job *jb = &jobs[j];
        int64_t k = jb->m < jb->n ? jb->m : jb->n, b = 0;
        int q = 0, fallback = 1;
        if (done[j]) continue;
        if (method != OPS_SVD_RANDOMIZED || OPS_RSVD_SPAN(jb->r) >= k) {
            st = ops_svd_factor(ctx, jb->what, jb->a, jb->m, jb->n, jb->r, method, jb->seed, jb->up, jb->down);
            continue;
        }
        rsvd_plan(jb->m, jb->n, jb->r, &b, &q);
        factor_lanczos(jb->a, jb->m, jb->n, jb->r, b, q, jb->seed, ws, jb->up, jb->down, &fallback);
        if (fallback) st = factor_krylov_qr(ctx, jb->what, jb->a, jb->m, jb->n, jb->r, b, q, jb->seed, jb->up, jb->down);
    }
    lora_free(ctx, ws);
    lora_free(ctx, done);
    lora_free(ctx, order);
    return st;
}

/* ---- extract -------------------------------------------------------------------------------- */

static lora_status weight_f32(const struct sd_model *m, const struct net_target *t, float **out) {
    const struct tensor_map *map = t->is_te ? &m->te : &m->unet;
    int64_t i = tmap_find(map, t->weight);
    if (i < 0) return lora_fail(m->ctx, LORA_E_SHAPE_MISMATCH, "model has no tensor '%s'", t->weight);
    const struct lora_tensor *w = &map->t[i];
    int64_t n = tmap_numel(w);
    if (n != t->out * t->in * t->kh * t->kw)
        return lora_fail(m->ctx, LORA_E_SHAPE_MISMATCH, "tensor '%s' has %lld elements (want %lld)", t->weight,
                         (long long)n, (long long)(t->out * t->in * t->kh * t->kw));
    *out = lora_malloc(m->ctx, (size_t)n * 4);
    if (!*out) return LORA_E_NOMEM;
    return net_to_f32(m->ctx, t->weight, w->dtype, w->data, n, *out);
}

lora_status ops_extract(const struct sd_model *org, const struct sd_model *tuned, int64_t dim, int64_t conv_dim,
                        double clamp_q, double min_diff, int32_t svd_method, struct lora_network **out) {
    return ops_extract_on(org, tuned, dim, conv_dim, clamp_q, min_diff, svd_method, -1, out);
}

lora_status ops_extract_on(const struct sd_model *org, const struct sd_model *tuned, int64_t dim, int64_t conv_dim,
                           double clamp_q, double min_diff, int32_t svd_method, int use_gpu, struct lora_network **out) {
    lora_ctx *ctx = org->ctx;
    if (svd_method != OPS_SVD_EXACT && svd_method != OPS_SVD_RANDOMIZED && svd_method != OPS_SVD_GRAM)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "extract: unknown SVD method %d", (int)svd_method);
    if (dim < 1 || conv_dim < 0)
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "extract: dim must be >= 1 and conv_dim >= 0 (got %lld, %lld)",
                         (long long)dim, (long long)conv_dim);
    if (!(clamp_q > 0 && clamp_q <= 1) || !(min_diff >= 0))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "extract: clamp_quantile must be in (0, 1] and min_diff >= 0");
    struct net_target *t = NULL, *t2 = NULL;
    int64_t nt = 0, nt2 = 0;
    LORA_TRY(net_targets(org, conv_dim > 0, &t, &nt));
    lora_status s = net_targets(tuned, conv_dim > 0, &t2, &nt2);
    if (!s && nt != nt2)
        s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "models differ: %lld vs %lld LoRA target modules (SD1 vs SD2?)",
                      (long long)nt, (long long)nt2);
    for (int64_t i = 0; i < nt && !s; i++)
        if (strcmp(t[i].name, t2[i].name) || t[i].in != t2[i].in || t[i].out != t2[i].out || t[i].kh != t2[i].kh ||
            t[i].kw != t2[i].kw)
            s = lora_fail(ctx, LORA_E_SHAPE_MISMATCH, "models differ at module '%s' ('%s')", t[i].name, t[i].weight);
    float **diff = s ? NULL : lora_calloc(ctx, (size_t)nt + 1, sizeof *diff);
    if (!s && !diff) s = LORA_E_NOMEM;
    /* diffs; the text encoder counts as changed if any TE module moved by more than min_diff */
    int te_diff = 0;
    for (int64_t i = 0; i < nt && !s; i++) {
        float *b = NULL;
        s = weight_f32(org, &t[i], &diff[i]);
        if (!s) s = weight_f32(tuned, &t2[i], &b);
        int64_t n = t[i].out * t[i].in * t[i].kh * t[i].kw;
        for (int64_t e = 0; !s && e < n; e++) {
            diff[i][e] = b[e] - diff[i][e];
            if (t[i].is_te && fabsf(diff[i][e]) > min_diff) te_diff = 1;
        }
        lora_free(ctx, b);
    }
    if (!s && !te_diff) lora_log(ctx, LORA_LOG_INFO, "text encoder is the same: extracting the U-Net only");
    struct lora_network *o = NULL;
    if (!s) s = net_alloc(ctx, nt, &o);
    /* CUDA backend: cuSOLVER for the exact SVDs; the CPU when no device is usable */
    struct ops_gpu_svd *gpu = NULL;
    if (!s && (use_gpu > 0 || (use_gpu < 0 && ctx->backend_kind == LORA_BACKEND_CUDA))) {
        if (svd_method != OPS_SVD_EXACT) {
            lora_log(ctx, LORA_LOG_INFO, "extract: the %s SVD runs on the CPU (cuSOLVER does the exact one)",
                     svd_method == OPS_SVD_GRAM ? "Gram" : "randomized");
        } else {
            const char *why = NULL;
            if (ops_gpu_svd_open(ctx, &gpu, &why) != LORA_OK) {
                lora_log(ctx, LORA_LOG_WARN, "extract: no cuSOLVER SVD (%s); using the CPU", why ? why : ctx->errmsg);
                lora_clear_error(ctx);
            }
        }
    }
    /* CPU: chunks of modules through ops_svd_factor_many (small randomized ones side by side) */
    struct ops_svd_job jobs[16];
    int64_t jmod[16], nj = 0, threads = lora_threads(ctx) > 0 ? lora_threads(ctx) : 1;
    for (int64_t i = 0; i < nt && !s; i++) {
        if (!(t[i].is_te && !te_diff)) {
            int kxk = t[i].kind == NET_CONVKXK;
            int64_t r = kxk && conv_dim > 0 ? conv_dim : dim;
            if (r > t[i].in) r = t[i].in;
            if (r > t[i].out) r = t[i].out;
            struct net_module *d = &o->m[o->n++];
            s = init_module(ctx, d, t[i].name, t[i].is_te, t[i].kind, r, t[i].in, t[i].out, t[i].kh, t[i].kw);
            if (s) break;
            d->alpha_dtype = LORA_DTYPE_I64;   /* torch.tensor(down.size()[0]) */
            int64_t k = t[i].in * t[i].kh * t[i].kw;
            if (gpu) {
                s = ops_gpu_svd_factor(gpu, t[i].name, diff[i], t[i].out, k, r, d->up, d->down);
                if (s == LORA_E_GPU_OOM) {   /* too large for the device now: this module on the CPU */
                    lora_log(ctx, LORA_LOG_WARN, "extract: %s; this module on the CPU", ctx->errmsg);
                    lora_clear_error(ctx);
                    s = ops_svd_factor(ctx, t[i].name, diff[i], t[i].out, k, r, svd_method, 0x5eedULL + (uint64_t)i,
                                       d->up, d->down);
                }
                if (!s) s = clamp_quantile(ctx, d->up, t[i].out * r, d->down, r * k, clamp_q);
                net_module_bind(d);
                if (!s) s = lora_progress(ctx, LORA_PHASE_EXTRACT, i + 1, nt, NAN);
                continue;
            }
            jobs[nj] = (struct ops_svd_job){t[i].name, diff[i], t[i].out, k, r, 0x5eedULL + (uint64_t)i, d->up, d->down};
            jmod[nj++] = i;
        }
        if (gpu || (nj < 16 && i + 1 < nt)) continue;
        s = ops_svd_factor_many(ctx, jobs, nj, svd_method, (int)threads);
        for (int64_t j = 0; j < nj; j++) {
            struct net_module *d = &o->m[o->n - nj + j];
            if (!s) s = clamp_quantile(ctx, d->up, jobs[j].m * jobs[j].r, d->down, jobs[j].r * jobs[j].n, clamp_q);
            net_module_bind(d);
            if (!s) s = lora_progress(ctx, LORA_PHASE_EXTRACT, jmod[j] + 1, nt, NAN);
        }
        nj = 0;
    }
    ops_gpu_svd_close(gpu);
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)dim);
    if (!s) s = net_meta_set(o, "ss_network_module", "networks.lora");
    if (!s) s = net_meta_set(o, "ss_network_dim", b);
    if (!s) s = net_meta_set(o, "ss_network_alpha", b);
    for (int64_t i = 0; diff && i < nt; i++) lora_free(ctx, diff[i]);
    lora_free(ctx, diff);
    lora_free(ctx, t);
    lora_free(ctx, t2);
    if (s) { net_free(o); return s; }
    *out = o;
    return LORA_OK;
}

/* ---- resize --------------------------------------------------------------------------------- */

/* torch.searchsorted(seq, v) (left): first index with seq[i] >= v. */
static int64_t searchsorted(const float *seq, int64_t n, float v) {
    int64_t i = 0;
    while (i < n && seq[i] < v) i++;
    return i;
}

static int64_t rank_resize(const float *S, int64_t ns, int64_t rank, int32_t method, double param, float *work) {
    int64_t r = rank;
    if (method == 1) {   /* sv_ratio */
        float min_sv = S[0] / (float)param;
        r = 0;
        for (int64_t i = 0; i < ns; i++) r += S[i] > min_sv;
        if (r < 1) r = 1;
    } else if (method == 2 || method == 3) {   /* sv_fro / sv_cumulative */
        float sum = 0.f;
        for (int64_t i = 0; i < ns; i++) { work[i] = method == 2 ? S[i] * S[i] : S[i]; }
        for (int64_t i = 0; i < ns; i++) sum += work[i];
        float c = 0.f;
        for (int64_t i = 0; i < ns; i++) { c += work[i]; work[i] = c / sum; }
        double target = method == 2 ? param * param : param;
        r = searchsorted(work, ns, (float)target) + 1;
        if (r >= ns) r = ns - 1;
        if (r < 1) r = 1;
        if (method == 2 && r > ns - 1) r = ns - 1;
    }
    if (S[0] <= 1e-6f) r = 1;
    else if (r > rank) r = rank;
    return r;
}

lora_status ops_resize(const struct lora_network *net, int64_t new_rank, int32_t method, double param,
                       struct lora_network **out) {
    lora_ctx *ctx = net->ctx;
    if (new_rank < 1) return lora_fail(ctx, LORA_E_CONFIG_RANGE, "resize: new_rank must be >= 1 (got %lld)", (long long)new_rank);
    if (method < 0 || method > 3 || (method && !(param > 0 && isfinite(param))))
        return lora_fail(ctx, LORA_E_CONFIG_RANGE, "resize: unknown dynamic method %d or bad dynamic_param %g", (int)method, param);
    /* kohya (FEB..): one scale for the whole file, first alpha over the first 2-D module's rank */
    double net_alpha = -1, net_dim = -1;
    for (int64_t i = 0; i < net->n; i++) {
        if (net_alpha < 0 && net->m[i].has_alpha) net_alpha = net->m[i].alpha;
        if (net_dim < 0 && net->m[i].down_ndim == 2) net_dim = (double)net->m[i].rank;
    }
    if (net_dim < 0) net_dim = net->n ? (double)net->m[0].rank : 1;
    if (net_alpha < 0) net_alpha = net_dim;
    double scale = net_alpha / net_dim;
    struct lora_network *o = NULL;
    LORA_TRY(net_alloc(ctx, net->n, &o));
    lora_status s = LORA_OK;
    double fro_sum = 0;
    for (int64_t i = 0; i < net->n && !s; i++) {
        const struct net_module *mm = &net->m[i];
        int64_t m = mm->out, k = mm->in * mm->kh * mm->kw, ns = m < k ? m : k;
        float *full = lora_calloc(ctx, (size_t)(m * k), 4);
        float *u = NULL, *S = NULL, *vt = NULL, *work = NULL;
        if (!full) { s = LORA_E_NOMEM; break; }
        struct net_module unit = *mm;
        unit.alpha = (double)mm->rank;
        unit.has_alpha = 1;
        add_product(full, &unit, 1.0f);
        s = svd(ctx, mm->name, full, m, k, &u, &S, &vt);
        work = s ? NULL : lora_malloc(ctx, (size_t)ns * 4);
        if (!s && !work) s = LORA_E_NOMEM;
        if (!s) {
            int64_t r = rank_resize(S, ns, new_rank, method, param, work);
            if (r > ns) r = ns;
            struct net_module *d = &o->m[o->n++];
            s = init_module(ctx, d, mm->name, mm->is_te, mm->kind, r, mm->in, mm->out, mm->kh, mm->kw);
            if (!s) {
                d->down_ndim = mm->down_ndim;
                d->up_ndim = mm->up_ndim;
                d->dtype = mm->dtype;
                d->alpha_dtype = mm->dtype == LORA_DTYPE_F32 ? LORA_DTYPE_F32 : mm->dtype;
                d->alpha = (double)(float)(scale * (double)r);
                for (int64_t a = 0; a < m; a++)
                    for (int64_t j = 0; j < r; j++) d->up[a * r + j] = u[a * ns + j] * S[j];
                memcpy(d->down, vt, (size_t)(r * k) * 4);
                net_module_bind(d);
                double all = 0, kept = 0;
                for (int64_t j = 0; j < ns; j++) { all += (double)S[j] * S[j]; if (j < r) kept += (double)S[j] * S[j]; }
                double fro = all > 0 ? sqrt(kept / all) : 1.0;
                fro_sum += fro;
                lora_log(ctx, LORA_LOG_INFO, "%s: rank %lld -> %lld, alpha %g, Frobenius norm retained %.1f%%", mm->name,
                         (long long)mm->rank, (long long)r, d->alpha, 100.0 * fro);
            }
        }
        lora_free(ctx, full); lora_free(ctx, u); lora_free(ctx, S); lora_free(ctx, vt); lora_free(ctx, work);
        if (!s) s = lora_progress(ctx, LORA_PHASE_MERGE, i + 1, net->n, NAN);
    }
    if (!s && net->n) lora_log(ctx, LORA_LOG_INFO, "average Frobenius norm retained: %.2f%%", 100.0 * fro_sum / (double)net->n);
    for (int64_t i = 0; i < net->n_meta && !s; i++) s = net_meta_set(o, net->meta_keys[i], net->meta_vals[i]);
    if (!s) {
        char b[64], c[600];
        const char *old = net_meta_get(net, "ss_network_dim");
        snprintf(b, sizeof b, "%lld", (long long)new_rank);
        if (method) s = net_meta_set(o, "ss_network_dim", "Dynamic");
        else s = net_meta_set(o, "ss_network_dim", b);
        if (!s) {
            if (method) s = net_meta_set(o, "ss_network_alpha", "Dynamic");
            else {
                snprintf(b, sizeof b, "%.9g", scale * (double)new_rank);
                if (!strpbrk(b, ".e")) strcat(b, ".0");
                s = net_meta_set(o, "ss_network_alpha", b);
            }
        }
        const char *com = net_meta_get(net, "ss_training_comment");
        snprintf(c, sizeof c, "dimension is resized from %s to %lld%s%s", old ? old : "?", (long long)new_rank,
                 com ? "; " : "", com ? com : "");
        if (!s) s = net_meta_set(o, "ss_training_comment", c);
    }
    if (s) { net_free(o); return s; }
    *out = o;
    return LORA_OK;
}
