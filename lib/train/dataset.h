/* kohya-ss DreamBooth-style dataset (spec/kohya-lora.md §5.1-5.4): folders
 * "<repeats>_<caption>" under train_data_dir / reg_data_dir, caption files, caption processing,
 * aspect-ratio buckets, augmentation, and the latent cache.
 *
 * Determinism contract (what makes resume exact): everything random about epoch e (batch
 * order, shuffle/dropout of captions, flip, colour, random crop) is a pure function of
 * (seed, e, batch index); ds_batch() keeps no hidden RNG state between calls, so a trainer
 * resumed at (epoch, batch index) sees exactly the batches an uninterrupted run would.
 *
 *   ds_open(&ds, ctx, &opts)            scan folders, read image headers and captions, make
 *                                       buckets; bad files reported by name (skipped or refused)
 *   ds_cache_latents(ds, encode, user)  optional: VAE-encode every image once (memory / disk)
 *   ds_batches_per_epoch(ds)            = len(kohya's dataloader)
 *   ds_batch(ds, epoch, index, &b)      decode + resize/crop + augment batch `index` of epoch
 *   ds_free(ds)
 *
 * Implementation notes (lib/train/dataset.c):
 *  - Order: folder names and, per extension (png, jpg, jpeg, webp, bmp; lower case only, as
 *    kohya's glob on Linux), file names are sorted (kohya takes file-system order); every count
 *    (num_train_images, reg balancing, buckets, len(dataloader)) follows from that order as in
 *    train_util.py. Reg images kohya's balancing leaves unused are dropped after scanning.
 *  - Randomness: Philox4x32-10 keyed by the seed, counter (epoch, stream, batch index, slot):
 *    the (bucket, batch) order and per-bucket shuffles per epoch, and per sample the flip (or
 *    flipped-latent) draw, caption dropout, shuffle, tag dropout, colour aug, random crop.
 *  - Captions: first line, Python str.strip() whitespace, one UTF-8 BOM stripped (kohya keeps
 *    it as U+FEFF), CR/LF/CRLF ends a line; an empty file, UTF-16, invalid UTF-8 and NUL are
 *    bad files (LORA_E_CAPTION_ENCODING), a first line above 64 KiB LORA_E_CAPTION_TOO_LONG.
 *  - Images: headers only at ds_open (PNG without a final IEND counts as truncated), unless
 *    verify_images; EXIF orientation is applied (kohya ignores it). Without enable_bucket and
 *    without a latent cache, an image whose size is not the resolution (or, with random_crop,
 *    at least it) is a bad file at ds_open instead of kohya's assertion during training.
 *  - A decode failure inside ds_batch (a file changed or damaged after ds_open) returns the
 *    error naming the file; ds_batch allocates only per-image decode buffers.
 *  - Disk cache: "<image file>.lora_latents" beside the image (magic, file size, mtime, FNV-1a
 *    64 content hash, bucket/resized sizes, then float32 latents, the flipped set after), written
 *    atomically; any mismatch re-encodes.
 */
#ifndef LORA_TRAIN_DATASET_H
#define LORA_TRAIN_DATASET_H

#include "internal.h"

#define DS_BAD_SKIP   0   /* report a bad image/caption by name through the log and skip it */
#define DS_BAD_REFUSE 1   /* fail ds_open with LORA_E_* naming the file */

#define DS_CACHE_NONE   0
#define DS_CACHE_MEMORY 1
#define DS_CACHE_DISK   2 /* beside each image, invalidated when the image changes */

struct ds_opts {
    const char *train_data_dir;      /* parent of "<repeats>_<caption>" folders (required) */
    const char *reg_data_dir;        /* may be NULL */
    const char *caption_extension;   /* NULL: ".caption" */
    int32_t shuffle_caption, keep_tokens;
    double caption_dropout_rate;
    int32_t caption_dropout_every_n_epochs;
    double caption_tag_dropout_rate;
    int32_t width, height;           /* resolution */
    int32_t enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale;
    int32_t flip_aug, color_aug, random_crop;
    double prior_loss_weight;        /* loss weight of reg images (train images: 1) */
    int32_t batch_size;
    int32_t bad_input;               /* DS_BAD_SKIP / DS_BAD_REFUSE */
    int32_t cache;                   /* DS_CACHE_* (set before ds_cache_latents) */
    uint64_t seed;
    /* Extensions (Since 0.2.0; ds_opts_default sets them): */
    int32_t verify_images;           /* 1: decode every image fully at ds_open (else header only) */
    double face_crop_aug_range[2];   /* kohya's --face_crop_aug_range a,b; {0, 0} = off. Used
                                        without enable_bucket for files named ..._cx_cy_w_h */
};
/* kohya defaults: ".caption", 512x512, buckets 256..1024 step 64, prior_loss_weight 1,
 * batch 1, DS_BAD_SKIP, no cache, everything else off/0. */
void ds_opts_default(struct ds_opts *o);

struct ds_batch {
    int32_t n;                /* images in this batch (the last of a bucket may be short) */
    int32_t width, height;    /* pixel size of this batch's bucket */
    float *pixels;            /* [n, 3, height, width] in [-1, 1]; NULL when latents are given */
    float *latents;           /* [n, 4, height/8, width/8] UNSCALED posterior samples when cached,
                                 else NULL (multiply by 0.18215 before the U-Net) */
    const char **captions;    /* [n] processed captions (UTF-8, owned by the dataset) */
    float *loss_weights;      /* [n]: 1 for train images, prior_loss_weight for reg images */
    const int32_t *is_reg;    /* [n] 1 for regularisation images */
};

struct lora_dataset;

lora_status ds_open(struct lora_dataset **out, lora_ctx *ctx, const struct ds_opts *o);
void ds_free(struct lora_dataset *ds);

int64_t ds_num_train_images(const struct lora_dataset *ds);  /* Σ repeats × images */
int64_t ds_num_reg_images(const struct lora_dataset *ds);    /* after kohya's balancing */
int64_t ds_batches_per_epoch(const struct lora_dataset *ds); /* Σ_buckets ceil(count/batch) */
/* Largest bucket area w*h (pixels per image); *max_w / *max_h the largest width and height over
 * all buckets (possibly of different buckets), for sizing buffers. */
int32_t ds_max_batch_pixels(const struct lora_dataset *ds, int32_t *max_w, int32_t *max_h);

/* Encoder callback for the latent cache: pixels [n, 3, h, w] in [-1, 1] -> unscaled latents
 * [n, 4, h/8, w/8] (posterior mean + std * noise as kohya, the noise drawn by the caller). */
typedef lora_status (*ds_encode_fn)(void *user, const float *pixels, int32_t n, int32_t h,
                                    int32_t w, float *latents);
lora_status ds_cache_latents(struct lora_dataset *ds, ds_encode_fn encode, void *user);

/* Fills *b for batch `index` (0 <= index < ds_batches_per_epoch) of `epoch` (1-based as
 * kohya counts). The buffers stay owned by the dataset and valid until the next ds_batch or
 * ds_free. */
lora_status ds_batch(struct lora_dataset *ds, int64_t epoch, int64_t index, struct ds_batch *b);

/* Per-folder tag frequency ({"folder": {"tag": count}}) as kohya's ss_tag_frequency JSON,
 * and the ss_dataset_dirs JSON ({"folder": {"n_repeats": r, "img_count": n}}); malloc'd
 * strings from lora_malloc(ctx), owned by the caller (lora_free). */
lora_status ds_tag_frequency_json(const struct lora_dataset *ds, char **out);
lora_status ds_dataset_dirs_json(const struct lora_dataset *ds, const char *which /* "train"|"reg" */, char **out);

/* ---- extensions (Since 0.2.0) ---- */

/* kohya's ss_bucket_info: {"buckets": {"i": {"resolution": [w, h], "count": n}},
 * "mean_img_ar_error": x} (x as Python's repr, averaged with numpy's pairwise sum), or "null"
 * without enable_bucket. lora_malloc'd, caller frees. */
lora_status ds_bucket_info_json(const struct lora_dataset *ds, char **out);

/* kohya's dataset.num_reg_images, which train_network.py writes as ss_num_reg_images: the reg
 * count BEFORE balancing (sum of folder repeats x usable images), unlike ds_num_reg_images. */
int64_t ds_num_reg_images_kohya(const struct lora_dataset *ds);

/* Files skipped under DS_BAD_SKIP, each with the message naming the file. */
int64_t ds_num_skipped(const struct lora_dataset *ds);
const char *ds_skipped_message(const struct lora_dataset *ds, int64_t i);   /* NULL out of range */

/* Buckets in kohya's sorted order: pixel size, and image count including repeats (-1 when k
 * is out of range). */
int32_t ds_num_buckets(const struct lora_dataset *ds);
int64_t ds_bucket_info(const struct lora_dataset *ds, int32_t k, int32_t *w, int32_t *h);

/* Registered images (train first, then the reg images kohya's balancing uses). */
struct ds_image_info {
    int32_t width, height;          /* after EXIF orientation */
    int32_t bucket_w, bucket_h, resized_w, resized_h;
    int32_t repeats, is_reg;        /* repeats after reg balancing */
    const char *caption;            /* raw caption (folder caption when no caption file) */
};
int64_t ds_num_images(const struct lora_dataset *ds);
const char *ds_image_info(const struct lora_dataset *ds, int64_t i, struct ds_image_info *info); /* path or NULL */

/* kohya's process_caption for `cap` with the random draws ds_batch uses for sample `slot` of
 * batch `index` in `epoch`. *out is lora_malloc'd (caller frees). For tests. */
lora_status ds_process_caption(struct lora_dataset *ds, int64_t epoch, int64_t index, int32_t slot,
                               const char *cap, char **out);

/* model_util.make_bucket_resolutions into out[0..cap) as (w, h) pairs sorted; returns the count. */
struct ds_reso { int32_t w, h; };
int32_t ds_bucket_resolutions(int32_t max_w, int32_t max_h, int32_t min_size, int32_t max_size,
                              int32_t divisible, struct ds_reso *out, int32_t cap);
/* "a,b" (kohya's --face_crop_aug_range value, plain decimals) -> out; "" or NULL -> {0, 0}.
 * Errors: LORA_E_CONFIG_RANGE unless 0 < a <= b. */
lora_status ds_parse_face_crop_range(lora_ctx *ctx, const char *s, double out[2]);

/* color_aug pieces on RGB8 pixels (albumentations HueSaturationValue hue-only / RandomGamma). */
void ds_aug_hue_shift(uint8_t *rgb, size_t npix, double shift);
void ds_aug_gamma(uint8_t *rgb, size_t nbytes, double gamma);

/* BucketManager.select_bucket for one image size under `o` (enable_bucket, bucket_no_upscale,
 * resolution, bucket limits): out = {bucket_w, bucket_h, resized_w, resized_h}. */
lora_status ds_assign_bucket(lora_ctx *ctx, const struct ds_opts *o, int32_t w, int32_t h, int32_t out[4]);

#endif
