/* Element type table. */
#include "core/dtype.h"

struct dtype_entry {
    lora_dtype type;
    const char *name;
    int bits;
};

static const struct dtype_entry dtypes[] = {
    {LORA_DTYPE_F32, "F32", 32},   {LORA_DTYPE_F16, "F16", 16},   {LORA_DTYPE_BF16, "BF16", 16},
    {LORA_DTYPE_F64, "F64", 64},   {LORA_DTYPE_I64, "I64", 64},   {LORA_DTYPE_I32, "I32", 32},
    {LORA_DTYPE_U8, "U8", 8},      {LORA_DTYPE_I16, "I16", 16},   {LORA_DTYPE_I8, "I8", 8},
    {LORA_DTYPE_BOOL, "BOOL", 8},  {LORA_DTYPE_U16, "U16", 16},   {LORA_DTYPE_U32, "U32", 32},
    {LORA_DTYPE_U64, "U64", 64},   {LORA_DTYPE_F8_E4M3, "F8_E4M3", 8},
    {LORA_DTYPE_F8_E5M2, "F8_E5M2", 8},
};

int lora_dtype_bits(lora_dtype t) {
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (dtypes[i].type == t) return dtypes[i].bits;
    return 0;
}

const char *lora_dtype_name(lora_dtype t) {
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (dtypes[i].type == t) return dtypes[i].name;
    return NULL;
}
