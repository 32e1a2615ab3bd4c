/* kohya DreamBooth dataset: bucket lists and assignments vs kohya's BucketManager
 * (buckets.json), INTER_AREA resize vs cv2.resize (resize.safetensors), folder scan / reg
 * balancing / len(dataloader) / metadata JSON vs kohya's DreamBoothDataset on tree/ (tree.json),
 * caption processing statistics (hand-derived), determinism of ds_batch, and the latent cache
 * (memory and disk, invalidated when an image changes). Fixtures: make_dataset_fixtures.py. */
#include <dirent.h>
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../test.h"
#include "../ref_file.h"
#include "train/dataset.h"
#include "train/image_resize.h"
#include "io/image_read.h"

static lora_ctx *ctx;
static const char *data_dir;

static char *ds_path(const char *rel) {
    char *d = test_path_join(data_dir, "dataset");
    char *p = test_path_join(d, rel);
    free(d);
    return p;
}

/* ---- buckets vs kohya ---------------------------------------------------------------------- */
static void test_buckets(void) {
    char *p = ds_path("buckets.json");
    json_error_t err;
    json_t *root = json_load_file(p, 0, &err);
    CHECK_MSG(root != NULL, "%s: %s", p, err.text);
    free(p);
    if (!root) return;
    size_t ci;
    json_t *c;
    int64_t n_assign = 0, bad_assign = 0;
    json_array_foreach(root, ci, c) {
        struct ds_opts o;
        ds_opts_default(&o);
        o.width = (int32_t)json_integer_value(json_object_get(c, "width"));
        o.height = (int32_t)json_integer_value(json_object_get(c, "height"));
        o.min_bucket_reso = (int32_t)json_integer_value(json_object_get(c, "min"));
        o.max_bucket_reso = (int32_t)json_integer_value(json_object_get(c, "max"));
        o.bucket_reso_steps = (int32_t)json_integer_value(json_object_get(c, "steps"));
        o.bucket_no_upscale = (int32_t)json_integer_value(json_object_get(c, "no_upscale"));
        o.enable_bucket = 1;
        json_t *resos = json_object_get(c, "resos");
        if (!o.bucket_no_upscale) {
            struct ds_reso r[512];
            int32_t n = ds_bucket_resolutions(o.width, o.height, o.min_bucket_reso, o.max_bucket_reso, o.bucket_reso_steps, r, 512);
            CHECK_MSG((size_t)n == json_array_size(resos), "config %zu: %d buckets, kohya %zu", ci, n, json_array_size(resos));
            int same = 1;
            for (int32_t i = 0; i < n && (size_t)i < json_array_size(resos); i++) {
                json_t *e = json_array_get(resos, (size_t)i);
                if (r[i].w != json_integer_value(json_array_get(e, 0)) || r[i].h != json_integer_value(json_array_get(e, 1))) same = 0;
            }
            CHECK_MSG(same, "config %zu: bucket list differs from make_bucket_resolutions", ci);
            if (ci == 0) CHECK(n == 17);   /* spec §5.3: 17 buckets for 512x512 */
        }
        size_t ai;
        json_t *a;
        json_array_foreach(json_object_get(c, "assign"), ai, a) {
            int32_t v[6], got[4];
            for (int k = 0; k < 6; k++) v[k] = (int32_t)json_integer_value(json_array_get(a, (size_t)k));
            lora_status s = ds_assign_bucket(ctx, &o, v[0], v[1], got);
            n_assign++;
            if (s != LORA_OK || got[0] != v[2] || got[1] != v[3] || got[2] != v[4] || got[3] != v[5]) {
                bad_assign++;
                if (bad_assign < 10)
                    fprintf(stderr, "config %zu no_upscale %d: %dx%d -> bucket %dx%d resized %dx%d, kohya %dx%d %dx%d\n", ci,
                            o.bucket_no_upscale, v[0], v[1], got[0], got[1], got[2], got[3], v[2], v[3], v[4], v[5]);
            }
        }
    }
    CHECK_MSG(bad_assign == 0, "%lld of %lld bucket assignments differ from kohya", (long long)bad_assign, (long long)n_assign);
    CHECK(n_assign > 1000);
    json_decref(root);
}

/* ---- INTER_AREA vs cv2 ----------------------------------------------------------------------- */
static void test_resize(void) {
    char *p = ds_path("resize.safetensors");
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, p, &f), LORA_OK);
    free(p);
    if (!f) return;
    int cases = 0;
    for (int i = 0; i < 100; i++) {
        char sn[32], dn[32];
        snprintf(sn, sizeof sn, "case%02d.src", i);
        snprintf(dn, sizeof dn, "case%02d.dst", i);
        int64_t si = ref_find(f, sn), di = ref_find(f, dn);
        if (si < 0 || di < 0) break;
        cases++;
        int32_t sh = (int32_t)f->tensors[si].shape[0], sw = (int32_t)f->tensors[si].shape[1];
        int32_t dh = (int32_t)f->tensors[di].shape[0], dw = (int32_t)f->tensors[di].shape[1];
        size_t n = (size_t)dw * dh * 3;
        uint8_t *out = malloc(n);
        CHECK_STATUS(img_resize_area_u8(ctx, st_data(f, si), sw, sh, out, dw, dh, 3), LORA_OK);
        const uint8_t *want = st_data(f, di);
        size_t diff = 0;
        int maxd = 0;
        for (size_t k = 0; k < n; k++) {
            int d = abs((int)out[k] - (int)want[k]);
            diff += d != 0;
            if (d > maxd) maxd = d;
        }
        /* exact: downscales (area weights / box) and upscales (fixed-point bilinear) alike */
        CHECK_MSG(diff == 0, "resize %dx%d -> %dx%d: %zu of %zu bytes differ from cv2 (max %d)", sw, sh, dw, dh, diff, n, maxd);
        free(out);
    }
    CHECK(cases >= 15);
    st_close(f);
    /* kohya-sized images (photo -> bucket) against hashes of cv2's output */
    p = ds_path("resize_big.json");
    json_error_t err;
    json_t *big = json_load_file(p, 0, &err);
    CHECK_MSG(big != NULL, "%s: %s", p, err.text);
    free(p);
    size_t i;
    json_t *c;
    json_array_foreach(big, i, c) {
        int32_t sw = (int32_t)json_integer_value(json_array_get(c, 0)), sh = (int32_t)json_integer_value(json_array_get(c, 1));
        int32_t dw = (int32_t)json_integer_value(json_array_get(c, 2)), dh = (int32_t)json_integer_value(json_array_get(c, 3));
        uint64_t want = strtoull(json_string_value(json_array_get(c, 4)), NULL, 10);
        uint8_t *src = malloc((size_t)sw * sh * 3), *dst = malloc((size_t)dw * dh * 3);
        for (int32_t y = 0; y < sh; y++)
            for (int32_t x = 0; x < sw; x++)
                for (int k = 0; k < 3; k++)
                    src[((size_t)y * sw + x) * 3 + k] = (uint8_t)((x * 3 + y * 5 + k * 71 + ((x * y) >> 3)) & 255);
        CHECK_STATUS(img_resize_area_u8(ctx, src, sw, sh, dst, dw, dh, 3), LORA_OK);
        uint64_t h = 1469598103934665603ull;
        for (size_t q = 0; q < (size_t)dw * dh * 3; q++) { h ^= dst[q]; h *= 1099511628211ull; }
        CHECK_MSG(h == want, "resize %dx%d -> %dx%d differs from cv2 (hash)", sw, sh, dw, dh);
        free(src);
        free(dst);
    }
    CHECK(json_array_size(big) == 6);
    json_decref(big);
}

/* ---- color_aug pieces vs cv2 + albumentations' formulas -------------------------------------- */
static void test_color_aug(void) {
    char *p = ds_path("color_aug.safetensors");
    struct lora_file *f = NULL;
    CHECK_STATUS(st_open(ctx, p, &f), LORA_OK);
    free(p);
    if (!f) return;
    int64_t si = ref_find(f, "src");
    CHECK(si >= 0);
    if (si < 0) { st_close(f); return; }
    size_t n = 24 * 24 * 3;
    uint8_t *buf = malloc(n);
    const double hue[4] = { -8.0, -3.5, 2.25, 7.9 }, gam[3] = { 0.95, 1.0123, 1.05 };
    for (int i = 0; i < 7; i++) {
        char name[16];
        snprintf(name, sizeof name, i < 4 ? "hue%d" : "gamma%d", i < 4 ? i : i - 4);
        int64_t di = ref_find(f, name);
        CHECK(di >= 0);
        if (di < 0) continue;
        memcpy(buf, st_data(f, si), n);
        if (i < 4) ds_aug_hue_shift(buf, n / 3, hue[i]);
        else ds_aug_gamma(buf, n, gam[i - 4]);
        const uint8_t *want = st_data(f, di);
        int diff = 0, maxd = 0;
        for (size_t k = 0; k < n; k++) {
            int d = abs((int)buf[k] - (int)want[k]);
            diff += d != 0;
            if (d > maxd) maxd = d;
        }
        CHECK_MSG(diff == 0, "%s: %d of %zu bytes differ from cv2/albumentations (max %d)", name, diff, n, maxd);
    }
    free(buf);
    st_close(f);
}

/* ---- the folder tree vs kohya's DreamBoothDataset -------------------------------------------- */
static void tree_opts(struct ds_opts *o, char **train, char **reg) {
    ds_opts_default(o);
    *train = ds_path("tree/train");
    *reg = ds_path("tree/reg");
    o->train_data_dir = *train;
    o->reg_data_dir = *reg;
    o->width = o->height = 64;
    o->enable_bucket = 1;
    o->min_bucket_reso = 32;
    o->max_bucket_reso = 128;
    o->bucket_reso_steps = 16;
    o->seed = 1234;
}

static void test_tree(void) {
    char *p = ds_path("tree.json");
    json_error_t err;
    json_t *ref = json_load_file(p, 0, &err);
    CHECK_MSG(ref != NULL, "%s: %s", p, err.text);
    free(p);
    if (!ref) return;
    struct ds_opts o;
    char *train, *reg;
    tree_opts(&o, &train, &reg);
    struct lora_dataset *ds = NULL;
    CHECK_STATUS(ds_open(&ds, ctx, &o), LORA_OK);
    if (!ds) { json_decref(ref); free(train); free(reg); return; }
    CHECK(ds_num_train_images(ds) == json_integer_value(json_object_get(ref, "num_train_images")));
    CHECK(ds_num_reg_images(ds) == json_integer_value(json_object_get(ref, "num_reg_images_after_balancing")));
    CHECK(ds_num_reg_images_kohya(ds) == json_integer_value(json_object_get(ref, "num_reg_images")));
    json_t *imgs = json_object_get(ref, "images");
    CHECK_MSG(ds_num_images(ds) == (int64_t)json_array_size(imgs), "%lld images, kohya %zu", (long long)ds_num_images(ds), json_array_size(imgs));
    char *tree = ds_path("tree");
    size_t tl = strlen(tree);
    for (size_t i = 0; i < json_array_size(imgs) && (int64_t)i < ds_num_images(ds); i++) {
        json_t *e = json_array_get(imgs, i);
        struct ds_image_info info;
        const char *path = ds_image_info(ds, (int64_t)i, &info);
        const char *want_path = json_string_value(json_object_get(e, "path"));
        CHECK_MSG(path && strncmp(path, tree, tl) == 0 && strcmp(path + tl + 1, want_path) == 0, "image %zu: %s, kohya %s", i, path, want_path);
        CHECK_MSG(info.repeats == json_integer_value(json_object_get(e, "repeats")), "%s: repeats %d", want_path, info.repeats);
        CHECK(info.is_reg == json_integer_value(json_object_get(e, "is_reg")));
        const char *wc = json_string_value(json_object_get(e, "caption"));
        if (strncmp(wc, "\xEF\xBB\xBF", 3) == 0) wc += 3;   /* we strip the UTF-8 BOM kohya keeps */
        CHECK_MSG(strcmp(info.caption, wc) == 0, "%s: caption '%s', kohya '%s'", want_path, info.caption, wc);
        json_t *sz = json_object_get(e, "size"), *bk = json_object_get(e, "bucket"), *rs = json_object_get(e, "resized");
        CHECK(info.width == json_integer_value(json_array_get(sz, 0)) && info.height == json_integer_value(json_array_get(sz, 1)));
        CHECK(info.bucket_w == json_integer_value(json_array_get(bk, 0)) && info.bucket_h == json_integer_value(json_array_get(bk, 1)));
        CHECK(info.resized_w == json_integer_value(json_array_get(rs, 0)) && info.resized_h == json_integer_value(json_array_get(rs, 1)));
    }
    free(tree);
    json_t *bks = json_object_get(ref, "buckets");
    CHECK((size_t)ds_num_buckets(ds) == json_array_size(bks));
    for (int32_t k = 0; k < ds_num_buckets(ds) && (size_t)k < json_array_size(bks); k++) {
        json_t *e = json_array_get(bks, (size_t)k);
        int32_t w, h;
        int64_t n = ds_bucket_info(ds, k, &w, &h);
        CHECK(n == json_integer_value(json_object_get(e, "count")));
        CHECK(w == json_integer_value(json_array_get(json_object_get(e, "reso"), 0)));
        CHECK(h == json_integer_value(json_array_get(json_object_get(e, "reso"), 1)));
    }
    char *js = NULL;
    CHECK_STATUS(ds_dataset_dirs_json(ds, "train", &js), LORA_OK);
    CHECK_MSG(js && strcmp(js, json_string_value(json_object_get(ref, "ss_dataset_dirs"))) == 0, "ss_dataset_dirs %s", js);
    lora_free(ctx, js);
    CHECK_STATUS(ds_dataset_dirs_json(ds, "reg", &js), LORA_OK);
    CHECK_MSG(js && strcmp(js, json_string_value(json_object_get(ref, "ss_reg_dataset_dirs"))) == 0, "ss_reg_dataset_dirs %s", js);
    lora_free(ctx, js);
    CHECK_STATUS(ds_bucket_info_json(ds, &js), LORA_OK);
    CHECK_MSG(js && strcmp(js, json_string_value(json_object_get(ref, "ss_bucket_info"))) == 0, "ss_bucket_info %s", js);
    lora_free(ctx, js);
    CHECK_STATUS(ds_tag_frequency_json(ds, &js), LORA_OK);
    CHECK_MSG(js && strcmp(js, json_string_value(json_object_get(ref, "ss_tag_frequency_feb"))) == 0, "ss_tag_frequency %s\nwant %s", js,
              json_string_value(json_object_get(ref, "ss_tag_frequency_feb")));
    lora_free(ctx, js);
    ds_free(ds);
    /* len(dataloader) per batch size */
    const char *key;
    json_t *v;
    json_object_foreach(json_object_get(ref, "len_by_batch"), key, v) {
        o.batch_size = atoi(key);
        ds = NULL;
        CHECK_STATUS(ds_open(&ds, ctx, &o), LORA_OK);
        CHECK_MSG(ds && ds_batches_per_epoch(ds) == json_integer_value(v), "batch %s: %lld batches, kohya %lld", key,
                  (long long)(ds ? ds_batches_per_epoch(ds) : -1), (long long)json_integer_value(v));
        ds_free(ds);
    }
    json_decref(ref);
    free(train);
    free(reg);
}

/* ---- caption processing (hand-derived properties) ---------------------------------------------- */
static struct lora_dataset *open_with(struct ds_opts *o) {
    struct lora_dataset *ds = NULL;
    lora_status s = ds_open(&ds, ctx, o);
    CHECK_MSG(s == LORA_OK, "ds_open: %s", lora_errmsg(ctx));
    return ds;
}

static void test_captions(void) {
    struct ds_opts o;
    char *train, *reg;
    tree_opts(&o, &train, &reg);
    const char *cap = " a , b,c, d ,e";
    /* shuffle with keep_tokens 2: "a, b" first always, then a permutation of c, d, e */
    o.shuffle_caption = 1;
    o.keep_tokens = 2;
    struct lora_dataset *ds = open_with(&o);
    if (ds) {
        int perm_count[6] = {0}, bad = 0;
        const char *perms[6] = { "a, b, c, d, e", "a, b, c, e, d", "a, b, d, c, e", "a, b, d, e, c", "a, b, e, c, d", "a, b, e, d, c" };
        const int N = 3000;
        for (int i = 0; i < N; i++) {
            char *out;
            CHECK_STATUS(ds_process_caption(ds, 1 + i / 100, i % 100, 0, cap, &out), LORA_OK);
            int m = -1;
            for (int k = 0; k < 6; k++) if (strcmp(out, perms[k]) == 0) m = k;
            if (m < 0) bad++; else perm_count[m]++;
            lora_free(ctx, out);
        }
        CHECK_MSG(bad == 0, "%d shuffled captions are not 'a, b' + a permutation of c, d, e", bad);
        for (int k = 0; k < 6; k++) CHECK_MSG(perm_count[k] > N / 6 * 0.8 && perm_count[k] < N / 6 * 1.2, "perm %d: %d", k, perm_count[k]);
        /* same (epoch, index, slot) -> same result; a keep_tokens larger than the tag count keeps all */
        char *x, *y;
        ds_process_caption(ds, 5, 7, 1, cap, &x);
        ds_process_caption(ds, 5, 7, 1, cap, &y);
        CHECK(strcmp(x, y) == 0);
        lora_free(ctx, x); lora_free(ctx, y);
        ds_process_caption(ds, 5, 7, 1, "x,y", &x);
        CHECK(strcmp(x, "x, y") == 0);
        lora_free(ctx, x);
        ds_free(ds);
    }
    /* caption dropout rate 0.3; every 3rd epoch dropped */
    free(train); free(reg);
    tree_opts(&o, &train, &reg);
    o.caption_dropout_rate = 0.3;
    ds = open_with(&o);
    if (ds) {
        int drop = 0;
        const int N = 4000;
        for (int i = 0; i < N; i++) {
            char *out;
            ds_process_caption(ds, 1 + i / 500, i % 500, 0, cap, &out);
            drop += out[0] == 0;
            if (out[0]) CHECK(strcmp(out, cap) == 0);   /* no shuffle: unchanged, not even stripped */
            lora_free(ctx, out);
        }
        CHECK_MSG(fabs(drop / (double)N - 0.3) < 0.03, "dropout fraction %g", drop / (double)N);
        ds_free(ds);
    }
    free(train); free(reg);
    tree_opts(&o, &train, &reg);
    o.caption_dropout_every_n_epochs = 3;
    ds = open_with(&o);
    if (ds) {
        for (int e = 1; e <= 7; e++) {
            char *out;
            ds_process_caption(ds, e, 0, 0, cap, &out);
            CHECK_MSG((out[0] == 0) == (e % 3 == 0), "epoch %d: '%s'", e, out);
            lora_free(ctx, out);
        }
        ds_free(ds);
    }
    /* tag dropout 0.5 with keep_tokens 1, no shuffle: "a" always, others kept in order ~50% */
    free(train); free(reg);
    tree_opts(&o, &train, &reg);
    o.caption_tag_dropout_rate = 0.5;
    o.keep_tokens = 1;
    ds = open_with(&o);
    if (ds) {
        int kept[5] = {0}, order_bad = 0;
        const int N = 4000;
        for (int i = 0; i < N; i++) {
            char *out;
            ds_process_caption(ds, 1, i, 0, cap, &out);
            CHECK(strncmp(out, "a", 1) == 0);
            const char *tags[5] = { "a", "b", "c", "d", "e" };
            int last = -1;
            char *save = NULL;
            for (char *t = strtok_r(out, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                while (*t == ' ') t++;
                for (int k = 0; k < 5; k++) if (strcmp(t, tags[k]) == 0) { kept[k]++; if (k <= last) order_bad++; last = k; }
            }
            lora_free(ctx, out);
        }
        CHECK(kept[0] == N);
        CHECK(order_bad == 0);
        for (int k = 1; k < 5; k++) CHECK_MSG(fabs(kept[k] / (double)N - 0.5) < 0.04, "tag %d kept %d", k, kept[k]);
        ds_free(ds);
    }
    free(train);
    free(reg);
}

/* ---- determinism and pixels --------------------------------------------------------------------- */
static uint64_t hash_batch(const struct ds_batch *b) {
    uint64_t h = 1469598103934665603ull;
    const uint8_t *p = (const uint8_t *)b->pixels;
    size_t n = (size_t)b->n * 3 * b->width * b->height * sizeof(float);
    for (size_t i = 0; p && i < n; i++) { h ^= p[i]; h *= 1099511628211ull; }
    for (int i = 0; i < b->n; i++)
        for (const char *c = b->captions[i]; *c; c++) { h ^= (uint8_t)*c; h *= 1099511628211ull; }
    h ^= (uint64_t)b->width << 20 ^ (uint64_t)b->height;
    return h;
}

static void test_determinism(void) {
    struct ds_opts o;
    char *train, *reg;
    tree_opts(&o, &train, &reg);
    o.flip_aug = 1;
    o.random_crop = 1;
    o.color_aug = 1;
    o.shuffle_caption = 1;
    o.batch_size = 2;
    struct lora_dataset *a = open_with(&o), *b = open_with(&o);
    if (a && b) {
        int64_t nb = ds_batches_per_epoch(a);
        uint64_t *h1 = calloc((size_t)nb, 8), *h2 = calloc((size_t)nb, 8);
        struct ds_batch bt;
        for (int64_t i = 0; i < nb; i++) { CHECK_STATUS(ds_batch(a, 1, i, &bt), LORA_OK); h1[i] = hash_batch(&bt); }
        /* another instance, reverse order, an epoch-2 call in between: same batches */
        CHECK_STATUS(ds_batch(b, 2, 0, &bt), LORA_OK);
        int same = 1;
        for (int64_t i = nb - 1; i >= 0; i--) { ds_batch(b, 1, i, &bt); if (hash_batch(&bt) != h1[i]) same = 0; }
        CHECK_MSG(same, "epoch 1 batches differ between runs / call orders");
        int differ = 0;
        for (int64_t i = 0; i < nb; i++) { ds_batch(a, 2, i, &bt); h2[i] = hash_batch(&bt); differ += h2[i] != h1[i]; }
        CHECK_MSG(differ > nb / 2, "epoch 2 equals epoch 1 in %lld of %lld batches", (long long)(nb - differ), (long long)nb);
        /* an epoch covers every image exactly repeats times (reg included) */
        int64_t total = 0, reg_n = 0;
        for (int64_t i = 0; i < nb; i++) {
            ds_batch(a, 3, i, &bt);
            total += bt.n;
            for (int k = 0; k < bt.n; k++) {
                reg_n += bt.is_reg[k];
                CHECK(bt.loss_weights[k] == 1.0f);
                for (int64_t q = 0; q < (int64_t)bt.n * 3 * bt.width * bt.height; q++)
                    if (!(bt.pixels[q] >= -1.f && bt.pixels[q] <= 1.f)) { CHECK(0); break; }
            }
        }
        CHECK(total == ds_num_train_images(a) + ds_num_reg_images(a));
        CHECK(reg_n == ds_num_reg_images(a));
        free(h1); free(h2);
    }
    ds_free(a);
    ds_free(b);
    /* no augmentation: pixels are the decoded image resized (cv2-checked) and centre-cropped;
     * prior_loss_weight on reg samples */
    free(train); free(reg);
    tree_opts(&o, &train, &reg);
    o.prior_loss_weight = 0.25;
    struct lora_dataset *ds = open_with(&o);
    if (ds) {
        int checked = 0;
        struct ds_batch bt;
        for (int64_t i = 0; i < ds_batches_per_epoch(ds); i++) {
            CHECK_STATUS(ds_batch(ds, 1, i, &bt), LORA_OK);
            CHECK(bt.loss_weights[0] == (bt.is_reg[0] ? 0.25f : 1.0f));
            if (strcmp(bt.captions[0], "cat, sitting") != 0 || checked) continue;
            /* e.png: 128x64 -> resized 96x48 -> bucket 80x48, crop x offset 8 */
            char *p = ds_path("tree/train/2_cat/e.png");
            struct img_limits lim;
            img_limits_default(&lim);
            struct img_rgb8 im;
            CHECK_STATUS(img_load_rgb8(ctx, p, &lim, &im), LORA_OK);
            uint8_t *rs = malloc(96 * 48 * 3);
            img_resize_area_u8(ctx, im.data, 128, 64, rs, 96, 48, 3);
            CHECK(bt.width == 80 && bt.height == 48);
            int bad = 0;
            for (int y = 0; y < 48; y++)
                for (int x = 0; x < 80; x++)
                    for (int c = 0; c < 3; c++) {
                        float want = ((float)rs[(y * 96 + x + 8) * 3 + c] / 255.f - 0.5f) / 0.5f;
                        if (bt.pixels[(size_t)c * 80 * 48 + (size_t)y * 80 + x] != want) bad++;
                    }
            CHECK_MSG(bad == 0, "e.png: %d pixels differ", bad);
            checked = 1;
            free(rs);
            img_free(ctx, &im);
            free(p);
        }
        CHECK(checked);
        ds_free(ds);
    }
    free(train);
    free(reg);
}

/* ---- no bucketing: images must already be the resolution (or larger with random_crop) ---- */
static void test_no_bucket(void) {
    struct ds_opts o;
    char *train, *reg;
    tree_opts(&o, &train, &reg);
    o.enable_bucket = 0;
    struct lora_dataset *ds = open_with(&o);
    if (ds) {
        /* only the 64x64 images are usable: a.png (3 repeats) and r1.png; the rest are skipped by name */
        CHECK(ds_num_train_images(ds) == 3);
        CHECK(ds_num_reg_images(ds) == 3);      /* r1.png, 1 repeat, raised to 3 */
        CHECK(ds_num_skipped(ds) == 7);   /* b c e f r2 r3 r4 */
        int named = 0;
        for (int64_t k = 0; k < ds_num_skipped(ds); k++) named += strstr(ds_skipped_message(ds, k), "e.png") != NULL;
        CHECK(named == 1);
        CHECK(ds_num_buckets(ds) == 1 && ds_batches_per_epoch(ds) == 6);
        ds_free(ds);
    }
    o.random_crop = 1;
    o.batch_size = 4;
    ds = open_with(&o);
    if (ds) {
        CHECK(ds_num_train_images(ds) == 13);   /* r3.png (48x64) is the only one too small */
        CHECK(ds_num_skipped(ds) == 1 && strstr(ds_skipped_message(ds, 0), "r3.png") != NULL);
        int64_t total = ds_num_train_images(ds) + ds_num_reg_images(ds);
        CHECK(ds_num_reg_images(ds) >= 13);
        CHECK(ds_batches_per_epoch(ds) == (total + 3) / 4);
        struct ds_batch bt;
        CHECK_STATUS(ds_batch(ds, 1, 0, &bt), LORA_OK);
        CHECK(bt.width == 64 && bt.height == 64 && bt.n == 4);
        ds_free(ds);
    }
    free(train);
    free(reg);
}

/* ---- face_crop_aug_range (no bucketing): hand-derived scale and crop ------------------------- */
static void test_face_crop(void) {
    struct ds_opts o;
    ds_opts_default(&o);
    char *train = ds_path("face");
    o.train_data_dir = train;
    o.width = o.height = 64;
    o.face_crop_aug_range[0] = o.face_crop_aug_range[1] = 2.0;
    struct lora_dataset *ds = open_with(&o);
    if (ds) {
        /* 200x160, face 40 at (100, 80): scale = min(1, max(max(64/160, 64/200), 64/(40*2))) = 0.8
         * -> 160x128, face at (80, 64), crop x 80-32 = 48, y 64-32 = 32 */
        struct ds_batch bt;
        CHECK_STATUS(ds_batch(ds, 1, 0, &bt), LORA_OK);
        CHECK(bt.width == 64 && bt.height == 64);
        char *p = ds_path("face/1_face/x_100_80_40_40.png");
        struct img_limits lim;
        img_limits_default(&lim);
        struct img_rgb8 im;
        CHECK_STATUS(img_load_rgb8(ctx, p, &lim, &im), LORA_OK);
        uint8_t *rs = malloc(160 * 128 * 3);
        img_resize_area_u8(ctx, im.data, 200, 160, rs, 160, 128, 3);
        int bad = 0;
        for (int y = 0; y < 64; y++)
            for (int x = 0; x < 64; x++)
                for (int c = 0; c < 3; c++) {
                    float want = ((float)rs[((y + 32) * 160 + x + 48) * 3 + c] / 255.f - 0.5f) / 0.5f;
                    bad += bt.pixels[(size_t)c * 64 * 64 + (size_t)y * 64 + x] != want;
                }
        CHECK_MSG(bad == 0, "face crop: %d values differ", bad);
        free(rs);
        img_free(ctx, &im);
        free(p);
        ds_free(ds);
    }
    /* without face_crop_aug_range the larger image is refused (no bucketing, no random_crop) */
    o.face_crop_aug_range[0] = o.face_crop_aug_range[1] = 0;
    o.bad_input = DS_BAD_REFUSE;
    struct lora_dataset *d2 = NULL;
    CHECK_STATUS(ds_open(&d2, ctx, &o), LORA_E_CONFIG_RANGE);
    CHECK(strstr(lora_errmsg(ctx), "x_100_80_40_40.png") != NULL);
    double fr[2];
    CHECK_STATUS(ds_parse_face_crop_range(ctx, "2.0, 4", fr), LORA_OK);
    CHECK(fr[0] == 2.0 && fr[1] == 4.0);
    CHECK_STATUS(ds_parse_face_crop_range(ctx, "", fr), LORA_OK);
    CHECK(fr[0] == 0 && fr[1] == 0);
    CHECK_STATUS(ds_parse_face_crop_range(ctx, "4,2", fr), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(ds_parse_face_crop_range(ctx, "2,x", fr), LORA_E_CONFIG_RANGE);
    CHECK_STATUS(ds_parse_face_crop_range(ctx, "0.5", fr), LORA_E_CONFIG_RANGE);
    /* a range with a = 0 is refused */
    o.face_crop_aug_range[1] = 2;
    CHECK_STATUS(ds_open(&d2, ctx, &o), LORA_E_CONFIG_RANGE);
    free(train);
}

/* ---- latent cache --------------------------------------------------------------------------- */
struct enc_state { int calls; };

/* A stand-in for the VAE: latent channel c = mean of pixel channel (c % 3) over each 8x8 cell,
 * plus c. */
static lora_status fake_encode(void *user, const float *px, int32_t n, int32_t h, int32_t w, float *lat) {
    struct enc_state *st = user;
    st->calls++;
    int32_t lh = h / 8, lw = w / 8;
    for (int32_t i = 0; i < n; i++)
        for (int c = 0; c < 4; c++)
            for (int32_t y = 0; y < lh; y++)
                for (int32_t x = 0; x < lw; x++) {
                    double s = 0;
                    for (int dy = 0; dy < 8; dy++)
                        for (int dx = 0; dx < 8; dx++)
                            s += px[(((size_t)i * 3 + c % 3) * h + y * 8 + dy) * w + x * 8 + dx];
                    lat[(((size_t)i * 4 + c) * lh + y) * lw + x] = (float)(s / 64 + c);
                }
    return LORA_OK;
}

static int copy_file(const char *from, const char *to) {
    size_t n;
    uint8_t *b = test_slurp(from, &n);
    if (!b) return 0;
    FILE *f = fopen(to, "wb");
    int ok = f && fwrite(b, 1, n, f) == n;
    if (f) fclose(f);
    free(b);
    return ok;
}

static int copy_tree(const char *from, const char *to) {
    mkdir(to, 0755);
    DIR *d = opendir(from);
    if (!d) return 0;
    struct dirent *e;
    int ok = 1;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *a = test_path_join(from, e->d_name), *b = test_path_join(to, e->d_name);
        struct stat sb;
        if (stat(a, &sb) == 0 && S_ISDIR(sb.st_mode)) ok &= copy_tree(a, b);
        else if (!strstr(e->d_name, ".lora_latents")) ok &= copy_file(a, b);
        free(a); free(b);
    }
    closedir(d);
    return ok;
}

static void test_cache(void) {
    char tmpl[] = "/tmp/lora_ds_cache_XXXXXX";
    char *tmp = mkdtemp(tmpl);
    CHECK(tmp != NULL);
    if (!tmp) return;
    char *src = ds_path("tree");
    CHECK(copy_tree(src, tmp));
    free(src);
    char *train = test_path_join(tmp, "train"), *reg = test_path_join(tmp, "reg");
    struct ds_opts o;
    ds_opts_default(&o);
    o.train_data_dir = train;
    o.reg_data_dir = reg;
    o.width = o.height = 64;
    o.enable_bucket = 1;
    o.min_bucket_reso = 32;
    o.max_bucket_reso = 128;
    o.bucket_reso_steps = 16;
    o.flip_aug = 1;
    o.cache = DS_CACHE_DISK;
    struct enc_state st = {0};
    struct lora_dataset *ds = open_with(&o);
    int64_t n_img = ds ? ds_num_images(ds) : 0;
    if (ds) {
        CHECK_STATUS(ds_cache_latents(ds, fake_encode, &st), LORA_OK);
        CHECK(st.calls == 2 * n_img);   /* image and its mirror */
        struct ds_batch bt;
        CHECK_STATUS(ds_batch(ds, 1, 0, &bt), LORA_OK);
        CHECK(bt.pixels == NULL && bt.latents != NULL);
        /* the latent equals the fake encoding of the (possibly flipped) pixels: channel 3 - 3 =
         * channel 0 */
        int32_t lw = bt.width / 8, lh = bt.height / 8;
        CHECK_NEAR(bt.latents[3 * lh * lw] - 3.0f, bt.latents[0], 1e-5);
        ds_free(ds);
    }
    /* reopen: everything from disk */
    st.calls = 0;
    ds = open_with(&o);
    if (ds) {
        CHECK_STATUS(ds_cache_latents(ds, fake_encode, &st), LORA_OK);
        CHECK_MSG(st.calls == 0, "%d encoder calls with a warm disk cache", st.calls);
        ds_free(ds);
    }
    /* change one image (same size, new content): only it is encoded again */
    char *a = test_path_join(train, "3_sks dog/a.png");
    char *r1 = test_path_join(reg, "1_dog/r1.png");
    CHECK(copy_file(r1, a));      /* both are 64x64 PNGs */
    st.calls = 0;
    ds = open_with(&o);
    if (ds) {
        CHECK_STATUS(ds_cache_latents(ds, fake_encode, &st), LORA_OK);
        CHECK_MSG(st.calls == 2, "%d encoder calls after one image changed", st.calls);
        ds_free(ds);
    }
    /* cache with color_aug is refused, as kohya asserts */
    o.color_aug = 1;
    ds = open_with(&o);
    if (ds) {
        CHECK_STATUS(ds_cache_latents(ds, fake_encode, &st), LORA_E_CONFIG_RANGE);
        ds_free(ds);
    }
    free(a); free(r1); free(train); free(reg);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
}

int main(void) {
    data_dir = getenv("LORA_TEST_DATA");
    if (!data_dir) { fprintf(stderr, "LORA_TEST_DATA not set\n"); return 1; }
    if (lora_ctx_create(LORA_ABI_VERSION, &ctx) != LORA_OK) return 1;
    test_buckets();
    test_resize();
    test_color_aug();
    test_tree();
    test_captions();
    test_determinism();
    test_no_bucket();
    test_face_crop();
    test_cache();
    lora_ctx_free(ctx);
    return test_finish("test_dataset");
}
