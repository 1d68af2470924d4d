/* Decode only the rows and columns of a JPEG that a crop needs, optionally at 1/2, 1/4, 1/8
 * scale: libjpeg-turbo's jpeg_crop_scanline and jpeg_skip_scanlines skip the IDCT and colour
 * conversion outside the crop, and decoding stops after its last row. */
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <setjmp.h>
#include <jpeglib.h>

struct error_mgr { struct jpeg_error_mgr pub; jmp_buf jump; };

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct error_mgr *)cinfo->err)->jump, 1);
}
static void no_message(j_common_ptr cinfo, int level) { (void)cinfo; (void)level; }

/* Crop (y, x, h, w) in full-scale pixels, decoded at 1/denom scale into out. dims gets: rows
 * written, pixels per row (the crop widened to whole iMCUs), the crop's first column in a row,
 * the crop's width. Returns 0, or -1 when libjpeg fails (the caller then decodes the whole image
 * its own way). */
int crop_decode(const uint8_t *src, uint64_t size, uint8_t *out, uint64_t out_size,
                int64_t y, int64_t x, int64_t h, int64_t w, int64_t denom, int64_t *dims) {
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = no_message;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, src, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    cinfo.dct_method = JDCT_IFAST;
    jpeg_start_decompress(&cinfo);
    int64_t ow = cinfo.output_width, oh = cinfo.output_height;
    int64_t ys = y / denom, xs = x / denom;
    int64_t hs = h / denom, ws = w / denom;
    if (ys >= oh) ys = oh - 1;
    if (xs >= ow) xs = ow - 1;
    if (hs < 1) hs = 1;
    if (ws < 1) ws = 1;
    if (ys + hs > oh) hs = oh - ys;
    if (xs + ws > ow) ws = ow - xs;
    JDIMENSION xoff = (JDIMENSION)xs, cw = (JDIMENSION)ws;
    jpeg_crop_scanline(&cinfo, &xoff, &cw);
    if ((uint64_t)hs * cw * 3 > out_size) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (ys > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)ys);
    for (int64_t r = 0; r < hs;) {
        JSAMPROW row = out + (uint64_t)r * cw * 3;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, &row, 1);
        if (got == 0) {   /* cannot happen with an in-memory source; never spin if it does */
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        r += got;
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    dims[0] = hs;
    dims[1] = cw;
    dims[2] = xs - xoff;
    dims[3] = ws;
    return 0;
}

/* An importable module only so that pip builds and installs this file; Python reaches
 * crop_decode through ctypes (pipeline/jpeg_crop.py), which numba can call from FFCV's pipeline. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_crop", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__jpeg_crop(void) { return PyModule_Create(&module); }
