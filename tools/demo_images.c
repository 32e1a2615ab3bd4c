/* `lora demo-images DIR [--count N] [--size S] [--repeats R]` (hidden; scripts/demo.sh): a
 * small synthetic DreamBooth dataset, DIR/<R>_shapes/shape_<k>.png (libpng) with a .caption
 * each: coloured circles and squares at varying places on a light background. Deterministic. */
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lora/lora.h>

#include "cli.h"

static int write_png(const char *path, const uint8_t *rgb, int w, int h) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info || setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        fclose(f);
        return -1;
    }
    png_init_io(png, f);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < h; y++) png_write_row(png, (png_const_bytep)(rgb + (size_t)y * w * 3));
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    return fclose(f) == 0 ? 0 : -1;
}

int cmd_demo_images(lora_ctx *ctx, int argc, char **argv) {
    (void)ctx;
    const char *dir = NULL;
    int count = 6, size = 64, repeats = 5;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--count") == 0 && i + 1 < argc) count = atoi(argv[++i]);
        else if (strcmp(argv[i], "--size") == 0 && i + 1 < argc) size = atoi(argv[++i]);
        else if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
        else if (argv[i][0] != '-' && !dir) dir = argv[i];
        else {
            fprintf(stderr, "usage: lora demo-images DIR [--count N] [--size S] [--repeats R]\n");
            return 2;
        }
    }
    if (!dir || count < 1 || count > 1000 || size < 16 || size > 2048 || size % 8 || repeats < 1) {
        fprintf(stderr, "usage: lora demo-images DIR [--count N] [--size S (multiple of 8)] [--repeats R]\n");
        return 2;
    }
    char sub[4096], path[4200];
    snprintf(sub, sizeof sub, "%s/%d_shapes", dir, repeats);
    cli_mkdirs(sub);
    static const struct { const char *name; uint8_t r, g, b; } colours[] = {
        {"red", 220, 30, 30}, {"blue", 30, 60, 220}, {"green", 30, 170, 50}};
    uint8_t *img = malloc((size_t)size * size * 3);
    if (!img) return 1;
    for (int k = 0; k < count; k++) {
        int c = k % 3, square = (k / 3) % 2;
        int cx = size / 4 + (k * 7 % (size / 2)), cy = size / 4 + (k * 13 % (size / 2)), rad = size / 5;
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) {
                int dx = x - cx, dy = y - cy;
                int in = square ? (abs(dx) <= rad && abs(dy) <= rad) : (dx * dx + dy * dy <= rad * rad);
                uint8_t *p = img + ((size_t)y * size + x) * 3;
                if (in) p[0] = colours[c].r, p[1] = colours[c].g, p[2] = colours[c].b;
                else p[0] = 235, p[1] = 230, p[2] = 220;
            }
        snprintf(path, sizeof path, "%s/shape_%03d.png", sub, k);
        if (write_png(path, img, size, size) != 0) {
            fprintf(stderr, "lora demo-images: cannot write %s\n", path);
            free(img);
            return 1;
        }
        snprintf(path, sizeof path, "%s/shape_%03d.caption", sub, k);
        FILE *f = fopen(path, "w");
        if (!f) {
            free(img);
            return 1;
        }
        fprintf(f, "a %s %s on a light background\n", colours[c].name, square ? "square" : "circle");
        fclose(f);
    }
    free(img);
    printf("wrote %d images of %dx%d to %s\n", count, size, size, sub);
    return 0;
}
