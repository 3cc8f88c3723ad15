// The LPD residual x - lpd(x) as CUDA kernels, and the same math as host C functions.
//
// One source, three compilers:
//   - NVRTC or nvcc (__CUDACC__ defined): the __global__ kernels below (extern "C", unmangled names).
//   - g++ -x c++ -DFERRET_HOST_BUILD: host C functions that run the SAME __host__ __device__
//     per-pixel and per-block code on the CPU, so CPU tests exercise the kernels' math and tiling.
//
// Variants and numbering follow ferret_runtime.lpd_spec.LPD_SPECS (tests parse the enum below).
// Every value is reduced in float32: float16 kernels convert on load and round once on store.
// The median-of-9 network is written out by hand and CHECKED (not generated): the test parses the
// FERRET_CX lines between the BEGIN/END markers and compares them with lpd_spec.MEDIAN9_NETWORK.
// fminf/fmaxf return the non-NaN operand, so a NaN pixel does not propagate as torch.minimum would.

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#define FERRET_UNROLL
#include <math.h>
#include <stdlib.h>
#else
#define FERRET_UNROLL _Pragma("unroll")
#endif

// Each thread computes FERRET_ROWS_PER_THREAD output rows, blockDim.y apart, so a block of
// (bx, by) threads covers a bx x (by * FERRET_ROWS_PER_THREAD) output tile. launch.py mirrors this.
#define FERRET_ROWS_PER_THREAD 2
#define FERRET_MAX_THREADS 256

// The order of lpd_spec.LPD_SPECS.
enum {
    FERRET_LPD_MEDIAN = 0,
    FERRET_LPD_EXCMED = 1,
    FERRET_LPD_RETMED = 2,
    FERRET_LPD_MIN = 3,
    FERRET_LPD_MAX = 4,
    FERRET_LPD_AVG = 5,
};

__host__ __device__ __forceinline__ float ferret_inf() {
#ifdef __CUDACC__
    return __int_as_float(0x7f800000);
#else
    return HUGE_VALF;
#endif
}

// ---------------------------------------------------------------------------------------------
// Per-pixel math: shared by kernels and host functions.
// ---------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ void ferret_cx(float& a, float& b) {
    const float lo = fminf(a, b);
    b = fmaxf(a, b);
    a = lo;
}

// The 19-exchange median-of-9 network (Paeth; Devillard's opt_med9) on registers. The compiler
// drops the min or max an exchange computes but nobody reads (lpd_spec.prune_network: 30 of 38).
__host__ __device__ __forceinline__ float ferret_median9(const float* in) {
    float v[9];
    FERRET_UNROLL
    for (int i = 0; i < 9; ++i) v[i] = in[i];
#define FERRET_CX(i, j) ferret_cx(v[i], v[j])
    // BEGIN MEDIAN9_NETWORK
    FERRET_CX(1, 2); FERRET_CX(4, 5); FERRET_CX(7, 8);
    FERRET_CX(0, 1); FERRET_CX(3, 4); FERRET_CX(6, 7);
    FERRET_CX(1, 2); FERRET_CX(4, 5); FERRET_CX(7, 8);
    FERRET_CX(0, 3); FERRET_CX(5, 8); FERRET_CX(4, 7);
    FERRET_CX(3, 6); FERRET_CX(1, 4); FERRET_CX(2, 5);
    FERRET_CX(4, 7); FERRET_CX(4, 2); FERRET_CX(6, 4);
    FERRET_CX(4, 2);
    // END MEDIAN9_NETWORK
#undef FERRET_CX
    return v[4];  // MEDIAN9_OUTPUT
}

// The median (rank (N-1)/2) of N = 2m+1 values by forgetful selection: of any m+2 of the values,
// the smallest and the largest cannot be the median of all N, so find both, drop them, take in the
// next value, and repeat on m+1 values; m steps leave the median. Only compare-exchanges at
// compile-time positions: a selection network, exact with ties (0-1 principle), fully unrolled so
// the window stays in registers. m^2 + 2m compare-exchanges (168 for 5x5, 624 for 7x7) where
// counting each value's rank would take 2 N^2 comparisons, and nvcc builds it in seconds.
template <int N>
__host__ __device__ __forceinline__ float ferret_forgetful_median(float* v) {
    const int m = (N - 1) / 2;
    FERRET_UNROLL
    for (int t = 0; t < m; ++t) {  // the working set is v[t .. m+1]
        FERRET_UNROLL
        for (int i = t + 1; i <= m + 1; ++i) ferret_cx(v[t], v[i]);  // its minimum to v[t]
        FERRET_UNROLL
        for (int i = t + 1; i <= m; ++i) ferret_cx(v[i], v[m + 1]);  // its maximum to v[m+1]
        if (t < m - 1) v[m + 1] = v[m + 2 + t];  // forget both, take in the next value
    }
    return v[m];
}

// Value of out-of-image pixels: min pads with +inf and max with -inf so padding never wins;
// the median family and avg pad with 0 as the original's F.pad.
__host__ __device__ __forceinline__ float ferret_pad_value(int variant) {
    if (variant == FERRET_LPD_MIN) return ferret_inf();
    if (variant == FERRET_LPD_MAX) return -ferret_inf();
    return 0.0f;
}

// Why the centre is masked: the reconstruction must predict a pixel from its neighbours only.
// "mask" variants replace it with the pad value (0 for median/avg, the neutral +-inf for min/max).
// excmed drops it: -inf sorts below every neighbour, so rank (K*K-1)/2 of the K*K values is the
// lower middle of the K*K-1 neighbours (as lpd_spec.median3x3_centre). retmed keeps it.
__host__ __device__ __forceinline__ float ferret_centre_value(int variant, float x) {
    if (variant == FERRET_LPD_EXCMED) return -ferret_inf();
    if (variant == FERRET_LPD_RETMED) return x;
    return ferret_pad_value(variant);
}

// lpd(x) for one pixel from its K x K window (row-major, centre at K*K/2, padding already applied).
template <int K>
__host__ __device__ __forceinline__ float ferret_reduce(float* v, int variant) {
    v[K * K / 2] = ferret_centre_value(variant, v[K * K / 2]);
    if (variant == FERRET_LPD_MIN || variant == FERRET_LPD_MAX) {
        float acc = v[0];
        FERRET_UNROLL
        for (int i = 1; i < K * K; ++i) acc = variant == FERRET_LPD_MIN ? fminf(acc, v[i]) : fmaxf(acc, v[i]);
        return acc;
    }
    if (variant == FERRET_LPD_AVG) {  // mean over all K*K (masked centre 0), in row-major order
        float acc = v[0];
        FERRET_UNROLL
        for (int i = 1; i < K * K; ++i) acc += v[i];
        return acc / (float)(K * K);
    }
    // rank (K*K-1)/2 of K*K values; for excmed that is the lower middle of the K*K-1 neighbours
    if (K == 3) return ferret_median9(v);
    return ferret_forgetful_median<K * K>(v);
}

// ToTensor + Normalize in float32, in numpy's order: v / 255, minus mean, divided by std.
__host__ __device__ __forceinline__ float ferret_normalize(unsigned char v, float mean, float std) {
    return ((float)v / 255.0f - mean) / std;
}

__host__ __device__ __forceinline__ int ferret_valid_window(int k) { return k == 3 || k == 5 || k == 7; }
__host__ __device__ __forceinline__ int ferret_valid_variant(int v) { return v >= FERRET_LPD_MEDIAN && v <= FERRET_LPD_AVG; }

// ---------------------------------------------------------------------------------------------
// Storage types: float, and float16 as raw IEEE binary16 bits converted with PTX cvt (the same
// instructions cuda_fp16.h emits), so NVRTC needs no CUDA include directory.
// ---------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ float ferret_load(const float* p) { return *p; }
__host__ __device__ __forceinline__ void ferret_store(float* p, float v) { *p = v; }
#ifdef __CUDACC__
__device__ __forceinline__ float ferret_load(const unsigned short* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(*p));
    return f;
}
__device__ __forceinline__ void ferret_store(unsigned short* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    *p = h;
}
#endif

// ---------------------------------------------------------------------------------------------
// Per-block phases: a block loads its output tile plus a k/2 halo into shared memory (phase 1),
// then after a barrier each thread reduces its pixels' windows from there (phase 2). The kernels
// run them with __syncthreads between; the host emulator runs phase 1 for every thread of a block,
// then phase 2 for every thread, which is what the barrier guarantees.
// ---------------------------------------------------------------------------------------------

// Floats of shared memory one block needs: `channels` tiles of (by*ROWS + 2r) x (bx + 2r).
__host__ __device__ __forceinline__ int ferret_tile_w(int bx, int r) { return bx + 2 * r; }
__host__ __device__ __forceinline__ int ferret_tile_h(int by, int r) { return by * FERRET_ROWS_PER_THREAD + 2 * r; }
__host__ __device__ __forceinline__ long long ferret_tile_floats(int bx, int by, int r, int channels) {
    return (long long)ferret_tile_w(bx, r) * ferret_tile_h(by, r) * channels;
}

// Phase 1, one plane: tile[ly][lx] = plane[y0 - r + ly][x0 - r + lx], or `pad` outside the image.
// Consecutive threads read consecutive pixels of a row (coalesced).
template <class T>
__host__ __device__ __forceinline__ void ferret_load_tile(const T* plane, int H, int W, int x0, int y0, int r,
                                                          int tw, int th, float pad, float* tile, int tid,
                                                          int nthreads) {
    for (int i = tid; i < tw * th; i += nthreads) {
        const int ly = i / tw, lx = i - ly * tw;
        const int gy = y0 - r + ly, gx = x0 - r + lx;
        tile[i] = (gy >= 0 && gy < H && gx >= 0 && gx < W) ? ferret_load(plane + (long long)gy * W + gx) : pad;
    }
}

// Phase 1 for preprocess: uint8 NHWC RGB -> three normalised float tiles; the halo outside the
// image is 0 in normalised space, as the LPD pads the normalised image (not the uint8 one).
__host__ __device__ __forceinline__ void ferret_load_rgb_tile(const unsigned char* image, int H, int W, int x0,
                                                              int y0, const float* mean, const float* std, int tw,
                                                              int th, float* tile, int tid, int nthreads) {
    for (int i = tid; i < tw * th; i += nthreads) {
        const int ly = i / tw, lx = i - ly * tw;
        const int gy = y0 - 1 + ly, gx = x0 - 1 + lx;
        const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
        const long long at = inside ? ((long long)gy * W + gx) * 3 : 0;
        for (int c = 0; c < 3; ++c) tile[c * tw * th + i] = inside ? ferret_normalize(image[at + c], mean[c], std[c]) : 0.0f;
    }
}

// Phase 2: thread (tx, ty) of a (bx, by) block writes rows ty, ty + by, ... of the tile; residual
// selects x - lpd(x) (what the network sees) or lpd(x) itself (the LPD module's output).
template <int K, class T>
__host__ __device__ __forceinline__ void ferret_tile_outputs(const float* tile, int tw, T* out_plane, int H, int W,
                                                             int x0, int y0, int tx, int ty, int by, int variant,
                                                             int residual) {
    FERRET_UNROLL
    for (int j = 0; j < FERRET_ROWS_PER_THREAD; ++j) {
        const int ly = ty + j * by, gy = y0 + ly, gx = x0 + tx;
        if (gy >= H || gx >= W) continue;  // no early return: the caller's barrier follows
        float v[K * K];
        FERRET_UNROLL
        for (int dy = 0; dy < K; ++dy) {
            FERRET_UNROLL
            for (int dx = 0; dx < K; ++dx) v[dy * K + dx] = tile[(ly + dy) * tw + tx + dx];
        }
        const float x = v[K * K / 2];
        const float rec = ferret_reduce<K>(v, variant);
        ferret_store(out_plane + (long long)gy * W + gx, residual ? x - rec : rec);
    }
}

template <class T>
__host__ __device__ __forceinline__ void ferret_tile_outputs_k(int k, const float* tile, int tw, T* out_plane, int H,
                                                               int W, int x0, int y0, int tx, int ty, int by,
                                                               int variant, int residual) {
    if (k == 3) ferret_tile_outputs<3>(tile, tw, out_plane, H, W, x0, y0, tx, ty, by, variant, residual);
    else if (k == 5) ferret_tile_outputs<5>(tile, tw, out_plane, H, W, x0, y0, tx, ty, by, variant, residual);
    else if (k == 7) ferret_tile_outputs<7>(tile, tw, out_plane, H, W, x0, y0, tx, ty, by, variant, residual);
}

// Plain normalisation (for graphs that compute the LPD themselves): thread (tx, ty) of a (bx, by)
// block writes rows ty, ty + by, ... of its tile, three channels per pixel; no shared memory.
template <class T>
__host__ __device__ __forceinline__ void ferret_normalize_outputs(const unsigned char* image, T* out, int H, int W,
                                                                  int x0, int y0, int tx, int ty, int by,
                                                                  const float* mean, const float* std) {
    const long long plane_size = (long long)H * W;
    FERRET_UNROLL
    for (int j = 0; j < FERRET_ROWS_PER_THREAD; ++j) {
        const int gy = y0 + ty + j * by, gx = x0 + tx;
        if (gy >= H || gx >= W) continue;
        const long long at = (long long)gy * W + gx;
        FERRET_UNROLL
        for (int c = 0; c < 3; ++c) ferret_store(out + c * plane_size + at, ferret_normalize(image[at * 3 + c], mean[c], std[c]));
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels. Grid: x over column tiles, y over row tiles, z over planes (n, c) with a grid-stride
// loop, so gridDim.z may be capped at 65535. Block: at most FERRET_MAX_THREADS threads, z = 1.
// Dynamic shared memory: ferret_tile_floats(...) * 4 bytes (launch.py computes the same).
// ---------------------------------------------------------------------------------------------
#ifdef __CUDACC__

template <class T>
__device__ __forceinline__ void ferret_lpd_kernel(const T* __restrict__ x, T* __restrict__ out, int N, int C, int H,
                                                  int W, int k, int variant, int residual) {
    extern __shared__ float ferret_tile[];
    const int r = k / 2, tw = ferret_tile_w(blockDim.x, r), th = ferret_tile_h(blockDim.y, r);
    const int x0 = blockIdx.x * blockDim.x, y0 = blockIdx.y * blockDim.y * FERRET_ROWS_PER_THREAD;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    const float pad = ferret_pad_value(variant);
    const long long planes = (long long)N * C, plane_size = (long long)H * W;
    for (long long p = blockIdx.z; p < planes; p += gridDim.z) {
        ferret_load_tile(x + p * plane_size, H, W, x0, y0, r, tw, th, pad, ferret_tile, tid, nthreads);
        __syncthreads();
        ferret_tile_outputs_k(k, ferret_tile, tw, out + p * plane_size, H, W, x0, y0, threadIdx.x, threadIdx.y,
                              blockDim.y, variant, residual);
        __syncthreads();  // the next plane overwrites the tile
    }
}

// The paper's LPD (median, 3x3): k, variant and residual are constants, so the switch folds away.
template <class T>
__device__ __forceinline__ void ferret_median_residual_kernel(const T* __restrict__ x, T* __restrict__ out, int N,
                                                              int C, int H, int W) {
    extern __shared__ float ferret_tile[];
    const int tw = ferret_tile_w(blockDim.x, 1), th = ferret_tile_h(blockDim.y, 1);
    const int x0 = blockIdx.x * blockDim.x, y0 = blockIdx.y * blockDim.y * FERRET_ROWS_PER_THREAD;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    const long long planes = (long long)N * C, plane_size = (long long)H * W;
    for (long long p = blockIdx.z; p < planes; p += gridDim.z) {
        ferret_load_tile(x + p * plane_size, H, W, x0, y0, 1, tw, th, 0.0f, ferret_tile, tid, nthreads);
        __syncthreads();
        ferret_tile_outputs<3>(ferret_tile, tw, out + p * plane_size, H, W, x0, y0, threadIdx.x, threadIdx.y,
                               blockDim.y, FERRET_LPD_MEDIAN, 1);
        __syncthreads();
    }
}

// One block per (image, column tile, row tile) does all three channels: the uint8 pixels are
// read once, interleaved, and normalised into three shared tiles.
template <class T>
__device__ __forceinline__ void ferret_preprocess_kernel(const unsigned char* __restrict__ image, T* __restrict__ out,
                                                         int N, int H, int W, float m0, float m1, float m2, float s0,
                                                         float s1, float s2) {
    extern __shared__ float ferret_tile[];
    const float mean[3] = {m0, m1, m2}, std[3] = {s0, s1, s2};
    const int tw = ferret_tile_w(blockDim.x, 1), th = ferret_tile_h(blockDim.y, 1);
    const int x0 = blockIdx.x * blockDim.x, y0 = blockIdx.y * blockDim.y * FERRET_ROWS_PER_THREAD;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    const long long plane_size = (long long)H * W;
    for (long long n = blockIdx.z; n < N; n += gridDim.z) {
        ferret_load_rgb_tile(image + n * plane_size * 3, H, W, x0, y0, mean, std, tw, th, ferret_tile, tid, nthreads);
        __syncthreads();
        for (int c = 0; c < 3; ++c)
            ferret_tile_outputs<3>(ferret_tile + c * tw * th, tw, out + (n * 3 + c) * plane_size, H, W, x0, y0,
                                   threadIdx.x, threadIdx.y, blockDim.y, FERRET_LPD_MEDIAN, 1);
        __syncthreads();
    }
}

// uint8 NHWC -> normalised NCHW: the baseline preprocess_lpd is measured against, and the
// runtime's preprocessing when the graph contains the LPD.
template <class T>
__device__ __forceinline__ void ferret_normalize_kernel(const unsigned char* __restrict__ image, T* __restrict__ out,
                                                        int N, int H, int W, float m0, float m1, float m2, float s0,
                                                        float s1, float s2) {
    const float mean[3] = {m0, m1, m2}, std[3] = {s0, s1, s2};
    const int x0 = blockIdx.x * blockDim.x, y0 = blockIdx.y * blockDim.y * FERRET_ROWS_PER_THREAD;
    const long long plane_size = (long long)H * W;
    for (long long n = blockIdx.z; n < N; n += gridDim.z)
        ferret_normalize_outputs(image + n * plane_size * 3, out + n * 3 * plane_size, H, W, x0, y0, threadIdx.x,
                                 threadIdx.y, blockDim.y, mean, std);
}

#define FERRET_KERNEL extern "C" __global__ void __launch_bounds__(FERRET_MAX_THREADS)

FERRET_KERNEL lpd_residual_f32(const float* x, float* out, int N, int C, int H, int W) {
    ferret_median_residual_kernel(x, out, N, C, H, W);
}
FERRET_KERNEL lpd_residual_f16(const unsigned short* x, unsigned short* out, int N, int C, int H, int W) {
    ferret_median_residual_kernel(x, out, N, C, H, W);
}
FERRET_KERNEL lpd_generic_f32(const float* x, float* out, int N, int C, int H, int W, int k, int variant,
                              int residual) {
    ferret_lpd_kernel(x, out, N, C, H, W, k, variant, residual);
}
FERRET_KERNEL lpd_generic_f16(const unsigned short* x, unsigned short* out, int N, int C, int H, int W, int k,
                              int variant, int residual) {
    ferret_lpd_kernel(x, out, N, C, H, W, k, variant, residual);
}
FERRET_KERNEL preprocess_lpd_f32(const unsigned char* image, float* out, int N, int H, int W, float m0, float m1,
                                 float m2, float s0, float s1, float s2) {
    ferret_preprocess_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}
FERRET_KERNEL preprocess_lpd_f16(const unsigned char* image, unsigned short* out, int N, int H, int W, float m0,
                                 float m1, float m2, float s0, float s1, float s2) {
    ferret_preprocess_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}

FERRET_KERNEL normalize_f32(const unsigned char* image, float* out, int N, int H, int W, float m0, float m1, float m2,
                            float s0, float s1, float s2) {
    ferret_normalize_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}
FERRET_KERNEL normalize_f16(const unsigned char* image, unsigned short* out, int N, int H, int W, float m0, float m1,
                            float m2, float s0, float s1, float s2) {
    ferret_normalize_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}

#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------
// Host build: C entry points for ctypes. Return 0, or a FERRET_E* code (host.py names them).
// ---------------------------------------------------------------------------------------------
#ifdef FERRET_HOST_BUILD

enum {
    FERRET_OK = 0,
    FERRET_EWINDOW = 1,   // k not in {3, 5, 7}
    FERRET_EVARIANT = 2,  // variant not in the enum
    FERRET_EBLOCK = 3,    // block not (1..256 threads, z = 1) or a grid dimension < 1
    FERRET_ESHARED = 4,   // dynamic shared memory smaller than the block's tiles
    FERRET_ENOMEM = 5,
};

template <int K>
static void ferret_host_planes(const float* x, float* out, long long planes, int H, int W, int variant, int residual) {
    const int r = K / 2;
    const float pad = ferret_pad_value(variant);
    for (long long p = 0; p < planes; ++p) {
        const float* xp = x + p * H * W;
        for (int y = 0; y < H; ++y)
            for (int xx = 0; xx < W; ++xx) {
                float v[K * K];
                for (int dy = 0; dy < K; ++dy)
                    for (int dx = 0; dx < K; ++dx) {
                        const int gy = y + dy - r, gx = xx + dx - r;
                        v[dy * K + dx] = (gy >= 0 && gy < H && gx >= 0 && gx < W) ? xp[(long long)gy * W + gx] : pad;
                    }
                const float c = v[K * K / 2];
                const float rec = ferret_reduce<K>(v, variant);
                out[p * H * W + (long long)y * W + xx] = residual ? c - rec : rec;
            }
    }
}

static int ferret_host_lpd(const float* x, float* out, int N, int C, int H, int W, int k, int variant, int residual) {
    if (!ferret_valid_window(k)) return FERRET_EWINDOW;
    if (!ferret_valid_variant(variant)) return FERRET_EVARIANT;
    const long long planes = (long long)N * C;
    if (k == 3) ferret_host_planes<3>(x, out, planes, H, W, variant, residual);
    if (k == 5) ferret_host_planes<5>(x, out, planes, H, W, variant, residual);
    if (k == 7) ferret_host_planes<7>(x, out, planes, H, W, variant, residual);
    return FERRET_OK;
}

// Pixel by pixel (no tiles): the residual x - lpd(x), and the reconstruction lpd(x).
extern "C" int lpd_residual_host(const float* x, float* out, int N, int C, int H, int W, int k, int variant) {
    return ferret_host_lpd(x, out, N, C, H, W, k, variant, 1);
}
extern "C" int lpd_reconstruct_host(const float* x, float* out, int N, int C, int H, int W, int k, int variant) {
    return ferret_host_lpd(x, out, N, C, H, W, k, variant, 0);
}

// uint8 NHWC -> normalise -> median-LPD residual -> float32 NCHW, pixel by pixel.
extern "C" int preprocess_lpd_host(const unsigned char* image, float* out, int N, int H, int W, const float* mean,
                                   const float* std) {
    for (long long n = 0; n < N; ++n)
        for (int c = 0; c < 3; ++c)
            for (int y = 0; y < H; ++y)
                for (int xx = 0; xx < W; ++xx) {
                    float v[9];
                    for (int dy = 0; dy < 3; ++dy)
                        for (int dx = 0; dx < 3; ++dx) {
                            const int gy = y + dy - 1, gx = xx + dx - 1;
                            const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
                            const long long at = ((n * H + gy) * W + gx) * 3 + c;
                            v[dy * 3 + dx] = inside ? ferret_normalize(image[at], mean[c], std[c]) : 0.0f;
                        }
                    const float centre = v[4];
                    out[((n * 3 + c) * H + y) * W + xx] = centre - ferret_reduce<3>(v, FERRET_LPD_MEDIAN);
                }
    return FERRET_OK;
}

// ferret_reduce on n rows of k*k window values (row-major, centre at k*k/2): the selection code
// on its own, for exhaustive tests (0-1 principle, ties).
extern "C" int ferret_reduce_rows_host(const float* rows, float* out, long long n, int k, int variant) {
    if (!ferret_valid_window(k)) return FERRET_EWINDOW;
    if (!ferret_valid_variant(variant)) return FERRET_EVARIANT;
    for (long long i = 0; i < n; ++i) {
        float v[49];
        for (int j = 0; j < k * k; ++j) v[j] = rows[i * k * k + j];
        out[i] = k == 3 ? ferret_reduce<3>(v, variant) : k == 5 ? ferret_reduce<5>(v, variant) : ferret_reduce<7>(v, variant);
    }
    return FERRET_OK;
}

// Launch emulation: run a kernel's blocks on the CPU for a given grid, block and dynamic shared
// memory size, each block's phase 1 for all its threads, then phase 2 for all its threads (what
// __syncthreads guarantees), through the same phase functions the kernels call. Pixels the grid
// does not reach stay as they were, so a test that fills `out` with NaN sees any coverage gap.
static int ferret_check_launch(const int* grid, const int* block, long long need_floats, long long smem_bytes) {
    if (grid[0] < 1 || grid[1] < 1 || grid[2] < 1) return FERRET_EBLOCK;
    if (block[0] < 1 || block[1] < 1 || block[2] != 1 || block[0] * block[1] > FERRET_MAX_THREADS) return FERRET_EBLOCK;
    if (need_floats * (long long)sizeof(float) > smem_bytes) return FERRET_ESHARED;
    return FERRET_OK;
}

extern "C" int lpd_generic_emulate(const float* x, float* out, int N, int C, int H, int W, int k, int variant,
                                   int residual, const int* grid, const int* block, long long smem_bytes) {
    if (!ferret_valid_window(k)) return FERRET_EWINDOW;
    if (!ferret_valid_variant(variant)) return FERRET_EVARIANT;
    const int r = k / 2, bx = block[0], by = block[1];
    const int err = ferret_check_launch(grid, block, ferret_tile_floats(bx, by, r, 1), smem_bytes);
    if (err) return err;
    float* tile = (float*)malloc(smem_bytes);
    if (!tile) return FERRET_ENOMEM;
    const int tw = ferret_tile_w(bx, r), th = ferret_tile_h(by, r);
    const long long planes = (long long)N * C, plane_size = (long long)H * W;
    const float pad = ferret_pad_value(variant);
    for (int gz = 0; gz < grid[2]; ++gz)
        for (int gy = 0; gy < grid[1]; ++gy)
            for (int gx = 0; gx < grid[0]; ++gx) {
                const int x0 = gx * bx, y0 = gy * by * FERRET_ROWS_PER_THREAD;
                for (long long p = gz; p < planes; p += grid[2]) {
                    for (int tid = 0; tid < bx * by; ++tid)
                        ferret_load_tile(x + p * plane_size, H, W, x0, y0, r, tw, th, pad, tile, tid, bx * by);
                    for (int ty = 0; ty < by; ++ty)
                        for (int tx = 0; tx < bx; ++tx)
                            ferret_tile_outputs_k(k, tile, tw, out + p * plane_size, H, W, x0, y0, tx, ty, by,
                                                  variant, residual);
                }
            }
    free(tile);
    return FERRET_OK;
}

// lpd_residual_f32 is lpd_generic_f32 with k = 3, median, residual: the same phase functions.
extern "C" int lpd_residual_emulate(const float* x, float* out, int N, int C, int H, int W, const int* grid,
                                    const int* block, long long smem_bytes) {
    return lpd_generic_emulate(x, out, N, C, H, W, 3, FERRET_LPD_MEDIAN, 1, grid, block, smem_bytes);
}

extern "C" int preprocess_lpd_emulate(const unsigned char* image, float* out, int N, int H, int W, const float* mean,
                                      const float* std, const int* grid, const int* block, long long smem_bytes) {
    const int bx = block[0], by = block[1];
    const int err = ferret_check_launch(grid, block, ferret_tile_floats(bx, by, 1, 3), smem_bytes);
    if (err) return err;
    float* tile = (float*)malloc(smem_bytes);
    if (!tile) return FERRET_ENOMEM;
    const int tw = ferret_tile_w(bx, 1), th = ferret_tile_h(by, 1);
    const long long plane_size = (long long)H * W;
    for (int gz = 0; gz < grid[2]; ++gz)
        for (int gy = 0; gy < grid[1]; ++gy)
            for (int gx = 0; gx < grid[0]; ++gx) {
                const int x0 = gx * bx, y0 = gy * by * FERRET_ROWS_PER_THREAD;
                for (long long n = gz; n < N; n += grid[2]) {
                    for (int tid = 0; tid < bx * by; ++tid)
                        ferret_load_rgb_tile(image + n * plane_size * 3, H, W, x0, y0, mean, std, tw, th, tile, tid,
                                             bx * by);
                    for (int c = 0; c < 3; ++c)
                        for (int ty = 0; ty < by; ++ty)
                            for (int tx = 0; tx < bx; ++tx)
                                ferret_tile_outputs<3>(tile + c * tw * th, tw, out + (n * 3 + c) * plane_size, H, W,
                                                       x0, y0, tx, ty, by, FERRET_LPD_MEDIAN, 1);
                }
            }
    free(tile);
    return FERRET_OK;
}

extern "C" int normalize_emulate(const unsigned char* image, float* out, int N, int H, int W, const float* mean,
                                 const float* std, const int* grid, const int* block, long long smem_bytes) {
    const int err = ferret_check_launch(grid, block, 0, smem_bytes);
    if (err) return err;
    const int bx = block[0], by = block[1];
    const long long plane_size = (long long)H * W;
    for (int gz = 0; gz < grid[2]; ++gz)
        for (int gy = 0; gy < grid[1]; ++gy)
            for (int gx = 0; gx < grid[0]; ++gx)
                for (long long n = gz; n < N; n += grid[2])
                    for (int ty = 0; ty < by; ++ty)
                        for (int tx = 0; tx < bx; ++tx)
                            ferret_normalize_outputs(image + n * plane_size * 3, out + n * 3 * plane_size, H, W,
                                                     gx * bx, gy * by * FERRET_ROWS_PER_THREAD, tx, ty, by, mean, std);
    return FERRET_OK;
}

#endif  // FERRET_HOST_BUILD
