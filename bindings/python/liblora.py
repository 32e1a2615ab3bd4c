"""Python binding for liblora through ctypes (no compiler needed).

    import liblora
    with liblora.Context() as ctx:
        params = ctx.params(network_dim=32, learning_rate=1e-4)
        with ctx.open_file("model.safetensors") as f:
            print(f.tensors(), f.metadata())

Keyword names are kohya's flag names, mapped through lora_param_lookup. Errors raise
LoraError with .code, .name and .category (= code // 100). A Context and the objects made
from it must be used by one thread at a time (see lora.h).
"""
import ctypes
import ctypes.util
import os

ABI_VERSION = 0


def _load(path=None):
    candidates = [path, os.environ.get("LIBLORA_PATH"), "liblora.so.%d" % ABI_VERSION, ctypes.util.find_library("lora")]
    for c in candidates:
        if c:
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    raise OSError("liblora.so.%d not found: set LIBLORA_PATH" % ABI_VERSION)


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load()
        L = _lib
        c_p, i32, i64, u32, u64, sz = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
        sig = {
            "lora_version": (u32, []), "lora_version_string": (ctypes.c_char_p, []),
            "lora_abi_version": (u32, []), "lora_build_features": (ctypes.c_char_p, []),
            "lora_backend_available": (i32, [i32]),
            "lora_status_name": (ctypes.c_char_p, [i32]), "lora_status_string": (ctypes.c_char_p, [i32]),
            "lora_errmsg": (ctypes.c_char_p, [c_p]),
            "lora_ctx_create": (i32, [u32, ctypes.POINTER(c_p)]), "lora_ctx_free": (None, [c_p]),
            "lora_ctx_set_backend": (i32, [c_p, i32, i32]), "lora_ctx_set_threads": (i32, [c_p, i32]),
            "lora_ctx_cancel": (None, [c_p]),
            "lora_params_create": (i32, [c_p, ctypes.POINTER(c_p)]), "lora_params_free": (None, [c_p]),
            "lora_params_parse": (i32, [c_p, ctypes.c_char_p, ctypes.c_char_p]),
            "lora_params_get_float": (i32, [c_p, i32, ctypes.POINTER(ctypes.c_double)]),
            "lora_params_get_string": (i32, [c_p, i32, ctypes.c_char_p, sz, ctypes.POINTER(sz)]),
            "lora_param_lookup": (i32, [ctypes.c_char_p, ctypes.POINTER(i32), ctypes.POINTER(i32)]),
            "lora_file_open": (i32, [c_p, ctypes.c_char_p, ctypes.POINTER(c_p)]), "lora_file_free": (None, [c_p]),
            "lora_file_tensor_count": (i64, [c_p]),
            "lora_file_tensor_info": (i32, [c_p, i64, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(i32),
                                            ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(i32),
                                            ctypes.POINTER(i64), i32, ctypes.POINTER(u64)]),
            "lora_file_metadata_count": (i64, [c_p]),
            "lora_file_metadata_at": (i32, [c_p, i64, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]),
            "lora_file_read_f32": (i32, [c_p, i64, ctypes.POINTER(ctypes.c_float), u64]),
            "lora_model_load": (i32, [c_p, ctypes.c_char_p, c_p, ctypes.POINTER(c_p)]),
            "lora_model_free": (None, [c_p]),
            "lora_model_get_int": (i32, [c_p, i32, ctypes.POINTER(i64)]),
            "lora_model_save": (i32, [c_p, ctypes.c_char_p, c_p]),
            "lora_model_encode_prompt": (i32, [c_p, ctypes.c_char_p, c_p, ctypes.POINTER(ctypes.c_float), u64,
                                               ctypes.POINTER(i64), ctypes.POINTER(i64)]),
            "lora_tokenizer_create": (i32, [c_p, i32, ctypes.POINTER(c_p)]),
            "lora_tokenizer_free": (None, [c_p]),
            "lora_tokenizer_encode": (i32, [c_p, ctypes.c_char_p, i32, ctypes.POINTER(i32), sz, ctypes.POINTER(sz)]),
            "lora_network_create": (i32, [c_p, c_p, ctypes.POINTER(c_p)]),
            "lora_network_load": (i32, [c_p, ctypes.c_char_p, ctypes.POINTER(c_p)]),
            "lora_network_save": (i32, [c_p, ctypes.c_char_p, c_p]),
            "lora_network_free": (None, [c_p]),
            "lora_network_get_int": (i32, [c_p, i32, ctypes.POINTER(i64)]),
            "lora_model_attach": (i32, [c_p, c_p, ctypes.c_double, i32]),
            "lora_model_set_multiplier": (i32, [c_p, c_p, ctypes.c_double]),
            "lora_model_detach": (i32, [c_p, c_p]),
            "lora_model_attached_count": (i64, [c_p]),
            "lora_trainer_create": (i32, [c_p, c_p, c_p, ctypes.POINTER(c_p)]),
            "lora_trainer_step": (i32, [c_p, i64, ctypes.POINTER(i64)]),
            "lora_trainer_run": (i32, [c_p]),
            "lora_trainer_get_int": (i32, [c_p, i32, ctypes.POINTER(i64)]),
            "lora_trainer_get_float": (i32, [c_p, i32, ctypes.POINTER(ctypes.c_double)]),
            "lora_trainer_save_state": (i32, [c_p, ctypes.c_char_p]),
            "lora_trainer_load_state": (i32, [c_p, ctypes.c_char_p]),
            "lora_trainer_save_network": (i32, [c_p, ctypes.c_char_p]),
            "lora_trainer_free": (None, [c_p]),
            "lora_generate": (i32, [c_p, c_p, ctypes.POINTER(c_p)]),
            "lora_image_width": (u32, [c_p]), "lora_image_height": (u32, [c_p]),
            "lora_image_channels": (u32, [c_p]), "lora_image_data": (ctypes.POINTER(ctypes.c_uint8), [c_p]),
            "lora_image_seed": (u64, [c_p]),
            "lora_image_text": (ctypes.c_char_p, [c_p, ctypes.c_char_p]),
            "lora_image_save_png": (i32, [c_p, ctypes.c_char_p, c_p]),
            "lora_image_free": (None, [c_p]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(L, name)
            fn.restype = res
            fn.argtypes = args
    return _lib


class LoraError(Exception):
    def __init__(self, code, message):
        self.code = code
        self.name = lib().lora_status_name(code).decode()
        self.category = code // 100
        super().__init__("%s: %s" % (self.name, message))


PARAM_INT, PARAM_FLOAT, PARAM_STRING = 1, 2, 3


class _Handle:
    """Owns one library pointer, freed by `_free_fn` on close(), `with` exit or collection."""
    _free_fn = None
    _h = None

    def close(self):
        if self._h:
            getattr(lib(), self._free_fn)(self._h)
            self._h = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context(_Handle):
    _free_fn = "lora_ctx_free"

    def __init__(self):
        self._h = None
        h = ctypes.c_void_p()
        s = lib().lora_ctx_create(ABI_VERSION, ctypes.byref(h))
        if s != 0:
            raise LoraError(s, lib().lora_status_string(s).decode())
        self._h = h

    def _check(self, s):
        if s != 0:
            raise LoraError(s, lib().lora_errmsg(self._h).decode("utf-8", "replace"))

    def set_threads(self, n):
        self._check(lib().lora_ctx_set_threads(self._h, n))

    def params(self, **kwargs):
        return Params(self, **kwargs)

    def open_file(self, path):
        return File(self, path)

    def load_model(self, path, **options):
        """An SD v1/v2 checkpoint (.safetensors, .ckpt or a diffusers folder); options are kohya
        flag names (v2=True, v_parameterization=True)."""
        return Model(self, path, **options)

    def tokenizer(self, v2=False):
        return Tokenizer(self, v2)

    def load_network(self, path):
        """A kohya LoRA file (.safetensors / .pt / .ckpt)."""
        return Network(self, path=path)


class Params(_Handle):
    _free_fn = "lora_params_free"
    def __init__(self, ctx, **kwargs):
        self._ctx = ctx   # keeps the context referenced for the bag's lifetime
        self._h = None
        h = ctypes.c_void_p()
        ctx._check(lib().lora_params_create(ctx._h, ctypes.byref(h)))
        self._h = h
        for k, v in kwargs.items():
            self[k] = v

    def __setitem__(self, name, value):
        if isinstance(value, bool):
            value = "true" if value else "false"
        self._ctx._check(lib().lora_params_parse(self._h, name.encode(), repr(value).encode() if isinstance(value, float) else str(value).encode()))

    def __getitem__(self, name):
        key, typ = ctypes.c_int32(), ctypes.c_int32()
        s = lib().lora_param_lookup(name.encode(), ctypes.byref(key), ctypes.byref(typ))
        if s != 0:
            raise KeyError(name)
        if typ.value == PARAM_STRING:
            need = ctypes.c_size_t()
            self._ctx._check(lib().lora_params_get_string(self._h, key, None, 0, ctypes.byref(need)))
            buf = ctypes.create_string_buffer(need.value)
            self._ctx._check(lib().lora_params_get_string(self._h, key, buf, need.value, None))
            return buf.value.decode()
        out = ctypes.c_double()
        self._ctx._check(lib().lora_params_get_float(self._h, key, ctypes.byref(out)))
        return int(out.value) if typ.value == PARAM_INT else out.value


class File(_Handle):
    _free_fn = "lora_file_free"
    def __init__(self, ctx, path):
        self._ctx = ctx
        self._h = None
        h = ctypes.c_void_p()
        ctx._check(lib().lora_file_open(ctx._h, os.fsencode(path), ctypes.byref(h)))
        self._h = h

    def tensors(self):
        out = {}
        for i in range(lib().lora_file_tensor_count(self._h)):
            name, dtn = ctypes.c_char_p(), ctypes.c_char_p()
            nd = ctypes.c_int32()
            shape = (ctypes.c_int64 * 8)()
            lib().lora_file_tensor_info(self._h, i, ctypes.byref(name), None, ctypes.byref(dtn), ctypes.byref(nd), shape, 8, None)
            out[name.value.decode()] = (dtn.value.decode(), tuple(shape[: nd.value]))
        return out

    def metadata(self):
        out = {}
        for i in range(lib().lora_file_metadata_count(self._h)):
            k, v = ctypes.c_char_p(), ctypes.c_char_p()
            lib().lora_file_metadata_at(self._h, i, ctypes.byref(k), ctypes.byref(v))
            out[k.value.decode()] = v.value.decode()
        return out

    def read_f32(self, name):
        tensors = self.tensors()   # in the library's index order
        shape = tensors[name][1]
        n = 1
        for d in shape:
            n *= d
        buf = (ctypes.c_float * max(n, 1))()
        idx = list(tensors).index(name)
        self._ctx._check(lib().lora_file_read_f32(self._h, idx, buf, n))
        return list(buf[:n])


MODEL_FACTS = {"sd_version": 1, "v_prediction": 2, "context_dim": 3, "unet_params": 4, "text_encoder_params": 5,
               "vae_params": 6, "tensors": 7, "dtype": 8, "format": 9, "linear_projection": 10,
               "unet_channels": 11, "text_encoder_layers": 12, "text_encoder_width": 13, "extra_tensors": 14}


class Model(_Handle):
    _free_fn = "lora_model_free"

    def __init__(self, ctx, path, **options):
        self._ctx = ctx
        self._h = None
        params = Params(ctx, **options)
        h = ctypes.c_void_p()
        ctx._check(lib().lora_model_load(ctx._h, os.fsencode(path), params._h, ctypes.byref(h)))
        self._h = h

    def __getitem__(self, fact):
        out = ctypes.c_int64()
        self._ctx._check(lib().lora_model_get_int(self._h, MODEL_FACTS[fact], ctypes.byref(out)))
        return out.value

    def save(self, path, **options):
        """save_model_as=ckpt|safetensors|diffusers|diffusers_safetensors, save_precision=float|fp16|bf16"""
        params = Params(self._ctx, **options)
        self._ctx._check(lib().lora_model_save(self._h, os.fsencode(path), params._h))

    def encode_prompt(self, prompt, **options):
        """Conditioning as a list of rows (tokens x width floats); options clip_skip, max_token_length."""
        params = Params(self._ctx, **options)
        t, w = ctypes.c_int64(), ctypes.c_int64()
        self._ctx._check(lib().lora_model_encode_prompt(self._h, prompt.encode(), params._h, None, 0,
                                                         ctypes.byref(t), ctypes.byref(w)))
        buf = (ctypes.c_float * (t.value * w.value))()
        self._ctx._check(lib().lora_model_encode_prompt(self._h, prompt.encode(), params._h, buf, t.value * w.value,
                                                         None, None))
        return [list(buf[r * w.value:(r + 1) * w.value]) for r in range(t.value)]


    def attach(self, network, multiplier=1.0, merge=False):
        """Applies a Network at run time (swappable: set_multiplier / detach) or, merge=True,
        into the weights for good. The network must stay open while attached."""
        self._ctx._check(lib().lora_model_attach(self._h, network._h, float(multiplier), 2 if merge else 1))

    def set_multiplier(self, network, multiplier):
        self._ctx._check(lib().lora_model_set_multiplier(self._h, network._h, float(multiplier)))

    def detach(self, network):
        self._ctx._check(lib().lora_model_detach(self._h, network._h))

    def attached_count(self):
        return lib().lora_model_attached_count(self._h)

    def create_network(self, **options):
        """A new kohya LoRA for this model (network_dim, network_alpha, conv_dim ...)."""
        return Network(self._ctx, model=self, **options)

    def generate(self, prompt, **options):
        """txt2img / img2img (kohya's gen_img_diffusers options: steps, scale, sampler, W, H,
        seed, negative_prompt, image_path, strength ...) -> Image."""
        params = Params(self._ctx, prompt=prompt, **options)
        h = ctypes.c_void_p()
        self._ctx._check(lib().lora_generate(self._h, params._h, ctypes.byref(h)))
        return Image(self._ctx, h)

    def trainer(self, network, **options):
        """A kohya train_network.py run of `network` on this model; options are kohya's flags
        (train_data_dir, output_dir, max_train_steps, learning_rate, ...)."""
        return Trainer(self._ctx, self, network, **options)


NETWORK_FACTS = {"rank": 1, "modules": 3, "te_modules": 4, "unet_modules": 5, "conv3x3_modules": 6, "conv_rank": 7,
                 "params": 9}


class Network(_Handle):
    """A LoRA network: loaded from a kohya file (path=...) or created for a model (model=...)."""
    _free_fn = "lora_network_free"

    def __init__(self, ctx, path=None, model=None, **options):
        self._ctx = ctx
        self._h = None
        h = ctypes.c_void_p()
        if path is not None:
            ctx._check(lib().lora_network_load(ctx._h, os.fsencode(path), ctypes.byref(h)))
        else:
            params = Params(ctx, **options)
            ctx._check(lib().lora_network_create(model._h, params._h, ctypes.byref(h)))
        self._h = h

    def __getitem__(self, fact):
        out = ctypes.c_int64()
        self._ctx._check(lib().lora_network_get_int(self._h, NETWORK_FACTS[fact], ctypes.byref(out)))
        return out.value

    def save(self, path, **options):
        params = Params(self._ctx, **options)
        self._ctx._check(lib().lora_network_save(self._h, os.fsencode(path), params._h))


TRAIN_STATS = {"step": 1, "epoch": 2, "last_loss": 3, "avg_loss": 4, "lr": 5, "grad_norm": 6,
               "skipped_steps": 7, "images_per_s": 8, "max_steps": 9, "epochs": 10,
               "batches_per_epoch": 11, "lr_text_encoder": 12, "loss_scale": 13}
_FLOAT_STATS = {"last_loss", "avg_loss", "lr", "grad_norm", "images_per_s", "lr_text_encoder", "loss_scale"}


class Trainer(_Handle):
    _free_fn = "lora_trainer_free"

    def __init__(self, ctx, model, network, **options):
        self._ctx = ctx
        self._h = None
        self._keep = (model, network)   # the library needs both alive while the trainer exists
        params = Params(ctx, **options)
        h = ctypes.c_void_p()
        ctx._check(lib().lora_trainer_create(model._h, network._h, params._h, ctypes.byref(h)))
        self._h = h

    def step(self, n=1):
        """Runs up to n optimizer steps; returns how many ran."""
        done = ctypes.c_int64()
        self._ctx._check(lib().lora_trainer_step(self._h, n, ctypes.byref(done)))
        return done.value

    def run(self):
        self._ctx._check(lib().lora_trainer_run(self._h))

    def __getitem__(self, stat):
        if stat in _FLOAT_STATS:
            out = ctypes.c_double()
            self._ctx._check(lib().lora_trainer_get_float(self._h, TRAIN_STATS[stat], ctypes.byref(out)))
        else:
            out = ctypes.c_int64()
            self._ctx._check(lib().lora_trainer_get_int(self._h, TRAIN_STATS[stat], ctypes.byref(out)))
        return out.value

    def save_state(self, path):
        self._ctx._check(lib().lora_trainer_save_state(self._h, os.fsencode(path)))

    def load_state(self, path):
        self._ctx._check(lib().lora_trainer_load_state(self._h, os.fsencode(path)))

    def save_network(self, path):
        self._ctx._check(lib().lora_trainer_save_network(self._h, os.fsencode(path)))


class Image(_Handle):
    """A generated RGB8 image: width, height, seed, pixels() (bytes, row-major RGB), text(key),
    save_png(path)."""
    _free_fn = "lora_image_free"

    def __init__(self, ctx, h):
        self._ctx = ctx
        self._h = h
        self.width = lib().lora_image_width(h)
        self.height = lib().lora_image_height(h)
        self.seed = lib().lora_image_seed(h)

    def pixels(self):
        n = self.width * self.height * lib().lora_image_channels(self._h)
        return ctypes.string_at(lib().lora_image_data(self._h), n)

    def text(self, key):
        v = lib().lora_image_text(self._h, key.encode())
        return v.decode() if v is not None else None

    def save_png(self, path):
        self._ctx._check(lib().lora_image_save_png(self._h, os.fsencode(path), None))


class Tokenizer(_Handle):
    _free_fn = "lora_tokenizer_free"

    def __init__(self, ctx, v2=False):
        self._ctx = ctx
        self._h = None
        h = ctypes.c_void_p()
        ctx._check(lib().lora_tokenizer_create(ctx._h, 2 if v2 else 1, ctypes.byref(h)))
        self._h = h

    def encode(self, text, max_token_length=75):
        n = 77 * (max_token_length // 75)
        ids = (ctypes.c_int32 * n)()
        got = ctypes.c_size_t()
        self._ctx._check(lib().lora_tokenizer_encode(self._h, text.encode(), max_token_length, ids, n, ctypes.byref(got)))
        return list(ids[:got.value])


def version():
    return lib().lora_version_string().decode()
