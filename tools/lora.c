/* `lora`: the command-line face of liblora, with kohya's flag names. Uses only the public
 * header. Output for people goes to stdout; logs and progress go to stderr. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lora/lora.h>

#include "cli.h"

static void log_to_stderr(void *user, lora_log_level level, const char *message) {
    (void)user;
    static const char *names[] = {"debug", "info", "warn", "error"};
    fprintf(stderr, "lora: %s: %s\n", (level >= 0 && level <= 3) ? names[level] : "log", message);
}

int cli_fail(lora_ctx *ctx, lora_status s, const char *what) {
    fprintf(stderr, "lora: %s failed: %s (%s)\n", what, lora_errmsg(ctx)[0] ? lora_errmsg(ctx) : lora_status_string(s),
            lora_status_name(s));
    return 1;
}

int cli_mkdirs(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) {
        errno = n ? ENAMETOOLONG : ENOENT;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) return -1;
        buf[i] = c;
    }
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: lora <command> [options]\n"
            "\n"
            "commands:\n"
            "  info FILE [--json]   describe a .safetensors file (tensors, dtypes, metadata, LoRA rank/alpha)\n"
            "                       or an SD checkpoint (.safetensors, .ckpt, diffusers folder)\n"
            "  convert IN OUT       convert an SD checkpoint between .safetensors, .ckpt and diffusers\n"
            "  tokenize [--v2] [--max_token_length 75|150|225] [--raw] TEXT...\n"
            "                       print the CLIP token ids kohya's training feeds the text encoder\n"
            "  merge                merge LoRAs into a model (--sd_model) or into one LoRA (merge_lora.py,\n"
            "                       svd_merge_lora.py with --new_rank)\n"
            "  extract              extract a LoRA from two models (extract_lora_from_models.py)\n"
            "  resize               change a LoRA's rank by SVD (resize_lora.py)\n"
            "  train                train a LoRA (train_network.py flags; Ctrl-C saves a resumable state)\n"
            "  generate             txt2img / img2img with LoRAs (gen_img_diffusers.py flags), PNGs with prompt info\n"
            "  version              print the library version and build features\n"
            "\n"
            "options for every command:\n"
            "  --verbose            log debug messages to stderr\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
        printf("lora %s (ABI %u)\nfeatures: %s\n", lora_version_string(), lora_abi_version(), lora_build_features());
        return 0;
    }
    lora_ctx *ctx = NULL;
    lora_status s = lora_ctx_create(LORA_ABI_VERSION, &ctx);
    if (s != LORA_OK) {
        fprintf(stderr, "lora: cannot create a context: %s\n", lora_status_string(s));
        return 1;
    }
    int verbose = 0;
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--verbose") == 0) verbose = 1;
    lora_ctx_set_log(ctx, log_to_stderr, NULL, verbose ? LORA_LOG_DEBUG : LORA_LOG_WARN);

    int rc;
    if (strcmp(argv[1], "info") == 0) {
        rc = cmd_info(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "convert") == 0) {
        rc = cmd_convert(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "tokenize") == 0) {
        rc = cmd_tokenize(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "merge") == 0) {
        rc = cmd_merge(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "extract") == 0) {
        rc = cmd_extract(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "resize") == 0) {
        rc = cmd_resize(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "train") == 0) {
        rc = cmd_train(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "generate") == 0) {
        rc = cmd_generate(ctx, argc - 2, argv + 2);
    } else if (strcmp(argv[1], "demo-images") == 0) {   /* hidden: scripts/demo.sh's dataset */
        rc = cmd_demo_images(ctx, argc - 2, argv + 2);
    } else {
        fprintf(stderr, "lora: unknown command '%s'\n", argv[1]);
        usage(stderr);
        rc = 2;
    }
    lora_ctx_free(ctx);
    return rc;
}
