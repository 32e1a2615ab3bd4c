/* PyTorch checkpoints against torch 1.13 (tests/reference/make_ckpt_fixtures.py):
 *  (i)   every fixture torch.save wrote (all dtypes, non-contiguous views and shared storages,
 *        an SD-v1 Lightning checkpoint with inert globals, a kohya LoRA .pt, a diffusers-style
 *        .bin with an nn.Parameter, a protocol-4 pickle, bare storages as values) reads, through ckpt_read and
 *        ckpt_read_mem, into exactly the tensors of its *_expected.safetensors (written by the
 *        safetensors package from the same torch tensors): names, order, dtypes, shapes, bytes;
 *        all_dtypes.pt also against the formulas; legacy.pt is refused as legacy;
 *  (ii)  ckpt_write round trips (formulas, views) and refuses what torch 1.13 cannot store;
 *  (iii) tests/reference/torch_reads_our_ckpt.json says torch.load (weights_only False and True)
 *        read the formulas from the files ckpt_write wrote, and today's writer still writes
 *        those files (tests/data/ckpt/ours_*) byte for byte.
 *
 *   test_ckpt                      run the tests
 *   test_ckpt --write-ours DIR     write DIR/ours_sd.ckpt and DIR/ours_lora.pt for the script */
#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#define WRITE_ST_FIXTURE_NO_MAIN
#include "write_st_fixture.c"
#include "io/ckpt.h"
#include "io/safetensors.h"
#include "../test.h"

static char tmpdir[64];
static lora_ctx *ctx;

static const char *data_dir(void) {
    const char *d = getenv("LORA_TEST_DATA");
    return d ? d : "tests/data";
}

static const char *ref_dir(void) {
    const char *d = getenv("LORA_REFERENCE_DIR");
    return d ? d : "tests/reference";
}

static char *ckpt_path(const char *name) {
    char *dir = test_path_join(data_dir(), "ckpt");
    char *p = test_path_join(dir, name);
    free(dir);
    return p;
}

static uint64_t host_bytes(void) {
    uint64_t b = UINT64_MAX;
    lora_ctx_memory(ctx, &b, NULL, NULL, NULL);
    return b;
}

/* The map must hold exactly the tensors of the safetensors file, in `order` when given. */
static void check_against_st(const char *what, const struct tensor_map *m, const char *st_path,
                             const char *const *order) {
    struct lora_file *f = NULL;
    lora_status s = st_open(ctx, st_path, &f);
    CHECK_MSG(s == LORA_OK, "%s: cannot open %s: %s", what, st_path, lora_errmsg(ctx));
    if (!f) return;
    CHECK_MSG(m->n == f->n_tensors, "%s: %lld tensors, expected %lld", what, (long long)m->n, (long long)f->n_tensors);
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const struct st_tensor *e = &f->tensors[i];
        int64_t k = tmap_find(m, e->name);
        CHECK_MSG(k >= 0, "%s: tensor %s missing", what, e->name);
        if (k < 0) continue;
        const struct lora_tensor *t = &m->t[k];
        CHECK_MSG(t->dtype == e->dtype, "%s: %s: dtype %d, expected %s", what, e->name, t->dtype, e->dtype_name);
        int same_shape = t->ndim == e->ndim;
        for (int d = 0; same_shape && d < t->ndim; d++) same_shape = t->shape[d] == e->shape[d];
        CHECK_MSG(same_shape, "%s: %s: shape differs (rank %d vs %d)", what, e->name, t->ndim, e->ndim);
        CHECK_MSG(t->nbytes == e->end - e->begin, "%s: %s: %llu bytes, expected %llu", what, e->name,
                  (unsigned long long)t->nbytes, (unsigned long long)(e->end - e->begin));
        if (t->nbytes == e->end - e->begin)
            CHECK_MSG(t->nbytes == 0 || memcmp(t->data, st_data(f, (int64_t)i), (size_t)t->nbytes) == 0,
                      "%s: %s: values differ", what, e->name);
        CHECK_MSG(t->owned, "%s: %s: not an owned copy", what, e->name);
    }
    for (int i = 0; order && order[i]; i++)
        CHECK_MSG(i < m->n && strcmp(m->t[i].name, order[i]) == 0, "%s: tensor %d is %s, expected %s", what, i,
                  i < m->n ? m->t[i].name : "(none)", order[i]);
    st_close(f);
}

/* Reads `name` by path and from memory; both must match the expected file. */
static void check_fixture(const char *name, const char *expected, const char *const *order) {
    char *path = ckpt_path(name);
    char *exp = expected[0] == '/' ? strdup(expected) : ckpt_path(expected);
    uint64_t base = host_bytes();
    struct tensor_map m;
    tmap_init(&m, ctx);
    lora_status s = ckpt_read(ctx, path, &m);
    CHECK_MSG(s == LORA_OK, "%s: %s: %s (run tests/reference/make_ckpt_fixtures.py)", name, lora_status_name(s),
              lora_errmsg(ctx));
    char what[128];
    snprintf(what, sizeof what, "%s (ckpt_read)", name);
    if (s == LORA_OK) check_against_st(what, &m, exp, order);
    tmap_clear(&m);
    CHECK_MSG(host_bytes() == base, "%s: %llu bytes kept after tmap_clear", name,
              (unsigned long long)(host_bytes() - base));

    size_t len = 0;
    uint8_t *buf = test_slurp(path, &len);
    CHECK(buf != NULL);
    s = ckpt_read_mem(ctx, name, buf, len, &m);
    CHECK_MSG(s == LORA_OK, "%s (mem): %s", name, lora_errmsg(ctx));
    snprintf(what, sizeof what, "%s (ckpt_read_mem)", name);
    if (s == LORA_OK) check_against_st(what, &m, exp, order);
    tmap_clear(&m);
    CHECK(host_bytes() == base);
    free(buf);
    free(path);
    free(exp);
}

/* all_dtypes.pt against the formulas too (fx_specs: the same formulas, written independently). */
static void check_all_dtypes_formulas(void) {
    char *path = ckpt_path("all_dtypes.pt");
    struct tensor_map m;
    tmap_init(&m, ctx);
    CHECK_STATUS(ckpt_read(ctx, path, &m), LORA_OK);
    CHECK(m.n == FX_N);
    for (int k = 0; k < FX_N && k < m.n; k++) {
        const struct fx_spec *sp = &fx_specs[k];
        const struct lora_tensor *t = &m.t[k];   /* OrderedDict order = ALL_DTYPES order */
        CHECK_MSG(strcmp(t->name, sp->name) == 0, "tensor %d is %s, want %s", k, t->name, sp->name);
        CHECK_MSG(t->dtype == sp->dtype && t->ndim == sp->ndim, "%s: dtype/rank", sp->name);
        size_t nb = (size_t)fx_numel(sp) * fx_elem_size(sp->dtype);
        uint8_t *want = calloc(nb + 1, 1);
        fx_encode(sp, want);
        CHECK_MSG(t->nbytes == nb && (nb == 0 || memcmp(t->data, want, nb) == 0), "%s: bytes differ from the formula",
                  sp->name);
        free(want);
    }
    tmap_clear(&m);
    free(path);
}

static void check_legacy(void) {
    char *path = ckpt_path("legacy.pt");
    struct tensor_map m;
    tmap_init(&m, ctx);
    CHECK_STATUS(ckpt_read(ctx, path, &m), LORA_E_UNSUPPORTED);
    CHECK_MSG(strstr(lora_errmsg(ctx), "legacy pre-1.6 torch format") && strstr(lora_errmsg(ctx), path) &&
                  strstr(lora_errmsg(ctx), "safetensors"),
              "message: %s", lora_errmsg(ctx));
    CHECK(m.n == 0);
    free(path);
}

/* ---- writer -------------------------------------------------------------------------------- */
static void fill_fx(struct tensor_map *m) {
    uint8_t **bufs = fx_make_data();
    for (int k = 0; k < FX_N; k++) {
        const struct fx_spec *sp = &fx_specs[k];
        uint64_t nb = (uint64_t)fx_numel(sp) * fx_elem_size(sp->dtype);
        CHECK_STATUS(tmap_add(m, sp->name, sp->dtype, sp->ndim, sp->shape, bufs[k], nb, 1, 0), LORA_OK);
    }
    fx_free_data(bufs);
}

static lora_status write_ours(const char *dir) {
    struct tensor_map m;
    tmap_init(&m, ctx);
    fill_fx(&m);
    char *a = test_path_join(dir, "ours_sd.ckpt"), *b = test_path_join(dir, "ours_lora.pt");
    lora_status s = ckpt_write(ctx, a, &m, 1);
    if (s == LORA_OK) s = ckpt_write(ctx, b, &m, 0);
    tmap_clear(&m);
    free(a);
    free(b);
    return s;
}

static void check_formula_map(const char *what, const struct tensor_map *m) {
    CHECK_MSG(m->n == FX_N, "%s: %lld tensors", what, (long long)m->n);
    for (int k = 0; k < FX_N && k < m->n; k++) {
        const struct fx_spec *sp = &fx_specs[k];
        const struct lora_tensor *t = &m->t[k];
        size_t nb = (size_t)fx_numel(sp) * fx_elem_size(sp->dtype);
        uint8_t *want = calloc(nb + 1, 1);
        fx_encode(sp, want);
        int same = strcmp(t->name, sp->name) == 0 && t->dtype == sp->dtype && t->ndim == sp->ndim && t->nbytes == nb &&
                   (nb == 0 || memcmp(t->data, want, nb) == 0);
        for (int d = 0; same && d < sp->ndim; d++) same = t->shape[d] == sp->shape[d];
        CHECK_MSG(same, "%s: tensor %d (%s) differs", what, k, sp->name);
        free(want);
    }
}

static int same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    uint8_t *pa = test_slurp(a, &na), *pb = test_slurp(b, &nb);
    int same = pa && pb && na == nb && memcmp(pa, pb, na) == 0;
    if (!same && pa && pb) {
        size_t i = 0;
        while (i < na && i < nb && pa[i] == pb[i]) i++;
        fprintf(stderr, "%s (%zu bytes) and %s (%zu bytes) differ first at byte %zu\n", a, na, b, nb, i);
    }
    free(pa);
    free(pb);
    return same;
}

static void check_writer(void) {
    uint64_t base = host_bytes();
    CHECK_STATUS(write_ours(tmpdir), LORA_OK);
    CHECK(host_bytes() == base);
    const char *names[2] = {"ours_sd.ckpt", "ours_lora.pt"};
    for (int i = 0; i < 2; i++) {
        char *p = test_path_join(tmpdir, names[i]);
        struct tensor_map m;
        tmap_init(&m, ctx);
        lora_status s = ckpt_read(ctx, p, &m);
        CHECK_MSG(s == LORA_OK, "%s: %s", names[i], lora_errmsg(ctx));
        check_formula_map(names[i], &m);
        tmap_clear(&m);
        /* today's writer still writes the file torch read */
        char *golden = ckpt_path(names[i]);
        CHECK_MSG(same_file(p, golden), "%s differs from %s (rerun make_ckpt_fixtures.py --ours)", p, golden);
        free(golden);
        /* layout facts, checked on the bytes: root "archive", data.pkl first at offset 0, its
         * data 64-byte aligned, protocol 2 */
        size_t len = 0;
        uint8_t *b = test_slurp(p, &len);
        CHECK(b && len > 64 && memcmp(b, "PK\x03\x04", 4) == 0 && memcmp(b + 30, "archive/data.pkl", 16) == 0);
        if (b && len > 64) {
            size_t off = 30 + (size_t)(b[26] | b[27] << 8) + (size_t)(b[28] | b[29] << 8);
            CHECK(off % 64 == 0 && b[off] == 0x80 && b[off + 1] == 2);
        }
        free(b);
        unlink(p);
        free(p);
    }
    CHECK(host_bytes() == base);

    /* views: read, write (every view becomes its own contiguous storage), read again */
    char *views = ckpt_path("views.pt"), *exp = ckpt_path("views_expected.safetensors");
    char *out = test_path_join(tmpdir, "views_again.pt");
    struct tensor_map m;
    tmap_init(&m, ctx);
    CHECK_STATUS(ckpt_read(ctx, views, &m), LORA_OK);
    CHECK_STATUS(ckpt_write(ctx, out, &m, 1), LORA_OK);
    tmap_clear(&m);
    CHECK_STATUS(ckpt_read(ctx, out, &m), LORA_OK);
    check_against_st("views.pt rewritten", &m, exp, NULL);
    tmap_clear(&m);
    unlink(out);
    free(views);
    free(exp);
    free(out);

    /* an empty map writes a valid archive without tensors */
    out = test_path_join(tmpdir, "empty.ckpt");
    CHECK_STATUS(ckpt_write(ctx, out, &m, 1), LORA_OK);
    CHECK_STATUS(ckpt_read(ctx, out, &m), LORA_E_CKPT_NO_TENSORS);
    CHECK(strstr(lora_errmsg(ctx), "state_dict") != NULL);
    unlink(out);
    free(out);

    /* refused before anything is written */
    out = test_path_join(tmpdir, "refused.ckpt");
    const int64_t shape[1] = {2};
    const uint16_t u16[2] = {1, 2};
    CHECK_STATUS(tmap_add(&m, "u16", LORA_DTYPE_U16, 1, shape, u16, 4, 1, 0), LORA_OK);
    CHECK_STATUS(ckpt_write(ctx, out, &m, 0), LORA_E_UNSUPPORTED);
    CHECK(strstr(lora_errmsg(ctx), "u16") && strstr(lora_errmsg(ctx), "U16"));
    tmap_clear(&m);
    CHECK_STATUS(tmap_add(&m, "bad\xff" "name", LORA_DTYPE_U8, 1, shape, u16, 2, 1, 0), LORA_OK);
    CHECK_STATUS(ckpt_write(ctx, out, &m, 0), LORA_E_INVALID_ARG);
    tmap_clear(&m);
    struct stat sb;
    CHECK(stat(out, &sb) != 0 && errno == ENOENT);
    free(out);
    /* an unwritable destination: a status naming the file, nothing created */
    fill_fx(&m);
    CHECK_STATUS(ckpt_write(ctx, "/nonexistent-dir-lora/x.ckpt", &m, 0), LORA_E_NOT_FOUND);
    CHECK(strstr(lora_errmsg(ctx), "/nonexistent-dir-lora/x.ckpt") != NULL);
    tmap_clear(&m);
    CHECK(host_bytes() == base);
}

/* ---- what torch read from our files ---------------------------------------------------------- */
static double formula_sum(const struct fx_spec *sp) {
    double s = 0;
    for (int64_t i = 0; i < fx_numel(sp); i++) s += fx_value(sp, i);
    return s;
}

static void check_torch_json(void) {
    char *jpath = test_path_join(ref_dir(), "torch_reads_our_ckpt.json");
    json_error_t err;
    json_t *root = json_load_file(jpath, JSON_REJECT_DUPLICATES, &err);
    CHECK_MSG(root != NULL, "%s: %s (run make_ckpt_fixtures.py --ours)", jpath, err.text);
    free(jpath);
    if (!root) return;
    const char *tv = json_string_value(json_object_get(root, "torch_version"));
    CHECK_MSG(tv && strncmp(tv, "1.13", 4) == 0, "torch_version %s", tv ? tv : "(missing)");
    json_t *files = json_object_get(root, "files");
    const char *names[2] = {"ours_sd.ckpt", "ours_lora.pt"};
    const char *modes[2] = {"weights_only_false", "weights_only_true"};
    for (int f = 0; f < 2; f++) {
        json_t *fr = json_object_get(files, names[f]);
        CHECK_MSG(fr != NULL, "torch did not read %s", names[f]);
        if (!fr) continue;
        json_t *z = json_object_get(fr, "zip");
        CHECK(json_is_true(json_object_get(z, "all_stored")));
        CHECK(json_is_true(json_object_get(z, "testzip_ok")));
        CHECK(json_is_true(json_object_get(z, "data_aligned_64")));
        /* A1111-style restricted check: names all match; the only globals outside its list are
         * the storages of int16/int8/bool, which it lacks for any writer */
        json_t *a1 = json_object_get(fr, "a1111_style");
        CHECK(json_is_true(json_object_get(a1, "names_ok")));
        json_t *fb = json_object_get(a1, "forbidden_globals");
        CHECK(json_is_array(fb));
        for (size_t i = 0; i < json_array_size(fb); i++) {
            const char *g = json_string_value(json_array_get(fb, i));
            CHECK_MSG(g && (strcmp(g, "torch.ShortStorage") == 0 || strcmp(g, "torch.CharStorage") == 0 ||
                            strcmp(g, "torch.BoolStorage") == 0),
                      "%s: A1111 would refuse global %s", names[f], g ? g : "?");
        }
        json_t *zn = json_object_get(z, "names");
        CHECK(json_array_size(zn) == (size_t)FX_N + 2);
        CHECK(json_array_size(zn) > 0 && strcmp(json_string_value(json_array_get(zn, 0)), "archive/data.pkl") == 0);
        CHECK(json_array_size(zn) > 0 &&
              strcmp(json_string_value(json_array_get(zn, json_array_size(zn) - 1)), "archive/version") == 0);
        for (int md = 0; md < 2; md++) {
            json_t *r = json_object_get(fr, modes[md]);
            CHECK_MSG(r != NULL, "%s: no %s result", names[f], modes[md]);
            if (!r) continue;
            const char *top = json_string_value(json_object_get(r, "top_type"));
            const char *sdt = json_string_value(json_object_get(r, "state_dict_type"));
            CHECK(sdt && strcmp(sdt, "OrderedDict") == 0);
            if (f == 0) {
                CHECK(top && strcmp(top, "dict") == 0);
                json_t *keys = json_object_get(r, "top_keys");
                CHECK(json_array_size(keys) == 3 && strcmp(json_string_value(json_array_get(keys, 0)), "state_dict") == 0);
                CHECK(json_integer_value(json_object_get(r, "epoch")) == 0);
                CHECK(json_integer_value(json_object_get(r, "global_step")) == 0);
            } else {
                CHECK(top && strcmp(top, "OrderedDict") == 0);
            }
            json_t *tensors = json_object_get(r, "tensors");
            CHECK(json_object_size(tensors) == (size_t)FX_N);
            for (int k = 0; k < FX_N; k++) {
                const struct fx_spec *sp = &fx_specs[k];
                json_t *t = json_object_get(tensors, sp->name);
                CHECK_MSG(t != NULL, "%s %s: torch did not see %s", names[f], modes[md], sp->name);
                if (!t) continue;
                const char *dt = json_string_value(json_object_get(t, "dtype"));
                CHECK_MSG(dt && strcmp(dt, sp->dtype_name) == 0, "%s: dtype %s", sp->name, dt ? dt : "?");
                json_t *shape = json_object_get(t, "shape");
                int ok = json_array_size(shape) == (size_t)sp->ndim;
                for (int d = 0; ok && d < sp->ndim; d++)
                    ok = json_integer_value(json_array_get(shape, (size_t)d)) == sp->shape[d];
                CHECK_MSG(ok, "%s: torch saw another shape", sp->name);
                double want = formula_sum(sp);
                CHECK_NEAR(json_number_value(json_object_get(t, "sum")), want, 1e-9 * fmax(1.0, fabs(want)));
                CHECK(json_is_true(json_object_get(t, "equals_formula")));
                CHECK(json_is_true(json_object_get(t, "contiguous")));
            }
        }
    }
    json_decref(root);
}

int main(int argc, char **argv) {
    (void)fx_write;   /* shared with test_safetensors_python; unused here */
    if (!fx_host_le()) {
        fprintf(stderr, "test_ckpt: the fixtures assume a little-endian host\n");
        return 1;
    }
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    if (argc == 3 && strcmp(argv[1], "--write-ours") == 0) {
        lora_status s = write_ours(argv[2]);
        if (s != LORA_OK) fprintf(stderr, "test_ckpt: %s: %s\n", lora_status_name(s), lora_errmsg(ctx));
        lora_ctx_free(ctx);
        return s == LORA_OK ? 0 : 1;
    }
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora-test-ckpt-XXXXXX");
    CHECK(mkdtemp(tmpdir) != NULL);
    uint64_t base = host_bytes();

    char *py_all = test_path_join(data_dir(), "py_all_dtypes.safetensors");
    static const char *const all_order[] = {"alpha", "f32_2d", "f16_3d", "bf16_1d", "f64_4d", "i64_1d", "i32_2d",
                                            "i16_1d", "i8_2d", "u8_1d", "bool_2d", "empty_0x3", NULL};
    static const char *const views_order[] = {"base", "transposed", "slice", "column", "stepped", "scalar_view",
                                              "empty_view", "expanded", "shared_a", "shared_b", "bf16_permuted",
                                              "i64_cols", NULL};
    static const char *const sd_order[] = {"model.diffusion_model.input_blocks.0.0.weight",
                                           "model.diffusion_model.input_blocks.0.0.bias", NULL};
    static const char *const kohya_order[] = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", NULL};
    static const char *const p4_order[] = {"w", "w_t", "i8", "flag", NULL};
    char *py_all_abs = realpath(py_all, NULL);
    CHECK(py_all_abs != NULL);
    if (py_all_abs) check_fixture("all_dtypes.pt", py_all_abs, all_order);
    check_all_dtypes_formulas();
    check_fixture("views.pt", "views_expected.safetensors", views_order);
    check_fixture("sd_lightning.ckpt", "sd_lightning_expected.safetensors", sd_order);
    check_fixture("kohya_lora.pt", "kohya_lora_expected.safetensors", kohya_order);
    check_fixture("diffusers.bin", "diffusers_expected.safetensors", NULL);
    check_fixture("proto4.pt", "proto4_expected.safetensors", p4_order);
    check_fixture("storages.pt", "storages_expected.safetensors", NULL);
    check_legacy();
    free(py_all_abs);
    free(py_all);

    check_writer();
    check_torch_json();
    CHECK_MSG(host_bytes() == base, "host bytes %llu, baseline %llu", (unsigned long long)host_bytes(),
              (unsigned long long)base);

    DIR *d = opendir(tmpdir);
    int left = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            fprintf(stderr, "left behind: %s\n", e->d_name);
            left++;
        }
    if (d) closedir(d);
    CHECK(left == 0);
    rmdir(tmpdir);
    lora_ctx_free(ctx);
    return test_finish("test_ckpt");
}
