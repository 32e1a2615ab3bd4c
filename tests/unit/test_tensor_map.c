/* tensor_map: lookup through the hash index after growth, removal and renames; ownership;
 * shape/size validation; no leaks. */
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "io/tensor_map.h"
#include "../test.h"

int main(void) {
    lora_ctx *ctx = NULL;
    CHECK_STATUS(lora_ctx_create(LORA_ABI_VERSION, &ctx), LORA_OK);
    struct tensor_map m;
    tmap_init(&m, ctx);
    float v[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3};
    char name[64];
    /* 1000 tensors: forces several regrowths of the array and the index */
    for (int i = 0; i < 1000; i++) {
        snprintf(name, sizeof name, "model.layer.%d.weight", i);
        CHECK_STATUS(tmap_add(&m, name, LORA_DTYPE_F32, 2, shape, v, sizeof v, 1, 0), LORA_OK);
    }
    int found = 0;
    for (int i = 0; i < 1000; i++) {
        snprintf(name, sizeof name, "model.layer.%d.weight", i);
        found += tmap_find(&m, name) == i;
    }
    CHECK(found == 1000);
    CHECK(tmap_find(&m, "model.layer.1000.weight") == -1);
    CHECK(m.t[7].owned && m.t[7].data != v && memcmp(m.t[7].data, v, sizeof v) == 0);
    CHECK(tmap_numel(&m.t[7]) == 6);

    /* duplicates and bad shapes are refused */
    CHECK_STATUS(tmap_add(&m, "model.layer.5.weight", LORA_DTYPE_F32, 2, shape, v, sizeof v, 1, 0), LORA_E_INVALID_ARG);
    CHECK_STATUS(tmap_add(&m, "x", LORA_DTYPE_F32, 2, shape, v, 20, 1, 0), LORA_E_INVALID_ARG);
    int64_t neg[1] = {-1};
    CHECK_STATUS(tmap_add(&m, "y", LORA_DTYPE_F32, 1, neg, v, 0, 1, 0), LORA_E_INVALID_ARG);
    int64_t huge[2] = {INT64_MAX, 4};
    CHECK_STATUS(tmap_add(&m, "z", LORA_DTYPE_F32, 2, huge, v, 0, 1, 0), LORA_E_INVALID_ARG);
    CHECK_STATUS(tmap_add(&m, "w", LORA_DTYPE_OTHER, 2, shape, v, sizeof v, 1, 0), LORA_E_INVALID_ARG);

    /* remove keeps the order and the index */
    tmap_remove(&m, 0);
    CHECK(m.n == 999);
    CHECK(tmap_find(&m, "model.layer.0.weight") == -1);
    CHECK(tmap_find(&m, "model.layer.1.weight") == 0);
    CHECK(tmap_find(&m, "model.layer.999.weight") == 998);

    /* rename */
    CHECK_STATUS(tmap_rename(&m, 0, "renamed"), LORA_OK);
    CHECK(tmap_find(&m, "renamed") == 0 && tmap_find(&m, "model.layer.1.weight") == -1);
    CHECK_STATUS(tmap_rename(&m, 0, "model.layer.2.weight"), LORA_E_INVALID_ARG);

    /* borrowed data is not freed; taken data is */
    float *owned = lora_malloc(ctx, sizeof v);
    memcpy(owned, v, sizeof v);
    CHECK_STATUS(tmap_add(&m, "borrowed", LORA_DTYPE_F32, 2, shape, v, sizeof v, 0, 0), LORA_OK);
    CHECK_STATUS(tmap_add(&m, "taken", LORA_DTYPE_F32, 2, shape, owned, sizeof v, 0, 1), LORA_OK);
    CHECK(m.t[tmap_find(&m, "borrowed")].data == v);
    int64_t scalar_shape[1] = {0};
    CHECK_STATUS(tmap_add(&m, "scalar", LORA_DTYPE_F16, 0, scalar_shape, v, 2, 1, 0), LORA_OK);
    CHECK_STATUS(tmap_add(&m, "empty", LORA_DTYPE_F32, 1, scalar_shape, NULL, 0, 1, 0), LORA_OK);
    tmap_clear(&m);
    uint64_t host = 1;
    lora_ctx_memory(ctx, &host, NULL, NULL, NULL);
    CHECK(host == 0);
    CHECK(v[5] == 6);   /* borrowed buffer untouched */
    /* reusable after clear */
    CHECK_STATUS(tmap_add(&m, "again", LORA_DTYPE_F32, 2, shape, v, sizeof v, 1, 0), LORA_OK);
    CHECK(tmap_find(&m, "again") == 0);
    tmap_clear(&m);
    lora_ctx_free(ctx);
    return test_finish("test_tensor_map");
}
