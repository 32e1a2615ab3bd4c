/* Built when CUDA is not compiled in: the CUDA backend reports that plainly. */
#include "backend/backend.h"

lora_status lora_cuda_probe(const char **why, int32_t *n_devices) {
    if (why) *why = "liblora was built without CUDA (-Dcuda=disabled or no nvcc)";
    if (n_devices) *n_devices = 0;
    return LORA_E_NO_GPU;
}

lora_status lora_backend_cuda_create(lora_ctx *ctx, int32_t device, struct lora_backend_impl **out) {
    (void)device;
    *out = NULL;
    return lora_fail(ctx, LORA_E_NO_GPU, "cuda backend: liblora was built without CUDA");
}
