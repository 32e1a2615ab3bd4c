/* lora_model: the tiny SD v1/v2 fixtures (tests/reference/make_sd_fixtures.py, written by
 * diffusers 0.10.2 / transformers 4.25.1 and torch) give identical tensors from their LDM
 * .safetensors, .ckpt and diffusers forms; conversions between all forms are lossless; the
 * files we write are byte-identical to those the reference libraries were shown to load
 * (tests/reference/check_our_models.py -> python_reads_our_models.json); bad inputs fail with
 * their specific status. */
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "internal.h"
#include "core/dtype.h"
#include "io/diffusers.h"
#include "model/sd_model.h"
#include "../test.h"


static lora_ctx *ctx;
static char data[2048], tmp[64];

static const char *dpath(const char *rel) {
    static char buf[4][4096];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/sd/%s", data, rel);
    return buf[k];
}

static const char *tpath(const char *rel) {
    static char buf[4][4096];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmp, rel);
    return buf[k];
}

static int maps_equal(const char *what, const struct tensor_map *a, const struct tensor_map *b) {
    if (a->n != b->n) {
        fprintf(stderr, "%s: %lld vs %lld tensors\n", what, (long long)a->n, (long long)b->n);
        return 0;
    }
    for (int64_t i = 0; i < a->n; i++) {
        int64_t j = tmap_find(b, a->t[i].name);
        if (j < 0) {
            fprintf(stderr, "%s: %s missing\n", what, a->t[i].name);
            return 0;
        }
        const struct lora_tensor *x = &a->t[i], *y = &b->t[j];
        if (x->dtype != y->dtype || x->ndim != y->ndim || x->nbytes != y->nbytes ||
            memcmp(x->shape, y->shape, sizeof(int64_t) * (size_t)x->ndim) != 0 ||
            (x->nbytes && memcmp(x->data, y->data, (size_t)x->nbytes) != 0)) {
            fprintf(stderr, "%s: %s differs\n", what, x->name);
            return 0;
        }
    }
    return 1;
}

static int models_equal(const char *what, const lora_model *a, const lora_model *b) {
    char w[256];
    snprintf(w, sizeof w, "%s unet", what);
    int ok = maps_equal(w, &a->sd.unet, &b->sd.unet);
    snprintf(w, sizeof w, "%s vae", what);
    ok &= maps_equal(w, &a->sd.vae, &b->sd.vae);
    snprintf(w, sizeof w, "%s text encoder", what);
    ok &= maps_equal(w, &a->sd.te, &b->sd.te);
    return ok;
}

static lora_model *load(const char *path, int v2, int vpred) {
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_int(p, LORA_P_V2, v2);
    lora_params_set_int(p, LORA_P_V_PARAMETERIZATION, vpred);
    lora_model *m = NULL;
    lora_status s = lora_model_load(ctx, path, p, &m);
    CHECK_MSG(s == LORA_OK, "load %s: %s %s", path, lora_status_name(s), lora_errmsg(ctx));
    lora_params_free(p);
    return m;
}

static lora_status save(const lora_model *m, const char *path, const char *as, const char *prec) {
    lora_params *p = NULL;
    lora_params_create(ctx, &p);
    lora_params_set_string(p, LORA_P_SAVE_MODEL_AS, as);
    lora_params_set_string(p, LORA_P_SAVE_PRECISION, prec);
    lora_status s = lora_model_save(m, path, p);
    lora_params_free(p);
    return s;
}

static uint64_t fnv1a64(const char *path) {
    size_t n = 0;
    uint8_t *b = test_slurp(path, &n);
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; b && i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    free(b);
    return b ? h : 0;
}

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

static void copy_file(const char *from, const char *to) {
    size_t n = 0;
    uint8_t *b = test_slurp(from, &n);
    FILE *f = fopen(to, "wb");
    if (f && b) fwrite(b, 1, n, f);
    if (f) fclose(f);
    free(b);
}

static json_t *config_of(const char *rel) {
    json_error_t e;
    json_t *j = json_load_file(dpath(rel), 0, &e);
    CHECK_MSG(j != NULL, "%s: %s", rel, e.text);
    return j;
}

static void version_case(const char *v, json_t *pyjson) {
    int v2 = strcmp(v, "v2") == 0;
    char rel[256];
    snprintf(rel, sizeof rel, "%s_ldm.safetensors", v);
    lora_model *st = load(dpath(rel), v2, v2);
    snprintf(rel, sizeof rel, "%s_ldm.ckpt", v);
    lora_model *ck = load(dpath(rel), v2, v2);
    snprintf(rel, sizeof rel, "%s_diffusers", v);
    lora_model *df = load(dpath(rel), 0, 0);
    if (!st || !ck || !df) goto out;

    /* the same networks from every form */
    CHECK(models_equal("ldm safetensors vs ckpt", st, ck));
    CHECK(maps_equal("ldm safetensors vs ckpt extra", &st->sd.extra, &ck->sd.extra));
    CHECK(models_equal("ldm vs diffusers", st, df));

    /* facts against the diffusers configs the fixture script wrote */
    snprintf(rel, sizeof rel, "%s_diffusers/unet/config.json", v);
    json_t *uc = config_of(rel);
    snprintf(rel, sizeof rel, "%s_diffusers/text_encoder/config.json", v);
    json_t *tc = config_of(rel);
    int64_t x;
    for (int k = 0; k < 3; k++) {
        lora_model *m = k == 0 ? st : k == 1 ? ck : df;
        CHECK(lora_model_get_int(m, LORA_MODEL_SD_VERSION, &x) == LORA_OK && x == (v2 ? 2 : 1));
        CHECK(lora_model_get_int(m, LORA_MODEL_PREDICTION, &x) == LORA_OK && x == v2);   /* v2 fixture: v-pred */
        CHECK(lora_model_get_int(m, LORA_MODEL_CONTEXT_DIM, &x) == LORA_OK &&
              x == json_integer_value(json_object_get(uc, "cross_attention_dim")));
        CHECK(lora_model_get_int(m, LORA_MODEL_UNET_CHANNELS, &x) == LORA_OK &&
              x == json_integer_value(json_array_get(json_object_get(uc, "block_out_channels"), 0)));
        CHECK(lora_model_get_int(m, LORA_MODEL_LINEAR_PROJECTION, &x) == LORA_OK &&
              x == json_is_true(json_object_get(uc, "use_linear_projection")));
        CHECK(lora_model_get_int(m, LORA_MODEL_TE_LAYERS, &x) == LORA_OK &&
              x == json_integer_value(json_object_get(tc, "num_hidden_layers")));
        CHECK(lora_model_get_int(m, LORA_MODEL_TE_HIDDEN, &x) == LORA_OK &&
              x == json_integer_value(json_object_get(tc, "hidden_size")));
        CHECK(lora_model_get_int(m, LORA_MODEL_DTYPE, &x) == LORA_OK && x == LORA_DTYPE_F16);
    }
    CHECK(lora_model_get_int(st, LORA_MODEL_FORMAT, &x) == LORA_OK && x == LORA_FORMAT_SAFETENSORS);
    CHECK(lora_model_get_int(ck, LORA_MODEL_FORMAT, &x) == LORA_OK && x == LORA_FORMAT_CKPT);
    CHECK(lora_model_get_int(df, LORA_MODEL_FORMAT, &x) == LORA_OK && x == LORA_FORMAT_DIFFUSERS_SAFETENSORS);
    CHECK(lora_model_get_int(st, 999, &x) == LORA_E_UNKNOWN_KEY);
    json_decref(uc);
    json_decref(tc);

    /* conversions: today's files are the ones Python loaded (hashes), and they load back */
    json_t *files = json_object_get(json_object_get(json_object_get(pyjson, "models"), v), "files");
    CHECK(json_object_size(files) > 10);
    static const char *const fmts[4] = {"safetensors", "ckpt", "diffusers", "diffusers_safetensors"};
    for (int f = 0; f < 4; f++) {
        int folder = f >= 2;
        const lora_model *src = folder ? df : st;
        char out[256];
        snprintf(out, sizeof out, "%s_%s", v, fmts[f]);
        CHECK_STATUS(save(src, tpath(out), fmts[f], ""), LORA_OK);
        const char *key;
        json_t *val;
        int matched = 0;
        json_object_foreach(files, key, val) {
            size_t fl = strlen(fmts[f]);
            const char *rest = NULL;
            if (!folder && strcmp(key, fmts[f]) == 0) rest = "";
            else if (folder && strncmp(key, fmts[f], fl) == 0 && key[fl] == '/') rest = key + fl;
            if (!rest) continue;
            char p[4096];
            snprintf(p, sizeof p, "%s%s", tpath(out), rest);
            char hex[17];
            snprintf(hex, sizeof hex, "%016llx", (unsigned long long)fnv1a64(p));
            CHECK_MSG(strcmp(hex, json_string_value(val)) == 0, "%s: %s written today differs from the file Python loaded",
                      v, key);
            matched++;
        }
        CHECK_MSG(matched == (folder ? 8 : 1), "%s %s: %d files compared", v, fmts[f], matched);
        lora_model *back = load(tpath(out), v2, v2);
        if (back) {
            CHECK(models_equal(out, back, src));
            if (!folder) CHECK(maps_equal("extra", &back->sd.extra, &src->sd.extra));
            lora_model_free(back);
        }
    }
    /* a single file written back is the fixture itself, byte for byte */
    snprintf(rel, sizeof rel, "%s_ldm.safetensors", v);
    char ours[128];
    snprintf(ours, sizeof ours, "%s_safetensors", v);
    size_t na = 0, nb = 0;
    uint8_t *a = test_slurp(dpath(rel), &na), *b = test_slurp(tpath(ours), &nb);
    CHECK_MSG(a && b && na == nb && memcmp(a, b, na) == 0, "%s: LDM -> LDM is not byte-identical", v);
    free(a);
    free(b);

    /* save_precision: fp16 -> float is exact, and float -> fp16 gives the fp16 file back */
    char f32[128], f16[128];
    snprintf(f32, sizeof f32, "%s_f32.safetensors", v);
    snprintf(f16, sizeof f16, "%s_f16.safetensors", v);
    CHECK_STATUS(save(st, tpath(f32), "safetensors", "float"), LORA_OK);
    lora_model *wide = load(tpath(f32), v2, v2);
    if (wide) {
        int64_t i = tmap_find(&wide->sd.unet, "conv_in.weight"), j = tmap_find(&st->sd.unet, "conv_in.weight");
        CHECK(i >= 0 && j >= 0 && wide->sd.unet.t[i].dtype == LORA_DTYPE_F32);
        if (i >= 0 && j >= 0) {
            const float *w = wide->sd.unet.t[i].data;
            const uint16_t *h = st->sd.unet.t[j].data;
            int bad = 0;
            for (int64_t k = 0; k < tmap_numel(&st->sd.unet.t[j]); k++) bad += w[k] != lora_f16_to_f32(h[k]);
            CHECK(bad == 0);
        }
        CHECK_STATUS(save(wide, tpath(f16), "safetensors", "fp16"), LORA_OK);
        lora_model_free(wide);
        /* the networks come back bit-exact (float extras such as the DDPM buffer are cast as
         * well, as kohya's --save_precision does, so they are not compared) */
        lora_model *narrow = load(tpath(f16), v2, v2);
        if (narrow) {
            CHECK(models_equal("f16 -> f32 -> f16", narrow, st));
            lora_model_free(narrow);
        }
    }

    /* a tiny LDM model cannot become a diffusers folder: its head counts are not stored */
    char dd[128];
    snprintf(dd, sizeof dd, "%s_from_ldm", v);
    CHECK_STATUS(save(st, tpath(dd), "diffusers_safetensors", ""), LORA_E_UNSUPPORTED);
    CHECK(strstr(lora_errmsg(ctx), "head") != NULL);
    struct stat sb;
    CHECK(stat(tpath(dd), &sb) != 0);
out:
    lora_model_free(st);
    lora_model_free(ck);
    lora_model_free(df);
}

int main(void) {
    const char *d = getenv("LORA_TEST_DATA");
    snprintf(data, sizeof data, "%s", d ? d : "tests/data");
    snprintf(tmp, sizeof tmp, "/tmp/lora-model-XXXXXX");
    CHECK(mkdtemp(tmp) != NULL);
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);

    char ref[4096];
    snprintf(ref, sizeof ref, "%s/python_reads_our_models.json", getenv("LORA_REFERENCE_DIR") ? getenv("LORA_REFERENCE_DIR")
                                                                                                : "tests/reference");
    json_error_t e;
    json_t *py = json_load_file(ref, 0, &e);
    CHECK_MSG(py != NULL, "%s: %s", ref, e.text);
    version_case("v1", py);
    version_case("v2", py);
    json_decref(py);

    /* v1 diffusers folder with .bin weights only loads the same as with .safetensors */
    static const char *const comps[3][2] = {{"unet", "diffusion_pytorch_model.bin"}, {"vae", "diffusion_pytorch_model.bin"},
                                           {"text_encoder", "pytorch_model.bin"}};
    mkdir(tpath("v1_bin"), 0777);
    char p[512];
    copy_file(dpath("v1_diffusers/model_index.json"), tpath("v1_bin/model_index.json"));
    for (int c = 0; c < 3; c++) {
        snprintf(p, sizeof p, "v1_bin/%s", comps[c][0]);
        mkdir(tpath(p), 0777);
        char from[512], to[512];
        snprintf(from, sizeof from, "v1_diffusers/%s/config.json", comps[c][0]);
        snprintf(to, sizeof to, "v1_bin/%s/config.json", comps[c][0]);
        copy_file(dpath(from), tpath(to));
        snprintf(from, sizeof from, "v1_diffusers/%s/%s", comps[c][0], comps[c][1]);
        snprintf(to, sizeof to, "v1_bin/%s/%s", comps[c][0], comps[c][1]);
        copy_file(dpath(from), tpath(to));
    }
    lora_model *bin = load(tpath("v1_bin"), 0, 0), *st = load(dpath("v1_diffusers"), 0, 0);
    int64_t fmt = 0;
    if (bin && st) {
        CHECK(models_equal("diffusers .bin vs .safetensors", bin, st));
        CHECK(lora_model_get_int(bin, LORA_MODEL_FORMAT, &fmt) == LORA_OK && fmt == LORA_FORMAT_DIFFUSERS);
    }

    /* bad inputs */
    lora_model *m = (lora_model *)&m;
    remove_tree(tpath("v1_bin/vae"));
    CHECK_STATUS(lora_model_load(ctx, tpath("v1_bin"), NULL, &m), LORA_E_NOT_FOUND);
    CHECK(m == NULL && strstr(lora_errmsg(ctx), "vae") != NULL);
    lora_params *p2 = NULL;
    lora_params_create(ctx, &p2);
    lora_params_set_int(p2, LORA_P_V2, 1);
    CHECK_STATUS(lora_model_load(ctx, dpath("v1_ldm.safetensors"), p2, &m), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "v2") != NULL);
    lora_params_free(p2);
    char notmodel[4096];
    snprintf(notmodel, sizeof notmodel, "%s/py_all_dtypes.safetensors", data);
    lora_status s = lora_model_load(ctx, notmodel, NULL, &m);
    CHECK_MSG(s == LORA_E_NOT_A_MODEL, "a non-model file: %s", lora_status_name(s));
    CHECK(strstr(lora_errmsg(ctx), "py_all_dtypes") != NULL);
    CHECK_STATUS(lora_model_load(ctx, tpath("does-not-exist.ckpt"), NULL, &m), LORA_E_NOT_FOUND);
    mkdir(tpath("plain_dir"), 0777);
    CHECK_STATUS(lora_model_load(ctx, tpath("plain_dir"), NULL, &m), LORA_E_NOT_A_MODEL);
    /* a diffusers save never merges into an existing non-empty folder */
    if (st) {
        mkdir(tpath("busy"), 0777);
        copy_file(dpath("v1_diffusers/model_index.json"), tpath("busy/keep.json"));
        CHECK_STATUS(save(st, tpath("busy"), "diffusers", ""), LORA_E_DEST_BUSY);
        CHECK(access(tpath("busy/keep.json"), F_OK) == 0 && access(tpath("busy/unet"), F_OK) != 0);
        CHECK_STATUS(save(st, tpath("plain_dir"), "diffusers", ""), LORA_OK);   /* empty: fine */
    }
    lora_model_free(bin);
    lora_model_free(st);
    lora_model_free(NULL);

    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK_MSG(host == 0, "%llu bytes still allocated", (unsigned long long)host);
    lora_ctx_free(ctx);
    remove_tree(tmp);
    return test_finish("test_model");
}
