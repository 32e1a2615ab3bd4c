/* Versions and build facts. */
#include "internal.h"
#include "backend/backend.h"

LORA_API uint32_t lora_version(void) { return LORA_VERSION_NUMBER; }
LORA_API const char *lora_version_string(void) { return LORA_VERSION_STRING; }
LORA_API uint32_t lora_abi_version(void) { return LORA_ABI_VERSION; }
LORA_API const char *lora_build_features(void) { return LORA_BUILD_FEATURES; }

LORA_API int32_t lora_backend_available(lora_backend backend) {
    switch (backend) {
    case LORA_BACKEND_CPU: return 1;
    case LORA_BACKEND_CUDA: return lora_cuda_probe(NULL, NULL) == LORA_OK;
    case LORA_BACKEND_AUTO: return 1;
    default: return 0;
    }
}
