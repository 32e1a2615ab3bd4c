/* Public-header-only example: create a context with a log sink, fill a parameter bag from
 * kohya-style "name=value" arguments, and list what a .safetensors file holds.
 *   inspect FILE [network_dim=32 learning_rate=1e-4 ...] */
#include <stdio.h>
#include <string.h>

#include <lora/lora.h>

static void on_log(void *user, lora_log_level level, const char *msg) {
    (void)user;
    fprintf(stderr, "[liblora %d] %s\n", level, msg);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [name=value ...]\n", argv[0]);
        return 2;
    }
    lora_ctx *ctx = NULL;
    lora_status s = lora_ctx_create(LORA_ABI_VERSION, &ctx);
    if (s != LORA_OK) {
        fprintf(stderr, "lora_ctx_create: %s\n", lora_status_string(s));
        return 1;
    }
    lora_ctx_set_log(ctx, on_log, NULL, LORA_LOG_WARN);

    lora_params *params = NULL;
    if ((s = lora_params_create(ctx, &params)) != LORA_OK) goto fail;
    for (int i = 2; i < argc; i++) {
        char name[128];
        const char *eq = strchr(argv[i], '=');
        if (!eq || (size_t)(eq - argv[i]) >= sizeof name) {
            fprintf(stderr, "expected name=value, got '%s'\n", argv[i]);
            continue;
        }
        memcpy(name, argv[i], (size_t)(eq - argv[i]));
        name[eq - argv[i]] = '\0';
        if ((s = lora_params_parse(params, name, eq + 1)) != LORA_OK) goto fail;
        printf("param %s = %s\n", name, eq + 1);
    }

    lora_file *f = NULL;
    if ((s = lora_file_open(ctx, argv[1], &f)) != LORA_OK) goto fail;
    for (int64_t i = 0; i < lora_file_tensor_count(f); i++) {
        const char *name, *dtype;
        int32_t ndim;
        int64_t shape[8];
        lora_file_tensor_info(f, i, &name, NULL, &dtype, &ndim, shape, 8, NULL);
        printf("%-60s %-5s [", name, dtype);
        for (int32_t d = 0; d < ndim && d < 8; d++) printf(d ? ", %lld" : "%lld", (long long)shape[d]);
        printf("]\n");
    }
    lora_file_free(f);
    lora_params_free(params);
    lora_ctx_free(ctx);
    return 0;
fail:
    fprintf(stderr, "error: %s (%s)\n", lora_errmsg(ctx), lora_status_name(s));
    lora_params_free(params);
    lora_ctx_free(ctx);
    return 1;
}
