/* Trainer helpers with hand-derived / published expectations:
 *  - SHA-256 against the FIPS 180-2 example vectors ("abc", "", the 448-bit message, one
 *    million 'a') and split updates;
 *  - Python's repr(float) for the values kohya writes (table from the Python language's
 *    documented repr rules: shortest round-trip digits, scientific below 1e-4 and from 1e16);
 *  - the safetensors hashes of a hand-built buffer (data region / 1 MiB window);
 *  - torch GradScaler's state machine on hand-derived sequences (growth every 2000 good steps,
 *    backoff on inf, counter reset), with a short interval too. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/metadata.h"
#include "train/train.h"
#include "../test.h"

static void hex_of(const void *msg, size_t n, char out[65]) {
    struct lora_sha256 c;
    uint8_t d[32];
    CHECK(lora_sha256_init(NULL, &c) == LORA_OK);
    CHECK(lora_sha256_update(&c, msg, n) == LORA_OK);
    CHECK(lora_sha256_final(&c, d) == LORA_OK);
    md_hex(d, 32, out);
}

static void test_sha256(void) {
    char h[65];
    hex_of("abc", 3, h);
    CHECK(strcmp(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0);
    hex_of("", 0, h);
    CHECK(strcmp(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == 0);
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    hex_of(m, strlen(m), h);
    CHECK(strcmp(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1") == 0);
    /* one million 'a', fed in uneven pieces */
    struct lora_sha256 c;
    uint8_t d[32];
    char *a = malloc(1000000);
    memset(a, 'a', 1000000);
    CHECK(lora_sha256_init(NULL, &c) == LORA_OK);
    size_t pos = 0, step = 1;
    while (pos < 1000000) {
        size_t n = step < 1000000 - pos ? step : 1000000 - pos;
        CHECK(lora_sha256_update(&c, a + pos, n) == LORA_OK);
        pos += n;
        step = step * 3 + 1;
        if (step > 70000) step = 7;
    }
    CHECK(lora_sha256_final(&c, d) == LORA_OK);
    md_hex(d, 32, h);
    CHECK(strcmp(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0);
    free(a);
}

static void test_py_float(void) {
    static const struct { double v; const char *want; } t[] = {
        {1.0, "1.0"}, {0.5, "0.5"}, {1e-4, "0.0001"}, {2e-6, "2e-06"}, {1e-5, "1e-05"}, {0.1, "0.1"},
        {1e-3, "0.001"}, {3.0e-4, "0.0003"}, {0.00012, "0.00012"}, {1234.5, "1234.5"}, {1e15, "1000000000000000.0"},
        {1e16, "1e+16"}, {1.5e16, "1.5e+16"}, {123456789012345678.0, "1.2345678901234568e+17"}, {0.0, "0.0"},
        {-2.5, "-2.5"}, {1.0 / 3.0, "0.3333333333333333"}, {65536.0, "65536.0"}, {1e-7, "1e-07"},
        {1.1e-5, "1.1e-05"}, {1690000000.25, "1690000000.25"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        char b[32];
        md_py_float(t[i].v, b);
        CHECK_MSG(strcmp(b, t[i].want) == 0, "repr(%.17g) = '%s', want '%s'", t[i].v, b, t[i].want);
    }
}

static void test_st_hashes(void) {
    /* header length 8 -> data from offset 16; a 0x110000 + 100 byte buffer of a known pattern */
    size_t n = 0x110000 + 100;
    uint8_t *b = calloc(n, 1);
    b[0] = 8;
    memcpy(b + 8, "{}      ", 8);
    for (size_t i = 16; i < n; i++) b[i] = (uint8_t)(i * 31 + 7);
    char mh[65], lh[9], want[65];
    CHECK(md_safetensors_hashes(NULL, b, n, mh, lh) == LORA_OK);
    hex_of(b + 16, n - 16, want);
    CHECK(strcmp(mh, want) == 0);
    hex_of(b + 0x100000, 0x10000, want);
    CHECK(strncmp(lh, want, 8) == 0 && strlen(lh) == 8);
    /* short file: the window is empty */
    CHECK(md_safetensors_hashes(NULL, b, 0x1000, mh, lh) == LORA_OK);
    CHECK(strcmp(lh, "e3b0c442") == 0);
    free(b);
}

static void test_scaler(void) {
    struct train_scaler s;
    train_scaler_init(&s, 0);
    CHECK(s.scale == 1.0f && train_scaler_update(&s, 1) == 0 && s.skipped == 0);
    train_scaler_init(&s, 1);
    CHECK(s.scale == 65536.0f && s.growth_tracker == 0);
    CHECK(train_scaler_inv(&s) == 1.0f / 65536.0f);
    /* 1999 good steps: no growth; the 2000th doubles and resets */
    for (int i = 0; i < 1999; i++) train_scaler_update(&s, 0);
    CHECK(s.scale == 65536.0f && s.growth_tracker == 1999);
    CHECK(train_scaler_update(&s, 0) == 0);
    CHECK(s.scale == 131072.0f && s.growth_tracker == 0);
    /* inf: skipped, halved, tracker reset */
    for (int i = 0; i < 10; i++) train_scaler_update(&s, 0);
    CHECK(train_scaler_update(&s, 1) == 1);
    CHECK(s.scale == 65536.0f && s.growth_tracker == 0 && s.skipped == 1);
    CHECK(train_scaler_update(&s, 1) == 1 && s.scale == 32768.0f && s.skipped == 2);
    /* interval 3, hand sequence: G G B G G G B B G G G -> scales */
    train_scaler_init(&s, 1);
    s.growth_interval = 3;
    const int seq[] = {0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0};
    const float want[] = {65536, 65536, 32768, 32768, 32768, 65536, 32768, 16384, 16384, 16384, 32768};
    const int64_t track[] = {1, 2, 0, 1, 2, 0, 0, 0, 1, 2, 0};
    for (int i = 0; i < 11; i++) {
        train_scaler_update(&s, seq[i]);
        CHECK_MSG(s.scale == want[i] && s.growth_tracker == track[i], "step %d: scale %g tracker %lld", i,
                  (double)s.scale, (long long)s.growth_tracker);
    }
    CHECK(s.skipped == 3);
}

int main(void) {
    test_sha256();
    test_py_float();
    test_st_hashes();
    test_scaler();
    return test_finish("test_trainer");
}
