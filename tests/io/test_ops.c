/* Merge into a model, LoRA + LoRA (kohya rule and SVD), extract and resize against kohya
 * sd-scripts 75d1883d (tests/data/ops, made by tests/reference/make_ops_fixtures.py). */
#include <stdlib.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/st_map.h"
#include "core/rng.h"
#include "network/network.h"
#include "ops/ops.h"
#include "../test.h"

static const char *data_dir;

static struct tensor_map read_map(lora_ctx *ctx, const char *name) {
    char *p = test_path_join(data_dir, name);
    struct tensor_map m;
    tmap_init(&m, ctx);
    lora_status s = st_read_map(ctx, p, &m, NULL);
    CHECK_MSG(s == LORA_OK, "%s: %s", p, lora_errmsg(ctx));
    free(p);
    return m;
}

static lora_network *load_net(lora_ctx *ctx, const char *name) {
    char *p = test_path_join(data_dir, name);
    lora_network *n = NULL;
    CHECK_STATUS(lora_network_load(ctx, p, &n), LORA_OK);
    free(p);
    return n;
}

static lora_model *load_model(lora_ctx *ctx, int v) {
    char p[64];
    snprintf(p, sizeof p, "sd/v%d_ldm.safetensors", v);
    char *path = test_path_join(data_dir, p);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &m), LORA_OK);
    free(path);
    return m;
}

static float *to_f32(lora_ctx *ctx, const struct lora_tensor *t) {
    int64_t n = tmap_numel(t);
    float *f = malloc((size_t)n * 4 + 4);
    net_to_f32(ctx, t->name, t->dtype, t->data, n, f);
    return f;
}

/* relative Frobenius distance */
static double rel(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) { num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]); den += (double)b[i] * b[i]; }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static float *product(const float *up, const float *down, int64_t out, int64_t r, int64_t k) {
    float *p = calloc((size_t)(out * k) + 1, 4);
    for (int64_t o = 0; o < out; o++)
        for (int64_t j = 0; j < r; j++)
            for (int64_t c = 0; c < k; c++) p[o * k + c] += up[o * r + j] * down[j * k + c];
    return p;
}

static const struct lora_tensor *find(const struct tensor_map *m, const char *mod, const char *suffix) {
    char k[600];
    snprintf(k, sizeof k, "%s.%s", mod, suffix);
    int64_t i = tmap_find(m, k);
    return i < 0 ? NULL : &m->t[i];
}

/* every module of fixture `f` has up @ down within tol of `net`'s, same rank and alpha */
static void compare_products(lora_ctx *ctx, const lora_network *net, const struct tensor_map *f, double tol,
                             const char *what) {
    int64_t bad = 0, n = 0;
    double worst = 0;
    for (int64_t i = 0; i < f->n; i++) {
        const char *nm = f->t[i].name;
        const char *dot = strstr(nm, ".lora_down.weight");
        if (!dot) continue;
        char mod[256];
        snprintf(mod, sizeof mod, "%.*s", (int)(dot - nm), nm);
        int64_t k = net_find(net, mod);
        if (k < 0) { bad++; fprintf(stderr, "%s: missing %s\n", what, mod); continue; }
        const struct net_module *m = &net->m[k];
        const struct lora_tensor *d = &f->t[i], *u = find(f, mod, "lora_up.weight"), *a = find(f, mod, "alpha");
        int64_t r = d->shape[0], kk = m->in * m->kh * m->kw;
        if (r != m->rank || !u || u->shape[0] != m->out) { bad++; fprintf(stderr, "%s: %s rank %lld vs %lld\n", what, mod, (long long)m->rank, (long long)r); continue; }
        float *fd = to_f32(ctx, d), *fu = to_f32(ctx, u);
        float *pw = product(fu, fd, m->out, r, kk), *po = product(m->up, m->down, m->out, r, kk);
        double e = rel(po, pw, m->out * kk);
        if (e > worst) worst = e;
        if (e > tol) { bad++; fprintf(stderr, "%s: %s rel %g\n", what, mod, e); }
        if (a) {
            float av = 0;
            net_to_f32(ctx, a->name, a->dtype, a->data, 1, &av);
            if (fabs(av - m->alpha) > 1e-6 * fabs(av)) { bad++; fprintf(stderr, "%s: %s alpha %g vs %g\n", what, mod, m->alpha, av); }
        }
        free(fd); free(fu); free(pw); free(po);
        n++;
    }
    CHECK_MSG(bad == 0 && n > 0, "%s: %lld of %lld modules differ (worst rel %g)", what, (long long)bad, (long long)n, worst);
    printf("%s: %lld modules, worst relative product error %.3g\n", what, (long long)n, worst);
}

/* weight names the networks merge into */
static int is_target(const lora_model *model, const lora_network *const *nets, int n, int te, const char *w) {
    struct net_target *t = NULL;
    int64_t nt = 0;
    net_targets(&model->sd, 1, &t, &nt);
    int hit = 0;
    for (int64_t i = 0; i < nt && !hit; i++)
        if (t[i].is_te == te && strcmp(t[i].weight, w) == 0)
            for (int k = 0; k < n && !hit; k++) hit = net_find(nets[k], t[i].name) >= 0;
    lora_free(model->ctx, t);
    return hit;
}

static void test_merge_model(lora_ctx *ctx, int v) {
    lora_network *nets[2];
    nets[0] = load_net(ctx, v == 1 ? "network/v1_kohya.safetensors" : "network/v2_kohya.safetensors");
    nets[1] = load_net(ctx, v == 1 ? "network/v1_conv.safetensors" : "network/v2_kohya.safetensors");
    double ratios[2] = {0.7, -0.3};
    char fx[64];
    snprintf(fx, sizeof fx, "ops/v%d_merge2.safetensors", v);
    struct tensor_map f = read_map(ctx, fx);
    for (int keep = 0; keep <= 1; keep++) {
        lora_model *orig = load_model(ctx, v), *m = load_model(ctx, v);
        if (!keep) CHECK_STATUS(lora_model_cast(m, LORA_DTYPE_F32), LORA_OK);
        CHECK_STATUS(lora_merge_into_model(m, (const lora_network *const *)nets, ratios, 2), LORA_OK);
        int64_t bad = 0, cmp = 0, same = 0;
        for (int64_t i = 0; i < f.n; i++) {
            const char *nm = f.t[i].name;
            int te = strncmp(nm, "te.", 3) == 0;
            struct tensor_map *mp = te ? &m->sd.te : &m->sd.unet;
            int64_t w = tmap_find(mp, nm + (te ? 3 : 5));
            if (w < 0) { bad++; continue; }
            float *a = to_f32(ctx, &mp->t[w]), *b = to_f32(ctx, &f.t[i]);
            int64_t n = tmap_numel(&f.t[i]);
            if (keep) for (int64_t e = 0; e < n; e++) {
                if (mp->t[w].dtype == LORA_DTYPE_F16) b[e] = lora_f16_to_f32(lora_f32_to_f16(b[e]));
            }
            double r = rel(a, b, n);
            if (r > (keep ? 1e-3 : 1e-6)) { bad++; fprintf(stderr, "v%d %s: rel %g\n", v, nm, r); }
            cmp++;
            free(a); free(b);
        }
        CHECK_MSG(bad == 0 && cmp == f.n, "v%d merge (keep %d): %lld of %lld tensors differ", v, keep, (long long)bad, (long long)f.n);
        /* everything the networks do not target is unchanged (bytes when dtypes are kept) */
        struct tensor_map *ms[4] = {&m->sd.te, &m->sd.unet, &m->sd.vae, &m->sd.extra};
        struct tensor_map *os[4] = {&orig->sd.te, &orig->sd.unet, &orig->sd.vae, &orig->sd.extra};
        bad = 0;
        for (int j = 0; j < 4; j++)
            for (int64_t i = 0; i < os[j]->n; i++) {
                const struct lora_tensor *o = &os[j]->t[i];
                if (j < 2 && is_target(orig, (const lora_network *const *)nets, 2, j == 0, o->name)) continue;
                int64_t k = tmap_find(ms[j], o->name);
                if (k < 0) { bad++; continue; }
                const struct lora_tensor *t = &ms[j]->t[k];
                if (t->dtype == o->dtype) { bad += t->nbytes != o->nbytes || memcmp(t->data, o->data, o->nbytes) != 0; }
                else if (keep) bad++;
                else { float *a = to_f32(ctx, t), *b = to_f32(ctx, o); bad += rel(a, b, tmap_numel(o)) != 0; free(a); free(b); }
                same++;
            }
        CHECK_MSG(bad == 0 && same > 0, "v%d: %lld of %lld untouched tensors changed", v, (long long)bad, (long long)same);
        lora_model_free(m);
        lora_model_free(orig);
    }
    tmap_clear(&f);
    lora_network_free(nets[0]);
    lora_network_free(nets[1]);
}

static void test_merge_loras(lora_ctx *ctx) {
    lora_network *nets[2] = {load_net(ctx, "ops/v1_b.safetensors"), load_net(ctx, "network/v1_kohya.safetensors")};
    double ratios[2] = {0.7, -0.3};
    lora_network *o = NULL;
    CHECK_STATUS(lora_merge_networks(ctx, (const lora_network *const *)nets, ratios, 2, 0, 0, &o), LORA_OK);
    struct tensor_map f = read_map(ctx, "ops/lmerge.safetensors");
    int64_t bad = 0, n = 0;
    for (int64_t i = 0; o && i < f.n; i++) {
        const struct lora_tensor *t = &f.t[i];
        const char *dot = strchr(t->name, '.');
        char mod[256];
        snprintf(mod, sizeof mod, "%.*s", (int)(dot - t->name), t->name);
        int64_t k = net_find(o, mod);
        if (k < 0) { bad++; continue; }
        const struct net_module *m = &o->m[k];
        float *b = to_f32(ctx, t);
        if (strcmp(dot, ".alpha") == 0) bad += (float)m->alpha != b[0];
        else {
            const float *a = strstr(dot, "down") ? m->down : m->up;
            bad += memcmp(a, b, (size_t)tmap_numel(t) * 4) != 0;
        }
        free(b);
        n++;
    }
    CHECK_MSG(bad == 0 && n == f.n && o && o->n == 210, "LoRA merge: %lld of %lld tensors not bit-identical", (long long)bad, (long long)n);
    tmap_clear(&f);
    lora_network_free(o);
    o = NULL;
    /* different ranks without new_rank */
    lora_network *c = load_net(ctx, "network/v1_conv.safetensors");
    const lora_network *mix[2] = {nets[1], c};
    CHECK_STATUS(lora_merge_networks(ctx, mix, ratios, 2, 0, 0, &o), LORA_E_SHAPE_MISMATCH);
    CHECK(o == NULL && strstr(lora_errmsg(ctx), "lora_") != NULL);
    /* svd merge */
    CHECK_STATUS(lora_merge_networks(ctx, mix, ratios, 2, 2, 1, &o), LORA_OK);
    f = read_map(ctx, "ops/svdmerge.safetensors");
    if (o) compare_products(ctx, o, &f, 1e-4, "svd merge");
    tmap_clear(&f);
    lora_network_free(o);
    lora_network_free(c);
    lora_network_free(nets[0]);
    lora_network_free(nets[1]);
}

static void apply_tuned(lora_model *m, const struct tensor_map *f, int te_too) {
    for (int64_t i = 0; i < f->n; i++) {
        const char *nm = f->t[i].name;
        int te = strncmp(nm, "te.", 3) == 0;
        if (te && !te_too) continue;
        struct tensor_map *mp = te ? &m->sd.te : &m->sd.unet;
        int64_t w = tmap_find(mp, nm + (te ? 3 : 5));
        CHECK_MSG(w >= 0 && mp->t[w].nbytes == f->t[i].nbytes && mp->t[w].dtype == f->t[i].dtype, "%s", nm);
        if (w < 0) continue;
        struct lora_tensor *t = &mp->t[w];
        void *d = lora_malloc(m->ctx, (size_t)t->nbytes);
        memcpy(d, f->t[i].data, (size_t)t->nbytes);
        if (t->owned) lora_free(m->ctx, t->data);
        t->data = d;
        t->owned = 1;
    }
}

/* dW of module `name` (float32, tuned - org), or NULL */
static float *module_delta(lora_model *org, lora_model *tm, const char *name, int64_t *numel) {
    struct net_target *t = NULL;
    int64_t nt = 0;
    float *d = NULL;
    net_targets(&org->sd, 1, &t, &nt);
    for (int64_t i = 0; i < nt && !d; i++) {
        if (strcmp(t[i].name, name)) continue;
        const struct tensor_map *ma = t[i].is_te ? &org->sd.te : &org->sd.unet;
        const struct tensor_map *mb = t[i].is_te ? &tm->sd.te : &tm->sd.unet;
        int64_t a = tmap_find(ma, t[i].weight), b = tmap_find(mb, t[i].weight);
        if (a < 0 || b < 0) break;
        *numel = tmap_numel(&ma->t[a]);
        d = to_f32(org->ctx, &ma->t[a]);
        float *e = to_f32(org->ctx, &mb->t[b]);
        for (int64_t k = 0; k < *numel; k++) d[k] = e[k] - d[k];
        free(e);
    }
    lora_free(org->ctx, t);
    return d;
}

/* --svd randomized: per module up @ down within 1% (relative Frobenius) of the exact SVD's, and
 * the reconstruction errors |dW - up down| / |dW| of both reported */
static void test_extract_randomized(lora_ctx *ctx, lora_model *org, lora_model *tm) {
    lora_network *ex = NULL, *rn = NULL;
    CHECK_STATUS(lora_extract(org, tm, 2, 1, 1.0, 1e-6, LORA_SVD_EXACT, &ex), LORA_OK);
    CHECK_STATUS(lora_extract(org, tm, 2, 1, 1.0, 1e-6, LORA_SVD_RANDOMIZED, &rn), LORA_OK);
    lora_network *none = NULL;
    CHECK_STATUS(lora_extract(org, tm, 2, 1, 1.0, 1e-6, 7, &none), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_extract(org, tm, 2, -1, 1.0, 1e-6, LORA_SVD_EXACT, &none), LORA_E_CONFIG_RANGE);
    CHECK(none == NULL);
    if (!ex || !rn) { lora_network_free(ex); lora_network_free(rn); return; }
    CHECK(ex->n == rn->n);
    int64_t bad = 0, n = 0, sampled = 0, ambiguous = 0;
    double worst = 0, ee = 0, er = 0, worst_gap = 0;
    for (int64_t i = 0; i < ex->n && i < rn->n; i++) {
        const struct net_module *a = &ex->m[i], *b = &rn->m[i];
        CHECK(strcmp(a->name, b->name) == 0 && a->rank == b->rank);
        int64_t k = a->in * a->kh * a->kw, numel = 0;
        float *pa = product(a->up, a->down, a->out, a->rank, k), *pb = product(b->up, b->down, b->out, b->rank, k);
        double e = rel(pb, pa, a->out * k);
        int is_sampled = OPS_RSVD_SPAN(a->rank) < (a->out < k ? a->out : k);
        sampled += is_sampled;
        if (e > worst) worst = e;
        float *d = module_delta(org, tm, a->name, &numel);
        double x = 0, y = 0;
        if (d && numel == a->out * k) {
            x = rel(pa, d, numel); y = rel(pb, d, numel);
            ee += x; er += y;
            if (y - x > worst_gap) worst_gap = y - x;
        }
        /* sigma_r ~ sigma_r+1 makes the rank-r product itself ambiguous (more power iterations do not
         * move these): there the randomized reconstruction error must be within 1% of the exact one */
        if (e > 0.01 && d && y <= x * 1.01 + 1e-7) ambiguous++;
        else if (e > 0.01) { bad++; fprintf(stderr, "randomized extract: %s rel %g (errors %g vs %g)\n", a->name, e, y, x); }
        free(d); free(pa); free(pb);
        n++;
    }
    CHECK_MSG(bad == 0 && n > 0, "randomized extract: %lld of %lld modules beyond 1%% (worst %g)", (long long)bad,
              (long long)n, worst);
    CHECK_MSG(ambiguous * 5 <= sampled, "randomized extract: %lld of %lld sampled modules off the exact product",
              (long long)ambiguous, (long long)sampled);
    CHECK(ee > 0);
    printf("extract --svd randomized: %lld modules (%lld through the range finder), worst product distance to exact "
           "%.3g (%lld beyond 1%%, near-degenerate sigma_r, reconstruction within 1%% of exact); mean reconstruction error |dW - up down|/|dW|: exact %.4f, randomized %.4f (worst excess %.3g)\n",
           (long long)n, (long long)sampled, worst, (long long)ambiguous, ee / (double)n, er / (double)n, worst_gap);
    lora_network_free(ex);
    lora_network_free(rn);
}

static void test_extract(lora_ctx *ctx) {
    struct tensor_map tuned = read_map(ctx, "ops/v1_tuned.safetensors");
    struct tensor_map f = read_map(ctx, "ops/extract.safetensors");
    lora_model *org = load_model(ctx, 1), *tm = load_model(ctx, 1);
    apply_tuned(tm, &tuned, 1);
    lora_network *o = NULL;
    CHECK_STATUS(lora_extract(org, tm, 2, 1, 0.99, 1e-6, LORA_SVD_EXACT, &o), LORA_OK);
    if (o) {
        compare_products(ctx, o, &f, 1e-4, "extract");
        CHECK_MSG(o->n == 296, "extract: %lld modules (kohya: 18 TE + 278 U-Net)", (long long)o->n);
        int64_t nz = 0;
        for (int64_t i = 0; i < o->n; i++) {
            char k[600];
            snprintf(k, sizeof k, "%s.lora_down.weight", o->m[i].name);
            if (tmap_find(&f, k) >= 0) continue;
            for (int64_t e = 0; e < o->m[i].out * o->m[i].rank; e++) nz += o->m[i].up[e] != 0.f;
        }
        CHECK_MSG(nz == 0, "extract: %lld non-zero up entries in unchanged modules", (long long)nz);
        char out[128];
        snprintf(out, sizeof out, "/tmp/lora_test_ops_%d.safetensors", (int)getpid());
        CHECK_STATUS(lora_network_save(o, out, NULL), LORA_OK);
        lora_network *r = NULL;
        CHECK_STATUS(lora_network_load(ctx, out, &r), LORA_OK);
        if (r) CHECK(r->n == o->n && r->m[0].alpha_dtype == LORA_DTYPE_I64 && r->m[0].alpha == 2.0);
        lora_network_free(r);
        unlink(out);
    }
    lora_network_free(o);
    o = NULL;
    /* the params-bag form (keys 5001-5011) computes the same network, on the CPU when a device
     * is asked for and none is usable (the products equal kohya's) */
    lora_params *xp = NULL;
    CHECK_STATUS(lora_params_create(ctx, &xp), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "dim", "2"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "conv_dim", "1"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "--min_diff", "1e-6"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "clamp_quantile", "0.99"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "svd", "exact"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "device", "cuda"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "svd", "qr"), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_extract_ex(org, tm, xp, &o), LORA_OK);
    if (o) compare_products(ctx, o, &f, 1e-4, "extract_ex");
    lora_network_free(o);
    o = NULL;
    /* gram: the products of ops_svd_factor equal sgesdd's on every module's dW (the quantile
     * clamp after it is not sign-invariant, even at quantile 1: its bound is the largest value,
     * not the largest magnitude, so the factors are compared before it); where sigma_r ~
     * sigma_r+1 the rank-r product is ambiguous and the reconstruction errors must agree */
    CHECK_STATUS(lora_params_parse(xp, "svd", "gram"), LORA_OK);
    CHECK_STATUS(lora_params_parse(xp, "device", "cpu"), LORA_OK);
    lora_network *g1 = NULL, *g0 = NULL;
    CHECK_STATUS(lora_extract_ex(org, tm, xp, &g1), LORA_OK);
    CHECK_STATUS(lora_extract(org, tm, 2, 1, 0.99, 1e-6, LORA_SVD_EXACT, &g0), LORA_OK);
    if (g0 && g1) {
        int64_t bad = 0, amb = 0;
        double worst = 0, worst_err = 0;
        for (int64_t i = 0; i < g0->n && i < g1->n; i++) {
            const struct net_module *a = &g0->m[i];
            int64_t k = a->in * a->kh * a->kw, numel = 0, r = a->rank;
            bad += strcmp(a->name, g1->m[i].name) != 0 || r != g1->m[i].rank;
            float *d = module_delta(org, tm, a->name, &numel);
            if (!d || numel != a->out * k) { bad++; free(d); continue; }
            float *w = malloc((size_t)numel * 4), *u0 = malloc((size_t)(a->out * r) * 4), *v0 = malloc((size_t)(r * k) * 4);
            float *u1 = malloc((size_t)(a->out * r) * 4), *v1 = malloc((size_t)(r * k) * 4);
            memcpy(w, d, (size_t)numel * 4);
            CHECK_STATUS(ops_svd_factor(ctx, a->name, w, a->out, k, r, OPS_SVD_EXACT, 1, u0, v0), LORA_OK);
            memcpy(w, d, (size_t)numel * 4);
            CHECK_STATUS(ops_svd_factor(ctx, a->name, w, a->out, k, r, OPS_SVD_GRAM, 1, u1, v1), LORA_OK);
            float *pa = product(u0, v0, a->out, r, k), *pb = product(u1, v1, a->out, r, k);
            double e = rel(pb, pa, numel), x = rel(pa, d, numel), y = rel(pb, d, numel);
            if (e > 1e-4 && fabs(y - x) <= 1e-5 * x + 1e-7) {
                amb++;
                if (fabs(y - x) > worst_err) worst_err = fabs(y - x);
            } else {
                if (e > worst) worst = e;
                bad += e > 1e-4;
                if (e > 1e-4) fprintf(stderr, "gram: %s [%lld, %lld] r %lld: product distance %g, errors %g vs %g\n",
                                      a->name, (long long)a->out, (long long)k, (long long)r, e, y, x);
            }
            free(d); free(w); free(u0); free(v0); free(u1); free(v1); free(pa); free(pb);
        }
        CHECK_MSG(bad == 0 && g0->n == g1->n, "gram: %lld modules differ from sgesdd (worst %g)", (long long)bad, worst);
        printf("svd gram on the extract modules: %lld, worst product distance to sgesdd %.3g (%lld with sigma_r ~ "
               "sigma_r+1: reconstruction errors equal within %.2g)\n", (long long)g0->n, worst, (long long)amb,
               worst_err);
    }
    lora_network_free(g0);
    lora_network_free(g1);
    lora_params_free(xp);
    test_extract_randomized(ctx, org, tm);
    /* text encoder unchanged: U-Net only */
    lora_model *tm2 = load_model(ctx, 1);
    apply_tuned(tm2, &tuned, 0);
    CHECK_STATUS(lora_extract(org, tm2, 2, 0, 0.99, 1e-6, LORA_SVD_EXACT, &o), LORA_OK);
    int64_t te = -1;
    if (o) lora_network_get_int(o, LORA_NETWORK_TE_MODULES, &te);
    CHECK_MSG(te == 0, "TE modules %lld (want 0)", (long long)te);
    lora_network_free(o);
    lora_model_free(tm2);
    lora_model_free(org);
    lora_model_free(tm);
    tmap_clear(&tuned);
    tmap_clear(&f);
}

static void test_resize(lora_ctx *ctx) {
    lora_network *n = load_net(ctx, "network/v1_kohya.safetensors");
    lora_network *o = NULL;
    CHECK_STATUS(lora_network_resize(n, 1, LORA_RESIZE_FIXED, 0, &o), LORA_OK);
    struct tensor_map f = read_map(ctx, "ops/resize_r1.safetensors");
    if (o) compare_products(ctx, o, &f, 1e-4, "resize rank 1");
    tmap_clear(&f);
    lora_network_free(o);
    o = NULL;
    CHECK_STATUS(lora_network_resize(n, 2, LORA_RESIZE_SV_RATIO, 2.0, &o), LORA_OK);
    f = read_map(ctx, "ops/resize_svratio.safetensors");
    if (o) compare_products(ctx, o, &f, 1e-4, "resize sv_ratio 2");
    tmap_clear(&f);
    lora_network_free(o);
    o = NULL;
    CHECK_STATUS(lora_network_resize(n, 0, LORA_RESIZE_FIXED, 0, &o), LORA_E_CONFIG_RANGE);
    lora_network_free(n);
}

/* OPS_SVD_GRAM against LAPACK sgesdd (OPS_SVD_EXACT) on tall, wide and rank-deficient
 * matrices: products up @ down within 1e-4 relative (the factors' signs may differ). */
static void test_gram(lora_ctx *ctx) {
    static const int64_t shapes[][3] = {{96, 40, 8}, {40, 96, 8}, {64, 64, 16}, {200, 30, 4}, {30, 200, 29}};
    for (int rd = 0; rd <= 1; rd++)
        for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
            int64_t m = shapes[i][0], n = shapes[i][1], r = shapes[i][2];
            float *a = malloc((size_t)(m * n) * 4), *b = malloc((size_t)(m * n) * 4), *c = malloc((size_t)(m * n) * 4);
            float *u0 = malloc((size_t)(m * r) * 4), *d0 = malloc((size_t)(r * n) * 4);
            float *u1 = malloc((size_t)(m * r) * 4), *d1 = malloc((size_t)(r * n) * 4);
            lora_philox_normal(77 + i, 0, a, m * n);
            if (rd) {   /* rank 3 < r: the Gram path must fall back to sgesdd */
                float *x = malloc((size_t)(m * 3) * 4), *y = malloc((size_t)(3 * n) * 4);
                lora_philox_normal(5 + i, 0, x, m * 3);
                lora_philox_normal(9 + i, 0, y, 3 * n);
                for (int64_t e = 0; e < m * n; e++) a[e] = 0;
                for (int64_t o = 0; o < m; o++)
                    for (int64_t k = 0; k < 3; k++)
                        for (int64_t q = 0; q < n; q++) a[o * n + q] += x[o * 3 + k] * y[k * n + q];
                free(x); free(y);
            }
            memcpy(b, a, (size_t)(m * n) * 4);
            CHECK_STATUS(ops_svd_factor(ctx, "t", b, m, n, r, OPS_SVD_EXACT, 1, u0, d0), LORA_OK);
            memcpy(b, a, (size_t)(m * n) * 4);
            CHECK_STATUS(ops_svd_factor(ctx, "t", b, m, n, r, OPS_SVD_GRAM, 1, u1, d1), LORA_OK);
            float *p0 = product(u0, d0, m, r, n), *p1 = product(u1, d1, m, r, n);
            double e = rel(p1, p0, m * n);
            CHECK_MSG(e < 1e-4, "gram SVD [%lld, %lld] r %lld (rank-deficient %d): products differ by %g", (long long)m,
                      (long long)n, (long long)r, rd, e);
            free(p0); free(p1); free(a); free(b); free(c); free(u0); free(d0); free(u1); free(d1);
        }
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) data_dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    test_merge_model(ctx, 1);
    test_merge_model(ctx, 2);
    test_merge_loras(ctx);
    test_extract(ctx);
    test_resize(ctx);
    test_gram(ctx);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    return test_finish("test_ops");
}
