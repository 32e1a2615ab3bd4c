#ifndef LORA_TOOLS_CLI_H
#define LORA_TOOLS_CLI_H
#include <lora/lora.h>
/* Prints "lora: WHAT failed: message (STATUS)" to stderr and returns 1. */
int cli_fail(lora_ctx *ctx, lora_status s, const char *what);
/* mkdir -p as Python's os.makedirs(path, exist_ok=True): 0, or -1 with errno (ENOTDIR when
 * the path exists and is not a folder). */
int cli_mkdirs(const char *path);
int cmd_info(lora_ctx *ctx, int argc, char **argv);
int cmd_convert(lora_ctx *ctx, int argc, char **argv);
int cmd_tokenize(lora_ctx *ctx, int argc, char **argv);
int cmd_merge(lora_ctx *ctx, int argc, char **argv);
int cmd_extract(lora_ctx *ctx, int argc, char **argv);
int cmd_resize(lora_ctx *ctx, int argc, char **argv);
int cmd_train(lora_ctx *ctx, int argc, char **argv);        /* cmd_train.c */
int cmd_demo_images(lora_ctx *ctx, int argc, char **argv);  /* demo_images.c (hidden) */
int cmd_generate(lora_ctx *ctx, int argc, char **argv);     /* cmd_generate.c */
#endif
