/* lora_merge_file (streamed merge into a model file) against the in-memory merge
 * (lora_model_cast + lora_merge_into_model + lora_model_save: the files must be identical byte
 * for byte) and against kohya's merge_lora.py output (tests/data/ops/v{1,2}_merge2, made by
 * tests/reference/make_ops_fixtures.py); cancel leaves no output and no temp file. */
#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/st_map.h"
#include "network/network.h"
#include "ops/ops.h"
#include "../test.h"

static const char *data_dir;
static char tmp_dir[256];

static lora_network *load_net(lora_ctx *ctx, const char *name) {
    char *p = test_path_join(data_dir, name);
    lora_network *n = NULL;
    CHECK_STATUS(lora_network_load(ctx, p, &n), LORA_OK);
    free(p);
    return n;
}

static const char *model_ext = "safetensors";   /* the input's format */

static char *model_path(int v) {
    char p[64];
    if (strcmp(model_ext, "diffusers") == 0) snprintf(p, sizeof p, "sd/v%d_diffusers", v);
    else snprintf(p, sizeof p, "sd/v%d_ldm.%s", v, model_ext);
    return test_path_join(data_dir, p);
}

static float *to_f32(lora_ctx *ctx, const struct lora_tensor *t) {
    int64_t n = tmap_numel(t);
    float *f = malloc((size_t)n * 4 + 4);
    net_to_f32(ctx, t->name, t->dtype, t->data, n, f);
    return f;
}

/* the streamed file against the in-memory merge, for one precision / save precision / format */
static void stream_vs_memory(lora_ctx *ctx, int v, lora_network **nets, const double *ratios, const char *prec,
                             const char *save, const char *ext) {
    char a[400], b[400];
    snprintf(a, sizeof a, "%s/mem_v%d_%s_%s.%s", tmp_dir, v, prec, *save ? save : "keep", ext);
    snprintf(b, sizeof b, "%s/stream_v%d_%s_%s.%s", tmp_dir, v, prec, *save ? save : "keep", ext);
    char *mp = model_path(v);
    lora_params *lo = NULL, *so = NULL;
    CHECK_STATUS(lora_params_create(ctx, &lo), LORA_OK);
    CHECK_STATUS(lora_params_create(ctx, &so), LORA_OK);
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_PRECISION, prec), LORA_OK);
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_SAVE_PRECISION, save), LORA_OK);
    CHECK_STATUS(lora_params_set_string(so, LORA_P_SAVE_PRECISION, save), LORA_OK);
    CHECK_STATUS(lora_params_set_string(so, LORA_P_SAVE_MODEL_AS, strcmp(ext, "ckpt") == 0 ? "ckpt" : "safetensors"),
                 LORA_OK);
    lora_dtype dt = strcmp(prec, "fp16") == 0 ? LORA_DTYPE_F16 : strcmp(prec, "bf16") == 0 ? LORA_DTYPE_BF16 : LORA_DTYPE_F32;
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, mp, NULL, &m), LORA_OK);
    CHECK_STATUS(lora_model_cast(m, dt), LORA_OK);
    CHECK_STATUS(lora_merge_into_model(m, (const lora_network *const *)nets, ratios, 2), LORA_OK);
    CHECK_STATUS(lora_model_save(m, a, so), LORA_OK);
    lora_model_free(m);
    lora_status s = lora_merge_file(ctx, mp, (const lora_network *const *)nets, ratios, 2, b, lo);
    CHECK_MSG(s == LORA_OK, "merge_file v%d %s %s %s: %s", v, prec, save, ext, lora_errmsg(ctx));
    int same = test_same_file(a, b);
    CHECK_MSG(same, "v%d precision %s save '%s' .%s: streamed file differs from the in-memory merge", v, prec, save, ext);
    if (same) printf("v%d .%-11s -> precision %-5s save %-5s .%-11s streamed == in-memory\n", v, model_ext, prec,
           *save ? save : "keep", ext);
    unlink(a);
    unlink(b);
    lora_params_free(lo);
    lora_params_free(so);
    free(mp);
}

/* the streamed float merge against kohya's merge_lora.py (same tolerance as test_ops) */
static void stream_vs_kohya(lora_ctx *ctx, int v, lora_network **nets, const double *ratios) {
    char out[400], fx[64];
    snprintf(out, sizeof out, "%s/kohya_v%d.safetensors", tmp_dir, v);
    snprintf(fx, sizeof fx, "ops/v%d_merge2.safetensors", v);
    char *mp = model_path(v), *fp = test_path_join(data_dir, fx);
    lora_params *lo = NULL;
    CHECK_STATUS(lora_params_create(ctx, &lo), LORA_OK);
    /* ratios from the params bag this time */
    CHECK_STATUS(lora_params_set_string(lo, LORA_P_RATIOS, "0.7, -0.3"), LORA_OK);
    CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)nets, NULL, 2, out, lo), LORA_OK);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, out, NULL, &m), LORA_OK);
    struct tensor_map f;
    tmap_init(&f, ctx);
    CHECK_STATUS(st_read_map(ctx, fp, &f, NULL), LORA_OK);
    int64_t bad = 0, cmp = 0;
    double worst = 0;
    for (int64_t i = 0; m && i < f.n; i++) {
        const char *nm = f.t[i].name;
        int te = strncmp(nm, "te.", 3) == 0;
        struct tensor_map *mp2 = te ? &m->sd.te : &m->sd.unet;
        int64_t w = tmap_find(mp2, nm + (te ? 3 : 5));
        if (w < 0) { bad++; continue; }
        float *a = to_f32(ctx, &mp2->t[w]), *b = to_f32(ctx, &f.t[i]);
        int64_t n = tmap_numel(&f.t[i]);
        double num = 0, den = 0;
        for (int64_t e = 0; e < n; e++) { num += ((double)a[e] - b[e]) * ((double)a[e] - b[e]); den += (double)b[e] * b[e]; }
        double r = den > 0 ? sqrt(num / den) : sqrt(num);
        if (r > worst) worst = r;
        bad += r > 1e-6;
        cmp++;
        free(a);
        free(b);
    }
    CHECK_MSG(bad == 0 && cmp == f.n && cmp > 0, "v%d streamed merge vs kohya: %lld of %lld tensors differ (worst %g)", v,
              (long long)bad, (long long)cmp, worst);
    printf("v%d streamed merge vs kohya merge_lora.py: %lld tensors, worst relative error %.3g\n", v, (long long)cmp, worst);
    tmap_clear(&f);
    lora_model_free(m);
    lora_params_free(lo);
    unlink(out);
    free(mp);
    free(fp);
}

struct cancel_at { int64_t at, seen; };
static int32_t cancel_cb(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)total; (void)value;
    struct cancel_at *c = user;
    if (phase != LORA_PHASE_MERGE) return 0;
    c->seen = done;
    return done >= c->at;
}

static void test_cancel(lora_ctx *ctx, lora_network **nets, const double *ratios) {
    char out[400];
    char *mp = model_path(1);
    for (int ck = 0; ck <= 1; ck++) {
        snprintf(out, sizeof out, "%s/cancelled.%s", tmp_dir, ck ? "ckpt" : "safetensors");
        struct cancel_at c = {5, 0};
        lora_ctx_set_progress(ctx, cancel_cb, &c);
        CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)nets, ratios, 2, out, NULL), LORA_E_CANCELLED);
        lora_ctx_set_progress(ctx, NULL, NULL);
        struct stat sb;
        CHECK_MSG(stat(out, &sb) != 0, "cancelled merge left %s", out);
        CHECK_MSG(test_temp_files(tmp_dir) == 0, "cancelled merge left a temp file in %s", tmp_dir);
        CHECK_MSG(c.seen == 5, "progress stopped at %lld", (long long)c.seen);
    }
    /* bad arguments: same path in and out, wrong ratio count */
    CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)nets, ratios, 2, mp, NULL), LORA_E_INVALID_ARG);
    lora_params *lo = NULL;
    lora_params_create(ctx, &lo);
    lora_params_set_string(lo, LORA_P_RATIOS, "1");
    snprintf(out, sizeof out, "%s/never.safetensors", tmp_dir);
    CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)nets, NULL, 2, out, lo), LORA_E_CONFIG_RANGE);
    lora_params_free(lo);
    /* a non-finite ratio, an output folder that does not exist: an error naming it, no file */
    double bad[2] = {NAN, 1.0};
    CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)nets, bad, 2, out, NULL), LORA_E_CONFIG_RANGE);
    char nodir[400];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir/out.safetensors", tmp_dir);
    lora_status s = lora_merge_file(ctx, mp, (const lora_network *const *)nets, ratios, 2, nodir, NULL);
    CHECK_MSG(s != LORA_OK && strstr(lora_errmsg(ctx), "no/such/dir") != NULL, "unwritable output: %s", lora_errmsg(ctx));
    /* a network none of whose modules names a target: nothing fits */
    lora_network *n2 = NULL;
    char *v1net = test_path_join(data_dir, "network/v1_kohya.safetensors");
    CHECK_STATUS(lora_network_load(ctx, v1net, &n2), LORA_OK);
    for (int64_t i = 0; n2 && i < n2->n; i++) n2->m[i].name[5] = 'X';   /* lora_Xnet_... / lora_Xe_... */
    const double one = 1.0;
    CHECK_STATUS(lora_merge_file(ctx, mp, (const lora_network *const *)&n2, &one, 1, out, NULL), LORA_E_NO_MATCHING_KEYS);
    struct stat sb;
    CHECK_MSG(stat(out, &sb) != 0 && test_temp_files(tmp_dir) == 0, "failed merges left files in %s", tmp_dir);
    unlink(out);
    lora_network_free(n2);
    free(v1net);
    free(mp);
}

/* ops_from_f32 (F16C where the CPU has it) equals the scalar lora_f32_to_f16 on every bit pattern
 * class: zeros, subnormals, ties, the overflow edge, infinities, NaNs (canonical quiet NaN), and
 * 4M random patterns (the whole 2^32 range was checked once when the F16C path was added). */
static void test_f16_conversion(void) {
    int64_t n = 1 << 22;
    uint32_t *bits = malloc((size_t)n * 4);
    uint16_t *h = malloc((size_t)n * 2);
    static const uint32_t edge[] = {0, 0x80000000u, 1, 0x00400000u, 0x33000000u, 0x33000001u, 0x337fffffu, 0x38800000u,
                                    0x387fffffu, 0x38801000u, 0x38803000u, 0x477fefffu, 0x477ff000u, 0x7f800000u,
                                    0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffbfffffu, 0x3f800000u, 0x3f801000u};
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int64_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        bits[i] = i < (int64_t)(sizeof edge / sizeof *edge) ? edge[i] : (uint32_t)x;
    }
    ops_from_f32(LORA_DTYPE_F16, (const float *)bits, n, h, 2);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float f;
        memcpy(&f, &bits[i], 4);
        bad += h[i] != lora_f32_to_f16(f);
    }
    CHECK_MSG(bad == 0, "ops_from_f32 F16: %lld of %lld values differ from lora_f32_to_f16", (long long)bad, (long long)n);
    free(bits);
    free(h);
}

int main(void) {
    test_f16_conversion();
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) data_dir = "tests/data";
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/lora_test_merge_stream_%d", (int)getpid());
    mkdir(tmp_dir, 0700);
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    double ratios[2] = {0.7, -0.3};
    for (int v = 1; v <= 2; v++) {
        lora_network *nets[2];
        nets[0] = load_net(ctx, v == 1 ? "network/v1_kohya.safetensors" : "network/v2_kohya.safetensors");
        nets[1] = load_net(ctx, v == 1 ? "network/v1_conv.safetensors" : "network/v2_kohya.safetensors");
        static const char *precs[3] = {"float", "fp16", "bf16"}, *saves[3] = {"", "fp16", "float"};
        for (int p = 0; p < 3; p++)
            for (int q = 0; q < 3; q++) stream_vs_memory(ctx, v, nets, ratios, precs[p], saves[q], "safetensors");
        stream_vs_memory(ctx, v, nets, ratios, "float", "fp16", "ckpt");
        stream_vs_memory(ctx, v, nets, ratios, "fp16", "", "ckpt");
        model_ext = "ckpt";   /* a torch zip input (mapped, tensors borrowed where aligned) */
        stream_vs_memory(ctx, v, nets, ratios, "float", "fp16", "safetensors");
        stream_vs_memory(ctx, v, nets, ratios, "bf16", "", "ckpt");
        model_ext = "diffusers";   /* a diffusers folder (v2: OpenCLIP's extra tensors made up) */
        stream_vs_memory(ctx, v, nets, ratios, "float", "fp16", "safetensors");
        stream_vs_memory(ctx, v, nets, ratios, "fp16", "", "safetensors");
        model_ext = "safetensors";
        stream_vs_kohya(ctx, v, nets, ratios);
        if (v == 1) test_cancel(ctx, nets, ratios);
        lora_network_free(nets[0]);
        lora_network_free(nets[1]);
    }
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    rmdir(tmp_dir);
    return test_finish("test_merge_stream");
}
