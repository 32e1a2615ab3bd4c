/* liblora against the Python safetensors package (the reference implementation):
 *  (i)   reads tests/data/py_all_dtypes.safetensors (written by make_fixtures.py) through the
 *        public API and checks dtypes, shapes, values (formulas computed here) and metadata;
 *  (ii)  writes the same content with st_write and checks the bytes equal the Python file's
 *        (same header JSON, padding and tensor order); the same for py_escapes.safetensors,
 *        whose names and metadata need JSON escapes;
 *  (iii) reads tests/reference/python_reads_ours.json (what Python read from the file
 *        write_st_fixture wrote) and checks Python saw the formula's sums, dtypes, shapes and
 *        metadata, and that st_write still writes tests/data/ours_all_dtypes.safetensors
 *        byte for byte. */
#include <dirent.h>
#include <errno.h>
#include <unistd.h>

#include <jansson.h>

#define WRITE_ST_FIXTURE_NO_MAIN
#include "write_st_fixture.c"
#include "../test.h"

static char tmpdir[64];



/* Compares two files byte for byte; on a difference prints where, with header context. */
static int same_bytes(const char *what, const char *a_path, const char *b_path) {
    size_t na = 0, nb = 0;
    uint8_t *a = test_slurp(a_path, &na), *b = test_slurp(b_path, &nb);
    int same = a && b && na == nb && memcmp(a, b, na) == 0;
    if (!same && a && b) {
        size_t i = 0;
        while (i < na && i < nb && a[i] == b[i]) i++;
        fprintf(stderr, "%s: %s (%zu bytes) and %s (%zu bytes) differ first at byte %zu\n", what, a_path, na,
                b_path, nb, i);
        size_t from = i > 40 ? i - 40 : 0;
        for (int w = 0; w < 2; w++) {
            const uint8_t *p = w ? b : a;
            size_t n = w ? nb : na;
            fprintf(stderr, "  %s: ", w ? "ref " : "ours");
            for (size_t j = from; j < n && j < from + 80; j++)
                fprintf(stderr, p[j] >= 0x20 && p[j] < 0x7f ? "%c" : "\\x%02x", p[j]);
            fprintf(stderr, "\n");
        }
    }
    free(a);
    free(b);
    return same;
}

static const char *data_dir(void) {
    const char *d = getenv("LORA_TEST_DATA");
    return d ? d : "tests/data";
}

static const char *ref_dir(void) {
    const char *d = getenv("LORA_REFERENCE_DIR");
    return d ? d : "tests/reference";
}

/* (i) Reading the Python-written file through the public API. */
static void check_python_file(lora_ctx *ctx, const char *path) {
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, path, &f), LORA_OK);
    if (!f) {
        fprintf(stderr, "cannot open %s: %s (run tests/reference/make_fixtures.py)\n", path, lora_errmsg(ctx));
        return;
    }
    CHECK(lora_file_tensor_count(f) == FX_N);
    for (int k = 0; k < FX_N; k++) {
        const struct fx_spec *s = &fx_specs[k];
        int64_t idx = lora_file_find(f, s->name);
        CHECK_MSG(idx >= 0, "tensor %s missing", s->name);
        if (idx < 0) continue;
        const char *name = NULL, *dname = NULL;
        lora_dtype dt = 0;
        int32_t ndim = -1;
        int64_t shape[8] = {0};
        uint64_t nbytes = 0;
        CHECK_STATUS(lora_file_tensor_info(f, idx, &name, &dt, &dname, &ndim, shape, 8, &nbytes), LORA_OK);
        CHECK(strcmp(name, s->name) == 0);
        CHECK_MSG(dt == s->dtype && strcmp(dname, s->dtype_name) == 0, "%s: dtype %s", s->name, dname);
        CHECK_MSG(ndim == s->ndim, "%s: ndim %d, want %d", s->name, ndim, s->ndim);
        int shape_ok = 1;
        for (int d = 0; d < s->ndim && d < ndim; d++) shape_ok &= shape[d] == s->shape[d];
        CHECK_MSG(shape_ok, "%s: shape differs", s->name);
        int64_t n = fx_numel(s);
        CHECK_MSG(nbytes == (uint64_t)n * fx_elem_size(s->dtype), "%s: %llu bytes", s->name,
                  (unsigned long long)nbytes);
        /* Values through the float32 reader: every formula value converts exactly to the
         * float the reader must produce (F64 and I64 through one C cast). */
        float *v = malloc((size_t)(n ? n : 1) * sizeof(float));
        CHECK_STATUS(lora_file_read_f32(f, idx, v, (uint64_t)n), LORA_OK);
        int64_t bad = -1;
        for (int64_t i = 0; i < n && bad < 0; i++) {
            float want = s->dtype == LORA_DTYPE_I64 ? (float)((3 * i - 5) * INT64_C(1000000007)) : (float)fx_value(s, i);
            if (memcmp(&v[i], &want, 4) != 0) bad = i;
        }
        CHECK_MSG(bad < 0, "%s[%lld] = %.9g, want %.9g", s->name, (long long)bad, bad >= 0 ? v[bad] : 0.0,
                  bad >= 0 ? fx_value(s, bad) : 0.0);
        free(v);
        /* Raw bytes (exact for F64 and I64 too) through the internal view of the handle. */
        uint8_t *want = calloc((size_t)nbytes + 1, 1);
        fx_encode(s, want);
        CHECK_MSG(memcmp(st_data(f, idx), want, (size_t)nbytes) == 0, "%s: raw bytes differ", s->name);
        free(want);
    }
    CHECK(lora_file_metadata_count(f) == FX_N_META);
    for (int64_t m = 0; m < lora_file_metadata_count(f); m++) {
        const char *key = NULL, *val = NULL;
        CHECK_STATUS(lora_file_metadata_at(f, m, &key, &val), LORA_OK);
        CHECK(key && val && strcmp(key, fx_meta_keys[0]) == 0 && strcmp(val, fx_meta_vals[0]) == 0);
    }
    lora_file_free(f);
}

/* The content of py_escapes.safetensors (make_fixtures.py ESCAPES_*). */
static const char *const esc_mk[] = {"ss_tag"};
static const char *const esc_mv[] = {"a\x1f" "b\x0b" "c\x01\"q\"\\/\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\n\t\r\b\f\x7f"
                                     "\xe2\x80\xa8"};
static const char esc_name[] = "esc\x0e\"name\\/\xc3\xa9";

static lora_status write_escapes(lora_ctx *ctx, const char *path) {
    const float f[2] = {1.5f, -2.0f};
    const uint8_t u[3] = {1, 2, 3};
    const int64_t s2[1] = {2}, s3[1] = {3};
    const struct st_write_tensor wt[2] = {
        {"plain", LORA_DTYPE_U8, 1, s3, u},
        {esc_name, LORA_DTYPE_F32, 1, s2, f},
    };
    return st_write(ctx, path, wt, 2, esc_mk, esc_mv, 1);
}

/* (iii) What Python read from our file. */
static void check_python_reads_ours(lora_ctx *ctx) {
    char *jpath = test_path_join(ref_dir(), "python_reads_ours.json");
    json_error_t err;
    json_t *root = json_load_file(jpath, JSON_REJECT_DUPLICATES, &err);
    CHECK_MSG(root != NULL, "%s: %s (run make_fixtures.py --ours)", jpath, err.text);
    free(jpath);
    if (!root) return;
    const char *stv = json_string_value(json_object_get(root, "safetensors_version"));
    const char *tv = json_string_value(json_object_get(root, "torch_version"));
    CHECK_MSG(stv && strcmp(stv, "0.4.5") == 0, "safetensors_version %s (requirements.txt pins 0.4.5)",
              stv ? stv : "(missing)");
    CHECK(tv && strncmp(tv, "1.13", 4) == 0);
    CHECK(json_is_true(json_object_get(root, "bytes_identical_to_py_all_dtypes")));
    json_t *meta = json_object_get(root, "metadata");
    CHECK(json_is_object(meta) && json_object_size(meta) == FX_N_META);
    const char *mv = json_string_value(json_object_get(meta, fx_meta_keys[0]));
    CHECK(mv && strcmp(mv, fx_meta_vals[0]) == 0);
    json_t *tensors = json_object_get(root, "tensors");
    CHECK(json_is_object(tensors) && json_object_size(tensors) == (size_t)FX_N);
    for (int k = 0; k < FX_N; k++) {
        const struct fx_spec *s = &fx_specs[k];
        json_t *t = json_object_get(tensors, s->name);
        CHECK_MSG(t != NULL, "python did not see %s", s->name);
        if (!t) continue;
        const char *dt = json_string_value(json_object_get(t, "dtype"));
        CHECK_MSG(dt && strcmp(dt, s->dtype_name) == 0, "%s: python saw dtype %s", s->name, dt ? dt : "?");
        json_t *shape = json_object_get(t, "shape");
        int shape_ok = json_is_array(shape) && json_array_size(shape) == (size_t)s->ndim;
        for (int d = 0; shape_ok && d < s->ndim; d++)
            shape_ok = json_integer_value(json_array_get(shape, (size_t)d)) == s->shape[d];
        CHECK_MSG(shape_ok, "%s: python saw another shape", s->name);
        json_t *sum = json_object_get(t, "sum");
        CHECK(json_is_number(sum));
        double want = 0;
        for (int64_t i = 0; i < fx_numel(s); i++) want += fx_value(s, i);
        CHECK_NEAR(json_number_value(sum), want, 1e-9 * fmax(1.0, fabs(want)));
    }
    json_decref(root);

    /* Today's writer still produces the file Python checked. */
    char *out = test_path_join(tmpdir, "ours_again.safetensors");
    char *ours = test_path_join(data_dir(), "ours_all_dtypes.safetensors");
    CHECK_STATUS(fx_write(ctx, out), LORA_OK);
    CHECK(same_bytes("st_write vs ours_all_dtypes", out, ours));
    unlink(out);
    free(out);
    free(ours);
}

int main(void) {
    CHECK(fx_host_le());
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lora-test-stpy-XXXXXX");
    CHECK(mkdtemp(tmpdir) != NULL);

    char *py = test_path_join(data_dir(), "py_all_dtypes.safetensors");
    check_python_file(ctx, py);

    /* (ii) byte identity with the reference writer */
    char *out = test_path_join(tmpdir, "all_dtypes.safetensors");
    CHECK_STATUS(fx_write(ctx, out), LORA_OK);
    CHECK(same_bytes("st_write vs py_all_dtypes", out, py));
    unlink(out);
    free(out);
    free(py);

    char *py_esc = test_path_join(data_dir(), "py_escapes.safetensors");
    char *out_esc = test_path_join(tmpdir, "escapes.safetensors");
    CHECK_STATUS(write_escapes(ctx, out_esc), LORA_OK);
    CHECK(same_bytes("st_write vs py_escapes", out_esc, py_esc));
    /* and the reader decodes the escapes back */
    lora_file *f = NULL;
    CHECK_STATUS(lora_file_open(ctx, py_esc, &f), LORA_OK);
    if (f) {
        CHECK(lora_file_find(f, esc_name) >= 0);
        const char *k = NULL, *v = NULL;
        CHECK_STATUS(lora_file_metadata_at(f, 0, &k, &v), LORA_OK);
        CHECK(k && v && strcmp(k, esc_mk[0]) == 0 && strcmp(v, esc_mv[0]) == 0);
        lora_file_free(f);
    }
    unlink(out_esc);
    free(out_esc);
    free(py_esc);

    check_python_reads_ours(ctx);

    /* the temp directory is empty again */
    DIR *d = opendir(tmpdir);
    int left = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) left++;
    if (d) closedir(d);
    CHECK(left == 0);
    rmdir(tmpdir);
    lora_ctx_free(ctx);
    return test_finish("test_safetensors_python");
}
