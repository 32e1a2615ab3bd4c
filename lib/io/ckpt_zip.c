/* PyTorch zip checkpoints: the container (spec/safety.md P1-P5) and copying tensors out.
 *
 * The zip is parsed here, read-only, with pread (or from a caller's buffer): the end record
 * (exactly at the end of the file), ZIP64 end record and locator, the central directory, and
 * every local header, which must agree with its central entry. Entry names must sit under one
 * root folder with no '..', '.', empty, absolute, backslash or NUL components, and appear once;
 * every entry's bytes must lie before the central directory and no two entries may overlap.
 * Storage records and data.pkl must be STORED: a compressed one is refused without inflating
 * anything. CRC-32 is checked on every record read. Nothing is ever written to disk. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/checked.h"
#include "io/atomic_file.h"
#include "io/ckpt.h"

/* ---- CRC-32 (IEEE, reflected, as zip and zlib use it), slicing by 8 ------------------------- */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t ckpt_crc32(uint32_t crc, const void *buf, size_t n) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = buf;
    uint32_t c = ~crc;
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
            crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^ crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return ~c;
}

/* ---- the source: a file read with pread, or a caller's buffer ------------------------------ */
struct src {
    lora_ctx *ctx;
    const char *label;
    int fd;
    const uint8_t *mem;
    uint64_t size;
    int borrow;        /* contiguous, aligned tensors may point into `mem` (a mapping the caller keeps) */
    int borrowed;      /* set when at least one did */
};

static lora_status src_read(struct src *s, uint64_t off, void *dst, size_t n) {
    uint64_t end;
    if (!ck_add_u64(off, n, &end) || end > s->size)
        return lora_fail(s->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: read of %zu bytes at offset %llu runs past the end of the "
                         "%llu-byte file", s->label, n, (unsigned long long)off, (unsigned long long)s->size);
    if (s->mem) {
        if (n) memcpy(dst, s->mem + off, n);
        return LORA_OK;
    }
    uint8_t *d = dst;
    while (n > 0) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t r = pread(s->fd, d, chunk, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return io_fail(s->ctx, errno, "read", s->label);
        }
        if (r == 0)
            return lora_fail(s->ctx, LORA_E_IO, "%s: unexpected end of file at offset %llu (the file shrank while "
                             "being read?)", s->label, (unsigned long long)off);
        d += r;
        off += (uint64_t)r;
        n -= (size_t)r;
    }
    return LORA_OK;
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

/* ---- the archive ----------------------------------------------------------------------------- */
enum zkind { Z_OTHER, Z_PKL, Z_DATA, Z_BYTEORDER, Z_KNOWN, Z_DIR };

struct zentry {
    const uint8_t *name;      /* into the central directory buffer */
    size_t name_len;
    uint16_t flags, method;
    uint32_t crc;
    uint64_t csize, usize, lho;
    uint64_t data_off, data_end;
    int kind;
    const uint8_t *key;       /* Z_DATA: the decimal key */
    size_t key_len;
    int crc_checked;
};

struct zip {
    lora_ctx *ctx;
    struct src *src;
    const char *label;
    uint8_t *cd;
    uint64_t cd_off, cd_size;
    struct zentry *e;
    size_t n;
    size_t *data_idx;         /* Z_DATA entries sorted by key */
    size_t n_data;
    const uint8_t *root;
    size_t root_len;
    int64_t pkl, byteorder;
};

static void zip_free(struct zip *z) {
    lora_free(z->ctx, z->cd);
    lora_free(z->ctx, z->e);
    lora_free(z->ctx, z->data_idx);
}

static const char *ename(const struct zip *z, size_t i, char *buf, size_t cap) {
    return ckpt_escape(buf, cap, z->e[i].name, z->e[i].name_len);
}

static lora_status zfail_entry(struct zip *z, lora_status s, size_t i, const char *what) {
    char nb[300];
    return lora_fail(z->ctx, s, "%s: zip entry '%s' (central directory entry %zu): %s", z->label, ename(z, i, nb, sizeof nb),
                     i, what);
}

/* End of central directory, ZIP64 end record and locator. */
static lora_status find_directory(struct zip *z, uint64_t *n_entries) {
    struct src *s = z->src;
    if (s->size < 22)
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: %llu bytes: too short for a zip end-of-central-directory "
                         "record (truncated?)", z->label, (unsigned long long)s->size);
    size_t tail = (size_t)(s->size < 22 + 65535 ? s->size : 22 + 65535);
    uint64_t tail_off = s->size - tail;
    uint8_t *buf = lora_malloc(z->ctx, tail);
    if (!buf) return LORA_E_NOMEM;
    lora_status st = src_read(s, tail_off, buf, tail);
    if (st != LORA_OK) {
        lora_free(z->ctx, buf);
        return st;
    }
    int64_t found = -1, past_eof = -1, trailing = -1;
    for (size_t i = tail - 22 + 1; i-- > 0;) {
        if (memcmp(buf + i, "PK\x05\x06", 4) != 0) continue;
        uint64_t end = tail_off + i + 22 + le16(buf + i + 20);
        if (end == s->size) { found = (int64_t)i; break; }
        if (end > s->size && past_eof < 0) past_eof = (int64_t)i;
        if (end < s->size && trailing < 0) trailing = (int64_t)i;
    }
    if (found < 0) {
        if (past_eof >= 0)
            st = lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: the end-of-central-directory record at offset %llu has "
                           "a %u-byte comment that runs past the end of the file (truncated?)", z->label,
                           (unsigned long long)(tail_off + (uint64_t)past_eof), le16(buf + past_eof + 20));
        else if (trailing >= 0)
            st = lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: bytes follow the end-of-central-directory record at "
                           "offset %llu", z->label, (unsigned long long)(tail_off + (uint64_t)trailing));
        else
            st = lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: no zip end-of-central-directory record (the file is "
                           "truncated or not a zip archive)", z->label);
        lora_free(z->ctx, buf);
        return st;
    }
    const uint8_t *e = buf + found;
    uint64_t eocd_off = tail_off + (uint64_t)found;
    uint16_t disk = le16(e + 4), disk_cd = le16(e + 6), n_disk = le16(e + 8), n_total = le16(e + 10);
    uint32_t cd_size32 = le32(e + 12), cd_off32 = le32(e + 16);
    lora_free(z->ctx, buf);
    if (disk != 0 || disk_cd != 0 || n_disk != n_total)
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: multi-disk zip archives are not supported "
                         "(end record at offset %llu)", z->label, (unsigned long long)eocd_off);
    uint64_t n = n_total, cd_size = cd_size32, cd_off = cd_off32, cd_limit = eocd_off;
    uint8_t loc[20];
    int have_loc = 0;
    if (eocd_off >= 20) {
        LORA_TRY(src_read(s, eocd_off - 20, loc, 20));
        have_loc = memcmp(loc, "PK\x06\x07", 4) == 0;
    }
    if (have_loc) {
        uint64_t loc_off = eocd_off - 20, z64 = le64(loc + 8);
        uint32_t total_disks = le32(loc + 16);
        if (le32(loc + 4) != 0 || total_disks > 1)
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: multi-disk ZIP64 archive (locator at offset %llu)",
                             z->label, (unsigned long long)loc_off);
        uint8_t r[56];
        if (z64 > loc_off || loc_off - z64 < 56)
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: the ZIP64 locator at offset %llu points to offset "
                             "%llu, not to a ZIP64 end record before it", z->label, (unsigned long long)loc_off,
                             (unsigned long long)z64);
        LORA_TRY(src_read(s, z64, r, 56));
        uint64_t rec_size = le64(r + 4), rec_end;
        if (memcmp(r, "PK\x06\x06", 4) != 0 || rec_size < 44 || !ck_add_u64(z64 + 12, rec_size, &rec_end) ||
            rec_end > loc_off)
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: no valid ZIP64 end record at offset %llu", z->label,
                             (unsigned long long)z64);
        uint64_t zn_disk = le64(r + 24), zn = le64(r + 32), zsize = le64(r + 40), zoff = le64(r + 48);
        if (le32(r + 16) != 0 || le32(r + 20) != 0 || zn_disk != zn)
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: multi-disk ZIP64 archive", z->label);
        if ((n_total != 0xffff && n_total != zn) || (cd_size32 != 0xffffffffu && cd_size32 != zsize) ||
            (cd_off32 != 0xffffffffu && cd_off32 != zoff))
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: the end record and the ZIP64 end record disagree "
                             "on the central directory", z->label);
        n = zn;
        cd_size = zsize;
        cd_off = zoff;
        cd_limit = z64;
    } else if (cd_size32 == 0xffffffffu || cd_off32 == 0xffffffffu) {
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: ZIP64 sizes without a ZIP64 end record", z->label);
    }
    if (n > CKPT_MAX_ENTRIES)
        return lora_fail(z->ctx, LORA_E_LIMIT, "%s: %llu zip entries exceed the limit of %d", z->label,
                         (unsigned long long)n, CKPT_MAX_ENTRIES);
    if (cd_size > CKPT_MAX_CD_BYTES)
        return lora_fail(z->ctx, LORA_E_LIMIT, "%s: a central directory of %llu bytes exceeds the limit of %u", z->label,
                         (unsigned long long)cd_size, CKPT_MAX_CD_BYTES);
    uint64_t cd_end;
    if (!ck_add_u64(cd_off, cd_size, &cd_end) || cd_end != cd_limit)
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: the central directory (offset %llu, %llu bytes) does not "
                         "end where the end records begin (offset %llu)", z->label, (unsigned long long)cd_off,
                         (unsigned long long)cd_size, (unsigned long long)cd_limit);
    if (n * 46 > cd_size)
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: %llu entries cannot fit in a %llu-byte central directory",
                         z->label, (unsigned long long)n, (unsigned long long)cd_size);
    z->cd_off = cd_off;
    z->cd_size = cd_size;
    *n_entries = n;
    return LORA_OK;
}

static lora_status check_name(struct zip *z, size_t i) {
    const uint8_t *nm = z->e[i].name;
    size_t nl = z->e[i].name_len;
    if (nl == 0) return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "empty name");
    if (nl > CKPT_MAX_NAME) return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "name longer than 4096 bytes");
    if (memchr(nm, 0, nl)) return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "the name contains a NUL byte");
    if (memchr(nm, '\\', nl)) return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "the name contains a backslash");
    if (nm[0] == '/') return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "absolute path");
    const uint8_t *slash = memchr(nm, '/', nl);
    if (!slash) return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "not inside a root folder");
    size_t rl = (size_t)(slash - nm);
    if (rl == 2 && nm[1] == ':') return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "absolute path (drive letter)");
    for (size_t a = 0; a < nl;) {
        const uint8_t *b = memchr(nm + a, '/', nl - a);
        size_t cl = b ? (size_t)(b - (nm + a)) : nl - a;
        if (cl == 0) return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "empty path component");
        if ((cl == 1 && nm[a] == '.') || (cl == 2 && nm[a] == '.' && nm[a + 1] == '.'))
            return zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, i, "'.' or '..' path component");
        a += cl + 1;
        if (!b) break;
    }
    if (!z->root) {
        z->root = nm;
        z->root_len = rl;
    } else if (rl != z->root_len || memcmp(nm, z->root, rl) != 0) {
        char a[300], b[300], c[300];
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_ENTRY, "%s: zip entry '%s' (central directory entry %zu): two root "
                         "folders ('%s' and '%s'); a torch checkpoint has one", z->label, ename(z, i, a, sizeof a), i,
                         ckpt_escape(b, sizeof b, z->root, z->root_len), ckpt_escape(c, sizeof c, nm, rl));
    }
    return LORA_OK;
}

static int rest_is(const uint8_t *r, size_t rl, const char *s) { return strlen(s) == rl && memcmp(r, s, rl) == 0; }

static void classify(struct zip *z, size_t i) {
    struct zentry *e = &z->e[i];
    const uint8_t *r = e->name + z->root_len + 1;
    size_t rl = e->name_len - z->root_len - 1;
    e->kind = Z_OTHER;
    if (rest_is(r, rl, "data.pkl")) e->kind = Z_PKL;
    else if (rest_is(r, rl, "byteorder")) e->kind = Z_BYTEORDER;
    else if (rest_is(r, rl, "version") || rest_is(r, rl, ".data/version") || rest_is(r, rl, ".data/serialization_id") ||
             rest_is(r, rl, ".format_version") || rest_is(r, rl, ".storage_alignment"))
        e->kind = Z_KNOWN;
    else if (rl == 0 || r[rl - 1] == '/') e->kind = Z_DIR;
    else if (rl > 5 && rl <= 25 && memcmp(r, "data/", 5) == 0) {
        int digits = 1;
        for (size_t k = 5; k < rl; k++) digits &= r[k] >= '0' && r[k] <= '9';
        if (digits) {
            e->kind = Z_DATA;
            e->key = r + 5;
            e->key_len = rl - 5;
        }
    }
}

static int cmp_bytes(const uint8_t *a, size_t al, const uint8_t *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c) return c;
    return al < bl ? -1 : al > bl ? 1 : 0;
}

struct sort_ref {
    const struct zentry *e;
    size_t i;
};

static int cmp_name(const void *a, const void *b) {
    const struct sort_ref *x = a, *y = b;
    return cmp_bytes(x->e->name, x->e->name_len, y->e->name, y->e->name_len);
}

static int cmp_lho(const void *a, const void *b) {
    const struct sort_ref *x = a, *y = b;
    return x->e->lho < y->e->lho ? -1 : x->e->lho > y->e->lho ? 1 : 0;
}

static int cmp_key(const void *a, const void *b) {
    const struct sort_ref *x = a, *y = b;
    if (x->e->key_len != y->e->key_len) return x->e->key_len < y->e->key_len ? -1 : 1;
    return memcmp(x->e->key, y->e->key, x->e->key_len);
}

static lora_status parse_central(struct zip *z, uint64_t n) {
    z->cd = lora_malloc(z->ctx, (size_t)(z->cd_size ? z->cd_size : 1));
    z->e = lora_calloc(z->ctx, (size_t)(n ? n : 1), sizeof *z->e);
    if (!z->cd || !z->e) return LORA_E_NOMEM;
    LORA_TRY(src_read(z->src, z->cd_off, z->cd, (size_t)z->cd_size));
    const uint8_t *p = z->cd, *end = z->cd + z->cd_size;
    for (uint64_t i = 0; i < n; i++) {
        if (end - p < 46 || memcmp(p, "PK\x01\x02", 4) != 0)
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: central directory entry %llu at offset %llu is not "
                             "a valid header", z->label, (unsigned long long)i,
                             (unsigned long long)(z->cd_off + (uint64_t)(p - z->cd)));
        struct zentry *e = &z->e[i];
        e->flags = le16(p + 8);
        e->method = le16(p + 10);
        e->crc = le32(p + 16);
        uint32_t cs32 = le32(p + 20), us32 = le32(p + 24), lho32 = le32(p + 42);
        uint16_t nl = le16(p + 28), xl = le16(p + 30), cl = le16(p + 32), disk = le16(p + 34);
        if ((size_t)(end - p) - 46 < (size_t)nl + xl + cl)
            return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: central directory entry %llu runs past the "
                             "directory's end", z->label, (unsigned long long)i);
        e->name = p + 46;
        e->name_len = nl;
        e->csize = cs32;
        e->usize = us32;
        e->lho = lho32;
        /* ZIP64 extended information: the fields whose 32-bit value is the sentinel, in order */
        int need_u = us32 == 0xffffffffu, need_c = cs32 == 0xffffffffu, need_l = lho32 == 0xffffffffu,
            need_d = disk == 0xffff;
        const uint8_t *x = p + 46 + nl, *xe = x + xl;
        while (xe - x >= 4) {
            uint16_t id = le16(x), sz = le16(x + 2);
            if (xe - x - 4 < sz) break;
            if (id == 1) {
                const uint8_t *f = x + 4, *fe = x + 4 + sz;
                if (need_u) { if (fe - f < 8) break; e->usize = le64(f); f += 8; need_u = 0; }
                if (need_c) { if (fe - f < 8) break; e->csize = le64(f); f += 8; need_c = 0; }
                if (need_l) { if (fe - f < 8) break; e->lho = le64(f); f += 8; need_l = 0; }
                if (need_d) { if (fe - f < 4) break; disk = (uint16_t)(le32(f) ? 1 : 0); need_d = 0; }
            }
            x += 4 + sz;
        }
        z->n = (size_t)i + 1;
        if (need_u || need_c || need_l || need_d)
            return zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, (size_t)i, "ZIP64 sizes or offset missing from the extra field");
        if (disk != 0) return zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, (size_t)i, "entry on another disk");
        if (e->flags & 0x41) return zfail_entry(z, LORA_E_UNSUPPORTED, (size_t)i, "encrypted entry");
        if (e->method == 0 && e->csize != e->usize)
            return zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, (size_t)i,
                               "stored entry whose compressed and uncompressed sizes differ");
        LORA_TRY(check_name(z, (size_t)i));
        p += 46 + (size_t)nl + xl + cl;
    }
    if (p != end)
        return lora_fail(z->ctx, LORA_E_CKPT_ZIP_CORRUPT, "%s: %lld bytes of the central directory are not entries",
                         z->label, (long long)(end - p));
    return LORA_OK;
}

static lora_status check_locals(struct zip *z) {
    uint8_t h[30];
    uint8_t *name = lora_malloc(z->ctx, CKPT_MAX_NAME + 1);
    if (!name) return LORA_E_NOMEM;
    lora_status s = LORA_OK;
    for (size_t i = 0; i < z->n && s == LORA_OK; i++) {
        struct zentry *e = &z->e[i];
        char msg[200];
        uint64_t lend;
        if (!ck_add_u64(e->lho, 30, &lend) || lend > z->cd_off) {
            snprintf(msg, sizeof msg, "local header offset %llu is not before the central directory",
                     (unsigned long long)e->lho);
            s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i, msg);
            break;
        }
        if ((s = src_read(z->src, e->lho, h, 30)) != LORA_OK) break;
        uint16_t nl = le16(h + 26), xl = le16(h + 28);
        if (memcmp(h, "PK\x03\x04", 4) != 0) {
            snprintf(msg, sizeof msg, "no local header at offset %llu", (unsigned long long)e->lho);
            s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i, msg);
            break;
        }
        if (nl != e->name_len || lend + nl > z->cd_off) {
            s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i, "the local header's name differs from the central directory's");
            break;
        }
        if ((s = src_read(z->src, lend, name, nl)) != LORA_OK) break;
        if (memcmp(name, e->name, nl) != 0) {
            s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i, "the local header's name differs from the central directory's");
            break;
        }
        if (le16(h + 8) != e->method || (le16(h + 6) & 0x49) != (e->flags & 0x49)) {
            s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i,
                            "the local header's method or flags differ from the central directory's");
            break;
        }
        if (!(e->flags & 8)) {   /* no data descriptor: the local header carries the sizes */
            uint32_t lc = le32(h + 18), lu = le32(h + 22);
            if (le32(h + 14) != e->crc || (lc != 0xffffffffu && lc != e->csize) || (lu != 0xffffffffu && lu != e->usize)) {
                s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i,
                                "the local header's CRC or sizes differ from the central directory's");
                break;
            }
        }
        e->data_off = lend + nl + xl;
        if (!ck_add_u64(e->data_off, e->csize, &e->data_end) || e->data_end > z->cd_off) {
            snprintf(msg, sizeof msg, "its %llu data bytes at offset %llu run into the central directory (offset %llu)",
                     (unsigned long long)e->csize, (unsigned long long)e->data_off, (unsigned long long)z->cd_off);
            s = zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i, msg);
            break;
        }
    }
    lora_free(z->ctx, name);
    return s;
}

static lora_status check_set(struct zip *z) {
    struct sort_ref *r = lora_malloc(z->ctx, (z->n ? z->n : 1) * sizeof *r);
    if (!r) return LORA_E_NOMEM;
    lora_status s = LORA_OK;
    for (size_t i = 0; i < z->n; i++) r[i] = (struct sort_ref){&z->e[i], i};
    /* duplicate names */
    qsort(r, z->n, sizeof *r, cmp_name);
    for (size_t i = 1; i < z->n; i++)
        if (cmp_name(&r[i - 1], &r[i]) == 0) {
            s = zfail_entry(z, LORA_E_CKPT_ZIP_ENTRY, r[i].i, "the name appears twice in the archive");
            goto out;
        }
    /* overlapping byte ranges: [local header, end of data) */
    qsort(r, z->n, sizeof *r, cmp_lho);
    for (size_t i = 1; i < z->n; i++)
        if (r[i].e->lho < r[i - 1].e->data_end) {
            char a[300], msg[500];
            snprintf(msg, sizeof msg, "its bytes (offset %llu) overlap entry '%s' (offset %llu to %llu)",
                     (unsigned long long)r[i].e->lho, ename(z, r[i - 1].i, a, sizeof a),
                     (unsigned long long)r[i - 1].e->lho, (unsigned long long)r[i - 1].e->data_end);
            s = zfail_entry(z, LORA_E_CKPT_ZIP_OVERLAP, r[i].i, msg);
            goto out;
        }
    /* classify; the records liblora reads must be stored */
    z->pkl = z->byteorder = -1;
    z->n_data = 0;
    for (size_t i = 0; i < z->n; i++) {
        classify(z, i);
        struct zentry *e = &z->e[i];
        if (e->kind == Z_PKL) z->pkl = (int64_t)i;
        if (e->kind == Z_BYTEORDER) z->byteorder = (int64_t)i;
        if (e->kind == Z_DATA) z->n_data++;
        if ((e->kind == Z_PKL || e->kind == Z_DATA || e->kind == Z_BYTEORDER) && e->method != 0) {
            char msg[200];
            snprintf(msg, sizeof msg, "compressed with method %u; torch writes these records stored (method 0), so "
                     "liblora refuses it without inflating anything", e->method);
            s = zfail_entry(z, LORA_E_CKPT_ZIP_COMPRESSED, i, msg);
            goto out;
        }
        if (e->kind == Z_OTHER || e->kind == Z_DIR) {
            char nb[300];
            lora_log(z->ctx, LORA_LOG_DEBUG, "%s: ignoring zip entry '%s'", z->label, ename(z, i, nb, sizeof nb));
        }
    }
    z->data_idx = lora_malloc(z->ctx, (z->n_data ? z->n_data : 1) * sizeof *z->data_idx);
    if (!z->data_idx) { s = LORA_E_NOMEM; goto out; }
    size_t k = 0;
    for (size_t i = 0; i < z->n; i++)
        if (z->e[i].kind == Z_DATA) r[k++] = (struct sort_ref){&z->e[i], i};
    qsort(r, k, sizeof *r, cmp_key);
    for (size_t i = 0; i < k; i++) z->data_idx[i] = r[i].i;
out:
    lora_free(z->ctx, r);
    return s;
}

static int64_t lookup_record(void *user, const char *key, size_t key_len, uint64_t *nbytes) {
    const struct zip *z = user;
    size_t lo = 0, hi = z->n_data;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const struct zentry *e = &z->e[z->data_idx[mid]];
        int c = e->key_len != key_len ? (e->key_len < key_len ? -1 : 1) : memcmp(e->key, key, key_len);
        if (c == 0) {
            *nbytes = e->usize;
            return (int64_t)z->data_idx[mid];
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

/* Reads a whole stored record into `dst` and checks its CRC-32. */
static lora_status read_record(struct zip *z, size_t i, void *dst) {
    struct zentry *e = &z->e[i];
    LORA_TRY(src_read(z->src, e->data_off, dst, (size_t)e->usize));
    if (!e->crc_checked) {
        uint32_t c = ckpt_crc32(0, dst, (size_t)e->usize);
        if (c != e->crc) {
            char msg[160];
            snprintf(msg, sizeof msg, "CRC-32 of the data is %08x, the archive says %08x (damaged or truncated "
                     "download?)", c, e->crc);
            return zfail_entry(z, LORA_E_CKPT_ZIP_CORRUPT, i, msg);
        }
        e->crc_checked = 1;
    }
    return LORA_OK;
}

/* ---- copying a view out of its storage ------------------------------------------------------ */
static void gather(uint8_t *dst, const uint8_t *src, const struct pk_tensor *t, int64_t numel) {
    int64_t idx[CKPT_MAX_RANK] = {0};
    int nd = t->ndim;
    size_t es = (size_t)t->elsize;
    if (nd == 0) {
        memcpy(dst, src + (size_t)t->offset * es, es);
        return;
    }
    int64_t inner = t->size[nd - 1], istride = t->stride[nd - 1];
    uint64_t base = (uint64_t)t->offset;   /* wraps only transiently (size-1 dims with huge strides) */
    for (int64_t done = 0; done < numel; done += inner) {
        if (istride == 1) {
            memcpy(dst, src + (size_t)base * es, (size_t)inner * es);
        } else {
            for (int64_t j = 0; j < inner; j++)
                memcpy(dst + (size_t)j * es, src + (size_t)(base + (uint64_t)j * (uint64_t)istride) * es, es);
        }
        dst += (size_t)inner * es;
        for (int d = nd - 2; d >= 0; d--) {   /* next row: odometer over the outer dims */
            idx[d]++;
            base += (uint64_t)t->stride[d];
            if (idx[d] < t->size[d]) break;
            base -= (uint64_t)t->stride[d] * (uint64_t)t->size[d];
            idx[d] = 0;
        }
    }
}

static int is_contiguous(const struct pk_tensor *t) {
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->size[d] != 1 && t->stride[d] != expect) return 0;
        expect *= t->size[d];
    }
    return 1;
}

struct rec_cache {
    int64_t rec;
    uint8_t *buf;
};

static lora_status materialize(struct zip *z, const struct pk_env *env, const struct pk_result *res,
                               struct tensor_map *out) {
    lora_ctx *ctx = z->ctx;
    struct rec_cache cache = {-1, NULL};
    uint64_t total = 0, cap = z->src->size * 4 + (64u << 20);
    char *name = NULL;
    lora_status s = LORA_OK;
    for (int64_t k = 0; k < res->n && s == LORA_OK; k++) {
        const struct pk_tensor *t = &res->t[k];
        lora_free(ctx, name);
        name = lora_malloc(ctx, t->name_len + 1);
        if (!name) { s = LORA_E_NOMEM; break; }
        memcpy(name, t->name, t->name_len);
        name[t->name_len] = '\0';
        char en[300];
        if (tmap_find(out, name) >= 0) {
            s = lora_fail(ctx, LORA_E_CKPT_PICKLE_STRUCT, "%s: %s offset %llu: state-dict key '%s' appears twice",
                          z->label, env->entry, (unsigned long long)t->key_offset,
                          ckpt_escape(en, sizeof en, name, t->name_len));
            break;
        }
        int64_t numel = 1;
        ck_numel(t->size, t->ndim, &numel);          /* validated by the unpickler */
        uint64_t nbytes = (uint64_t)numel * (uint64_t)t->elsize;
        if (!ck_add_u64(total, nbytes, &total) || total > cap || nbytes > SIZE_MAX) {
            s = lora_fail(ctx, LORA_E_LIMIT, "%s: %s offset %llu: tensor '%s': the state dict's views expand to more "
                          "than %llu bytes (4 times the file size + 64 MiB)", z->label, env->entry,
                          (unsigned long long)t->key_offset, ckpt_escape(en, sizeof en, name, t->name_len),
                          (unsigned long long)cap);
            break;
        }
        const struct zentry *e = &z->e[t->record];
        if (z->src->borrow && nbytes > 0 && is_contiguous(t)) {
            /* zero copy: the view's bytes lie in one stored record of the kept mapping (the
             * unpickler checked that the view fits its storage). Their CRC is not verified,
             * as PyTorch's own reader does not verify it either. */
            const uint8_t *p = z->src->mem + e->data_off + (uint64_t)t->offset * (uint64_t)t->elsize;
            if ((uintptr_t)p % (uintptr_t)t->elsize == 0) {
                s = tmap_add(out, name, t->dtype, t->ndim, t->size, p, nbytes, 0, 0);
                z->src->borrowed |= s == LORA_OK;
                continue;
            }
        }
        uint8_t *dst = lora_malloc(ctx, nbytes ? (size_t)nbytes : 1);
        if (!dst) { s = LORA_E_NOMEM; break; }
        if (nbytes == 0) {
            /* nothing to read */
        } else if (is_contiguous(t) && t->offset == 0 && nbytes == e->usize) {
            s = read_record(z, (size_t)t->record, dst);
        } else {
            if (cache.rec != t->record) {
                lora_free(ctx, cache.buf);
                cache.rec = -1;
                cache.buf = lora_malloc(ctx, (size_t)e->usize ? (size_t)e->usize : 1);
                if (!cache.buf) s = LORA_E_NOMEM;
                else if ((s = read_record(z, (size_t)t->record, cache.buf)) == LORA_OK) cache.rec = t->record;
            }
            if (s == LORA_OK) gather(dst, cache.buf, t, numel);
        }
        if (s == LORA_OK) s = tmap_add(out, name, t->dtype, t->ndim, t->size, dst, nbytes, 0, 1);
        if (s != LORA_OK) lora_free(ctx, dst);
    }
    lora_free(ctx, name);
    lora_free(ctx, cache.buf);
    return s;
}

/* ---- sniffing (P1) --------------------------------------------------------------------------- */
static const uint8_t legacy_magic[10] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

static lora_status sniff(lora_ctx *ctx, const char *label, const uint8_t *h, size_t n, uint64_t size) {
    if (size == 0) return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: not a PyTorch checkpoint: the file is empty", label);
    if (n >= 4 && h[0] == 'P' && h[1] == 'K' &&
        ((h[2] == 3 && h[3] == 4) || (h[2] == 5 && h[3] == 6) || (h[2] == 6 && h[3] == 6)))
        return LORA_OK;
    if (n >= 14 && h[0] == 0x80 && h[1] >= 2 && h[1] <= 5 && h[2] == 0x8a && h[3] == 10 &&
        memcmp(h + 4, legacy_magic, 10) == 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: legacy pre-1.6 torch format: re-save with torch>=1.6 or convert "
                         "to safetensors", label);
    if (n >= 262 && memcmp(h + 257, "ustar", 5) == 0)
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: legacy tar-based torch format: re-save with torch>=1.6 or convert "
                         "to safetensors", label);
    const char *kind = NULL;
    if (n >= 7 && memcmp(h, "version", 7) == 0)
        kind = "a Git LFS pointer, not the model: download the real file (git lfs pull)";
    else if (n >= 2 && h[0] == 0x80) kind = "a bare pickle stream, not a PyTorch zip checkpoint";
    else if (n >= 3 && h[0] == 0x1f && h[1] == 0x8b && h[2] == 8) kind = "a gzip file";
    else if (n >= 6 && memcmp(h, "7z\xbc\xaf\x27\x1c", 6) == 0) kind = "a 7z archive (torch checkpoints are zip files)";
    else if (n >= 5 && memcmp(h, "%PDF-", 5) == 0) kind = "a PDF document";
    else if (n >= 9 && h[8] == '{' && le64(h) < size) kind = "a safetensors file (load it as safetensors)";
    else {
        for (size_t i = 0; i < n && i < 64; i++) {
            if (h[i] == '<') { kind = "an HTML or XML page (a login or error page saved instead of the model?)"; break; }
            if (h[i] != ' ' && h[i] != '\t' && h[i] != '\r' && h[i] != '\n') break;
        }
    }
    if (kind) return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: not a PyTorch checkpoint: it is %s", label, kind);
    return lora_fail(ctx, LORA_E_NOT_A_MODEL, "%s: not a PyTorch checkpoint: no zip signature at byte 0", label);
}

/* ---- reading ----------------------------------------------------------------------------------- */
static int host_is_little_endian(void) {
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static lora_status read_src(struct src *s, struct tensor_map *out) {
    lora_ctx *ctx = s->ctx;
    if (!host_is_little_endian())
        return lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: reading torch checkpoints needs a little-endian host", s->label);
    uint8_t head[512];
    size_t hn = (size_t)(s->size < sizeof head ? s->size : sizeof head);
    LORA_TRY(src_read(s, 0, head, hn));
    LORA_TRY(sniff(ctx, s->label, head, hn, s->size));

    struct zip z;
    memset(&z, 0, sizeof z);
    z.ctx = ctx;
    z.src = s;
    z.label = s->label;
    uint64_t n = 0;
    uint8_t *pkl = NULL;
    char *entry = NULL;
    struct pk_result res;
    memset(&res, 0, sizeof res);
    int64_t n_before = out->n;
    lora_status st = find_directory(&z, &n);
    if (st == LORA_OK) st = parse_central(&z, n);
    if (st == LORA_OK) st = check_locals(&z);
    if (st == LORA_OK) st = check_set(&z);
    if (st == LORA_OK && z.pkl < 0) {
        char rb[300];
        ckpt_escape(rb, sizeof rb, z.root ? z.root : (const uint8_t *)"", z.root_len);
        st = lora_fail(ctx, LORA_E_CKPT_ZIP_ENTRY, "%s: the archive has no '%s/data.pkl' entry (%zu entries): not a torch "
                       "checkpoint, or a damaged one", s->label, z.root ? rb : "<root>", z.n);
    }
    if (st == LORA_OK) {
        struct zentry *e = &z.e[z.pkl];
        entry = lora_malloc(ctx, e->name_len + 1);
        if (!entry) st = LORA_E_NOMEM;
        else {
            memcpy(entry, e->name, e->name_len);
            entry[e->name_len] = '\0';
        }
        if (st == LORA_OK && e->usize > CKPT_MAX_PKL)
            st = zfail_entry(&z, LORA_E_LIMIT, (size_t)z.pkl, "data.pkl is larger than 256 MiB");
        if (st == LORA_OK && !(pkl = lora_malloc(ctx, (size_t)e->usize ? (size_t)e->usize : 1))) st = LORA_E_NOMEM;
        if (st == LORA_OK) st = read_record(&z, (size_t)z.pkl, pkl);
    }
    if (st == LORA_OK && z.byteorder >= 0) {
        struct zentry *e = &z.e[z.byteorder];
        uint8_t bo[16];
        if (e->usize > sizeof bo) {
            st = zfail_entry(&z, LORA_E_CKPT_ZIP_ENTRY, (size_t)z.byteorder, "byteorder record is not 'little' or 'big'");
        } else if ((st = read_record(&z, (size_t)z.byteorder, bo)) == LORA_OK) {
            if (e->usize == 3 && memcmp(bo, "big", 3) == 0)
                st = lora_fail(ctx, LORA_E_UNSUPPORTED, "%s: big-endian checkpoint (byteorder record says 'big'): "
                               "re-save it on a little-endian machine or convert to safetensors", s->label);
            else if (!(e->usize == 6 && memcmp(bo, "little", 6) == 0))
                st = zfail_entry(&z, LORA_E_CKPT_ZIP_ENTRY, (size_t)z.byteorder,
                                 "byteorder record is not 'little' or 'big'");
        }
    }
    if (st == LORA_OK) {
        struct pk_env env = {s->label, entry, lookup_record, &z};
        st = pk_load_state_dict(ctx, pkl, (size_t)z.e[z.pkl].usize, &env, &res);
        if (st == LORA_OK && res.n == 0)
            st = lora_fail(ctx, LORA_E_CKPT_NO_TENSORS, "%s: %s: the %s holds no tensors (%lld other values)", s->label,
                           entry, res.from_state_dict_key ? "state_dict" : "checkpoint's top-level dict",
                           (long long)res.n_ignored);
        if (st == LORA_OK) st = materialize(&z, &env, &res, out);
    }
    if (st != LORA_OK)
        while (out->n > n_before) tmap_remove(out, out->n - 1);
    pk_result_free(ctx, &res);
    lora_free(ctx, pkl);
    lora_free(ctx, entry);
    zip_free(&z);
    return st;
}

lora_status ckpt_read_mem(lora_ctx *ctx, const char *label, const uint8_t *buf, uint64_t len, struct tensor_map *out) {
    if (!out || (!buf && len)) return lora_fail(ctx, LORA_E_INVALID_ARG, "ckpt_read_mem: NULL argument");
    static const uint8_t empty[1] = {0};
    struct src s = {ctx, label ? label : "(memory)", -1, buf ? buf : empty, len, 0, 0};
    return read_src(&s, out);
}

lora_status ckpt_read(lora_ctx *ctx, const char *path, struct tensor_map *out) {
    return ckpt_read_mapped(ctx, path, out, NULL);
}

void ckpt_unmap(struct ckpt_mapping *m) {
    if (m && m->base) munmap(m->base, (size_t)m->size);
    if (m) m->base = NULL;
}

lora_status ckpt_read_mapped(lora_ctx *ctx, const char *path, struct tensor_map *out, struct ckpt_mapping *keep) {
    if (keep) keep->base = NULL;
    if (!path || !out) return lora_fail(ctx, LORA_E_INVALID_ARG, "ckpt_read: NULL argument");
    int fd;
    uint64_t size;
    LORA_TRY(io_open_read(ctx, path, &fd, &size));
    struct src s = {ctx, path, fd, NULL, size, 0, 0};
    if (keep && size > 0) {
        void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map != MAP_FAILED) {   /* else fall back to pread and copies */
            s.mem = map;
            s.fd = -1;
            s.borrow = 1;
        }
    }
    lora_status st = read_src(&s, out);   /* on failure it removed what it added */
    close(fd);
    if (s.borrow) {
        if (st == LORA_OK && s.borrowed) {
            keep->base = (void *)s.mem;
            keep->size = size;
        } else {
            munmap((void *)s.mem, (size_t)size);   /* every tensor was copied */
        }
    }
    return st;
}
