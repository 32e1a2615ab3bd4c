/* lora_network: kohya's module list, init, save/load round trips, kohya-written files
 * (tests/data/network, made by tests/reference/make_network_fixtures.py with sd-scripts
 * 75d1883d), coverage, merge against kohya's merge_lora.py, bad inputs, leaks. */
#include <stdlib.h>
#include <unistd.h>

#include "core/dtype.h"

#include "io/st_map.h"
#include "network/network.h"
#include "../test.h"

static const char *data_dir;
static char tmpdir[256];

static char *dpath(const char *name) { return test_path_join(data_dir, name); }

static lora_model *load_model(lora_ctx *ctx, int v) {
    char p[512];
    snprintf(p, sizeof p, "%s/sd/v%d_diffusers", data_dir, v);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, p, NULL, &m), LORA_OK);
    return m;
}

static struct tensor_map read_map(lora_ctx *ctx, const char *path) {
    struct tensor_map m;
    tmap_init(&m, ctx);
    lora_status s = st_read_map(ctx, path, &m, NULL);
    CHECK_MSG(s == LORA_OK, "%s: %s", path, lora_errmsg(ctx));
    return m;
}

/* kohya merges in float; the tiny models hold fp16 weights, so its result is compared after
 * rounding to the weight's dtype, as our merge stores it. */
static double round_to(lora_dtype dt, double b) {
    if (dt == LORA_DTYPE_F16) return lora_f16_to_f32(lora_f32_to_f16((float)b));
    if (dt == LORA_DTYPE_BF16) return lora_bf16_to_f32(lora_f32_to_bf16((float)b));
    return b;
}

static float tval(lora_ctx *ctx, const struct lora_tensor *t, int64_t i) {
    float v = 0;
    net_to_f32(ctx, t->name, t->dtype, (const char *)t->data + i * (lora_dtype_bits(t->dtype) / 8), 1, &v);
    return v;
}

/* Network `net` holds exactly the modules, shapes and (when `values`) values of the file map. */
static void compare_to_file(lora_ctx *ctx, const struct lora_network *net, const struct tensor_map *f, int values) {
    int64_t n_down = 0, bad = 0;
    for (int64_t i = 0; i < f->n; i++) {
        const struct lora_tensor *t = &f->t[i];
        const char *dot = strchr(t->name, '.');
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(dot - t->name), t->name);
        int64_t k = net_find(net, name);
        if (k < 0) { bad++; fprintf(stderr, "missing module %s\n", name); continue; }
        const struct net_module *m = &net->m[k];
        if (strcmp(dot, ".alpha") == 0) {
            if (values && fabs(m->alpha - tval(ctx, t, 0)) > 0) bad++;
            continue;
        }
        int down = strcmp(dot, ".lora_down.weight") == 0;
        n_down += down;
        int64_t want[4] = {down ? m->rank : m->out, down ? m->in : m->rank, down ? m->kh : 1, down ? m->kw : 1};
        int nd = down ? m->down_ndim : m->up_ndim;
        if (t->ndim != nd) { bad++; fprintf(stderr, "%s: ndim %d vs %d\n", t->name, t->ndim, nd); continue; }
        for (int d = 0; d < nd; d++)
            if (t->shape[d] != want[d]) { bad++; fprintf(stderr, "%s: dim %d\n", t->name, d); }
        if (values) {
            const float *src = down ? m->down : m->up;
            for (int64_t e = 0; e < tmap_numel(t); e++)
                if (src[e] != tval(ctx, t, e)) { bad++; break; }
        }
    }
    CHECK_MSG(bad == 0, "%lld differences", (long long)bad);
    CHECK(n_down == net->n);
}

static void test_create(lora_ctx *ctx, int v) {
    lora_model *model = load_model(ctx, v);
    if (!model) return;
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, 2);
    lora_params_set_float(p, LORA_P_NETWORK_ALPHA, 2.0);
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_create(model, p, &net), LORA_OK);
    char f[64];
    snprintf(f, sizeof f, "network/v%d_kohya.safetensors", v);
    char *path = dpath(f);
    struct tensor_map km = read_map(ctx, path);
    CHECK(km.n == 3 * net->n);
    compare_to_file(ctx, net, &km, 0);
    int64_t te = 0, un = 0;
    lora_network_get_int(net, LORA_NETWORK_TE_MODULES, &te);
    lora_network_get_int(net, LORA_NETWORK_UNET_MODULES, &un);
    CHECK(un == 192);
    CHECK(te == (v == 1 ? 18 : 12));
    /* init: |down| <= 1/sqrt(fan_in), up zero, alpha 2 */
    int bad = 0;
    for (int64_t i = 0; i < net->n; i++) {
        const struct net_module *m = &net->m[i];
        double b = 1.0 / sqrt((double)(m->in * m->kh * m->kw));
        for (int64_t e = 0; e < m->rank * m->in * m->kh * m->kw; e++) bad += fabs(m->down[e]) > b * (1 + 1e-6);
        for (int64_t e = 0; e < m->out * m->rank; e++) bad += m->up[e] != 0.0f;
        bad += m->alpha != 2.0;
    }
    CHECK(bad == 0);
    /* the same numbers as torch.manual_seed(1234) + kohya create_network */
    snprintf(f, sizeof f, "network/v%d_init.safetensors", v);
    char *ip = dpath(f);
    struct tensor_map im = read_map(ctx, ip);
    int64_t cmp = 0;
    for (int64_t i = 0; i < im.n; i++) {
        const struct lora_tensor *t = &im.t[i];
        if (!strstr(t->name, ".lora_down.")) continue;
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(strchr(t->name, '.') - t->name), t->name);
        int64_t k = net_find(net, name);
        CHECK(k >= 0);
        if (k < 0) continue;
        int64_t diff = 0;
        for (int64_t e = 0; e < tmap_numel(t); e++) diff += net->m[k].down[e] != tval(ctx, t, e);
        CHECK_MSG(diff == 0, "%s: %lld elements differ from kohya's init", name, (long long)diff);
        cmp++;
    }
    CHECK(cmp == 3);
    tmap_clear(&im);
    free(ip);
    /* unet only / conv_dim counts */
    lora_network *n2 = NULL;
    lora_params_set_int(p, LORA_P_NETWORK_TRAIN_UNET_ONLY, 1);
    lora_params_set_int(p, LORA_P_CONV_DIM, 1);
    CHECK_STATUS(lora_network_create(model, p, &n2), LORA_OK);
    lora_network_get_int(n2, LORA_NETWORK_TE_MODULES, &te);
    lora_network_get_int(n2, LORA_NETWORK_UNET_MODULES, &un);
    CHECK(te == 0 && un == 278);
    lora_network_free(n2);
    tmap_clear(&km);
    free(path);
    lora_network_free(net);
    lora_params_free(p);
    lora_model_free(model);
}

static void test_conv_file(lora_ctx *ctx) {
    lora_model *model = load_model(ctx, 1);
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_int(p, LORA_P_NETWORK_DIM, 1);
    lora_params_set_float(p, LORA_P_NETWORK_ALPHA, 2.0);
    lora_params_set_int(p, LORA_P_CONV_DIM, 1);
    lora_network *net = NULL, *kn = NULL;
    CHECK_STATUS(lora_network_create(model, p, &net), LORA_OK);
    char *path = dpath("network/v1_conv.safetensors");
    struct tensor_map km = read_map(ctx, path);
    CHECK(km.n == 3 * net->n);
    compare_to_file(ctx, net, &km, 0);
    CHECK_STATUS(lora_network_load(ctx, path, &kn), LORA_OK);
    if (kn) {
        compare_to_file(ctx, kn, &km, 1);
        int64_t c = 0;
        lora_network_get_int(kn, LORA_NETWORK_CONV3X3_MODULES, &c);
        CHECK(c == 50);
        double ca = 0;
        lora_network_get_float(kn, LORA_NETWORK_CONV_ALPHA, &ca);
        CHECK(ca == 1.0);
        /* merge, conv 3x3 / 1x1 / linear, against kohya's merge_lora.py */
        CHECK_STATUS(lora_model_merge_network(model, kn, 1.0), LORA_OK);
        char *mp = dpath("network/v1_conv_merged.safetensors");
        struct tensor_map mm = read_map(ctx, mp);
        for (int64_t i = 0; i < mm.n; i++) {
            const struct lora_tensor *t = &mm.t[i];
            int64_t w = tmap_find(&model->sd.unet, t->name + 5);
            CHECK(w >= 0);
            if (w < 0) continue;
            double num = 0, den = 0;
            for (int64_t e = 0; e < tmap_numel(t); e++) {
                double a = tval(ctx, &model->sd.unet.t[w], e), b = round_to(model->sd.unet.t[w].dtype, tval(ctx, t, e));
                num += (a - b) * (a - b);
                den += b * b;
            }
            CHECK_MSG(sqrt(num / den) < 1e-6, "%s: rel %g", t->name, sqrt(num / den));
        }
        tmap_clear(&mm);
        free(mp);
    }
    lora_network_free(kn);
    lora_network_free(net);
    tmap_clear(&km);
    free(path);
    lora_params_free(p);
    lora_model_free(model);
}

static void test_kohya_files(lora_ctx *ctx, int v) {
    char f[64];
    snprintf(f, sizeof f, "network/v%d_kohya.safetensors", v);
    char *path = dpath(f);
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_load(ctx, path, &net), LORA_OK);
    if (!net) { free(path); return; }
    struct tensor_map km = read_map(ctx, path);
    compare_to_file(ctx, net, &km, 1);
    char buf[64];
    CHECK_STATUS(lora_network_metadata_get(net, "ss_output_name", buf, sizeof buf, NULL), LORA_OK);
    CHECK(strcmp(buf, "fixture") == 0);
    /* save -> load: bit exact incl. alpha and metadata */
    char out[512];
    snprintf(out, sizeof out, "%s/rt_v%d.safetensors", tmpdir, v);
    CHECK_STATUS(lora_network_metadata_set(net, "ss_comment", "round trip"), LORA_OK);
    CHECK_STATUS(lora_network_save(net, out, NULL), LORA_OK);
    lora_network *n2 = NULL;
    CHECK_STATUS(lora_network_load(ctx, out, &n2), LORA_OK);
    if (n2) {
        compare_to_file(ctx, n2, &km, 1);
        CHECK_STATUS(lora_network_metadata_get(n2, "ss_comment", buf, sizeof buf, NULL), LORA_OK);
        CHECK(strcmp(buf, "round trip") == 0);
        CHECK_STATUS(lora_network_metadata_get(n2, "ss_network_module", buf, sizeof buf, NULL), LORA_OK);
        CHECK(strcmp(buf, "networks.lora") == 0);
        CHECK_STATUS(lora_network_metadata_get(n2, "ss_network_alpha", buf, sizeof buf, NULL), LORA_OK);
        CHECK(strcmp(buf, "2.0") == 0);
    }
    lora_network_free(n2);
    /* save precision: every tensor, alpha included */
    static const char *const prec[] = {"fp16", "bf16", "float"};
    static const lora_dtype pdt[] = {LORA_DTYPE_F16, LORA_DTYPE_BF16, LORA_DTYPE_F32};
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    for (int k = 0; k < 3; k++) {
        lora_params_set_string(p, LORA_P_SAVE_PRECISION, prec[k]);
        snprintf(out, sizeof out, "%s/p_%s.safetensors", tmpdir, prec[k]);
        CHECK_STATUS(lora_network_save(net, out, p), LORA_OK);
        struct tensor_map pm = read_map(ctx, out);
        int bad = 0;
        for (int64_t i = 0; i < pm.n; i++) bad += pm.t[i].dtype != pdt[k];
        CHECK(pm.n == km.n && bad == 0);
        int64_t a = tmap_find(&pm, net->m[0].name[0] ? "lora_unet_mid_block_attentions_0_proj_in.alpha" : "");
        CHECK(a >= 0 && pm.t[a].ndim == 0 && tval(ctx, &pm.t[a], 0) == 2.0f);
        tmap_clear(&pm);
    }
    lora_params_free(p);
    /* legacy file without alpha -> alpha = rank (scale 1) */
    struct tensor_map na;
    tmap_init(&na, ctx);
    for (int64_t i = 0; i < km.n; i++)
        if (!strstr(km.t[i].name, ".alpha"))
            tmap_add(&na, km.t[i].name, km.t[i].dtype, km.t[i].ndim, km.t[i].shape, km.t[i].data, km.t[i].nbytes, 1, 1);
    snprintf(out, sizeof out, "%s/noalpha.safetensors", tmpdir);
    CHECK_STATUS(st_write_map(ctx, out, &na, NULL, NULL, 0), LORA_OK);
    lora_network *n3 = NULL;
    CHECK_STATUS(lora_network_load(ctx, out, &n3), LORA_OK);
    if (n3) {
        double a = 0;
        lora_network_get_float(n3, LORA_NETWORK_ALPHA, &a);
        CHECK(a == 2.0 && n3->m[0].has_alpha == 0 && n3->m[0].nn.scale == 1.0f);
    }
    lora_network_free(n3);
    /* bad inputs: NaN, mismatched down/up, negative alpha */
    int64_t di = tmap_find(&na, "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight");
    ((float *)na.t[di].data)[1] = NAN;
    CHECK_STATUS(st_write_map(ctx, out, &na, NULL, NULL, 0), LORA_OK);
    CHECK_STATUS(lora_network_load(ctx, out, &n3), LORA_E_NONFINITE_INPUT);
    CHECK(strstr(lora_errmsg(ctx), "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight") != NULL);
    ((float *)na.t[di].data)[1] = 0;
    int64_t ui = tmap_find(&na, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight");
    na.t[ui].shape[0] *= na.t[ui].shape[1];
    na.t[ui].shape[1] = 1;
    CHECK_STATUS(st_write_map(ctx, out, &na, NULL, NULL, 0), LORA_OK);
    CHECK_STATUS(lora_network_load(ctx, out, &n3), LORA_E_SHAPE_MISMATCH);
    CHECK(strstr(lora_errmsg(ctx), "lora_te_text_model_encoder_layers_0_mlp_fc1") != NULL);
    tmap_clear(&na);
    /* merge against kohya's merge_lora.py */
    lora_model *model = load_model(ctx, v);
    int64_t mt = 0, un = 0, mis = 0;
    CHECK_STATUS(lora_network_coverage(net, model, &mt, &un, &mis), LORA_OK);
    CHECK(mt == net->n && un == 0 && mis == 0);
    CHECK_STATUS(lora_model_merge_network(model, net, 1.0), LORA_OK);
    snprintf(f, sizeof f, "network/v%d_merged.safetensors", v);
    char *mp = dpath(f);
    struct tensor_map mm = read_map(ctx, mp);
    for (int64_t i = 0; i < mm.n; i++) {
        const struct lora_tensor *t = &mm.t[i];
        int te = strncmp(t->name, "te.", 3) == 0;
        struct tensor_map *bm = te ? &model->sd.te : &model->sd.unet;
        int64_t w = tmap_find(bm, t->name + (te ? 3 : 5));
        CHECK(w >= 0);
        if (w < 0) continue;
        double num = 0, den = 0;
        for (int64_t e = 0; e < tmap_numel(t); e++) {
            double a = tval(ctx, &bm->t[w], e), b = round_to(bm->t[w].dtype, tval(ctx, t, e));
            num += (a - b) * (a - b);
            den += b * b;
        }
        CHECK_MSG(sqrt(num / den) < 1e-6, "%s: rel %g", t->name, sqrt(num / den));
    }
    tmap_clear(&mm);
    free(mp);
    lora_model_free(model);
    tmap_clear(&km);
    lora_network_free(net);
    free(path);
}

static void test_pt_and_foreign(lora_ctx *ctx) {
    char *path = dpath("network/v1_te_fp16.pt");
    lora_network *net = NULL;
    CHECK_STATUS(lora_network_load(ctx, path, &net), LORA_OK);
    if (net) {
        int64_t te = 0;
        lora_network_get_int(net, LORA_NETWORK_TE_MODULES, &te);
        CHECK(te == 18 && net->n == 18 && net->m[0].dtype == LORA_DTYPE_F16 &&
              net->m[0].alpha_dtype == LORA_DTYPE_F16 && net->m[0].alpha == 2.0);
        char out[512];
        snprintf(out, sizeof out, "%s/rt.pt", tmpdir);
        CHECK_STATUS(lora_network_save(net, out, NULL), LORA_OK);
        lora_network *n2 = NULL;
        CHECK_STATUS(lora_network_load(ctx, out, &n2), LORA_OK);
        int bad = !n2 || n2->n != net->n;
        for (int64_t i = 0; !bad && i < net->n; i++) {
            int64_t k = net_find(n2, net->m[i].name);
            bad += k < 0 || memcmp(n2->m[k].down, net->m[i].down, (size_t)(net->m[i].rank * net->m[i].in) * 4) != 0;
        }
        CHECK(bad == 0);
        lora_network_free(n2);
    }
    lora_network_free(net);
    free(path);
    /* SD-size LoRA on the tiny model: names match, shapes do not */
    path = dpath("py_lora_kohya.safetensors");
    lora_model *model = load_model(ctx, 1);
    CHECK_STATUS(lora_network_load(ctx, path, &net), LORA_OK);
    if (net && model) {
        int64_t mt = -1, un = -1, mis = -1;
        CHECK_STATUS(lora_network_coverage(net, model, &mt, &un, &mis), LORA_E_NO_MATCHING_KEYS);
        CHECK(mt == 0 && un + mis == net->n);
        CHECK(strstr(lora_errmsg(ctx), "lora_") != NULL);
    }
    lora_network_free(net);
    lora_model_free(model);
    free(path);
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) data_dir = "tests/data";
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora_test_network_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    for (int v = 1; v <= 2; v++) {
        test_create(ctx, v);
        test_kohya_files(ctx, v);
    }
    test_conv_file(ctx);
    test_pt_and_foreign(ctx);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu host bytes leaked", (unsigned long long)host);
    lora_ctx_free(ctx);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) { /* best effort */ }
    return test_finish("test_network");
}
