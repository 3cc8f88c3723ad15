/*
 * jpegcrop.c: decode a rectangle of a JPEG with the libjpeg that Pillow loaded, bit-identical to
 * Pillow's full decode followed by the crop (ferret_runtime/decode/jpeg.py builds and calls it).
 *
 * The library is not linked: fj_init() dlopen()s the file Pillow mapped (RTLD_LOCAL) and looks up
 * the nine libjpeg API functions used here; jpeg_CreateDecompress's version and struct-size check
 * refuses a library whose ABI differs from the vendored headers (include/, libjpeg-turbo ABI 62).
 *
 * fj_decode() returns FJ_OK only when it can prove the pixels equal Pillow's:
 *   - fj_scan() first walks the markers of the first image: SOI, segments, one SOF0/1/2 (8-bit
 *     Huffman), scans, EOI. No EOI, junk between segments, an unknown or misplaced marker -> refused,
 *     so a truncated file keeps failing in Pillow, and (for a single-scan sequential file, whose
 *     tail is read by Pillow after our last row) no marker after our rows can make libjpeg error.
 *   - libjpeg is set up as Pillow sets it (defaults after jpeg_read_header: islow IDCT, fancy
 *     upsampling, block smoothing; out_color_space JCS_RGB, or JCS_GRAYSCALE replicated to RGB).
 *   - a larger region than asked (two iMCUs of margin each side where the image has them) is
 *     decoded with jpeg_crop_scanline / jpeg_skip_scanlines, so the edge handling of the cropped
 *     decode (upsampling context, block smoothing) never reaches the rows and columns copied out.
 *   - any libjpeg error or warning (corrupt data, premature end) up to our last row -> refused.
 * Pillow itself silences warnings (its output_message is empty); we only count them.
 *
 * Multi-scan files (progressive, or sequential with one scan per component): jpeg_start_decompress
 * entropy-decodes every scan of the whole image before the first row comes out. fj_decode() then hands
 * libjpeg a copy whose SOF height ends FJ_BOTTOM_IMCUS whole iMCU rows below the iMCU row holding the
 * row just under the region (the fancy upsampler's context row; libjpeg-turbo's 5x5 block smoothing
 * reads two block rows further; with two, a progressive file whose last scans are missing, so that its
 * blocks are smoothed, differs from Pillow's decode). Every scan stores its blocks (or MCUs) in raster
 * order over a width that does not change, so the blocks above the new bottom decode from the same
 * bits in the same order (same DC predictions, EOB runs, restart intervals); after the last one
 * libjpeg's next_marker() skips the rest of the scan to the next marker (RSTn there are parameterless
 * markers read_markers ignores), warning JWRN_EXTRANEOUS_DATA: that warning alone is tolerated in this
 * mode (counted), any other warning or error still refuses. The scan headers, tables and markers read
 * are the ones the full decode reads. What the full decode could see and we do not: an error raised by
 * the skipped entropy data itself; the only one libjpeg-turbo has is JERR_BAD_DCT_COEF (a DC
 * prediction overflowing an int, which takes ~65536 maximal DC steps: crafted files, not damage).
 */

#include <dlfcn.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jpeglib.h"

enum {
  FJ_OK = 0,
  FJ_NOT_READY = 1,   /* fj_init did not succeed */
  FJ_STRUCTURE = 2,   /* the marker walk refused the data (no EOI, unknown marker, ...) */
  FJ_UNSUPPORTED = 3, /* not 8-bit Huffman with 1 or 3 components */
  FJ_LIBJPEG_ERROR = 4,
  FJ_WARNING = 5,     /* libjpeg warned (corrupt or truncated data) */
  FJ_REGION = 6       /* the region is not inside the image */
};

#define FJ_MARGIN_IMCUS 2
#define FJ_BOTTOM_IMCUS 3
#define FJ_INFO_LEN 8

static struct {
  int ready;
  int extraneous_code; /* JWRN_EXTRANEOUS_DATA's code in this library's message table, -1 if not found */
  __typeof__(jpeg_std_error) *std_error;
  __typeof__(jpeg_CreateDecompress) *create;
  __typeof__(jpeg_destroy_decompress) *destroy;
  __typeof__(jpeg_mem_src) *mem_src;
  __typeof__(jpeg_read_header) *read_header;
  __typeof__(jpeg_start_decompress) *start;
  __typeof__(jpeg_crop_scanline) *crop;
  __typeof__(jpeg_skip_scanlines) *skip;
  __typeof__(jpeg_read_scanlines) *read;
} L;

struct fj_err {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int tolerate_extraneous; /* the shortened copy: JWRN_EXTRANEOUS_DATA is expected after each scan */
  int extraneous;          /* how many times it was tolerated */
};

static void fj_error_exit(j_common_ptr cinfo) {
  longjmp(((struct fj_err *)cinfo->err)->jump, 1);
}

static void fj_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* Trace messages are dropped; warnings are counted in num_warnings, except JWRN_EXTRANEOUS_DATA where
 * the shortened copy expects it. */
static void fj_emit_message(j_common_ptr cinfo, int msg_level) {
  struct fj_err *e = (struct fj_err *)cinfo->err;
  if (msg_level >= 0) return;
  if (e->tolerate_extraneous && L.extraneous_code >= 0 && e->pub.msg_code == L.extraneous_code) {
    e->extraneous++;
    return;
  }
  e->pub.num_warnings++;
}

static void fj_setup_err(struct fj_err *err) {
  L.std_error(&err->pub);
  err->pub.error_exit = fj_error_exit;
  err->pub.output_message = fj_output_message;
  err->pub.emit_message = fj_emit_message;
  err->tolerate_extraneous = 0;
  err->extraneous = 0;
}

/* 0 when the library at `path` is usable; else 1 and a one-line reason in msg. */
int fj_init(const char *path, char *msg, int msglen) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    snprintf(msg, msglen, "dlopen failed: %s", dlerror());
    return 1;
  }
#define FJ_SYM(field, name)                                                   \
  do {                                                                        \
    *(void **)(&L.field) = dlsym(h, name);                                    \
    if (!L.field) {                                                           \
      snprintf(msg, msglen, "%s has no %s (not libjpeg-turbo >= 1.5)", path, name); \
      return 1;                                                               \
    }                                                                         \
  } while (0)
  FJ_SYM(std_error, "jpeg_std_error");
  FJ_SYM(create, "jpeg_CreateDecompress");
  FJ_SYM(destroy, "jpeg_destroy_decompress");
  FJ_SYM(mem_src, "jpeg_mem_src");
  FJ_SYM(read_header, "jpeg_read_header");
  FJ_SYM(start, "jpeg_start_decompress");
  FJ_SYM(crop, "jpeg_crop_scanline");
  FJ_SYM(skip, "jpeg_skip_scanlines");
  FJ_SYM(read, "jpeg_read_scanlines");
#undef FJ_SYM
  {
    struct jpeg_decompress_struct cinfo;
    struct fj_err err;
    fj_setup_err(&err);
    cinfo.err = &err.pub;
    if (setjmp(err.jump)) {
      char text[JMSG_LENGTH_MAX];
      err.pub.format_message((j_common_ptr)&cinfo, text);
      snprintf(msg, msglen, "%s refused the headers' ABI (JPEG_LIB_VERSION %d, struct of %d bytes): %s",
               path, JPEG_LIB_VERSION, (int)sizeof(cinfo), text);
      return 1;
    }
    L.create(&cinfo, JPEG_LIB_VERSION, sizeof(cinfo));
    L.destroy(&cinfo);
    /* find the extraneous-data warning by its text (message codes are not part of the ABI) */
    L.extraneous_code = -1;
    for (int k = 0; k <= err.pub.last_jpeg_message; k++) {
      const char *t = err.pub.jpeg_message_table[k];
      if (t && strcmp(t, "Corrupt JPEG data: %u extraneous bytes before marker 0x%02x") == 0) {
        L.extraneous_code = k;
        break;
      }
    }
  }
  L.ready = 1;
  msg[0] = 0;
  return 0;
}

static unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

struct fj_layout {
  size_t end;        /* just past the first image's EOI */
  size_t sof_height; /* offset of the SOF's 2-byte height */
  unsigned height, width, imcu_rows; /* the SOF's sizes; iMCU height = 8 * largest vertical sampling */
  int sof, scans;    /* SOF marker code, number of SOS */
};

/* Walk the first image's markers. Returns FJ_OK and *lay, else FJ_STRUCTURE or FJ_UNSUPPORTED.
 * Strict on purpose: whatever it refuses goes to Pillow's full decode. */
int fj_scan(const unsigned char *d, size_t n, struct fj_layout *lay) {
  size_t i = 2;
  int sof = -1, ncomp = 0, scans = 0, single = 0;
  if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return FJ_STRUCTURE;
  for (;;) {
    unsigned m, len;
    if (i + 2 > n || d[i] != 0xFF) return FJ_STRUCTURE; /* junk between segments: libjpeg warns */
    while (i + 1 < n && d[i + 1] == 0xFF) i++;         /* fill bytes */
    if (i + 2 > n) return FJ_STRUCTURE;
    m = d[i + 1];
    i += 2;
    if (m == 0xD9) {                                     /* EOI */
      if (scans == 0) return FJ_STRUCTURE;
      lay->end = i;
      lay->sof = sof;
      lay->scans = scans;
      return FJ_OK;
    }
    /* libjpeg reads DHT, DQT, DRI, DAC, APPn, COM and SOF0-3/9-11; it errors on the other codes */
    if (!(m == 0xC4 || m == 0xDB || m == 0xDD || m == 0xCC || (m >= 0xE0 && m <= 0xEF) || m == 0xFE ||
          m == 0xDA || (m >= 0xC0 && m <= 0xC3) || (m >= 0xC9 && m <= 0xCB)))
      return FJ_STRUCTURE;
    if (i + 2 > n) return FJ_STRUCTURE;
    len = be16(d + i);
    if (len < 2 || i + len > n) return FJ_STRUCTURE;
    if ((m >= 0xC0 && m <= 0xC3) || (m >= 0xC9 && m <= 0xCB)) { /* SOFn */
      if (sof >= 0 || scans) return FJ_STRUCTURE;
      sof = (int)m;
      if (m != 0xC0 && m != 0xC1 && m != 0xC2) return FJ_UNSUPPORTED;
      if (len < 8) return FJ_STRUCTURE;
      ncomp = d[i + 7];
      if (len < 8 + 3 * (unsigned)ncomp) return FJ_STRUCTURE;
      lay->sof_height = i + 3;
      lay->height = be16(d + i + 3);
      lay->width = be16(d + i + 5);
      lay->imcu_rows = 0;
      for (int k = 0; k < ncomp; k++) {
        unsigned v = d[i + 9 + 3 * k] & 15;
        if (v > lay->imcu_rows) lay->imcu_rows = v;
      }
      lay->imcu_rows *= DCTSIZE;
    } else if (m == 0xDA) {                              /* SOS, then entropy-coded data */
      if (sof < 0 || len < 3) return FJ_STRUCTURE;
      /* a sequential scan of all components is the only scan: nothing but EOI may follow it */
      if (scans && single) return FJ_STRUCTURE;
      single = (sof != 0xC2 && d[i + 2] == ncomp);
      scans++;
      i += len;
      for (;;) {
        const unsigned char *ff = memchr(d + i, 0xFF, n - i);
        size_t j;
        if (!ff) return FJ_STRUCTURE;
        j = (size_t)(ff - d);
        while (j + 1 < n && d[j + 1] == 0xFF) j++;
        if (j + 1 >= n) return FJ_STRUCTURE;
        if (d[j + 1] == 0x00 || (d[j + 1] >= 0xD0 && d[j + 1] <= 0xD7)) {
          i = j + 2;
          continue;
        }
        i = j;
        break;
      }
      if (single && be16(d + i) != 0xFFD9) return FJ_STRUCTURE;
      continue;
    } else if (scans && single) {
      return FJ_STRUCTURE;
    }
    /* DHT, DQT, DRI, DAC, APPn, COM: a segment libjpeg reads or skips */
    i += len;
  }
}

/* The SOF height of the shortened copy for a region ending at row y1 (exclusive), or 0 when the
 * copy would not be shorter than the image (see the file comment for the margin). */
static unsigned fj_short_height(const struct fj_layout *lay, unsigned y1) {
  unsigned m = lay->imcu_rows;
  unsigned long h;
  if (m == 0 || lay->height == 0) return 0;
  h = ((unsigned long)y1 / m + FJ_BOTTOM_IMCUS) * m; /* iMCU row of row y1, then FJ_BOTTOM_IMCUS more */
  return h < lay->height ? (unsigned)h : 0;
}

/* Decode rows [top, top+height) x columns [left, left+width) into out (height*width*3 bytes, RGB).
 * shorten: allow the shortened copy for multi-scan files (0: always the whole height).
 * info (FJ_INFO_LEN ints, may be NULL) gets image width, height, components, progressive, the decoded
 * region's x offset and width (after libjpeg's iMCU alignment and the margins), the SOF height
 * libjpeg was given, and the number of JWRN_EXTRANEOUS_DATA warnings tolerated. */
int fj_decode(const unsigned char *data, size_t size, int left, int top, int width, int height, int shorten,
              unsigned char *out, int *info) {
  struct jpeg_decompress_struct cinfo;
  struct fj_err err;
  struct fj_layout lay;
  volatile unsigned short_h = 0; /* set before setjmp, read after: keep it in memory */
  unsigned char *volatile copy = NULL;
  int code;
  volatile int stage = 0;

  if (!L.ready) return FJ_NOT_READY;
  if (left < 0 || top < 0 || width < 1 || height < 1) return FJ_REGION;
  memset(&lay, 0, sizeof(lay));
  code = fj_scan(data, size, &lay);
  if (code != FJ_OK) return code;
  if (info) memset(info, 0, FJ_INFO_LEN * sizeof(int));

  /* Multi-scan files only: a single-scan sequential one already stops after the region's last row. */
  if (shorten && L.extraneous_code >= 0 && (lay.sof == 0xC2 || lay.scans > 1) &&
      (unsigned)top + (unsigned)height <= lay.height)
    short_h = fj_short_height(&lay, (unsigned)top + (unsigned)height);
  if (short_h) {
    copy = (unsigned char *)malloc(lay.end);
    if (!copy) short_h = 0;
  }
  if (short_h) {
    memcpy(copy, data, lay.end);
    copy[lay.sof_height] = (unsigned char)(short_h >> 8);
    copy[lay.sof_height + 1] = (unsigned char)(short_h & 0xFF);
  }

  fj_setup_err(&err);
  err.tolerate_extraneous = short_h != 0;
  cinfo.err = &err.pub;
  if (setjmp(err.jump)) {
    if (stage) L.destroy(&cinfo);
    free(copy);
    return FJ_LIBJPEG_ERROR;
  }
  L.create(&cinfo, JPEG_LIB_VERSION, sizeof(cinfo));
  stage = 1;
  L.mem_src(&cinfo, short_h ? copy : data, (unsigned long)lay.end);
  if (L.read_header(&cinfo, TRUE) != JPEG_HEADER_OK) {
    code = FJ_STRUCTURE;
    goto done;
  }
  if (info) {
    info[0] = (int)cinfo.image_width;
    info[1] = (int)lay.height;
    info[2] = cinfo.num_components;
    info[3] = cinfo.progressive_mode;
    info[6] = (int)cinfo.image_height;
  }
  if (short_h && (cinfo.image_height != short_h || cinfo.image_width != lay.width ||
                  (unsigned)(cinfo.max_v_samp_factor * DCTSIZE) != lay.imcu_rows)) {
    code = FJ_UNSUPPORTED; /* libjpeg sees the header differently from fj_scan: do not guess */
    goto done;
  }
  if (cinfo.data_precision != 8 || (cinfo.num_components != 1 && cinfo.num_components != 3) ||
      cinfo.arith_code) {
    code = FJ_UNSUPPORTED;
    goto done;
  }
  if ((JDIMENSION)left + (JDIMENSION)width > cinfo.image_width ||
      (JDIMENSION)top + (JDIMENSION)height > cinfo.image_height) {
    code = FJ_REGION;
    goto done;
  }
  if (err.pub.num_warnings) {
    code = FJ_WARNING;
    goto done;
  }
  /* Pillow's settings for rawmode "RGB" / "L": libjpeg's defaults otherwise */
  cinfo.out_color_space = cinfo.num_components == 3 ? JCS_RGB : JCS_GRAYSCALE;
  L.start(&cinfo);
  if (cinfo.output_width != cinfo.image_width || cinfo.output_height != cinfo.image_height ||
      cinfo.output_components != cinfo.num_components || cinfo.quantize_colors) {
    code = FJ_UNSUPPORTED;
    goto done;
  }
  {
    int mx = FJ_MARGIN_IMCUS * DCTSIZE * cinfo.max_h_samp_factor;
    int my = FJ_MARGIN_IMCUS * DCTSIZE * cinfo.max_v_samp_factor;
    int W = (int)cinfo.image_width;
    int x0 = left - mx < 0 ? 0 : left - mx;
    int x1 = left + width + mx > W ? W : left + width + mx;
    int y0 = top - my < 0 ? 0 : top - my;
    int y1 = top + height, y, c = cinfo.output_components, dx;
    JDIMENSION xoff = (JDIMENSION)x0, cw = (JDIMENSION)(x1 - x0);
    JSAMPARRAY row;

    y0 -= y0 % (DCTSIZE * cinfo.max_v_samp_factor); /* skip whole iMCU rows, decode (and drop) the margin */
    if (x0 > 0 || x1 < W) L.crop(&cinfo, &xoff, &cw);
    if ((int)xoff > left || (int)(xoff + cw) < left + width) {
      code = FJ_REGION;
      goto done;
    }
    if (info) {
      info[4] = (int)xoff;
      info[5] = (int)cinfo.output_width;
    }
    dx = left - (int)xoff;
    row = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                     cinfo.output_width * (JDIMENSION)c, 1);
    if (y0 > 0 && L.skip(&cinfo, (JDIMENSION)y0) != (JDIMENSION)y0) {
      code = FJ_LIBJPEG_ERROR;
      goto done;
    }
    for (y = y0; y < y1; y++) {
      if (L.read(&cinfo, row, 1) != 1) {
        code = FJ_LIBJPEG_ERROR;
        goto done;
      }
      if (y < top) continue;
      if (c == 3) {
        memcpy(out + (size_t)(y - top) * width * 3, row[0] + (size_t)dx * 3, (size_t)width * 3);
      } else {
        unsigned char *o = out + (size_t)(y - top) * width * 3;
        const unsigned char *s = row[0] + dx;
        int x;
        for (x = 0; x < width; x++, o += 3) o[0] = o[1] = o[2] = s[x];
      }
    }
  }
  code = err.pub.num_warnings ? FJ_WARNING : FJ_OK;
done:
  if (info) info[7] = err.extraneous;
  L.destroy(&cinfo);
  free(copy);
  return code;
}
