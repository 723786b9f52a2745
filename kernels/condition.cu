// Fused conditioning image: raster buffers + neural textures -> the ControlNet's input, in one pass.
//
// Torch twin: engine.conditioning.build_condition. Channel order (shared/design/model.md):
//   depth (1), canonical xyz (3), normals (3), [ambient (2)], plane features (x,y) (x,z) (y,z) (C each),
//   [ambient-map features (C)]; the bracketed groups only when dims == 5.
// Plain CUDA C++ with no #include at all, so that the same file builds with NVRTC at run time (which
// has no include path) and with `nvcc -c` in CI. Half conversions therefore use inline PTX, the same
// instructions cuda_fp16.hpp emits.

#define DTYPE_F32 0
#define DTYPE_F16 1
#define DTYPE_BF16 2

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// The dtype is uniform across the grid, so this branch costs no divergence.
__device__ __forceinline__ float load_texel(const void* base, long long i, int dtype) {
    if (dtype == DTYPE_F16) return half_to_float(static_cast<const unsigned short*>(base)[i]);
    if (dtype == DTYPE_BF16) {
        return __uint_as_float(static_cast<unsigned int>(static_cast<const unsigned short*>(base)[i]) << 16);
    }
    return static_cast<const float*>(base)[i];
}

// Four texel offsets (without the channel term) and their bilinear weights.
struct Taps {
    long long o00, o01, o10, o11;  // (row, column): 0 = floor, 1 = the next texel, wrapped
    float w00, w01, w10, w11;
};

// Integer texel index of a floored coordinate, wrapped into [0, res).
__device__ __forceinline__ int wrap_index(float floored, int res) {
    int i = static_cast<int>(floored) % res;
    return i < 0 ? i + res : i;
}

// Bilinear taps with wrap addressing and texel centres at (i + 0.5) / res, the arithmetic of
// grid_sample(align_corners=False) on coordinates in [0, 1]: u selects the column, v the row.
__device__ __forceinline__ Taps wrap_taps(float u, float v, int res, long long sy, long long sx) {
    float x = u * static_cast<float>(res) - 0.5f;
    float y = v * static_cast<float>(res) - 0.5f;
    // Garbage coordinates (NaN, Inf, huge) must still address a texel inside the texture, since a float
    // to int conversion out of range is undefined; valid inputs are never this far out.
    if (!(fabsf(x) <= 1.0e7f)) x = 0.0f;
    if (!(fabsf(y) <= 1.0e7f)) y = 0.0f;
    const float xf = floorf(x), yf = floorf(y);
    const float tx = x - xf, ty = y - yf;
    const int x0 = wrap_index(xf, res), y0 = wrap_index(yf, res);
    const int x1 = x0 + 1 == res ? 0 : x0 + 1;
    const int y1 = y0 + 1 == res ? 0 : y0 + 1;
    Taps t;
    t.o00 = y0 * sy + x0 * sx;
    t.o01 = y0 * sy + x1 * sx;
    t.o10 = y1 * sy + x0 * sx;
    t.o11 = y1 * sy + x1 * sx;
    t.w00 = (1.0f - tx) * (1.0f - ty);
    t.w01 = tx * (1.0f - ty);
    t.w10 = (1.0f - tx) * ty;
    t.w11 = tx * ty;
    return t;
}

// Writes one pixel's conditioning vector; `ch` walks the channels in layout order.
struct Writer {
    unsigned short* out;
    long long base, stride;
    int ch;
    __device__ __forceinline__ void put(float v) { out[base + (ch++) * stride] = float_to_half(v); }
};

// Looks up `channels` features at (u, v) and writes them; zeros when the pixel is off the mesh.
__device__ __forceinline__ void write_features(Writer& w, bool on, float u, float v, const void* tex, int dtype,
                                               int channels, int res, long long sc, long long sy, long long sx) {
    if (!on) {
        for (int c = 0; c < channels; ++c) w.put(0.0f);
        return;
    }
    const Taps t = wrap_taps(u, v, res, sy, sx);
    for (int c = 0; c < channels; ++c) {
        const long long o = c * sc;
        // Same order as grid_sample: nw, ne, sw, se.
        float f = load_texel(tex, o + t.o00, dtype) * t.w00;
        f += load_texel(tex, o + t.o01, dtype) * t.w01;
        f += load_texel(tex, o + t.o10, dtype) * t.w10;
        f += load_texel(tex, o + t.o11, dtype) * t.w11;
        w.put(f);
    }
}

// One thread per pixel (grid-stride loop).
//   mask, depth [B, H, W, 1]; canonical [B, H, W, dims]; normals [B, H, W, 3]: float32, contiguous.
//   planes: 3 feature planes of [channels, res, res], element strides plane_s{p,c,y,x}; ambient: one
//   [channels, res, res] map, strides amb_s{c,y,x} (unused unless dims == 5). Both of tex_dtype.
//   out: half, [B, H, W, Ctot] when channels_last, else [B, Ctot, H, W]; Ctot = 7 + 3C (+ 2 + C).
//   Ranges: depth in [0, depth_max]; canonical xyz in [cmin, cmax]; ambient in [amin, amax].
extern "C" __global__ void build_condition(
    const float* __restrict__ mask, const float* __restrict__ depth, const float* __restrict__ canonical,
    const float* __restrict__ normals, const void* __restrict__ planes, const void* __restrict__ ambient,
    unsigned short* __restrict__ out, int batch, int hw, int dims, int channels, int res, int tex_dtype,
    long long plane_sp, long long plane_sc, long long plane_sy, long long plane_sx, long long amb_sc,
    long long amb_sy, long long amb_sx, int channels_last, float depth_max, float cmin0, float cmin1,
    float cmin2, float cmax0, float cmax1, float cmax2, float amin0, float amin1, float amax0, float amax1) {
    const bool amb = dims == 5;
    const int total = 7 + 3 * channels + (amb ? 2 + channels : 0);
    const long long npix = static_cast<long long>(batch) * hw;
    for (long long pix = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; pix < npix;
         pix += static_cast<long long>(gridDim.x) * blockDim.x) {
        Writer w;
        w.out = out;
        w.ch = 0;
        if (channels_last) {
            w.base = pix * total;
            w.stride = 1;
        } else {
            const long long b = pix / hw;
            w.base = b * total * hw + (pix - b * hw);
            w.stride = hw;
        }
        const bool on = mask[pix] > 0.5f;
        const float* cn = canonical + pix * dims;
        const float* nr = normals + pix * 3;

        w.put(on ? depth[pix] / depth_max * 2.0f - 1.0f : -1.0f);
        // Normalised [0, 1] coordinates: written as x*2-1 and used, unclamped, as texture addresses.
        float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, a0 = 0.0f, a1 = 0.0f;
        if (on) {
            t0 = (cn[0] - cmin0) / (cmax0 - cmin0);
            t1 = (cn[1] - cmin1) / (cmax1 - cmin1);
            t2 = (cn[2] - cmin2) / (cmax2 - cmin2);
            if (amb) {
                a0 = (cn[3] - amin0) / (amax0 - amin0);
                a1 = (cn[4] - amin1) / (amax1 - amin1);
            }
        }
        w.put(on ? t0 * 2.0f - 1.0f : -1.0f);
        w.put(on ? t1 * 2.0f - 1.0f : -1.0f);
        w.put(on ? t2 * 2.0f - 1.0f : -1.0f);
        w.put(on ? nr[0] : 0.0f);
        w.put(on ? nr[1] : 0.0f);
        w.put(on ? nr[2] : 0.0f);
        if (amb) {
            w.put(on ? a0 * 2.0f - 1.0f : -1.0f);
            w.put(on ? a1 * 2.0f - 1.0f : -1.0f);
        }
        const char* p = static_cast<const char*>(planes);
        const long long pbytes = plane_sp * (tex_dtype == DTYPE_F32 ? 4 : 2);
        write_features(w, on, t0, t1, p, tex_dtype, channels, res, plane_sc, plane_sy, plane_sx);
        write_features(w, on, t0, t2, p + pbytes, tex_dtype, channels, res, plane_sc, plane_sy, plane_sx);
        write_features(w, on, t1, t2, p + 2 * pbytes, tex_dtype, channels, res, plane_sc, plane_sy, plane_sx);
        if (amb) write_features(w, on, a0, a1, ambient, tex_dtype, channels, res, amb_sc, amb_sy, amb_sx);
    }
}
