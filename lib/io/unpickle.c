/* A non-executing pickle interpreter for PyTorch checkpoints (spec/safety.md P6-P13).
 *
 * Nothing is ever imported, called or constructed. Values are symbolic: None, bools, ints,
 * floats, strings, bytes, tuples, lists, dicts, sets, "globals" (an index into the allowlist
 * below), storages (a validated persistent id) and tensors (a validated view of a storage).
 * Anything an inert global would build is an opaque placeholder.
 *
 * Opcodes: the torch.load(weights_only=True) set (PROTO STOP GLOBAL REDUCE NEWOBJ BUILD
 * BINPERSID MARK TUPLE TUPLE1-3 EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET APPEND APPENDS
 * SETITEM SETITEMS NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT BINUNICODE
 * SHORT_BINSTRING BINGET LONG_BINGET BINPUT LONG_BINPUT), the protocol 3-5 encodings of the same
 * values (FRAME MEMOIZE SHORT_BINUNICODE BINUNICODE8 STACK_GLOBAL BINBYTES SHORT_BINBYTES
 * BINBYTES8 ADDITEMS FROZENSET BINSTRING) and the pure stack operations POP POP_MARK DUP.
 * Everything else (INST, OBJ, EXT1/2/4, PERSID, the text opcodes of protocol 0, ...) is
 * LORA_E_CKPT_PICKLE_OPCODE.
 *
 * Bounds: every length is checked against the remaining bytes before use; strings are not
 * copied (they point into the pickle); the memo is a hash map (no array indexed by the memo
 * number); MARK nesting, stack size and total memory (64 bytes per pickle byte + 1 MiB) are
 * capped (LORA_E_LIMIT). Every container operation checks its target's type
 * (LORA_E_CKPT_PICKLE_STRUCT). Each opcode does O(1) work per value it consumes, so time is
 * linear in the pickle size. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/checked.h"
#include "core/utf8.h"
#include "io/ckpt.h"

#define PK_MAX_DEPTH       10000          /* nested MARKs */
#define PK_MAX_STACK       (1u << 24)     /* values on the stack */
#define PK_MAX_GLOBAL_NAME 512            /* bytes of a GLOBAL module or name line */
#define PK_MAX_ITEMS       (1u << 30)     /* items in one container */
#define PK_MEM_PER_BYTE    64
#define PK_MEM_BASE        (1u << 20)
#define PK_CHUNK           (64u << 10)

/* ---- the global allowlist ------------------------------------------------------------------ */
enum gkind {
    GK_ODICT,          /* collections.OrderedDict: REDUCE () -> dict */
    GK_RT1,            /* torch._utils._rebuild_tensor(storage, offset, size, stride) */
    GK_RT2,            /* _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta]) */
    GK_RT3,            /* _rebuild_tensor_v3(..., hooks, dtype[, meta]) */
    GK_RPARAM,         /* _rebuild_parameter(data, requires_grad, hooks) */
    GK_RPARAM_STATE,   /* _rebuild_parameter_with_state(data, requires_grad, hooks, state) */
    GK_FROM_TYPE_V2,   /* torch._tensor._rebuild_from_type_v2(func, type, args, state) */
    GK_PARAM,          /* torch.nn.parameter.Parameter(data[, requires_grad]) */
    GK_TENSOR_CLASS,   /* torch.Tensor: only meaningful as _rebuild_from_type_v2's type */
    GK_SIZE,           /* torch.Size(tuple) -> the tuple */
    GK_STORAGE,        /* storage type of a persistent id */
    GK_DTYPE,          /* torch.<dtype> */
    GK_INERT,          /* tolerated; REDUCE / NEWOBJ give an opaque value that BUILD may update */
    GK_RT_OTHER,       /* allowlisted tensor rebuilds liblora cannot represent */
};

struct gdef {
    const char *mod, *name;
    uint8_t kind;
    uint8_t elsize;     /* GK_STORAGE / GK_DTYPE: bytes per element (1 for untyped storages) */
    uint8_t untyped;    /* GK_STORAGE: UntypedStorage (numel counts bytes) */
    lora_dtype dtype;   /* GK_STORAGE / GK_DTYPE: liblora dtype, 0 = valid in torch, unsupported here */
};

#define STORAGES(mod)                                                                            \
    {mod, "FloatStorage", GK_STORAGE, 4, 0, LORA_DTYPE_F32},                                     \
    {mod, "HalfStorage", GK_STORAGE, 2, 0, LORA_DTYPE_F16},                                      \
    {mod, "BFloat16Storage", GK_STORAGE, 2, 0, LORA_DTYPE_BF16},                                 \
    {mod, "DoubleStorage", GK_STORAGE, 8, 0, LORA_DTYPE_F64},                                    \
    {mod, "LongStorage", GK_STORAGE, 8, 0, LORA_DTYPE_I64},                                      \
    {mod, "IntStorage", GK_STORAGE, 4, 0, LORA_DTYPE_I32},                                       \
    {mod, "ShortStorage", GK_STORAGE, 2, 0, LORA_DTYPE_I16},                                     \
    {mod, "CharStorage", GK_STORAGE, 1, 0, LORA_DTYPE_I8},                                       \
    {mod, "ByteStorage", GK_STORAGE, 1, 0, LORA_DTYPE_U8},                                       \
    {mod, "BoolStorage", GK_STORAGE, 1, 0, LORA_DTYPE_BOOL},                                     \
    {mod, "ComplexFloatStorage", GK_STORAGE, 8, 0, 0},                                           \
    {mod, "ComplexDoubleStorage", GK_STORAGE, 16, 0, 0}

static const struct gdef globals[] = {
    /* meaningful: torch.load(weights_only=True) allows these and liblora gives them meaning */
    {"collections", "OrderedDict", GK_ODICT, 0, 0, 0},
    {"torch._utils", "_rebuild_tensor", GK_RT1, 0, 0, 0},
    {"torch._utils", "_rebuild_tensor_v2", GK_RT2, 0, 0, 0},
    {"torch._utils", "_rebuild_tensor_v3", GK_RT3, 0, 0, 0},
    {"torch._utils", "_rebuild_parameter", GK_RPARAM, 0, 0, 0},
    {"torch._utils", "_rebuild_parameter_with_state", GK_RPARAM_STATE, 0, 0, 0},
    {"torch._tensor", "_rebuild_from_type_v2", GK_FROM_TYPE_V2, 0, 0, 0},
    {"torch.nn.parameter", "Parameter", GK_PARAM, 0, 0, 0},
    {"torch", "Tensor", GK_TENSOR_CLASS, 0, 0, 0},
    {"torch", "Size", GK_SIZE, 0, 0, 0},
    STORAGES("torch"),
    STORAGES("torch.cuda"),
    {"torch", "QInt8Storage", GK_STORAGE, 1, 0, 0},
    {"torch", "QUInt8Storage", GK_STORAGE, 1, 0, 0},
    {"torch", "QInt32Storage", GK_STORAGE, 4, 0, 0},
    {"torch", "QUInt4x2Storage", GK_STORAGE, 1, 0, 0},
    {"torch", "QUInt2x4Storage", GK_STORAGE, 1, 0, 0},
    {"torch", "UntypedStorage", GK_STORAGE, 1, 1, LORA_DTYPE_U8},
    {"torch.storage", "UntypedStorage", GK_STORAGE, 1, 1, LORA_DTYPE_U8},
    {"torch.storage", "_UntypedStorage", GK_STORAGE, 1, 1, LORA_DTYPE_U8},
    {"torch", "float32", GK_DTYPE, 4, 0, LORA_DTYPE_F32},
    {"torch", "float16", GK_DTYPE, 2, 0, LORA_DTYPE_F16},
    {"torch", "bfloat16", GK_DTYPE, 2, 0, LORA_DTYPE_BF16},
    {"torch", "float64", GK_DTYPE, 8, 0, LORA_DTYPE_F64},
    {"torch", "int64", GK_DTYPE, 8, 0, LORA_DTYPE_I64},
    {"torch", "int32", GK_DTYPE, 4, 0, LORA_DTYPE_I32},
    {"torch", "int16", GK_DTYPE, 2, 0, LORA_DTYPE_I16},
    {"torch", "int8", GK_DTYPE, 1, 0, LORA_DTYPE_I8},
    {"torch", "uint8", GK_DTYPE, 1, 0, LORA_DTYPE_U8},
    {"torch", "bool", GK_DTYPE, 1, 0, LORA_DTYPE_BOOL},
    {"torch", "uint16", GK_DTYPE, 2, 0, LORA_DTYPE_U16},
    {"torch", "uint32", GK_DTYPE, 4, 0, LORA_DTYPE_U32},
    {"torch", "uint64", GK_DTYPE, 8, 0, LORA_DTYPE_U64},
    {"torch", "float8_e4m3fn", GK_DTYPE, 1, 0, LORA_DTYPE_F8_E4M3},
    {"torch", "float8_e5m2", GK_DTYPE, 1, 0, LORA_DTYPE_F8_E5M2},
    {"torch", "float8_e4m3fnuz", GK_DTYPE, 1, 0, 0},
    {"torch", "float8_e5m2fnuz", GK_DTYPE, 1, 0, 0},
    {"torch", "float8_e8m0fnu", GK_DTYPE, 1, 0, 0},
    {"torch", "complex32", GK_DTYPE, 4, 0, 0},
    {"torch", "complex64", GK_DTYPE, 8, 0, 0},
    {"torch", "complex128", GK_DTYPE, 16, 0, 0},
    /* allowlisted by torch, but the tensors they build are not dense CPU-layout tensors */
    {"torch._utils", "_rebuild_sparse_tensor", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_sparse_csr_tensor", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_meta_tensor_no_storage", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_qtensor", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_wrapper_subclass", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_device_tensor_from_numpy", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_device_tensor_from_cpu_tensor", GK_RT_OTHER, 0, 0, 0},
    {"torch._utils", "_rebuild_nested_tensor", GK_RT_OTHER, 0, 0, 0},
    /* inert: tolerated because real checkpoints carry them; never constructed */
    {"torch", "device", GK_INERT, 0, 0, 0},
    {"torch.serialization", "_get_layout", GK_INERT, 0, 0, 0},
    {"collections", "Counter", GK_INERT, 0, 0, 0},
    {"_codecs", "encode", GK_INERT, 0, 0, 0},
    {"builtins", "set", GK_INERT, 0, 0, 0},
    {"builtins", "frozenset", GK_INERT, 0, 0, 0},
    {"builtins", "bytearray", GK_INERT, 0, 0, 0},
    {"builtins", "complex", GK_INERT, 0, 0, 0},
    {"__builtin__", "set", GK_INERT, 0, 0, 0},          /* protocol <= 2 spells builtins so */
    {"__builtin__", "frozenset", GK_INERT, 0, 0, 0},
    {"__builtin__", "bytearray", GK_INERT, 0, 0, 0},
    {"__builtin__", "complex", GK_INERT, 0, 0, 0},
    {"numpy.core.multiarray", "scalar", GK_INERT, 0, 0, 0},
    {"numpy.core.multiarray", "_reconstruct", GK_INERT, 0, 0, 0},
    {"numpy._core.multiarray", "scalar", GK_INERT, 0, 0, 0},
    {"numpy._core.multiarray", "_reconstruct", GK_INERT, 0, 0, 0},
    {"numpy", "dtype", GK_INERT, 0, 0, 0},
    {"numpy", "ndarray", GK_INERT, 0, 0, 0},
    {"pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", GK_INERT, 0, 0, 0},
    {"lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint", GK_INERT, 0, 0, 0},
};
#define N_GLOBALS ((int)(sizeof globals / sizeof globals[0]))

/* Modules whose globals can run code or commands: named as likely malicious in the message. */
static const char *const dangerous_modules[] = {
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "importlib", "runpy",
    "pickle", "_pickle", "socket", "shutil", "pty", "inspect", "ctypes", "code", "codeop",
    "webbrowser", "multiprocessing", "asyncio", "commands", "platform", "marshal", "types",
    "operator", "functools", "pydoc", "timeit", "bdb", "pdb", "torch.hub", "torch._C",
    "torch.jit", "torch.serialization", "numpy.testing", "distutils", "setuptools", "pip",
};

static int module_is_dangerous(const uint8_t *m, size_t ml) {
    for (size_t i = 0; i < sizeof dangerous_modules / sizeof dangerous_modules[0]; i++) {
        size_t dl = strlen(dangerous_modules[i]);
        if (ml >= dl && memcmp(m, dangerous_modules[i], dl) == 0 && (ml == dl || m[dl] == '.')) return 1;
    }
    return 0;
}

static int find_global(const uint8_t *m, size_t ml, const uint8_t *nm, size_t nl) {
    for (int i = 0; i < N_GLOBALS; i++) {
        if (strlen(globals[i].mod) == ml && strlen(globals[i].name) == nl && memcmp(globals[i].mod, m, ml) == 0 &&
            memcmp(globals[i].name, nm, nl) == 0)
            return i;
    }
    return -1;
}

/* ---- values ---------------------------------------------------------------------------------- */
enum vkind {
    V_NONE, V_BOOL, V_INT, V_BIGINT, V_FLOAT, V_STR, V_BYTES, V_TUPLE, V_LIST, V_DICT, V_SET,
    V_GLOBAL, V_STORAGE, V_TENSOR, V_OPAQUE, V_OTHER_TENSOR,
};

static const char *const vkind_names[] = {
    "None value", "bool", "Python int", "Python int wider than 64 bits", "float", "str", "bytes", "tuple",
    "list", "dict", "set", "global", "storage", "tensor", "placeholder of an inert object", "non-dense tensor",
};

struct pk_storage {
    const uint8_t *key;
    uint32_t key_len;
    int g;                 /* storage type (index into globals) */
    int64_t numel;         /* elements of the storage type; bytes for untyped storages */
    int64_t record;
    uint64_t record_bytes;
};

struct pv {
    uint8_t kind;
    uint8_t ordered;       /* V_DICT: OrderedDict */
    int16_t g;             /* V_GLOBAL / V_OPAQUE / V_OTHER_TENSOR: globals index */
    uint32_t n;            /* V_STR/V_BYTES: bytes; containers: items (a dict holds 2 per pair) */
    uint32_t cap;          /* containers: allocated items */
    uint32_t at;           /* offset of the opcode that created it */
    union {
        int64_t i;
        double f;
        const uint8_t *s;
        struct pv **items;
        struct pk_storage *st;
        struct pk_tensor *t;
    } u;
};

struct chunk {
    struct chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

struct vm {
    lora_ctx *ctx;
    const struct pk_env *env;
    const uint8_t *p;
    size_t n, pos;
    size_t op_pos;         /* offset of the current opcode */
    uint8_t op;
    lora_status err;

    struct chunk *chunks;
    uint64_t used, budget;

    struct pv **stack;
    size_t sp, scap;
    size_t *marks;
    size_t nmarks, mcap;

    uint32_t *mkeys;       /* memo: open addressing, mvals[i] == NULL marks an empty slot */
    struct pv **mvals;
    size_t mslots, mcount;

    struct pv none, vtrue, vfalse, empty_tuple;
    struct pk_tensor *out;
};

/* ---- messages -------------------------------------------------------------------------------- */
static const char *opname(uint8_t op) {
    switch (op) {
    case 0x80: return "PROTO";
    case '.': return "STOP";
    case 'c': return "GLOBAL";
    case 0x93: return "STACK_GLOBAL";
    case 'R': return "REDUCE";
    case 0x81: return "NEWOBJ";
    case 0x92: return "NEWOBJ_EX";
    case 'b': return "BUILD";
    case 'Q': return "BINPERSID";
    case 'P': return "PERSID";
    case '(': return "MARK";
    case 't': return "TUPLE";
    case 0x85: return "TUPLE1";
    case 0x86: return "TUPLE2";
    case 0x87: return "TUPLE3";
    case ')': return "EMPTY_TUPLE";
    case ']': return "EMPTY_LIST";
    case '}': return "EMPTY_DICT";
    case 0x8f: return "EMPTY_SET";
    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";
    case 'a': return "APPEND";
    case 'e': return "APPENDS";
    case 's': return "SETITEM";
    case 'u': return "SETITEMS";
    case 'N': return "NONE";
    case 0x88: return "NEWTRUE";
    case 0x89: return "NEWFALSE";
    case 'J': return "BININT";
    case 'K': return "BININT1";
    case 'M': return "BININT2";
    case 0x8a: return "LONG1";
    case 0x8b: return "LONG4";
    case 'G': return "BINFLOAT";
    case 'X': return "BINUNICODE";
    case 0x8c: return "SHORT_BINUNICODE";
    case 0x8d: return "BINUNICODE8";
    case 'U': return "SHORT_BINSTRING";
    case 'T': return "BINSTRING";
    case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";
    case 0x8e: return "BINBYTES8";
    case 0x96: return "BYTEARRAY8";
    case 'h': return "BINGET";
    case 'j': return "LONG_BINGET";
    case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT";
    case 0x94: return "MEMOIZE";
    case 0x95: return "FRAME";
    case '0': return "POP";
    case '1': return "POP_MARK";
    case '2': return "DUP";
    case 'i': return "INST";
    case 'o': return "OBJ";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 'I': return "INT";
    case 'L': return "LONG";
    case 'F': return "FLOAT";
    case 'S': return "STRING";
    case 'V': return "UNICODE";
    case 'g': return "GET";
    case 'p': return "PUT";
    case 'l': return "LIST";
    case 'd': return "DICT";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    default: return "undefined opcode";
    }
}

static lora_status vfail(struct vm *v, lora_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static lora_status vfail(struct vm *v, lora_status s, const char *fmt, ...) {
    char detail[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    v->err = s;
    return lora_fail(v->ctx, s, "%s: %s offset %zu: opcode 0x%02x (%s): %s", v->env->label, v->env->entry, v->op_pos,
                     v->op, opname(v->op), detail);
}

char *ckpt_escape(char *dst, size_t cap, const void *src, size_t n) {
    const uint8_t *p = src;
    size_t o = 0, limit = cap / 4 > 8 ? cap / 4 - 2 : 1;
    if (cap == 0) return dst;
    for (size_t i = 0; i < n; i++) {
        if (o + 8 >= cap || i >= limit) {
            if (o + 4 < cap) { memcpy(dst + o, "...", 3); o += 3; }
            break;
        }
        if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\') dst[o++] = (char)p[i];
        else o += (size_t)snprintf(dst + o, cap - o, "\\x%02x", p[i]);
    }
    dst[o < cap ? o : cap - 1] = '\0';
    return dst;
}

/* ---- memory ------------------------------------------------------------------------------------ */
static lora_status charge(struct vm *v, uint64_t bytes) {
    if (v->used + bytes > v->budget || v->used + bytes < v->used)
        return vfail(v, LORA_E_LIMIT,
                     "the pickle needs more than %llu bytes of memory (the cap is 64 bytes per pickle byte + 1 MiB)",
                     (unsigned long long)v->budget);
    v->used += bytes;
    return LORA_OK;
}

static void *vm_alloc(struct vm *v, size_t size) {
    size = (size + 15) & ~(size_t)15;
    if (v->chunks && v->chunks->cap - v->chunks->used >= size) {
        void *p = v->chunks->data + v->chunks->used;
        v->chunks->used += size;
        return p;
    }
    size_t cap = size > PK_CHUNK ? size : PK_CHUNK;
    if (charge(v, cap + sizeof(struct chunk)) != LORA_OK) return NULL;
    struct chunk *c = lora_malloc(v->ctx, sizeof *c + cap);
    if (!c) {
        vfail(v, LORA_E_NOMEM, "out of host memory");
        return NULL;
    }
    c->next = v->chunks;
    c->used = size;
    c->cap = cap;
    v->chunks = c;
    return c->data;
}

static struct pv *new_value(struct vm *v, uint8_t kind) {
    struct pv *x = vm_alloc(v, sizeof *x);
    if (!x) return NULL;
    memset(x, 0, sizeof *x);
    x->kind = kind;
    x->at = (uint32_t)v->op_pos;
    x->g = -1;
    return x;
}

static struct pv *new_seq(struct vm *v, uint8_t kind, struct pv *const *items, size_t n) {
    if (n > PK_MAX_ITEMS) {
        vfail(v, LORA_E_LIMIT, "a container of %zu items exceeds %u", n, PK_MAX_ITEMS);
        return NULL;
    }
    struct pv *x = new_value(v, kind);
    if (!x) return NULL;
    if (n) {
        x->u.items = vm_alloc(v, n * sizeof *items);
        if (!x->u.items) return NULL;
        memcpy(x->u.items, items, n * sizeof *items);
    }
    x->n = x->cap = (uint32_t)n;
    return x;
}

/* Appends `k` items to a list, dict or set, growing geometrically inside the arena. */
static lora_status seq_extend(struct vm *v, struct pv *c, struct pv *const *items, size_t k) {
    if (k == 0) return LORA_OK;
    if ((uint64_t)c->n + k > PK_MAX_ITEMS)
        return vfail(v, LORA_E_LIMIT, "a %s of more than %u items", vkind_names[c->kind], PK_MAX_ITEMS);
    if (c->n + k > c->cap) {
        size_t cap = c->cap ? (size_t)c->cap * 2 : 8;
        if (cap < c->n + k) cap = c->n + k;
        if (cap > PK_MAX_ITEMS) cap = PK_MAX_ITEMS;
        struct pv **a = vm_alloc(v, cap * sizeof *a);
        if (!a) return v->err;
        if (c->n) memcpy(a, c->u.items, c->n * sizeof *a);
        c->u.items = a;
        c->cap = (uint32_t)cap;
    }
    memcpy(c->u.items + c->n, items, k * sizeof *items);
    c->n += (uint32_t)k;
    return LORA_OK;
}

/* ---- stack ----------------------------------------------------------------------------------- */
static size_t stack_base(const struct vm *v) { return v->nmarks ? v->marks[v->nmarks - 1] : 0; }

static lora_status push(struct vm *v, struct pv *x) {
    if (!x) return v->err;
    if (v->sp == v->scap) {
        if (v->scap >= PK_MAX_STACK) return vfail(v, LORA_E_LIMIT, "more than %u values on the stack", PK_MAX_STACK);
        size_t cap = v->scap ? v->scap * 2 : 256;
        LORA_TRY(charge(v, cap * sizeof *v->stack));
        struct pv **s = lora_malloc(v->ctx, cap * sizeof *s);
        if (!s) return vfail(v, LORA_E_NOMEM, "out of host memory");
        if (v->sp) memcpy(s, v->stack, v->sp * sizeof *s);
        lora_free(v->ctx, v->stack);
        v->used -= v->scap * sizeof *v->stack;
        v->stack = s;
        v->scap = cap;
    }
    v->stack[v->sp++] = x;
    return LORA_OK;
}

static lora_status underflow(struct vm *v, size_t want) {
    size_t have = v->sp - stack_base(v);
    return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "needs %zu value%s on the stack%s, finds %zu", want, want == 1 ? "" : "s",
                 v->nmarks ? " above the last MARK" : "", have);
}

#define NEED_STACK(k) do { if (v->sp - stack_base(v) < (size_t)(k)) return underflow(v, (k)); } while (0)

static lora_status push_mark(struct vm *v) {
    if (v->nmarks >= PK_MAX_DEPTH) return vfail(v, LORA_E_LIMIT, "more than %d nested MARKs", PK_MAX_DEPTH);
    if (v->nmarks == v->mcap) {
        size_t cap = v->mcap ? v->mcap * 2 : 64;
        LORA_TRY(charge(v, cap * sizeof *v->marks));
        size_t *m = lora_malloc(v->ctx, cap * sizeof *m);
        if (!m) return vfail(v, LORA_E_NOMEM, "out of host memory");
        if (v->nmarks) memcpy(m, v->marks, v->nmarks * sizeof *m);
        lora_free(v->ctx, v->marks);
        v->used -= v->mcap * sizeof *v->marks;
        v->marks = m;
        v->mcap = cap;
    }
    v->marks[v->nmarks++] = v->sp;
    return LORA_OK;
}

/* Pops everything above the last MARK and the MARK: items are stack[*first .. *first + *k). The
 * slots stay valid until the next push. */
static lora_status pop_mark(struct vm *v, size_t *first, size_t *k) {
    if (!v->nmarks) return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "no MARK to pop to");
    size_t m = v->marks[--v->nmarks];
    *first = m;
    *k = v->sp - m;
    v->sp = m;
    return LORA_OK;
}

/* ---- memo ------------------------------------------------------------------------------------ */
static size_t memo_slot(const struct vm *v, uint32_t key) {
    size_t h = (size_t)((key * 2654435761u) ^ (key >> 15)) & (v->mslots - 1);
    while (v->mvals[h] && v->mkeys[h] != key) h = (h + 1) & (v->mslots - 1);
    return h;
}

static lora_status memo_put(struct vm *v, uint32_t key, struct pv *x) {
    if ((v->mcount + 1) * 2 > v->mslots) {
        size_t slots = v->mslots ? v->mslots * 2 : 256;
        LORA_TRY(charge(v, slots * (sizeof *v->mkeys + sizeof *v->mvals)));
        uint32_t *k = lora_malloc(v->ctx, slots * sizeof *k);
        struct pv **val = lora_calloc(v->ctx, slots, sizeof *val);
        if (!k || !val) {
            lora_free(v->ctx, k);
            lora_free(v->ctx, val);
            return vfail(v, LORA_E_NOMEM, "out of host memory");
        }
        uint32_t *ok = v->mkeys;
        struct pv **ov = v->mvals;
        size_t os = v->mslots;
        v->mkeys = k;
        v->mvals = val;
        v->mslots = slots;
        for (size_t i = 0; i < os; i++)
            if (ov[i]) {
                size_t h = memo_slot(v, ok[i]);
                v->mkeys[h] = ok[i];
                v->mvals[h] = ov[i];
            }
        lora_free(v->ctx, ok);
        lora_free(v->ctx, ov);
        v->used -= os * (sizeof *v->mkeys + sizeof *v->mvals);
    }
    size_t h = memo_slot(v, key);
    if (!v->mvals[h]) v->mcount++;
    v->mkeys[h] = key;
    v->mvals[h] = x;
    return LORA_OK;
}

static struct pv *memo_get(const struct vm *v, uint32_t key) {
    if (!v->mslots) return NULL;
    return v->mvals[memo_slot(v, key)];
}

/* ---- reading ------------------------------------------------------------------------------------ */
static lora_status need(struct vm *v, size_t k, const char *what) {
    if (v->n - v->pos < k)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "truncated: %s needs %zu bytes, %zu left in the pickle", what, k,
                     v->n - v->pos);
    return LORA_OK;
}

static uint64_t rd_le(const uint8_t *p, int k) {
    uint64_t x = 0;
    for (int i = k - 1; i >= 0; i--) x = (x << 8) | p[i];
    return x;
}

/* Python decodes pickle strings as UTF-8 with "surrogatepass": encoded surrogates are allowed,
 * overlong forms and code points above U+10FFFF are not. */
#define utf8_surrogatepass_ok(s, n, bad) utf8_check((s), (n), 1, (bad))

static lora_status push_text(struct vm *v, uint64_t len, int unicode) {
    if (v->n - v->pos < len)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "string length %llu runs past the end of the pickle (%zu bytes left)",
                     (unsigned long long)len, v->n - v->pos);
    if (len > UINT32_MAX) return vfail(v, LORA_E_LIMIT, "string of %llu bytes", (unsigned long long)len);
    const uint8_t *s = v->p + v->pos;
    size_t bad = 0;
    uint8_t kind = V_BYTES;
    if (unicode == 1) {
        if (!utf8_surrogatepass_ok(s, (size_t)len, &bad))
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "string is not valid UTF-8 (byte %zu of the string)", bad);
        kind = V_STR;
    } else if (unicode == 2) {   /* protocol-2 str of Python 2: text when it decodes */
        kind = utf8_surrogatepass_ok(s, (size_t)len, &bad) ? V_STR : V_BYTES;
    }
    struct pv *x = new_value(v, kind);
    if (!x) return v->err;
    x->u.s = s;
    x->n = (uint32_t)len;
    v->pos += (size_t)len;
    return push(v, x);
}

static struct pv *new_int(struct vm *v, int64_t i) {
    struct pv *x = new_value(v, V_INT);
    if (x) x->u.i = i;
    return x;
}

static int as_int(const struct pv *x, int64_t *out) {
    if (x->kind == V_INT || x->kind == V_BOOL) {
        *out = x->u.i;
        return 1;
    }
    return 0;
}

static int str_eq(const struct pv *x, const char *s) {
    size_t l = strlen(s);
    return (x->kind == V_STR || x->kind == V_BYTES) && x->n == l && memcmp(x->u.s, s, l) == 0;
}

static const char *gname(int g, char *buf, size_t cap) {
    snprintf(buf, cap, "%s.%s", globals[g].mod, globals[g].name);
    return buf;
}

/* ---- GLOBAL ---------------------------------------------------------------------------------- */
static lora_status resolve_global(struct vm *v, const uint8_t *m, size_t ml, const uint8_t *nm, size_t nl) {
    int g = find_global(m, ml, nm, nl);
    if (g < 0) {
        char em[300], en[300];
        ckpt_escape(em, sizeof em, m, ml);
        ckpt_escape(en, sizeof en, nm, nl);
        return vfail(v, LORA_E_CKPT_UNSAFE_GLOBAL,
                     "refusing global '%s.%s': it is not on the allowlist (the globals torch.load(weights_only=True) "
                     "accepts, plus inert ones SD checkpoints carry); nothing was imported or run%s",
                     em, en,
                     module_is_dangerous(m, ml) ? ". This global can run code or commands: the file is likely malicious"
                                                : "");
    }
    struct pv *x = new_value(v, V_GLOBAL);
    if (!x) return v->err;
    x->g = (int16_t)g;
    return push(v, x);
}

static lora_status read_line(struct vm *v, const uint8_t **s, size_t *len, const char *what) {
    size_t avail = v->n - v->pos;
    size_t lim = avail < PK_MAX_GLOBAL_NAME + 1 ? avail : PK_MAX_GLOBAL_NAME + 1;
    const uint8_t *nl = memchr(v->p + v->pos, '\n', lim);
    if (!nl)
        return vfail(v, avail <= PK_MAX_GLOBAL_NAME ? LORA_E_CKPT_PICKLE_STRUCT : LORA_E_LIMIT,
                     "%s is not terminated by a newline within %d bytes", what, PK_MAX_GLOBAL_NAME);
    *s = v->p + v->pos;
    *len = (size_t)(nl - *s);
    v->pos += *len + 1;
    return LORA_OK;
}

/* ---- tensors ----------------------------------------------------------------------------------- */
static lora_status int_tuple(struct vm *v, const char *fn, const char *what, const struct pv *x, int64_t *out,
                             int32_t *n) {
    if (x->kind != V_TUPLE && x->kind != V_LIST)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: %s is a %s, not a tuple", fn, what, vkind_names[x->kind]);
    if (x->n > CKPT_MAX_RANK)
        return vfail(v, LORA_E_LIMIT, "%s: %s has %u dimensions; liblora supports at most %d", fn, what, x->n,
                     CKPT_MAX_RANK);
    for (uint32_t i = 0; i < x->n; i++)
        if (!as_int(x->u.items[i], &out[i]))
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: %s[%u] is a %s, not an int", fn, what, i,
                         vkind_names[x->u.items[i]->kind]);
    *n = (int32_t)x->n;
    return LORA_OK;
}

/* Validates a view (P11) and makes the tensor value. `dtype_g` is the explicit dtype of
 * _rebuild_tensor_v3 (-1 otherwise). */
static lora_status rebuild_tensor(struct vm *v, int fg, struct pv *storage, struct pv *offset, struct pv *size,
                                  struct pv *stride, int dtype_g, struct pv **out) {
    char fn[96];
    gname(fg, fn, sizeof fn);
    if (storage->kind != V_STORAGE)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: the storage argument is a %s, not a persistent-id storage", fn,
                     vkind_names[storage->kind]);
    const struct pk_storage *st = storage->u.st;
    const struct gdef *sg = &globals[st->g];
    int64_t off;
    if (!as_int(offset, &off))
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: storage_offset is a %s, not an int", fn,
                     vkind_names[offset->kind]);
    struct pk_tensor t;
    memset(&t, 0, sizeof t);
    int32_t nst = 0;
    LORA_TRY(int_tuple(v, fn, "size", size, t.size, &t.ndim));
    if (stride->kind != V_TUPLE && stride->kind != V_LIST)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: stride is a %s, not a tuple", fn, vkind_names[stride->kind]);
    if (stride->n != (uint32_t)t.ndim)
        return vfail(v, LORA_E_UNSUPPORTED_LAYOUT, "%s: %u strides for %d dimensions", fn, stride->n, t.ndim);
    LORA_TRY(int_tuple(v, fn, "stride", stride, t.stride, &nst));
    for (int32_t d = 0; d < t.ndim; d++) {
        if (t.size[d] < 0)
            return vfail(v, LORA_E_UNSUPPORTED_LAYOUT, "%s: size[%d] = %lld is negative", fn, d, (long long)t.size[d]);
        if (t.stride[d] < 0)
            return vfail(v, LORA_E_UNSUPPORTED_LAYOUT, "%s: stride[%d] = %lld is negative", fn, d,
                         (long long)t.stride[d]);
    }
    if (off < 0) return vfail(v, LORA_E_CKPT_STORAGE_SIZE, "%s: storage_offset %lld is negative", fn, (long long)off);

    /* element type: the storage's, or v3's explicit dtype over an untyped (byte) storage */
    int elsize = sg->elsize;
    lora_dtype dtype = sg->dtype;
    const char *dtype_name = sg->name;
    int64_t st_elems = st->numel;
    if (dtype_g >= 0) {
        const struct gdef *dg = &globals[dtype_g];
        if (!sg->untyped && (dg->elsize != sg->elsize || dg->dtype != sg->dtype))
            return vfail(v, LORA_E_UNSUPPORTED_LAYOUT, "%s: dtype torch.%s over a %s", fn, dg->name, sg->name);
        elsize = dg->elsize;
        dtype = dg->dtype;
        dtype_name = dg->name;
        if (sg->untyped) st_elems = st->numel / elsize;
    }

    int64_t numel = 1;
    if (!ck_numel(t.size, t.ndim, &numel))
        return vfail(v, LORA_E_CKPT_STORAGE_SIZE, "%s: the element count of the size overflows 64 bits", fn);
    uint64_t bytes;
    if (!ck_mul_u64((uint64_t)numel, (uint64_t)elsize, &bytes) || bytes > (uint64_t)INT64_MAX)
        return vfail(v, LORA_E_CKPT_STORAGE_SIZE, "%s: %lld elements of %d bytes overflow 64 bits", fn,
                     (long long)numel, elsize);
    if (numel > 0) {
        /* last element: offset + sum (size_d - 1) * stride_d, overflow-checked */
        int64_t last = off, term;
        for (int32_t d = 0; d < t.ndim; d++) {
            if (!ck_mul_i64(t.size[d] - 1, t.stride[d], &term) || __builtin_add_overflow(last, term, &last))
                return vfail(v, LORA_E_CKPT_STORAGE_SIZE, "%s: the view's extent overflows 64 bits (size[%d] %lld, "
                             "stride[%d] %lld)", fn, d, (long long)t.size[d], d, (long long)t.stride[d]);
        }
        if (last >= st_elems)
            return vfail(v, LORA_E_CKPT_STORAGE_SIZE,
                         "%s: the view (storage_offset %lld) reaches element %lld but storage '%.*s' holds %lld "
                         "elements of %s",
                         fn, (long long)off, (long long)last, (int)st->key_len, (const char *)st->key,
                         (long long)st_elems, dtype_name);
    }
    t.dtype = dtype;
    t.elsize = elsize;
    t.offset = off;
    t.record = st->record;
    t.record_bytes = st->record_bytes;
    t.key = (const char *)st->key;
    t.key_len = st->key_len;
    struct pv *x = new_value(v, dtype ? V_TENSOR : V_OTHER_TENSOR);
    if (!x) return v->err;
    if (!dtype) {
        x->g = (int16_t)(dtype_g >= 0 ? dtype_g : st->g);
    } else {
        x->u.t = vm_alloc(v, sizeof t);
        if (!x->u.t) return v->err;
        *x->u.t = t;
    }
    *out = x;
    return LORA_OK;
}

/* Calls an allowlisted global symbolically. `args` is a tuple. */
static lora_status call_global(struct vm *v, int g, struct pv *args, int newobj, struct pv **out) {
    char fn[96];
    gname(g, fn, sizeof fn);
    struct pv **a = args->u.items;
    uint32_t na = args->n;
    switch (globals[g].kind) {
    case GK_ODICT:
        if (na != 0)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s called with %u arguments; only OrderedDict() is supported", fn,
                         na);
        *out = new_value(v, V_DICT);
        if (!*out) return v->err;
        (*out)->ordered = 1;
        return LORA_OK;
    case GK_RT1:
        if (na != 4) goto nargs;
        return rebuild_tensor(v, g, a[0], a[1], a[2], a[3], -1, out);
    case GK_RT2:
        if (na != 6 && na != 7) goto nargs;
        return rebuild_tensor(v, g, a[0], a[1], a[2], a[3], -1, out);
    case GK_RT3:
        if (na != 7 && na != 8) goto nargs;
        if (a[6]->kind != V_GLOBAL || globals[a[6]->g].kind != GK_DTYPE)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: the dtype argument is a %s, not a torch dtype", fn,
                         vkind_names[a[6]->kind]);
        return rebuild_tensor(v, g, a[0], a[1], a[2], a[3], a[6]->g, out);
    case GK_RPARAM:
    case GK_RPARAM_STATE:
    case GK_PARAM:
        if (globals[g].kind == GK_RPARAM && na != 3) goto nargs;
        if (globals[g].kind == GK_RPARAM_STATE && na != 4) goto nargs;
        if (globals[g].kind == GK_PARAM && na != 1 && na != 2) goto nargs;
        if (a[0]->kind != V_TENSOR && a[0]->kind != V_OTHER_TENSOR)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: data is a %s, not a tensor", fn, vkind_names[a[0]->kind]);
        *out = a[0];
        return LORA_OK;
    case GK_FROM_TYPE_V2: {
        if (na != 4) goto nargs;
        struct pv *f = a[0], *type = a[1], *fargs = a[2];
        if (f->kind != V_GLOBAL || type->kind != V_GLOBAL || fargs->kind != V_TUPLE)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s expects (function, type, args tuple, state)", fn);
        int tk = globals[type->g].kind, fk = globals[f->g].kind;
        if (tk != GK_TENSOR_CLASS && tk != GK_PARAM) {
            char tn[96];
            return vfail(v, LORA_E_UNSUPPORTED_LAYOUT, "%s: tensor subclass %s is not supported", fn,
                         gname(type->g, tn, sizeof tn));
        }
        if (fk != GK_RT1 && fk != GK_RT2 && fk != GK_RT3 && fk != GK_RT_OTHER && fk != GK_RPARAM &&
            fk != GK_RPARAM_STATE)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s: the function is not a tensor rebuild function", fn);
        return call_global(v, f->g, fargs, 0, out);
    }
    case GK_SIZE:
        if (na != 1 || (a[0]->kind != V_TUPLE && a[0]->kind != V_LIST))
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s expects one tuple argument", fn);
        *out = a[0];
        return LORA_OK;
    case GK_RT_OTHER:
        *out = new_value(v, V_OTHER_TENSOR);
        if (!*out) return v->err;
        (*out)->g = (int16_t)g;
        return LORA_OK;
    case GK_INERT:
        *out = new_value(v, V_OPAQUE);
        if (!*out) return v->err;
        (*out)->g = (int16_t)g;
        return LORA_OK;
    default:   /* storage types, dtypes, torch.Tensor */
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s cannot be %s", fn, newobj ? "instantiated" : "called");
    }
nargs:
    return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s called with %u arguments", fn, na);
}

/* ---- BINPERSID (P10) ------------------------------------------------------------------------ */
static lora_status persistent_load(struct vm *v, struct pv *pid, struct pv **out) {
    if (pid->kind != V_TUPLE || pid->n != 5)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT,
                     "persistent id is a %s%s, not ('storage', storage_type, key, location, numel)",
                     vkind_names[pid->kind], pid->kind == V_TUPLE ? " of another length" : "");
    struct pv **it = pid->u.items;
    if (!str_eq(it[0], "storage")) {
        char e[80] = "";
        if (it[0]->kind == V_STR || it[0]->kind == V_BYTES) ckpt_escape(e, sizeof e, it[0]->u.s, it[0]->n);
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "persistent id type is %s%s%s, not 'storage'",
                     e[0] ? "'" : vkind_names[it[0]->kind], e, e[0] ? "'" : "");
    }
    if (it[1]->kind != V_GLOBAL || globals[it[1]->g].kind != GK_STORAGE)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "persistent id storage type is a %s, not a torch storage class",
                     vkind_names[it[1]->kind]);
    struct pv *key = it[2];
    if (key->kind != V_STR)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "persistent id key is a %s, not a str", vkind_names[key->kind]);
    int digits = key->n >= 1 && key->n <= 20;
    for (uint32_t i = 0; digits && i < key->n; i++) digits = key->u.s[i] >= '0' && key->u.s[i] <= '9';
    char ek[100];
    ckpt_escape(ek, sizeof ek, key->u.s, key->n);
    if (!digits)
        return vfail(v, LORA_E_CKPT_ZIP_ENTRY, "storage key '%s' is not a decimal record number (data/<n>)", ek);
    if (it[3]->kind != V_STR && it[3]->kind != V_BYTES)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "persistent id location is a %s, not a str",
                     vkind_names[it[3]->kind]);
    int64_t numel;
    if (!as_int(it[4], &numel))
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "persistent id numel is a %s, not an int", vkind_names[it[4]->kind]);
    if (numel < 0)
        return vfail(v, LORA_E_CKPT_STORAGE_SIZE, "storage '%s' has negative numel %lld", ek, (long long)numel);
    const struct gdef *sg = &globals[it[1]->g];
    uint64_t need_bytes, have = 0;
    if (!ck_mul_u64((uint64_t)numel, sg->elsize, &need_bytes))
        return vfail(v, LORA_E_CKPT_STORAGE_SIZE, "storage '%s': numel %lld of %s overflows 64 bits", ek,
                     (long long)numel, sg->name);
    int64_t rec = v->env->lookup(v->env->user, (const char *)key->u.s, key->n, &have);
    if (rec < 0) return vfail(v, LORA_E_CKPT_ZIP_ENTRY, "storage key '%s': the archive has no record data/%s", ek, ek);
    if (need_bytes > have)
        return vfail(v, LORA_E_CKPT_STORAGE_SIZE,
                     "storage '%s' declares %lld elements of %s (%llu bytes) but record data/%s holds %llu bytes", ek,
                     (long long)numel, sg->name, (unsigned long long)need_bytes, ek, (unsigned long long)have);
    struct pv *x = new_value(v, V_STORAGE);
    if (!x) return v->err;
    x->u.st = vm_alloc(v, sizeof *x->u.st);
    if (!x->u.st) return v->err;
    x->u.st->key = key->u.s;
    x->u.st->key_len = key->n;
    x->u.st->g = it[1]->g;
    x->u.st->numel = numel;
    x->u.st->record = rec;
    x->u.st->record_bytes = have;
    *out = x;
    return LORA_OK;
}

/* ---- the state dict (P13) ------------------------------------------------------------------ */
static lora_status collect(struct vm *v, struct pv *top, struct pk_result *res) {
    if (top->kind != V_DICT)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "the checkpoint holds a %s, not a dict", vkind_names[top->kind]);
    struct pv *sd = top;
    for (uint32_t i = 0; i + 1 < top->n; i += 2)
        if (str_eq(top->u.items[i], "state_dict") && top->u.items[i]->kind == V_STR &&
            top->u.items[i + 1]->kind == V_DICT) {
            sd = top->u.items[i + 1];
            res->from_state_dict_key = 1;
        }
    int64_t nt = 0;
    for (uint32_t i = 0; i + 1 < sd->n; i += 2)
        if (sd->u.items[i + 1]->kind == V_TENSOR || sd->u.items[i + 1]->kind == V_OTHER_TENSOR) nt++;
    v->out = lora_calloc(v->ctx, (size_t)(nt ? nt : 1), sizeof *v->out);
    if (!v->out) return vfail(v, LORA_E_NOMEM, "out of host memory");
    for (uint32_t i = 0; i + 1 < sd->n; i += 2) {
        struct pv *k = sd->u.items[i], *val = sd->u.items[i + 1];
        if (val->kind != V_TENSOR && val->kind != V_OTHER_TENSOR) {
            res->n_ignored++;
            continue;
        }
        v->op_pos = k->at;
        v->op = v->p[k->at];
        if (k->kind != V_STR)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "a state-dict tensor has a %s key, not a str",
                         vkind_names[k->kind]);
        char ek[300];
        ckpt_escape(ek, sizeof ek, k->u.s, k->n);
        if (memchr(k->u.s, 0, k->n))
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "state-dict key '%s' contains a NUL byte", ek);
        if (k->n > CKPT_MAX_NAME)
            return vfail(v, LORA_E_LIMIT, "state-dict key of %u bytes exceeds %d", k->n, CKPT_MAX_NAME);
        if (val->kind == V_OTHER_TENSOR) {
            const struct gdef *gd = &globals[val->g];
            if (gd->kind == GK_STORAGE || gd->kind == GK_DTYPE)
                return vfail(v, LORA_E_UNSUPPORTED, "tensor '%s' has element type %s, which liblora does not support",
                             ek, gd->name);
            return vfail(v, LORA_E_UNSUPPORTED_LAYOUT,
                         "tensor '%s' is built by %s.%s; liblora reads dense tensors with a storage only", ek, gd->mod,
                         gd->name);
        }
        struct pk_tensor *t = &v->out[res->n++];
        *t = *val->u.t;
        t->name = (const char *)k->u.s;
        t->name_len = k->n;
        t->key_offset = k->at;
    }
    res->t = v->out;
    return LORA_OK;
}

/* ---- the interpreter --------------------------------------------------------------------------- */
static lora_status step(struct vm *v, int *done);

static void vm_free(struct vm *v) {
    while (v->chunks) {
        struct chunk *c = v->chunks;
        v->chunks = c->next;
        lora_free(v->ctx, c);
    }
    lora_free(v->ctx, v->stack);
    lora_free(v->ctx, v->marks);
    lora_free(v->ctx, v->mkeys);
    lora_free(v->ctx, v->mvals);
    lora_free(v->ctx, v->out);
    lora_free(v->ctx, v);
}

void pk_result_free(lora_ctx *ctx, struct pk_result *res) {
    (void)ctx;
    if (res->vm) vm_free(res->vm);
    memset(res, 0, sizeof *res);
}

lora_status pk_load_state_dict(lora_ctx *ctx, const uint8_t *pkl, size_t n, const struct pk_env *env,
                               struct pk_result *res) {
    memset(res, 0, sizeof *res);
    struct vm *v = lora_calloc(ctx, 1, sizeof *v);
    if (!v) return lora_fail(ctx, LORA_E_NOMEM, "%s: %s: out of host memory", env->label, env->entry);
    v->ctx = ctx;
    v->env = env;
    v->p = pkl;
    v->n = n;
    v->budget = (uint64_t)n * PK_MEM_PER_BYTE + PK_MEM_BASE;
    v->none.kind = V_NONE;
    v->vtrue.kind = V_BOOL;
    v->vtrue.u.i = 1;
    v->vfalse.kind = V_BOOL;
    v->empty_tuple.kind = V_TUPLE;
    lora_status s = LORA_OK;
    int done = 0;
    if (n > UINT32_MAX) {
        s = lora_fail(ctx, LORA_E_LIMIT, "%s: %s: pickle of %zu bytes is too large", env->label, env->entry, n);
    } else {
        while (!done && s == LORA_OK) {
            if (v->pos >= v->n) {
                v->op_pos = v->pos;
                v->op = 0;
                s = lora_fail(ctx, LORA_E_CKPT_PICKLE_STRUCT,
                              "%s: %s offset %zu: the pickle ends without a STOP opcode (truncated or not a pickle)",
                              env->label, env->entry, v->pos);
                break;
            }
            s = step(v, &done);
        }
    }
    if (s == LORA_OK) {
        v->op_pos = v->pos - 1;
        v->op = '.';
        if (v->pos != v->n)
            s = vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%zu bytes follow STOP", v->n - v->pos);
        else if (v->nmarks || v->sp != 1)
            s = vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "STOP with %zu values and %zu MARKs left on the stack (want 1 and 0)",
                      v->sp, v->nmarks);
        else
            s = collect(v, v->stack[0], res);
    }
    if (s != LORA_OK) {
        vm_free(v);
        memset(res, 0, sizeof *res);
        return s;
    }
    res->vm = v;
    return LORA_OK;
}

static lora_status op_reduce(struct vm *v, int newobj) {
    NEED_STACK(2);
    struct pv *args = v->stack[v->sp - 1], *fn = v->stack[v->sp - 2];
    if (fn->kind != V_GLOBAL)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "the callable is a %s, not an allowlisted global",
                     vkind_names[fn->kind]);
    if (args->kind != V_TUPLE)
        return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "the arguments are a %s, not a tuple", vkind_names[args->kind]);
    struct pv *r = NULL;
    LORA_TRY(call_global(v, fn->g, args, newobj, &r));
    v->sp -= 2;
    return push(v, r);
}

static lora_status step(struct vm *v, int *done) {
    v->op_pos = v->pos;
    v->op = v->p[v->pos++];
    size_t first = 0, k = 0;
    struct pv *x;
    switch (v->op) {
    case 0x80: /* PROTO */
        LORA_TRY(need(v, 1, "PROTO"));
        if (v->p[v->pos] > 5) return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "unsupported pickle protocol %u", v->p[v->pos]);
        v->pos++;
        return LORA_OK;
    case 0x95: /* FRAME: framing only; the length must fit */
        LORA_TRY(need(v, 8, "FRAME"));
        if (rd_le(v->p + v->pos, 8) > v->n - v->pos - 8)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "frame of %llu bytes runs past the end of the pickle",
                         (unsigned long long)rd_le(v->p + v->pos, 8));
        v->pos += 8;
        return LORA_OK;
    case '.': /* STOP */
        *done = 1;
        return LORA_OK;
    case 'c': { /* GLOBAL */
        const uint8_t *m = NULL, *nm = NULL;   /* set by read_line on success; -O3 cannot see it */
        size_t ml = 0, nl = 0;
        LORA_TRY(read_line(v, &m, &ml, "GLOBAL module"));
        LORA_TRY(read_line(v, &nm, &nl, "GLOBAL name"));
        return resolve_global(v, m, ml, nm, nl);
    }
    case 0x93: { /* STACK_GLOBAL */
        NEED_STACK(2);
        struct pv *nm = v->stack[v->sp - 1], *m = v->stack[v->sp - 2];
        if (m->kind != V_STR || nm->kind != V_STR)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "module and name are %s and %s, not str", vkind_names[m->kind],
                         vkind_names[nm->kind]);
        v->sp -= 2;
        return resolve_global(v, m->u.s, m->n, nm->u.s, nm->n);
    }
    case 'R': return op_reduce(v, 0);
    case 0x81: return op_reduce(v, 1);   /* NEWOBJ: cls args -> cls.__new__(cls, *args) */
    case 'b': { /* BUILD */
        NEED_STACK(2);
        struct pv *state = v->stack[v->sp - 1], *inst = v->stack[v->sp - 2];
        if (inst->kind == V_TENSOR || inst->kind == V_OTHER_TENSOR) {
            if (state->kind != V_DICT && state->kind != V_NONE)
                return vfail(v, LORA_E_UNSUPPORTED_LAYOUT,
                             "BUILD on a tensor with a %s state (legacy Tensor.set_) is not supported",
                             vkind_names[state->kind]);
        } else if (inst->kind != V_DICT && inst->kind != V_OPAQUE) {
            return vfail(v, LORA_E_CKPT_PICKLE_OPCODE,
                         "BUILD on a %s: only dicts, tensors and inert allowlisted objects can be built",
                         vkind_names[inst->kind]);
        }
        v->sp--;   /* the state is ignored: nothing is ever constructed */
        return LORA_OK;
    }
    case 'Q': { /* BINPERSID */
        NEED_STACK(1);
        struct pv *r = NULL;
        LORA_TRY(persistent_load(v, v->stack[v->sp - 1], &r));
        v->stack[v->sp - 1] = r;
        return LORA_OK;
    }
    case '(': return push_mark(v);
    case 't': /* TUPLE */
        LORA_TRY(pop_mark(v, &first, &k));
        return push(v, k ? new_seq(v, V_TUPLE, v->stack + first, k) : &v->empty_tuple);
    case 0x85: case 0x86: case 0x87: { /* TUPLE1-3 */
        size_t m = (size_t)(v->op - 0x84);
        NEED_STACK(m);
        x = new_seq(v, V_TUPLE, v->stack + v->sp - m, m);
        if (!x) return v->err;
        v->sp -= m;
        return push(v, x);
    }
    case ')': return push(v, &v->empty_tuple);
    case ']': return push(v, new_value(v, V_LIST));
    case '}': return push(v, new_value(v, V_DICT));
    case 0x8f: return push(v, new_value(v, V_SET));
    case 0x91: /* FROZENSET */
        LORA_TRY(pop_mark(v, &first, &k));
        return push(v, new_seq(v, V_SET, v->stack + first, k));
    case 'a': { /* APPEND */
        NEED_STACK(2);
        struct pv *l = v->stack[v->sp - 2];
        if (l->kind != V_LIST)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "APPEND to a %s, not a list", vkind_names[l->kind]);
        LORA_TRY(seq_extend(v, l, v->stack + v->sp - 1, 1));
        v->sp--;
        return LORA_OK;
    }
    case 'e': case 0x90: { /* APPENDS, ADDITEMS */
        LORA_TRY(pop_mark(v, &first, &k));
        NEED_STACK(1);
        struct pv *l = v->stack[v->sp - 1];
        uint8_t want = v->op == 'e' ? V_LIST : V_SET;
        if (l->kind != want)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "%s to a %s, not a %s", opname(v->op), vkind_names[l->kind],
                         vkind_names[want]);
        return seq_extend(v, l, v->stack + first, k);
    }
    case 's': { /* SETITEM */
        NEED_STACK(3);
        struct pv *d = v->stack[v->sp - 3];
        if (d->kind != V_DICT)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "SETITEM on a %s, not a dict", vkind_names[d->kind]);
        LORA_TRY(seq_extend(v, d, v->stack + v->sp - 2, 2));
        v->sp -= 2;
        return LORA_OK;
    }
    case 'u': { /* SETITEMS */
        LORA_TRY(pop_mark(v, &first, &k));
        NEED_STACK(1);
        struct pv *d = v->stack[v->sp - 1];
        if (d->kind != V_DICT)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "SETITEMS on a %s, not a dict", vkind_names[d->kind]);
        if (k % 2)
            return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "SETITEMS with an odd number (%zu) of keys and values", k);
        return seq_extend(v, d, v->stack + first, k);
    }
    case 'N': return push(v, &v->none);
    case 0x88: return push(v, &v->vtrue);
    case 0x89: return push(v, &v->vfalse);
    case 'J':
        LORA_TRY(need(v, 4, "BININT"));
        x = new_int(v, (int32_t)(uint32_t)rd_le(v->p + v->pos, 4));
        v->pos += 4;
        return push(v, x);
    case 'K':
        LORA_TRY(need(v, 1, "BININT1"));
        x = new_int(v, v->p[v->pos]);
        v->pos += 1;
        return push(v, x);
    case 'M':
        LORA_TRY(need(v, 2, "BININT2"));
        x = new_int(v, (int64_t)rd_le(v->p + v->pos, 2));
        v->pos += 2;
        return push(v, x);
    case 0x8a: { /* LONG1: little-endian two's complement of n bytes */
        LORA_TRY(need(v, 1, "LONG1"));
        size_t nb = v->p[v->pos];
        LORA_TRY(need(v, 1 + nb, "LONG1"));
        const uint8_t *b = v->p + v->pos + 1;
        v->pos += 1 + nb;
        if (nb > 8) {
            /* wider than 64 bits unless the extra bytes only extend the sign */
            uint8_t ext = (b[7] & 0x80) ? 0xff : 0x00;
            for (size_t i = 8; i < nb; i++)
                if (b[i] != ext) return push(v, new_value(v, V_BIGINT));
            nb = 8;
        }
        uint64_t u = nb ? rd_le(b, (int)nb) : 0;
        if (nb && nb < 8 && (b[nb - 1] & 0x80)) u |= ~UINT64_C(0) << (8 * nb);
        int64_t i;
        memcpy(&i, &u, sizeof i);
        return push(v, new_int(v, i));
    }
    case 'G': { /* BINFLOAT: big-endian IEEE double */
        LORA_TRY(need(v, 8, "BINFLOAT"));
        uint64_t u = 0;
        for (int i = 0; i < 8; i++) u = (u << 8) | v->p[v->pos + (size_t)i];
        v->pos += 8;
        x = new_value(v, V_FLOAT);
        if (x) memcpy(&x->u.f, &u, sizeof u);
        return push(v, x);
    }
    case 'X':
        LORA_TRY(need(v, 4, "BINUNICODE"));
        v->pos += 4;
        return push_text(v, rd_le(v->p + v->pos - 4, 4), 1);
    case 0x8c:
        LORA_TRY(need(v, 1, "SHORT_BINUNICODE"));
        v->pos += 1;
        return push_text(v, v->p[v->pos - 1], 1);
    case 0x8d:
        LORA_TRY(need(v, 8, "BINUNICODE8"));
        v->pos += 8;
        return push_text(v, rd_le(v->p + v->pos - 8, 8), 1);
    case 'U':
        LORA_TRY(need(v, 1, "SHORT_BINSTRING"));
        v->pos += 1;
        return push_text(v, v->p[v->pos - 1], 2);
    case 'T': {
        LORA_TRY(need(v, 4, "BINSTRING"));
        int32_t len = (int32_t)(uint32_t)rd_le(v->p + v->pos, 4);
        if (len < 0) return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "negative string length %d", len);
        v->pos += 4;
        return push_text(v, (uint64_t)len, 2);
    }
    case 'B':
        LORA_TRY(need(v, 4, "BINBYTES"));
        v->pos += 4;
        return push_text(v, rd_le(v->p + v->pos - 4, 4), 0);
    case 'C':
        LORA_TRY(need(v, 1, "SHORT_BINBYTES"));
        v->pos += 1;
        return push_text(v, v->p[v->pos - 1], 0);
    case 0x8e:
        LORA_TRY(need(v, 8, "BINBYTES8"));
        v->pos += 8;
        return push_text(v, rd_le(v->p + v->pos - 8, 8), 0);
    case 'h': case 'j': { /* BINGET, LONG_BINGET */
        int w = v->op == 'h' ? 1 : 4;
        LORA_TRY(need(v, (size_t)w, opname(v->op)));
        uint32_t idx = (uint32_t)rd_le(v->p + v->pos, w);
        v->pos += (size_t)w;
        x = memo_get(v, idx);
        if (!x) return vfail(v, LORA_E_CKPT_PICKLE_STRUCT, "memo entry %u was never stored", idx);
        return push(v, x);
    }
    case 'q': case 'r': { /* BINPUT, LONG_BINPUT */
        int w = v->op == 'q' ? 1 : 4;
        LORA_TRY(need(v, (size_t)w, opname(v->op)));
        uint32_t idx = (uint32_t)rd_le(v->p + v->pos, w);
        v->pos += (size_t)w;
        NEED_STACK(1);
        return memo_put(v, idx, v->stack[v->sp - 1]);
    }
    case 0x94: /* MEMOIZE */
        NEED_STACK(1);
        if (v->mcount >= UINT32_MAX) return vfail(v, LORA_E_LIMIT, "memo full");
        return memo_put(v, (uint32_t)v->mcount, v->stack[v->sp - 1]);
    case '0': /* POP: the top value, or the MARK when nothing is above it */
        if (v->sp > stack_base(v)) {
            v->sp--;
            return LORA_OK;
        }
        if (!v->nmarks) return underflow(v, 1);
        return pop_mark(v, &first, &k);
    case '1': /* POP_MARK */
        return pop_mark(v, &first, &k);
    case '2': /* DUP */
        NEED_STACK(1);
        return push(v, v->stack[v->sp - 1]);
    case 'i': case 'o':
        return vfail(v, LORA_E_CKPT_PICKLE_OPCODE,
                     "%s calls a class named by the pickle; torch.load(weights_only=True) refuses it and so does liblora",
                     opname(v->op));
    case 'P':
        return vfail(v, LORA_E_CKPT_PICKLE_OPCODE,
                     "text persistent ids are not used by torch zip checkpoints (only BINPERSID storages)");
    case 0x82: case 0x83: case 0x84:
        return vfail(v, LORA_E_CKPT_PICKLE_OPCODE, "extension-registry globals are not accepted");
    default:
        return vfail(v, LORA_E_CKPT_PICKLE_OPCODE, "opcode not accepted in a checkpoint pickle");
    }
}
