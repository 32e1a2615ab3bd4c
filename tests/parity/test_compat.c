/* LoRA files between liblora and kohya-ss sd-scripts (75d1883d), both ways, applied at run time
 * with lora_model_attach (tests/data/compat, made by tests/reference/make_compat_fixtures.py):
 *  - our files (written here: float, fp16, bf16, conv 3x3) are loaded by kohya's
 *    networks/lora.py create_network_from_weights and applied to the diffusers/transformers
 *    tiny v1/v2 models; the U-Net and text-encoder outputs at multiplier 1 and 0.5 equal what
 *    lora_model_attach gives here (relative L2 <= 1e-5), and the committed files are byte for
 *    byte what this writer produces now (so the fixture follows the writer);
 *  - files kohya wrote (create_network + save_weights: float, fp16, conv, without alpha) load
 *    here with kohya's module count and give kohya's outputs;
 *  - two networks at once (1.0 and -0.5), as gen_img chains them;
 *  - merge/extract/resize outputs of the `lora` tool that kohya's scripts loaded
 *    (compat_tools.json): our tool still writes the same bytes.
 * `test_compat --write DIR` writes our LoRA files (the fixture script calls it). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lora/lora.h"
#include "internal.h"
#include "io/safetensors.h"
#include "model/clip.h"
#include "network/network.h"
#include "backend/backend.h"
#include "../test.h"
#include "../ref_file.h"

#define OUT_TOL 1e-5

static const char *data_dir;
static char tmpdir[256];

/* Our files: version, file name, dim, alpha, conv_dim, conv_alpha, save precision, seed. */
struct ours {
    int v;
    const char *file;
    int dim;
    double alpha;
    int conv_dim;
    double conv_alpha;
    const char *prec;
    int seed;
};
static const struct ours OURS[] = {
    {1, "v1_ours_float.safetensors", 1, 1.0, 0, 0, "float", 11},
    {1, "v1_ours_fp16.safetensors", 2, 4.0, 0, 0, "fp16", 12},
    {1, "v1_ours_bf16.safetensors", 1, 0.5, 0, 0, "bf16", 13},
    {1, "v1_ours_conv.safetensors", 1, 1.0, 2, 1.0, "fp16", 14},
    {2, "v2_ours_float.safetensors", 1, 1.0, 0, 0, "float", 21},
    {2, "v2_ours_fp16.safetensors", 2, 4.0, 0, 0, "fp16", 22},
    {2, "v2_ours_bf16.safetensors", 1, 0.5, 0, 0, "bf16", 23},
    {2, "v2_ours_conv.safetensors", 1, 1.0, 2, 1.0, "fp16", 24},
};
#define N_OURS (sizeof OURS / sizeof *OURS)

static lora_model *load_model(lora_ctx *ctx, int v) {
    char p[512];
    snprintf(p, sizeof p, "%s/sd/v%d_diffusers", data_dir, v);
    lora_model *m = NULL;
    CHECK_STATUS(lora_model_load(ctx, p, NULL, &m), LORA_OK);
    return m;
}

/* Our network for case `o`: kohya's init from the seed (create), then every lora_up set by a
 * formula (a fresh network is a no-op), saved with the case's precision. */
static lora_status write_ours(lora_ctx *ctx, lora_model *model, const struct ours *o, const char *path) {
    lora_params *p = NULL;
    lora_network *net = NULL;
    LORA_TRY(lora_params_create(ctx, &p));
    lora_params_set_int(p, LORA_P_NETWORK_DIM, o->dim);
    lora_params_set_float(p, LORA_P_NETWORK_ALPHA, o->alpha);
    lora_params_set_int(p, LORA_P_CONV_DIM, o->conv_dim);
    if (o->conv_dim) lora_params_set_float(p, LORA_P_CONV_ALPHA, o->conv_alpha);
    lora_params_set_int(p, LORA_P_SEED, o->seed);
    lora_status s = lora_network_create(model, p, &net);
    if (s == LORA_OK) {
        for (int64_t k = 0; k < net->n; k++) {
            struct net_module *mm = &net->m[k];
            for (int64_t i = 0; i < mm->out * mm->rank; i++)
                mm->up[i] = (float)(((i * 7 + k * 5 + o->seed) % 23) - 11) / 32.0f;
        }
        lora_params_set_string(p, LORA_P_SAVE_PRECISION, o->prec);
        s = lora_network_save(net, path, p);
    }
    lora_network_free(net);
    lora_params_free(p);
    return s;
}

static int write_all(lora_ctx *ctx, const char *dir) {
    for (size_t i = 0; i < N_OURS; i++) {
        lora_model *m = load_model(ctx, OURS[i].v);
        if (!m) return 1;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, OURS[i].file);
        lora_status s = write_ours(ctx, m, &OURS[i], path);
        lora_model_free(m);
        if (s) {
            fprintf(stderr, "%s: %s\n", path, lora_errmsg(ctx));
            return 1;
        }
        printf("wrote %s\n", path);
    }
    return 0;
}

static int same_bytes(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    uint8_t *x = test_slurp(a, &na), *y = test_slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* ---- outputs through the public API and the CLIP internals ---------------------------------- */

struct inputs {
    const float *latent, *context, *t;
    int32_t *ids;
    int64_t n_latent, T, n_ids, ctx_dim;
};

static int get_inputs(const struct lora_file *f, int v, struct inputs *in) {
    char k[64];
    memset(in, 0, sizeof *in);
    snprintf(k, sizeof k, "v%d.latent", v);
    in->latent = ref_f32(f, k, &in->n_latent);
    int64_t nc = 0;
    snprintf(k, sizeof k, "v%d.context", v);
    in->context = ref_f32(f, k, &nc);
    snprintf(k, sizeof k, "v%d.timestep", v);
    in->t = ref_f32(f, k, NULL);
    int64_t rows = 0;
    snprintf(k, sizeof k, "v%d.ids", v);
    in->ids = ref_ids(f, k, &rows, &in->n_ids);
    if (!in->latent || !in->context || !in->t || !in->ids || rows != 1) return 0;
    in->T = 77;
    in->ctx_dim = nc / 77;
    return 1;
}

static void run_unet(lora_model *m, const struct inputs *in, float *out) {
    CHECK_STATUS(lora_model_unet_predict(m, in->latent, 1, 8, 8, in->t, in->context, in->T, out,
                                         (uint64_t)in->n_latent),
                 LORA_OK);
}

/* Text encoder last_hidden_state for the ids, from the model's current weights. */
static void run_te(lora_model *m, const struct inputs *in, float *out) {
    struct clip_model cm;
    memset(&cm, 0, sizeof cm);
    lora_status s = clip_init(&cm, m->ctx->backend, &m->sd.te, &m->sd.cfg);
    CHECK_STATUS(s, LORA_OK);
    if (s) return;
    /* runtime-attached networks act on the text encoder as low-rank branches */
    const struct nn_lora *te_lora[64 * CLIP_N_SLOTS];
    int64_t rank = 0;
    CHECK(cm.layers <= 64);
    CHECK_STATUS(attach_te_adapters(m, cm.layers, te_lora, &rank), LORA_OK);
    struct clip_plan p;
    CHECK_STATUS(clip_plan_init(&p, &cm, 1, in->n_ids, rank, 0), LORA_OK);
    CHECK_STATUS(clip_forward(&p, in->ids, rank ? te_lora : NULL, 1), LORA_OK);
    CHECK_STATUS(clip_download_output(&p, out, NULL), LORA_OK);
    clip_plan_free(&p);
    clip_free(&cm);
}

static double worst;

static void compare(const char *what, const float *got, const float *want, int64_t n) {
    if (!want) {
        CHECK_MSG(0, "%s: reference missing", what);
        return;
    }
    double r = rel_l2(got, want, n);
    if (r > worst) worst = r;
    CHECK_MSG(r <= OUT_TOL, "%s: relative L2 %.3e", what, r);
}

/* Attaches the networks of `files` with `mults` to a fresh model, checks the module counts
 * against kohya's, and compares U-Net and TE outputs with `key`.{unet,te}. */
static void check_case(lora_ctx *ctx, const struct lora_file *ref, int v, const char *const *files,
                       const double *mults, int n, const char *key, int set_half) {
    struct inputs in;
    CHECK(get_inputs(ref, v, &in));
    if (!in.ids) return;
    lora_model *m = load_model(ctx, v);
    lora_network *nets[4] = {0};
    int ok = m != NULL;
    for (int i = 0; i < n && ok; i++) {
        char *p = test_path_join(data_dir, files[i]);
        lora_status s = lora_network_load(ctx, p, &nets[i]);
        CHECK_MSG(s == LORA_OK, "%s: %s", p, lora_errmsg(ctx));
        free(p);
        if (s) { ok = 0; break; }
        /* kohya's module count for this file */
        char k[300];
        float cnt = -1;
        snprintf(k, sizeof k, "count.%s", files[i]);
        CHECK_MSG(ref_as_floats(ref, k, &cnt, 1) == 1, "%s missing", k);
        int64_t matched = -1, unused = -1, mism = -1;
        CHECK_STATUS(lora_network_coverage(nets[i], m, &matched, &unused, &mism), LORA_OK);
        CHECK_MSG(nets[i]->n == (int64_t)cnt && matched == (int64_t)cnt && unused == 0 && mism == 0,
                  "%s: %lld modules, %lld matched, %lld unused, %lld mismatched; kohya built %g", files[i],
                  (long long)nets[i]->n, (long long)matched, (long long)unused, (long long)mism, (double)cnt);
        CHECK_STATUS(lora_model_attach(m, nets[i], mults[i], LORA_APPLY_RUNTIME), LORA_OK);
    }
    float *u = calloc((size_t)in.n_latent, 4);
    float *te = calloc((size_t)(in.n_ids * 1024), 4);
    if (ok) {
        char k[300];
        for (int pass = 0; pass < (set_half ? 2 : 1); pass++) {
            if (pass == 1)
                for (int i = 0; i < n; i++) CHECK_STATUS(lora_model_set_multiplier(m, nets[i], 0.5 * mults[i]), LORA_OK);
            const char *mk = pass ? "m0.5" : "m1";
            run_unet(m, &in, u);
            snprintf(k, sizeof k, "%s.%s.unet", key, mk);
            compare(k, u, ref_f32(ref, k, NULL), in.n_latent);
            run_te(m, &in, te);
            snprintf(k, sizeof k, "%s.%s.te", key, mk);
            int64_t nt = 0;
            const float *want = ref_f32(ref, k, &nt);
            compare(k, te, want, nt);
        }
        /* detached: the base model's outputs again */
        CHECK_STATUS(lora_model_detach_all(m), LORA_OK);
        run_unet(m, &in, u);
        char bk[32];
        snprintf(bk, sizeof bk, "v%d.base.unet", v);
        compare(bk, u, ref_f32(ref, bk, NULL), in.n_latent);
    }
    for (int i = 0; i < n; i++) lora_network_free(nets[i]);
    lora_model_free(m);
    free(u);
    free(te);
    free(in.ids);
}

/* ---- the lora tool's outputs that kohya's scripts loaded ------------------------------------ */

static void check_tools(void) {
    char *list = test_path_join(data_dir, "compat/compat_tools.txt");
    FILE *f = fopen(list, "r");
    CHECK_MSG(f != NULL, "%s missing", list);
    free(list);
    if (!f) return;
    const char *tool = getenv("LORA_TOOL");
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        /* "<output file> <lora tool arguments with @DATA@ and @OUT@>" */
        line[strcspn(line, "\n")] = 0;
        if (!line[0] || line[0] == '#') continue;
        char *sp = strchr(line, ' ');
        if (!sp) continue;
        *sp = 0;
        const char *file = line;
        char cmd[16384], out[4400];
        snprintf(out, sizeof out, "%s/%s", tmpdir, file);
        size_t c = (size_t)snprintf(cmd, sizeof cmd, "'%s' ", tool ? tool : "lora");
        for (const char *a = sp + 1; *a && c < sizeof cmd - 5000;) {
            if (strncmp(a, "@DATA@", 6) == 0) { c += (size_t)snprintf(cmd + c, sizeof cmd - c, "%s", data_dir); a += 6; }
            else if (strncmp(a, "@OUT@", 5) == 0) { c += (size_t)snprintf(cmd + c, sizeof cmd - c, "%s", out); a += 5; }
            else if (strncmp(a, "@TMP@", 5) == 0) { c += (size_t)snprintf(cmd + c, sizeof cmd - c, "%s", tmpdir); a += 5; }
            else cmd[c++] = *a++;
        }
        cmd[c] = 0;
        snprintf(cmd + c, sizeof cmd - c, " > /dev/null 2>&1");
        int rc = system(cmd);
        CHECK_MSG(rc == 0, "%s failed (%d)", cmd, rc);
        if (strncmp(file, "tmp_", 4) == 0) continue;   /* an intermediate (removed at the end) */
        char committed[4400];
        snprintf(committed, sizeof committed, "%s/compat/%s", data_dir, file);
        int same = rc == 0 && same_bytes(out, committed);
        CHECK_MSG(same, "%s: the lora tool now writes other bytes than the file kohya's scripts loaded "
                  "(regenerate with make_compat_fixtures.py and re-check)", file);
        unlink(out);
        n += same;
    }
    fclose(f);
    char tmpm[600];
    snprintf(tmpm, sizeof tmpm, "%s/tmp_merged_model.safetensors", tmpdir);
    unlink(tmpm);
    CHECK(n >= 3);
    printf("lora tool outputs kohya loaded: %d files, same bytes\n", n);
}

int main(int argc, char **argv) {
    lora_ctx *ctx = NULL;
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    lora_ctx_set_threads(ctx, 1);
    data_dir = getenv("LORA_TEST_DATA");
    if (argc == 3 && strcmp(argv[1], "--write") == 0) {
        if (!data_dir) data_dir = "tests/data";
        int r = write_all(ctx, argv[2]);
        lora_ctx_free(ctx);
        return r;
    }
    if (!data_dir) {
        fprintf(stderr, "LORA_TEST_DATA not set\n");
        return 1;
    }
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora_test_compat_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;

    /* our writer still writes the committed bytes */
    CHECK(write_all(ctx, tmpdir) == 0);
    for (size_t i = 0; i < N_OURS; i++) {
        char a[600], b[600];
        snprintf(a, sizeof a, "%s/%s", tmpdir, OURS[i].file);
        snprintf(b, sizeof b, "%s/compat/%s", data_dir, OURS[i].file);
        CHECK_MSG(same_bytes(a, b), "%s: our writer's bytes differ from the committed file kohya loaded", OURS[i].file);
        unlink(a);
    }

    char *rp = test_path_join(data_dir, "compat/reference.safetensors");
    struct lora_file *ref = NULL;
    CHECK_STATUS(st_open(ctx, rp, &ref), LORA_OK);
    free(rp);
    if (ref) {
        /* base outputs first: the harness itself agrees with diffusers/transformers */
        for (int v = 1; v <= 2; v++) {
            struct inputs in;
            CHECK(get_inputs(ref, v, &in));
            lora_model *m = load_model(ctx, v);
            if (m && in.ids) {
                float *u = calloc((size_t)in.n_latent, 4), *te = calloc((size_t)(in.n_ids * 1024), 4);
                char k[32];
                run_unet(m, &in, u);
                snprintf(k, sizeof k, "v%d.base.unet", v);
                compare(k, u, ref_f32(ref, k, NULL), in.n_latent);
                run_te(m, &in, te);
                snprintf(k, sizeof k, "v%d.base.te", v);
                int64_t nt = 0;
                const float *w = ref_f32(ref, k, &nt);
                compare(k, te, w, nt);
                free(u);
                free(te);
            }
            free(in.ids);
            lora_model_free(m);
        }
        /* 2a: our files, as kohya applied them */
        for (size_t i = 0; i < N_OURS; i++) {
            char file[300], key[300];
            snprintf(file, sizeof file, "compat/%s", OURS[i].file);
            snprintf(key, sizeof key, "%.*s", (int)(strlen(OURS[i].file) - strlen(".safetensors")), OURS[i].file);
            const char *files[1] = {file};
            double one = 1.0;
            check_case(ctx, ref, OURS[i].v, files, &one, 1, key, 1);
        }
        /* 2b: kohya's files */
        static const char *const kohya[] = {"v1_kohya_float", "v1_kohya_fp16", "v1_kohya_noalpha", "v1_kohya_conv",
                                            "v2_kohya_float", "v2_kohya_fp16"};
        for (size_t i = 0; i < sizeof kohya / sizeof *kohya; i++) {
            char file[300];
            snprintf(file, sizeof file, "compat/%s.safetensors", kohya[i]);
            const char *files[1] = {file};
            double one = 1.0;
            check_case(ctx, ref, kohya[i][1] - '0', files, &one, 1, kohya[i], 1);
        }
        /* two networks at once, as gen_img chains them: ours at 1.0 and kohya's at -0.5 */
        const char *pair[2] = {"compat/v1_ours_float.safetensors", "compat/v1_kohya_conv.safetensors"};
        double pm[2] = {1.0, -0.5};
        check_case(ctx, ref, 1, pair, pm, 2, "v1_pair", 0);
        printf("kohya create_network_from_weights outputs: worst relative L2 %.2e (tolerance %.0e)\n", worst, OUT_TOL);
        st_close(ref);
    }
    check_tools();
    rmdir(tmpdir);
    lora_ctx_free(ctx);
    return test_finish("test_compat");
}
