/* The training loop of kohya-ss train_network.py (spec/kohya-lora.md §5.5) behind
 * lora_trainer (lib/api/trainer.c): options, dataset, latent cache, per-step noise and
 * timesteps from the seed, gradient accumulation with accelerate 0.15's semantics, the LR
 * schedule, the fp16 loss scaler, epoch/step bookkeeping, periodic saves with kohya's names and
 * ss_* metadata (metadata.c), and the resumable state file (state.c).
 *
 * Batches come from a trainer_source: the DreamBooth dataset (dataset.h) unless a caller (a
 * test) passes its own. */
#ifndef LORA_TRAIN_TRAINER_H
#define LORA_TRAIN_TRAINER_H

#include "internal.h"
#include "core/rng.h"
#include "model/sd_model.h"
#include "model/tokenizer.h"
#include "model/vae.h"
#include "train/dataset.h"
#include "train/metadata.h"
#include "train/train.h"

/* Where batches come from. batch() fills *b as ds_batch does (epoch 1-based). */
struct trainer_source {
    void *user;
    int64_t n_train_images, n_reg_images, batches_per_epoch;
    lora_status (*batch)(void *user, int64_t epoch, int64_t index, struct ds_batch *b);
};

#define TRAINER_PATH 4096

/* Every option the run depends on, copied out of the caller's params. */
struct trainer_cfg {
    char model_path[TRAINER_PATH], train_data_dir[TRAINER_PATH], reg_data_dir[TRAINER_PATH];
    char output_dir[TRAINER_PATH], output_name[1024], network_weights[TRAINER_PATH];
    char training_comment[4096], optimizer_type[64], optimizer_args[1024], lr_scheduler[64];
    char mixed_precision[8], save_model_as[32], save_precision[8], caption_extension[256];
    char resolution[64];
    double learning_rate, unet_lr, text_encoder_lr, max_grad_norm, noise_offset, prior_loss_weight;
    double caption_dropout_rate, caption_tag_dropout_rate, lr_power, network_alpha, min_snr_gamma;
    int64_t max_train_steps, max_train_epochs, seed, batch_size, grad_accum, warmup, num_cycles;
    int64_t clip_skip, max_token_length, network_dim, save_every_n_epochs, save_last_n_epochs;
    int64_t save_n_epoch_ratio, save_every_n_steps, caption_dropout_every_n_epochs;
    int32_t v2, v_param, train_unet, train_te, cache_latents, cache_to_disk, gradient_checkpointing;
    int32_t shuffle_caption, keep_tokens, enable_bucket, min_bucket_reso, max_bucket_reso;
    int32_t bucket_reso_steps, bucket_no_upscale, flip_aug, color_aug, random_crop, save_state;
    int32_t no_metadata, bad_refuse, width, height;
};

#define LORA_TRAINER_MAGIC 0x54524e52u /* "TRNR" */

struct lora_trainer {
    uint32_t magic;
    lora_ctx *ctx;
    lora_model *model;
    lora_network *net;
    struct trainer_cfg c;
    struct trainer_source src;
    struct lora_dataset *ds;            /* when the source is the dataset */
    struct clip_model clip;
    struct unet_model unet;
    struct vae_model vae;
    int32_t have_clip, have_unet, have_vae, have_state;
    struct vae_plan vp;                 /* VAE plan for the last image shape */
    int32_t have_vp;
    float *vae_io;                      /* backend buffer: image, mean, logvar */
    float *vae_host;                    /* host copy of mean, logvar (sized with the plan) */
    lora_tokenizer *tok;
    struct train_state st;
    struct train_opts topts;
    struct train_lr_schedule sched;
    struct train_scaler scaler;
    struct lora_mt19937 rng;            /* torch's CPU generator: latents' sample, noise, timesteps */

    /* run bookkeeping (all of it goes into the state file) */
    int64_t global_step;                /* optimizer (synced) steps */
    int64_t sched_steps;                /* LR scheduler steps (every micro-step) */
    int64_t epoch;                      /* 0-based epoch in progress */
    int64_t batch_index;                /* next batch of the epoch */
    int64_t accum;                      /* micro-steps accumulated since the last sync */
    int32_t found_inf;                  /* fp16: a non-finite loss since the last sync */
    double loss_total;                  /* kohya's running sum over loss_list */
    double *loss_list;                  /* [batches_per_epoch] last loss at each position */
    int64_t loss_n;                     /* positions filled (epoch 0) */
    double *loss_undo;                  /* loss_list at the start of the optimizer step */
    double last_loss, last_norm, lr_unet, lr_te, images_per_s;
    int64_t max_train_steps, num_epochs, save_every_n_epochs;
    int32_t model_is_file;              /* pretrained_model_name_or_path is a file: its hashes */
    char model_legacy[9], model_sha[65];
    int64_t md_epoch;                   /* ss_epoch of the save in progress (0: the current epoch) */
    int64_t session_id;
    double started_at;
    int32_t finished;

    /* per-step buffers (grown as needed) */
    float *lat, *noise, *offs, *snr_w;
    int32_t *ids;
    int64_t *ts;
    int64_t buf_lat, buf_b;

    struct md_list meta;
};

/* Creates a trainer (see lora_trainer_create). `src` NULL: open the dataset named by opts. */
lora_status trainer_create(lora_model *model, lora_network *net, const lora_params *opts,
                           const struct trainer_source *src, struct lora_trainer **out);
void trainer_free(struct lora_trainer *tr);
/* Runs optimizer steps until `n_steps` more were taken or max_train_steps is reached; epoch-end
 * saves happen on the way (when output_dir is set). *done: steps taken. */
lora_status trainer_step(struct lora_trainer *tr, int64_t n_steps, int64_t *done);
/* To the end, then the final save (and state when save_state). */
lora_status trainer_run(struct lora_trainer *tr);
/* The final LoRA file and, with save_state, "{name}-state.safetensors". */
lora_status trainer_save_final(struct lora_trainer *tr);
/* Saves the network with the run's metadata to `path` (kohya's save_weights). */
lora_status trainer_save_network(struct lora_trainer *tr, const char *path);
/* Fills tr->meta with the ss_* keys (ss_epoch, ss_steps, ss_training_finished_at current). */
lora_status trainer_metadata(struct lora_trainer *tr);
/* The text describing the run's configuration ("key=value\n" lines) the state file checks
 * on resume. Written to buf (cap bytes). */
void trainer_fingerprint(const struct lora_trainer *tr, char *buf, size_t cap);

/* ---- state.c ---- */
lora_status trainer_save_state(const struct lora_trainer *tr, const char *path);
lora_status trainer_load_state(struct lora_trainer *tr, const char *path);

#endif
