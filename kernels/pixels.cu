// Decoder output to 8-bit RGB: [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], in one pass.
//
// Torch twin: engine.renderer.to_pixels, ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(uint8) then
// permuted to NHWC. The float32 arithmetic here follows it operation by operation (x / 2 is exact; rintf
// rounds half to even like torch.round), so float32 input gives bit-identical bytes; build without FMA
// contraction. No #include, so the file builds with NVRTC and with `nvcc -c` alike.

#define DTYPE_F32 0
#define DTYPE_F16 1
#define DTYPE_BF16 2

__device__ __forceinline__ float load_value(const void* base, long long i, int dtype) {
    if (dtype == DTYPE_F16) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(static_cast<const unsigned short*>(base)[i]));
        return f;
    }
    if (dtype == DTYPE_BF16) {
        return __uint_as_float(static_cast<unsigned int>(static_cast<const unsigned short*>(base)[i]) << 16);
    }
    return static_cast<const float*>(base)[i];
}

// One thread per pixel (grid-stride loop): three channel reads, each coalesced across the warp.
//   image: [B, 3, H, W] contiguous, of `dtype`; out: uint8 [B, H, W, 3] contiguous; hw = H * W.
extern "C" __global__ void to_pixels(const void* __restrict__ image, unsigned char* __restrict__ out, int dtype,
                                     int batch, int hw) {
    const long long npix = static_cast<long long>(batch) * hw;
    for (long long pix = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; pix < npix;
         pix += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long b = pix / hw;
        const long long src = b * 3 * hw + (pix - b * hw);
        for (int c = 0; c < 3; ++c) {
            float v = load_value(image, src + c * static_cast<long long>(hw), dtype) / 2.0f + 0.5f;
            // fmaxf first: a NaN input becomes 0 instead of an undefined float to uint8 conversion.
            v = fminf(fmaxf(v, 0.0f), 1.0f);
            out[pix * 3 + c] = static_cast<unsigned char>(rintf(v * 255.0f));
        }
    }
}
