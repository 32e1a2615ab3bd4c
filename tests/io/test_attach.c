/* lora_model_attach / set_multiplier / detach / detach_all on the tiny SD v1/v2 models
 * (tests/data/sd, float16 weights):
 *  - the effective weights equal original + sum m_i * alpha_i/r_i * up_i @ down_i computed here
 *    in double (hand-derived), 1x1/3x3 convs and Linear alike: the float32 replacements, and
 *    for layers with an adapter slot the untouched weight plus the low-rank branch's up @ down;
 *  - a save holds the merged weights;
 *  - U-Net and text-encoder outputs with two networks attached at run time equal those of a
 *    float32 copy of the model with both merged (lora_model_cast + lora_model_merge_network);
 *  - no drift: any multiplier sequence gives the bytes of one attach at the final multiplier;
 *    detaching restores the original tensors bit for bit (and the original outputs);
 *  - LORA_APPLY_MERGE with runtime networks present survives their detaching;
 *  - lifetime: freeing an attached network, freeing the model first; no byte leaks;
 *  - errors: double attach, detach of a stranger, NaN multiplier, unknown mode, a network for
 *    another model (nothing matches: the model stays as it was), another context;
 *  - A1111 / additional-networks / ComfyUI key names: every module name of our v1/v2 networks
 *    (with conv_dim) maps, by the kohya -> LDM table of spec/kohya-lora.md §2.7, to a weight of
 *    the tiny LDM checkpoints tests/data/sd/vN_ldm.safetensors with a fitting shape. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lora/lora.h"
#include "internal.h"
#include "core/dtype.h"
#include "io/safetensors.h"
#include "model/clip.h"
#include "network/network.h"
#include "backend/backend.h"
#include "../test.h"
#include "../ref_file.h"

static const char *data_dir;

static lora_model *load_model(lora_ctx *ctx, int v) {
    char p[512];
    snprintf(p, sizeof p, "%s/sd/v%d_diffusers", data_dir, v);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, p, NULL, &m), LORA_OK);
    return m;
}

/* A network on `model` with every lora_up set by a formula (a fresh one is a no-op). */
static lora_network *make_net(lora_model *model, int dim, double alpha, int conv_dim, int seed) {
    lora_params *p = NULL;
    lora_params_create(model->ctx, &p);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, dim);
    lora_params_set_float(p, LORA_P_NETWORK_ALPHA, alpha);
    lora_params_set_int(p, LORA_P_CONV_DIM, conv_dim);
    lora_params_set_int(p, LORA_P_SEED, seed);
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_create(model, p, &net), LORA_OK);
    lora_params_free(p);
    for (int64_t k = 0; net && k < net->n; k++)
        for (int64_t i = 0; i < net->m[k].out * net->m[k].rank; i++)
            net->m[k].up[i] = (float)(((i * 5 + k * 3 + seed) % 19) - 9) / 24.0f;
    return net;
}

/* Deterministic inputs. */
static float *fill(int64_t n, int seed) {
    float *v = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) v[i] = (float)sin(0.37 * (double)i + seed) * 0.8f;
    return v;
}

struct outs { float u[256]; float te[16 * 64]; int64_t nte; };

static void run(lora_model *m, struct outs *o) {
    int64_t X = 0;
    lora_model_get_int(m, LORA_MODEL_CONTEXT_DIM, &X);
    float *lat = fill(256, 1), *c = fill(77 * X, 2), t = 321.0f;
    CHECK_STATUS(lora_model_unet_predict(m, lat, 1, 8, 8, &t, c, 77, o->u, 256), LORA_OK);
    free(lat);
    free(c);
    struct clip_model cm;
    memset(&cm, 0, sizeof cm);
    CHECK_STATUS(clip_init(&cm, m->ctx->backend, &m->sd.te, &m->sd.cfg), LORA_OK);
    int32_t ids[16];
    for (int i = 0; i < 16; i++) ids[i] = (i * 37 + 5) % (int)cm.vocab;
    /* runtime-attached networks act on the text encoder as low-rank branches */
    const struct nn_lora *te_lora[64 * CLIP_N_SLOTS];
    int64_t rank = 0;
    CHECK(cm.layers <= 64);
    CHECK_STATUS(attach_te_adapters(m, cm.layers, te_lora, &rank), LORA_OK);
    struct clip_plan p;
    CHECK_STATUS(clip_plan_init(&p, &cm, 1, 16, rank, 0), LORA_OK);
    CHECK_STATUS(clip_forward(&p, ids, rank ? te_lora : NULL, 1), LORA_OK);
    CHECK_STATUS(clip_download_output(&p, o->te, NULL), LORA_OK);
    o->nte = 16 * cm.hidden;
    clip_plan_free(&p);
    clip_free(&cm);
}

/* Snapshot of every tensor (name, dtype, bytes) of the TE and U-Net maps. */
struct snap { int64_t n; char **names; lora_dtype *dt; void **data; uint64_t *nb; };

static void snap_take(lora_model *m, struct snap *s) {
    int64_t n = m->sd.te.n + m->sd.unet.n;
    s->n = n;
    s->names = calloc((size_t)n, sizeof *s->names);
    s->dt = calloc((size_t)n, sizeof *s->dt);
    s->data = calloc((size_t)n, sizeof *s->data);
    s->nb = calloc((size_t)n, sizeof *s->nb);
    for (int64_t i = 0; i < n; i++) {
        const struct lora_tensor *t = i < m->sd.te.n ? &m->sd.te.t[i] : &m->sd.unet.t[i - m->sd.te.n];
        s->names[i] = strdup(t->name);
        s->dt[i] = t->dtype;
        s->nb[i] = t->nbytes;
        s->data[i] = malloc(t->nbytes ? t->nbytes : 1);
        memcpy(s->data[i], t->data, t->nbytes);
    }
}

/* Number of tensors whose dtype or bytes differ from the snapshot. */
static int64_t snap_diff(lora_model *m, const struct snap *s) {
    int64_t d = 0;
    for (int64_t i = 0; i < s->n; i++) {
        const struct tensor_map *map = i < m->sd.te.n ? &m->sd.te : &m->sd.unet;
        int64_t k = tmap_find(map, s->names[i]);
        if (k < 0) { d++; continue; }
        const struct lora_tensor *t = &map->t[k];
        d += t->dtype != s->dt[i] || t->nbytes != s->nb[i] || memcmp(t->data, s->data[i], s->nb[i]) != 0;
    }
    return d;
}

static void snap_free(struct snap *s) {
    for (int64_t i = 0; i < s->n; i++) { free(s->names[i]); free(s->data[i]); }
    free(s->names); free(s->dt); free(s->data); free(s->nb);
}

static float tf(const struct lora_tensor *t, int64_t i) {
    if (t->dtype == LORA_DTYPE_F16) { uint16_t v; memcpy(&v, (const char *)t->data + 2 * i, 2); return lora_f16_to_f32(v); }
    if (t->dtype == LORA_DTYPE_BF16) { uint16_t v; memcpy(&v, (const char *)t->data + 2 * i, 2); return lora_bf16_to_f32(v); }
    float v;
    memcpy(&v, (const char *)t->data + 4 * i, 4);
    return v;
}

/* The low-rank branch attached to weight `name`, or NULL. */
static const struct attach_lowrank *branch_of(lora_model *m, int32_t is_te, const char *name) {
    for (int64_t i = 0; m->attach && i < m->attach->n_lr; i++)
        if (m->attach->lr[i].is_te == is_te && strcmp(m->attach->lr[i].weight, name) == 0) return &m->attach->lr[i];
    return NULL;
}

/* The effective weights of modules k of nets[] equal orig + sum in double, for every module:
 * replaced weights (convs, ...) are float32 sums in the map; weights with an adapter slot stay
 * untouched in the map and get a low-rank branch whose up @ down (computed here in double)
 * supplies the sum. base_merged: the bases of branch weights hold a network merged into the
 * 16-bit tensor since (lora_merge_into_model under attachments): their bytes are not compared
 * and each element may be off by half a float16 step of the merged base. */
static void check_weights_ex(lora_model *m, const struct snap *orig, lora_network **nets, const double *mult, int n,
                             int base_merged) {
    struct net_target *t = NULL;
    int64_t nt = 0;
    CHECK_STATUS(net_targets(&m->sd, 1, &t, &nt), LORA_OK);
    double worst = 0;
    int64_t checked = 0, kinds[4] = {0}, branches = 0;
    for (int64_t i = 0; i < nt; i++) {
        const struct tensor_map *map = t[i].is_te ? &m->sd.te : &m->sd.unet;
        const struct lora_tensor *w = &map->t[tmap_find(map, t[i].weight)];
        int64_t si = -1;
        for (int64_t k = 0; k < orig->n && si < 0; k++)
            if (strcmp(orig->names[k], t[i].weight) == 0 && (k < m->sd.te.n) == (t[i].is_te != 0)) si = k;
        struct lora_tensor o = {0};
        o.dtype = orig->dt[si];
        o.data = orig->data[si];
        int64_t kk = t[i].in * t[i].kh * t[i].kw, any = 0;
        for (int j = 0; j < n; j++) any |= net_find(nets[j], t[i].name) >= 0;
        const struct attach_lowrank *b = branch_of(m, t[i].is_te, t[i].weight);
        if (!any) {
            CHECK_MSG(!b, "%s has a branch", t[i].weight);
            if (!base_merged)
                CHECK_MSG(w->dtype == o.dtype && memcmp(w->data, o.data, w->nbytes) == 0, "%s changed", t[i].weight);
            continue;
        }
        if (b) {
            CHECK_MSG(b->l.in == kk && b->l.out == t[i].out && b->l.scale == 1.0f, "%s: branch shape", t[i].weight);
            if (!base_merged)
                CHECK_MSG(w->dtype == o.dtype && memcmp(w->data, o.data, w->nbytes) == 0, "%s (branch) changed",
                          t[i].weight);
            branches++;
        } else {
            CHECK(w->dtype == LORA_DTYPE_F32);
        }
        kinds[t[i].kind]++;
        for (int64_t r = 0; r < t[i].out; r++)
            for (int64_t c = 0; c < kk; c++) {
                double want = tf(&o, r * kk + c);
                for (int j = 0; j < n; j++) {
                    int64_t q = net_find(nets[j], t[i].name);
                    if (q < 0) continue;
                    const struct net_module *mm = &nets[j]->m[q];
                    double acc = 0;
                    for (int64_t z = 0; z < mm->rank; z++) acc += (double)mm->up[r * mm->rank + z] * mm->down[z * kk + c];
                    want += mult[j] * mm->alpha / (double)mm->rank * acc;
                }
                double got = tf(w, r * kk + c), slack = 0;
                if (b) {
                    const float *bd = b->host, *bu = b->host + b->l.rank * kk;
                    for (int64_t z = 0; z < b->l.rank; z++) got += (double)bu[r * b->l.rank + z] * bd[z * kk + c];
                    if (base_merged) slack = 1.01 * fabs(tf(w, r * kk + c)) / 2048.0;
                }
                double e = (fabs(got - want) - slack) / (1.0 + fabs(want));
                if (e > worst) worst = e;
            }
        checked++;
    }
    lora_free(m->ctx, t);
    printf("  %lld weights checked (%lld Linear, %lld 1x1, %lld kxk; %lld as low-rank branches): worst error %.2e\n",
           (long long)checked, (long long)kinds[NET_LINEAR], (long long)kinds[NET_CONV1X1], (long long)kinds[NET_CONVKXK],
           (long long)branches, worst);
    CHECK_MSG(worst < 2e-6, "worst %.3e", worst);
    CHECK(checked > 0 && branches > 0);
}

static void check_weights(lora_model *m, const struct snap *orig, lora_network **nets, const double *mult, int n) {
    check_weights_ex(m, orig, nets, mult, n, 0);
}

static void check_close(const char *what, const float *a, const float *b, int64_t n, double tol) {
    double r = rel_l2(a, b, n);
    printf("  %-44s rel L2 %.2e\n", what, r);
    CHECK_MSG(r <= tol, "%s: %.3e", what, r);
}

static void test_attach_version(lora_ctx *ctx, int v) {
    printf("v%d\n", v);
    lora_model *m = load_model(ctx, v);
    if (!m) return;
    struct snap orig;
    snap_take(m, &orig);
    struct outs base, a1, tmp;
    run(m, &base);
    lora_network *n1 = make_net(m, 2, 1.0, 2, 5), *n2 = make_net(m, 3, 3.0, 0, 6);
    double mult[2] = {0.8, -0.4};
    CHECK_STATUS(lora_model_attach(m, n1, mult[0], LORA_APPLY_RUNTIME), LORA_OK);
    CHECK_STATUS(lora_model_attach(m, n2, mult[1], LORA_APPLY_RUNTIME), LORA_OK);
    CHECK(lora_model_attached_count(m) == 2);
    lora_network *nets[2] = {n1, n2};
    check_weights(m, &orig, nets, mult, 2);
    run(m, &a1);
    double moved = rel_l2(a1.u, base.u, 256);
    CHECK_MSG(moved > 1e-2, "the networks change the U-Net output (%.3e)", moved);

    /* the same as merging both into a float32 copy */
    lora_model *f = load_model(ctx, v);
    CHECK_STATUS(lora_model_cast(f, LORA_DTYPE_F32), LORA_OK);
    CHECK_STATUS(lora_model_merge_network(f, n1, mult[0]), LORA_OK);
    CHECK_STATUS(lora_model_merge_network(f, n2, mult[1]), LORA_OK);
    run(f, &tmp);
    check_close("U-Net: runtime vs float32 merge", a1.u, tmp.u, 256, 1e-5);   /* fp32 rounding of W through a random tiny U-Net */
    check_close("TE: runtime vs float32 merge", a1.te, tmp.te, a1.nte, 1e-5);
    lora_model_free(f);

    /* no drift: a walk of multipliers ends where one attach at the final value is */
    struct snap s1;
    snap_take(m, &s1);
    double walk[] = {0.3, -2.0, 17.5, 0.0, 1e-3, mult[0]};
    for (size_t i = 0; i < sizeof walk / sizeof *walk; i++) CHECK_STATUS(lora_model_set_multiplier(m, n1, walk[i]), LORA_OK);
    CHECK(snap_diff(m, &s1) == 0);
    CHECK_STATUS(lora_model_detach(m, n1), LORA_OK);
    CHECK_STATUS(lora_model_attach(m, n1, mult[0], LORA_APPLY_RUNTIME), LORA_OK);
    /* order n2, n1 now: sums in another order may round differently, within float32 */
    run(m, &tmp);
    check_close("U-Net after detach + re-attach", tmp.u, a1.u, 256, 5e-6);
    /* multiplier 0.5 == half the delta */
    CHECK_STATUS(lora_model_set_multiplier(m, n1, 0.5 * mult[0]), LORA_OK);
    CHECK_STATUS(lora_model_set_multiplier(m, n2, 0.5 * mult[1]), LORA_OK);
    double half[2] = {0.5 * mult[0], 0.5 * mult[1]};
    check_weights(m, &orig, nets, half, 2);
    CHECK_STATUS(lora_model_set_multiplier(m, n1, mult[0]), LORA_OK);
    CHECK_STATUS(lora_model_set_multiplier(m, n2, mult[1]), LORA_OK);

    /* detach one: the other alone */
    CHECK_STATUS(lora_model_detach(m, n1), LORA_OK);
    check_weights(m, &orig, &n2, &mult[1], 1);
    /* detach all: the original tensors, bit for bit, and the original outputs */
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    CHECK(lora_model_attached_count(m) == 0);
    CHECK_MSG(snap_diff(m, &orig) == 0, "%lld tensors differ after detach_all", (long long)snap_diff(m, &orig));
    run(m, &tmp);
    CHECK(memcmp(tmp.u, base.u, sizeof tmp.u) == 0);
    CHECK(memcmp(tmp.te, base.te, (size_t)base.nte * 4) == 0);
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);   /* nothing attached: no-op */

    /* errors */
    CHECK_STATUS(lora_model_detach(m, n1), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_model_set_multiplier(m, n1, 1.0), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_model_attach(m, n1, NAN, LORA_APPLY_RUNTIME), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_attach(m, n1, INFINITY, LORA_APPLY_MERGE), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_attach(m, n1, 1.0, 0), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_attach(m, n1, 1.0, 3), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_attach(m, n1, 1.0, LORA_APPLY_RUNTIME), LORA_OK);
    CHECK_STATUS(lora_model_attach(m, n1, 1.0, LORA_APPLY_RUNTIME), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_model_set_multiplier(m, n1, NAN), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(lora_model_attach(NULL, n1, 1.0, LORA_APPLY_RUNTIME), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_model_attach(m, NULL, 1.0, LORA_APPLY_RUNTIME), LORA_E_INVALID_ARG);
    CHECK_STATUS(lora_model_detach_all(NULL), LORA_E_INVALID_ARG);
    CHECK(lora_model_attached_count(NULL) == -1);
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    CHECK(snap_diff(m, &orig) == 0);

    /* LORA_APPLY_MERGE while a runtime network is attached: survives the detach */
    lora_model *g = load_model(ctx, v);
    CHECK_STATUS(lora_model_attach(g, n2, mult[1], LORA_APPLY_MERGE), LORA_OK);
    CHECK(lora_model_attached_count(g) == 0);
    CHECK_STATUS(lora_model_detach(g, n2), LORA_E_INVALID_ARG);
    struct outs merged_only;
    run(g, &merged_only);
    CHECK_STATUS(lora_model_attach(m, n1, mult[0], LORA_APPLY_RUNTIME), LORA_OK);
    CHECK_STATUS(lora_model_attach(m, n2, mult[1], LORA_APPLY_MERGE), LORA_OK);
    CHECK(lora_model_attached_count(m) == 1);
    run(m, &tmp);
    /* n2 is merged into the float16 tensors, as without attachments: n1 acts on most of them
     * as a low-rank branch and no longer through a float32 copy holding n2 too (was 1e-3) */
    check_close("U-Net: runtime n1 + merge n2", tmp.u, a1.u, 256, 5e-3);
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    /* the merged bases go back in the weights' dtype: what g holds (up to summation order) */
    run(m, &tmp);
    check_close("U-Net: merge n2 after detaching n1 (vs merge)", tmp.u, merged_only.u, 256, 1e-3);
    CHECK(rel_l2(tmp.u, base.u, 256) > 1e-2);
    lora_model_free(g);

    /* others changing replaced weights: lora_merge_into_model and lora_model_cast while n1 is
     * attached act on the base, as without attachments */
    lora_model_free(m);
    m = load_model(ctx, v);
    CHECK_STATUS(lora_model_attach(m, n1, mult[0], LORA_APPLY_RUNTIME), LORA_OK);
    const lora_network *two[1] = {n2};
    CHECK_STATUS(lora_merge_into_model(m, two, &mult[1], 1), LORA_OK);
    CHECK_STATUS(lora_model_set_multiplier(m, n1, mult[0]), LORA_OK);   /* adopts the merge */
    /* n2 went into the 16-bit tensors of weights n1 acts on as a branch (as without attachments) */
    check_weights_ex(m, &orig, nets, mult, 2, 1);
    CHECK_STATUS(lora_model_detach(m, n1), LORA_OK);
    run(m, &tmp);
    check_close("U-Net: merge_into_model under n1, n1 detached", tmp.u, merged_only.u, 256, 1e-3);
    lora_model_free(m);
    m = load_model(ctx, v);
    CHECK_STATUS(lora_model_attach(m, n1, mult[0], LORA_APPLY_RUNTIME), LORA_OK);
    CHECK_STATUS(lora_model_cast(m, LORA_DTYPE_BF16), LORA_OK);
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    int64_t dt = 0;
    CHECK_STATUS(lora_model_get_int(m, LORA_MODEL_DTYPE, &dt), LORA_OK);
    const struct lora_tensor *q0 = &m->sd.te.t[tmap_find(&m->sd.te, "text_model.encoder.layers.0.self_attn.q_proj.weight")];
    CHECK(dt == LORA_DTYPE_BF16 && q0->dtype == LORA_DTYPE_BF16);
    /* each weight n1 touched is bf16(bf16(W + d) - d): within half a bf16 step of |W + d| plus
     * one of |W| from W, half a step being 2^-8 relative (the tiny models amplify bf16
     * rounding too much to compare outputs) */
    {
        struct net_target *tg = NULL;
        int64_t nt = 0, nbad = 0, nchk = 0;
        CHECK_STATUS(net_targets(&m->sd, 1, &tg, &nt), LORA_OK);
        for (int64_t i = 0; i < nt; i++) {
            int64_t q = net_find(n1, tg[i].name);
            if (q < 0) continue;
            const struct net_module *mm = &n1->m[q];
            const struct tensor_map *map = tg[i].is_te ? &m->sd.te : &m->sd.unet;
            const struct lora_tensor *w = &map->t[tmap_find(map, tg[i].weight)];
            int64_t si = -1;
            for (int64_t k = 0; k < orig.n && si < 0; k++)
                if (strcmp(orig.names[k], tg[i].weight) == 0 && (k < m->sd.te.n) == (tg[i].is_te != 0)) si = k;
            struct lora_tensor o = {0};
            o.dtype = orig.dt[si];
            o.data = orig.data[si];
            int64_t kk = mm->in * mm->kh * mm->kw;
            nbad += w->dtype != LORA_DTYPE_BF16;
            for (int64_t r = 0; r < mm->out; r++)
                for (int64_t c = 0; c < kk; c++) {
                    double d = 0;
                    for (int64_t z = 0; z < mm->rank; z++) d += (double)mm->up[r * mm->rank + z] * mm->down[z * kk + c];
                    d *= mult[0] * mm->alpha / (double)mm->rank;
                    double W = tf(&o, r * kk + c), got = tf(w, r * kk + c);
                    nbad += fabs(got - W) > 1.01 * (fabs(W + d) + fabs(W)) / 256.0 + 1e-30;
                    nchk++;
                }
        }
        lora_free(ctx, tg);
        CHECK_MSG(nbad == 0 && nchk > 0, "%lld of %lld elements off after attach + cast + detach", (long long)nbad,
                  (long long)nchk);
    }

    snap_free(&s1);
    snap_free(&orig);
    lora_network_free(n1);
    lora_network_free(n2);
    lora_model_free(m);
}

static void test_mismatch(lora_ctx *ctx) {
    /* a v1 text-encoder network on the v2 model (3 layers of width 32 vs 2 of 48): every
     * module is unknown or mismatched */
    lora_model *m1 = load_model(ctx, 1), *m2 = load_model(ctx, 2);
    if (!m1 || !m2) return;
    lora_network *n = make_net(m1, 1, 1.0, 0, 9);
    int64_t keep = 0;
    for (int64_t k = 0; k < n->n; k++) {   /* drop the U-Net modules (same widths in both) */
        if (n->m[k].is_te) { struct net_module t = n->m[keep]; n->m[keep++] = n->m[k]; n->m[k] = t; }
    }
    for (int64_t k = keep; k < n->n; k++) {
        lora_free(ctx, n->m[k].name); lora_free(ctx, n->m[k].down); lora_free(ctx, n->m[k].up);
    }
    n->n = keep;
    int64_t mt = -1, un = -1, mm = -1;
    CHECK_STATUS(lora_network_coverage(n, m2, &mt, &un, &mm), LORA_E_NO_MATCHING_KEYS);
    CHECK_MSG(keep == 18 && un == 6 && mm == 12, "%lld modules: %lld unused, %lld mismatched", (long long)keep,
              (long long)un, (long long)mm);
    struct snap s;
    snap_take(m2, &s);
    CHECK_STATUS(lora_model_attach(m2, n, 1.0, LORA_APPLY_RUNTIME), LORA_E_NO_MATCHING_KEYS);
    CHECK_MSG(strstr(lora_errmsg(ctx), "none of the") != NULL, "%s", lora_errmsg(ctx));
    CHECK_STATUS(lora_model_attach(m2, n, 1.0, LORA_APPLY_MERGE), LORA_E_NO_MATCHING_KEYS);
    CHECK(snap_diff(m2, &s) == 0 && lora_model_attached_count(m2) == 0);
    snap_free(&s);
    /* another context */
    lora_ctx *c2 = NULL;
    lora_ctx_create(LORA_ABI_VERSION, &c2);
    lora_model *o = load_model(c2, 1);
    CHECK_STATUS(lora_model_attach(o, n, 1.0, LORA_APPLY_RUNTIME), LORA_E_INVALID_ARG);
    lora_model_free(o);
    lora_ctx_free(c2);
    lora_network_free(n);
    lora_model_free(m1);
    lora_model_free(m2);
}

/* Freeing in any order; no leaks. */
static void test_lifetime(lora_ctx *ctx) {
    uint64_t before = 0, after = 0;
    lora_ctx_memory(ctx, &before, NULL, NULL, NULL);
    lora_model *m = load_model(ctx, 1), *m2 = load_model(ctx, 1);
    lora_network *n = make_net(m, 2, 2.0, 1, 3);
    struct outs o1, o2;
    CHECK_STATUS(lora_model_attach(m, n, 1.0, LORA_APPLY_RUNTIME), LORA_OK);
    CHECK_STATUS(lora_model_attach(m2, n, 1.0, LORA_APPLY_RUNTIME), LORA_OK);
    run(m, &o1);
    lora_network_free(n);   /* still attached to two models: lives on */
    CHECK_STATUS(lora_network_save(n, "/tmp/x.safetensors", NULL), LORA_E_INVALID_ARG);   /* handle is gone */
    CHECK_STATUS(lora_model_set_multiplier(m, n, 0.5), LORA_E_INVALID_ARG);
    run(m2, &o2);
    CHECK(memcmp(o1.u, o2.u, sizeof o1.u) == 0);
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    lora_model_free(m2);    /* the last holder: frees the network */
    lora_model_free(m);
    lora_ctx_memory(ctx, &after, NULL, NULL, NULL);
    CHECK_MSG(after == before, "leaked %lld bytes", (long long)(after - before));
    /* model freed while attached, network freed after */
    m = load_model(ctx, 2);
    n = make_net(m, 1, 1.0, 0, 4);
    CHECK_STATUS(lora_model_attach(m, n, -1.0, LORA_APPLY_RUNTIME), LORA_OK);
    lora_model_free(m);
    CHECK(n->attached == 0);
    lora_network_free(n);
    lora_ctx_memory(ctx, &after, NULL, NULL, NULL);
    CHECK_MSG(after == before, "leaked %lld bytes", (long long)(after - before));
}

/* v2 from its LDM file: a network on q only still saves (the packed in_proj needs q, k and v in
 * one dtype) and the saved file holds the attached weights. */
static void test_v2_packed_save(lora_ctx *ctx) {
    char p[512], out[256];
    snprintf(p, sizeof p, "%s/sd/v2_ldm.safetensors", data_dir);
    snprintf(out, sizeof out, "/tmp/lora_test_attach_%d.safetensors", (int)getpid());
    lora_model *m = NULL, *r = NULL;
    CHECK_STATUS(lora_model_load(ctx, p, NULL, &m), LORA_OK);
    if (!m) return;
    lora_network *n = make_net(m, 2, 1.0, 0, 8);
    const char *keep = "lora_te_text_model_encoder_layers_1_self_attn_q_proj";
    int64_t q = net_find(n, keep);
    CHECK(q >= 0);
    if (q < 0) return;
    struct net_module t = n->m[0];
    n->m[0] = n->m[q];
    n->m[q] = t;
    for (int64_t k = 1; k < n->n; k++) {
        lora_free(ctx, n->m[k].name); lora_free(ctx, n->m[k].down); lora_free(ctx, n->m[k].up);
    }
    n->n = 1;
    const char *kn = "text_model.encoder.layers.1.self_attn.k_proj.weight";
    lora_dtype k_dt = m->sd.te.t[tmap_find(&m->sd.te, kn)].dtype;
    const void *k_data = m->sd.te.t[tmap_find(&m->sd.te, kn)].data;
    CHECK_STATUS(lora_model_attach(m, n, 0.75, LORA_APPLY_RUNTIME), LORA_OK);
    /* q gets a low-rank branch: the map is untouched; the save merges (siblings in float32) */
    CHECK(m->sd.te.t[tmap_find(&m->sd.te, kn)].dtype == k_dt && m->sd.te.t[tmap_find(&m->sd.te, kn)].data == k_data);
    CHECK_STATUS(lora_model_save(m, out, NULL), LORA_OK);
    CHECK_STATUS(lora_model_load(ctx, out, NULL, &r), LORA_OK);
    const struct net_module *mq = &n->m[0];
    for (int c = 0; r && c < 3; c++) {
        char w[128];
        snprintf(w, sizeof w, "text_model.encoder.layers.1.self_attn.%c_proj.weight", "qkv"[c]);
        const struct lora_tensor *a = &m->sd.te.t[tmap_find(&m->sd.te, w)], *b = &r->sd.te.t[tmap_find(&r->sd.te, w)];
        CHECK_MSG(b->dtype == LORA_DTYPE_F32 && b->nbytes == 2 * a->nbytes, "%s: not float32 after save + load", w);
        if (b->dtype != LORA_DTYPE_F32) continue;
        /* the saved weight is W + 0.75 * alpha/r * up @ down (computed here in double); k and v: W */
        double worst = 0;
        int64_t kk = mq->in;
        for (int64_t row = 0; row < mq->out; row++)
            for (int64_t col = 0; col < kk; col++) {
                double want = tf(a, row * kk + col);
                if (c == 0) {
                    double acc = 0;
                    for (int64_t z = 0; z < mq->rank; z++) acc += (double)mq->up[row * mq->rank + z] * mq->down[z * kk + col];
                    want += 0.75 * mq->alpha / (double)mq->rank * acc;
                }
                double e = fabs(tf(b, row * kk + col) - want) / (1.0 + fabs(want));
                if (e > worst) worst = e;
            }
        CHECK_MSG(c == 0 ? worst < 2e-6 : worst == 0, "%s after save + load: worst %.3e", w, worst);
    }
    lora_model_free(r);
    unlink(out);
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    const struct lora_tensor *k = &m->sd.te.t[tmap_find(&m->sd.te, kn)];
    CHECK(k->dtype == k_dt && k->data == k_data);   /* siblings given back */
    lora_network_free(n);
    lora_model_free(m);
}

/* kohya LoRAs trained on SD2 .ckpt files hold 4-D [r, C, 1, 1] proj_in/proj_out factors, while
 * the diffusers v2 model has Linear projections: saved 4-D, loaded back, they attach and give
 * the weights of the 2-D network. */
static void test_proj_4d_on_linear(lora_ctx *ctx) {
    lora_model *m = load_model(ctx, 2);
    if (!m) return;
    lora_network *n = make_net(m, 2, 1.0, 0, 12), *n4 = NULL;
    int64_t np = 0;
    for (int64_t k = 0; k < n->n; k++)
        if (strstr(n->m[k].name, "_proj_in") || strstr(n->m[k].name, "_proj_out")) {
            CHECK(n->m[k].kind == NET_LINEAR);
            n->m[k].down_ndim = n->m[k].up_ndim = 4;
            np++;
        }
    char out[256];
    snprintf(out, sizeof out, "/tmp/lora_test_attach4d_%d.safetensors", (int)getpid());
    CHECK_STATUS(lora_network_save(n, out, NULL), LORA_OK);
    CHECK_STATUS(lora_network_load(ctx, out, &n4), LORA_OK);
    unlink(out);
    int64_t n4d = 0;
    for (int64_t k = 0; n4 && k < n4->n; k++) n4d += n4->m[k].kind == NET_CONV1X1 && n4->m[k].down_ndim == 4;
    CHECK(np > 0 && n4d == np);
    struct snap a;
    CHECK_STATUS(lora_model_attach(m, n, 1.0, LORA_APPLY_RUNTIME), LORA_OK);
    snap_take(m, &a);
    CHECK_STATUS(lora_model_detach(m, n), LORA_OK);
    int64_t mt = 0;
    CHECK_STATUS(lora_network_coverage(n4, m, &mt, NULL, NULL), LORA_OK);
    CHECK(n4 && mt == n4->n);
    CHECK_STATUS(lora_model_attach(m, n4, 1.0, LORA_APPLY_RUNTIME), LORA_OK);
    CHECK(snap_diff(m, &a) == 0);
    snap_free(&a);
    lora_network_free(n4);
    lora_network_free(n);
    lora_model_free(m);
}

/* ---- kohya names -> LDM (CompVis) names, spec §2.7 ----------------------------------------- */

static const char *resnet_ldm(const char *rest) {
    if (strcmp(rest, "conv1") == 0) return "in_layers.2";
    if (strcmp(rest, "conv2") == 0) return "out_layers.3";
    if (strcmp(rest, "time_emb_proj") == 0) return "emb_layers.1";
    if (strcmp(rest, "conv_shortcut") == 0) return "skip_connection";
    return NULL;
}

/* Underscored inner path of a Transformer2DModel child -> dotted ("transformer_blocks_0_attn1_to_q"
 * -> "transformer_blocks.0.attn1.to_q"), as a consumer's lookup by module name resolves it. */
static int transformer_rest(const char *u, char *out, size_t cap) {
    static const char *const leaf[] = {"attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q",
                                       "attn2_to_k", "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"};
    static const char *const dot[] = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                      "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"};
    if (strcmp(u, "proj_in") == 0 || strcmp(u, "proj_out") == 0) return snprintf(out, cap, "%s", u) > 0;
    int b = 0, n = 0;
    if (sscanf(u, "transformer_blocks_%d_%n", &b, &n) != 1 || n == 0) return 0;
    for (size_t i = 0; i < sizeof leaf / sizeof *leaf; i++)
        if (strcmp(u + n, leaf[i]) == 0) return snprintf(out, cap, "transformer_blocks.%d.%s", b, dot[i]) > 0;
    return 0;
}

/* kohya name -> LDM weight key; 0 when no rule applies. qkv: 1..3 for v2 q/k/v (a row block of
 * in_proj_weight). */
static int to_ldm(const char *name, int v, char *out, size_t cap, int *qkv) {
    int i = 0, j = 0, n = 0;
    char rest[256];
    *qkv = 0;
    if (sscanf(name, "lora_unet_down_blocks_%d_attentions_%d_%n", &i, &j, &n) == 2 && n) {
        if (!transformer_rest(name + n, rest, sizeof rest)) return 0;
        return snprintf(out, cap, "model.diffusion_model.input_blocks.%d.1.%s.weight", 1 + 3 * i + j, rest) > 0;
    }
    n = 0;
    if (sscanf(name, "lora_unet_mid_block_attentions_0_%n", &n) == 0 && n) {
        if (!transformer_rest(name + n, rest, sizeof rest)) return 0;
        return snprintf(out, cap, "model.diffusion_model.middle_block.1.%s.weight", rest) > 0;
    }
    n = 0;
    if (sscanf(name, "lora_unet_up_blocks_%d_attentions_%d_%n", &i, &j, &n) == 2 && n) {
        if (!transformer_rest(name + n, rest, sizeof rest)) return 0;
        return snprintf(out, cap, "model.diffusion_model.output_blocks.%d.1.%s.weight", 3 * i + j, rest) > 0;
    }
    n = 0;
    if (sscanf(name, "lora_unet_down_blocks_%d_resnets_%d_%n", &i, &j, &n) == 2 && n && resnet_ldm(name + n))
        return snprintf(out, cap, "model.diffusion_model.input_blocks.%d.0.%s.weight", 1 + 3 * i + j,
                        resnet_ldm(name + n)) > 0;
    n = 0;
    if (sscanf(name, "lora_unet_mid_block_resnets_%d_%n", &j, &n) == 1 && n && resnet_ldm(name + n))
        return snprintf(out, cap, "model.diffusion_model.middle_block.%d.%s.weight", 2 * j, resnet_ldm(name + n)) > 0;
    n = 0;
    if (sscanf(name, "lora_unet_up_blocks_%d_resnets_%d_%n", &i, &j, &n) == 2 && n && resnet_ldm(name + n))
        return snprintf(out, cap, "model.diffusion_model.output_blocks.%d.0.%s.weight", 3 * i + j,
                        resnet_ldm(name + n)) > 0;
    n = 0;
    if (sscanf(name, "lora_unet_down_blocks_%d_downsamplers_0_conv%n", &i, &n) == 1 && n && !name[n])
        return snprintf(out, cap, "model.diffusion_model.input_blocks.%d.0.op.weight", 3 + 3 * i) > 0;
    n = 0;
    if (sscanf(name, "lora_unet_up_blocks_%d_upsamplers_0_conv%n", &i, &n) == 1 && n && !name[n])
        return snprintf(out, cap, "model.diffusion_model.output_blocks.%d.%d.conv.weight", 2 + 3 * i,
                        i == 0 ? 1 : 2) > 0;
    n = 0;
    if (sscanf(name, "lora_te_text_model_encoder_layers_%d_%n", &i, &n) == 1 && n) {
        const char *r = name + n;
        static const char *const u1[] = {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                         "self_attn_out_proj", "mlp_fc1", "mlp_fc2"};
        static const char *const d1[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
        static const char *const d2[] = {"attn.in_proj", "attn.in_proj", "attn.in_proj", "attn.out_proj",
                                         "mlp.c_fc", "mlp.c_proj"};
        for (int k = 0; k < 6; k++) {
            if (strcmp(r, u1[k]) != 0) continue;
            if (v == 1)
                return snprintf(out, cap, "cond_stage_model.transformer.text_model.encoder.layers.%d.%s.weight", i,
                                d1[k]) > 0;
            if (k < 3) *qkv = k + 1;
            return snprintf(out, cap, "cond_stage_model.model.transformer.resblocks.%d.%s%s", i, d2[k],
                            k < 3 ? "_weight" : ".weight") > 0;
        }
    }
    return 0;
}

static void test_ldm_names(lora_ctx *ctx, int v) {
    lora_model *m = load_model(ctx, v);
    if (!m) return;
    lora_network *net = make_net(m, 1, 1.0, 1, 2);
    char p[512];
    snprintf(p, sizeof p, "%s/sd/v%d_ldm.safetensors", data_dir, v);
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, p, &f), LORA_OK);
    int64_t found = 0, kinds[4] = {0};
    for (int64_t k = 0; f && net && k < net->n; k++) {
        const struct net_module *mm = &net->m[k];
        char key[512];
        int qkv = 0;
        int ok = to_ldm(mm->name, v, key, sizeof key, &qkv);
        CHECK_MSG(ok, "%s: no LDM rule", mm->name);
        if (!ok) continue;
        int64_t i = lora_file_find(f, key);
        CHECK_MSG(i >= 0, "%s -> %s: not in %s", mm->name, key, p);
        if (i < 0) continue;
        int32_t nd = 0;
        int64_t sh[8] = {0};
        lora_file_tensor_info(f, i, NULL, NULL, NULL, &nd, sh, 8, NULL);
        /* the LDM weight takes the module's delta: [out(*3 for in_proj), in(, kh, kw)] */
        int64_t out = qkv ? 3 * mm->out : mm->out;
        int fits = sh[0] == out && sh[1] == mm->in &&
                   (nd == 2 ? mm->kh * mm->kw == 1 : (nd == 4 && sh[2] == mm->kh && sh[3] == mm->kw));
        CHECK_MSG(fits, "%s -> %s: shape [%lld, %lld, ...] (%d-D) does not take [%lld, %lld, %lld, %lld]", mm->name,
                  key, (long long)sh[0], (long long)sh[1], nd, (long long)mm->out, (long long)mm->in,
                  (long long)mm->kh, (long long)mm->kw);
        found += fits;
        kinds[mm->kind]++;
    }
    printf("v%d: %lld of %lld module names name an LDM weight (%lld Linear, %lld 1x1, %lld 3x3)\n", v,
           (long long)found, (long long)(net ? net->n : 0), (long long)kinds[NET_LINEAR],
           (long long)kinds[NET_CONV1X1], (long long)kinds[NET_CONVKXK]);
    CHECK(net && found == net->n && kinds[NET_CONVKXK] > 0);
    lora_file_free(f);
    lora_network_free(net);
    lora_model_free(m);
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) {
        fprintf(stderr, "LORA_TEST_DATA not set\n");
        return 1;
    }
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    lora_ctx_set_threads(ctx, 1);
    test_attach_version(ctx, 1);
    test_attach_version(ctx, 2);
    test_mismatch(ctx);
    test_lifetime(ctx);
    test_v2_packed_save(ctx);
    test_proj_4d_on_linear(ctx);
    test_ldm_names(ctx, 1);
    test_ldm_names(ctx, 2);
    lora_ctx_free(ctx);
    return test_finish("test_attach");
}
