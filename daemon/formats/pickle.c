/*
 * pickle.c - the zero-exec pickle VM behind torch_read() (FORMATS.md §3.1-§3.4, §3.12).
 *
 * It owns the pk_doc_t tree it builds and nothing else. In file order:
 *   - the allowlist of globals (§3.2) and what each one means when called;
 *   - node, stack and memo helpers (every growth is capped; see pickle.h);
 *   - the interpretation of REDUCE / NEWOBJ / BUILD / BINPERSID on allowlisted globals, with the
 *     tensor rebuild calls of §3.4 turned into pk_tensor_t descriptors;
 *   - the VM loop, one case per opcode; anything not listed is E_PKL_OPCODE;
 *   - the HAS_TENSOR pass (iterative, cycle-safe);
 *   - the JSON renderer for non-tensor values (recursion bounded by PK_DEPTH_MAX).
 *
 * The VM follows CPython's _pickle.c where the two could differ (mark fences, POP, MEMOIZE
 * numbering, LONG encoding), so a stream means the same here as in torch.load; where CPython is
 * lax (values left on the stack at STOP, bytes after STOP) this VM refuses instead.
 */
#include "pickle.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checked.h"
#include "strhash.h"

#define PK_ITEMS_MAX (1u << 25) /* container items, all containers together */
#define NO_NODE      UINT32_MAX

/* ---- the allowlist ------------------------------------------------------------------------ */

typedef enum g_kind {
    G_DICT_CLASS,      /* collections.OrderedDict / Counter: called with (), (dict,), ([pairs],) */
    G_REBUILD_V1,      /* torch._utils._rebuild_tensor(storage, offset, size, stride) */
    G_REBUILD_V2,      /* ... _v2(storage, offset, size, stride, requires_grad, hooks[, meta]) */
    G_REBUILD_V3,      /* ... _v3(..., hooks, dtype[, meta]) */
    G_PARAM,           /* _rebuild_parameter(data, requires_grad, hooks) */
    G_PARAM_STATE,     /* _rebuild_parameter_with_state(data, requires_grad, hooks, state) */
    G_FROM_TYPE,       /* torch._tensor._rebuild_from_type_v2(func, new_type, args, state) */
    G_UNSUPPORTED,     /* recognised tensor kinds without servable bytes; arg = pk_kind_t */
    G_GET_LAYOUT,      /* torch.serialization._get_layout(name) */
    G_SIZE,            /* torch.Size(tuple) */
    G_DEVICE,          /* torch.device(type[, index]) */
    G_TENSOR_CLASS,    /* torch.Tensor, as new_type of _rebuild_from_type_v2 */
    G_PARAMETER_CLASS, /* torch.nn.parameter.Parameter, likewise */
    G_STORAGE,         /* legacy typed storage class; arg = wsd dtype or -1 (quantized) */
    G_UNTYPED_STORAGE, /* torch.storage.UntypedStorage */
    G_DTYPE,           /* torch.<dtype>; arg = wsd dtype or -1 (no weightsd equivalent) */
    G_QSCHEME,         /* torch.per_tensor_affine, ... */
    G_ENCODE,          /* _codecs.encode(text, 'latin1'): protocol-2 bytes */
    G_BYTES,           /* bytes() / bytearray() */
    G_SET,             /* set(iterable) / frozenset(iterable) */
    G_COMPLEX,         /* complex(re, im) */
} g_kind_t;

struct global {
    const char *module;
    const char *name;
    uint8_t kind;     /* g_kind_t */
    int8_t arg;       /* see g_kind_t */
    uint8_t itemsize; /* G_STORAGE / G_DTYPE: bytes per element as torch counts them */
};

#define STORAGE_CLASSES(mod)                                                                       \
    {mod, "DoubleStorage", G_STORAGE, WSD_DTYPE_F64, 8},                                          \
        {mod, "FloatStorage", G_STORAGE, WSD_DTYPE_F32, 4},                                       \
        {mod, "HalfStorage", G_STORAGE, WSD_DTYPE_F16, 2},                                        \
        {mod, "BFloat16Storage", G_STORAGE, WSD_DTYPE_BF16, 2},                                   \
        {mod, "LongStorage", G_STORAGE, WSD_DTYPE_I64, 8},                                        \
        {mod, "IntStorage", G_STORAGE, WSD_DTYPE_I32, 4},                                         \
        {mod, "ShortStorage", G_STORAGE, WSD_DTYPE_I16, 2},                                       \
        {mod, "CharStorage", G_STORAGE, WSD_DTYPE_I8, 1},                                         \
        {mod, "ByteStorage", G_STORAGE, WSD_DTYPE_U8, 1},                                         \
        {mod, "BoolStorage", G_STORAGE, WSD_DTYPE_BOOL, 1},                                       \
        {mod, "ComplexFloatStorage", G_STORAGE, WSD_DTYPE_C64, 8},                                \
        {mod, "ComplexDoubleStorage", G_STORAGE, WSD_DTYPE_C128, 16},                             \
        {mod, "QInt8Storage", G_STORAGE, -1, 1}, {mod, "QUInt8Storage", G_STORAGE, -1, 1},         \
        {mod, "QInt32Storage", G_STORAGE, -1, 4}, {mod, "QUInt4x2Storage", G_STORAGE, -1, 1},      \
        {mod, "QUInt2x4Storage", G_STORAGE, -1, 1}

static const struct global globals[] = {
    {"collections", "OrderedDict", G_DICT_CLASS, 0, 0},
    {"collections", "Counter", G_DICT_CLASS, 0, 0},
    {"torch._utils", "_rebuild_tensor", G_REBUILD_V1, 0, 0},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_V2, 0, 0},
    {"torch._utils", "_rebuild_tensor_v3", G_REBUILD_V3, 0, 0},
    {"torch._utils", "_rebuild_parameter", G_PARAM, 0, 0},
    {"torch._utils", "_rebuild_parameter_with_state", G_PARAM_STATE, 0, 0},
    {"torch._tensor", "_rebuild_from_type_v2", G_FROM_TYPE, 0, 0},
    {"torch._tensor", "_rebuild_from_type", G_FROM_TYPE, 0, 0},
    /* torch.load maps the pre-1.8 module name 'torch.tensor' to 'torch._tensor'. */
    {"torch.tensor", "_rebuild_from_type_v2", G_FROM_TYPE, 0, 0},
    {"torch.tensor", "_rebuild_from_type", G_FROM_TYPE, 0, 0},
    {"torch._utils", "_rebuild_qtensor", G_UNSUPPORTED, PK_KIND_QUANTIZED, 0},
    {"torch._utils", "_rebuild_sparse_tensor", G_UNSUPPORTED, PK_KIND_SPARSE, 0},
    {"torch._utils", "_rebuild_sparse_csr_tensor", G_UNSUPPORTED, PK_KIND_SPARSE, 0},
    {"torch._utils", "_rebuild_meta_tensor_no_storage", G_UNSUPPORTED, PK_KIND_META, 0},
    {"torch._utils", "_rebuild_nested_tensor", G_UNSUPPORTED, PK_KIND_NESTED, 0},
    {"torch._utils", "_rebuild_wrapper_subclass", G_UNSUPPORTED, PK_KIND_WRAPPER, 0},
    {"torch._utils", "_rebuild_device_tensor_from_numpy", G_UNSUPPORTED, PK_KIND_DEVICE, 0},
    {"torch._utils", "_rebuild_device_tensor_from_cpu_tensor", G_UNSUPPORTED, PK_KIND_DEVICE, 0},
    {"torch._utils", "_rebuild_xla_tensor", G_UNSUPPORTED, PK_KIND_DEVICE, 0},
    {"torch._utils", "_rebuild_mlc_tensor", G_UNSUPPORTED, PK_KIND_DEVICE, 0},
    {"torch.serialization", "_get_layout", G_GET_LAYOUT, 0, 0},
    {"torch", "Size", G_SIZE, 0, 0},
    {"torch", "device", G_DEVICE, 0, 0},
    {"torch", "Tensor", G_TENSOR_CLASS, 0, 0},
    {"torch._tensor", "Tensor", G_TENSOR_CLASS, 0, 0},
    {"torch.nn.parameter", "Parameter", G_PARAMETER_CLASS, 0, 0},
    STORAGE_CLASSES("torch"),
    STORAGE_CLASSES("torch.cuda"),
    {"torch.storage", "UntypedStorage", G_UNTYPED_STORAGE, WSD_DTYPE_U8, 1},
    {"torch", "UntypedStorage", G_UNTYPED_STORAGE, WSD_DTYPE_U8, 1},
    {"torch", "_UntypedStorage", G_UNTYPED_STORAGE, WSD_DTYPE_U8, 1},
    {"torch", "float64", G_DTYPE, WSD_DTYPE_F64, 8},
    {"torch", "double", G_DTYPE, WSD_DTYPE_F64, 8},
    {"torch", "float32", G_DTYPE, WSD_DTYPE_F32, 4},
    {"torch", "float", G_DTYPE, WSD_DTYPE_F32, 4},
    {"torch", "float16", G_DTYPE, WSD_DTYPE_F16, 2},
    {"torch", "half", G_DTYPE, WSD_DTYPE_F16, 2},
    {"torch", "bfloat16", G_DTYPE, WSD_DTYPE_BF16, 2},
    {"torch", "int64", G_DTYPE, WSD_DTYPE_I64, 8},
    {"torch", "long", G_DTYPE, WSD_DTYPE_I64, 8},
    {"torch", "int32", G_DTYPE, WSD_DTYPE_I32, 4},
    {"torch", "int", G_DTYPE, WSD_DTYPE_I32, 4},
    {"torch", "int16", G_DTYPE, WSD_DTYPE_I16, 2},
    {"torch", "short", G_DTYPE, WSD_DTYPE_I16, 2},
    {"torch", "int8", G_DTYPE, WSD_DTYPE_I8, 1},
    {"torch", "uint8", G_DTYPE, WSD_DTYPE_U8, 1},
    {"torch", "bool", G_DTYPE, WSD_DTYPE_BOOL, 1},
    {"torch", "complex64", G_DTYPE, WSD_DTYPE_C64, 8},
    {"torch", "cfloat", G_DTYPE, WSD_DTYPE_C64, 8},
    {"torch", "complex128", G_DTYPE, WSD_DTYPE_C128, 16},
    {"torch", "cdouble", G_DTYPE, WSD_DTYPE_C128, 16},
    {"torch", "uint16", G_DTYPE, WSD_DTYPE_U16, 2},
    {"torch", "uint32", G_DTYPE, WSD_DTYPE_U32, 4},
    {"torch", "uint64", G_DTYPE, WSD_DTYPE_U64, 8},
    {"torch", "float8_e4m3fn", G_DTYPE, WSD_DTYPE_F8_E4M3, 1},
    {"torch", "float8_e5m2", G_DTYPE, WSD_DTYPE_F8_E5M2, 1},
    {"torch", "float8_e4m3fnuz", G_DTYPE, WSD_DTYPE_F8_E4M3FNUZ, 1},
    {"torch", "float8_e5m2fnuz", G_DTYPE, WSD_DTYPE_F8_E5M2FNUZ, 1},
    {"torch", "float8_e8m0fnu", G_DTYPE, WSD_DTYPE_F8_E8M0, 1},
    {"torch", "float4_e2m1fn_x2", G_DTYPE, WSD_DTYPE_F4, 1},
    /* Known dtypes without a weightsd equivalent: recognised so the error can say so. */
    {"torch", "complex32", G_DTYPE, -1, 4},
    {"torch", "chalf", G_DTYPE, -1, 4},
    {"torch", "qint8", G_DTYPE, -1, 1},
    {"torch", "quint8", G_DTYPE, -1, 1},
    {"torch", "qint32", G_DTYPE, -1, 4},
    {"torch", "quint4x2", G_DTYPE, -1, 1},
    {"torch", "quint2x4", G_DTYPE, -1, 1},
    {"torch", "bits8", G_DTYPE, -1, 1},
    {"torch", "bits16", G_DTYPE, -1, 2},
    {"torch", "bits1x8", G_DTYPE, -1, 1},
    {"torch", "bits2x4", G_DTYPE, -1, 1},
    {"torch", "bits4x2", G_DTYPE, -1, 1},
    {"torch", "per_tensor_affine", G_QSCHEME, 0, 0},
    {"torch", "per_tensor_symmetric", G_QSCHEME, 0, 0},
    {"torch", "per_channel_affine", G_QSCHEME, 0, 0},
    {"torch", "per_channel_symmetric", G_QSCHEME, 0, 0},
    {"torch", "per_channel_affine_float_qparams", G_QSCHEME, 0, 0},
    {"_codecs", "encode", G_ENCODE, 0, 0},
    {"__builtin__", "bytes", G_BYTES, 0, 0},
    {"builtins", "bytes", G_BYTES, 0, 0},
    {"__builtin__", "bytearray", G_BYTES, 0, 0},
    {"builtins", "bytearray", G_BYTES, 0, 0},
    {"__builtin__", "set", G_SET, 0, 0},
    {"builtins", "set", G_SET, 0, 0},
    {"__builtin__", "frozenset", G_SET, 0, 0},
    {"builtins", "frozenset", G_SET, 0, 0},
    {"__builtin__", "complex", G_COMPLEX, 0, 0},
    {"builtins", "complex", G_COMPLEX, 0, 0},
};

#define NGLOBALS (sizeof(globals) / sizeof(globals[0]))

const char *pickle_global_name(uint16_t idx, char *buf, size_t cap)
{
    if (idx >= NGLOBALS)
        snprintf(buf, cap, "?");
    else
        snprintf(buf, cap, "%s.%s", globals[idx].module, globals[idx].name);
    return buf;
}

static const char *const kind_names[_PK_KIND_MAX] = {
    [PK_KIND_QUANTIZED] = "quantized tensor",
    [PK_KIND_SPARSE] = "sparse tensor",
    [PK_KIND_META] = "meta tensor (no data)",
    [PK_KIND_NESTED] = "nested tensor",
    [PK_KIND_WRAPPER] = "wrapper-subclass tensor (no storage)",
    [PK_KIND_DEVICE] = "device tensor (XLA/ORT/HPU data)",
    [PK_KIND_CONJ_NEG] = "tensor with a lazy conjugate/negative bit",
    [PK_KIND_DTYPE] = "tensor of a dtype weightsd cannot serve",
};

static const char *const kind_advice[_PK_KIND_MAX] = {
    [PK_KIND_QUANTIZED] = "save t.dequantize(), or t.int_repr() plus its scales and zero points",
    [PK_KIND_SPARSE] = "save t.to_dense(), or its index and value tensors",
    [PK_KIND_META] = "meta tensors have no bytes; materialise them before saving",
    [PK_KIND_NESTED] = "save the component tensors (t.unbind()) instead",
    [PK_KIND_WRAPPER] = "save a plain tensor (e.g. t.to_local() / t.full_tensor()) instead",
    [PK_KIND_DEVICE] = "move the tensor to the CPU (t.cpu()) before saving",
    [PK_KIND_CONJ_NEG] = "save t.resolve_conj().resolve_neg() instead",
    [PK_KIND_DTYPE] = "convert it to a supported dtype (t.to(torch.float32) etc.) before saving",
};

const char *pickle_kind_name(pk_kind_t kind)
{
    return (unsigned)kind < _PK_KIND_MAX ? kind_names[kind] : "unsupported tensor";
}

const char *pickle_kind_advice(pk_kind_t kind)
{
    return (unsigned)kind < _PK_KIND_MAX ? kind_advice[kind] : "re-save it as a dense tensor";
}

static const char *const type_names[_PK_TYPE_MAX] = {
    [PK_NONE] = "None",     [PK_BOOL] = "bool",        [PK_INT] = "int",
    [PK_BIGINT] = "int",    [PK_FLOAT] = "float",      [PK_STR] = "str",
    [PK_BYTES] = "bytes",   [PK_COMPLEX] = "complex",  [PK_TUPLE] = "tuple",
    [PK_LIST] = "list",     [PK_DICT] = "dict",        [PK_SET] = "set",
    [PK_GLOBAL] = "global", [PK_DEVICE] = "device",    [PK_STORAGE] = "storage",
    [PK_TENSOR] = "tensor", [PK_UNSUPPORTED] = "tensor",
};

/* ---- VM state and helpers ----------------------------------------------------------------- */

struct vm {
    pk_doc_t *d;
    const uint8_t *p;
    size_t len;
    size_t pos;         /* next byte to decode */
    size_t frame_end;   /* end of the current FRAME (0: none): no read may cross it */
    size_t op;          /* offset of the opcode being executed, for messages */
    uint32_t *stack;
    size_t sp, stack_cap;
    size_t marks[PK_MARKS_MAX]; /* stack heights at each open MARK */
    size_t nmarks;
    uint32_t *memo;     /* memo index -> node handle, NO_NODE if unset */
    size_t memo_cap;
    size_t memo_len;    /* slots set, which is what MEMOIZE numbers from (as in CPython) */
    uint32_t empty_tuple; /* shared () node, NO_NODE until first needed */
    fmt_err_t *err;
};

static int vm_fail(struct vm *vm, const char *rule, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int vm_fail(struct vm *vm, const char *rule, const char *fmt, ...)
{
    char msg[400];
    va_list ap;

    va_start(ap, fmt);
    (void)vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    (void)fmt_fail(vm->err, WSD_EBADCKPT, rule, "%s (data.pkl offset %zu)", msg, vm->op);
    /* A constant, so the compiler sees every failure path return < 0. */
    return WSD_EBADCKPT;
}

static int vm_nomem(struct vm *vm)
{
    (void)fmt_fail(vm->err, -ENOMEM, NULL, "out of memory unpickling data.pkl");
    return -ENOMEM;
}

static pk_node_t *N(const struct vm *vm, uint32_t h)
{
    return &vm->d->nodes[h];
}

static const char *tname(const struct vm *vm, uint32_t h)
{
    return type_names[N(vm, h)->type];
}

static int new_node(struct vm *vm, pk_type_t type, uint32_t *ret)
{
    pk_doc_t *d = vm->d;
    pk_node_t *n;

    if (d->nnodes >= d->nodes_cap) {
        /* torch pickles spend about 5 bytes per value: start there, so a big state dict is
         * not copied by repeated doubling. */
        uint64_t guess = d->len / 5 + 256;
        uint32_t ncap = d->nodes_cap ? d->nodes_cap * 2
                                     : (uint32_t)(guess < PK_NODES_MAX ? guess : PK_NODES_MAX);
        pk_node_t *p;

        if (d->nnodes >= PK_NODES_MAX)
            return vm_fail(vm, "E_PKL_LIMIT", "more than %u values", PK_NODES_MAX);
        if (ncap > PK_NODES_MAX)
            ncap = PK_NODES_MAX;
        p = realloc(d->nodes, (size_t)ncap * sizeof(*p));
        if (!p)
            return vm_nomem(vm);
        d->nodes = p;
        d->nodes_cap = ncap;
    }
    n = &d->nodes[d->nnodes];
    memset(n, 0, sizeof(*n));
    n->type = (uint8_t)type;
    n->off = (uint32_t)(vm->op > UINT32_MAX ? UINT32_MAX : vm->op);
    *ret = d->nnodes++;
    return 0;
}

static int push(struct vm *vm, uint32_t h)
{
    if (vm->sp >= vm->stack_cap) {
        size_t ncap = vm->stack_cap ? vm->stack_cap * 2 : 256;
        uint32_t *p;

        if (vm->sp >= PK_STACK_MAX)
            return vm_fail(vm, "E_PKL_LIMIT", "more than %u values on the stack", PK_STACK_MAX);
        if (ncap > PK_STACK_MAX)
            ncap = PK_STACK_MAX;
        p = realloc(vm->stack, ncap * sizeof(*p));
        if (!p)
            return vm_nomem(vm);
        vm->stack = p;
        vm->stack_cap = ncap;
    }
    vm->stack[vm->sp++] = h;
    return 0;
}

/* Pushes a freshly made node of \p type and returns its handle. */
static int push_new(struct vm *vm, pk_type_t type, uint32_t *ret)
{
    uint32_t h = NO_NODE;
    int r = new_node(vm, type, &h);

    if (r < 0)
        return r;
    r = push(vm, h);
    if (r < 0)
        return r;
    if (ret)
        *ret = h;
    return 0;
}

static size_t fence(const struct vm *vm)
{
    return vm->nmarks ? vm->marks[vm->nmarks - 1] : 0;
}

/* Ensures \p n values sit above the innermost MARK, as CPython's Pdata checks do. */
static int need_stack(struct vm *vm, size_t n, const char *what)
{
    if (vm->sp - fence(vm) < n)
        return vm_fail(vm, "E_PKL_STACK", "%s needs %zu value%s on the stack, %zu there",
                       what, n, n == 1 ? "" : "s", vm->sp - fence(vm));
    return 0;
}

static uint32_t pop(struct vm *vm)
{
    return vm->stack[--vm->sp];
}

static int pop_mark(struct vm *vm, size_t *ret, const char *what)
{
    if (!vm->nmarks)
        return vm_fail(vm, "E_PKL_STACK", "%s without a MARK", what);
    *ret = vm->marks[--vm->nmarks];
    return 0;
}

/* Makes room for \p slots more item slots in container \p c (a dict pair takes two). */
static int reserve(struct vm *vm, uint32_t c, uint32_t slots)
{
    pk_node_t *n = N(vm, c);
    uint64_t used = n->type == PK_DICT ? 2ull * n->n : n->n;

    if (vm->d->nitems >= PK_ITEMS_MAX)
        return vm_fail(vm, "E_PKL_LIMIT", "more than %u container items", PK_ITEMS_MAX);
    if (used + slots > n->cap) {
        uint64_t ncap = n->cap ? 2ull * n->cap : 4;
        uint32_t *p;

        if (ncap > UINT32_MAX)
            return vm_fail(vm, "E_PKL_LIMIT", "container too large");
        p = realloc(n->u.items, (size_t)ncap * sizeof(*p));
        if (!p)
            return vm_nomem(vm);
        n->u.items = p;
        n->cap = (uint32_t)ncap;
    }
    vm->d->nitems++;
    return 0;
}

/*
 * What cannot be a dict key or a set item: what Python cannot hash (torch.load fails on it too:
 * lists, dicts, sets, tuples holding one), plus frozensets, which share PK_SET with sets, and
 * tensors and storages, which Python hashes by identity but which cannot name anything here.
 */
static bool unhashable(struct vm *vm, uint32_t h)
{
    const pk_node_t *n = N(vm, h);

    return n->type == PK_LIST || n->type == PK_DICT || n->type == PK_SET ||
           n->type == PK_TENSOR || n->type == PK_STORAGE || n->type == PK_UNSUPPORTED ||
           (n->flags & (PK_F_UNHASHABLE | PK_F_BYTEARRAY));
}

static int dict_set(struct vm *vm, uint32_t dict, uint32_t k, uint32_t v)
{
    pk_node_t *dn;
    int r;

    if (unhashable(vm, k))
        return vm_fail(vm, "E_PKL_BAD_CALL", "a %s%s cannot be a dict key", tname(vm, k),
                       N(vm, k)->type == PK_TUPLE ? " holding an unhashable value" : "");
    r = reserve(vm, dict, 2);
    if (r < 0)
        return r;
    dn = N(vm, dict);
    dn->u.items[2 * dn->n] = k;
    dn->u.items[2 * dn->n + 1] = v;
    dn->n++;
    return 0;
}

static int list_add(struct vm *vm, uint32_t list, uint32_t item)
{
    pk_node_t *ln;
    int r;

    if (N(vm, list)->type == PK_SET && unhashable(vm, item))
        return vm_fail(vm, "E_PKL_BAD_CALL", "a %s%s cannot be a set item", tname(vm, item),
                       N(vm, item)->type == PK_TUPLE ? " holding an unhashable value" : "");
    r = reserve(vm, list, 1);
    if (r < 0)
        return r;
    ln = N(vm, list);
    ln->u.items[ln->n++] = item;
    return 0;
}

/* A new tuple/list/set holding stack[from..sp). */
static int make_seq(struct vm *vm, pk_type_t type, size_t from, uint32_t *ret)
{
    uint32_t h = NO_NODE;
    int r;

    if (type == PK_TUPLE && from == vm->sp && vm->empty_tuple != NO_NODE) {
        *ret = vm->empty_tuple;
        return 0;
    }
    r = new_node(vm, type, &h);
    if (r < 0)
        return r;
    /* The count is known: one exact allocation instead of growing item by item. */
    if (vm->sp > from) {
        pk_node_t *n = N(vm, h);
        size_t k = vm->sp - from;

        if (vm->d->nitems + k > PK_ITEMS_MAX)
            return vm_fail(vm, "E_PKL_LIMIT", "more than %u container items", PK_ITEMS_MAX);
        n->u.items = malloc(k * sizeof(*n->u.items));
        if (!n->u.items)
            return vm_nomem(vm);
        memcpy(n->u.items, vm->stack + from, k * sizeof(*n->u.items));
        n->n = n->cap = (uint32_t)k;
        vm->d->nitems += k;
        for (size_t i = 0; i < k; i++) {
            if (type == PK_SET && unhashable(vm, n->u.items[i]))
                return vm_fail(vm, "E_PKL_BAD_CALL", "a %s%s cannot be a set item",
                               tname(vm, n->u.items[i]),
                               N(vm, n->u.items[i])->type == PK_TUPLE
                                   ? " holding an unhashable value" : "");
            if (type == PK_TUPLE && unhashable(vm, n->u.items[i]))
                N(vm, h)->flags |= PK_F_UNHASHABLE;
        }
    }
    if (type == PK_TUPLE && from == vm->sp)
        vm->empty_tuple = h;
    *ret = h;
    return 0;
}

/*
 * Bytes an opcode may read from pos: up to the end of the FRAME it started in, else up to the end
 * of the pickle. CPython's framed reader refuses a read that crosses a frame's end ("pickle
 * exhausted before end of frame"), and on a file object, as torch.load reads data.pkl, a lying
 * frame length makes it read other bytes than these; either way such a stream is refused here.
 */
static size_t avail(const struct vm *vm)
{
    return (vm->pos < vm->frame_end ? vm->frame_end : vm->len) - vm->pos;
}

/* Whether a short read at pos is cut by the end of a FRAME rather than of the pickle. */
static bool in_frame(const struct vm *vm)
{
    return vm->pos < vm->frame_end && vm->frame_end < vm->len;
}

/* The error for a read of \p n bytes (of \p what) that avail() cannot satisfy. */
static int short_read(struct vm *vm, size_t n, const char *what)
{
    if (in_frame(vm))
        return vm_fail(vm, "E_PKL_FRAME", "%s of %zu bytes crosses the end of its FRAME at "
                       "offset %zu", what, n, vm->frame_end);
    return vm_fail(vm, "E_PKL_TRUNCATED", "%s of %zu bytes runs past the end of the pickle (%zu "
                   "bytes left)", what, n, vm->len - vm->pos);
}

static int need_bytes(struct vm *vm, size_t n)
{
    if (avail(vm) >= n)
        return 0;
    if (in_frame(vm))
        return vm_fail(vm, "E_PKL_FRAME", "opcode 0x%02x (needs %zu more bytes) crosses the end "
                       "of its FRAME at offset %zu", vm->p[vm->op], n, vm->frame_end);
    return vm_fail(vm, "E_PKL_TRUNCATED", "pickle ends inside opcode 0x%02x (needs %zu more "
                   "bytes, %zu left)", vm->p[vm->op], n, vm->len - vm->pos);
}

static uint64_t rd_le(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;

    for (unsigned i = n; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

/* UTF-8 as CPython decodes it: well-formed sequences, where encoded surrogates (ED A0..BF xx)
 * are allowed if \p surrogates (errors='surrogatepass', as pickle reads BINUNICODE), and not
 * otherwise (errors='strict', as torch.load's encoding='utf-8' reads a py2 str). */
static bool utf8_valid(const uint8_t *s, size_t n, bool surrogates)
{
    size_t i = 0;

    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint8_t lo = 0x80, hi = 0xbf;

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf)
            k = 1;
        else if (c >= 0xe0 && c <= 0xef)
            k = 2;
        else if (c >= 0xf0 && c <= 0xf4)
            k = 3;
        else
            return false;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
        else if (c == 0xed && !surrogates)
            hi = 0x9f;
        if (n - i <= k)
            return false;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
        i += k + 1;
    }
    return true;
}

/* The length of a counted payload (\p lenbytes, little-endian) that must lie wholly in the
 * stream (and its FRAME) and be at most \p max bytes; on success vm->pos is at the payload. */
static int counted(struct vm *vm, unsigned lenbytes, uint32_t max, const char *what,
                   uint64_t *ret)
{
    uint64_t n;
    int r;

    r = need_bytes(vm, lenbytes);
    if (r < 0)
        return r;
    n = rd_le(vm->p + vm->pos, lenbytes);
    vm->pos += lenbytes;
    if (n > avail(vm))
        return short_read(vm, (size_t)(n > SIZE_MAX ? SIZE_MAX : n), what);
    if (n > max)
        return vm_fail(vm, "E_PKL_LIMIT", "%s of %llu bytes (at most %u)", what,
                       (unsigned long long)n, max);
    *ret = n;
    return 0;
}

/* Strings and bytes: \p lenbytes of little-endian length, then the bytes, borrowed in place;
 * \p py2 text (SHORT_BINSTRING) is decoded strictly. */
static int op_string(struct vm *vm, unsigned lenbytes, pk_type_t type, bool py2)
{
    uint64_t n;
    uint32_t h = NO_NODE;
    int r;

    r = counted(vm, lenbytes, PK_STR_MAX, "string", &n);
    if (r < 0)
        return r;
    if (type == PK_STR && !utf8_valid(vm->p + vm->pos, (size_t)n, !py2))
        return vm_fail(vm, "E_PKL_UTF8", "%s is not valid UTF-8",
                       py2 ? "a Python 2 str (decoded strictly, as torch.load does)" : "string");
    r = push_new(vm, type, &h);
    if (r < 0)
        return r;
    N(vm, h)->u.s = vm->p + vm->pos;
    N(vm, h)->n = (uint32_t)n;
    vm->pos += (size_t)n;
    return 0;
}

static int op_long(struct vm *vm, unsigned lenbytes)
{
    uint64_t n;
    uint32_t h = NO_NODE;
    int r;

    r = counted(vm, lenbytes, PK_BIGINT_MAX, "integer", &n);
    if (r < 0)
        return r;
    {
        const uint8_t *b = vm->p + vm->pos;
        bool neg = n > 0 && (b[n - 1] & 0x80);
        bool fits = true;

        /* Fits int64 when every byte above the eighth only repeats the sign. */
        for (uint64_t i = 8; i < n; i++)
            if (b[i] != (neg ? 0xff : 0x00))
                fits = false;
        if (n > 8 && fits && ((b[7] & 0x80) != 0) != neg)
            fits = false;
        if (fits) {
            uint64_t v = rd_le(b, n < 8 ? (unsigned)n : 8);

            if (neg && n < 8)
                v |= ~0ull << (8 * n);
            r = push_new(vm, PK_INT, &h);
            if (r < 0)
                return r;
            N(vm, h)->u.i = (int64_t)v;
        } else {
            r = push_new(vm, PK_BIGINT, &h);
            if (r < 0)
                return r;
            N(vm, h)->u.s = b;
            N(vm, h)->n = (uint32_t)n;
        }
    }
    vm->pos += (size_t)n;
    return 0;
}

/* ---- globals ------------------------------------------------------------------------------ */

static const char *shown(char *dst, size_t cap, const uint8_t *s, size_t n)
{
    size_t k = n < cap - 1 ? n : cap - 1;

    for (size_t i = 0; i < k; i++)
        dst[i] = s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '?';
    dst[k] = '\0';
    return dst;
}

/*
 * Does the stream right after a refused top-level global build an instance of it (NEWOBJ,
 * possibly after a memo put and an empty or marked argument tuple)? That is what torch.save of a
 * whole nn.Module looks like, and it deserves a better message than "unsupported global".
 */
static bool next_is_newobj(const struct vm *vm)
{
    size_t i = vm->pos;

    if (i < vm->len && vm->p[i] == 'q')
        i += 2;
    else if (i < vm->len && vm->p[i] == 'r')
        i += 5;
    else if (i < vm->len && vm->p[i] == 0x94)
        i += 1;
    if (i < vm->len && vm->p[i] == ')')
        i++;
    return i < vm->len && vm->p[i] == 0x81;
}

static bool has_prefix(const uint8_t *s, size_t n, const char *pfx)
{
    size_t k = strlen(pfx);

    return n >= k && memcmp(s, pfx, k) == 0;
}

static int resolve_global(struct vm *vm, const uint8_t *mod, size_t mlen, const uint8_t *name,
                          size_t nlen)
{
    char m[128], nm[128];
    uint32_t h = NO_NODE;
    int r;

    for (size_t i = 0; i < NGLOBALS; i++) {
        if (strlen(globals[i].module) == mlen && strlen(globals[i].name) == nlen &&
            memcmp(globals[i].module, mod, mlen) == 0 && memcmp(globals[i].name, name, nlen) == 0) {
            r = push_new(vm, PK_GLOBAL, &h);
            if (r < 0)
                return r;
            N(vm, h)->aux = (uint16_t)i;
            return 0;
        }
    }
    shown(m, sizeof(m), mod, mlen);
    shown(nm, sizeof(nm), name, nlen);
    if (has_prefix(mod, mlen, "torch.nn.") || has_prefix(mod, mlen, "__torch__") ||
        (vm->sp == 0 && vm->nmarks == 0 && next_is_newobj(vm)))
        return vm_fail(vm, "E_PKL_GLOBAL",
                       "unsupported global '%s.%s': this file holds a pickled module or object, "
                       "not a state dict; save model.state_dict() instead",
                       m, nm);
    return vm_fail(vm, "E_PKL_GLOBAL",
                   "unsupported global '%s.%s': weightsd loads only tensors and plain data and "
                   "never imports or runs pickled code",
                   m, nm);
}

/* GLOBAL: "module\nname\n", each a line of at most PK_GLOBAL_LINE_MAX bytes. */
static int read_line(struct vm *vm, const uint8_t **ret, size_t *ret_len)
{
    size_t left = avail(vm);
    size_t lim = left < PK_GLOBAL_LINE_MAX + 1 ? left : PK_GLOBAL_LINE_MAX + 1;
    const uint8_t *nl = memchr(vm->p + vm->pos, '\n', lim);

    if (!nl && lim < left)
        return vm_fail(vm, "E_PKL_LIMIT", "GLOBAL name line is too long");
    if (!nl)
        return vm_fail(vm, in_frame(vm) ? "E_PKL_FRAME" : "E_PKL_TRUNCATED",
                       "GLOBAL name line runs past the end of %s",
                       in_frame(vm) ? "its FRAME" : "the pickle");
    *ret = vm->p + vm->pos;
    *ret_len = (size_t)(nl - (vm->p + vm->pos));
    vm->pos += *ret_len + 1;
    return 0;
}

/* ---- calls on allowlisted globals --------------------------------------------------------- */

/* \p what names the value in messages; \p idx >= 0 appends "[idx]". */
static int get_int(struct vm *vm, uint32_t h, const char *what, int idx, int64_t *ret)
{
    const pk_node_t *n = N(vm, h);
    char w[64];

    if (n->type == PK_INT || n->type == PK_BOOL) {
        *ret = n->u.i;
        return 0;
    }
    if (idx >= 0)
        snprintf(w, sizeof(w), "%s[%d]", what, idx);
    else
        snprintf(w, sizeof(w), "%s", what);
    if (n->type == PK_BIGINT)
        return vm_fail(vm, "E_TENSOR_OVERFLOW", "%s does not fit in 64 bits", w);
    return vm_fail(vm, "E_PKL_BAD_CALL", "%s is a %s, not an int", w, tname(vm, h));
}

/* A tuple of non-negative ints (sizes or strides) of at most WSD_MAX_NDIM entries. */
static int get_dims(struct vm *vm, uint32_t h, const char *what, int64_t *out, uint32_t *ret_n)
{
    const pk_node_t *n = N(vm, h);
    int r;

    if (n->type != PK_TUPLE && n->type != PK_LIST)
        return vm_fail(vm, "E_PKL_BAD_CALL", "%s is a %s, not a tuple", what,
                       tname(vm, h));
    if (n->n > WSD_MAX_NDIM)
        return vm_fail(vm, "E_TENSOR_GEOMETRY", "%s has %u dimensions, at most %u supported",
                       what, n->n, WSD_MAX_NDIM);
    for (uint32_t i = 0; i < n->n; i++) {
        r = get_int(vm, N(vm, h)->u.items[i], what, (int)i, &out[i]);
        if (r < 0)
            return r;
        if (out[i] < 0)
            return vm_fail(vm, "E_TENSOR_GEOMETRY", "%s[%u] is negative (%lld)", what, i,
                           (long long)out[i]);
    }
    *ret_n = n->n;
    return 0;
}

static bool str_is(const pk_node_t *n, const char *s)
{
    return n->type == PK_STR && n->n == strlen(s) && memcmp(n->u.s, s, n->n) == 0;
}

static int make_unsupported(struct vm *vm, pk_kind_t kind, uint16_t g, uint32_t *ret)
{
    int r = new_node(vm, PK_UNSUPPORTED, ret);

    if (r < 0)
        return r;
    N(vm, *ret)->aux = (uint16_t)kind;
    N(vm, *ret)->u.ref = g;
    return 0;
}

/* The 2.x metadata argument: {'conj': True} / {'neg': True} change what the bytes mean. */
static bool lazy_bits(const struct vm *vm, uint32_t meta)
{
    const pk_node_t *m = N(vm, meta);

    if (m->type != PK_DICT)
        return false;
    for (uint32_t i = 0; i < m->n; i++) {
        const pk_node_t *k = N(vm, m->u.items[2 * i]), *v = N(vm, m->u.items[2 * i + 1]);

        if ((str_is(k, "conj") || str_is(k, "neg")) &&
            ((v->type == PK_BOOL || v->type == PK_INT) && v->u.i != 0))
            return true;
    }
    return false;
}

/*
 * float4_e2m1fn_x2 counts bytes (two values each); weightsd's F4 counts 4-bit elements, so the
 * last dimension doubles. Only a row-major tensor over its whole storage has a meaning then.
 */
static int f4_convert(struct vm *vm, pk_tensor_t *t)
{
    uint32_t last;

    if (t->ndim == 0 || t->stride[t->ndim - 1] != 1 || t->offset != 0)
        return vm_fail(vm, "E_TENSOR_GEOMETRY",
                       "float4_e2m1fn_x2 tensor must be dense with a unit last stride");
    last = t->ndim - 1;
    for (uint32_t i = 0; i < t->ndim; i++) {
        if (t->shape[i] > INT64_MAX / 2 || t->stride[i] > INT64_MAX / 2)
            return vm_fail(vm, "E_TENSOR_OVERFLOW", "float4 tensor dimensions overflow");
        t->stride[i] = i == last ? 1 : t->stride[i] * 2;
    }
    t->shape[last] *= 2;
    return 0;
}

/* The allowlist name of \p g, formatted only when a message needs it. */
#define GN pickle_global_name(g, gname, sizeof(gname))

static int rebuild_tensor(struct vm *vm, uint16_t g, uint32_t args, uint32_t *ret)
{
    const struct global *gl = &globals[g];
    const pk_node_t *a = N(vm, args);
    const uint32_t *it = a->u.items;
    uint32_t nsize, nstride, want_lo, want_hi, h;
    pk_storage_t *st;
    pk_tensor_t t = {0};
    int64_t off = 0;
    char gname[96];
    int r;

    want_lo = gl->kind == G_REBUILD_V1 ? 4 : gl->kind == G_REBUILD_V2 ? 6 : 7;
    want_hi = gl->kind == G_REBUILD_V1 ? 4 : want_lo + 1;
    if (a->n < want_lo || a->n > want_hi)
        return vm_fail(vm, "E_PKL_BAD_CALL", "%s called with %u arguments (expects %u%s)", GN,
                       a->n, want_lo, want_hi > want_lo ? " or one more" : "");
    if (N(vm, it[0])->type != PK_STORAGE)
        return vm_fail(vm, "E_PKL_BAD_CALL", "%s: first argument is a %s, not a storage", GN,
                       tname(vm, it[0]));
    st = &vm->d->storages[N(vm, it[0])->u.ref];
    r = get_int(vm, it[1], "tensor storage_offset", -1, &off);
    if (r < 0)
        return r;
    if (off < 0)
        return vm_fail(vm, "E_TENSOR_GEOMETRY", "tensor storage_offset is negative (%lld)",
                       (long long)off);
    r = get_dims(vm, it[2], "tensor size", t.shape, &nsize);
    if (r < 0)
        return r;
    r = get_dims(vm, it[3], "tensor stride", t.stride, &nstride);
    if (r < 0)
        return r;
    if (nsize != nstride)
        return vm_fail(vm, "E_TENSOR_GEOMETRY", "tensor size has %u dimensions but stride %u",
                       nsize, nstride);
    t.ndim = nsize;
    t.offset = (uint64_t)off;
    t.storage = it[0];
    t.off = (uint32_t)(vm->op > UINT32_MAX ? UINT32_MAX : vm->op);
    t.dtype = st->dtype;
    if (gl->kind == G_REBUILD_V2 && a->n == 7 && lazy_bits(vm, it[6]))
        return make_unsupported(vm, PK_KIND_CONJ_NEG, g, ret);
    if (gl->kind == G_REBUILD_V3) {
        const pk_node_t *dt = N(vm, it[6]);
        const struct global *dg;

        if (dt->type != PK_GLOBAL || globals[dt->aux].kind != G_DTYPE)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: dtype argument is a %s, not a torch dtype",
                           GN, tname(vm, it[6]));
        if (a->n == 8 && lazy_bits(vm, it[7]))
            return make_unsupported(vm, PK_KIND_CONJ_NEG, g, ret);
        dg = &globals[dt->aux];
        if (dg->arg < 0)
            return make_unsupported(vm, PK_KIND_DTYPE, dt->aux, ret);
        if (!st->untyped && st->dtype != dg->arg)
            return vm_fail(vm, "E_STORAGE_CONFLICT", "storage '%.*s' is %s but the tensor says "
                           "%s.%s", (int)st->key_len, (const char *)st->key,
                           wsd_dtype_name(st->dtype) ? wsd_dtype_name(st->dtype) : "quantized",
                           dg->module, dg->name);
        if (st->untyped && st->numel % dg->itemsize != 0)
            return vm_fail(vm, "E_STORAGE_SIZE", "untyped storage '%.*s' of %llu bytes is not a "
                           "whole number of %s.%s elements", (int)st->key_len,
                           (const char *)st->key, (unsigned long long)st->numel, dg->module,
                           dg->name);
        t.dtype = dg->arg;
    }
    if (t.dtype < 0)
        return make_unsupported(vm, PK_KIND_QUANTIZED, st->cls, ret);
    if (t.dtype == WSD_DTYPE_F4) {
        r = f4_convert(vm, &t);
        if (r < 0)
            return r;
    }
    if (vm->d->ntensors >= vm->d->tensors_cap) {
        uint32_t ncap = vm->d->tensors_cap ? vm->d->tensors_cap * 2 : 64;
        pk_tensor_t *p = realloc(vm->d->tensors, (size_t)ncap * sizeof(*p));

        if (!p)
            return vm_nomem(vm);
        vm->d->tensors = p;
        vm->d->tensors_cap = ncap;
    }
    r = new_node(vm, PK_TENSOR, &h);
    if (r < 0)
        return r;
    N(vm, h)->u.ref = vm->d->ntensors;
    vm->d->tensors[vm->d->ntensors++] = t;
    *ret = h;
    return 0;
}

static bool is_number(const pk_node_t *n)
{
    return n->type == PK_INT || n->type == PK_FLOAT || n->type == PK_BOOL;
}

/* Copies the items of a tuple/list/set into a new set. */
static int make_set_from(struct vm *vm, uint32_t src, uint32_t *ret)
{
    int r = new_node(vm, PK_SET, ret);

    if (r < 0)
        return r;
    for (uint32_t i = 0; src != NO_NODE && i < N(vm, src)->n; i++) {
        r = list_add(vm, *ret, N(vm, src)->u.items[i]);
        if (r < 0)
            return r;
    }
    return 0;
}

/*
 * torch.device(type[, index]) as torch parses it: a known device type, then ":N" or the index
 * argument (not both), N a decimal without leading zeros. torch keeps indices in 8 bits (1.13
 * wraps "cuda:128" to -128), so only 0..127 are taken.
 */
static bool device_ok(const pk_node_t *s, bool has_index, int64_t index)
{
    static const char *const types[] = {
        "cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga",
        "ort", "maia", "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone",
    };
    size_t tlen = 0;
    bool known = false;

    while (tlen < s->n && s->u.s[tlen] != ':')
        tlen++;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]) && !known; i++)
        known = strlen(types[i]) == tlen && memcmp(types[i], s->u.s, tlen) == 0;
    if (!known)
        return false;
    if (tlen < s->n) { /* "type:N" */
        const uint8_t *d = s->u.s + tlen + 1;
        size_t nd = s->n - tlen - 1;
        int v = 0;

        if (has_index || nd == 0 || nd > 3 || (nd > 1 && d[0] == '0'))
            return false;
        for (size_t i = 0; i < nd; i++) {
            if (d[i] < '0' || d[i] > '9')
                return false;
            v = v * 10 + (d[i] - '0');
        }
        return v <= 127;
    }
    return !has_index || (index >= 0 && index <= 127);
}

/* Text whose code points all fit latin-1: only lead bytes C2/C3 may appear. */
static bool latin1_ok(const pk_node_t *s)
{
    for (uint32_t i = 0; i < s->n; i++)
        if (s->u.s[i] >= 0xc4)
            return false;
    return true;
}

/*
 * Interprets callable(*args) for allowlisted global \p g. Never calls anything: each case builds
 * the node the real call would have produced, or refuses. \p depth bounds the one level of
 * indirection _rebuild_from_type_v2 adds.
 */
static int call_global(struct vm *vm, uint16_t g, uint32_t args, unsigned depth, uint32_t *ret)
{
    const struct global *gl = &globals[g];
    const pk_node_t *a = N(vm, args);
    const uint32_t *it = a->u.items;
    char gname[96];
    int r;

    switch ((g_kind_t)gl->kind) {
    case G_DICT_CLASS: {
        uint32_t src = a->n == 1 ? it[0] : NO_NODE;

        if (a->n > 1 || (src != NO_NODE && N(vm, src)->type != PK_DICT &&
                         N(vm, src)->type != PK_LIST && N(vm, src)->type != PK_TUPLE))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s called with unsupported arguments", GN);
        r = new_node(vm, PK_DICT, ret);
        if (r < 0)
            return r;
        N(vm, *ret)->flags |= PK_F_INSTANCE;
        if (src != NO_NODE && N(vm, src)->type == PK_DICT) {
            for (uint32_t i = 0; i < N(vm, src)->n; i++) {
                r = dict_set(vm, *ret, N(vm, src)->u.items[2 * i], N(vm, src)->u.items[2 * i + 1]);
                if (r < 0)
                    return r;
            }
        } else if (src != NO_NODE) {
            for (uint32_t i = 0; i < N(vm, src)->n; i++) {
                uint32_t pr = N(vm, src)->u.items[i];

                if (N(vm, pr)->type != PK_TUPLE || N(vm, pr)->n != 2)
                    return vm_fail(vm, "E_PKL_BAD_CALL", "%s: item %u is not a (key, value) pair",
                                   GN, i);
                r = dict_set(vm, *ret, N(vm, pr)->u.items[0], N(vm, pr)->u.items[1]);
                if (r < 0)
                    return r;
            }
        }
        return 0;
    }
    case G_REBUILD_V1:
    case G_REBUILD_V2:
    case G_REBUILD_V3:
        return rebuild_tensor(vm, g, args, ret);
    case G_PARAM:
    case G_PARAM_STATE: {
        uint32_t want = gl->kind == G_PARAM ? 3 : 4;
        pk_type_t t;

        if (a->n != want)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s called with %u arguments (expects %u)",
                           GN, a->n, want);
        t = (pk_type_t)N(vm, it[0])->type;
        if (t != PK_TENSOR && t != PK_UNSUPPORTED)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: data is a %s, not a tensor", GN,
                           tname(vm, it[0]));
        /* A Parameter shares its data's storage: the same descriptor serves both. */
        *ret = it[0];
        return 0;
    }
    case G_FROM_TYPE: {
        const pk_node_t *fn, *ty;
        uint8_t fk;

        if (a->n != 4)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s called with %u arguments (expects 4)", GN,
                           a->n);
        fn = N(vm, it[0]);
        ty = N(vm, it[1]);
        if (fn->type != PK_GLOBAL || N(vm, it[2])->type != PK_TUPLE || depth > 0)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: expects (rebuild function, type, args, "
                           "state)", GN);
        fk = globals[fn->aux].kind;
        if (fk != G_REBUILD_V1 && fk != G_REBUILD_V2 && fk != G_REBUILD_V3 && fk != G_PARAM &&
            fk != G_PARAM_STATE && fk != G_UNSUPPORTED)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: function %s.%s does not build a tensor",
                           GN, globals[fn->aux].module, globals[fn->aux].name);
        if (ty->type != PK_GLOBAL || (globals[ty->aux].kind != G_TENSOR_CLASS &&
                                      globals[ty->aux].kind != G_PARAMETER_CLASS))
            return vm_fail(vm, "E_TENSOR_UNSUPPORTED_KIND", "%s: tensor subclass %s is not "
                           "supported; save a plain tensor", GN,
                           ty->type == PK_GLOBAL ? globals[ty->aux].name : tname(vm, it[1]));
        /* The state (Python attributes of the tensor) is dropped, as for a plain tensor. */
        return call_global(vm, fn->aux, it[2], depth + 1, ret);
    }
    case G_UNSUPPORTED:
        return make_unsupported(vm, (pk_kind_t)gl->arg, g, ret);
    case G_GET_LAYOUT:
        if (a->n != 1 || N(vm, it[0])->type != PK_STR)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s expects one string", GN);
        *ret = it[0];
        return 0;
    case G_SIZE:
        if (a->n == 0)
            return make_seq(vm, PK_TUPLE, vm->sp, ret);
        if (a->n != 1 || (N(vm, it[0])->type != PK_TUPLE && N(vm, it[0])->type != PK_LIST))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s expects one tuple", GN);
        for (uint32_t i = 0; i < N(vm, it[0])->n; i++)
            if (N(vm, N(vm, it[0])->u.items[i])->type != PK_INT)
                return vm_fail(vm, "E_PKL_BAD_CALL", "%s: item %u is not an int", GN, i);
        *ret = it[0];
        return 0;
    case G_DEVICE:
        if (a->n < 1 || a->n > 2 || N(vm, it[0])->type != PK_STR ||
            (a->n == 2 && N(vm, it[1])->type != PK_INT && N(vm, it[1])->type != PK_NONE))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s expects (type[, index])", GN);
        if (!device_ok(N(vm, it[0]), a->n == 2 && N(vm, it[1])->type == PK_INT,
                       a->n == 2 && N(vm, it[1])->type == PK_INT ? N(vm, it[1])->u.i : 0))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: '%.*s'%s is not a device torch accepts", GN,
                           (int)(N(vm, it[0])->n > 32 ? 32 : N(vm, it[0])->n),
                           (const char *)N(vm, it[0])->u.s,
                           a->n == 2 && N(vm, it[1])->type == PK_INT ? " with an index" : "");
    {
        uint32_t index = a->n == 2 && N(vm, it[1])->type == PK_INT ? it[1] : NO_NODE;

        r = new_node(vm, PK_DEVICE, ret);
        if (r < 0)
            return r;
        N(vm, *ret)->u.pair[0] = it[0];
        N(vm, *ret)->u.pair[1] = index;
        return 0;
    }
    case G_ENCODE: {
        const pk_node_t *enc;

        if (a->n != 2 || N(vm, it[0])->type != PK_STR || N(vm, it[1])->type != PK_STR)
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s expects (text, encoding)", GN);
        enc = N(vm, it[1]);
        if (!str_is(enc, "latin1") && !str_is(enc, "latin-1"))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: encoding '%.*s' is not latin1", GN,
                           (int)(enc->n > 32 ? 32 : enc->n), (const char *)enc->u.s);
        if (!latin1_ok(N(vm, it[0])))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s: text does not fit latin-1", GN);
        r = new_node(vm, PK_BYTES, ret);
        if (r < 0)
            return r;
        N(vm, *ret)->u.s = N(vm, it[0])->u.s;
        N(vm, *ret)->n = N(vm, it[0])->n;
        N(vm, *ret)->flags |= PK_F_LATIN1;
        return 0;
    }
    case G_BYTES: {
        bool mutable = strcmp(gl->name, "bytearray") == 0;

        if (a->n > 1 || (a->n == 1 && N(vm, it[0])->type != PK_BYTES))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s called with unsupported arguments", GN);
        if (a->n == 1 && !mutable) {
            *ret = it[0];
            return 0;
        }
        r = new_node(vm, PK_BYTES, ret);
        if (r < 0)
            return r;
        if (a->n == 1) { /* a new bytearray holding the same bytes */
            N(vm, *ret)->u.s = N(vm, it[0])->u.s;
            N(vm, *ret)->n = N(vm, it[0])->n;
            N(vm, *ret)->flags |= N(vm, it[0])->flags & PK_F_LATIN1;
        }
        if (mutable)
            N(vm, *ret)->flags |= PK_F_BYTEARRAY;
        return 0;
    }
    case G_SET:
        if (a->n == 0)
            return make_set_from(vm, NO_NODE, ret);
        if (a->n == 1 && (N(vm, it[0])->type == PK_LIST || N(vm, it[0])->type == PK_TUPLE ||
                          N(vm, it[0])->type == PK_SET))
            return make_set_from(vm, it[0], ret);
        return vm_fail(vm, "E_PKL_BAD_CALL", "%s called with unsupported arguments", GN);
    case G_COMPLEX:
        if (a->n != 2 || !is_number(N(vm, it[0])) || !is_number(N(vm, it[1])))
            return vm_fail(vm, "E_PKL_BAD_CALL", "%s expects (real, imag) numbers", GN);
        r = new_node(vm, PK_COMPLEX, ret);
        if (r < 0)
            return r;
        N(vm, *ret)->u.pair[0] = it[0];
        N(vm, *ret)->u.pair[1] = it[1];
        return 0;
    case G_TENSOR_CLASS:
    case G_PARAMETER_CLASS:
    case G_STORAGE:
    case G_UNTYPED_STORAGE:
    case G_DTYPE:
    case G_QSCHEME:
        break;
    }
    return vm_fail(vm, "E_PKL_BAD_CALL", "calling %s is not supported", GN);
}

static int op_reduce(struct vm *vm)
{
    uint32_t args, fn, res;
    int r;

    r = need_stack(vm, 2, "REDUCE");
    if (r < 0)
        return r;
    args = pop(vm);
    fn = pop(vm);
    if (N(vm, fn)->type != PK_GLOBAL)
        return vm_fail(vm, "E_PKL_BAD_CALL", "REDUCE on a %s, which is not callable",
                       tname(vm, fn));
    if (N(vm, args)->type != PK_TUPLE)
        return vm_fail(vm, "E_PKL_BAD_CALL", "REDUCE arguments are a %s, not a tuple",
                       tname(vm, args));
    r = call_global(vm, N(vm, fn)->aux, args, 0, &res);
    if (r < 0)
        return r;
    return push(vm, res);
}

/* NEWOBJ: cls.__new__(cls, *args). Only containers have a __new__ that builds inert data. */
static int op_newobj(struct vm *vm)
{
    uint32_t args, cls, res;
    char gname[96];
    uint8_t k;
    int r;

    r = need_stack(vm, 2, "NEWOBJ");
    if (r < 0)
        return r;
    args = pop(vm);
    cls = pop(vm);
    if (N(vm, cls)->type != PK_GLOBAL || N(vm, args)->type != PK_TUPLE)
        return vm_fail(vm, "E_PKL_BAD_CALL", "NEWOBJ of a %s with %s arguments", tname(vm, cls),
                       tname(vm, args));
    k = globals[N(vm, cls)->aux].kind;
    if (k == G_DICT_CLASS) {
        r = new_node(vm, PK_DICT, &res);
        if (r == 0)
            N(vm, res)->flags |= PK_F_INSTANCE;
    } else if (k == G_SET && strcmp(globals[N(vm, cls)->aux].name, "frozenset") == 0) {
        /* frozenset.__new__ takes the items (set.__new__ ignores its arguments). */
        const pk_node_t *a = N(vm, args);

        if (a->n == 0)
            r = make_set_from(vm, NO_NODE, &res);
        else if (a->n == 1 && (N(vm, a->u.items[0])->type == PK_LIST ||
                               N(vm, a->u.items[0])->type == PK_TUPLE ||
                               N(vm, a->u.items[0])->type == PK_SET))
            r = make_set_from(vm, a->u.items[0], &res);
        else
            return vm_fail(vm, "E_PKL_BAD_CALL", "NEWOBJ of frozenset with unsupported arguments");
    } else if (k == G_SET)
        r = make_set_from(vm, NO_NODE, &res);
    else
        return vm_fail(vm, "E_PKL_BAD_CALL", "NEWOBJ of %s: weightsd builds no objects",
                       pickle_global_name(N(vm, cls)->aux, gname, sizeof(gname)));
    if (r < 0)
        return r;
    return push(vm, res);
}

/*
 * BUILD: state applied to the object below it. The only use torch.save makes of it is the
 * _metadata attribute of a state_dict's OrderedDict (§3.7), which carries no tensors: accepted
 * and dropped. BUILD on anything else (a tensor, a list) is refused.
 */
static int op_build(struct vm *vm)
{
    uint32_t state, target;
    const pk_node_t *s;
    bool attrs; /* BUILD sets attributes (into a __dict__, or with setattr) */
    int r;

    r = need_stack(vm, 2, "BUILD");
    if (r < 0)
        return r;
    state = pop(vm);
    target = vm->stack[vm->sp - 1];
    if (N(vm, target)->type != PK_DICT)
        return vm_fail(vm, "E_PKL_BAD_CALL", "BUILD on a %s is not supported", tname(vm, target));
    s = N(vm, state);
    /*
     * CPython's rules: a dict state goes into the object's __dict__ (a plain dict has none); a
     * (state, slotstate) pair does the same with a state that is not None, and sets each item
     * of slotstate, which must be a dict, as an attribute. Nothing is kept: the attributes of a
     * dict subclass are not items.
     */
    if (s->type == PK_DICT) {
        attrs = true;
    } else if (s->type == PK_TUPLE && s->n == 2 &&
               (N(vm, s->u.items[0])->type == PK_DICT || N(vm, s->u.items[0])->type == PK_NONE) &&
               N(vm, s->u.items[1])->type == PK_DICT) {
        attrs = N(vm, s->u.items[0])->type == PK_DICT || N(vm, s->u.items[1])->n > 0;
    } else {
        return vm_fail(vm, "E_PKL_BAD_CALL", "BUILD state is a %s, not a dict or a (dict or None, "
                       "dict) pair", tname(vm, state));
    }
    if (attrs && !(N(vm, target)->flags & PK_F_INSTANCE))
        return vm_fail(vm, "E_PKL_BAD_CALL", "BUILD sets attributes on a plain dict, which has "
                       "none");
    return 0;
}

/* BINPERSID: ('storage', StorageType, key, location, numel), §3.3. */
static int op_persid(struct vm *vm)
{
    const pk_node_t *pid, *cls, *key, *loc, *numel;
    const struct global *g;
    pk_storage_t *st;
    uint32_t p, h;
    int r;

    r = need_stack(vm, 1, "BINPERSID");
    if (r < 0)
        return r;
    p = pop(vm);
    pid = N(vm, p);
    if (pid->type != PK_TUPLE || pid->n != 5)
        return vm_fail(vm, "E_PKL_PERSID", "persistent id is a %s of %u items, not the "
                       "5-tuple ('storage', type, key, location, numel)", tname(vm, p),
                       pid->type == PK_TUPLE ? pid->n : 1);
    if (!str_is(N(vm, pid->u.items[0]), "storage"))
        return vm_fail(vm, "E_PKL_PERSID", "persistent id tag is not 'storage'");
    cls = N(vm, pid->u.items[1]);
    key = N(vm, pid->u.items[2]);
    loc = N(vm, pid->u.items[3]);
    numel = N(vm, pid->u.items[4]);
    if (cls->type != PK_GLOBAL ||
        (globals[cls->aux].kind != G_STORAGE && globals[cls->aux].kind != G_UNTYPED_STORAGE))
        return vm_fail(vm, "E_PKL_PERSID", "persistent id type is a %s, not a storage class",
                       tname(vm, pid->u.items[1]));
    if (key->type != PK_STR || key->n == 0 || key->n > 255 ||
        memchr(key->u.s, '/', key->n) || memchr(key->u.s, '\\', key->n) ||
        memchr(key->u.s, '\0', key->n) || str_is(key, ".") || str_is(key, ".."))
        return vm_fail(vm, "E_PKL_PERSID", "storage key is not a plain record name");
    if (loc->type != PK_STR)
        return vm_fail(vm, "E_PKL_PERSID", "storage location is a %s, not a string",
                       tname(vm, pid->u.items[3]));
    if (numel->type == PK_BIGINT || (numel->type == PK_INT && numel->u.i < 0))
        return vm_fail(vm, "E_STORAGE_SIZE", "storage '%.*s' has %s element count",
                       (int)key->n, (const char *)key->u.s,
                       numel->type == PK_BIGINT ? "an enormous" : "a negative");
    if (numel->type != PK_INT)
        return vm_fail(vm, "E_PKL_PERSID", "storage element count is a %s, not an int",
                       tname(vm, pid->u.items[4]));
    g = &globals[cls->aux];
    if (vm->d->nstorages >= vm->d->storages_cap) {
        uint32_t ncap = vm->d->storages_cap ? vm->d->storages_cap * 2 : 64;
        pk_storage_t *np = realloc(vm->d->storages, (size_t)ncap * sizeof(*np));

        if (!np)
            return vm_nomem(vm);
        vm->d->storages = np;
        vm->d->storages_cap = ncap;
    }
    st = &vm->d->storages[vm->d->nstorages];
    st->key = key->u.s;
    st->key_len = key->n;
    st->cls = cls->aux;
    st->dtype = g->arg;
    st->itemsize = g->itemsize;
    st->untyped = g->kind == G_UNTYPED_STORAGE;
    st->numel = (uint64_t)numel->u.i;
    st->off = (uint32_t)(vm->op > UINT32_MAX ? UINT32_MAX : vm->op);
    r = push_new(vm, PK_STORAGE, &h);
    if (r < 0)
        return r;
    N(vm, h)->u.ref = vm->d->nstorages++;
    return 0;
}

/* ---- the VM loop -------------------------------------------------------------------------- */

static int memo_put(struct vm *vm, uint64_t idx)
{
    int r;

    r = need_stack(vm, 1, "memo put");
    if (r < 0)
        return r;
    /* CPython numbers memo slots 0, 1, 2...: an index beyond the opcode count of this pickle (or
     * the cap) only serves to make us allocate. */
    if (idx >= PK_MEMO_MAX || idx > vm->len)
        return vm_fail(vm, "E_PKL_MEMO", "memo index %llu is out of range",
                       (unsigned long long)idx);
    if (idx >= vm->memo_cap) {
        size_t ncap = vm->memo_cap ? vm->memo_cap : 256;
        uint32_t *p;

        while (ncap <= idx)
            ncap *= 2;
        p = realloc(vm->memo, ncap * sizeof(*p));
        if (!p)
            return vm_nomem(vm);
        memset(p + vm->memo_cap, 0xff, (ncap - vm->memo_cap) * sizeof(*p));
        vm->memo = p;
        vm->memo_cap = ncap;
    }
    if (vm->memo[idx] == NO_NODE)
        vm->memo_len++;
    vm->memo[idx] = vm->stack[vm->sp - 1];
    return 0;
}

static int memo_get(struct vm *vm, uint64_t idx)
{
    if (idx >= vm->memo_cap || vm->memo[idx] == NO_NODE)
        return vm_fail(vm, "E_PKL_MEMO", "memo index %llu was never set",
                       (unsigned long long)idx);
    return push(vm, vm->memo[idx]);
}

/* The opcodes of protocols 0-5 this VM refuses, named so the message says what was seen. */
static const char *opcode_name(uint8_t op)
{
    switch (op) {
    case 'i': return "INST";
    case 'o': return "OBJ";
    case 0x92: return "NEWOBJ_EX";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 'P': return "PERSID";
    case 'I': return "INT";
    case 'L': return "LONG";
    case 'S': return "STRING";
    case 'T': return "BINSTRING";
    case 'V': return "UNICODE";
    case 'F': return "FLOAT";
    case 'g': return "GET";
    case 'p': return "PUT";
    case 'd': return "DICT";
    case 'l': return "LIST";
    case '2': return "DUP";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    default: return "unknown";
    }
}

/* Pops a MARK and gathers what lies above it into \p type, replacing them on the stack. */
static int op_collect(struct vm *vm, pk_type_t type, const char *what)
{
    size_t m = 0;
    uint32_t h = NO_NODE;
    int r;

    r = pop_mark(vm, &m, what);
    if (r < 0)
        return r;
    r = make_seq(vm, type, m, &h);
    if (r < 0)
        return r;
    vm->sp = m;
    return push(vm, h);
}

/* SETITEMS / APPENDS / ADDITEMS: pops a MARK; the target sits just below it. */
static int op_extend(struct vm *vm, pk_type_t want, const char *what)
{
    size_t m = 0;
    uint32_t target;
    int r;

    r = pop_mark(vm, &m, what);
    if (r < 0)
        return r;
    if (m == 0 || m - 1 < fence(vm))
        return vm_fail(vm, "E_PKL_STACK", "%s has no container below its MARK", what);
    target = vm->stack[m - 1];
    if (N(vm, target)->type != want)
        return vm_fail(vm, "E_PKL_BAD_CALL", "%s on a %s", what, tname(vm, target));
    if (want == PK_DICT && (vm->sp - m) % 2)
        return vm_fail(vm, "E_PKL_STACK", "%s with an odd number of values", what);
    for (size_t i = m; i < vm->sp; i += want == PK_DICT ? 2 : 1) {
        r = want == PK_DICT ? dict_set(vm, target, vm->stack[i], vm->stack[i + 1])
                            : list_add(vm, target, vm->stack[i]);
        if (r < 0)
            return r;
    }
    vm->sp = m;
    return 0;
}

static int vm_step(struct vm *vm, bool *done)
{
    uint8_t op = vm->p[vm->pos];
    uint32_t h = NO_NODE;
    int r;

    vm->op = vm->pos++;
    switch (op) {
    case 0x80: /* PROTO */
        r = need_bytes(vm, 1);
        if (r < 0)
            return r;
        if (vm->p[vm->pos] > 5)
            return vm_fail(vm, "E_PKL_OPCODE", "unsupported pickle protocol %u",
                           vm->p[vm->pos]);
        vm->d->protocol = vm->p[vm->pos++];
        return 0;
    case 0x95: /* FRAME: a read-ahead hint; the content is ordinary opcodes */
        r = need_bytes(vm, 8);
        if (r < 0)
            return r;
        /* Python's framed reader: "beginning of a new frame before end of current frame". */
        if (vm->pos < vm->frame_end && vm->pos + 8 < vm->frame_end)
            return vm_fail(vm, "E_PKL_FRAME", "FRAME inside a frame that ends at offset %zu",
                           vm->frame_end);
        if (rd_le(vm->p + vm->pos, 8) > vm->len - vm->pos - 8)
            return vm_fail(vm, "E_PKL_TRUNCATED", "FRAME runs past the end of the pickle");
        vm->frame_end = vm->pos + 8 + (size_t)rd_le(vm->p + vm->pos, 8);
        vm->pos += 8;
        return 0;
    case '.': /* STOP */
        if (vm->nmarks || vm->sp != 1)
            return vm_fail(vm, "E_PKL_STACK", "STOP with %zu values and %zu open MARKs on the "
                           "stack (expects exactly one value)", vm->sp, vm->nmarks);
        vm->d->root = vm->stack[0];
        *done = true;
        return 0;
    case '(': /* MARK */
        if (vm->nmarks >= PK_MARKS_MAX)
            return vm_fail(vm, "E_PKL_LIMIT", "more than %u nested MARKs", PK_MARKS_MAX);
        vm->marks[vm->nmarks++] = vm->sp;
        return 0;
    case '}': /* EMPTY_DICT */
        return push_new(vm, PK_DICT, NULL);
    case ']': /* EMPTY_LIST */
        return push_new(vm, PK_LIST, NULL);
    case 0x8f: /* EMPTY_SET */
        return push_new(vm, PK_SET, NULL);
    case ')': /* EMPTY_TUPLE */
        r = make_seq(vm, PK_TUPLE, vm->sp, &h);
        return r < 0 ? r : push(vm, h);
    case 't': /* TUPLE */
        return op_collect(vm, PK_TUPLE, "TUPLE");
    case 0x91: /* FROZENSET */
        return op_collect(vm, PK_SET, "FROZENSET");
    case 0x85: /* TUPLE1 */
    case 0x86: /* TUPLE2 */
    case 0x87: { /* TUPLE3 */
        size_t k = (size_t)(op - 0x84);

        r = need_stack(vm, k, "TUPLEn");
        if (r < 0)
            return r;
        r = make_seq(vm, PK_TUPLE, vm->sp - k, &h);
        if (r < 0)
            return r;
        vm->sp -= k;
        return push(vm, h);
    }
    case 's': { /* SETITEM */
        uint32_t k, v;

        r = need_stack(vm, 3, "SETITEM");
        if (r < 0)
            return r;
        v = pop(vm);
        k = pop(vm);
        if (N(vm, vm->stack[vm->sp - 1])->type != PK_DICT)
            return vm_fail(vm, "E_PKL_BAD_CALL", "SETITEM on a %s",
                           tname(vm, vm->stack[vm->sp - 1]));
        return dict_set(vm, vm->stack[vm->sp - 1], k, v);
    }
    case 'u': /* SETITEMS */
        return op_extend(vm, PK_DICT, "SETITEMS");
    case 'a': { /* APPEND */
        uint32_t v;

        r = need_stack(vm, 2, "APPEND");
        if (r < 0)
            return r;
        v = pop(vm);
        if (N(vm, vm->stack[vm->sp - 1])->type != PK_LIST)
            return vm_fail(vm, "E_PKL_BAD_CALL", "APPEND on a %s",
                           tname(vm, vm->stack[vm->sp - 1]));
        return list_add(vm, vm->stack[vm->sp - 1], v);
    }
    case 'e': /* APPENDS */
        return op_extend(vm, PK_LIST, "APPENDS");
    case 0x90: /* ADDITEMS */
        return op_extend(vm, PK_SET, "ADDITEMS");
    case 'N': /* NONE */
        return push_new(vm, PK_NONE, NULL);
    case 0x88: /* NEWTRUE */
    case 0x89: /* NEWFALSE */
        r = push_new(vm, PK_BOOL, &h);
        if (r == 0)
            N(vm, h)->u.i = op == 0x88;
        return r;
    case 'K': /* BININT1 */
    case 'M': /* BININT2 */
    case 'J': { /* BININT */
        unsigned k = op == 'K' ? 1 : op == 'M' ? 2 : 4;
        uint64_t v;

        r = need_bytes(vm, k);
        if (r < 0)
            return r;
        v = rd_le(vm->p + vm->pos, k);
        vm->pos += k;
        r = push_new(vm, PK_INT, &h);
        if (r == 0)
            N(vm, h)->u.i = op == 'J' ? (int64_t)(int32_t)(uint32_t)v : (int64_t)v;
        return r;
    }
    case 0x8a: /* LONG1 */
        return op_long(vm, 1);
    case 0x8b: /* LONG4 */
        return op_long(vm, 4);
    case 'G': { /* BINFLOAT: big-endian IEEE-754 */
        uint64_t bits = 0;
        double v;

        r = need_bytes(vm, 8);
        if (r < 0)
            return r;
        for (int i = 0; i < 8; i++)
            bits = bits << 8 | vm->p[vm->pos + (size_t)i];
        vm->pos += 8;
        memcpy(&v, &bits, sizeof(v));
        r = push_new(vm, PK_FLOAT, &h);
        if (r == 0)
            N(vm, h)->u.f = v;
        return r;
    }
    case 'X': /* BINUNICODE */
        return op_string(vm, 4, PK_STR, false);
    case 0x8c: /* SHORT_BINUNICODE */
        return op_string(vm, 1, PK_STR, false);
    case 0x8d: /* BINUNICODE8 */
        return op_string(vm, 8, PK_STR, false);
    case 'U': /* SHORT_BINSTRING: torch.load decodes py2 str as UTF-8 */
        return op_string(vm, 1, PK_STR, true);
    case 'B': /* BINBYTES */
        return op_string(vm, 4, PK_BYTES, false);
    case 'C': /* SHORT_BINBYTES */
        return op_string(vm, 1, PK_BYTES, false);
    case 0x8e: /* BINBYTES8 */
        return op_string(vm, 8, PK_BYTES, false);
    case 0x96: /* BYTEARRAY8 */
        r = op_string(vm, 8, PK_BYTES, false);
        if (r == 0)
            N(vm, vm->stack[vm->sp - 1])->flags |= PK_F_BYTEARRAY;
        return r;
    case 'q': /* BINPUT */
        r = need_bytes(vm, 1);
        if (r < 0)
            return r;
        return memo_put(vm, vm->p[vm->pos++]);
    case 'r': /* LONG_BINPUT */
        r = need_bytes(vm, 4);
        if (r < 0)
            return r;
        vm->pos += 4;
        return memo_put(vm, rd_le(vm->p + vm->pos - 4, 4));
    case 0x94: /* MEMOIZE */
        return memo_put(vm, vm->memo_len);
    case 'h': /* BINGET */
        r = need_bytes(vm, 1);
        if (r < 0)
            return r;
        return memo_get(vm, vm->p[vm->pos++]);
    case 'j': /* LONG_BINGET */
        r = need_bytes(vm, 4);
        if (r < 0)
            return r;
        vm->pos += 4;
        return memo_get(vm, rd_le(vm->p + vm->pos - 4, 4));
    case 'c': { /* GLOBAL */
        const uint8_t *mod = NULL, *name = NULL;
        size_t mlen = 0, nlen = 0;

        r = read_line(vm, &mod, &mlen);
        if (r < 0)
            return r;
        r = read_line(vm, &name, &nlen);
        if (r < 0)
            return r;
        return resolve_global(vm, mod, mlen, name, nlen);
    }
    case 0x93: { /* STACK_GLOBAL */
        uint32_t mod, name;

        r = need_stack(vm, 2, "STACK_GLOBAL");
        if (r < 0)
            return r;
        name = pop(vm);
        mod = pop(vm);
        if (N(vm, mod)->type != PK_STR || N(vm, name)->type != PK_STR)
            return vm_fail(vm, "E_PKL_BAD_CALL", "STACK_GLOBAL of a %s and a %s",
                           tname(vm, mod), tname(vm, name));
        return resolve_global(vm, N(vm, mod)->u.s, N(vm, mod)->n, N(vm, name)->u.s,
                              N(vm, name)->n);
    }
    case 'R': /* REDUCE */
        return op_reduce(vm);
    case 0x81: /* NEWOBJ */
        return op_newobj(vm);
    case 'b': /* BUILD */
        return op_build(vm);
    case 'Q': /* BINPERSID */
        return op_persid(vm);
    case '0': /* POP: CPython pops a MARK instead when one sits at the top */
        if (vm->nmarks && vm->marks[vm->nmarks - 1] == vm->sp) {
            vm->nmarks--;
            return 0;
        }
        r = need_stack(vm, 1, "POP");
        if (r == 0)
            vm->sp--;
        return r;
    case '1': { /* POP_MARK */
        size_t m = 0;

        r = pop_mark(vm, &m, "POP_MARK");
        if (r == 0)
            vm->sp = m;
        return r;
    }
    default:
        if (op >= 0x20 && op < 0x7f)
            return vm_fail(vm, "E_PKL_OPCODE", "unsupported pickle opcode 0x%02x ('%c', %s)", op,
                           op, opcode_name(op));
        return vm_fail(vm, "E_PKL_OPCODE", "unsupported pickle opcode 0x%02x (%s)", op,
                       opcode_name(op));
    }
}

/* ---- HAS_TENSOR pass ---------------------------------------------------------------------- */

static bool is_container(const pk_node_t *n)
{
    return n->type == PK_TUPLE || n->type == PK_LIST || n->type == PK_DICT || n->type == PK_SET;
}

static uint32_t nchildren(const pk_node_t *n)
{
    return n->type == PK_DICT ? 2 * n->n : n->n;
}

/*
 * Marks every container that reaches a tensor, storage or unsupported tensor. Iterative
 * post-order DFS over the whole node array, so cycles (possible through the memo) and shared
 * containers cost one visit per edge and no C stack.
 */
static int mark_tensors(pk_doc_t *d, fmt_err_t *err)
{
    struct frame {
        uint32_t node, next;
    } *st = NULL;
    size_t cap = 0;

    for (uint32_t i = 0; i < d->nnodes; i++) {
        size_t sp = 0;

        if (!is_container(&d->nodes[i]) || (d->nodes[i].flags & PK_F_SEEN))
            continue;
        if (!cap) {
            cap = 64;
            st = malloc(cap * sizeof(*st));
            if (!st)
                return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        }
        st[sp++] = (struct frame){i, 0};
        d->nodes[i].flags |= PK_F_SEEN;
        while (sp) {
            struct frame *f = &st[sp - 1];
            pk_node_t *c = &d->nodes[f->node];

            if (f->next < nchildren(c)) {
                pk_node_t *k = &d->nodes[c->u.items[f->next]];
                uint32_t kh = c->u.items[f->next++];

                if (k->type == PK_TENSOR || k->type == PK_STORAGE || k->type == PK_UNSUPPORTED) {
                    c->flags |= PK_F_HAS_TENSOR;
                } else if (is_container(k)) {
                    if (k->flags & PK_F_DONE) {
                        c->flags |= k->flags & PK_F_HAS_TENSOR;
                    } else if (!(k->flags & PK_F_SEEN)) {
                        if (sp == cap) {
                            struct frame *p = realloc(st, 2 * cap * sizeof(*st));

                            if (!p) {
                                free(st);
                                return fmt_fail(err, -ENOMEM, NULL, "out of memory");
                            }
                            st = p;
                            cap *= 2;
                        }
                        st[sp++] = (struct frame){kh, 0};
                        k->flags |= PK_F_SEEN;
                    }
                }
                continue;
            }
            c->flags |= PK_F_DONE;
            sp--;
            if (sp && (c->flags & PK_F_HAS_TENSOR))
                d->nodes[st[sp - 1].node].flags |= PK_F_HAS_TENSOR;
        }
    }
    free(st);
    return 0;
}

/* ---- entry points ------------------------------------------------------------------------- */

pk_doc_t *pickle_free(pk_doc_t *d)
{
    if (!d)
        return NULL;
    for (uint32_t i = 0; i < d->nnodes; i++)
        if (is_container(&d->nodes[i]))
            free(d->nodes[i].u.items);
    free(d->nodes);
    free(d->storages);
    free(d->tensors);
    free(d);
    return NULL;
}

static int check_members(const pk_doc_t *d, fmt_err_t *err);

int pickle_parse(const uint8_t *buf, size_t len, pk_doc_t **ret, fmt_err_t *err)
{
    struct vm *vm;
    bool done = false;
    int r = 0;

    vm = calloc(1, sizeof(*vm));
    if (!vm)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    vm->d = calloc(1, sizeof(*vm->d));
    if (!vm->d) {
        free(vm);
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    }
    vm->d->buf = buf;
    vm->d->len = len;
    vm->p = buf;
    vm->len = len;
    vm->err = err;
    vm->empty_tuple = NO_NODE;
    while (!done && r == 0) {
        if (vm->pos >= vm->len) {
            vm->op = vm->len;
            r = vm_fail(vm, "E_PKL_TRUNCATED", "pickle ends without STOP");
            break;
        }
        r = vm_step(vm, &done);
    }
    if (r == 0 && vm->pos != vm->len) {
        vm->op = vm->pos;
        r = vm_fail(vm, "E_PKL_TRAILING", "%zu bytes follow STOP", vm->len - vm->pos);
    }
    if (r == 0)
        r = mark_tensors(vm->d, err);
    if (r == 0)
        r = check_members(vm->d, err);
    free(vm->stack);
    free(vm->memo);
    if (r < 0)
        pickle_free(vm->d);
    else
        *ret = vm->d;
    free(vm);
    return r;
}

/* ---- JSON rendering ----------------------------------------------------------------------- */

void pk_buf_free(pk_buf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static int buf_put(pk_buf_t *b, const char *s, size_t n, fmt_err_t *err)
{
    size_t max = b->max ? b->max : PK_JSON_MAX;

    if (n > max || b->len > max - n)
        return fmt_fail(err, WSD_EBADCKPT, "E_PKL_LIMIT",
                        "a non-tensor value renders to more than %zu bytes of JSON", max);
    if (b->len + n + 1 > b->cap) {
        size_t ncap = b->cap ? b->cap : 64;
        char *p;

        while (ncap < b->len + n + 1)
            ncap *= 2;
        p = realloc(b->p, ncap);
        if (!p)
            return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        b->p = p;
        b->cap = ncap;
    }
    if (n) /* s may be NULL then (an empty bytes value) */
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int buf_str(pk_buf_t *b, const char *s, fmt_err_t *err)
{
    return buf_put(b, s, strlen(s), err);
}

/*
 * The shortest decimal that reads back as the same double, laid out as Python's repr() lays it
 * out: positional for decimal exponents -4 to 15 ("100000.0", "0.0001"), scientific otherwise
 * ("1e+16", "1e-05"), and always with a '.' or an exponent. Finite values only.
 */
static void fmt_double(double v, char out[40])
{
    char e[40], digits[24];
    size_t nd = 0, o = 0;
    const char *p;
    int exp;

    for (int prec = 0; prec <= 16; prec++) {
        snprintf(e, sizeof(e), "%.*e", prec, v);
        if (strtod(e, NULL) == v)
            break;
    }
    p = e;
    if (*p == '-')
        out[o++] = *p++;
    for (; *p && *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = exp + 1; i < 0; i++)
                out[o++] = '0';
            for (size_t i = 0; i < nd; i++)
                out[o++] = digits[i];
        } else {
            for (int i = 0; i <= exp; i++)
                out[o++] = (size_t)i < nd ? digits[i] : '0';
            out[o++] = '.';
            if (nd > (size_t)exp + 1)
                for (size_t i = (size_t)exp + 1; i < nd; i++)
                    out[o++] = digits[i];
            else
                out[o++] = '0';
        }
        out[o] = '\0';
        return;
    }
    out[o++] = digits[0];
    if (nd > 1) {
        out[o++] = '.';
        for (size_t i = 1; i < nd; i++)
            out[o++] = digits[i];
    }
    snprintf(out + o, 40 - o, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
}

static int put_double(pk_buf_t *b, double v, bool quoted_nonfinite, fmt_err_t *err)
{
    char tmp[40];

    if (isnan(v))
        return buf_str(b, quoted_nonfinite ? "\"NaN\"" : "NaN", err);
    if (isinf(v))
        return buf_str(b, v > 0 ? (quoted_nonfinite ? "\"Infinity\"" : "Infinity")
                                : (quoted_nonfinite ? "\"-Infinity\"" : "-Infinity"),
                       err);
    fmt_double(v, tmp);
    return buf_str(b, tmp, err);
}

/* Two's complement little-endian bytes in decimal (at most PK_BIGINT_MAX bytes). */
static int put_bigint(pk_buf_t *b, const uint8_t *s, uint32_t n, fmt_err_t *err)
{
    uint8_t mag[PK_BIGINT_MAX];
    char digits[PK_BIGINT_MAX * 3 + 2];
    size_t nd = 0;
    bool neg = n && (s[n - 1] & 0x80), nonzero = true;

    memcpy(mag, s, n);
    if (neg) {
        unsigned carry = 1;

        for (uint32_t i = 0; i < n; i++) {
            unsigned v = (uint8_t)~mag[i] + carry;

            mag[i] = (uint8_t)v;
            carry = v >> 8;
        }
    }
    while (nonzero) {
        unsigned rem = 0;

        nonzero = false;
        for (uint32_t i = n; i-- > 0;) {
            unsigned cur = rem << 8 | mag[i];

            mag[i] = (uint8_t)(cur / 10);
            rem = cur % 10;
            nonzero = nonzero || mag[i];
        }
        digits[nd++] = (char)('0' + rem);
    }
    if (neg)
        digits[nd++] = '-';
    for (size_t i = 0; i < nd / 2; i++) {
        char t = digits[i];

        digits[i] = digits[nd - 1 - i];
        digits[nd - 1 - i] = t;
    }
    return buf_put(b, digits, nd, err);
}

/* A JSON string: UTF-8 passes through, except encoded surrogates, which become \uXXXX escapes
 * (raw they would not be valid UTF-8). \p latin1_bytes: each byte is one code point. */
static int put_jstring(pk_buf_t *b, const uint8_t *s, size_t n, bool latin1_bytes,
                       fmt_err_t *err)
{
    size_t i = 0, run = 0;
    char esc[8];
    int r;

    r = buf_put(b, "\"", 1, err);
    while (r == 0 && i < n) {
        uint8_t c = s[i];
        size_t skip = 1;

        if (c >= 0x20 && c != '"' && c != '\\' && (c < 0x80 || !latin1_bytes) &&
            !(c == 0xed && !latin1_bytes && i + 2 < n && s[i + 1] >= 0xa0)) {
            i++;
            run++;
            continue;
        }
        r = buf_put(b, (const char *)s + i - run, run, err);
        run = 0;
        if (r < 0)
            break;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            r = buf_put(b, esc, 2, err);
        } else if (c == 0xed && !latin1_bytes) {
            unsigned cp = (unsigned)(c & 0x0f) << 12 | (unsigned)(s[i + 1] & 0x3f) << 6 |
                          (unsigned)(s[i + 2] & 0x3f);

            snprintf(esc, sizeof(esc), "\\u%04x", cp);
            r = buf_put(b, esc, 6, err);
            skip = 3;
        } else {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            r = buf_put(b, esc, 6, err);
        }
        i += skip;
    }
    if (r == 0)
        r = buf_put(b, (const char *)s + i - run, run, err);
    return r < 0 ? r : buf_put(b, "\"", 1, err);
}

static int render(const pk_doc_t *d, uint32_t h, pk_buf_t *out, unsigned depth, bool as_key,
                  fmt_err_t *err);

/* Where one rendered key of a dict lies in the output buffer. */
struct key_span {
    size_t off, len;
};

static int span_cmp(const void *a, const void *b, void *buf)
{
    const struct key_span *x = a, *y = b;
    const char *p = buf;
    int c = memcmp(p + x->off, p + y->off, x->len < y->len ? x->len : y->len);

    return c ? c : (x->len > y->len) - (x->len < y->len);
}

/*
 * Values are compared by class: equal (by ==) values get one class id. A node's class is
 * interned from its canonical string, where a tuple names its items by their class ids, so
 * each node is written out once however often the memo shares it (a tuple holding one tuple
 * twice, 64 deep, is 64 short strings, not 2^64 bytes) and the whole check is linear.
 */
struct classes {
    const pk_doc_t *d;
    uint32_t *cls;       /* per node: class id, 0 before it is known */
    pk_buf_t scratch;    /* canonical strings being built (nested, stack-like) */
    pk_buf_t names;      /* interned canonical strings */
    struct slot {
        uint64_t hash;
        size_t off, len; /* in names */
        uint32_t id;     /* 0: empty slot */
    } *tab;
    size_t cap, count;   /* cap: a power of two */
};

static int class_of(struct classes *c, uint32_t h, unsigned depth, uint32_t *ret,
                    fmt_err_t *err);

/*
 * Appends a byte string that is equal for two hashable values exactly when Python's == holds
 * for them: 1, True, 1.0 and complex(1, 0) are one key; "1" and b"1" are not; NaN equals only
 * itself (the same node, as a memo GET gives the same object); torch.float is torch.float32.
 * Numbers end in ';', strings carry their length and a tuple names its items by class id, so
 * no two values run together.
 */
static int canon(struct classes *c, uint32_t h, pk_buf_t *b, unsigned depth, fmt_err_t *err)
{
    const pk_doc_t *d = c->d;
    const pk_node_t *n = &d->nodes[h];
    char tmp[64];
    int r;

    if (depth > PK_DEPTH_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_PKL_LIMIT",
                        "a dict key or set item nests deeper than %u (data.pkl offset %u)",
                        PK_DEPTH_MAX, n->off);
    switch ((pk_type_t)n->type) {
    case PK_NONE:
        return buf_str(b, "N", err);
    case PK_BOOL:
    case PK_INT:
        snprintf(tmp, sizeof(tmp), "n%lld;", (long long)n->u.i);
        return buf_str(b, tmp, err);
    case PK_BIGINT:
        r = buf_str(b, "n", err);
        if (r == 0)
            r = put_bigint(b, n->u.s, n->n, err);
        return r < 0 ? r : buf_str(b, ";", err);
    case PK_FLOAT:
        if (isnan(n->u.f))
            snprintf(tmp, sizeof(tmp), "x%u;", h);
        else if (n->u.f == 0)
            snprintf(tmp, sizeof(tmp), "n0;");
        else if (isfinite(n->u.f) && n->u.f == floor(n->u.f))
            snprintf(tmp, sizeof(tmp), "n%.0f;", n->u.f); /* exact for integral doubles */
        else
            snprintf(tmp, sizeof(tmp), "f%a;", n->u.f);
        return buf_str(b, tmp, err);
    case PK_COMPLEX: {
        const pk_node_t *re = &d->nodes[n->u.pair[0]], *im = &d->nodes[n->u.pair[1]];
        double vi = im->type == PK_FLOAT ? im->u.f : (double)im->u.i;

        if (vi == 0)
            return canon(c, n->u.pair[0], b, depth + 1, err);
        snprintf(tmp, sizeof(tmp), "c%a,%a;", re->type == PK_FLOAT ? re->u.f : (double)re->u.i,
                 vi);
        return buf_str(b, tmp, err);
    }
    case PK_STR:
    case PK_BYTES: {
        bool latin1 = n->type == PK_BYTES && (n->flags & PK_F_LATIN1);
        uint32_t len = n->n;

        for (uint32_t i = 0; latin1 && i < n->n; i++)
            len -= (n->u.s[i] & 0xc0) == 0x80; /* one byte per code point */
        snprintf(tmp, sizeof(tmp), "%c%u:", n->type == PK_STR ? 's' : 'b', len);
        r = buf_str(b, tmp, err);
        if (r == 0 && !latin1)
            r = buf_put(b, (const char *)n->u.s, n->n, err);
        /* UTF-8 text standing for its latin-1 bytes (_codecs.encode): those bytes. */
        for (uint32_t i = 0; r == 0 && latin1 && i < n->n; i++) {
            char ch = (char)(n->u.s[i] < 0x80 ? n->u.s[i]
                                             : ((n->u.s[i] & 0x03) << 6 | (n->u.s[i + 1] & 0x3f)));

            i += n->u.s[i] >= 0x80;
            r = buf_put(b, &ch, 1, err);
        }
        return r;
    }
    case PK_TUPLE:
        snprintf(tmp, sizeof(tmp), "t%u(", n->n);
        r = buf_str(b, tmp, err);
        for (uint32_t i = 0; r == 0 && i < n->n; i++) {
            uint32_t id = 0;

            r = class_of(c, n->u.items[i], depth + 1, &id, err);
            snprintf(tmp, sizeof(tmp), "#%u,", id);
            if (r == 0)
                r = buf_str(b, tmp, err);
        }
        return r < 0 ? r : buf_str(b, ")", err);
    case PK_GLOBAL:
        if (globals[n->aux].kind == G_DTYPE && globals[n->aux].arg >= 0)
            snprintf(tmp, sizeof(tmp), "gd%d;", globals[n->aux].arg);
        else
            snprintf(tmp, sizeof(tmp), "g%u;", n->aux);
        return buf_str(b, tmp, err);
    case PK_DEVICE: {
        const pk_node_t *t = &d->nodes[n->u.pair[0]];

        snprintf(tmp, sizeof(tmp), "d%u:", t->n);
        r = buf_str(b, tmp, err);
        if (r == 0)
            r = buf_put(b, (const char *)t->u.s, t->n, err);
        snprintf(tmp, sizeof(tmp), ":%lld;",
                 n->u.pair[1] == NO_NODE ? -1LL : (long long)d->nodes[n->u.pair[1]].u.i);
        return r < 0 ? r : buf_str(b, tmp, err);
    }
    default: /* never hashable here (refused when added): identity */
        snprintf(tmp, sizeof(tmp), "?%u;", h);
        return buf_str(b, tmp, err);
    }
}

/* The class id of canonical string [off, off + len) of c->scratch, new if unseen. */
static int intern(struct classes *c, size_t off, size_t len, uint32_t *ret, fmt_err_t *err)
{
    const char *p = c->scratch.p + off;
    uint64_t hv = strhash(p, len);
    size_t i;
    int r;

    if (2 * (c->count + 1) > c->cap) {
        size_t ncap = c->cap ? 2 * c->cap : 256;
        struct slot *t = calloc(ncap, sizeof(*t));

        if (!t)
            return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        for (size_t k = 0; k < c->cap; k++)
            if (c->tab[k].id) {
                size_t j = (size_t)c->tab[k].hash & (ncap - 1);

                while (t[j].id)
                    j = (j + 1) & (ncap - 1);
                t[j] = c->tab[k];
            }
        free(c->tab);
        c->tab = t;
        c->cap = ncap;
    }
    for (i = (size_t)hv & (c->cap - 1); c->tab[i].id; i = (i + 1) & (c->cap - 1))
        if (c->tab[i].hash == hv && c->tab[i].len == len &&
            (len == 0 || memcmp(c->names.p + c->tab[i].off, p, len) == 0)) {
            *ret = c->tab[i].id;
            return 0;
        }
    c->tab[i] = (struct slot){.hash = hv, .off = c->names.len, .len = len,
                              .id = (uint32_t)(c->count + 1)};
    r = buf_put(&c->names, len ? p : NULL, len, err);
    if (r < 0) {
        c->tab[i].id = 0;
        return r;
    }
    c->count++;
    *ret = c->tab[i].id;
    return 0;
}

static int class_of(struct classes *c, uint32_t h, unsigned depth, uint32_t *ret,
                    fmt_err_t *err)
{
    size_t start = c->scratch.len;
    int r;

    if (c->cls[h]) {
        *ret = c->cls[h];
        return 0;
    }
    r = canon(c, h, &c->scratch, depth, err);
    if (r == 0)
        r = intern(c, start, c->scratch.len - start, &c->cls[h], err);
    c->scratch.len = start; /* what a caller had built stays; the rest is interned */
    if (r == 0)
        *ret = c->cls[h];
    return r;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return (x > y) - (x < y);
}

/*
 * Python keeps one entry per key in a dict and one item per value in a set; torch.save cannot
 * write two equal ones, and a hand-made pickle that does would be read differently by weightsd
 * (which keeps every entry) and torch. So every dict and set with two equal keys or items, by
 * Python's ==, is refused (E_PKL_DUP_KEY), once the whole stream has run (SETITEMS and
 * ADDITEMS may add to a container at any point).
 */
static int check_members(const pk_doc_t *d, fmt_err_t *err)
{
    struct classes c = {.d = d, .scratch = {.max = SIZE_MAX / 2}, .names = {.max = SIZE_MAX / 2}};
    uint32_t *ids = NULL;
    size_t cap = 0;
    int r = 0;

    for (uint32_t h = 0; r == 0 && h < d->nnodes; h++) {
        const pk_node_t *n = &d->nodes[h];
        unsigned stride = n->type == PK_DICT ? 2 : 1;

        if ((n->type != PK_DICT && n->type != PK_SET) || n->n < 2)
            continue;
        if (!c.cls && !(c.cls = calloc(d->nnodes, sizeof(*c.cls)))) {
            r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
            break;
        }
        if (n->n > cap) {
            uint32_t *p = realloc(ids, sizeof(*ids) * n->n);

            if (!p) {
                r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
                break;
            }
            ids = p;
            cap = n->n;
        }
        for (uint32_t i = 0; r == 0 && i < n->n; i++)
            r = class_of(&c, n->u.items[stride * i], 0, &ids[i], err);
        if (r < 0)
            break;
        qsort(ids, n->n, sizeof(*ids), cmp_u32);
        for (uint32_t i = 1; i < n->n; i++)
            if (ids[i - 1] == ids[i]) {
                r = fmt_fail(err, WSD_EBADCKPT, "E_PKL_DUP_KEY",
                             "%s built at data.pkl offset %u has two equal %s (Python would "
                             "keep one)", n->type == PK_DICT ? "dict" : "set", n->off,
                             n->type == PK_DICT ? "keys" : "items");
                break;
            }
    }
    free(ids);
    free(c.cls);
    free(c.tab);
    pk_buf_free(&c.scratch);
    pk_buf_free(&c.names);
    return r;
}

/*
 * Keys that are distinct in Python but render to the same JSON name (1 and "1": json.dumps
 * would repeat it) are refused when rendered; keys equal in Python were refused by
 * check_members() already.
 */
static int check_dup_keys(const pk_buf_t *out, struct key_span *keys, const pk_node_t *n,
                          fmt_err_t *err)
{
    qsort_r(keys, n->n, sizeof(*keys), span_cmp, out->p);
    for (uint32_t i = 1; i < n->n; i++)
        if (span_cmp(&keys[i - 1], &keys[i], out->p) == 0)
            return fmt_fail(err, WSD_EBADCKPT, "E_PKL_DUP_KEY",
                            "dict built at data.pkl offset %u has two keys that render as %.*s", n->off,
                            (int)(keys[i].len > 64 ? 64 : keys[i].len), out->p + keys[i].off);
    return 0;
}

/* Python's json.dumps turns non-string keys into strings: ints and floats as text, True ->
 * "true", None -> "null". Anything else (a tuple, bytes) is rendered as JSON and quoted. */
static int render_key_json(const pk_doc_t *d, uint32_t h, pk_buf_t *out, unsigned depth,
                           fmt_err_t *err)
{
    const pk_node_t *n = &d->nodes[h];
    pk_buf_t tmp = {.max = out->max};
    int r;

    if (n->type == PK_STR)
        return put_jstring(out, n->u.s, n->n, false, err);
    r = render(d, h, &tmp, depth, true, err);
    if (r == 0)
        r = put_jstring(out, (const uint8_t *)(tmp.p ? tmp.p : ""), tmp.len, false, err);
    pk_buf_free(&tmp);
    return r;
}

static int render(const pk_doc_t *d, uint32_t h, pk_buf_t *out, unsigned depth, bool as_key,
                  fmt_err_t *err)
{
    const pk_node_t *n = &d->nodes[h];
    char tmp[64];
    int r = 0;

    if (depth >= PK_DEPTH_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_PKL_LIMIT",
                        "non-tensor value nested deeper than %u levels (or recursive), data.pkl "
                        "offset %u",
                        PK_DEPTH_MAX, n->off);
    switch ((pk_type_t)n->type) {
    case PK_NONE:
        return buf_str(out, "null", err);
    case PK_BOOL:
        return buf_str(out, n->u.i ? "true" : "false", err);
    case PK_INT:
        snprintf(tmp, sizeof(tmp), "%lld", (long long)n->u.i);
        return buf_str(out, tmp, err);
    case PK_BIGINT:
        return put_bigint(out, n->u.s, n->n, err);
    case PK_FLOAT:
        return put_double(out, n->u.f, !as_key, err);
    case PK_STR:
        return put_jstring(out, n->u.s, n->n, false, err);
    case PK_BYTES:
        return put_jstring(out, n->u.s, n->n, !(n->flags & PK_F_LATIN1), err);
    case PK_COMPLEX: {
        /* complex(1, True) is (1+1j): both parts are floats whatever built them. */
        const pk_node_t *re = &d->nodes[n->u.pair[0]], *im = &d->nodes[n->u.pair[1]];

        r = buf_str(out, "[", err);
        if (r == 0)
            r = put_double(out, re->type == PK_FLOAT ? re->u.f : (double)re->u.i, true, err);
        if (r == 0)
            r = buf_str(out, ",", err);
        if (r == 0)
            r = put_double(out, im->type == PK_FLOAT ? im->u.f : (double)im->u.i, true, err);
        return r < 0 ? r : buf_str(out, "]", err);
    }
    case PK_TUPLE:
    case PK_LIST:
    case PK_SET:
        r = buf_str(out, "[", err);
        for (uint32_t i = 0; r == 0 && i < n->n; i++) {
            if (i)
                r = buf_str(out, ",", err);
            if (r == 0)
                r = render(d, n->u.items[i], out, depth + 1, false, err);
        }
        return r < 0 ? r : buf_str(out, "]", err);
    case PK_DICT: {
        struct key_span *keys = NULL;

        if (n->n > 1 && !(keys = malloc(sizeof(*keys) * n->n)))
            return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        r = buf_str(out, "{", err);
        for (uint32_t i = 0; r == 0 && i < n->n; i++) {
            if (i)
                r = buf_str(out, ",", err);
            if (keys)
                keys[i].off = out->len;
            if (r == 0)
                r = render_key_json(d, n->u.items[2 * i], out, depth + 1, err);
            if (keys)
                keys[i].len = out->len - keys[i].off;
            if (r == 0)
                r = buf_str(out, ":", err);
            if (r == 0)
                r = render(d, n->u.items[2 * i + 1], out, depth + 1, false, err);
        }
        if (r == 0 && keys)
            r = check_dup_keys(out, keys, n, err);
        free(keys);
        return r < 0 ? r : buf_str(out, "}", err);
    }
    case PK_GLOBAL: {
        char name[128];

        pickle_global_name(n->aux, name, sizeof(name));
        return put_jstring(out, (const uint8_t *)name, strlen(name), false, err);
    }
    case PK_DEVICE: {
        const pk_node_t *t = &d->nodes[n->u.pair[0]];
        pk_buf_t dev = {.max = 512};

        r = buf_put(&dev, (const char *)t->u.s, t->n > 256 ? 256 : t->n, err);
        if (r == 0 && n->u.pair[1] != NO_NODE) {
            snprintf(tmp, sizeof(tmp), ":%lld", (long long)d->nodes[n->u.pair[1]].u.i);
            r = buf_str(&dev, tmp, err);
        }
        if (r == 0)
            r = put_jstring(out, (const uint8_t *)dev.p, dev.len, false, err);
        pk_buf_free(&dev);
        return r;
    }
    case PK_STORAGE:
    case PK_TENSOR:
    case PK_UNSUPPORTED:
    case _PK_TYPE_MAX:
        break;
    }
    return fmt_fail(err, WSD_EBADCKPT, "E_PKL_BAD_CALL",
                    "a %s cannot be rendered as metadata (data.pkl offset %u)",
                    type_names[n->type < _PK_TYPE_MAX ? n->type : 0], n->off);
}

int pickle_render_json(const pk_doc_t *d, uint32_t h, pk_buf_t *out, fmt_err_t *err)
{
    return render(d, h, out, 0, false, err);
}

int pickle_render_key(const pk_doc_t *d, uint32_t h, pk_buf_t *out, fmt_err_t *err)
{
    const pk_node_t *n = &d->nodes[h];
    pk_buf_t tmp = {.max = out->max};
    int r;

    if (n->type == PK_STR)
        return buf_put(out, (const char *)n->u.s, n->n, err);
    if (n->type == PK_INT || n->type == PK_BIGINT || n->type == PK_BOOL ||
        n->type == PK_NONE || n->type == PK_FLOAT)
        return render(d, h, out, 0, true, err);
    /* Other keys (tuples, bytes): their JSON text, which is what json.dumps would refuse and a
     * path still needs. */
    r = render(d, h, &tmp, 0, true, err);
    if (r == 0)
        r = buf_put(out, tmp.p ? tmp.p : "", tmp.len, err);
    pk_buf_free(&tmp);
    return r;
}
