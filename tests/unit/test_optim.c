/* LR schedulers (lib/train/lr_sched.c) and optimizers (lib/train/optim.c) against
 * tests/data/train/optim_reference.safetensors (tests/reference/make_optim_reference.py:
 * diffusers 0.10.2 schedule functions on torch 1.13 LambdaLR; torch.optim.SGD / AdamW; Lion as
 * lion-pytorch's update rule). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io/safetensors.h"
#include "train/train.h"
#include "../test.h"
#include "../ref_file.h"

#define SCHED_TOL 1e-7   /* relative, per step */
#define OPT_TOL 1e-6     /* rel L2 per step */
#define LR 1e-3
#define WARMUP 10
#define TOTAL 100
#define STEPS 120
#define N 257
#define K 5

static const double *ref_f64(const struct lora_file *f, const char *name, int64_t want) {
    int64_t i = ref_find(f, name);
    if (i < 0 || f->tensors[i].dtype != LORA_DTYPE_F64 ||
        (int64_t)((f->tensors[i].end - f->tensors[i].begin) / 8) != want) {
        fprintf(stderr, "reference tensor %s missing or not F64[%lld]\n", name, (long long)want);
        return NULL;
    }
    static double buf[STEPS];   /* copied: the file's data need not be 8-aligned */
    memcpy(buf, st_data(f, i), (size_t)want * 8);
    return buf;
}

static void test_schedulers(const struct lora_file *f) {
    static const char *names[] = {"constant", "constant_with_warmup", "linear", "cosine",
                                  "cosine_with_restarts", "polynomial"};
    for (int k = 0; k < 6; k++) {
        struct train_lr_schedule s;
        train_lr_schedule_default(&s);
        CHECK_STATUS(train_lr_kind_parse(NULL, names[k], &s.kind), LORA_OK);
        CHECK(strcmp(train_lr_kind_name(s.kind), names[k]) == 0);
        s.warmup = WARMUP, s.total = TOTAL, s.num_cycles = 3, s.power = 2;
        char key[64];
        snprintf(key, sizeof key, "sched.%s", names[k]);
        const double *want = ref_f64(f, key, STEPS);
        CHECK_MSG(want != NULL, "%s", key);
        if (!want) continue;
        double worst = 0;
        for (int64_t t = 0; t < STEPS; t++) {
            double got = train_lr_at(&s, LR, t), r = fabs(got - want[t]);
            if (want[t] != 0) r /= fabs(want[t]);
            else r /= LR;   /* exact zeros: relative to the base lr */
            if (r > worst) worst = r;
            if (r > SCHED_TOL) fprintf(stderr, "%s step %lld: %.17g vs %.17g\n", names[k], (long long)t, got, want[t]);
        }
        printf("sched %-22s max rel %.2e over %d steps\n", names[k], worst, STEPS);
        CHECK_MSG(worst <= SCHED_TOL, "%s: max rel %.3e", names[k], worst);
    }
    enum train_lr_kind kind;
    CHECK_STATUS(train_lr_kind_parse(NULL, "adafactor", &kind), LORA_E_INVALID_ARG);
    /* polynomial with kohya's optimizer default lr differing from the group lr */
    struct train_lr_schedule s;
    train_lr_schedule_default(&s);
    s.kind = TRAIN_LR_POLYNOMIAL, s.total = 10, s.lr_init = 1e-3;
    CHECK_NEAR(train_lr_at(&s, 2e-4, 0), 2e-4, 1e-18);
    CHECK_NEAR(train_lr_at(&s, 2e-4, 11), 2e-4 * 1e-7 / 1e-3, 1e-18);
    s.warmup = 10;   /* warmup == total: no division by zero */
    CHECK(isfinite(train_lr_at(&s, 1e-3, 10)));
}

static void run_opt(const struct lora_file *f, const char *name, const struct train_optim_opts *o,
                    double lr) {
    char key[64];
    snprintf(key, sizeof key, "opt.%s", name);
    int64_t np = 0, ng = 0, nw = 0;
    const float *p0 = ref_f32(f, "opt.p0", &np), *g = ref_f32(f, "opt.grads", &ng),
                *want = ref_f32(f, key, &nw);
    CHECK_MSG(p0 && g && want && np == N && ng == K * N && nw == K * N, "%s: reference shapes", key);
    if (!(p0 && g && want && np == N && ng == K * N && nw == K * N)) return;
    float p[N], state[2 * N];
    CHECK(train_optim_state_floats(o, N) <= 2 * N);
    memcpy(p, p0, sizeof p);
    memset(state, 0, sizeof state);
    double worst = 0;
    for (int64_t k = 0; k < K; k++) {
        CHECK_STATUS(train_optim_step(NULL, o, p, g + k * N, state, N, lr, k + 1), LORA_OK);
        double r = rel_l2(p, want + k * N, N);
        if (r > worst) worst = r;
    }
    printf("opt %-18s worst rel L2 over %d steps %.2e\n", name, K, worst);
    CHECK_MSG(worst <= OPT_TOL, "%s: rel L2 %.3e", name, worst);
}

#define N8 4097
#define MAP_TOL 2.5e-7   /* relative, per code: torch's vectorised linspace may differ by an ulp */
#define BNB_TOL 1e-6     /* rel L2 of the parameters after 3 steps */

static void test_adamw8bit(const struct lora_file *f) {
    float code[256];
    for (int sgn = 1; sgn >= 0; sgn--) {
        train_bnb_dynamic_map(code, sgn);
        int64_t nc = 0;
        const float *want = ref_f32(f, sgn ? "bnb.code1" : "bnb.code2", &nc);
        CHECK(want && nc == 256);
        if (!want || nc != 256) continue;
        int exact = 0;
        double worst = 0;
        for (int i = 0; i < 256; i++) {
            exact += code[i] == want[i];
            double r = want[i] != 0 ? fabs((double)code[i] - want[i]) / fabs(want[i]) : fabs(code[i]);
            if (r > worst) worst = r;
        }
        printf("bnb %s dynamic map: %d of 256 codes bit-exact, max rel %.2e\n", sgn ? "signed" : "unsigned",
               exact, worst);
        CHECK_MSG(worst <= MAP_TOL, "dynamic map max rel %.3e", worst);
        CHECK(code[sgn ? 127 : 0] == 0.0f && code[255] == 1.0f);
    }

    struct train_optim_opts o;
    CHECK_STATUS(train_optim_parse(NULL, "AdamW8bit", &o), LORA_OK);
    CHECK(o.kind == TRAIN_OPT_ADAMW8BIT && o.beta2 == 0.999 && o.weight_decay == 0.01);
    run_opt(f, "adamw8bit_small", &o, 1e-2);   /* n < 4096: fp32 state */

    int64_t np = 0, ng = 0, nw = 0, na = 0;
    const float *p0 = ref_f32(f, "bnb.p0", &np), *g = ref_f32(f, "bnb.g", &ng),
                *want = ref_f32(f, "bnb.p", &nw), *am1 = ref_f32(f, "bnb.absmax1", &na),
                *am2 = ref_f32(f, "bnb.absmax2", NULL);
    int64_t i1 = ref_find(f, "bnb.state1"), i2 = ref_find(f, "bnb.state2");
    CHECK(p0 && g && want && am1 && am2 && np == N8 && ng == N8 && nw == N8 && na == 3 && i1 >= 0 && i2 >= 0);
    if (!(p0 && g && want && am1 && am2 && np == N8 && ng == N8 && nw == N8 && na == 3 && i1 >= 0 && i2 >= 0))
        return;
    int64_t nst = train_optim_state_floats(&o, N8);
    CHECK(nst == 2 * 3 + (2 * N8 + 3) / 4);
    static float p[N8], gk[N8], state[2 * 3 + (2 * N8 + 3) / 4];
    memcpy(p, p0, sizeof p);
    memset(state, 0, sizeof state);
    const float scale[3] = {1.0f, -0.5f, 2.0f};
    for (int k = 0; k < 3; k++) {
        for (int64_t i = 0; i < N8; i++) gk[i] = g[i] * scale[k];
        CHECK_STATUS(train_optim_step(NULL, &o, p, gk, state, N8, 1e-2, k + 1), LORA_OK);
    }
    double r = rel_l2(p, want, N8), ra = fmax(rel_l2(state, am1, 3), rel_l2(state + 3, am2, 3));
    const uint8_t *q = (const uint8_t *)(state + 6), *w1 = st_data(f, i1), *w2 = st_data(f, i2);
    int64_t d1 = 0, d2 = 0;
    for (int64_t i = 0; i < N8; i++) d1 += q[i] != w1[i], d2 += q[N8 + i] != w2[i];
    printf("AdamW8bit n=%d (3 blocks), 3 steps: params rel L2 %.2e, absmax rel %.2e, codes differing m %lld v %lld of %d\n",
           N8, r, ra, (long long)d1, (long long)d2, N8);
    CHECK_MSG(r <= BNB_TOL, "AdamW8bit params rel L2 %.3e", r);
    CHECK_MSG(ra <= 1e-6, "AdamW8bit absmax rel %.3e", ra);
    CHECK_MSG(d1 + d2 <= N8 / 1000, "AdamW8bit: %lld + %lld codes differ", (long long)d1, (long long)d2);
}

static void test_optimizers(const struct lora_file *f) {
    struct train_optim_opts o;
    CHECK_STATUS(train_optim_parse(NULL, "SGDNesterov", &o), LORA_OK);
    CHECK(o.kind == TRAIN_OPT_SGD && o.nesterov && o.momentum == 0.9 && o.weight_decay == 0);
    run_opt(f, "sgd_nesterov", &o, 0.05);
    train_optim_default(&o, TRAIN_OPT_SGD);
    o.momentum = 0.9, o.dampening = 0.1, o.weight_decay = 0.01;
    run_opt(f, "sgd_momentum_wd", &o, 0.05);
    CHECK_STATUS(train_optim_parse(NULL, "adamw", &o), LORA_OK);
    run_opt(f, "adamw", &o, 1e-2);
    CHECK_STATUS(train_optim_parse(NULL, "Lion", &o), LORA_OK);
    CHECK(o.beta1 == 0.9 && o.beta2 == 0.99 && o.weight_decay == 0);
    o.weight_decay = 0.1;
    run_opt(f, "lion", &o, 1e-2);

    CHECK_STATUS(train_optim_parse(NULL, "DAdaptation", &o), LORA_E_UNSUPPORTED);
    train_optim_default(&o, TRAIN_OPT_SGD);
    CHECK(train_optim_state_floats(&o, 10) == 0);
    float p[2] = {1, 2}, g[2] = {1, 1};
    CHECK_STATUS(train_optim_step(NULL, &o, p, g, NULL, 2, 0.5, 1), LORA_OK);   /* plain SGD */
    CHECK(p[0] == 0.5f && p[1] == 1.5f);
    o.nesterov = 1;   /* Nesterov without momentum */
    CHECK_STATUS(train_optim_step(NULL, &o, p, g, NULL, 2, 0.5, 1), LORA_E_INVALID_ARG);
    train_optim_default(&o, TRAIN_OPT_LION);
    CHECK_STATUS(train_optim_step(NULL, &o, p, g, NULL, 2, 0.5, 1), LORA_E_INVALID_ARG);
    float m[2] = {0, 0};
    CHECK_STATUS(train_optim_step(NULL, &o, p, g, m, 2, NAN, 1), LORA_E_INVALID_ARG);
    CHECK_STATUS(train_optim_step(NULL, &o, p, g, m, 2, 0.1, 0), LORA_E_INVALID_ARG);
}

int main(void) {
    const char *dir = getenv("LORA_TEST_DATA");
    char path[1024];
    snprintf(path, sizeof path, "%s/train/optim_reference.safetensors", dir ? dir : "tests/data");
    lora_ctx *ctx = NULL;
    struct lora_file *f = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    CHECK_STATUS(st_open(ctx, path, &f), LORA_OK);
    if (f) {
        test_schedulers(f);
        test_optimizers(f);
        test_adamw8bit(f);
        st_close(f);
    }
    lora_ctx_free(ctx);
    return test_finish("test_optim");
}
