/* LoRA files at the edges (lora_network_load, lora_network_coverage, lora_model_attach), built
 * here from the kohya-written tests/data/network/v1_kohya.safetensors:
 *  - legacy files without alpha (alpha = rank, scale 1) and alpha as a float16 / bfloat16 /
 *    float64 / int64 / int32 scalar, a 0-d or a 1-element 1-d/2-d tensor; alpha 0 = rank;
 *  - alpha with two elements, NaN or negative, of a non-numeric dtype;
 *  - LyCORIS LoHa / LoKr / LoCon-Tucker (lora_mid), DoRA and PEFT files, pure or mixed into a
 *    kohya file: refused with LORA_E_UNSUPPORTED naming the first such key and its kind;
 *  - SDXL module names (lora_te1_, lora_te2_, lora_unet_input_blocks_...): loaded, reported as
 *    unused, and a pure SDXL file is "nothing matches" with the SDXL hint;
 *  - a module whose shapes do not fit: reported, skipped by attach (its weight untouched);
 *  - an all-zero network: "the network does nothing" in the log;
 *  - no lora_down, a down without its up, 3-D factors, a k x k up, rank 0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lora/lora.h"
#include "internal.h"
#include "core/dtype.h"
#include "io/st_map.h"
#include "network/network.h"
#include "../test.h"

static const char *data_dir;
static char tmpdir[256];
static char logbuf[1 << 16];

static void log_fn(void *user, lora_log_level level, const char *msg) {
    (void)user;
    (void)level;
    size_t n = strlen(logbuf);
    if (n + strlen(msg) + 2 < sizeof logbuf) {
        memcpy(logbuf + n, msg, strlen(msg));
        logbuf[n + strlen(msg)] = '\n';
        logbuf[n + strlen(msg) + 1] = 0;
    }
}

static char *tpath(const char *name) {
    static char p[600];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    return p;
}

static struct tensor_map kohya_map(lora_ctx *ctx) {
    struct tensor_map m;
    tmap_init(&m, ctx);
    char p[600];
    snprintf(p, sizeof p, "%s/network/v1_kohya.safetensors", data_dir);
    CHECK_STATUS(st_read_map(ctx, p, &m, NULL), LORA_OK);
    return m;
}

/* A copy of the map: owned tensors. */
static struct tensor_map copy_map(lora_ctx *ctx, const struct tensor_map *src) {
    struct tensor_map m;
    tmap_init(&m, ctx);
    for (int64_t i = 0; i < src->n; i++) {
        const struct lora_tensor *t = &src->t[i];
        CHECK_STATUS(tmap_add(&m, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 1, 1), LORA_OK);
    }
    return m;
}

static void put(struct tensor_map *m, const char *name, lora_dtype dt, int nd, const int64_t *sh, const void *data,
                uint64_t nb) {
    int64_t i = tmap_find(m, name);
    if (i >= 0) tmap_remove(m, i);
    CHECK_STATUS(tmap_add(m, name, dt, nd, sh, data, nb, 1, 1), LORA_OK);
}

static lora_status write_load(lora_ctx *ctx, const struct tensor_map *m, const char *name, lora_network **out) {
    *out = NULL;
    CHECK_STATUS(st_write_map(ctx, tpath(name), m, NULL, NULL, 0), LORA_OK);
    return lora_network_load(ctx, tpath(name), out);
}

#define MOD "lora_unet_mid_block_attentions_0_proj_out"

static void test_alpha(lora_ctx *ctx, const struct tensor_map *k) {
    /* legacy: no alpha anywhere */
    struct tensor_map m = copy_map(ctx, k);
    for (int64_t i = m.n - 1; i >= 0; i--)
        if (strstr(m.t[i].name, ".alpha")) tmap_remove(&m, i);
    lora_network *n = NULL;
    CHECK_STATUS(write_load(ctx, &m, "noalpha.safetensors", &n), LORA_OK);
    if (n) {
        int bad = 0;
        for (int64_t i = 0; i < n->n; i++)
            bad += n->m[i].has_alpha || n->m[i].alpha != (double)n->m[i].rank || n->m[i].nn.scale != 1.0f;
        CHECK(bad == 0);
    }
    lora_network_free(n);
    tmap_clear(&m);

    /* alpha dtypes and shapes: value -> expected scale for rank 2 */
    struct { lora_dtype dt; int nd; int64_t sh[2]; double v; double scale; } c[] = {
        {LORA_DTYPE_F16, 0, {0}, 3.0, 1.5},       {LORA_DTYPE_BF16, 0, {0}, 0.5, 0.25},
        {LORA_DTYPE_F32, 1, {1}, 2.0, 1.0},        {LORA_DTYPE_F64, 0, {0}, 1.5, 0.75},
        {LORA_DTYPE_I64, 0, {0}, 4.0, 2.0},        {LORA_DTYPE_I32, 2, {1, 1}, 1.0, 0.5},
        {LORA_DTYPE_F32, 0, {0}, 0.0, 1.0},        /* 0 = rank (kohya) */
    };
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        m = copy_map(ctx, k);
        uint8_t b[8];
        uint64_t nb;
        if (c[i].dt == LORA_DTYPE_F16) { uint16_t h = lora_f32_to_f16((float)c[i].v); memcpy(b, &h, 2); nb = 2; }
        else if (c[i].dt == LORA_DTYPE_BF16) { uint16_t h = lora_f32_to_bf16((float)c[i].v); memcpy(b, &h, 2); nb = 2; }
        else if (c[i].dt == LORA_DTYPE_F64) { memcpy(b, &c[i].v, 8); nb = 8; }
        else if (c[i].dt == LORA_DTYPE_I64) { int64_t x = (int64_t)c[i].v; memcpy(b, &x, 8); nb = 8; }
        else if (c[i].dt == LORA_DTYPE_I32) { int32_t x = (int32_t)c[i].v; memcpy(b, &x, 4); nb = 4; }
        else { float x = (float)c[i].v; memcpy(b, &x, 4); nb = 4; }
        put(&m, MOD ".alpha", c[i].dt, c[i].nd, c[i].sh, b, nb);
        CHECK_STATUS(write_load(ctx, &m, "alpha.safetensors", &n), LORA_OK);
        int64_t q = n ? net_find(n, MOD) : -1;
        CHECK(q >= 0);
        if (q >= 0) {
            CHECK_MSG(n->m[q].rank == 2 && n->m[q].alpha == c[i].v && fabs(n->m[q].nn.scale - c[i].scale) < 1e-7,
                      "case %zu: alpha %g scale %g", i, n->m[q].alpha, (double)n->m[q].nn.scale);
        }
        lora_network_free(n);
        tmap_clear(&m);
    }

    /* bad alphas */
    float two[2] = {1, 2}, nan = NAN, neg = -1;
    int64_t s2[1] = {2};
    m = copy_map(ctx, k);
    put(&m, MOD ".alpha", LORA_DTYPE_F32, 1, s2, two, 8);
    CHECK_STATUS(write_load(ctx, &m, "a2.safetensors", &n), LORA_E_SHAPE_MISMATCH);
    CHECK(strstr(lora_errmsg(ctx), MOD ".alpha") != NULL);
    put(&m, MOD ".alpha", LORA_DTYPE_F32, 0, NULL, &nan, 4);
    CHECK_STATUS(write_load(ctx, &m, "a3.safetensors", &n), LORA_E_NONFINITE_INPUT);
    CHECK(strstr(lora_errmsg(ctx), MOD ".alpha") != NULL);
    put(&m, MOD ".alpha", LORA_DTYPE_F32, 0, NULL, &neg, 4);
    CHECK_STATUS(write_load(ctx, &m, "a4.safetensors", &n), LORA_E_NONFINITE_INPUT);
    uint8_t t8 = 1;
    put(&m, MOD ".alpha", LORA_DTYPE_BOOL, 0, NULL, &t8, 1);
    lora_status s = write_load(ctx, &m, "a5.safetensors", &n);
    CHECK_MSG(s == LORA_OK || s == LORA_E_UNSUPPORTED, "bool alpha: %s", lora_status_name(s));
    lora_network_free(n);
    tmap_clear(&m);
}

static void test_foreign(lora_ctx *ctx, const struct tensor_map *k) {
    static const struct { const char *suffix, *kind; } f[] = {
        {"hada_w1_a", "LoHa"}, {"hada_w2_b", "LoHa"}, {"lokr_w1", "LoKr"}, {"lokr_w2_a", "LoKr"},
        {"lora_mid.weight", "Tucker"}, {"dora_scale", "DoRA"}, {"lora_A.weight", "PEFT"},
    };
    float z[4] = {0};
    int64_t sh[2] = {2, 2};
    for (size_t i = 0; i < sizeof f / sizeof *f; i++) {
        for (int mixed = 0; mixed < 2; mixed++) {
            struct tensor_map m;
            if (mixed) m = copy_map(ctx, k);
            else tmap_init(&m, ctx);
            char key[300];
            snprintf(key, sizeof key, "lora_unet_down_blocks_0_attentions_0_proj_in.%s", f[i].suffix);
            put(&m, key, LORA_DTYPE_F32, 2, sh, z, 16);
            put(&m, "lora_unet_down_blocks_0_attentions_0_proj_in.alpha", LORA_DTYPE_F32, 0, NULL, z, 4);
            lora_network *n = NULL;
            CHECK_STATUS(write_load(ctx, &m, "foreign.safetensors", &n), LORA_E_UNSUPPORTED);
            CHECK_MSG(strstr(lora_errmsg(ctx), key) && strstr(lora_errmsg(ctx), f[i].kind), "%s", lora_errmsg(ctx));
            CHECK(n == NULL);
            tmap_clear(&m);
        }
    }
}

static void test_sdxl_and_shapes(lora_ctx *ctx, const struct tensor_map *k) {
    char p[600];
    snprintf(p, sizeof p, "%s/sd/v1_diffusers", data_dir);
    lora_model *model = NULL;
    CHECK_STATUS(lora_model_load(ctx, p, NULL, &model), LORA_OK);
    if (!model) return;
    float v[64];
    for (int i = 0; i < 64; i++) v[i] = 0.01f * (float)(i + 1);
    int64_t d[2] = {2, 8}, u[2] = {8, 2};
    static const char *const sdxl[] = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                       "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                                       "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                                       "lora_unet_output_blocks_0_1_proj_in"};
    /* SDXL modules next to the v1 ones */
    struct tensor_map m = copy_map(ctx, k);
    int64_t n_v1 = 0;
    for (int64_t i = 0; i < m.n; i++) n_v1 += strstr(m.t[i].name, ".lora_down.weight") != NULL;
    char key[300];
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "%s.lora_down.weight", sdxl[i]);
        put(&m, key, LORA_DTYPE_F32, 2, d, v, 64);
        snprintf(key, sizeof key, "%s.lora_up.weight", sdxl[i]);
        put(&m, key, LORA_DTYPE_F32, 2, u, v, 64);
    }
    /* and one v1 module whose widths do not fit: in 8 instead of the model's */
    const char *bad = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    snprintf(key, sizeof key, "%s.lora_down.weight", bad);
    put(&m, key, LORA_DTYPE_F32, 2, d, v, 64);
    snprintf(key, sizeof key, "%s.lora_up.weight", bad);
    put(&m, key, LORA_DTYPE_F32, 2, u, v, 64);
    lora_network *n = NULL;
    CHECK_STATUS(write_load(ctx, &m, "sdxl_mixed.safetensors", &n), LORA_OK);
    int64_t mt = -1, un = -1, mis = -1;
    logbuf[0] = 0;
    CHECK_STATUS(lora_network_coverage(n, model, &mt, &un, &mis), LORA_OK);
    CHECK_MSG(mt == n_v1 - 1 && un == 4 && mis == 1, "%lld matched, %lld unused, %lld mismatched", (long long)mt,
              (long long)un, (long long)mis);
    CHECK(strstr(logbuf, "SDXL") != NULL && strstr(logbuf, bad) != NULL);
    /* attach skips the misfit: its weight stays as it was */
    const char *w = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    const struct lora_tensor *t0 = &model->sd.unet.t[tmap_find(&model->sd.unet, w)];
    const void *before = t0->data;
    lora_dtype dt0 = t0->dtype;
    logbuf[0] = 0;
    CHECK_STATUS(lora_model_attach(model, n, 1.0, LORA_APPLY_RUNTIME), LORA_OK);
    CHECK(strstr(logbuf, "matched") != NULL && strstr(logbuf, "1 shape mismatches") != NULL);
    const struct lora_tensor *t1 = &model->sd.unet.t[tmap_find(&model->sd.unet, w)];
    CHECK(t1->data == before && t1->dtype == dt0);
    CHECK_STATUS(lora_model_detach_all(model), LORA_OK);
    lora_network_free(n);
    tmap_clear(&m);

    /* SDXL only: nothing matches, and the message says why */
    tmap_init(&m, ctx);
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "%s.lora_down.weight", sdxl[i]);
        put(&m, key, LORA_DTYPE_F32, 2, d, v, 64);
        snprintf(key, sizeof key, "%s.lora_up.weight", sdxl[i]);
        put(&m, key, LORA_DTYPE_F32, 2, u, v, 64);
    }
    CHECK_STATUS(write_load(ctx, &m, "sdxl.safetensors", &n), LORA_OK);
    CHECK_STATUS(lora_model_attach(model, n, 1.0, LORA_APPLY_RUNTIME), LORA_E_NO_MATCHING_KEYS);
    CHECK_MSG(strstr(lora_errmsg(ctx), "SDXL") != NULL, "%s", lora_errmsg(ctx));
    CHECK(lora_model_attached_count(model) == 0);
    lora_network_free(n);
    tmap_clear(&m);

    /* all-zero ups: "does nothing" */
    m = copy_map(ctx, k);
    for (int64_t i = 0; i < m.n; i++)
        if (strstr(m.t[i].name, ".lora_up.weight")) memset(m.t[i].data, 0, m.t[i].nbytes);
    CHECK_STATUS(write_load(ctx, &m, "zero.safetensors", &n), LORA_OK);
    logbuf[0] = 0;
    CHECK_STATUS(lora_network_coverage(n, model, NULL, NULL, NULL), LORA_OK);
    CHECK_MSG(strstr(logbuf, "does nothing") != NULL, "%s", logbuf);
    lora_network_free(n);
    tmap_clear(&m);
    lora_model_free(model);
}

static void test_structure(lora_ctx *ctx, const struct tensor_map *k) {
    lora_network *n = NULL;
    float v[128] = {0};   /* the largest case below: 72 floats */
    /* no lora_down at all */
    struct tensor_map m;
    tmap_init(&m, ctx);
    int64_t s1[1] = {4};
    put(&m, "something.weight", LORA_DTYPE_F32, 1, s1, v, 16);
    CHECK_STATUS(write_load(ctx, &m, "none.safetensors", &n), LORA_E_NO_MATCHING_KEYS);
    CHECK(strstr(lora_errmsg(ctx), "something.weight") != NULL);
    tmap_clear(&m);
    /* a down without its up */
    m = copy_map(ctx, k);
    tmap_remove(&m, tmap_find(&m, MOD ".lora_up.weight"));
    CHECK_STATUS(write_load(ctx, &m, "noup.safetensors", &n), LORA_E_NOT_A_MODEL);
    CHECK(strstr(lora_errmsg(ctx), MOD) != NULL);
    tmap_clear(&m);
    /* 3-D factors, a 3x3 up, rank 0 */
    int64_t d3[3] = {2, 4, 2}, u3[3] = {4, 2, 1}, d4[4] = {2, 4, 1, 1}, u4[4] = {4, 2, 3, 3}, d0[2] = {0, 4},
            u0[2] = {4, 0};
    struct { const int64_t *d, *u; int nd, nu; } c[] = {{d3, u3, 3, 3}, {d4, u4, 4, 4}, {d0, u0, 2, 2}};
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        m = copy_map(ctx, k);
        int64_t nd = 1, nu = 1;
        for (int j = 0; j < c[i].nd; j++) nd *= c[i].d[j];
        for (int j = 0; j < c[i].nu; j++) nu *= c[i].u[j];
        put(&m, MOD ".lora_down.weight", LORA_DTYPE_F32, c[i].nd, c[i].d, v, (uint64_t)nd * 4);
        put(&m, MOD ".lora_up.weight", LORA_DTYPE_F32, c[i].nu, c[i].u, v, (uint64_t)nu * 4);
        CHECK_STATUS(write_load(ctx, &m, "shape.safetensors", &n), LORA_E_SHAPE_MISMATCH);
        CHECK_MSG(strstr(lora_errmsg(ctx), MOD) != NULL, "%s", lora_errmsg(ctx));
        CHECK(n == NULL);
        tmap_clear(&m);
    }
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) data_dir = "tests/data";
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora_test_netbad_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    lora_ctx_set_log(ctx, log_fn, NULL, LORA_LOG_DEBUG);
    struct tensor_map k = kohya_map(ctx);
    test_alpha(ctx, &k);
    test_foreign(ctx, &k);
    test_sdxl_and_shapes(ctx, &k);
    test_structure(ctx, &k);
    tmap_clear(&k);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) { /* best effort */ }
    return test_finish("test_network_badinput");
}
