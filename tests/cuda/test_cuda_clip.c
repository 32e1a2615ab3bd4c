/* The CLIP text encoder on the CUDA backend against the same encoder on the CPU backend, on
 * the tiny SD v1/v2 models (tests/data/sd/vN_diffusers) with the LoRA adapters of
 * tests/data/sd/vN_clip_lora_reference.safetensors: every hidden state, last_hidden_state,
 * pooled, clip_skip 2, the LoRA forward, the LoRA gradients (clip_skip 1 and 2) and
 * d hidden_states[0], the 225-token chunks, and the bad-id error. The GPU outputs are also
 * held to the transformers 4.25.1 reference (relative L2 1e-5, the acceptance bound).
 * Exits 77 (skipped) when no GPU is usable. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/clip.h"
#include "model/sd_model.h"
#include "../test.h"
#include "../ref_file.h"

#define OUT_TOL 1e-5    /* rel L2, GPU vs CPU and GPU vs transformers */
#define GRAD_TOL 1e-4   /* rel L2 of gradients, GPU vs CPU */

static struct lora_backend_impl *gpu;
static double worst_out, worst_grad;





/* Downloads n floats of the GPU buffer d and compares them with the CPU's `want`. */
static void same(int ver, const char *what, const float *d, const float *want, int64_t n, double tol,
                 double *worst) {
    float *h = malloc((size_t)n * 4);
    CHECK_STATUS(gpu->iface->download(gpu, h, d, (size_t)n * 4), LORA_OK);
    double r = rel_l2(h, want, n);
    if (r > *worst) *worst = r;
    CHECK_MSG(r <= tol, "v%d %s: gpu vs cpu rel L2 %.3e > %.1e", ver, what, r, tol);
    free(h);
}

static float *upload(const float *h, int64_t n) {
    void *d = NULL;
    CHECK_STATUS(gpu->iface->buf_alloc(gpu, (size_t)n * 4, &d), LORA_OK);
    if (d) CHECK_STATUS(gpu->iface->upload(gpu, d, h, (size_t)n * 4), LORA_OK);
    return d;
}

/* The reference adapters twice: host buffers for the CPU encoder, device copies for the GPU. */
struct adapters {
    int64_t count, grad_floats;
    struct nn_lora *lc, *lg;
    const struct nn_lora **pc, **pg;
    float *grads;                   /* CPU gradients, one block */
    float *dev_w, *dev_grads;       /* GPU weights and gradients, one block each */
};

static int adapters_load(struct adapters *a, const struct lora_file *f, const struct clip_model *m, int64_t *rank) {
    memset(a, 0, sizeof *a);
    a->count = m->layers * CLIP_N_SLOTS;
    a->lc = calloc((size_t)a->count, sizeof *a->lc);
    a->lg = calloc((size_t)a->count, sizeof *a->lg);
    a->pc = calloc((size_t)a->count, sizeof *a->pc);
    a->pg = calloc((size_t)a->count, sizeof *a->pg);
    const float *alpha = ref_f32(f, "lora.alpha", NULL), *mult = ref_f32(f, "lora.multiplier", NULL);
    if (!alpha || !mult) return 0;
    int64_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t l = 0; l < m->layers; l++)
            for (int k = 0; k < CLIP_N_SLOTS; k++) {
                char name[200];
                int64_t nd = 0, nu = 0;
                snprintf(name, sizeof name, "lora.layers.%lld.%s.down", (long long)l, clip_slot_name(k));
                const float *dn = ref_f32(f, name, &nd);
                snprintf(name, sizeof name, "lora.layers.%lld.%s.up", (long long)l, clip_slot_name(k));
                const float *upw = ref_f32(f, name, &nu);
                if (!dn || !upw) return 0;
                int64_t i = l * CLIP_N_SLOTS + k;
                struct nn_lora *c = &a->lc[i], *g = &a->lg[i];
                c->in = k == CLIP_FC2 ? m->inter : m->hidden;
                c->out = k == CLIP_FC1 ? m->inter : m->hidden;
                c->rank = nd / c->in;
                *rank = c->rank;
                c->scale = nn_lora_scale(*alpha, c->rank, *mult);
                c->down = dn;
                c->up = upw;
                if (pass) {
                    c->d_down = a->grads + total;
                    c->d_up = a->grads + total + nd;
                    *g = *c;
                    g->down = a->dev_w + total;
                    g->up = a->dev_w + total + nd;
                    g->d_down = a->dev_grads + total;
                    g->d_up = a->dev_grads + total + nd;
                    CHECK_STATUS(gpu->iface->upload(gpu, a->dev_w + total, dn, (size_t)nd * 4), LORA_OK);
                    CHECK_STATUS(gpu->iface->upload(gpu, a->dev_w + total + nd, upw, (size_t)nu * 4), LORA_OK);
                }
                total += nd + nu;
                a->pc[i] = c;
                a->pg[i] = g;
            }
        if (!pass) {
            a->grads = calloc((size_t)total, sizeof(float));
            a->grad_floats = total;
            void *w = NULL, *gr = NULL;
            if (gpu->iface->buf_alloc(gpu, (size_t)total * 4, &w) != LORA_OK ||
                gpu->iface->buf_alloc(gpu, (size_t)total * 4, &gr) != LORA_OK)
                return 0;
            a->dev_w = w;
            a->dev_grads = gr;
            total = 0;
        }
    }
    return 1;
}

static void adapters_zero(struct adapters *a) {
    memset(a->grads, 0, (size_t)a->grad_floats * 4);
    CHECK_STATUS(gpu->iface->fill_f32(gpu, a->grad_floats, 0.0f, a->dev_grads), LORA_OK);
}

static void adapters_free(struct adapters *a) {
    if (a->dev_w) gpu->iface->buf_free(gpu, a->dev_w);
    if (a->dev_grads) gpu->iface->buf_free(gpu, a->dev_grads);
    free(a->lc); free(a->lg); free(a->pc); free(a->pg); free(a->grads);
}

static void test_version(lora_ctx *ctx, int ver, const char *dir) {
    char path[1024];
    snprintf(path, sizeof path, "%s/sd/v%d_diffusers", dir, ver);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, path, NULL, &model), LORA_OK);
    if (!model) return;
    struct clip_model mc, mg;
    CHECK_STATUS(clip_init(&mc, ctx->backend, &model->sd.te, &model->sd.cfg), LORA_OK);
    CHECK_STATUS(clip_init(&mg, gpu, &model->sd.te, &model->sd.cfg), LORA_OK);
    snprintf(path, sizeof path, "%s/sd/v%d_clip_lora_reference.safetensors", dir, ver);
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    int64_t B = 0, T = 0, rank = 0;
    int32_t *ids = f ? ref_ids(f, "ids", &B, &T) : NULL;
    struct adapters ad;
    memset(&ad, 0, sizeof ad);
    if (!mc.weights || !mg.weights || !f || !ids || !adapters_load(&ad, f, &mc, &rank)) {
        CHECK_MSG(0, "v%d: setup failed: %s", ver, lora_errmsg(ctx));
        goto done;
    }
    {
        /* the weights themselves arrived intact */
        int64_t nw = mc.vocab * mc.hidden;
        same(ver, "token embedding upload", mg.tok_emb, mc.tok_emb, nw, 0, &worst_out);
        same(ver, "fc1 weight of the last layer", mg.layer[mc.layers - 1].w[CLIP_FC1],
             mc.layer[mc.layers - 1].w[CLIP_FC1], mc.inter * mc.hidden, 0, &worst_out);

        int64_t C = mc.hidden, n = B * T * C;
        struct clip_plan pc, pg, pgi;
        CHECK_STATUS(clip_plan_init(&pc, &mc, B, T, rank, 1), LORA_OK);
        CHECK_STATUS(clip_plan_init(&pg, &mg, B, T, rank, 1), LORA_OK);
        CHECK_STATUS(clip_plan_init(&pgi, &mg, B, T, rank, 0), LORA_OK);
        float *hout = malloc((size_t)n * 4), *hpool = malloc((size_t)(B * C) * 4);
        CHECK_STATUS(clip_download_output(&pgi, hout, hpool), LORA_E_INVALID_ARG);   /* no forward yet */

        /* no LoRA: every hidden state, the output, pooled; the transformers reference too */
        CHECK_STATUS(clip_forward(&pc, ids, NULL, 1), LORA_OK);
        CHECK_STATUS(clip_forward(&pg, ids, NULL, 1), LORA_OK);
        for (int64_t k = 0; k <= mc.layers; k++) {
            char what[64];
            snprintf(what, sizeof what, "hidden_states[%lld]", (long long)k);
            same(ver, what, pg.hidden + k * n, pc.hidden + k * n, n, OUT_TOL, &worst_out);
        }
        same(ver, "last_hidden_state", pg.out, pc.out, n, OUT_TOL, &worst_out);
        same(ver, "pooled", pg.pooled, pc.pooled, B * C, OUT_TOL, &worst_out);
        CHECK_STATUS(clip_download_output(&pg, hout, hpool), LORA_OK);
        const float *want = ref_f32(f, "last_hidden_state", NULL), *wantp = ref_f32(f, "pooled", NULL);
        double r_ref = want ? rel_l2(hout, want, n) : INFINITY, r_pool = wantp ? rel_l2(hpool, wantp, B * C) : INFINITY;
        CHECK_MSG(r_ref <= OUT_TOL && r_pool <= OUT_TOL, "v%d gpu vs transformers: last %.3e pooled %.3e", ver, r_ref,
                  r_pool);
        CHECK_STATUS(clip_forward(&pc, ids, NULL, 2), LORA_OK);
        CHECK_STATUS(clip_forward(&pg, ids, NULL, 2), LORA_OK);
        CHECK(pg.layers_run == mc.layers - 1);
        same(ver, "clip_skip2", pg.out, pc.out, n, OUT_TOL, &worst_out);
        CHECK_STATUS(clip_download_output(&pg, hout, NULL), LORA_OK);
        want = ref_f32(f, "clip_skip2", NULL);
        double r_skip = want ? rel_l2(hout, want, n) : INFINITY;
        CHECK_MSG(r_skip <= OUT_TOL, "v%d gpu clip_skip2 vs transformers %.3e", ver, r_skip);
        printf("v%d gpu vs transformers: last_hidden_state %.2e, pooled %.2e, clip_skip2 %.2e (rel L2)\n", ver, r_ref,
               r_pool, r_skip);

        /* LoRA forward: training and inference plans on the GPU, the CPU */
        CHECK_STATUS(clip_forward(&pc, ids, ad.pc, 1), LORA_OK);
        CHECK_STATUS(clip_forward(&pg, ids, ad.pg, 1), LORA_OK);
        CHECK_STATUS(clip_forward(&pgi, ids, ad.pg, 1), LORA_OK);
        same(ver, "lora last_hidden_state", pg.out, pc.out, n, OUT_TOL, &worst_out);
        same(ver, "lora last_hidden_state (inference plan)", pgi.out, pc.out, n, OUT_TOL, &worst_out);
        same(ver, "lora pooled", pg.pooled, pc.pooled, B * C, OUT_TOL, &worst_out);

        /* LoRA gradients, clip_skip 1 and 2, from the reference's loss weights */
        const float *w = ref_f32(f, "loss_weights", NULL);
        CHECK(w != NULL);
        float *dw = w ? upload(w, n) : NULL;
        for (int skip = 1; skip <= 2 && dw; skip++) {
            adapters_zero(&ad);
            CHECK_STATUS(clip_forward(&pc, ids, ad.pc, skip), LORA_OK);
            CHECK_STATUS(clip_forward(&pg, ids, ad.pg, skip), LORA_OK);
            CHECK_STATUS(clip_backward(&pc, w, ad.pc), LORA_OK);
            CHECK_STATUS(clip_backward(&pg, dw, ad.pg), LORA_OK);
            double worst = 0;
            for (int64_t i = 0; i < ad.count; i++) {
                const struct nn_lora *c = &ad.lc[i], *g = &ad.lg[i];
                char what[160];
                for (int part = 0; part < 2; part++) {
                    int64_t cnt = part ? c->out * c->rank : c->rank * c->in;
                    snprintf(what, sizeof what, "clip_skip %d grad layers.%lld.%s.%s", skip,
                             (long long)(i / CLIP_N_SLOTS), clip_slot_name((int)(i % CLIP_N_SLOTS)),
                             part ? "up" : "down");
                    const float *got = part ? g->d_up : g->d_down, *cw = part ? c->d_up : c->d_down;
                    if (skip == 2 && i / CLIP_N_SLOTS == mc.layers - 1) {   /* past the skip: exactly zero */
                        float *h = malloc((size_t)cnt * 4);
                        CHECK_STATUS(gpu->iface->download(gpu, h, got, (size_t)cnt * 4), LORA_OK);
                        int zero = 1;
                        for (int64_t j = 0; j < cnt; j++) zero &= h[j] == 0.0f;
                        CHECK_MSG(zero, "v%d %s: layer after clip_skip has a gradient", ver, what);
                        free(h);
                        continue;
                    }
                    same(ver, what, got, cw, cnt, GRAD_TOL, &worst);
                }
            }
            same(ver, "d hidden_states[0]", pg.d_embed, pc.d_embed, n, GRAD_TOL, &worst);
            if (worst > worst_grad) worst_grad = worst;
            printf("v%d gpu vs cpu LoRA grads (clip_skip %d, %lld adapters): worst rel L2 %.2e\n", ver, skip,
                   (long long)ad.count, worst);
        }
        if (dw) gpu->iface->buf_free(gpu, dw);

        /* --max_token_length 225: three chunks per prompt, re-joined on the host */
        int64_t LB, LT;
        int32_t *lids = ref_ids(f, "long.ids", &LB, &LT);
        CHECK(lids && LT == 227);
        if (lids && LT == 227) {
            int64_t CB = LB * 3, CT = 77;
            int32_t *chunks = malloc((size_t)(CB * CT) * sizeof *chunks);
            int32_t eos = 2, pad = ver == 1 ? 2 : 1;
            CHECK_STATUS(clip_split_chunks(ctx, chunks, lids, LB, 3, CT, eos, pad), LORA_OK);
            struct clip_plan lc, lg;
            CHECK_STATUS(clip_plan_init(&lc, &mc, CB, CT, 0, 0), LORA_OK);
            CHECK_STATUS(clip_plan_init(&lg, &mg, CB, CT, 0, 0), LORA_OK);
            CHECK_STATUS(clip_forward(&lc, chunks, NULL, 1), LORA_OK);
            CHECK_STATUS(clip_forward(&lg, chunks, NULL, 1), LORA_OK);
            float *enc = malloc((size_t)(CB * CT * C) * 4), *joined = malloc((size_t)(LB * LT * C) * 4);
            CHECK_STATUS(clip_download_output(&lg, enc, NULL), LORA_OK);
            clip_rejoin_chunks(joined, enc, LB, 3, CT, C);
            const float *lw = ref_f32(f, "long.out", NULL);
            double r = lw ? rel_l2(joined, lw, LB * LT * C) : INFINITY;
            CHECK_MSG(r <= OUT_TOL, "v%d gpu 225-token mode vs transformers %.3e", ver, r);
            same(ver, "225-token chunks", lg.out, lc.out, CB * CT * C, OUT_TOL, &worst_out);
            printf("v%d gpu 225-token mode vs transformers: rel L2 %.2e\n", ver, r);
            free(enc); free(joined); free(chunks);
            clip_plan_free(&lc);
            clip_plan_free(&lg);
        }
        free(lids);

        /* a bad id is reported (row and id) and the GPU stays usable */
        int32_t keep = ids[3];
        ids[3] = (int32_t)mc.vocab;
        CHECK_STATUS(clip_forward(&pgi, ids, NULL, 1), LORA_E_INVALID_ARG);
        char want_msg[96];
        snprintf(want_msg, sizeof want_msg, "token id %ld at position 3", (long)mc.vocab);
        CHECK_MSG(strstr(lora_errmsg(ctx), want_msg) != NULL, "message: %s", lora_errmsg(ctx));
        ids[3] = keep;
        CHECK_STATUS(clip_forward(&pgi, ids, NULL, 1), LORA_OK);
        CHECK_STATUS(clip_download_output(&pgi, hout, NULL), LORA_OK);
        CHECK_STATUS(clip_forward(&pc, ids, NULL, 1), LORA_OK);
        CHECK_MSG(rel_l2(hout, pc.out, n) <= OUT_TOL, "v%d gpu after a bad id: %.3e", ver, rel_l2(hout, pc.out, n));

        free(hout); free(hpool);
        clip_plan_free(&pc);
        clip_plan_free(&pg);
        clip_plan_free(&pgi);
    }
done:
    adapters_free(&ad);
    free(ids);
    if (f) st_close(f);
    clip_free(&mg);
    clip_free(&mc);
    lora_model_free(model);
}

int main(void) {
    const char *why = NULL;
    if (lora_cuda_probe(&why, NULL) != LORA_OK) {
        printf("test_cuda_clip: skipped: %s\n", why);
        return 77;
    }
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_cuda_clip");
    CHECK_STATUS(lora_backend_cuda_create(ctx, 0, &gpu), LORA_OK);
    if (gpu) {
        test_version(ctx, 1, dir);
        test_version(ctx, 2, dir);
        printf("worst gpu vs cpu: outputs rel L2 %.2e, gradients rel L2 %.2e\n", worst_out, worst_grad);
        CHECK_STATUS(gpu->iface->sync(gpu), LORA_OK);
        lora_backend_free(gpu);
    }
    lora_ctx_free(ctx);
    return test_finish("test_cuda_clip");
}
