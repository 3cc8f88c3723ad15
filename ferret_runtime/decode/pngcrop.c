/*
 * pngcrop.c: undo the PNG row filters of the top-left part of an image, as the PNG specification
 * (ISO/IEC 15948, section 9) defines them, and copy out a rectangle of the reconstructed bytes
 * (ferret_runtime/decode/png.py builds it with decode/cbuild.py and calls it through ctypes).
 *
 * Filters 0-4 reconstruct a byte from the byte bpp to its left (a), the byte above (b) and the byte
 * above-left (c), so rows [0, bottom) and the first `keep` bytes of each row are exact without any
 * byte to the right or below: the decoder never looks at the rest. Row 0's "above" is zeros, as in
 * the spec; the first bpp bytes of a row have a = c = 0.
 *
 * One function: fp_unfilter. Its return codes:
 *   0  done;
 *   1  a row's filter-type byte is not 0-4 (the caller leaves that file to Pillow);
 *   2  arguments out of range (sizes that do not fit the buffers);
 *   3  no memory for the two row buffers.
 */

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(_WIN32)
#define FP_EXPORT __declspec(dllexport)
#else
#define FP_EXPORT __attribute__((visibility("default")))
#endif

/* The Paeth predictor, without branches (noisy images make its choice unpredictable): a if
 * |p - a| <= |p - b| and |p - a| <= |p - c|, else b if |p - b| <= |p - c|, else c, with p = a + b - c. */
static inline int paeth(int a, int b, int c) {
  int pa = b - c, pb = a - c, pc, ma, mb;
  pc = pa + pb;
  pa = pa < 0 ? -pa : pa; /* |p - a| */
  pb = pb < 0 ? -pb : pb; /* |p - b| */
  pc = pc < 0 ? -pc : pc; /* |p - c| */
  mb = -(pb <= pc);                  /* all ones: b over c */
  ma = -((pa <= pb) & (pa <= pc));   /* all ones: a over both */
  return (a & ma) | (((b & mb) | (c & ~mb)) & ~ma);
}

#if defined(__SSE2__)
/* Paeth over whole pixels at once, one channel per 16-bit lane (bpp <= 8): the same predictor as paeth()
 * (libpng's SSE2 formulation: the smallest distance, ties to a, then b). Pixels are moved 8 bytes at a
 * time while 8 bytes remain in the row (the bytes past the pixel are rewritten by the next one, in order),
 * the last ones exactly. */
static inline __attribute__((always_inline)) __m128i paeth_px(__m128i a, __m128i b, __m128i c, __m128i d) {
  const __m128i zero = _mm_setzero_si128();
  __m128i pa = _mm_sub_epi16(b, c), pb = _mm_sub_epi16(a, c), pc, lo, pick;
  pc = _mm_add_epi16(pa, pb);
  pa = _mm_max_epi16(pa, _mm_sub_epi16(zero, pa));
  pb = _mm_max_epi16(pb, _mm_sub_epi16(zero, pb));
  pc = _mm_max_epi16(pc, _mm_sub_epi16(zero, pc));
  lo = _mm_min_epi16(pc, _mm_min_epi16(pa, pb));
  pick = _mm_cmpeq_epi16(lo, pb); /* b where pb is smallest, else c */
  pick = _mm_or_si128(_mm_and_si128(pick, b), _mm_andnot_si128(pick, c));
  lo = _mm_cmpeq_epi16(lo, pa); /* a where pa is smallest */
  pick = _mm_or_si128(_mm_and_si128(lo, a), _mm_andnot_si128(lo, pick));
  return _mm_and_si128(_mm_add_epi16(d, pick), _mm_set1_epi16(0xff));
}

static inline __attribute__((always_inline)) __m128i load8(const unsigned char *p, size_t len) {
  unsigned long long v = 0;
  memcpy(&v, p, len);
  return _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)v), _mm_setzero_si128());
}

static inline __attribute__((always_inline)) void store8(unsigned char *p, __m128i x, size_t len) {
  unsigned long long v = (unsigned long long)_mm_cvtsi128_si64(_mm_packus_epi16(x, x));
  memcpy(p, &v, len);
}

static inline __attribute__((always_inline)) void paeth_row_sse2(const unsigned char *f, const unsigned char *prev,
                                                                 unsigned char *cur, size_t n, size_t bpp) {
  __m128i a = _mm_setzero_si128(), c = a, b;
  size_t i = 0;
  for (; i + 8 <= n; i += bpp) {
    b = load8(prev + i, 8);
    a = paeth_px(a, b, c, load8(f + i, 8));
    c = b;
    store8(cur + i, a, 8);
  }
  for (; i < n; i += bpp) {
    b = load8(prev + i, bpp);
    a = paeth_px(a, b, c, load8(f + i, bpp));
    c = b;
    store8(cur + i, a, bpp);
  }
}
#endif

/* One row: cur[0..n) from the filtered bytes f[0..n) and the previous reconstructed row prev.
 * Inlined with a constant bpp at each call site below, so the per-pixel channel loops unroll and the
 * left (a) and upper-left (c) bytes of each channel stay in registers. n is a multiple of bpp. */
static inline __attribute__((always_inline)) int unfilter_row(int kind, const unsigned char *f,
                                                              const unsigned char *prev, unsigned char *cur,
                                                              size_t n, size_t bpp) {
  size_t i, k;
  unsigned a[8], c[8];
  switch (kind) {
  case 0:
    memcpy(cur, f, n);
    return 0;
  case 1: /* Sub */
    for (k = 0; k < bpp; k++) a[k] = cur[k] = f[k];
    for (i = bpp; i < n; i += bpp)
      for (k = 0; k < bpp; k++) a[k] = cur[i + k] = (unsigned char)(f[i + k] + a[k]);
    return 0;
  case 2: /* Up */
    for (i = 0; i < n; i++) cur[i] = (unsigned char)(f[i] + prev[i]);
    return 0;
  case 3: /* Average: floor((a + b) / 2), in ints so a + b does not wrap */
    for (k = 0; k < bpp; k++) a[k] = cur[k] = (unsigned char)(f[k] + (prev[k] >> 1));
    for (i = bpp; i < n; i += bpp)
      for (k = 0; k < bpp; k++) a[k] = cur[i + k] = (unsigned char)(f[i + k] + ((a[k] + prev[i + k]) >> 1));
    return 0;
  case 4: /* Paeth; with a = c = 0 the predictor is b */
#if defined(__SSE2__)
    if (bpp >= 3) {
      paeth_row_sse2(f, prev, cur, n, bpp);
      return 0;
    }
#endif
    for (k = 0; k < bpp; k++) {
      c[k] = prev[k];
      a[k] = cur[k] = (unsigned char)(f[k] + c[k]);
    }
    for (i = bpp; i < n; i += bpp)
      for (k = 0; k < bpp; k++) {
        unsigned b = prev[i + k];
        a[k] = cur[i + k] = (unsigned char)(f[i + k] + paeth((int)a[k], (int)b, (int)c[k]));
        c[k] = b;
      }
    return 0;
  default:
    return 1;
  }
}

#define FP_ROWS(BPP)                                                                                        \
  for (y = 0; y < rows; y++) {                                                                              \
    const unsigned char *line = raw + y * (stride + 1);                                                     \
    unsigned char *t;                                                                                       \
    if (unfilter_row(line[0], line + 1, prev, cur, keep, (BPP)) != 0) {                                      \
      code = 1;                                                                                             \
      break;                                                                                                \
    }                                                                                                       \
    if (y >= top) memcpy(out + (y - top) * out_bytes, cur + left_bytes, out_bytes);                        \
    t = prev;                                                                                               \
    prev = cur;                                                                                             \
    cur = t;                                                                                                \
  }

/*
 * raw: `rows` filtered rows as inflated from IDAT, each a filter-type byte and `stride` bytes (at least
 * rows * (stride + 1) bytes in raw_len); bpp: bytes per complete pixel (1 to 8); keep: bytes reconstructed
 * per row (the columns [0, right) of the crop, keep <= stride); rows [top, rows) are copied to out, bytes
 * [left_bytes, left_bytes + out_bytes) of each, packed (out_bytes apart).
 */
FP_EXPORT int fp_unfilter(const unsigned char *raw, size_t raw_len, size_t stride, size_t bpp, size_t rows,
                          size_t keep, size_t top, size_t left_bytes, size_t out_bytes, unsigned char *out) {
  unsigned char *buf, *prev, *cur;
  size_t y;
  int code = 0;
  if (bpp < 1 || bpp > 8 || keep < bpp || keep > stride || keep % bpp != 0 || top >= rows || left_bytes + out_bytes > keep ||
      out_bytes < 1 || rows > raw_len / (stride + 1))
    return 2;
  buf = (unsigned char *)calloc(2, keep);
  if (buf == NULL) return 3;
  prev = buf; /* row -1: zeros */
  cur = buf + keep;
  switch (bpp) {
  case 1: FP_ROWS(1) break;
  case 2: FP_ROWS(2) break;
  case 3: FP_ROWS(3) break;
  case 4: FP_ROWS(4) break;
  case 6: FP_ROWS(6) break;
  case 8: FP_ROWS(8) break;
  default: FP_ROWS(bpp) break;
  }
  free(buf);
  return code;
}
