/* U-Net backward parity with diffusers 0.10.2 on the tiny SD v1 and v2 models: for
 * L = sum(unet(sample_in, [1, 999], te.last_hidden_state) * unet.loss_weights), dL/d sample_in,
 * dL/d encoder_hidden_states and the stored Linear / proj parameter gradients (through the
 * plan's optional dW path) against tests/data/sd/vN_reference_outputs.safetensors, relative L2
 * <= 1e-4; then LoRA adapters on several transformer targets: their d_down / d_up against
 * central finite differences of the same loss. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/sd_model.h"
#include "model/unet.h"
#include "../test.h"
#include "../ref_file.h"

#define GRAD_TOL 1e-4
#define FD_TOL 2e-2

#define compare(ver, what, got, want, n) ref_compare(ver, what, got, want, n, GRAD_TOL)

static int64_t xf_index(const struct unet_model *m, const char *name) {
    for (int64_t i = 0; i < m->n_xf; i++)
        if (strcmp(m->xf[i]->name, name) == 0) return i;
    return -1;
}

static double loss_of(const float *out, const float *w, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)out[i] * w[i];
    return s;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float frand(void) {   /* uniform [-1, 1) */
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

struct pgrad { const char *xf; int target; const char *param; };

static void test_version(lora_ctx *ctx, int ver, const char *dir) {
    lora_model *model = NULL;
    struct lora_file *f = NULL;
    if (!ref_open_version(ctx, dir, ver, &model, &f)) {
        lora_model_free(model);
        st_close(f);
        return;
    }
    struct unet_model m;
    CHECK_STATUS(unet_init(&m, ctx->backend, &model->sd.unet, &model->sd.cfg), LORA_OK);
    int64_t ns = 0, nc = 0, nw = 0;
    const float *x = f ? ref_f32(f, "unet.sample_in", &ns) : NULL;
    const float *ctxt = f ? ref_f32(f, "te.last_hidden_state", &nc) : NULL;
    const float *lw = f ? ref_f32(f, "unet.loss_weights", &nw) : NULL;
    int64_t B = 2, h = 8, w = 8, X = model->sd.cfg.context_dim, T = nc / (B * X);
    struct unet_plan p;
    memset(&p, 0, sizeof p);
    if (m.weights && x && ctxt && lw) CHECK_STATUS(unet_plan_init_ex(&p, &m, B, h, w, T, 1, 4), LORA_OK);
    if (p.mem) {
        CHECK(nw == ns && ns == B * 4 * h * w);
        float t[2] = {1.0f, 999.0f};
        float *out = malloc((size_t)ns * 4), *dx = malloc((size_t)ns * 4), *dc = malloc((size_t)nc * 4);
        struct unet_adapters *ad = calloc(1, sizeof *ad);
        /* base-weight gradients through the dW path */
        const struct pgrad pg[] = {
            {"down_blocks.0.attentions.0", UNET_T_PROJ_IN, "down_blocks.0.attentions.0.proj_in.weight"},
            {"down_blocks.0.attentions.0", UNET_T_Q1, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"},
            {"down_blocks.0.attentions.0", UNET_T_O1, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"},
            {"down_blocks.0.attentions.0", UNET_T_K2, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"},
            {"down_blocks.0.attentions.0", UNET_T_V2, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"},
            {"down_blocks.0.attentions.0", UNET_T_FF0, "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"},
            {"down_blocks.0.attentions.0", UNET_T_FF2, "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"},
            {"mid_block.attentions.0", UNET_T_PROJ_OUT, "mid_block.attentions.0.proj_out.weight"},
            {"up_blocks.3.attentions.2", UNET_T_O2, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight"},
        };
        enum { NPG = sizeof pg / sizeof pg[0] };
        float *dw[NPG];
        for (int i = 0; i < NPG; i++) {
            char name[200];
            snprintf(name, sizeof name, "unet.grad.param.%s", pg[i].param);
            int64_t n = 0, xi = xf_index(&m, pg[i].xf);
            ref_f32(f, name, &n);
            dw[i] = calloc((size_t)(n ? n : 1), 4);
            CHECK_MSG(xi >= 0 && n > 0, "%s", pg[i].param);
            if (xi >= 0) ad->dw[xi][pg[i].target] = dw[i];
        }
        CHECK_STATUS(unet_set_adapters(&p, ad), LORA_OK);
        CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
        CHECK_STATUS(unet_backward(&p, lw, dx, dc), LORA_OK);
        compare(ver, "grad.sample_in", dx, ref_f32(f, "unet.grad.sample_in", NULL), ns);
        compare(ver, "grad.encoder_hidden_states", dc, ref_f32(f, "unet.grad.encoder_hidden_states", NULL), nc);
        for (int i = 0; i < NPG; i++) {
            char name[200];
            int64_t n = 0;
            snprintf(name, sizeof name, "unet.grad.param.%s", pg[i].param);
            const float *want = ref_f32(f, name, &n);
            compare(ver, pg[i].param, dw[i], want, n);
        }
        /* a second forward/backward gives the same input gradient (no state leaks) */
        memset(ad->dw, 0, sizeof ad->dw);
        float *dx2 = malloc((size_t)ns * 4);
        CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
        CHECK_STATUS(unet_backward(&p, lw, dx2, NULL), LORA_OK);
        CHECK(memcmp(dx, dx2, (size_t)ns * 4) == 0);
        free(dx2);

        /* LoRA adapters: rank 2 / 3, random down and up, against central differences */
        const struct { const char *xf; int target; int64_t rank; } lt[] = {
            {"down_blocks.0.attentions.0", UNET_T_Q1, 2},
            {"down_blocks.0.attentions.0", UNET_T_K2, 3},
            {"down_blocks.0.attentions.0", UNET_T_PROJ_IN, 2},
            {"mid_block.attentions.0", UNET_T_FF2, 2},
            {"up_blocks.3.attentions.2", UNET_T_PROJ_OUT, 3},
            {"up_blocks.3.attentions.2", UNET_T_V1, 2},
        };
        enum { NLT = sizeof lt / sizeof lt[0] };
        struct nn_lora L[NLT];
        float *dn[NLT], *up[NLT];
        int fd_pass = 1;
        for (int i = 0; i < NLT; i++) {
            int64_t xi = xf_index(&m, lt[i].xf);
            CHECK(xi >= 0);
            if (xi < 0) { fd_pass = 0; dn[i] = up[i] = NULL; continue; }
            const struct unet_xf *xf = m.xf[xi];
            int64_t in = xf->c, o = xf->c, r = lt[i].rank;
            if (lt[i].target == UNET_T_K2) in = X;
            if (lt[i].target == UNET_T_FF2) in = 4 * xf->c;
            dn[i] = malloc((size_t)(r * in) * 4);
            up[i] = malloc((size_t)(o * r) * 4);
            for (int64_t k = 0; k < r * in; k++) dn[i][k] = 0.2f * frand();
            for (int64_t k = 0; k < o * r; k++) up[i][k] = 0.2f * frand();
            L[i] = (struct nn_lora){in, o, r, nn_lora_scale(1.0, r, 1.0), dn[i], up[i],
                                    calloc((size_t)(r * in), 4), calloc((size_t)(o * r), 4)};
            ad->lora[xi][lt[i].target] = &L[i];
        }
        memset(ad->dw, 0, sizeof ad->dw);
        if (fd_pass) {
            CHECK_STATUS(unet_set_adapters(&p, ad), LORA_OK);
            CHECK_STATUS(unet_forward(&p, x, t, ctxt, out), LORA_OK);
            CHECK_STATUS(unet_backward(&p, lw, dx, dc), LORA_OK);
            double worst = 0;
            for (int i = 0; i < NLT; i++)
                for (int which = 0; which < 2; which++) {
                    float *par = which ? up[i] : dn[i];
                    const float *g = which ? L[i].d_up : L[i].d_down;
                    int64_t cnt = which ? L[i].out * L[i].rank : L[i].rank * L[i].in;
                    for (int s = 0; s < 2; s++) {
                        int64_t k = (int64_t)((s * 7919 + i * 31 + which * 101) % cnt);
                        float keep = par[k], eps = 1e-2f;
                        par[k] = keep + eps;
                        unet_forward(&p, x, t, ctxt, out);
                        double lp = loss_of(out, lw, ns);
                        par[k] = keep - eps;
                        unet_forward(&p, x, t, ctxt, out);
                        double lm = loss_of(out, lw, ns);
                        par[k] = keep;
                        double fd = (lp - lm) / (2.0 * eps), an = g[k];
                        double err = fabs(fd - an) / fmax(fabs(fd), 1e-1);
                        if (err > worst) worst = err;
                        printf("v%d FD %-28s %-14s %s[%4lld]: analytic % .6e  fd % .6e  err %.1e\n", ver, lt[i].xf,
                               unet_target_names[lt[i].target], which ? "up" : "down", (long long)k, an, fd, err);
                        CHECK_MSG(err <= FD_TOL, "v%d FD %s %s: %.3e", ver, lt[i].xf,
                                  unet_target_names[lt[i].target], err);
                    }
                }
            printf("v%d FD worst relative error %.2e\n", ver, worst);
        }
        /* gradient_checkpointing off (UNET_TRAIN_SAVE_ALL): the same gradients as the
         * per-block recompute, bit for bit (LoRA, dW, input, context) */
        if (fd_pass) {
            struct unet_plan pa;
            CHECK_STATUS(unet_plan_init_ex(&pa, &m, B, h, w, T, UNET_TRAIN_SAVE_ALL, 4), LORA_OK);
            CHECK(pa.mem && unet_plan_bytes(&pa) > unet_plan_bytes(&p));
            printf("v%d train plan: %llu bytes checkpointing, %llu saving all\n", ver,
                   (unsigned long long)unet_plan_bytes(&p), (unsigned long long)unet_plan_bytes(&pa));
            int64_t x0 = xf_index(&m, pg[0].xf);
            float *gw[2], *gx[2], *gc[2], *gd[2][NLT], *gu[2][NLT];
            for (int mode = 0; mode < 2 && pa.mem && x0 >= 0; mode++) {
                struct unet_plan *pp = mode ? &pa : &p;
                gw[mode] = calloc(64, 4);
                ad->dw[x0][UNET_T_Q1] = gw[mode];
                for (int i = 0; i < NLT; i++) {
                    memset(L[i].d_down, 0, (size_t)(L[i].rank * L[i].in) * 4);
                    memset(L[i].d_up, 0, (size_t)(L[i].out * L[i].rank) * 4);
                }
                gx[mode] = malloc((size_t)ns * 4);
                gc[mode] = malloc((size_t)nc * 4);
                CHECK_STATUS(unet_set_adapters(pp, ad), LORA_OK);
                CHECK_STATUS(unet_forward(pp, x, t, ctxt, out), LORA_OK);
                CHECK_STATUS(unet_backward(pp, lw, gx[mode], gc[mode]), LORA_OK);
                for (int i = 0; i < NLT; i++) {
                    gd[mode][i] = malloc((size_t)(L[i].rank * L[i].in) * 4);
                    gu[mode][i] = malloc((size_t)(L[i].out * L[i].rank) * 4);
                    memcpy(gd[mode][i], L[i].d_down, (size_t)(L[i].rank * L[i].in) * 4);
                    memcpy(gu[mode][i], L[i].d_up, (size_t)(L[i].out * L[i].rank) * 4);
                }
            }
            if (pa.mem && x0 >= 0) {
                int64_t nq = m.xf[x0]->c * m.xf[x0]->c;
                CHECK_MSG(nq <= 64 && memcmp(gw[0], gw[1], (size_t)nq * 4) == 0, "v%d save-all dW", ver);
                CHECK_MSG(memcmp(gx[0], gx[1], (size_t)ns * 4) == 0, "v%d save-all d_sample", ver);
                CHECK_MSG(memcmp(gc[0], gc[1], (size_t)nc * 4) == 0, "v%d save-all d_context", ver);
                int same = 1;
                for (int i = 0; i < NLT; i++)
                    same &= memcmp(gd[0][i], gd[1][i], (size_t)(L[i].rank * L[i].in) * 4) == 0 &&
                            memcmp(gu[0][i], gu[1][i], (size_t)(L[i].out * L[i].rank) * 4) == 0;
                CHECK_MSG(same, "v%d save-all LoRA gradients", ver);
                printf("v%d save-all gradients equal the checkpointed ones: %s\n", ver, same ? "yes" : "no");
                for (int mode = 0; mode < 2; mode++) {
                    free(gw[mode]); free(gx[mode]); free(gc[mode]);
                    for (int i = 0; i < NLT; i++) { free(gd[mode][i]); free(gu[mode][i]); }
                }
                ad->dw[x0][UNET_T_Q1] = NULL;
            }
            unet_plan_free(&pa);
        }
        for (int i = 0; i < NLT; i++) {
            if (!dn[i]) continue;
            free(dn[i]); free(up[i]); free(L[i].d_down); free(L[i].d_up);
        }
        for (int i = 0; i < NPG; i++) free(dw[i]);
        free(ad); free(out); free(dx); free(dc);
    }
    /* a forward-only plan refuses the backward */
    struct unet_plan q;
    if (m.weights) {
        CHECK_STATUS(unet_plan_init(&q, &m, B, h, w, T), LORA_OK);
        CHECK_STATUS(unet_backward(&q, lw, NULL, NULL), LORA_E_INVALID_ARG);
        unet_plan_free(&q);
    }
    unet_plan_free(&p);
    unet_free(&m);
    if (f) st_close(f);
    lora_model_free(model);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    if (!dir) dir = "tests/data";
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (!ctx) return test_finish("test_unet_grad");
    test_version(ctx, 1, dir);
    test_version(ctx, 2, dir);
    lora_ctx_free(ctx);
    return test_finish("test_unet_grad");
}
