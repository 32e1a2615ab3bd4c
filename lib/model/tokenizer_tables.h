/* Unicode and text-repair tables for the CLIP tokenizer, generated into tokenizer_tables.c by
 * gen_tokenizer_tables.py from the Python modules transformers' CLIPTokenizer runs (Python
 * 3.11 unicodedata 14.0.0, the `regex` module, ftfy 6.1.1). Immutable; no initialisation. */
#ifndef LORA_MODEL_TOKENIZER_TABLES_H
#define LORA_MODEL_TOKENIZER_TABLES_H

#include <stddef.h>
#include <stdint.h>

/* Per-code-point properties (uni_props). */
#define UP_RX_L        0x0001 /* split pattern [\p{L}] (regex module, IGNORECASE) */
#define UP_RX_N        0x0002 /* split pattern [\p{N}] */
#define UP_RX_P        0x0004 /* split pattern [^\s\p{L}\p{N}] */
#define UP_RX_S        0x0008 /* regex module \s (whitespace_clean) */
#define UP_PY_SPACE    0x0010 /* str.isspace(), also Python re's \s (str.strip, ftfy) */
#define UP_RE_W        0x0020 /* Python re \w */
#define UP_RE_D        0x0040 /* Python re \d */
#define UP_CASED       0x0080 /* Cased and not Case_Ignorable (str.lower's Final_Sigma) */
#define UP_CASE_IGN    0x0100 /* Case_Ignorable */
#define UP_HAS_LOWER   0x0200 /* str.lower changes it (U+03A3 excluded: context rule) */
#define UP_NFC_UNSTABLE 0x0400 /* may change under NFC: decomposes, combines, or ccc != 0 */

extern const uint16_t uni_props_stage1[0x110000 >> 7];
extern const uint16_t uni_props_stage2[];
extern const uint16_t uni_ccc_stage1[0x110000 >> 7];
extern const uint8_t uni_ccc_stage2[];

static inline uint16_t uni_props(uint32_t cp) {
    if (cp >= 0x110000) return 0;
    return uni_props_stage2[((uint32_t)uni_props_stage1[cp >> 7] << 7) | (cp & 127)];
}

static inline uint8_t uni_ccc(uint32_t cp) {
    if (cp >= 0x110000) return 0;
    return uni_ccc_stage2[((uint32_t)uni_ccc_stage1[cp >> 7] << 7) | (cp & 127)];
}

/* str.lower: sorted code points and their lower-case forms (up to 3 code points, 0-padded). */
extern const uint32_t uni_lower_cp[];
extern const uint32_t uni_lower_map[][3];
extern const size_t uni_lower_count;

/* Full canonical decompositions (up to 4 code points, 0-padded), Hangul excluded. */
extern const uint32_t uni_decomp_cp[];
extern const uint32_t uni_decomp_map[][4];
extern const size_t uni_decomp_count;

/* Primary composites: key (first << 21 | second), sorted; Hangul excluded. */
extern const uint64_t uni_comp_key[];
extern const uint32_t uni_comp_val[];
extern const size_t uni_comp_count;

/* ftfy character classes (badness.MOJIBAKE_CATEGORIES, chardata.UTF8_CLUES). */
#define MJ_C1                       0x00001
#define MJ_BAD                      0x00002
#define MJ_CURRENCY                 0x00004
#define MJ_START_PUNCTUATION        0x00008
#define MJ_END_PUNCTUATION          0x00010
#define MJ_NUMERIC                  0x00020
#define MJ_KAOMOJI                  0x00040
#define MJ_UPPER_ACCENTED           0x00080
#define MJ_LOWER_ACCENTED           0x00100
#define MJ_UPPER_COMMON             0x00200
#define MJ_LOWER_COMMON             0x00400
#define MJ_BOX                      0x00800
#define MJ_COMMON                   0x01000
#define MJ_UTF8_FIRST_OF_2          0x02000
#define MJ_UTF8_FIRST_OF_3          0x04000
#define MJ_UTF8_FIRST_OF_4          0x08000
#define MJ_UTF8_CONTINUATION        0x10000
#define MJ_UTF8_CONTINUATION_STRICT 0x20000
extern const uint32_t ftfy_class_cp[];
extern const uint32_t ftfy_class_mask[];
extern const size_t ftfy_class_count;

/* The single-byte codecs ftfy tries, in its order. */
enum {
    FTFY_LATIN_1, FTFY_SLOPPY_1252, FTFY_SLOPPY_1251, FTFY_SLOPPY_1250, FTFY_SLOPPY_1253,
    FTFY_SLOPPY_1254, FTFY_ISO_8859_2, FTFY_MACROMAN, FTFY_CP437, FTFY_N_CODECS
};
extern const uint16_t ftfy_codec_decode[FTFY_N_CODECS][256];
/* Encoding of the characters beyond ASCII (and of 0x1A's character): codec k's entries are
 * [ftfy_codec_enc_off[k], ftfy_codec_enc_off[k + 1]) sorted by code point. */
extern const uint16_t ftfy_codec_enc_cp[];
extern const uint8_t ftfy_codec_enc_byte[];
extern const uint16_t ftfy_codec_enc_off[FTFY_N_CODECS + 1];

struct ftfy_entity {
    const char *name;     /* between '&' and ';' */
    uint32_t value[3];    /* 0-padded */
};
extern const struct ftfy_entity ftfy_entities[];
extern const size_t ftfy_entity_count;

/* html.unescape's remapped numeric references (_invalid_charrefs). */
extern const uint32_t html_charref_num[];
extern const uint32_t html_charref_val[];
extern const size_t html_charref_count;

struct ftfy_map {
    uint32_t cp;
    uint32_t value[3];    /* 0-padded */
};
extern const struct ftfy_map ftfy_ligatures[];
extern const size_t ftfy_ligature_count;
extern const struct ftfy_map ftfy_widths[];
extern const size_t ftfy_width_count;

/* Code points other than the lower-case ASCII letter itself that the split pattern's
 * literals accept for it under IGNORECASE (0-padded). */
extern const uint32_t tok_letter_equiv[26][3];

#endif
