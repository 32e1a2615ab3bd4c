/* lora_file_hash against kohya-ss sd-scripts' own train_util functions (calculate_sha256,
 * model_hash, addnet_hash_safetensors) and hashlib: tests/data/hash/hashes.json from
 * tests/reference/make_hash_fixtures.py. Committed safetensors fixtures for all three kinds;
 * generated files of sizes around the legacy window at 1 MiB (the pattern the script uses) for
 * the whole-file and legacy hashes; a copy of a LoRA with edited metadata keeps its addnet hash
 * (the property that makes it kohya's sshs_model_hash); progress in bytes and cancellation. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lora/lora.h>

#include "../test.h"

static char tmpdir[] = "/tmp/lora_file_hash_XXXXXX";

static void check_hash(lora_ctx *ctx, const char *path, int32_t kind, const char *want, const char *what) {
    char hex[65] = "?";
    lora_status s = lora_file_hash(ctx, path, kind, hex, sizeof hex);
    CHECK_MSG(s == LORA_OK && want && strcmp(hex, want) == 0, "%s kind %d: got %s (%s), want %s", what, (int)kind, hex,
              lora_status_name(s), want ? want : "(missing)");
}

static int write_file(const char *path, const uint8_t *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    size_t w = n ? fwrite(b, 1, n, f) : 0;
    return fclose(f) == 0 && w == n;
}

struct prog {
    int64_t calls, last_done, last_total, bad_phase;
    int cancel_at;
};

static int32_t on_prog(void *user, lora_phase phase, int64_t done, int64_t total, double value) {
    (void)value;
    struct prog *p = user;
    if (phase != LORA_PHASE_LOAD) p->bad_phase++;
    p->calls++;
    p->last_done = done;
    p->last_total = total;
    return p->cancel_at && p->calls >= p->cancel_at;
}

int main(void) {
    const char *data = getenv("LORA_TEST_DATA");
    if (!data) { fprintf(stderr, "LORA_TEST_DATA not set\n"); return 1; }
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    char *jp = test_path_join(data, "hash/hashes.json");
    json_error_t je;
    json_t *root = json_load_file(jp, 0, &je);
    CHECK_MSG(root != NULL, "%s: %s", jp, je.text);
    if (!root || !ctx) return test_finish("test_file_hash");

    /* committed fixtures: all three kinds */
    json_t *files = json_object_get(root, "files");
    const char *name;
    json_t *v;
    json_object_foreach(files, name, v) {
        char *p = test_path_join(data, name);
        check_hash(ctx, p, LORA_HASH_SHA256, json_string_value(json_object_get(v, "sha256")), name);
        check_hash(ctx, p, LORA_HASH_ADDNET, json_string_value(json_object_get(v, "addnet")), name);
        check_hash(ctx, p, LORA_HASH_LEGACY, json_string_value(json_object_get(v, "legacy")), name);
        free(p);
    }
    CHECK(json_object_size(files) == 2);

    /* generated files: byte i = ((i * 131) ^ (i >> 11)) & 0xFF, as the script writes them */
    json_t *pats = json_object_get(root, "patterns");
    size_t idx;
    CHECK(json_array_size(pats) == 6);
    json_array_foreach(pats, idx, v) {
        size_t size = (size_t)json_integer_value(json_object_get(v, "size"));
        uint8_t *b = malloc(size ? size : 1);
        for (size_t i = 0; i < size; i++) b[i] = (uint8_t)(((i * 131) ^ (i >> 11)) & 0xFF);
        char *p = test_path_join(tmpdir, "pattern.bin");
        CHECK(write_file(p, b, size));
        char what[64];
        snprintf(what, sizeof what, "pattern of %zu bytes", size);
        check_hash(ctx, p, LORA_HASH_SHA256, json_string_value(json_object_get(v, "sha256")), what);
        check_hash(ctx, p, LORA_HASH_LEGACY, json_string_value(json_object_get(v, "legacy")), what);
        if (size == 0x110000 + 4321) {
            /* progress: LORA_PHASE_LOAD over the bytes read, ending at done == total == size */
            struct prog pr = {0};
            lora_ctx_set_progress(ctx, on_prog, &pr);
            char hex[65];
            CHECK_STATUS(lora_file_hash(ctx, p, LORA_HASH_SHA256, hex, sizeof hex), LORA_OK);
            CHECK(pr.calls == 2 && pr.bad_phase == 0 && pr.last_done == (int64_t)size &&
                  pr.last_total == (int64_t)size);
            /* a callback asking to stop: LORA_E_CANCELLED, no hash */
            struct prog stop = {0};
            stop.cancel_at = 1;
            lora_ctx_set_progress(ctx, on_prog, &stop);
            strcpy(hex, "x");
            CHECK_STATUS(lora_file_hash(ctx, p, LORA_HASH_SHA256, hex, sizeof hex), LORA_E_CANCELLED);
            CHECK(hex[0] == '\0' && stop.calls == 1);
            lora_ctx_set_progress(ctx, NULL, NULL);
            /* the legacy hash fits a 9-byte buffer */
            char leg[9];
            CHECK_STATUS(lora_file_hash(ctx, p, LORA_HASH_LEGACY, leg, sizeof leg), LORA_OK);
            CHECK(strcmp(leg, json_string_value(json_object_get(v, "legacy"))) == 0);
        }
        unlink(p);
        free(p);
        free(b);
    }

    /* the addnet hash ignores the header: the kohya LoRA with a longer __metadata__ */
    {
        char *src = test_path_join(data, "py_lora_kohya.safetensors");
        size_t n = 0;
        uint8_t *b = test_slurp(src, &n);
        CHECK(b != NULL && n > 8);
        uint64_t hl = 0;
        for (int i = 0; b && i < 8; i++) hl |= (uint64_t)b[i] << (8 * i);
        const char *key = "{\"__metadata__\":{";
        const char *add = "\"user_note\":\"edited after training\",";
        CHECK(b && hl + 8 <= n && memcmp(b + 8, key, strlen(key)) == 0);
        if (b && hl + 8 <= n && memcmp(b + 8, key, strlen(key)) == 0) {
            size_t kl = strlen(key), al = strlen(add);
            uint64_t h2 = hl + al;
            uint8_t *o = malloc(n + al);
            for (int i = 0; i < 8; i++) o[i] = (uint8_t)(h2 >> (8 * i));
            memcpy(o + 8, key, kl);
            memcpy(o + 8 + kl, add, al);
            memcpy(o + 8 + kl + al, b + 8 + kl, n - 8 - kl);
            char *p = test_path_join(tmpdir, "edited.safetensors");
            CHECK(write_file(p, o, n + al));
            json_t *f = json_object_get(files, "py_lora_kohya.safetensors");
            check_hash(ctx, p, LORA_HASH_ADDNET, json_string_value(json_object_get(f, "addnet")), "edited copy");
            char hex[65];
            CHECK_STATUS(lora_file_hash(ctx, p, LORA_HASH_SHA256, hex, sizeof hex), LORA_OK);
            CHECK(strcmp(hex, json_string_value(json_object_get(f, "sha256"))) != 0);
            unlink(p);
            free(p);
            free(o);
        }
        free(b);
        free(src);
    }

    json_decref(root);
    free(jp);
    lora_ctx_free(ctx);
    rmdir(tmpdir);
    return test_finish("test_file_hash");
}
