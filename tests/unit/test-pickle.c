/*
 * test-pickle.c - the pickle VM (daemon/formats/pickle.c) on hand-written opcode streams.
 *
 * test-torch.c feeds the VM what torch.save writes; this file covers what it does not write but
 * other writers can: protocol 4/5 opcodes, the builtins of the allowlist (§3.2), malformed
 * rebuild calls and persistent ids (§3.3, §3.4), refused opcodes, UTF-8 edge cases and the hard
 * limits of pickle.h, plus the JSON renderer's floats, complex numbers and dict keys.
 *
 * Every accepted stream was disassembled with CPython 3.11's pickletools.dis and unpickled with
 * pickle.loads(..., encoding='utf-8'), as torch.load does; its JSON is what json.dumps(
 * ensure_ascii=False) gives for that value once bytes are read as latin-1 text, sets as lists and
 * complex numbers as [real, imag] (weightsd writes a lone surrogate as \uXXXX and a dtype under
 * the alias the pickle names). Each refused stream must give pickle.c's rule and name the offset
 * of the opcode that breaks it: the cases are written head, tail, where the tail starts at that
 * opcode. Where CPython would accept it (other opcodes, other arguments to an allowlisted
 * builtin, a 65-byte int), the refusal is weightsd's own rule.
 */
#include "test.h"

#include <time.h>

#include "pickle.h"

/* Byte strings stay split where an opcode or its argument begins. */
/* clang-format off */
#define P2 "\x80\x02"
#define P4 "\x80\x04"
#define P5 "\x80\x05"

/* Pieces of a torch pickle. A storage persistent id is ('storage', <class>, '0', 'cpu', 4). */
#define PID_HEAD "(X\x07\x00\x00\x00" "storage"
#define KEY0     "X\x01\x00\x00\x00" "0"
#define CPU      "X\x03\x00\x00\x00" "cpu"
#define F32      PID_HEAD "ctorch\nFloatStorage\n" KEY0 CPU "K\x04" "tQ"
#define QI8      PID_HEAD "ctorch\nQInt8Storage\n" KEY0 CPU "K\x04" "tQ"
#define UNTYPED  PID_HEAD "ctorch\nUntypedStorage\n" KEY0 CPU "K\x04" "tQ"
#define GEOM     "K\x00" "K\x04\x85" "K\x01\x85" /* offset 0, size (4,), stride (1,) */
#define OD_G     "ccollections\nOrderedDict\n"
#define OD       OD_G ")R"                       /* OrderedDict(): empty backward hooks */
#define RB       "ctorch._utils\n"
#define V1       RB "_rebuild_tensor\n"
#define V2       RB "_rebuild_tensor_v2\n"
#define V3       RB "_rebuild_tensor_v3\n"
#define PARAM    RB "_rebuild_parameter\n"
#define PARAM_ST RB "_rebuild_parameter_with_state\n"
#define FROM     "ctorch._tensor\n_rebuild_from_type_v2\n"
#define T_V2     V2 "(" F32 GEOM "\x89" OD "tR" /* a float32 tensor of 4 elements */
#define STR_A    "X\x01\x00\x00\x00" "a"
#define F_NAN    "G\x7f\xf8\x00\x00\x00\x00\x00\x00"
#define F_NINF   "G\xff\xf0\x00\x00\x00\x00\x00\x00"
/* clang-format on */

struct reject {
    const char *bytes;
    size_t len;
    size_t at;        /* offset the message must name: where the tail starts */
    const char *rule; /* prefix of err.msg */
    const char *what; /* must appear in err.msg */
};

/* clang-format off */
#define R(head, tail, rule, what) {head tail, sizeof(head tail) - 1, sizeof(head) - 1, rule, what}
#define NCASES(a)                 (sizeof(a) / sizeof((a)[0]))
/* clang-format on */

static void check_rejects(const struct reject *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        char where[64];
        int r = pickle_parse((const uint8_t *)cases[i].bytes, cases[i].len, &d, &err);

        snprintf(where, sizeof(where), "data.pkl offset %zu)", cases[i].at);
        if (r != WSD_EBADCKPT || strncmp(err.msg, cases[i].rule, strlen(cases[i].rule)) != 0 ||
            !strstr(err.msg, cases[i].what) || !strstr(err.msg, where))
            TEST_FAIL("case %zu: %d \"%s\", expected %s \"...%s...\" at offset %zu", i, r, err.msg,
                      cases[i].rule, cases[i].what, cases[i].at);
        ASSERT(d == NULL);
    }
}

/* Opcodes outside the VM's set are refused by name, so the message says what was seen. */
TEST(pickle_opcodes_named)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2, "L1L\n.", "E_PKL_OPCODE", "0x4c ('L', LONG)"),
        R(P2, "S'a'\n.", "E_PKL_OPCODE", "('S', STRING)"),
        R(P2, "T\x01\x00\x00\x00" "a.", "E_PKL_OPCODE", "('T', BINSTRING)"),
        R(P2, "Va\n.", "E_PKL_OPCODE", "('V', UNICODE)"),
        R(P2, "F1.0\n.", "E_PKL_OPCODE", "('F', FLOAT)"),
        R(P2 "N", "g0\n.", "E_PKL_OPCODE", "('g', GET)"),
        R(P2 "N", "p0\n.", "E_PKL_OPCODE", "('p', PUT)"),
        R(P2 "(", "d.", "E_PKL_OPCODE", "('d', DICT)"),
        R(P2 "(", "l.", "E_PKL_OPCODE", "('l', LIST)"),
        R(P2 "N", "2.", "E_PKL_OPCODE", "('2', DUP)"),
        R(P2 "(" OD_G, "o.", "E_PKL_OPCODE", "('o', OBJ)"),
        R(P2, "P0\n.", "E_PKL_OPCODE", "('P', PERSID)"),
        R(P2, "\x82\x01.", "E_PKL_OPCODE", "0x82 (EXT1)"),
        R(P2, "\x83\x01\x00.", "E_PKL_OPCODE", "0x83 (EXT2)"),
        R(P2, "\x84\x01\x00\x00\x00.", "E_PKL_OPCODE", "0x84 (EXT4)"),
        R(P4 "cbuiltins\nset\n)}", "\x92.", "E_PKL_OPCODE", "0x92 (NEWOBJ_EX)"),
        R(P5, "\x97.", "E_PKL_OPCODE", "0x97 (NEXT_BUFFER)"),
        R(P5 "N", "\x98.", "E_PKL_OPCODE", "0x98 (READONLY_BUFFER)"),
        R(P2, "z.", "E_PKL_OPCODE", "0x7a ('z', unknown)"),
        R(P2, "\xff.", "E_PKL_OPCODE", "0xff (unknown)"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* An argument cut off by the end of the buffer names the opcode it belongs to. */
TEST(pickle_truncated_inside_opcode)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R("", "\x80", "E_PKL_TRUNCATED", "inside opcode 0x80"),
        R(P4, "\x95\x01\x00", "E_PKL_TRUNCATED", "inside opcode 0x95"),
        R(P2, "K", "E_PKL_TRUNCATED", "inside opcode 0x4b (needs 1 more bytes, 0 left)"),
        R(P2, "M\x01", "E_PKL_TRUNCATED", "inside opcode 0x4d (needs 2 more bytes, 1 left)"),
        R(P2, "J\x01\x00\x00", "E_PKL_TRUNCATED", "inside opcode 0x4a"),
        R(P2, "G\x3f\xf0", "E_PKL_TRUNCATED", "inside opcode 0x47"),
        R(P2, "\x8a", "E_PKL_TRUNCATED", "inside opcode 0x8a"),
        R(P2, "X\x01\x00", "E_PKL_TRUNCATED", "inside opcode 0x58"),
        R(P4, "\x8d\x01\x00\x00\x00", "E_PKL_TRUNCATED", "inside opcode 0x8d"),
        R(P2, "B\x05\x00\x00\x00" "ab", "E_PKL_TRUNCATED", "string of 5 bytes"),
        R(P4, "\x8e\x09\x00\x00\x00\x00\x00\x00\x00" "abc", "E_PKL_TRUNCATED",
          "string of 9 bytes"),
        R(P2 "N", "q", "E_PKL_TRUNCATED", "inside opcode 0x71"),
        R(P2 "N", "r\x00\x00", "E_PKL_TRUNCATED", "inside opcode 0x72"),
        R(P2, "h", "E_PKL_TRUNCATED", "inside opcode 0x68"),
        R(P2, "j\x00", "E_PKL_TRUNCATED", "inside opcode 0x6a"),
        R(P2, "ctorch", "E_PKL_TRUNCATED", "GLOBAL name line runs past the end"),
        R(P2, "ctorch\nSize", "E_PKL_TRUNCATED", "GLOBAL name line runs past the end"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* Mark fences and underflow, as CPython's Pdata checks them. */
TEST(pickle_stack_rules)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2, "\x85.", "E_PKL_STACK", "TUPLEn needs 1 value on the stack, 0 there"),
        R(P2 "N(N", "\x86.", "E_PKL_STACK", "TUPLEn needs 2 values on the stack, 1 there"),
        R(P2 "N", "t.", "E_PKL_STACK", "TUPLE without a MARK"),
        R(P2 "N", "\x91.", "E_PKL_STACK", "FROZENSET without a MARK"),
        R(P4 "\x8f", "\x90.", "E_PKL_STACK", "ADDITEMS without a MARK"),
        R(P2 "(N", "e.", "E_PKL_STACK", "APPENDS has no container below its MARK"),
        /* The list is there, but behind an outer MARK's fence. */
        R(P2 "]((N", "e.", "E_PKL_STACK", "APPENDS has no container below its MARK"),
        R(P2 "(K\x01K\x02", "u.", "E_PKL_STACK", "SETITEMS has no container below its MARK"),
        R(P4 "(K\x01", "\x90.", "E_PKL_STACK", "ADDITEMS has no container below its MARK"),
        R(P2, "q\x00.", "E_PKL_STACK", "memo put needs 1 value"),
        R(P2 "N(", "q\x00.", "E_PKL_STACK", "memo put needs 1 value"),
        R(P2 "N", "R.", "E_PKL_STACK", "REDUCE needs 2 values"),
        R(P2 "}", "b.", "E_PKL_STACK", "BUILD needs 2 values"),
        R(P2 ")", "\x81.", "E_PKL_STACK", "NEWOBJ needs 2 values"),
        R(P4 "\x8c\x01" "a", "\x93.", "E_PKL_STACK", "STACK_GLOBAL needs 2 values"),
        R(P2, "1.", "E_PKL_STACK", "POP_MARK without a MARK"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* Container opcodes on the wrong target, and what NEWOBJ, BUILD and STACK_GLOBAL refuse. */
TEST(pickle_container_rules)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P4 "](K\x01", "\x90.", "E_PKL_BAD_CALL", "ADDITEMS on a list"),
        R(P2 "}(K\x01", "e.", "E_PKL_BAD_CALL", "APPENDS on a dict"),
        R(P2 "}K\x01", "a.", "E_PKL_BAD_CALL", "APPEND on a dict"),
        R(P2 "}(]K\x01", "u.", "E_PKL_BAD_CALL", "a list cannot be a dict key"),
        R(P2 "}K\x01", "b.", "E_PKL_BAD_CALL", "BUILD state is a int, not a dict"),
        R(P2 "}}K\x01\x86", "b.", "E_PKL_BAD_CALL", "BUILD state is a tuple, not a dict"),
        R(P2 "}N}N\x87", "b.", "E_PKL_BAD_CALL", "BUILD state is a tuple, not a dict"),
        /* CPython: BUILD on a plain dict fails (no __dict__) unless the state sets nothing;
         * a slot state must be a dict, None is refused. */
        R(P2 "}}", "b.", "E_PKL_BAD_CALL", "BUILD sets attributes on a plain dict"),
        R(P2 "}}}\x86", "b.", "E_PKL_BAD_CALL", "BUILD sets attributes on a plain dict"),
        R(P2 "}N}" STR_A "K\x01s\x86", "b.", "E_PKL_BAD_CALL", "on a plain dict"),
        R(P2 OD_G ")R}N\x86", "b.", "E_PKL_BAD_CALL", "(dict or None, dict) pair"),
        /* Unhashable set items and keys, as CPython refuses them (TypeError). */
        R(P4 "\x8f(]", "\x90.", "E_PKL_BAD_CALL", "a list cannot be a set item"),
        R(P4 "(}", "\x91.", "E_PKL_BAD_CALL", "a dict cannot be a set item"),
        R(P2 "c__builtin__\nset\n]]a\x85", "R.", "E_PKL_BAD_CALL", "a list cannot be a set item"),
        R(P2 "}(]\x85N", "u.", "E_PKL_BAD_CALL",
          "a tuple holding an unhashable value cannot be a dict key"),
        R(P2 "}(K\x01]\x86\x85N", "u.", "E_PKL_BAD_CALL", "holding an unhashable value"),
        R(P2 "N)", "\x81.", "E_PKL_BAD_CALL", "NEWOBJ of a None with tuple arguments"),
        R(P2 "c__builtin__\nset\nN", "\x81.", "E_PKL_BAD_CALL",
          "NEWOBJ of a global with None arguments"),
        R(P2 "c__builtin__\ncomplex\n)", "\x81.", "E_PKL_BAD_CALL",
          "NEWOBJ of __builtin__.complex: weightsd builds no objects"),
        R(P2 "ctorch\nFloatStorage\n)", "\x81.", "E_PKL_BAD_CALL",
          "NEWOBJ of torch.FloatStorage: weightsd builds no objects"),
        R(P4 "K\x01\x8c\x01" "a", "\x93.", "E_PKL_BAD_CALL", "STACK_GLOBAL of a int and a str"),
        /* A refused global about to be instantiated is a pickled object, whatever the memo
         * opcode in between. */
        R(P2, "c__main__\nNet\nr\x00\x00\x00\x00)\x81.", "E_PKL_GLOBAL",
          "'__main__.Net': this file holds a pickled module or object"),
        R(P4 "\x8c\x08__main__\x94\x8c\x03Net\x94", "\x93\x94)\x81.", "E_PKL_GLOBAL",
          "'__main__.Net': this file holds a pickled module or object"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* Allowlisted builtins called with arguments their fixed rule does not cover. */
TEST(pickle_builtins_refused)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2 OD_G "}}\x86", "R.", "E_PKL_BAD_CALL",
          "collections.OrderedDict called with unsupported arguments"),
        R(P2 OD_G "N\x85", "R.", "E_PKL_BAD_CALL",
          "collections.OrderedDict called with unsupported arguments"),
        R(P2 OD_G "]K\x01" "a\x85", "R.", "E_PKL_BAD_CALL",
          "collections.OrderedDict: item 0 is not a (key, value) pair"),
        R(P2 OD_G "]K\x01K\x02K\x03\x87" "a\x85", "R.", "E_PKL_BAD_CALL",
          "collections.OrderedDict: item 0 is not a (key, value) pair"),
        R(P2 OD_G "]]K\x01\x86" "a\x85", "R.", "E_PKL_BAD_CALL", "a list cannot be a dict key"),
        R(P2 "c__builtin__\nbytes\nK\x01\x85", "R.", "E_PKL_BAD_CALL",
          "__builtin__.bytes called with unsupported arguments"),
        R(P2 "c__builtin__\nset\nK\x01\x85", "R.", "E_PKL_BAD_CALL",
          "__builtin__.set called with unsupported arguments"),
        R(P2 "cbuiltins\ncomplex\nK\x01" STR_A "\x86", "R.", "E_PKL_BAD_CALL",
          "builtins.complex expects (real, imag) numbers"),
        R(P2 "c_codecs\nencode\n" STR_A "\x85", "R.", "E_PKL_BAD_CALL",
          "_codecs.encode expects (text, encoding)"),
        R(P2 "c_codecs\nencode\n" STR_A "X\x04\x00\x00\x00utf8\x86", "R.", "E_PKL_BAD_CALL",
          "_codecs.encode: encoding 'utf8' is not latin1"),
        /* U+0100 has no latin-1 byte; CPython raises UnicodeEncodeError. */
        R(P2 "c_codecs\nencode\nX\x02\x00\x00\x00\xc4\x80X\x06\x00\x00\x00latin1\x86", "R.",
          "E_PKL_BAD_CALL", "_codecs.encode: text does not fit latin-1"),
        R(P2 "ctorch.serialization\n_get_layout\nK\x01\x85", "R.", "E_PKL_BAD_CALL",
          "torch.serialization._get_layout expects one string"),
        R(P2 "ctorch\nSize\nN\x85", "R.", "E_PKL_BAD_CALL", "torch.Size expects one tuple"),
        R(P2 "ctorch\nSize\n" STR_A "\x85\x85", "R.", "E_PKL_BAD_CALL",
          "torch.Size: item 0 is not an int"),
        R(P2 "ctorch\ndevice\nK\x01\x85", "R.", "E_PKL_BAD_CALL",
          "torch.device expects (type[, index])"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* The torch._utils rebuild helpers of §3.4 with the wrong arity or argument types. */
TEST(pickle_rebuild_refused)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2 V1 "(" F32 GEOM "\x89t", "R.", "E_PKL_BAD_CALL",
          "torch._utils._rebuild_tensor called with 5 arguments (expects 4)"),
        R(P2 V2 "(" F32 GEOM "\x89t", "R.", "E_PKL_BAD_CALL",
          "torch._utils._rebuild_tensor_v2 called with 5 arguments (expects 6 or one more)"),
        R(P2 V2 "(N" GEOM "\x89" OD "t", "R.", "E_PKL_BAD_CALL",
          "_rebuild_tensor_v2: first argument is a None, not a storage"),
        R(P2 V2 "(" F32 "N" "K\x04\x85" "K\x01\x85" "\x89" OD "t", "R.", "E_PKL_BAD_CALL",
          "tensor storage_offset is a None, not an int"),
        R(P2 V2 "(" F32 "K\x00" "K\x04" "K\x01\x85" "\x89" OD "t", "R.", "E_PKL_BAD_CALL",
          "tensor size is a int, not a tuple"),
        R(P2 V2 "(" F32 "K\x00" STR_A "\x85" "K\x01\x85" "\x89" OD "t", "R.", "E_PKL_BAD_CALL",
          "tensor size[0] is a str, not an int"),
        R(P2 V3 "(" F32 GEOM "\x89" OD "ctorch\nper_tensor_affine\nt", "R.", "E_PKL_BAD_CALL",
          "_rebuild_tensor_v3: dtype argument is a global, not a torch dtype"),
        R(P2 V3 "(" F32 GEOM "\x89" OD "Nt", "R.", "E_PKL_BAD_CALL",
          "_rebuild_tensor_v3: dtype argument is a None, not a torch dtype"),
        /* float4_e2m1fn_x2 packs two values a byte: only a dense row-major tensor converts. */
        R(P2 V3 "(" UNTYPED "K\x00" "K\x04\x85" "K\x02\x85" "\x89" OD
                "ctorch\nfloat4_e2m1fn_x2\nt",
          "R.", "E_TENSOR_GEOMETRY", "float4_e2m1fn_x2 tensor must be dense"),
        R(P2 V3 "(" UNTYPED "K\x00" "\x8a\x08\x01\x00\x00\x00\x00\x00\x00\x40\x85" "K\x01\x85"
                "\x89" OD "ctorch\nfloat4_e2m1fn_x2\nt",
          "R.", "E_TENSOR_OVERFLOW", "float4 tensor dimensions overflow"),
        R(P2 PARAM "(" T_V2 "\x89t", "R.", "E_PKL_BAD_CALL",
          "torch._utils._rebuild_parameter called with 2 arguments (expects 3)"),
        R(P2 PARAM_ST "(" T_V2 "\x89" OD "t", "R.", "E_PKL_BAD_CALL",
          "_rebuild_parameter_with_state called with 3 arguments (expects 4)"),
        R(P2 PARAM "(N\x89" OD "t", "R.", "E_PKL_BAD_CALL",
          "torch._utils._rebuild_parameter: data is a None, not a tensor"),
        R(P2 FROM "(NNt", "R.", "E_PKL_BAD_CALL",
          "torch._tensor._rebuild_from_type_v2 called with 2 arguments (expects 4)"),
        R(P2 FROM "(NNNNt", "R.", "E_PKL_BAD_CALL",
          "_rebuild_from_type_v2: expects (rebuild function, type, args, state)"),
        R(P2 FROM "(ctorch\nSize\nctorch\nTensor\n)}t", "R.", "E_PKL_BAD_CALL",
          "_rebuild_from_type_v2: function torch.Size does not build a tensor"),
        /* One level of indirection only: _rebuild_from_type_v2 cannot wrap itself. */
        R(P2 FROM "(" FROM "ctorch\nTensor\n(" FROM "ctorch\nTensor\n)}t}t", "R.",
          "E_PKL_BAD_CALL", "function torch._tensor._rebuild_from_type_v2 does not build a tensor"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* Persistent ids that are not ('storage', <storage class>, key, 'location', numel). */
TEST(pickle_persid_refused)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2 PID_HEAD "N" KEY0 CPU "K\x04t", "Q.", "E_PKL_PERSID",
          "persistent id type is a None, not a storage class"),
        R(P2 PID_HEAD "ctorch\nfloat32\n" KEY0 CPU "K\x04t", "Q.", "E_PKL_PERSID",
          "persistent id type is a global, not a storage class"),
        R(P2 PID_HEAD "ctorch\nFloatStorage\n" KEY0 "N" "K\x04t", "Q.", "E_PKL_PERSID",
          "storage location is a None, not a string"),
        R(P2 PID_HEAD "ctorch\nFloatStorage\n" KEY0 CPU "J\xff\xff\xff\xff" "t", "Q.",
          "E_STORAGE_SIZE", "storage '0' has a negative element count"),
        R(P2 PID_HEAD "ctorch\nFloatStorage\n" KEY0 CPU
                      "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01" "t",
          "Q.", "E_STORAGE_SIZE", "storage '0' has an enormous element count"),
        R(P2 PID_HEAD "ctorch\nFloatStorage\n" KEY0 CPU "G\x40\x10\x00\x00\x00\x00\x00\x00" "t",
          "Q.", "E_PKL_PERSID", "storage element count is a float, not an int"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

/* Text opcodes take UTF-8 as CPython's surrogatepass decoder does: these it refuses too. */
TEST(pickle_utf8_refused)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2, "X\x02\x00\x00\x00\xc0\xaf.", "E_PKL_UTF8", "not valid UTF-8"), /* overlong */
        R(P2, "X\x03\x00\x00\x00\xe0\x80\xaf.", "E_PKL_UTF8", "not valid UTF-8"),
        R(P2, "X\x04\x00\x00\x00\xf0\x82\x82\xac.", "E_PKL_UTF8", "not valid UTF-8"),
        R(P2, "X\x04\x00\x00\x00\xf4\x90\x80\x80.", "E_PKL_UTF8", "not valid UTF-8"), /* >10FFFF */
        R(P2, "X\x04\x00\x00\x00\xf5\x80\x80\x80.", "E_PKL_UTF8", "not valid UTF-8"),
        R(P2, "X\x01\x00\x00\x00\x80.", "E_PKL_UTF8", "not valid UTF-8"), /* lone continuation */
        R(P2, "X\x02\x00\x00\x00\xe2\x82.", "E_PKL_UTF8", "not valid UTF-8"), /* cut short */
        R(P2, "X\x03\x00\x00\x00\xe2\x28\xa1.", "E_PKL_UTF8", "not valid UTF-8"),
        R(P2, "X\x04\x00\x00\x00\xf0\x9f\x98\x28.", "E_PKL_UTF8", "not valid UTF-8"),
        R(P2, "\x8c\x02\xc3\x28.", "E_PKL_UTF8", "not valid UTF-8"),
        R(P2, "U\x01\xff.", "E_PKL_UTF8", "not valid UTF-8"),
        /* A py2 str is decoded strictly: no encoded surrogates (BINUNICODE allows them). */
        R(P2, "U\x03\xed\xa0\x80.", "E_PKL_UTF8", "Python 2 str"),
        R(P4, "\x8d\x01\x00\x00\x00\x00\x00\x00\x00\xfe.", "E_PKL_UTF8", "not valid UTF-8"),
    };
    /* clang-format on */

    check_rejects(cases, NCASES(cases));
}

#define A16 "AAAAAAAAAAAAAAAA"

/* CPython reads a LONG1 of any length; weightsd stops at PK_BIGINT_MAX bytes. */
TEST(pickle_bigint_cap)
{
    /* clang-format off */
    static const struct reject cases[] = {
        R(P2, "\x8a\x41" A16 A16 A16 A16 "A.", "E_PKL_LIMIT", "integer of 65 bytes (at most 64)"),
        R(P2, "\x8b\x41\x00\x00\x00" A16 A16 A16 A16 "A.", "E_PKL_LIMIT",
          "integer of 65 bytes (at most 64)"),
    };
    /* clang-format on */
    /* clang-format off */
    static const char ok[] = P2 "\x8a\x40" A16 A16 A16 A16 ".";
    /* clang-format on */
    fmt_err_t err = {0};
    pk_doc_t *d = NULL;

    check_rejects(cases, NCASES(cases));
    /* Exactly PK_BIGINT_MAX bytes still parse. */
    ASSERT_EQ(pickle_parse((const uint8_t *)ok, sizeof(ok) - 1, &d, &err), 0);
    ASSERT_EQ(d->nodes[d->root].type, PK_BIGINT);
    ASSERT_EQ(d->nodes[d->root].n, PK_BIGINT_MAX);
    pickle_free(d);
}

/* A string or bytes value of PK_STR_MAX bytes is taken, one more is E_PKL_LIMIT. */
TEST(pickle_string_cap)
{
    size_t len = 2 + 9 + (size_t)PK_STR_MAX + 1 + 1;
    uint8_t *buf = malloc(len);
    char want[64];

    ASSERT(buf != NULL);
    for (int extra = 0; extra <= 1; extra++) {
        uint64_t n = (uint64_t)PK_STR_MAX + (uint64_t)extra;
        size_t total = 2 + 9 + (size_t)n + 1;
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        int r;

        memcpy(buf, P4 "\x8e", 3);
        for (int i = 0; i < 8; i++)
            buf[3 + i] = (uint8_t)(n >> (8 * i));
        memset(buf + 11, 'x', (size_t)n);
        buf[total - 1] = '.';
        r = pickle_parse(buf, total, &d, &err);
        if (extra) {
            ASSERT_EQ(r, WSD_EBADCKPT);
            ASSERT_STR_CONTAINS(err.msg, "E_PKL_LIMIT");
            snprintf(want, sizeof(want), "string of %u bytes (at most %u)", PK_STR_MAX + 1,
                     PK_STR_MAX);
            ASSERT_STR_CONTAINS(err.msg, want);
            ASSERT_STR_CONTAINS(err.msg, "data.pkl offset 2)");
            ASSERT(d == NULL);
        } else {
            ASSERT_EQ(r, 0);
            ASSERT_EQ(d->nodes[d->root].type, PK_BYTES);
            ASSERT_UINT_EQ(d->nodes[d->root].n, PK_STR_MAX);
            ASSERT(d->nodes[d->root].u.s == buf + 11); /* borrowed, not copied */
            pickle_free(d);
        }
    }
    free(buf);
}

/* PK_STACK_MAX values fit on the stack; the next push fails whichever opcode makes it. */
TEST(pickle_stack_cap)
{
    static const struct {
        const char *tail;
        size_t len;
    } tails[] = {
#define T(s) {s, sizeof(s) - 1}
        T("N"),
        T("K\x01"),
        T("X\x00\x00\x00\x00"),
        T("\x8a\x01\x01"),
        T("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01"),
        T("ctorch\nfloat32\n"),
        T(")"),
#undef T
    };
    size_t fill = PK_STACK_MAX, cap = 2 + 1 + fill + 64;
    uint8_t *buf = malloc(cap);
    fmt_err_t err = {0};
    pk_doc_t *d = NULL;
    char where[64], want[64];

    ASSERT(buf != NULL);
    /* "(" N * PK_STACK_MAX "t." is accepted: a MARK takes no stack slot. */
    memcpy(buf, P2 "(", 3);
    memset(buf + 3, 'N', fill);
    memcpy(buf + 3 + fill, "t.", 2);
    ASSERT_EQ(pickle_parse(buf, 3 + fill + 2, &d, &err), 0);
    ASSERT_EQ(d->nodes[d->root].type, PK_TUPLE);
    ASSERT_UINT_EQ(d->nodes[d->root].n, PK_STACK_MAX);
    pickle_free(d);

    snprintf(where, sizeof(where), "data.pkl offset %zu)", 2 + fill);
    snprintf(want, sizeof(want), "more than %u values on the stack", PK_STACK_MAX);
    for (size_t i = 0; i < NCASES(tails); i++) {
        size_t len = 2 + fill + tails[i].len + 1;

        memcpy(buf, P2, 2);
        memset(buf + 2, 'N', fill);
        memcpy(buf + 2 + fill, tails[i].tail, tails[i].len);
        buf[len - 1] = '.';
        memset(&err, 0, sizeof(err));
        d = NULL;
        if (pickle_parse(buf, len, &d, &err) != WSD_EBADCKPT ||
            strncmp(err.msg, "E_PKL_LIMIT", 11) != 0 || !strstr(err.msg, want) ||
            !strstr(err.msg, where))
            TEST_FAIL("tail %zu: \"%s\"", i, err.msg);
        ASSERT(d == NULL);
    }
    free(buf);
}

struct value {
    const char *bytes;
    size_t len;
    const char *json;
};

/* clang-format off */
#define V(s, j) {s, sizeof(s) - 1, j}
/* clang-format on */

static void check_values(const struct value *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        pk_buf_t b = {0};
        int r = pickle_parse((const uint8_t *)cases[i].bytes, cases[i].len, &d, &err);

        if (r != 0)
            TEST_FAIL("case %zu: %s", i, err.msg);
        ASSERT_EQ(pickle_render_json(d, d->root, &b, &err), 0);
        if (strcmp(b.p, cases[i].json) != 0)
            TEST_FAIL("case %zu: %s, expected %s", i, b.p, cases[i].json);
        pk_buf_free(&b);
        pickle_free(d);
    }
}

/* The opcodes of protocols 4 and 5 and the allowlisted builtins, with the values they build. */
TEST(pickle_values_builtins)
{
    /* clang-format off */
    static const struct value cases[] = {
        V(P4 "\x8d\x02\x00\x00\x00\x00\x00\x00\x00" "hi.", "\"hi\""),
        V(P2 "U\x02" "hi.", "\"hi\""),
        V(P2 "U\x02\xc3\xa9.", "\"\xc3\xa9\""),
        V(P2 "B\x03\x00\x00\x00\x01\"\\.", "\"\\u0001\\\"\\\\\""),
        V(P4 "\x8e\x01\x00\x00\x00\x00\x00\x00\x00" "z.", "\"z\""),
        V(P5 "\x96\x01\x00\x00\x00\x00\x00\x00\x00" "z.", "\"z\""),
        /* Protocol 2 bytes: the latin-1 encoding of a str; it renders as that str. */
        V(P2 "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xbfX\x07\x00\x00\x00latin-1\x86R.",
          "\"\xc3\xbf\""),
        /* pickle.dumps(bytearray(b'ab'), 2) */
        V(P2 "c__builtin__\nbytearray\nq\x00" "c_codecs\nencode\nq\x01X\x02\x00\x00\x00" "abq\x02"
             "X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.",
          "\"ab\""),
        V(P2 "cbuiltins\nbytes\nC\x02" "ab\x85R.", "\"ab\""),
        /* pickle.dumps({1}, 4) and pickle.dumps(frozenset([1, 2]), 4), framed */
        V(P4 "\x95\x07\x00\x00\x00\x00\x00\x00\x00\x8f\x94(K\x01\x90.", "[1]"),
        V(P4 "\x95\x08\x00\x00\x00\x00\x00\x00\x00(K\x01K\x02\x91\x94.", "[1,2]"),
        V(P2 "c__builtin__\nset\n)R.", "[]"),
        V(P2 "c__builtin__\nfrozenset\n(K\x01K\x02t\x85R.", "[1,2]"),
        V(P4 "cbuiltins\nset\n\x8f(K\x03\x90\x85R.", "[3]"),
        /* NEWOBJ: cls.__new__(cls, *args) builds an empty container; __new__ ignores args. */
        V(P2 OD_G ")\x81.", "{}"),
        V(P2 "ccollections\nCounter\n}K\x01K\x02s\x85\x81.", "{}"),
        V(P2 "c__builtin__\nset\n)\x81.", "[]"),
        V(P2 "c__builtin__\nset\n]K\x01" "a\x85\x81.", "[]"),
        /* ... except frozenset.__new__, which takes the items. */
        V(P2 "c__builtin__\nfrozenset\n]K\x01" "a\x85\x81.", "[1]"),
        V(P2 "cbuiltins\nfrozenset\n)\x81.", "[]"),
        /* pickle.dumps(collections.Counter(a=1), 2) */
        V(P2 "ccollections\nCounter\nq\x00}q\x01X\x01\x00\x00\x00" "aq\x02K\x01s\x85q\x03Rq\x04.",
          "{\"a\":1}"),
        V(P2 OD_G "](" STR_A "K\x01\x86X\x01\x00\x00\x00" "bK\x02\x86" "e\x85R.",
          "{\"a\":1,\"b\":2}"),
        V(P2 OD_G "K\x01K\x02\x86\x85\x85R.", "{\"1\":2}"),
        /* BUILD: the attributes of a dict subclass are dropped, the items stay. */
        V(P2 OD_G ")R" STR_A "K\x01s}X\x01\x00\x00\x00" "bK\x02sb.", "{\"a\":1}"),
        V(P2 OD_G ")RN}\x86" "b.", "{}"),
        V(P2 OD_G ")R}}\x86" "b.", "{}"),
        /* POP with a MARK on top pops the MARK, as CPython does. */
        V(P2 "N(0.", "null"),
        V(P2 "ctorch\nSize\n)R.", "[]"),
        V(P2 "ctorch\ndevice\nX\x04\x00\x00\x00" "cudaN\x86R.", "\"cuda\""),
        V(P2 "ctorch\nper_channel_affine\n.", "\"torch.per_channel_affine\""),
        V(P4 "\x8c\x05torch\x8c\x04half\x93.", "\"torch.half\""),
    };
    /* clang-format on */

    check_values(cases, NCASES(cases));
}

/* bytes() and bytearray() with no argument: an empty value (no buffer behind it at all). */
TEST(pickle_empty_bytes)
{
    /* clang-format off */
    static const struct value cases[] = {
        V(P2 "c__builtin__\nbytes\n)R.", "\"\""),
        V(P2 "cbuiltins\nbytearray\n)R.", "\"\""),
        V(P2 "](cbuiltins\nbytes\n)RK\x01" "e.", "[\"\",1]"),
    };
    /* clang-format on */

    check_values(cases, NCASES(cases));
}

/* Numbers and text at the edges of the renderer's rules. */
TEST(pickle_values_numbers_text)
{
    /* clang-format off */
    static const struct value cases[] = {
        V(P2 "\x8b\x02\x00\x00\x00\xff\x7f.", "32767"),
        V(P2 "\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80.", "-9223372036854775808"),
        V(P2 "\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff.", "-1"),
        V(P2 "\x8a\x09\xff\xff\xff\xff\xff\xff\xff\x7f\x00.", "9223372036854775807"),
        V(P2 "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.", "9223372036854775808"),
        /* Integral floats keep a ".0", as repr() prints them. */
        V(P2 "G\x3f\xf0\x00\x00\x00\x00\x00\x00.", "1.0"),
        V(P2 "G\xc0\x00\x00\x00\x00\x00\x00\x00.", "-2.0"),
        V(P2 "G\x80\x00\x00\x00\x00\x00\x00\x00.", "-0.0"),
        V(P2 "G\x41\x9d\x6f\x34\x54\x00\x00\x00.", "123456789.0"),
        V(P2 "G\x44\xb5\x2d\x02\xc7\xe1\x4a\xf6.", "1e+23"),
        /* repr()'s layout: positional for exponents -4..15, scientific beyond. */
        V(P2 "G\x40\xf8\x6a\x00\x00\x00\x00\x00.", "100000.0"),
        V(P2 "G\x43\x0c\x6b\xf5\x26\x34\x00\x00.", "1000000000000000.0"),
        V(P2 "G\x43\x41\xc3\x79\x37\xe0\x80\x00.", "1e+16"),
        V(P2 "G\x3f\x1a\x36\xe2\xeb\x1c\x43\x2d.", "0.0001"),
        V(P2 "G\x3e\xe4\xf8\xb5\x88\xe3\x68\xf1.", "1e-05"),
        V(P2 "G\xc1\x5d\x6f\x34\x40\x00\x00\x00.", "-7716049.0"),
        V(P2 "G\x7f\xef\xff\xff\xff\xff\xff\xff.", "1.7976931348623157e+308"),
        V(P2 "G\x3f\xd3\x33\x33\x33\x33\x33\x34.", "0.30000000000000004"),
        V(P2 "G\x00\x00\x00\x00\x00\x00\x00\x01.", "5e-324"),
        V(P2 F_NAN ".", "\"NaN\""),
        V(P2 F_NINF ".", "\"-Infinity\""),
        /* pickle.dumps(complex(1, 2), 2) */
        V(P2 "c__builtin__\ncomplex\nq\x00G\x3f\xf0\x00\x00\x00\x00\x00\x00"
             "G\x40\x00\x00\x00\x00\x00\x00\x00\x86q\x01Rq\x02.",
          "[1.0,2.0]"),
        V(P2 "cbuiltins\ncomplex\n" F_NAN F_NINF "\x86R.", "[\"NaN\",\"-Infinity\"]"),
        /* complex(1, True) is (1+1j). */
        V(P2 "c__builtin__\ncomplex\nK\x01\x88\x86R.", "[1.0,1.0]"),
        /* A tuple of hashables is a key; a plain dict BUILT with (None, {}) is left alone. */
        V(P2 "}(K\x01K\x02\x86Nu.", "{\"[1,2]\":null}"),
        V(P2 "}N}\x86" "b.", "{}"),
        V(P2 "U\x03\xed\x9f\xbf.", "\"\xed\x9f\xbf\""),
        /* Non-string keys become strings as json.dumps makes them. */
        V(P2 "}(" F_NAN "K\x01" F_NINF "K\x02NK\x03G\x3f\xf8\x00\x00\x00\x00\x00\x00K\x04\x88K\x05u.",
          "{\"NaN\":1,\"-Infinity\":2,\"null\":3,\"1.5\":4,\"true\":5}"),
        /* UTF-8 passes through; only encoded surrogates (ED A0..BF xx) are escaped. */
        V(P2 "X\x04\x00\x00\x00\xf0\x9f\x98\x80.", "\"\xf0\x9f\x98\x80\""),
        V(P2 "X\x04\x00\x00\x00\xf4\x8f\xbf\xbf.", "\"\xf4\x8f\xbf\xbf\""),
        V(P2 "X\x03\x00\x00\x00\xe0\xa0\x80.", "\"\xe0\xa0\x80\""),
        V(P2 "X\x03\x00\x00\x00\xed\x9f\xbf.", "\"\xed\x9f\xbf\""),
        V(P2 "X\x03\x00\x00\x00\xed\xbf\xbf.", "\"\\udfff\""),
        V(P2 "X\x02\x00\x00\x00\x1f\x7f.", "\"\\u001f\x7f\""),
    };
    /* clang-format on */

    check_values(cases, NCASES(cases));
}

/* pickle_render_key: the path component a dict key gives (str verbatim, others as JSON). */
TEST(pickle_render_keys)
{
    /* clang-format off */
    static const char bytes[] =
        P2 "}(" STR_A "N" "K\x07N" "\x88N" "NN" "G\x3f\xf8\x00\x00\x00\x00\x00\x00N" F_NAN "N"
           "K\x01K\x02\x86N" "C\x02" "abN" "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01N" "u.";
    static const char *const want[] = {
        "a", "7", "true", "null", "1.5", "NaN", "[1,2]", "\"ab\"", "18446744073709551616",
    };
    /* clang-format on */
    fmt_err_t err = {0};
    pk_doc_t *d = NULL;
    const pk_node_t *root;

    ASSERT_EQ(pickle_parse((const uint8_t *)bytes, sizeof(bytes) - 1, &d, &err), 0);
    root = &d->nodes[d->root];
    ASSERT_EQ(root->type, PK_DICT);
    ASSERT_EQ(root->n, NCASES(want));
    for (uint32_t i = 0; i < root->n; i++) {
        pk_buf_t b = {0};

        ASSERT_EQ(pickle_render_key(d, root->u.items[2 * i], &b, &err), 0);
        if (strcmp(b.p, want[i]) != 0)
            TEST_FAIL("key %u: %s, expected %s", i, b.p, want[i]);
        pk_buf_free(&b);
    }
    pickle_free(d);
}

/*
 * Equal members, by Python's ==: a dict with two equal keys or a set with two equal items is
 * refused when the stream has run (E_PKL_DUP_KEY names the container's offset): Python keeps
 * one of them, weightsd would keep both. Keys that only render alike (1 and "1": json.dumps
 * repeats the name) are refused when rendered. NaN equals only itself; distinct keys that sort
 * close together pass.
 */
TEST(pickle_equal_members)
{
    /* clang-format off */
    static const struct {
        const char *bytes;
        size_t len;
        bool at_render;
        const char *what;
    } refused[] = {
#define D(s, r, w) {s, sizeof(s) - 1, r, w}
        D(P2 "}(" STR_A "K\x01" STR_A "K\x02u.", false, "dict built at data.pkl offset 2 has two equal keys"),
        D(P2 "}(K\x07NK\x01NK\x07Nu.", false, "two equal keys"),
        /* 1 == True == 1.0 == complex(1, 0); (1,) == (True,) */
        D(P2 "}(K\x01N\x88Nu.", false, "two equal keys"),
        D(P2 "}(G\x3f\xf0\x00\x00\x00\x00\x00\x00NK\x01Nu.", false, "two equal keys"),
        D(P2 "}(K\x01N" "c__builtin__\ncomplex\nK\x01K\x00\x86RNu.", false, "two equal keys"),
        D(P2 "}(K\x01\x85N\x88\x85Nu.", false, "two equal keys"),
        D(P2 "}(" "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01N"
             "G\x43\xf0\x00\x00\x00\x00\x00\x00Nu.", false, "two equal keys"), /* 2**64 == 2.0**64 */
        D(P2 "}(G\x00\x00\x00\x00\x00\x00\x00\x00NG\x80\x00\x00\x00\x00\x00\x00\x00Nu.", false,
          "two equal keys"),                                                   /* 0.0 == -0.0 */
        /* bytes(b'\xff') == _codecs.encode('\xff', 'latin1') */
        D(P2 "}(C\x01\xffN" "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xbfX\x06\x00\x00\x00latin1\x86RNu.",
          false, "two equal keys"),
        D(P2 "}(ctorch\nfloat\nNctorch\nfloat32\nNu.", false, "two equal keys"),
        D(P4 "\x8f(K\x01\x88\x90.", false, "set built at data.pkl offset 2 has two equal items"),
        D(P4 "(NN\x91.", false, "two equal items"),
        D(P2 "](}(" STR_A "N" STR_A "Nue.", false, "dict built at data.pkl offset 4"),
        /* json.dumps({1: 0, '1': 0}) repeats "1": refused when rendered. */
        D(P2 "}(K\x01NX\x01\x00\x00\x00" "1Nu.", true, "two keys that render as \"1\""),
#undef D
    };
    static const struct value ok[] = {
        V(P2 "}(" STR_A "K\x01X\x02\x00\x00\x00" "aaK\x02X\x01\x00\x00\x00" "bK\x03u.",
          "{\"a\":1,\"aa\":2,\"b\":3}"),
        V(P2 "}" STR_A "}(" STR_A "Nus.", "{\"a\":{\"a\":null}}"),
        /* "1" and b"1" differ; 1 and 1.5; (1, 2) and (12,); two NaNs are two objects. */
        V(P4 "\x8f(X\x01\x00\x00\x00" "1C\x01" "1K\x01G\x3f\xf8\x00\x00\x00\x00\x00\x00"
             "K\x01K\x02\x86K\x0c\x85\x90.", "[\"1\",\"1\",1,1.5,[1,2],[12]]"),
        V(P4 "\x8f(G\x7f\xf8\x00\x00\x00\x00\x00\x00G\x7f\xf8\x00\x00\x00\x00\x00\x00\x90.",
          "[\"NaN\",\"NaN\"]"),
    };
    /* clang-format on */

    for (size_t i = 0; i < NCASES(refused); i++) {
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        pk_buf_t b = {0};
        int r = pickle_parse((const uint8_t *)refused[i].bytes, refused[i].len, &d, &err);

        if (refused[i].at_render) {
            ASSERT_EQ(r, 0);
            r = pickle_render_json(d, d->root, &b, &err);
        }
        if (r != WSD_EBADCKPT || strncmp(err.msg, "E_PKL_DUP_KEY", 13) != 0 ||
            !strstr(err.msg, refused[i].what))
            TEST_FAIL("case %zu: %d \"%s\", expected E_PKL_DUP_KEY \"...%s...\"", i, r, err.msg,
                      refused[i].what);
        pk_buf_free(&b);
        pickle_free(d);
    }
    check_values(ok, NCASES(ok));
}

/* Appends (t, t) nested \p levels deep, t shared through the memo from index \p memo on. */
static size_t put_dag(uint8_t *p, unsigned levels, unsigned memo)
{
    size_t n = 0;

    p[n++] = ')'; /* the empty tuple */
    for (unsigned i = 0; i < levels; i++) {
        p[n++] = 0x94; /* MEMOIZE as memo + i */
        p[n++] = 'h';  /* BINGET it */
        p[n++] = (uint8_t)(memo + i);
        p[n++] = 0x86; /* TUPLE2: (t, t) */
    }
    return n;
}

/*
 * A key that shares one tuple through the memo at every level ((t, t) 40 deep) is 2^40 values
 * written out in full; compared by class (each node once), it takes no time. Two such keys
 * built apart from each other are still equal, and refused.
 */
TEST(pickle_compare_shared_keys)
{
    uint8_t p[16 + 2 * 40 * 4 + 16];
    size_t n;
    fmt_err_t err = {0};
    pk_doc_t *d = NULL;
    clock_t t0 = clock();

    memcpy(p, P4 "}(", 4); /* a dict, then MARK */
    n = 4 + put_dag(p + 4, 40, 0);
    memcpy(p + n, "NK\x01Nu.", 6); /* : None, 1: None, SETITEMS, STOP */
    n += 6;
    ASSERT_EQ(pickle_parse(p, n, &d, &err), 0);
    pickle_free(d);
    d = NULL;

    memcpy(p, P4 "}(", 4);
    n = 4 + put_dag(p + 4, 40, 0);
    p[n++] = 'N';
    n += put_dag(p + n, 40, 40); /* the same value, other nodes */
    memcpy(p + n, "Nu.", 3);
    n += 3;
    ASSERT_EQ(pickle_parse(p, n, &d, &err), WSD_EBADCKPT);
    ASSERT(d == NULL);
    if (strncmp(err.msg, "E_PKL_DUP_KEY", 13) != 0 || !strstr(err.msg, "two equal keys"))
        TEST_FAIL("expected E_PKL_DUP_KEY, got \"%s\"", err.msg);
    ASSERT((double)(clock() - t0) / CLOCKS_PER_SEC < 1.0);
}

/* pk_buf_t.max caps the JSON, including a run of plain text flushed before an escape. */
TEST(pickle_render_cap)
{
    static const char bytes[] = P2 "X\x07\x00\x00\x00"
                                   "abcdef\".";
    static const char fits[] = P2 "X\x06\x00\x00\x00"
                                  "abcdef.";
    const struct {
        const char *bytes;
        size_t len;
        size_t max;
        int r;
    } cases[] = {
        {bytes, sizeof(bytes) - 1, 5, WSD_EBADCKPT}, /* the run "abcdef" does not fit */
        {bytes, sizeof(bytes) - 1, 8, WSD_EBADCKPT}, /* the escape does not */
        {bytes, sizeof(bytes) - 1, 10, 0},           /* "abcdef\"" with quotes and backslash */
        {fits, sizeof(fits) - 1, 8, 0},
        {fits, sizeof(fits) - 1, 7, WSD_EBADCKPT},
    };
    char name[64];

    for (size_t i = 0; i < NCASES(cases); i++) {
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        pk_buf_t b = {.max = cases[i].max};

        ASSERT_EQ(pickle_parse((const uint8_t *)cases[i].bytes, cases[i].len, &d, &err), 0);
        if (pickle_render_json(d, d->root, &b, &err) != cases[i].r)
            TEST_FAIL("case %zu: \"%s\"", i, err.msg);
        if (cases[i].r) {
            ASSERT_STR_CONTAINS(err.msg, "E_PKL_LIMIT");
            ASSERT_LE(b.len, cases[i].max);
        } else {
            ASSERT_EQ(b.len, cases[i].max);
        }
        pk_buf_free(&b);
        pickle_free(d);
    }
    ASSERT_STR_EQ(pickle_global_name(0, name, sizeof(name)), "collections.OrderedDict");
    ASSERT_STR_EQ(pickle_global_name(UINT16_MAX, name, sizeof(name)), "?");
}

/* Accepted streams holding tensors: the node the root becomes, and that it is not rendered. */
TEST(pickle_tensor_nodes)
{
    /* clang-format off */
    static const struct {
        const char *bytes;
        size_t len;
        uint8_t type; /* of the root */
        int aux;      /* PK_UNSUPPORTED: pk_kind_t; PK_TENSOR: wsd_dtype_t */
        const char *what;
    } cases[] = {
#define C(s, type, aux, what) {s, sizeof(s) - 1, type, aux, what}
        /* The 7th (metadata) argument changes nothing unless it sets conj or neg. */
        C(P2 V2 "(" F32 GEOM "\x89" OD "NtR.", PK_TENSOR, WSD_DTYPE_F32, "a tensor"),
        C(P2 V2 "(" F32 GEOM "\x89" OD "}X\x03\x00\x00\x00neg\x89stR.", PK_TENSOR, WSD_DTYPE_F32,
          "a tensor"),
        C(P2 V2 "(" F32 GEOM "\x89" OD "}X\x04\x00\x00\x00" "conj\x88stR.", PK_UNSUPPORTED,
          PK_KIND_CONJ_NEG, "a tensor"),
        C(P2 V3 "(" F32 GEOM "\x89" OD "ctorch\nfloat32\n}X\x03\x00\x00\x00neg\x88stR.",
          PK_UNSUPPORTED, PK_KIND_CONJ_NEG, "a tensor"),
        C(P2 V2 "(" QI8 GEOM "\x89" OD "tR.", PK_UNSUPPORTED, PK_KIND_QUANTIZED, "a tensor"),
        C(P2 PARAM_ST "(" T_V2 "\x89" OD "}tR.", PK_TENSOR, WSD_DTYPE_F32, "a tensor"),
        C(P2 FROM "(" PARAM "ctorch.nn.parameter\nParameter\n(" T_V2 "\x89" OD "t}tR.", PK_TENSOR,
          WSD_DTYPE_F32, "a tensor"),
        C(P2 F32 ".", PK_STORAGE, 0, "a storage"),
        C(P2 "]" T_V2 "a.", PK_LIST, 0, "a tensor"),
        C(P2 "}" STR_A T_V2 "\x85s.", PK_DICT, 0, "a tensor"),
#undef C
    };
    /* clang-format on */

    for (size_t i = 0; i < NCASES(cases); i++) {
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        pk_buf_t b = {0};
        const pk_node_t *root;

        if (pickle_parse((const uint8_t *)cases[i].bytes, cases[i].len, &d, &err) != 0)
            TEST_FAIL("case %zu: %s", i, err.msg);
        root = &d->nodes[d->root];
        if (root->type != cases[i].type)
            TEST_FAIL("case %zu: root type %u, expected %u", i, root->type, cases[i].type);
        if (root->type == PK_UNSUPPORTED)
            ASSERT_EQ(root->aux, cases[i].aux);
        if (root->type == PK_TENSOR) {
            const pk_tensor_t *t = &d->tensors[root->u.ref];

            ASSERT_EQ(t->dtype, cases[i].aux);
            ASSERT_EQ(t->ndim, 1);
            ASSERT_EQ(t->shape[0], 4);
            ASSERT_EQ(t->stride[0], 1);
            ASSERT_EQ(d->nodes[t->storage].type, PK_STORAGE);
        }
        if (root->type == PK_LIST || root->type == PK_DICT)
            ASSERT(root->flags & PK_F_HAS_TENSOR);
        ASSERT_EQ(d->nstorages, 1);
        ASSERT_EQ(pickle_render_json(d, d->root, &b, &err), WSD_EBADCKPT);
        ASSERT(strncmp(err.msg, "E_PKL_BAD_CALL", 14) == 0);
        ASSERT_STR_CONTAINS(err.msg, cases[i].what);
        ASSERT_STR_CONTAINS(err.msg, "cannot be rendered as metadata");
        pk_buf_free(&b);
        pickle_free(d);
    }
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
