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
// Min and max are the device's (FMNMX, PTX min/max): the non-NaN operand wins, so a NaN pixel does not
// propagate as torch.minimum would, and -0 orders below +0 (ferret_fmin; the host build does the same).
// float16 is raw binary16 bits converted by single PTX instructions, which the host build implements bit
// for bit, so the lane order of every pack, store and load around them runs, and is tested, on the CPU.
//
// Building part of it (cold start: NVRTC takes seconds for every kernel, milliseconds for one):
//   -DFERRET_ONLY -DFERRET_WANT_<kernel>   only the named extern "C" kernels (launch.py, trt_plugin.py)
//   -DFERRET_WINDOW=k                      lpd_generic for one window size k only (3, 5 or 7), so a 3x3
//                                          variant does not carry the 7x7 network's registers and code
//
// Architectures: sm_75 (Turing) and newer, every one NVRTC 13 builds for. Instructions that need sm_80
// (cvt.rn.f16x2.f32, min/max.f16x2) sit behind __CUDA_ARCH__ >= FERRET_F16X2_ARCH * 10 with a fallback
// that gives the same bits; PTX for compute_75 (the TensorRT plugin) takes the fallback, so it JIT-compiles
// for any GPU.

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#define FERRET_UNROLL
#include <math.h>
#include <stdlib.h>
#include <string.h>
#else
#define FERRET_UNROLL _Pragma("unroll")
#endif

// The first architecture with the packed float16 instructions (cvt.rn.f16x2.f32, min.f16x2, max.f16x2).
#define FERRET_F16X2_ARCH 80
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= FERRET_F16X2_ARCH * 10
#define FERRET_F16X2 1
#endif

// Each thread computes FERRET_ROWS_PER_THREAD output rows, blockDim.y apart, so a block of
// (bx, by) threads covers a bx x (by * FERRET_ROWS_PER_THREAD) output tile. launch.py mirrors this.
#define FERRET_ROWS_PER_THREAD 2
#define FERRET_MAX_THREADS 256

// The median 3x3 kernels (lpd_residual, preprocess_lpd): a compile-time block of RES_BX x RES_BY
// threads, each writing RES_ROWS consecutive rows of one column, so a block covers a 32 x 64 tile.
// launch.py mirrors these (a test parses them).
#define FERRET_RES_BX 32
#define FERRET_RES_BY 8
#define FERRET_RES_ROWS 8
#define FERRET_RES_TW (FERRET_RES_BX + 2)
#define FERRET_RES_TH (FERRET_RES_BY * FERRET_RES_ROWS + 2)
// normalize: FERRET_NORM_PIXELS consecutive pixels per thread (12 bytes of RGB: three 32-bit words)
#define FERRET_NORM_PIXELS 4

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
// Min and max as the device computes them. fminf/fmaxf compile to FMNMX (PTX min.f32/max.f32), which is
// IEEE 754-2019 minimumNumber/maximumNumber: a NaN operand yields the other operand, two NaNs the
// canonical NaN, and -0 orders below +0 whatever the operand order. The C library's fminf on the host may
// return either zero (x86 MINSS returns an operand by its position), so the host build orders the bits
// itself: its selections, sign of zero included, are the device's.
// ---------------------------------------------------------------------------------------------

#ifdef __CUDACC__
__device__ __forceinline__ float ferret_fmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ float ferret_fmax(float a, float b) { return fmaxf(a, b); }
#else
static inline unsigned int ferret_f32_bits(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static inline float ferret_bits_f32(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
// Sign-magnitude bits (sign: the sign bit) to a key whose unsigned order is the numeric order, -0 just below +0.
static inline unsigned int ferret_order_key(unsigned int u, unsigned int sign) {
    return u & sign ? ~u & (sign | (sign - 1)) : u | sign;
}
// minimumNumber (is_max = 0) or maximumNumber of two IEEE values of `bits` bits, on their bit patterns.
static inline unsigned int ferret_minmax_bits(unsigned int a, unsigned int b, int bits, int is_max) {
    const unsigned int sign = 1u << (bits - 1), inf = bits == 32 ? 0x7f800000u : 0x7c00u;
    const unsigned int mask = bits == 32 ? 0xffffffffu : 0xffffu, nan = bits == 32 ? 0x7fffffffu : 0x7fffu;
    const bool a_nan = (a & ~sign & mask) > inf, b_nan = (b & ~sign & mask) > inf;
    if (a_nan || b_nan) return a_nan && b_nan ? nan : a_nan ? b : a;
    const bool a_first = ferret_order_key(a, sign) <= ferret_order_key(b, sign);
    return a_first != (is_max != 0) ? a : b;
}
static inline float ferret_fmin(float a, float b) {
    return ferret_bits_f32(ferret_minmax_bits(ferret_f32_bits(a), ferret_f32_bits(b), 32, 0));
}
static inline float ferret_fmax(float a, float b) {
    return ferret_bits_f32(ferret_minmax_bits(ferret_f32_bits(a), ferret_f32_bits(b), 32, 1));
}
#endif

// ---------------------------------------------------------------------------------------------
// Per-pixel math: shared by kernels and host functions.
// ---------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ void ferret_cx(float& a, float& b) {
    const float lo = ferret_fmin(a, b);
    b = ferret_fmax(a, b);
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
        for (int i = 1; i < K * K; ++i) acc = variant == FERRET_LPD_MIN ? ferret_fmin(acc, v[i]) : ferret_fmax(acc, v[i]);
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
// Storage types: float, and float16 as raw IEEE binary16 bits (unsigned short) converted by the PTX
// instructions cuda_fp16.h emits, so NVRTC needs no CUDA include directory. Each instruction is one
// function below, and the host build implements each one bit for bit (round to nearest even, lane 0 in
// bits 0..15, little-endian words): every line around them (which value goes to which lane, which half
// goes to which row, which byte a word holds) is then the same code on the CPU as on the GPU, and a swapped
// lane fails a CPU test. NaN payloads are the one thing left unspecified (the host writes the canonical
// NaN, 0x7fff, and its float arithmetic keeps x86's payloads); the tests give the kernels no NaN.
// ---------------------------------------------------------------------------------------------

#ifdef __CUDACC__
// cvt.f32.f16: exact.
__device__ __forceinline__ float ferret_h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// cvt.rn.f16.f32: to nearest, ties to even; beyond the largest half (65504 + half an ulp) to inf.
__device__ __forceinline__ unsigned short ferret_f2h(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
// mov.b32 {lo, hi}, d: the two halves of a 32-bit register, lo = bits 0..15.
__device__ __forceinline__ void ferret_halves(unsigned int d, unsigned short& lo, unsigned short& hi) {
    asm("mov.b32 {%0, %1}, %2;" : "=h"(lo), "=h"(hi) : "r"(d));
}
#else
static inline float ferret_h2f(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return ferret_bits_f32(m ? 0x7fffffffu : sign | 0x7f800000u);  // NaN (canonical), inf
    if (e == 0) return ferret_bits_f32(sign | ferret_f32_bits((float)m * 0x1p-24f));  // zero, subnormal: exact
    return ferret_bits_f32(sign | (e + 112) << 23 | m << 13);
}
static inline unsigned short ferret_f2h(float v) {
    const unsigned int x = ferret_f32_bits(v), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                          // NaN: canonical
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 (65504 + half an ulp, a tie
                                                                    // whose even neighbour is inf), inf
    unsigned int q, rest, half;
    if (a >= 0x38800000u) {  // a normal half: rebias the exponent, keep 10 of 23 mantissa bits
        q = (a >> 13) - (112u << 10), rest = a & 0x1fffu, half = 0x1000u;
    } else if (a >= 0x33000000u) {  // a subnormal half, in units of 2^-24 (2^-25 itself is a tie to 0)
        const unsigned int e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;  // 14 .. 24
        q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    } else {
        return (unsigned short)sign;  // below 2^-25: zero
    }
    q += rest > half || (rest == half && (q & 1u));  // a carry into the exponent is right, up to inf
    return (unsigned short)(sign | q);
}
static inline void ferret_halves(unsigned int d, unsigned short& lo, unsigned short& hi) {
    lo = (unsigned short)(d & 0xffffu);
    hi = (unsigned short)(d >> 16);
}
#endif

// cvt.rn.f16x2.f32 d, a, b: a rounded to bits 16..31 of d, b to bits 0..15 (PTX's operand order), one
// instruction on sm_80+. Before sm_80 (and on the host) two cvt.rn.f16.f32 packed the same way: each lane
// rounded to nearest even from the same float, so the same bits.
#ifdef FERRET_F16X2
__device__ __forceinline__ unsigned int ferret_cvt_f16x2(float a, float b) {
    unsigned int d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(a), "f"(b));
    return d;
}
#else
__host__ __device__ __forceinline__ unsigned int ferret_cvt_f16x2(float a, float b) {
    return (unsigned int)ferret_f2h(b) | (unsigned int)ferret_f2h(a) << 16;
}
#endif

__host__ __device__ __forceinline__ float ferret_load(const float* p) { return *p; }
__host__ __device__ __forceinline__ void ferret_store(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ float ferret_load(const unsigned short* p) { return ferret_h2f(*p); }
__host__ __device__ __forceinline__ void ferret_store(unsigned short* p, float v) { *p = ferret_f2h(v); }

// Memory as the device reads and writes it: one 32-bit word of 4 bytes, two words of 4 halves (a 64-bit
// vector load), 16 bytes of 4 floats; the host copies the same bytes (little-endian, as the GPU).
__host__ __device__ __forceinline__ unsigned int ferret_load_word(const unsigned char* p) {
#ifdef __CUDACC__
    return *(const unsigned int*)p;
#else
    unsigned int w;
    memcpy(&w, p, sizeof w);
    return w;
#endif
}
__host__ __device__ __forceinline__ void ferret_load_words2(const unsigned short* p, unsigned int* w) {
#ifdef __CUDACC__
    const uint2 q = *(const uint2*)p;
    w[0] = q.x, w[1] = q.y;
#else
    memcpy(w, p, 2 * sizeof(unsigned int));
#endif
}

// __byte_perm(x, y, s): byte n of the result is byte s<4n+2:4n> of the 8 bytes y:x (x = bytes 0..3);
// the upper 16 bits of s and the top bit of each selector nibble are not used (PRMT's default mode).
__host__ __device__ __forceinline__ unsigned int ferret_byte_perm(unsigned int x, unsigned int y, unsigned int s) {
#ifdef __CUDACC__
    return __byte_perm(x, y, s);
#else
    const unsigned long long bytes = (unsigned long long)y << 32 | x;
    unsigned int r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned int)(bytes >> (8 * ((s >> (4 * n)) & 7u)) & 0xffu) << (8 * n);
    return r;
#endif
}

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
#if !defined(FERRET_WINDOW) || FERRET_WINDOW == 3
    if (k == 3) ferret_tile_outputs<3>(tile, tw, out_plane, H, W, x0, y0, tx, ty, by, variant, residual);
#endif
#if !defined(FERRET_WINDOW) || FERRET_WINDOW == 5
    if (k == 5) ferret_tile_outputs<5>(tile, tw, out_plane, H, W, x0, y0, tx, ty, by, variant, residual);
#endif
#if !defined(FERRET_WINDOW) || FERRET_WINDOW == 7
    if (k == 7) ferret_tile_outputs<7>(tile, tw, out_plane, H, W, x0, y0, tx, ty, by, variant, residual);
#endif
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
// The median 3x3 residual, sliding down a column. With each row of three sorted (lo <= mid <= hi),
// the median of the nine values is med3(max of the los, med3 of the mids, min of the his) (Paeth;
// a selection network, so exact with ties: 0-1 principle). A thread walks down its column: every
// tile row is sorted once as a full row (for the rows above and below an output) and once with its
// centre masked to 0 (for the output on that row), and shares both with its neighbours' outputs:
// 22 min/max per output instead of the 30 of the median-of-9 network.
// ---------------------------------------------------------------------------------------------

// The value types the row sorts run on: float (one output) and FerretHalf2 (two outputs packed as one
// __half2: two float16 values in one 32-bit word, lane 0 in bits 0..15; lane 0 is the upper output row).
__host__ __device__ __forceinline__ float ferret_min(float a, float b) { return ferret_fmin(a, b); }
__host__ __device__ __forceinline__ float ferret_max(float a, float b) { return ferret_fmax(a, b); }
__host__ __device__ __forceinline__ void ferret_set_zero(float& v) { v = 0.0f; }

// FerretHalf2: min.f16x2/max.f16x2 (sm_80+, __hmin2/__hmax2) without cuda_fp16.h, which NVRTC cannot find;
// the host build runs the same lanes with minimumNumber/maximumNumber on each half (ferret_minmax_bits).
// Exact only for values float16 represents (the lpd_residual_f16 tile: float16 inputs and the 0 pad):
// the pack (cvt.rn.f16x2.f32) then changes nothing, and min/max select one of their operands.
// Zeros: min.f16x2 and FMNMX (fminf/fmaxf) both order -0 < +0, and both return the other operand when
// one is NaN, so every selection picks the same value, sign of zero included, as the float network.
struct FerretHalf2 {
    unsigned int bits;
};
#ifdef FERRET_F16X2
__device__ __forceinline__ FerretHalf2 ferret_min(FerretHalf2 a, FerretHalf2 b) {
    FerretHalf2 r;
    asm("min.f16x2 %0, %1, %2;" : "=r"(r.bits) : "r"(a.bits), "r"(b.bits));
    return r;
}
__device__ __forceinline__ FerretHalf2 ferret_max(FerretHalf2 a, FerretHalf2 b) {
    FerretHalf2 r;
    asm("max.f16x2 %0, %1, %2;" : "=r"(r.bits) : "r"(a.bits), "r"(b.bits));
    return r;
}
#elif !defined(__CUDACC__)
static inline FerretHalf2 ferret_minmax_f16x2(FerretHalf2 a, FerretHalf2 b, int is_max) {
    FerretHalf2 r = {ferret_minmax_bits(a.bits & 0xffffu, b.bits & 0xffffu, 16, is_max) |
                     ferret_minmax_bits(a.bits >> 16, b.bits >> 16, 16, is_max) << 16};
    return r;
}
static inline FerretHalf2 ferret_min(FerretHalf2 a, FerretHalf2 b) { return ferret_minmax_f16x2(a, b, 0); }
static inline FerretHalf2 ferret_max(FerretHalf2 a, FerretHalf2 b) { return ferret_minmax_f16x2(a, b, 1); }
#endif
__host__ __device__ __forceinline__ void ferret_set_zero(FerretHalf2& p) { p.bits = 0u; }  // +0, +0
__host__ __device__ __forceinline__ void ferret_pack(float lane0, float lane1, FerretHalf2& p) {
    p.bits = ferret_cvt_f16x2(lane1, lane0);  // cvt's first operand goes to bits 16..31
}
__host__ __device__ __forceinline__ void ferret_unpack(FerretHalf2 p, float& lane0, float& lane1) {
    unsigned short lo, hi;
    ferret_halves(p.bits, lo, hi);
    lane0 = ferret_h2f(lo);
    lane1 = ferret_h2f(hi);
}

template <class V>
struct FerretSorted {
    V lo, mid, hi;
};
typedef FerretSorted<float> FerretSorted3;

template <class V>
__host__ __device__ __forceinline__ V ferret_med3(V a, V b, V c) {
    return ferret_max(ferret_min(a, b), ferret_min(ferret_max(a, b), c));
}

// (a, b, c) sorted as (lo, mid, hi).
template <class V>
__host__ __device__ __forceinline__ void ferret_sort_full(V a, V b, V c, FerretSorted<V>& full) {
    const V lo = ferret_min(a, c), hi = ferret_max(a, c);
    full.lo = ferret_min(lo, b);
    full.hi = ferret_max(hi, b);
    full.mid = ferret_max(lo, ferret_min(b, hi));
}

// (a, 0, c) sorted: the masked centre is 0, the pad value (ferret_centre_value, median).
template <class V>
__host__ __device__ __forceinline__ void ferret_sort_masked(V a, V c, FerretSorted<V>& masked) {
    V zero;
    ferret_set_zero(zero);
    const V lo = ferret_min(a, c), hi = ferret_max(a, c);
    masked.lo = ferret_min(lo, zero);
    masked.hi = ferret_max(hi, zero);
    masked.mid = ferret_max(lo, ferret_min(zero, hi));
}

// Both sorts of one row from one shared compare of a and c (the compiler merges the two min/max of a, c).
__host__ __device__ __forceinline__ void ferret_sort_row(float a, float b, float c, FerretSorted3& full,
                                                         FerretSorted3& masked) {
    ferret_sort_full(a, b, c, full);
    ferret_sort_masked(a, c, masked);
}

template <class V>
__host__ __device__ __forceinline__ V ferret_median_rows(const FerretSorted<V>& up, const FerretSorted<V>& centre,
                                                         const FerretSorted<V>& down) {
    const V lo = ferret_max(ferret_max(up.lo, centre.lo), down.lo);
    const V hi = ferret_min(ferret_min(up.hi, centre.hi), down.hi);
    return ferret_med3(lo, ferret_med3(up.mid, centre.mid, down.mid), hi);
}

// The residual kernel's tile: rows y0-1 .. y0+64 and columns x0-4 .. x0+35 (FERRET_RES_TS = 40 floats
// a row, so a row is ten aligned 4-element vectors; the outputs read columns x0-1 .. x0+32 of it).
// preprocess_lpd keeps its three 34-wide tiles (columns x0-1 .. x0+32).
#define FERRET_RES_TS 40
#define FERRET_RES_VECS (FERRET_RES_TS / 4 * FERRET_RES_TH)

// Four consecutive elements as one load (16 bytes of float, 8 of float16: two words, each element's half
// in the order memory holds them) and one 16-byte shared store.
__host__ __device__ __forceinline__ void ferret_load4(const float* p, float* v) {
#ifdef __CUDACC__
    const float4 q = *(const float4*)p;
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
#else
    memcpy(v, p, 4 * sizeof(float));
#endif
}
__host__ __device__ __forceinline__ void ferret_load4(const unsigned short* p, float* v) {
    unsigned int w[2];
    ferret_load_words2(p, w);
    const unsigned short h[4] = {(unsigned short)w[0], (unsigned short)(w[0] >> 16), (unsigned short)w[1],
                                 (unsigned short)(w[1] >> 16)};
    FERRET_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = ferret_h2f(h[i]);
}
__host__ __device__ __forceinline__ void ferret_store4(float* p, const float* v) {
#ifdef __CUDACC__
    *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
#else
    memcpy(p, v, 4 * sizeof(float));
#endif
}

// An interior tile: its whole 40 x 66 tile lies inside the image and every row of it starts on a
// vector boundary (W % 4 == 0, the base aligned to 4 elements), so it is staged by aligned vectors
// and written with no bounds check. The others (the image's border tiles, odd widths) take the edge
// path: element by element, 0 outside, each output checked. Hoisted out of the plane loop.
template <class T>
__host__ __device__ __forceinline__ bool ferret_res_interior(const T* x, int H, int W, int x0, int y0) {
    return x0 >= 4 && x0 + (FERRET_RES_TS - 4) <= W && y0 >= 1 && y0 + (FERRET_RES_TH - 1) <= H && W % 4 == 0 &&
           ((unsigned long long)x & (4 * sizeof(T) - 1)) == 0;
}

// Phase 1, interior: thread `tid` copies vectors tid, tid + 256, ... (660 of them) of the tile.
template <class T>
__host__ __device__ __forceinline__ void ferret_res_stage_interior(const T* plane, int W, int x0, int y0, float* tile,
                                                                   int tid) {
    const T* origin = plane + (y0 - 1) * W + (x0 - 4);
    const int nthreads = FERRET_RES_BX * FERRET_RES_BY;
    FERRET_UNROLL
    for (int k = 0; k < (FERRET_RES_VECS + nthreads - 1) / nthreads; ++k) {
        const int q = tid + k * nthreads;
        if ((k + 1) * nthreads <= FERRET_RES_VECS || q < FERRET_RES_VECS) {
            const int row = q / (FERRET_RES_TS / 4), col = q - row * (FERRET_RES_TS / 4);
            float v[4];
            ferret_load4(origin + row * W + col * 4, v);
            ferret_store4(tile + q * 4, v);
        }
    }
}

// Phase 1, edge: tile columns 3 .. 36 (image columns x0-1 .. x0+32) element by element, 0 outside;
// 2D loops with compile-time trip counts, one unsigned compare per coordinate, 32-bit offsets within
// a plane (launch.py refuses planes of 2^31 pixels or more).
template <class T>
__host__ __device__ __forceinline__ void ferret_res_stage(const T* plane, int H, int W, int x0, int y0, float* tile,
                                                          int tx, int ty) {
    FERRET_UNROLL
    for (int j = 0; j < (FERRET_RES_TH + FERRET_RES_BY - 1) / FERRET_RES_BY; ++j) {
        const int ly = ty + j * FERRET_RES_BY;
        if (ly >= FERRET_RES_TH) break;
        const int gy = y0 - 1 + ly;
        const bool row_in = (unsigned)gy < (unsigned)H;
        const T* row = plane + gy * W;
        FERRET_UNROLL
        for (int i = 0; i < (FERRET_RES_TW + FERRET_RES_BX - 1) / FERRET_RES_BX; ++i) {
            const int lx = tx + i * FERRET_RES_BX;
            if (lx >= FERRET_RES_TW) break;
            const int gx = x0 - 1 + lx;
            tile[ly * FERRET_RES_TS + 3 + lx] = row_in && (unsigned)gx < (unsigned)W ? ferret_load(row + gx) : 0.0f;
        }
    }
}

// Two outputs of one column, rows r and r + 1 (o[0] and o[W]), as two stores. float16 converts both with
// one cvt.rn.f16x2.f32 (one F2FP.PACK_AB, each lane rounded to nearest even from float32: the bits
// cvt.rn.f16.f32 gives, which is the same F2FP with RZ in the other lane) and stores each half as it is.
__host__ __device__ __forceinline__ void ferret_store_rows2(float* o, int W, float v0, float v1) {
    o[0] = v0;
    o[W] = v1;
}
__host__ __device__ __forceinline__ void ferret_store_rows2(unsigned short* o, int W, float v0, float v1) {
    unsigned short upper_row, lower_row;
    ferret_halves(ferret_cvt_f16x2(v1, v0), upper_row, lower_row);  // v0 in bits 0..15
    o[0] = upper_row;
    o[W] = lower_row;
}

// Phase 2: the thread of column gx writes rows gy0 .. gy0 + ROWS-1: x - median. `t` points at the
// tile element above-left of its first output (stride TS); EDGE checks each output against the image.
// PAIRS (preprocess_lpd): interior tiles write their outputs two rows at a time (ferret_store_rows2), the
// same values, so float16 converts each pair with one F2FP; edge tiles compute each residual before its
// bounds check (ptxas schedules the fused kernel's loops better so). The residual kernel keeps to the
// one-at-a-time form, whose code this leaves as it was.
template <int TS, bool EDGE, bool PAIRS, class T>
__host__ __device__ __forceinline__ void ferret_res_column(const float* t, T* out_plane, int H, int W, int gx,
                                                           int gy0) {
    FerretSorted3 up, up_masked, centre, centre_masked, down, down_masked;
    ferret_sort_row(t[0], t[1], t[2], up, up_masked);
    t += TS;
    float x = t[1];
    ferret_sort_row(t[0], x, t[2], centre, centre_masked);
    T* o = out_plane + gy0 * W + gx;
    float r_prev = 0.0f;
    FERRET_UNROLL
    for (int j = 0; j < FERRET_RES_ROWS; ++j) {
        t += TS;
        const float x_down = t[1];
        ferret_sort_row(t[0], x_down, t[2], down, down_masked);
        if (!PAIRS) {
            if (!EDGE || (gy0 + j < H && gx < W)) ferret_store(o + j * W, x - ferret_median_rows(up, centre_masked, down));
        } else {
            const float r = x - ferret_median_rows(up, centre_masked, down);
            if (EDGE) {
                if (gy0 + j < H && gx < W) ferret_store(o + j * W, r);
            } else if (j % 2 == 0) {
                r_prev = r;
            } else {
                ferret_store_rows2(o + (j - 1) * W, W, r_prev, r);
            }
        }
        up = centre;
        centre = down;
        centre_masked = down_masked;
        x = x_down;
    }
}

// ferret_res_column on pairs of outputs (rows 2i, 2i+1 of the column) packed in one P (FerretHalf2 on
// sm_80+, and in the host build's emulation of it): every min/max serves two outputs. Full sorts of the
// tile row pairs (0,1), (2,3), ... serve as `down` of one pair of outputs and `up` of the next; the
// masked centres (1,2), (3,4), ... are their own pairs. Each median goes back to float for x - med,
// in float32 and rounded once on store, as ferret_res_column.
template <int TS, bool EDGE, class P, class T>
__host__ __device__ __forceinline__ void ferret_res_column_pairs(const float* t, T* out_plane, int H, int W, int gx,
                                                                 int gy0) {
    static_assert(FERRET_RES_ROWS % 2 == 0, "outputs go in pairs");
    FerretSorted<P> up, centre_masked, down;
    P a, b, c;
    ferret_pack(t[0], t[TS], a);
    ferret_pack(t[1], t[TS + 1], b);
    ferret_pack(t[2], t[TS + 2], c);
    ferret_sort_full(a, b, c, up);  // tile rows 0, 1
    float a_prev = t[TS], x = t[TS + 1], c_prev = t[TS + 2];  // tile row 1: the first output's row
    T* o = out_plane + gy0 * W + gx;
    FERRET_UNROLL
    for (int j = 0; j < FERRET_RES_ROWS; j += 2) {
        t += 2 * TS;  // tile rows j+2, j+3
        const float a0 = t[0], x_next = t[1], c0 = t[2], a1 = t[TS], b1 = t[TS + 1], c1 = t[TS + 2];
        ferret_pack(a0, a1, a);
        ferret_pack(x_next, b1, b);
        ferret_pack(c0, c1, c);
        ferret_sort_full(a, b, c, down);  // tile rows j+2, j+3
        ferret_pack(a_prev, a0, a);
        ferret_pack(c_prev, c0, c);
        ferret_sort_masked(a, c, centre_masked);  // tile rows j+1, j+2: the outputs' own rows
        float med0, med1;
        ferret_unpack(ferret_median_rows(up, centre_masked, down), med0, med1);
        if (!EDGE || (gy0 + j < H && gx < W)) ferret_store(o + j * W, x - med0);
        if (!EDGE || (gy0 + j + 1 < H && gx < W)) ferret_store(o + (j + 1) * W, x_next - med1);
        up = down;
        a_prev = a1, x = b1, c_prev = c1;
    }
}

// Phase 2 of the residual kernel for thread (tx, ty): rows ty*ROWS .. of column tx of the tile.
template <bool EDGE, bool PAIRS = false, class T>
__host__ __device__ __forceinline__ void ferret_res_outputs(const float* tile, T* out_plane, int H, int W, int x0,
                                                            int y0, int tx, int ty) {
    ferret_res_column<FERRET_RES_TS, EDGE, PAIRS>(tile + ty * FERRET_RES_ROWS * FERRET_RES_TS + 3 + tx, out_plane, H,
                                                  W, x0 + tx, y0 + ty * FERRET_RES_ROWS);
}

// The residual kernel's phase 2 on packed pairs (lpd_residual_f16 on sm_80+, and its host emulation).
template <bool EDGE, class P, class T>
__host__ __device__ __forceinline__ void ferret_res_outputs_pairs(const float* tile, T* out_plane, int H, int W,
                                                                  int x0, int y0, int tx, int ty) {
    ferret_res_column_pairs<FERRET_RES_TS, EDGE, P>(tile + ty * FERRET_RES_ROWS * FERRET_RES_TS + 3 + tx, out_plane,
                                                    H, W, x0 + tx, y0 + ty * FERRET_RES_ROWS);
}

// ---------------------------------------------------------------------------------------------
// Normalisation by table: the 256 values of ferret_normalize per channel, computed once per block
// with the same float32 division, so a pixel costs a shared-memory read instead of two divisions.
// ---------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ void ferret_build_table(float* table, const float* mean, const float* std, int tid,
                                                            int nthreads) {
    for (int i = tid; i < 3 * 256; i += nthreads) {  // compile-time indices only: mean/std stay in registers
        const int c = i >> 8;
        table[i] = ferret_normalize((unsigned char)(i & 255), c == 0 ? mean[0] : c == 1 ? mean[1] : mean[2],
                                    c == 0 ? std[0] : c == 1 ? std[1] : std[2]);
    }
}

// preprocess_lpd's phase 1: three normalised channel tiles laid out as the residual kernel's (40 x 66,
// image column x0-4 at tile column 0), 0 outside the image in normalised space, as the LPD pads the
// normalised image. The edge path stages tile columns 3 .. 36 pixel by pixel, each checked.
__host__ __device__ __forceinline__ void ferret_res_stage_rgb(const unsigned char* image, int H, int W, int x0, int y0,
                                                              const float* table, float* tile, int tx, int ty) {
    FERRET_UNROLL
    for (int j = 0; j < (FERRET_RES_TH + FERRET_RES_BY - 1) / FERRET_RES_BY; ++j) {
        const int ly = ty + j * FERRET_RES_BY;
        if (ly >= FERRET_RES_TH) break;
        const int gy = y0 - 1 + ly;
        const bool row_in = (unsigned)gy < (unsigned)H;
        const unsigned char* row = image + gy * W * 3;
        FERRET_UNROLL
        for (int i = 0; i < (FERRET_RES_TW + FERRET_RES_BX - 1) / FERRET_RES_BX; ++i) {
            const int lx = tx + i * FERRET_RES_BX;
            if (lx >= FERRET_RES_TW) break;
            const int gx = x0 - 1 + lx, at = ly * FERRET_RES_TS + 3 + lx;
            const bool inside = row_in && (unsigned)gx < (unsigned)W;
            FERRET_UNROLL
            for (int c = 0; c < 3; ++c)
                tile[c * FERRET_RES_TS * FERRET_RES_TH + at] = inside ? table[c * 256 + row[gx * 3 + c]] : 0.0f;
        }
    }
}

// normalize: thread `tid` of the block handles FERRET_NORM_PIXELS consecutive pixels of the image
// (flat index over H*W). The fast path (ferret_normalize_fast: H*W % 4 == 0, the image 4-byte and the
// output 4-element aligned) reads their 12 bytes as three 32-bit words, picks each byte out (PRMT),
// looks it up in the table and writes each channel's four values as one vector; the other inputs go
// pixel by pixel (ferret_normalize_pixels). The choice is made once per launch, outside the loop.
template <class T>
__host__ __device__ __forceinline__ bool ferret_normalize_fast(const unsigned char* image, const T* out, int HW) {
    return HW % 4 == 0 && ((unsigned long long)image & 3) == 0 && ((unsigned long long)out & (4 * sizeof(T) - 1)) == 0;
}

// Byte k (0 = least significant) of w, zero-extended.
__host__ __device__ __forceinline__ unsigned int ferret_byte(unsigned int w, int k) {
    return ferret_byte_perm(w, 0u, 0x4440u + k);  // byte k, then three bytes of y = 0
}

// Four values to global memory as one vector store (16 bytes of float, 8 of float16; the caller
// checked the alignment; `p` is a generic pointer to global memory, converted). Written in PTX: NVVM
// splits some of these stores into four otherwise.
__host__ __device__ __forceinline__ void ferret_store4_global(float* p, const float* v) {
#ifdef __CUDACC__
    asm("{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.v4.f32 [g], {%1, %2, %3, %4}; }" ::"l"(p), "f"(v[0]),
        "f"(v[1]), "f"(v[2]), "f"(v[3]));
#else
    memcpy(p, v, 4 * sizeof(float));
#endif
}
// float16: two words, v[0] and v[2] in their low halves (the lower address), stored as one 8-byte vector.
__host__ __device__ __forceinline__ void ferret_store_words2_global(unsigned short* p, unsigned int lo, unsigned int hi) {
#ifdef __CUDACC__
    asm("{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.v2.u32 [g], {%1, %2}; }" ::"l"(p), "r"(lo), "r"(hi));
#else
    const unsigned int w[2] = {lo, hi};
    memcpy(p, w, sizeof w);
#endif
}
__host__ __device__ __forceinline__ void ferret_store4_global(unsigned short* p, const float* v) {
    ferret_store_words2_global(p, ferret_cvt_f16x2(v[1], v[0]), ferret_cvt_f16x2(v[3], v[2]));
}

template <class T>
__host__ __device__ __forceinline__ void ferret_normalize_quad(const unsigned char* image, T* out, int HW, int p0,
                                                               const float* table) {
    const unsigned char* words = image + p0 * 3;
    unsigned int w[3];
    FERRET_UNROLL
    for (int i = 0; i < 3; ++i) w[i] = ferret_load_word(words + 4 * i);  // byte i of the 12: byte i % 4 of word i / 4
    FERRET_UNROLL
    for (int c = 0; c < 3; ++c) {
        float v[FERRET_NORM_PIXELS];
        FERRET_UNROLL
        for (int q = 0; q < FERRET_NORM_PIXELS; ++q) v[q] = table[c * 256 + (int)ferret_byte(w[(3 * q + c) / 4], (3 * q + c) % 4)];
        ferret_store4_global(out + c * HW + p0, v);
    }
}

// preprocess_lpd's phase 1 for an interior tile (ferret_rgb_interior): the 40 x 66 pixels of the tile
// as 660 runs of 4 pixels, each read as three aligned 32-bit words, normalised through the table and
// written as one 16-byte vector per channel tile: normalize's fast path into shared memory.
__host__ __device__ __forceinline__ bool ferret_rgb_interior(const unsigned char* image, int H, int W, int x0, int y0) {
    return x0 >= 4 && x0 + (FERRET_RES_TS - 4) <= W && y0 >= 1 && y0 + (FERRET_RES_TH - 1) <= H && W % 4 == 0 &&
           ((unsigned long long)image & 3) == 0;
}

__host__ __device__ __forceinline__ void ferret_rgb_stage_interior(const unsigned char* image, int W, int x0, int y0,
                                                                   const float* table, float* tile, int tid) {
    const unsigned char* origin = image + ((y0 - 1) * W + (x0 - 4)) * 3;
    const int nthreads = FERRET_RES_BX * FERRET_RES_BY;
    FERRET_UNROLL
    for (int k = 0; k < (FERRET_RES_VECS + nthreads - 1) / nthreads; ++k) {
        const int q = tid + k * nthreads;
        if ((k + 1) * nthreads <= FERRET_RES_VECS || q < FERRET_RES_VECS) {
            const int row = q / (FERRET_RES_TS / 4), col = q - row * (FERRET_RES_TS / 4);
            const unsigned char* words = origin + (row * W + col * 4) * 3;
            unsigned int w[3];
            FERRET_UNROLL
            for (int i = 0; i < 3; ++i) w[i] = ferret_load_word(words + 4 * i);
            FERRET_UNROLL
            for (int c = 0; c < 3; ++c) {
                float v[4];
                FERRET_UNROLL
                for (int p = 0; p < 4; ++p) v[p] = table[c * 256 + (int)ferret_byte(w[(3 * p + c) / 4], (3 * p + c) % 4)];
                ferret_store4(tile + c * FERRET_RES_TS * FERRET_RES_TH + q * 4, v);
            }
        }
    }
}

// One image of preprocess_lpd's phase 2 for thread (tx, ty): its column in each channel tile.
template <bool EDGE, class T>
__host__ __device__ __forceinline__ void ferret_rgb_outputs(const float* tile, T* out_image, long long plane_size,
                                                            int H, int W, int x0, int y0, int tx, int ty) {
    FERRET_UNROLL
    for (int c = 0; c < 3; ++c)
        ferret_res_outputs<EDGE, true>(tile + c * FERRET_RES_TS * FERRET_RES_TH, out_image + c * plane_size, H, W, x0,
                                       y0, tx, ty);
}

template <class T>
__host__ __device__ __forceinline__ void ferret_normalize_pixels(const unsigned char* image, T* out, int HW, int p0,
                                                                 const float* table) {
    for (int q = 0; q < FERRET_NORM_PIXELS && p0 + q < HW; ++q)
        for (int c = 0; c < 3; ++c) ferret_store(out + (long long)c * HW + p0 + q, table[c * 256 + image[(p0 + q) * 3 + c]]);
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

// lpd_residual's phase 2 by storage type: float32 on floats; float16 on packed __half2 pairs where the
// device has min.f16x2 (sm_80+; FERRET_F16X2), on floats below. preprocess_lpd_f16 stays on floats: its
// normalised values are not float16 values, and rounding them before the selection could change it.
template <bool EDGE>
__device__ __forceinline__ void ferret_residual_outputs(const float* tile, float* out_plane, int H, int W, int x0,
                                                        int y0, int tx, int ty) {
    ferret_res_outputs<EDGE>(tile, out_plane, H, W, x0, y0, tx, ty);
}
template <bool EDGE>
__device__ __forceinline__ void ferret_residual_outputs(const float* tile, unsigned short* out_plane, int H, int W,
                                                        int x0, int y0, int tx, int ty) {
#ifdef FERRET_F16X2
    ferret_res_outputs_pairs<EDGE, FerretHalf2>(tile, out_plane, H, W, x0, y0, tx, ty);
#else
    ferret_res_outputs<EDGE>(tile, out_plane, H, W, x0, y0, tx, ty);
#endif
}

// The paper's LPD (median, 3x3, residual): a compile-time block, rows sliding down each column.
// 256 threads and at most 40 registers (__launch_bounds__(256, 6)): 6 blocks, 48 warps, 75% occupancy
// on sm_80 .. sm_90 (FERRET_BLOCKS_3X3: 4 blocks on sm_75 and on Blackwell).
// Interior tiles run the first loop (vector staging, no bounds checks), border tiles the second.
template <class T>
__device__ __forceinline__ void ferret_median_residual_kernel(const T* __restrict__ x, T* __restrict__ out, int N,
                                                              int C, int H, int W) {
    __shared__ __align__(16) float tile[FERRET_RES_TS * FERRET_RES_TH];
    const int x0 = blockIdx.x * FERRET_RES_BX, y0 = blockIdx.y * (FERRET_RES_BY * FERRET_RES_ROWS);
    const int tid = threadIdx.y * FERRET_RES_BX + threadIdx.x;
    const long long planes = (long long)N * C, plane_size = (long long)H * W;
    if (ferret_res_interior(x, H, W, x0, y0)) {
        for (long long p = blockIdx.z; p < planes; p += gridDim.z) {
            ferret_res_stage_interior(x + p * plane_size, W, x0, y0, tile, tid);
            __syncthreads();
            ferret_residual_outputs<false>(tile, out + p * plane_size, H, W, x0, y0, threadIdx.x, threadIdx.y);
            __syncthreads();  // the next plane overwrites the tile
        }
        return;
    }
    for (long long p = blockIdx.z; p < planes; p += gridDim.z) {
        ferret_res_stage(x + p * plane_size, H, W, x0, y0, tile, threadIdx.x, threadIdx.y);
        __syncthreads();
        ferret_residual_outputs<true>(tile, out + p * plane_size, H, W, x0, y0, threadIdx.x, threadIdx.y);
        __syncthreads();
    }
}

// One block per (image, column tile, row tile) does all three channels: the uint8 pixels are read
// once, normalised through the block's table into three shared tiles. Interior tiles (the 40 x 66
// pixels inside the image, aligned rows) run the first loop, with no bounds checks.
template <class T>
__device__ __forceinline__ void ferret_preprocess_kernel(const unsigned char* __restrict__ image, T* __restrict__ out,
                                                         int N, int H, int W, float m0, float m1, float m2, float s0,
                                                         float s1, float s2) {
    __shared__ float table[3 * 256];
    __shared__ __align__(16) float tile[3 * FERRET_RES_TS * FERRET_RES_TH];
    const float mean[3] = {m0, m1, m2}, std[3] = {s0, s1, s2};
    const int tid = threadIdx.y * FERRET_RES_BX + threadIdx.x;
    ferret_build_table(table, mean, std, tid, FERRET_RES_BX * FERRET_RES_BY);
    const int x0 = blockIdx.x * FERRET_RES_BX, y0 = blockIdx.y * (FERRET_RES_BY * FERRET_RES_ROWS);
    const long long plane_size = (long long)H * W;
    __syncthreads();
    if (ferret_rgb_interior(image, H, W, x0, y0)) {
        for (long long n = blockIdx.z; n < N; n += gridDim.z) {
            ferret_rgb_stage_interior(image + n * plane_size * 3, W, x0, y0, table, tile, tid);
            __syncthreads();
            ferret_rgb_outputs<false>(tile, out + n * 3 * plane_size, plane_size, H, W, x0, y0, threadIdx.x,
                                      threadIdx.y);
            __syncthreads();
        }
        return;
    }
    for (long long n = blockIdx.z; n < N; n += gridDim.z) {
        ferret_res_stage_rgb(image + n * plane_size * 3, H, W, x0, y0, table, tile, threadIdx.x, threadIdx.y);
        __syncthreads();
        ferret_rgb_outputs<true>(tile, out + n * 3 * plane_size, plane_size, H, W, x0, y0, threadIdx.x, threadIdx.y);
        __syncthreads();
    }
}

// uint8 NHWC -> normalised NCHW: the baseline preprocess_lpd is measured against, and the
// runtime's preprocessing when the graph contains the LPD. Grid: x over chunks of
// blockDim.x * FERRET_NORM_PIXELS pixels of one image, z over images (grid-stride).
template <class T>
__device__ __forceinline__ void ferret_normalize_kernel(const unsigned char* __restrict__ image, T* __restrict__ out,
                                                        int N, int H, int W, float m0, float m1, float m2, float s0,
                                                        float s1, float s2) {
    __shared__ float table[3 * 256];
    const float mean[3] = {m0, m1, m2}, std[3] = {s0, s1, s2};
    ferret_build_table(table, mean, std, threadIdx.x, blockDim.x);
    const int HW = H * W;
    const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * FERRET_NORM_PIXELS;
    __syncthreads();
    if (first >= HW) return;  // after the barrier: every thread helped build the table
    const int p0 = (int)first;
    if (ferret_normalize_fast(image, out, HW)) {
        for (long long n = blockIdx.z; n < N; n += gridDim.z)
            ferret_normalize_quad(image + n * HW * 3, out + n * 3 * HW, HW, p0, table);
        return;
    }
    for (long long n = blockIdx.z; n < N; n += gridDim.z)
        ferret_normalize_pixels(image + n * HW * 3, out + n * 3 * HW, HW, p0, table);
}

// Blocks of 256 threads per SM that __launch_bounds__ asks ptxas to fit (so at most 65536 / (256 * blocks)
// registers a thread), by architecture: the most that leave no spill (tests/test_kernel_arch.py builds every
// kernel for every architecture and checks). sm_80 .. sm_90: 6 (40 registers, 48 warps). sm_75 runs at most
// 1024 threads per SM: 4 (ptxas ignores a bound it cannot meet, and then takes up to 100 registers).
// Blackwell's ptxas (sm_100 and up; sm_107 also holds 1024 threads) takes more registers for the same code:
// at 6 blocks the residual, normalize and preprocess_lpd spill (up to 424 bytes), so 4 (64 registers), and
// 2 for preprocess_lpd (128), which spills at 3 and at 4. FERRET_BLOCKS_PER_SM sets one number for all (the
// TensorRT plugin's PTX, which every GPU's JIT compiles).
#if defined(FERRET_BLOCKS_PER_SM)
#define FERRET_BLOCKS_3X3 FERRET_BLOCKS_PER_SM
#define FERRET_BLOCKS_PREPROCESS FERRET_BLOCKS_PER_SM
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
#define FERRET_BLOCKS_3X3 4
#define FERRET_BLOCKS_PREPROCESS 4
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
#define FERRET_BLOCKS_3X3 4
#define FERRET_BLOCKS_PREPROCESS 2
#else
#define FERRET_BLOCKS_3X3 6
#define FERRET_BLOCKS_PREPROCESS 6
#endif
#define FERRET_KERNEL extern "C" __global__ void __launch_bounds__(FERRET_MAX_THREADS)
#define FERRET_KERNEL_3X3 \
    extern "C" __global__ void __launch_bounds__(FERRET_RES_BX * FERRET_RES_BY, FERRET_BLOCKS_3X3)
#define FERRET_KERNEL_PRE \
    extern "C" __global__ void __launch_bounds__(FERRET_RES_BX * FERRET_RES_BY, FERRET_BLOCKS_PREPROCESS)
// normalize: up to 40 registers (6 blocks of 256 threads), where ptxas 13.0 would take 32 and spill
#define FERRET_KERNEL_NORM extern "C" __global__ void __launch_bounds__(FERRET_MAX_THREADS, FERRET_BLOCKS_3X3)

#if !defined(FERRET_ONLY) || defined(FERRET_WANT_lpd_residual_f32)
FERRET_KERNEL_3X3 lpd_residual_f32(const float* x, float* out, int N, int C, int H, int W) {
    ferret_median_residual_kernel(x, out, N, C, H, W);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_lpd_residual_f16)
FERRET_KERNEL_3X3 lpd_residual_f16(const unsigned short* x, unsigned short* out, int N, int C, int H, int W) {
    ferret_median_residual_kernel(x, out, N, C, H, W);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_lpd_generic_f32)
FERRET_KERNEL lpd_generic_f32(const float* x, float* out, int N, int C, int H, int W, int k, int variant,
                              int residual) {
    ferret_lpd_kernel(x, out, N, C, H, W, k, variant, residual);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_lpd_generic_f16)
FERRET_KERNEL lpd_generic_f16(const unsigned short* x, unsigned short* out, int N, int C, int H, int W, int k,
                              int variant, int residual) {
    ferret_lpd_kernel(x, out, N, C, H, W, k, variant, residual);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_preprocess_lpd_f32)
FERRET_KERNEL_PRE preprocess_lpd_f32(const unsigned char* image, float* out, int N, int H, int W, float m0, float m1,
                                 float m2, float s0, float s1, float s2) {
    ferret_preprocess_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_preprocess_lpd_f16)
FERRET_KERNEL_PRE preprocess_lpd_f16(const unsigned char* image, unsigned short* out, int N, int H, int W, float m0,
                                 float m1, float m2, float s0, float s1, float s2) {
    ferret_preprocess_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}
#endif

#if !defined(FERRET_ONLY) || defined(FERRET_WANT_normalize_f32)
FERRET_KERNEL_NORM normalize_f32(const unsigned char* image, float* out, int N, int H, int W, float m0, float m1, float m2,
                            float s0, float s1, float s2) {
    ferret_normalize_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_normalize_f16)
FERRET_KERNEL_NORM normalize_f16(const unsigned char* image, unsigned short* out, int N, int H, int W, float m0, float m1,
                            float m2, float s0, float s1, float s2) {
    ferret_normalize_kernel(image, out, N, H, W, m0, m1, m2, s0, s1, s2);
}
#endif

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

// Each emulator below runs a kernel for one storage type: float (the *_f32 kernel) or unsigned short (the
// *_f16 kernel: float16 bits loaded, converted and stored by the host's exact cvt, in the device's lanes).
template <class T>
static int ferret_generic_emulate(const T* x, T* out, int N, int C, int H, int W, int k, int variant, int residual,
                                  const int* grid, const int* block, long long smem_bytes) {
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

extern "C" int lpd_generic_emulate(const float* x, float* out, int N, int C, int H, int W, int k, int variant,
                                   int residual, const int* grid, const int* block, long long smem_bytes) {
    return ferret_generic_emulate(x, out, N, C, H, W, k, variant, residual, grid, block, smem_bytes);
}
extern "C" int lpd_generic_f16_emulate(const unsigned short* x, unsigned short* out, int N, int C, int H, int W, int k,
                                       int variant, int residual, const int* grid, const int* block,
                                       long long smem_bytes) {
    return ferret_generic_emulate(x, out, N, C, H, W, k, variant, residual, grid, block, smem_bytes);
}

// The 3x3 kernels' block is a compile-time constant; their tiles are static shared memory.
static int ferret_check_block_3x3(const int* grid, const int* block) {
    const int err = ferret_check_launch(grid, block, 0, 0);
    if (err) return err;
    return block[0] == FERRET_RES_BX && block[1] == FERRET_RES_BY ? FERRET_OK : FERRET_EBLOCK;
}

// How many blocks of the last emulated launch took the interior path (tests check both paths ran).
static long long ferret_interior_blocks = 0;
extern "C" long long ferret_emulated_interior_blocks(void) { return ferret_interior_blocks; }

// The 3x3 kernels' launch, run block by block on the CPU: for every block of the grid, whether it takes
// the interior path, then for each of its planes (grid-stride over z) the block's two phases as every
// thread runs them: stage(plane, x0, y0, interior, tx, ty), then outputs(...) after the barrier.
template <typename Interior, typename Stage, typename Outputs>
static void ferret_emulate_3x3(const int* grid, long long planes, Interior interior_of, Stage stage, Outputs outputs) {
    ferret_interior_blocks = 0;
    for (int gz = 0; gz < grid[2]; ++gz)
        for (int gy = 0; gy < grid[1]; ++gy)
            for (int gx = 0; gx < grid[0]; ++gx) {
                const int x0 = gx * FERRET_RES_BX, y0 = gy * FERRET_RES_BY * FERRET_RES_ROWS;
                const bool interior = interior_of(x0, y0);
                ferret_interior_blocks += interior;
                for (long long p = gz; p < planes; p += grid[2]) {
                    for (int ty = 0; ty < FERRET_RES_BY; ++ty)
                        for (int tx = 0; tx < FERRET_RES_BX; ++tx) stage(p, x0, y0, interior, tx, ty);
                    for (int ty = 0; ty < FERRET_RES_BY; ++ty)
                        for (int tx = 0; tx < FERRET_RES_BX; ++tx) outputs(p, x0, y0, interior, tx, ty);
                }
            }
}

// lpd_residual's phase 2 as the device runs it for the storage type and architecture: float16 on sm_80+
// takes packed FerretHalf2 pairs (ferret_residual_outputs), everything else the float column.
template <bool EDGE>
static void ferret_residual_outputs_host(const float* tile, float* o, int H, int W, int x0, int y0, int tx, int ty,
                                         bool) {
    ferret_res_outputs<EDGE>(tile, o, H, W, x0, y0, tx, ty);
}
template <bool EDGE>
static void ferret_residual_outputs_host(const float* tile, unsigned short* o, int H, int W, int x0, int y0, int tx,
                                         int ty, bool half2) {
    if (half2)
        ferret_res_outputs_pairs<EDGE, FerretHalf2>(tile, o, H, W, x0, y0, tx, ty);
    else
        ferret_res_outputs<EDGE>(tile, o, H, W, x0, y0, tx, ty);
}

template <class T>
static int ferret_residual_emulate(const T* x, T* out, int N, int C, int H, int W, const int* grid, const int* block,
                                   int arch) {
    const int err = ferret_check_block_3x3(grid, block);
    if (err) return err;
    static float tile[FERRET_RES_TS * FERRET_RES_TH];
    const long long plane_size = (long long)H * W;
    const bool half2 = arch >= FERRET_F16X2_ARCH;  // the device's #ifdef FERRET_F16X2
    ferret_emulate_3x3(
        grid, (long long)N * C, [&](int x0, int y0) { return ferret_res_interior(x, H, W, x0, y0); },
        [&](long long p, int x0, int y0, bool interior, int tx, int ty) {
            if (interior)
                ferret_res_stage_interior(x + p * plane_size, W, x0, y0, tile, ty * FERRET_RES_BX + tx);
            else
                ferret_res_stage(x + p * plane_size, H, W, x0, y0, tile, tx, ty);
        },
        [&](long long p, int x0, int y0, bool interior, int tx, int ty) {
            if (interior)
                ferret_residual_outputs_host<false>(tile, out + p * plane_size, H, W, x0, y0, tx, ty, half2);
            else
                ferret_residual_outputs_host<true>(tile, out + p * plane_size, H, W, x0, y0, tx, ty, half2);
        });
    return FERRET_OK;
}

extern "C" int lpd_residual_emulate(const float* x, float* out, int N, int C, int H, int W, const int* grid,
                                    const int* block, long long smem_bytes) {
    return ferret_residual_emulate(x, out, N, C, H, W, grid, block, 0);  // float32: one path on every arch
}
// arch: the compute capability (75, 80, ...) whose build to run: packed pairs from FERRET_F16X2_ARCH.
extern "C" int lpd_residual_f16_emulate(const unsigned short* x, unsigned short* out, int N, int C, int H, int W,
                                        const int* grid, const int* block, long long smem_bytes, int arch) {
    return ferret_residual_emulate(x, out, N, C, H, W, grid, block, arch);
}

template <class T>
static int ferret_preprocess_emulate(const unsigned char* image, T* out, int N, int H, int W, const float* mean,
                                     const float* std, const int* grid, const int* block) {
    const int err = ferret_check_block_3x3(grid, block);
    if (err) return err;
    static float table[3 * 256], tile[3 * FERRET_RES_TS * FERRET_RES_TH];
    const int nthreads = FERRET_RES_BX * FERRET_RES_BY;
    const long long plane_size = (long long)H * W;
    for (int tid = 0; tid < nthreads; ++tid) ferret_build_table(table, mean, std, tid, nthreads);
    ferret_emulate_3x3(
        grid, N, [&](int x0, int y0) { return ferret_rgb_interior(image, H, W, x0, y0); },
        [&](long long n, int x0, int y0, bool interior, int tx, int ty) {
            if (interior)
                ferret_rgb_stage_interior(image + n * plane_size * 3, W, x0, y0, table, tile, ty * FERRET_RES_BX + tx);
            else
                ferret_res_stage_rgb(image + n * plane_size * 3, H, W, x0, y0, table, tile, tx, ty);
        },
        [&](long long n, int x0, int y0, bool interior, int tx, int ty) {
            if (interior)
                ferret_rgb_outputs<false>(tile, out + n * 3 * plane_size, plane_size, H, W, x0, y0, tx, ty);
            else
                ferret_rgb_outputs<true>(tile, out + n * 3 * plane_size, plane_size, H, W, x0, y0, tx, ty);
        });
    return FERRET_OK;
}

extern "C" int preprocess_lpd_emulate(const unsigned char* image, float* out, int N, int H, int W, const float* mean,
                                      const float* std, const int* grid, const int* block, long long smem_bytes) {
    return ferret_preprocess_emulate(image, out, N, H, W, mean, std, grid, block);
}
extern "C" int preprocess_lpd_f16_emulate(const unsigned char* image, unsigned short* out, int N, int H, int W,
                                          const float* mean, const float* std, const int* grid, const int* block,
                                          long long smem_bytes) {
    return ferret_preprocess_emulate(image, out, N, H, W, mean, std, grid, block);
}

template <class T>
static int ferret_normalize_emulate(const unsigned char* image, T* out, int N, int H, int W, const float* mean,
                                    const float* std, const int* grid, const int* block, long long smem_bytes) {
    const int err = ferret_check_launch(grid, block, 0, smem_bytes);
    if (err) return err;
    if (block[1] != 1) return FERRET_EBLOCK;
    float table[3 * 256];
    for (int tid = 0; tid < block[0]; ++tid) ferret_build_table(table, mean, std, tid, block[0]);
    const int HW = H * W;
    const bool fast = ferret_normalize_fast(image, out, HW);
    for (int gz = 0; gz < grid[2]; ++gz)
        for (int gx = 0; gx < grid[0]; ++gx)
            for (long long n = gz; n < N; n += grid[2])
                for (int tx = 0; tx < block[0]; ++tx) {
                    const long long first = ((long long)gx * block[0] + tx) * FERRET_NORM_PIXELS;
                    if (first >= HW) continue;
                    if (fast)
                        ferret_normalize_quad(image + n * HW * 3, out + n * 3 * HW, HW, (int)first, table);
                    else
                        ferret_normalize_pixels(image + n * HW * 3, out + n * 3 * HW, HW, (int)first, table);
                }
    return FERRET_OK;
}

extern "C" int normalize_emulate(const unsigned char* image, float* out, int N, int H, int W, const float* mean,
                                 const float* std, const int* grid, const int* block, long long smem_bytes) {
    return ferret_normalize_emulate(image, out, N, H, W, mean, std, grid, block, smem_bytes);
}
extern "C" int normalize_f16_emulate(const unsigned char* image, unsigned short* out, int N, int H, int W,
                                     const float* mean, const float* std, const int* grid, const int* block,
                                     long long smem_bytes) {
    return ferret_normalize_emulate(image, out, N, H, W, mean, std, grid, block, smem_bytes);
}

// The device instructions the host build implements, on arrays, for tests against their specifications.
extern "C" void ferret_f2h_host(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = ferret_f2h(in[i]);
}
extern "C" void ferret_h2f_host(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = ferret_h2f(in[i]);
}
extern "C" void ferret_cvt_f16x2_host(const float* a, const float* b, unsigned int* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = ferret_cvt_f16x2(a[i], b[i]);
}
extern "C" void ferret_byte_perm_host(const unsigned int* x, const unsigned int* y, const unsigned int* s,
                                      unsigned int* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = ferret_byte_perm(x[i], y[i], s[i]);
}
// op: 0 min, 1 max; on float32 (ferret_fmin/ferret_fmax, FMNMX) or packed halves (min/max.f16x2).
extern "C" void ferret_minmax_f32_host(const float* a, const float* b, float* out, long long n, int op) {
    for (long long i = 0; i < n; ++i) out[i] = op ? ferret_fmax(a[i], b[i]) : ferret_fmin(a[i], b[i]);
}
extern "C" void ferret_minmax_f16x2_host(const unsigned int* a, const unsigned int* b, unsigned int* out, long long n,
                                         int op) {
    for (long long i = 0; i < n; ++i) {
        const FerretHalf2 x = {a[i]}, y = {b[i]};
        out[i] = (op ? ferret_max(x, y) : ferret_min(x, y)).bits;
    }
}
// ferret_pack then ferret_unpack, and ferret_store_rows2 / ferret_store4_global on float16: the lane order of
// the code the kernels share, on its own.
extern "C" void ferret_pack_host(const float* lane0, const float* lane1, unsigned int* out, long long n) {
    for (long long i = 0; i < n; ++i) {
        FerretHalf2 p;
        ferret_pack(lane0[i], lane1[i], p);
        out[i] = p.bits;
    }
}
extern "C" void ferret_unpack_host(const unsigned int* in, float* lane0, float* lane1, long long n) {
    for (long long i = 0; i < n; ++i) ferret_unpack(FerretHalf2{in[i]}, lane0[i], lane1[i]);
}

#endif  // FERRET_HOST_BUILD
