/* Runtime-attached LoRA networks as low-rank branches (lib/network/attach.c), on the tiny SD v1
 * model (tests/data/sd/v1_diffusers, float16 weights):
 *  - two networks attached at run time with multipliers 0.7 and -0.3: the U-Net prediction
 *    (lora_model_unet_predict) and the text encodings (lora_model_encode_prompt and the
 *    generation prompt encoder gen_prompt_encode_pair) equal, within 1e-5 relative L2, those of
 *    an independent path: a float32 copy of the model with both networks merged by net_merge;
 *  - lora_model_set_multiplier (no re-attach): the outputs move, and equal a float32 merge at the
 *    new multipliers, within 1e-5;
 *  - networks without conv modules leave every tensor of the model untouched (the U-Net keeps
 *    borrowing the 16-bit weights: the memory of the float32 copies is gone);
 *  - a save holds the merged weights: the saved (diffusers) model's U-Net output equals the
 *    runtime one within 1e-5 (relative L2), its attention weights in float32;
 *  - detach_all gives the original outputs back, bit for bit. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lora/lora.h"
#include "internal.h"
#include "gen/prompt.h"
#include "network/network.h"
#include "../test.h"
#include "../ref_file.h"
#include "../tiny_vocab.h"

static const char *data_dir;

static void remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *e;
    char p[4096];
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", path, e->d_name);
        remove_tree(p);
    }
    closedir(d);
    rmdir(path);
}

static lora_model *load_model(lora_ctx *ctx, const char *path) {
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &m), LORA_OK);
    if (m) tiny_widen_vocab(ctx, m);
    return m;
}

/* A network with every lora_up set by a formula (kohya's init makes up zero: a no-op). */
static lora_network *make_net(lora_model *model, int dim, double alpha, int seed) {
    lora_params *p = NULL;
    lora_params_create(model->ctx, &p);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, dim);
    lora_params_set_float(p, LORA_P_NETWORK_ALPHA, alpha);
    lora_params_set_int(p, LORA_P_SEED, seed);
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_create(model, p, &net), LORA_OK);
    lora_params_free(p);
    for (int64_t k = 0; net && k < net->n; k++)
        for (int64_t i = 0; i < net->m[k].out * net->m[k].rank; i++)
            net->m[k].up[i] = (float)(((i * 7 + k * 5 + seed) % 23) - 11) / 20.0f;
    return net;
}

static float *fill(int64_t n, int seed) {
    float *v = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) v[i] = (float)sin(0.29 * (double)i + seed) * 0.9f;
    return v;
}

#define NU 256   /* 1 x 4 x 8 x 8 latent */
struct outs {
    float u[NU];
    float *te;        /* lora_model_encode_prompt */
    float *cond;      /* gen_prompt_encode_pair (lora_free) */
    int64_t nte, ncond;
};

static const char *prompt = "a photo of a cat, masterpiece";

static void run(lora_model *m, struct outs *o) {
    int64_t X = 0;
    lora_model_get_int(m, LORA_MODEL_CONTEXT_DIM, &X);
    float *lat = fill(NU, 1), *c = fill(77 * X, 2), t = 411.0f;
    lora_status st = lora_model_unet_predict(m, lat, 1, 8, 8, &t, c, 77, o->u, NU);
    CHECK_MSG(st == LORA_OK, "unet_predict: %s", lora_errmsg(m->ctx));
    free(lat);
    free(c);
    int64_t T = 0, C = 0;
    CHECK_STATUS(lora_model_encode_prompt(m, prompt, NULL, NULL, 0, &T, &C), LORA_OK);
    o->nte = T * C;
    o->te = calloc((size_t)o->nte, 4);
    CHECK_STATUS(lora_model_encode_prompt(m, prompt, NULL, o->te, (uint64_t)o->nte, NULL, NULL), LORA_OK);
    int64_t Tc = 0;
    o->cond = NULL;
    CHECK_STATUS(gen_prompt_encode_pair(m, prompt, NULL, 1, 1, &o->cond, NULL, &Tc), LORA_OK);
    o->ncond = Tc * m->sd.cfg.te_hidden;
}

static void outs_free(lora_model *m, struct outs *o) {
    free(o->te);
    lora_free(m->ctx, o->cond);
    o->te = NULL;
    o->cond = NULL;
}

static int close_to(const char *what, const float *a, const float *b, int64_t n, double tol) {
    double r = rel_l2(a, b, n);
    printf("  %-52s rel L2 %.2e\n", what, r);
    CHECK_MSG(r <= tol, "%s: %.3e > %.1e", what, r, tol);
    return r <= tol;
}

/* The independent path: a float32 copy of the model with the networks merged by net_merge. */
static lora_model *merged_model(lora_ctx *ctx, const char *path, lora_network **nets, const double *mult, int n) {
    lora_model *f = load_model(ctx, path);
    if (!f) return NULL;
    CHECK_STATUS(lora_model_cast(f, LORA_DTYPE_F32), LORA_OK);
    for (int i = 0; i < n; i++) CHECK_STATUS(net_merge(nets[i], &f->sd, mult[i]), LORA_OK);
    model_drop_runs(f);
    return f;
}

static void compare_all(const char *tag, const struct outs *a, const struct outs *b) {
    char w[128];
    snprintf(w, sizeof w, "%s: U-Net prediction", tag);
    close_to(w, a->u, b->u, NU, 1e-5);
    CHECK(a->nte == b->nte && a->ncond == b->ncond);
    if (a->nte != b->nte || a->ncond != b->ncond) return;
    snprintf(w, sizeof w, "%s: lora_model_encode_prompt", tag);
    close_to(w, a->te, b->te, a->nte, 1e-5);
    snprintf(w, sizeof w, "%s: generation prompt encoder", tag);
    close_to(w, a->cond, b->cond, a->ncond, 1e-5);
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
    char path[512];
    snprintf(path, sizeof path, "%s/sd/v1_diffusers", data_dir);
    lora_model *m = load_model(ctx, path);
    if (!m) {
        lora_ctx_free(ctx);
        return test_finish("test_attach_lowrank");
    }

    struct outs base, att, ref;
    memset(&base, 0, sizeof base);
    run(m, &base);
    lora_network *n1 = make_net(m, 4, 2.0, 3), *n2 = make_net(m, 2, 1.0, 9);
    lora_network *nets[2] = {n1, n2};
    double mult[2] = {0.7, -0.3};

    /* networks without conv modules: no tensor of the model changes */
    int64_t before = m->sd.unet.n + m->sd.te.n;
    const void *q0 = m->sd.unet.t[tmap_find(&m->sd.unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")].data;
    CHECK_STATUS(lora_model_attach(m, n1, mult[0], LORA_APPLY_RUNTIME), LORA_OK);
    CHECK_STATUS(lora_model_attach(m, n2, mult[1], LORA_APPLY_RUNTIME), LORA_OK);
    int64_t f32 = 0;
    for (int64_t i = 0; i < m->sd.unet.n; i++) f32 += m->sd.unet.t[i].dtype == LORA_DTYPE_F32;
    for (int64_t i = 0; i < m->sd.te.n; i++)
        f32 += m->sd.te.t[i].dtype == LORA_DTYPE_F32 && strstr(m->sd.te.t[i].name, "token_embedding") == NULL;
    CHECK_MSG(f32 == 0, "%lld float32 tensors after attaching", (long long)f32);
    CHECK(m->attach && m->attach->n_w == 0 && m->attach->n_lr > 0);
    CHECK(m->sd.unet.n + m->sd.te.n == before);
    CHECK(m->sd.unet.t[tmap_find(&m->sd.unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")].data == q0);
    /* one branch per layer of rank 4 + 2 */
    int64_t r6 = 0;
    for (int64_t i = 0; m->attach && i < m->attach->n_lr; i++) r6 += m->attach->lr[i].l.rank == 6;
    CHECK(m->attach && r6 == m->attach->n_lr && m->attach->max_rank == 6);
    printf("  %lld low-rank branches, %lld replaced weights\n", m->attach ? (long long)m->attach->n_lr : -1LL,
           m->attach ? (long long)m->attach->n_w : -1LL);

    run(m, &att);
    lora_model *f = merged_model(ctx, path, nets, mult, 2);
    if (f) {
        run(f, &ref);
        compare_all("m = (0.7, -0.3) runtime vs float32 merge", &att, &ref);
        outs_free(f, &ref);
        lora_model_free(f);
    }
    double moved = rel_l2(att.u, base.u, NU), moved_te = rel_l2(att.te, base.te, att.nte);
    printf("  the networks move the U-Net output by %.2e, the encoding by %.2e\n", moved, moved_te);
    CHECK(moved > 1e-2 && moved_te > 1e-2);

    /* new multipliers, no re-attach */
    double mult2[2] = {-0.45, 1.1};
    CHECK_STATUS(lora_model_set_multiplier(m, n1, mult2[0]), LORA_OK);
    CHECK_STATUS(lora_model_set_multiplier(m, n2, mult2[1]), LORA_OK);
    CHECK(lora_model_attached_count(m) == 2);
    struct outs att2;
    run(m, &att2);
    CHECK(rel_l2(att2.u, att.u, NU) > 1e-2 && rel_l2(att2.te, att.te, att.nte) > 1e-2);
    f = merged_model(ctx, path, nets, mult2, 2);
    if (f) {
        run(f, &ref);
        compare_all("after set_multiplier (-0.45, 1.1) vs float32 merge", &att2, &ref);
        outs_free(f, &ref);
        lora_model_free(f);
    }
    /* back to the first multipliers: the first outputs (branches are rebuilt, not updated) */
    CHECK_STATUS(lora_model_set_multiplier(m, n1, mult[0]), LORA_OK);
    CHECK_STATUS(lora_model_set_multiplier(m, n2, mult[1]), LORA_OK);
    struct outs att3;
    run(m, &att3);
    CHECK(memcmp(att3.u, att.u, sizeof att.u) == 0 && memcmp(att3.te, att.te, (size_t)att.nte * 4) == 0);
    outs_free(m, &att3);

    /* a save holds the merge */
    char out[256];
    snprintf(out, sizeof out, "/tmp/lora_test_attach_lowrank_%d", (int)getpid());
    lora_params *so = NULL;
    lora_params_create(ctx, &so);
    lora_params_set_string(so, LORA_P_SAVE_MODEL_AS, "diffusers_safetensors");
    CHECK_STATUS(lora_model_save(m, out, so), LORA_OK);
    lora_params_free(so);
    lora_model *s = load_model(ctx, out);
    remove_tree(out);
    if (s) {
        const struct lora_tensor *q = &s->sd.unet.t[tmap_find(&s->sd.unet,
                                                              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")];
        CHECK(q->dtype == LORA_DTYPE_F32);
        CHECK_STATUS(lora_model_detach_all(m), LORA_OK);   /* (its tensors are borrowed by nothing) */
        struct outs sv;
        run(s, &sv);
        close_to("saved model vs runtime: U-Net prediction", sv.u, att.u, NU, 1e-5);
        outs_free(s, &sv);
        lora_model_free(s);
    }

    /* detached: the original outputs, bit for bit */
    CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
    CHECK(m->attach == NULL || (m->attach->n_lr == 0 && m->attach->max_rank == 0));
    struct outs d;
    run(m, &d);
    CHECK(memcmp(d.u, base.u, sizeof d.u) == 0 && memcmp(d.te, base.te, (size_t)base.nte * 4) == 0);
    outs_free(m, &d);

    outs_free(m, &att);
    outs_free(m, &att2);
    outs_free(m, &base);
    lora_network_free(n1);
    lora_network_free(n2);
    lora_model_free(m);
    lora_ctx_free(ctx);
    return test_finish("test_attach_lowrank");
}
