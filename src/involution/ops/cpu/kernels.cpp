// Involution on the CPU (Li et al., CVPR 2021, Eq. 4): forward, input gradient, kernel gradient,
// and the fused op's passes, which generate each pixel's kernel from its hidden features (the
// span, Eq. 6) inside the kernels instead of reading a stored (B, G, K^n, *out) kernel map.
//
// Compiled on first use by build.py with the system C++ compiler (-O3 -march=native, and
// -fopenmp where the compiler has it) and called through ctypes. It includes no torch header and
// needs no C++ runtime (no exceptions, no new): the library depends on libc and the OpenMP
// runtime alone and is vectorized for the CPU it runs on through GCC's generic vector types (8
// lanes: one AVX2 register of float32, half an AVX-512 one, two SSE ones; the compiler maps them
// to whatever -march=native offers).
//
// One storage type per compilation: INVOLUTION_DTYPE is 0 (float32), 1 (float64) or 2
// (bfloat16), and the entry points carry the type's name (involution_forward_float32, ...).
// build.py builds one library per type, on the first use of that type.
//
// Shapes. Geometry is 3D; 1D and 2D problems arrive with leading spatial sizes of 1. Tensors
// come as a base pointer and element strides, in any layout:
//   features (input, output and their gradients): (B, C, D, H, W)
//   kernels and kernel gradients:                 (B, G, T, D, H, W), T = KD * KH * KW taps,
//                                                 tap t = (kd * KH + kh) * KW + kw.
//
// Blocked layout inside. The operand read at every tap (the input; grad_out in grad_input) is
// copied row by row into a small per-thread cache (RowCache): per group, channels innermost,
// zero-padded, in the accumulation type. A row is copied once, for all groups at once (a
// channels-last one in memory order), and then read by all the K rows of results that need it,
// from L1/L2. The copy is what makes every layout fast: a channels-last tensor is copied as
// contiguous runs, an NCHW one is transposed on the way, and the zero padding removes all bounds
// checks from the inner loops. (Reading channels-last tensors in place was several times slower:
// with 2^n channels, the pixels of a group lie 2^n * 4 bytes apart and fall into a few L1 sets.)
//
// Inner loops. Each output pixel of a group is K^n broadcast multiply-adds of the group's
// channel vectors (16 float32 channels: two 8-lane vectors). Several pixels are computed at
// once so that their accumulators form independent chains of fused multiply-adds. At stride 1
// (the common case; 16 channels per group, K = 3, 5 or 7), neighbouring pixels read the same
// input vectors at neighbouring taps: the sliding blocks load each once per tap row and
// multiply it into every pixel that reads it (forward and grad_input: 0.7-0.8x the time).
//
// Prefetch. In channels last, the values of one group lie a whole pixel apart: G * K^n values
// in a stored kernel, C in the results (in NCHW, a kernel's taps lie a plane apart). The
// hardware prefetchers did not follow these strides, so forward and grad_input hint the next
// group's stored kernel values (into L2) and result lines (for writing) to the cache while they
// compute the current group (prefetch()).
//
// Work split. Each entry point computes the rows of its result, a row being one (b, d, h) line
// of the output (forward, grad_kernel) or of the input (grad_input), cut into one contiguous
// range per thread of an OpenMP team (run()). Every result element is computed by one thread in
// a fixed order, so results are deterministic and do not depend on the thread count.
// grad_input is a gather over the taps that reach each input pixel: no atomics, no races.
//
// Padding follows the reference (an explicitly zero-padded input): a tap in the padding adds
// kernel * 0, so an infinite kernel value there gives NaN, as in the reference.
//
// Dtypes: float32, float64, and bfloat16 with float32 accumulation (one rounding at the end).
//
// The fused op. Forward and grad_input read kernel rows through a source (StoredKernel: a
// tensor; GeneratedKernel: rows computed from the features on first use, a few rows per thread,
// in the accumulation type). The backward through the generator (fused_grad_features) forms the
// kernel's gradient one output row at a time and multiplies it straight back into the features'
// and the span weight's gradients. The kernel map, its gradient and their memory traffic (three
// times the input's size each, at 16 channels per group and K = 7) never exist.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Bytes in a cache line (x86-64; the size the prefetch hints step by).
constexpr int64_t kLine = 64;

// Scratch memory on a cache-line boundary. malloc aligns to 16 bytes only, and glibc maps a
// large block itself 16 bytes into a page: then every other 8-lane load of a row cache spans
// two cache lines, and grad_kernel at 8x256x56x56 took 1.7x its time (BENCHMARKS.md).
inline void* scratch(size_t bytes) {
  void* p = nullptr;
  return posix_memalign(&p, kLine, bytes) == 0 ? p : nullptr;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

struct bf16 {
  uint16_t bits;
};

// Accumulation scalar and 8-lane vector of each storage type.
template <class T> struct Acc;
template <> struct Acc<float> { typedef float S; typedef f32x8 V; };
template <> struct Acc<double> { typedef double S; typedef f64x8 V; };
template <> struct Acc<bf16> { typedef float S; typedef f32x8 V; };

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16 v) {
  uint32_t u = (uint32_t)v.bits << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> bfloat16 rounds to nearest even; a NaN stays a (quiet) NaN, as in PyTorch.
inline void narrow(float a, float* p) { *p = a; }
inline void narrow(double a, double* p) { *p = a; }
inline void narrow(float a, bf16* p) {
  uint32_t u;
  memcpy(&u, &a, sizeof u);
  p->bits = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0
                                             : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline f32x8 load8(const float* p) {
  f32x8 v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline f64x8 load8(const double* p) {
  f64x8 v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline f32x8 load8(const bf16* p) {
  u16x8 h;
  memcpy(&h, p, sizeof h);
  u32x8 u = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  memcpy(&v, &u, sizeof v);
  return v;
}

inline void store8(float* p, f32x8 v) { memcpy(p, &v, sizeof v); }
inline void store8(double* p, f64x8 v) { memcpy(p, &v, sizeof v); }
inline void store8(bf16* p, f32x8 v) {
  u32x8 u;
  memcpy(&u, &v, sizeof u);
  u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  rounded = ((u & 0x7fffffffu) > 0x7f800000u) ? (u32x8){} + 0x7fc0u : rounded;
  u16x8 h = __builtin_convertvector(rounded, u16x8);
  memcpy(p, &h, sizeof h);
}

// 8 lanes to p, p + step, ...: one vector store when they are contiguous.
template <class T>
inline void store8(T* p, int64_t step, typename Acc<T>::V v) {
  if (step == 1) {
    store8(p, v);
    return;
  }
  for (int j = 0; j < 8; ++j) narrow(v[j], p + j * step);
}

// r[j] = sum of the lanes of p[j]: three rounds of pairwise sums of shuffled vectors (within
// 128-bit halves, then across them) instead of eight separate horizontal sums. Always inlined:
// GCC called it, and passing p through memory made the kernel gradient a third slower.
template <class V>
__attribute__((always_inline)) inline V sum_lanes8(const V* p) {
  V h[4], q[2];
  for (int i = 0; i < 4; ++i) {
    V a = p[2 * i], b = p[2 * i + 1];
    h[i] = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  }
  for (int i = 0; i < 2; ++i) {
    V a = h[2 * i], b = h[2 * i + 1];
    q[i] = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  }
  return __builtin_shufflevector(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// Transposes the 8x8 block p in place: p[j][i] = p[i][j] before. Three rounds of shuffles:
// pairs of rows interleaved, then pairs of pairs, then the 128-bit halves exchanged.
template <class V>
__attribute__((always_inline)) inline void transpose8(V* p) {
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(p[i], p[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(p[i], p[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] =
          __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    p[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    p[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// The sum of the lanes of one vector.
template <class V>
__attribute__((always_inline)) inline auto sum_lanes(V v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

// A block of channels held in registers: LANES = 8 (vectors) or 1 (a scalar), of type S.
template <class S, int LANES> struct Lanes;
template <class S> struct Lanes<S, 8> {
  typedef typename Acc<S>::V V;
  static V load(const S* p) { return load8(p); }
  template <class T> static void store(T* p, int64_t step, V v) { store8(p, step, v); }
};
template <class S> struct Lanes<S, 1> {
  typedef S V;
  static V load(const S* p) { return *p; }
  template <class T> static void store(T* p, int64_t, V v) { narrow(v, p); }
};

// Pixels computed together: independent accumulator chains hide the FMA latency. float64
// vectors take twice the registers, so half as many.
template <class S> constexpr int pixels() { return sizeof(S) == 8 ? 2 : 4; }

// Keeps v in a register from here on: a vector loaded once to be multiplied into several
// accumulators, whose load GCC would otherwise fold into every multiply-add again (a load each).
// Where the vector does not fit one register (no AVX), nothing is asked.
template <class V>
__attribute__((always_inline)) inline void in_register(V& v) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) asm("" : "+x"(v));
#else
  (void)v;
#endif
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// Whether a (B, C, D, H, W) tensor with strides st has its channels apart and its pixels
// adjacent along a row (NCHW).
inline bool channels_apart(const int64_t* st) { return st[4] == 1 && st[1] != 1; }

}  // namespace

extern "C" {

// 42 eight-byte fields, filled by launch._problem.
struct Problem {
  const void* a;  // forward, grad_kernel: input; grad_input: grad_out
  const void* b;  // forward, grad_input: kernel; grad_kernel: grad_out
  void* out;      // output, grad_input or grad_kernel
  // (B, C, D, H, W, -) strides of features, (B, G, T, D, H, W) of kernels
  int64_t a_stride[6];
  int64_t b_stride[6];
  int64_t out_stride[6];
  int64_t batch, channels, groups;
  int64_t in_size[3], out_size[3];
  int64_t kernel_size[3], stride[3], padding[3], dilation[3];
};

// The fused op's extra operands (kernels generated from features), filled by launch._fused.
struct Fused {
  const void* features;   // (B, R, OD, OH, OW), the hidden features on the output grid
  const void* weight;     // (G * T, R), the span's weight
  const void* bias;       // (G * T,), or null
  void* grad_features;    // backward: (B, R, OD, OH, OW)
  void* partials;         // backward: (chunks, G * T * (R + 1)) in the accumulation type
  int64_t features_stride[6];
  int64_t grad_features_stride[6];
  int64_t weight_stride[2];
  int64_t hidden;         // R
  int64_t chunk_rows;     // backward: rows per chunk of partial sums
};

}  // extern "C"

namespace {

struct Geometry {
  int64_t G, cg;
  int64_t ID, IH, IW, OD, OH, OW;
  int64_t KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW;
  explicit Geometry(const Problem& p)
      : G(p.groups), cg(p.channels / p.groups),
        ID(p.in_size[0]), IH(p.in_size[1]), IW(p.in_size[2]),
        OD(p.out_size[0]), OH(p.out_size[1]), OW(p.out_size[2]),
        KD(p.kernel_size[0]), KH(p.kernel_size[1]), KW(p.kernel_size[2]),
        SD(p.stride[0]), SH(p.stride[1]), SW(p.stride[2]),
        PD(p.padding[0]), PH(p.padding[1]), PW(p.padding[2]),
        DD(p.dilation[0]), DH(p.dilation[1]), DW(p.dilation[2]) {}
};

// Copies n contiguous values, n a multiple of 8, as S.
template <class S, class T>
inline void copy_vectors(const T* src, int64_t n, S* dst) {
  for (int64_t c = 0; c < n; c += 8) store8(dst + c, load8(src + c));
}

// One 8x8 block through registers: dst[j * dj + i] = src[i * si + j], i, j < 8, as D.
template <class D, class T>
__attribute__((always_inline)) inline void copy_transposed(const T* src, int64_t si, D* dst,
                                                           int64_t dj) {
  decltype(load8(src)) tile[8];
  for (int i = 0; i < 8; ++i) tile[i] = load8(src + i * si);
  transpose8(tile);
  for (int j = 0; j < 8; ++j) store8(dst + j * dj, tile[j]);
}

// Copies n pixels of cg channels, src[i * sp + c * sc], to dst[c * ds + i]: channel-major, as
// D. Where the channels are contiguous (sc = 1), blocks of 8 pixels and 8 channels go through
// registers; the rest value by value.
template <class D, class T>
inline void pack_channels(const T* src, int64_t sp, int64_t sc, int64_t n, int64_t cg, D* dst,
                          int64_t ds) {
  const int64_t n8 = sc == 1 ? n / 8 * 8 : 0, c8 = cg / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8)
    for (int64_t c = 0; c < c8; c += 8) copy_transposed(src + i * sp + c, sp, dst + c * ds + i, ds);
  for (int64_t c = c8; c < cg; ++c)
    for (int64_t i = 0; i < n8; ++i) narrow(widen(src[i * sp + c * sc]), dst + c * ds + i);
  for (int64_t c = 0; c < cg; ++c)
    for (int64_t i = n8; i < n; ++i) narrow(widen(src[i * sp + c * sc]), dst + c * ds + i);
}

// Copies n pixels of cg channels, src[i * sp + c * sc], to dst[i * cg + c] as S.
template <class S, class T>
inline void pack_pixels(const T* src, int64_t sp, int64_t sc, int64_t n, int64_t cg, S* dst) {
  if (sc == 1 && cg % 8 == 0) {
    for (int64_t i = 0; i < n; ++i) copy_vectors(src + i * sp, cg, dst + i * cg);
  } else if (sc == 1 && cg >= 4 && cg < 8 && sp + cg >= 8) {
    // A few contiguous values per pixel (a kernel row of 4 to 7 taps): one 8-lane copy each.
    // It reads past the pixel into the next one (never past the last pixel) and writes into
    // the next pixel's place, which that pixel's copy then overwrites; the last pixel is
    // copied one by one.
    for (int64_t i = 0; i + 1 < n; ++i) store8(dst + i * cg, load8(src + i * sp));
    for (int64_t c = 0; c < cg && n > 0; ++c) dst[(n - 1) * cg + c] = widen(src[(n - 1) * sp + c]);
  } else if (sc == 1) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < cg; ++c) dst[i * cg + c] = widen(src[i * sp + c]);
  } else {  // channels apart (NCHW): read along the row, write across
    // Blocks of 8 adjacent pixels and 8 channels through registers, the rest value by value.
    const int64_t n8 = sp == 1 ? n / 8 * 8 : 0, c8 = cg / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8)
      for (int64_t c = 0; c < c8; c += 8)
        copy_transposed(src + c * sc + i, sc, dst + i * cg + c, cg);
    for (int64_t c = c8; c < cg; ++c)
      for (int64_t i = 0; i < n8; ++i) dst[i * cg + c] = widen(src[i * sp + c * sc]);
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t i = n8; i < n; ++i) dst[i * cg + c] = widen(src[i * sp + c * sc]);
  }
}

// Rows of one (B, C, D, H, W) operand in the blocked layout, each copied once. Per group, a ring
// of nd * nh slots, each `width` columns from column col0 (zeros outside the tensor) of cg
// channels, in the accumulation type. Row (d, h) lives in slot (d mod nd, h mod nh): the rows
// one row of results reads (at most nd consecutive d and nh consecutive h) never evict each
// other, and the next rows of results find most of them already there. A channel-major cache
// holds each row as cg rows of `width` columns instead (grad_kernel by columns).
template <class S, class T, bool CHANNEL_MAJOR = false>
class RowCache {
 public:
  RowCache(const T* src, const int64_t* st, int64_t G, int64_t D, int64_t H, int64_t W,
           int64_t cg, int64_t col0, int64_t width, int64_t nd, int64_t nh)
      : src_(src), st_(st), G_(G), D_(D), H_(H), W_(W), cg_(cg), col0_(col0), width_(width),
        nd_(nd), nh_(nh), slots_(G * nd * nh) {
    data_ = (S*)scratch(sizeof(S) * (slots_ + 1) * width * cg);
    tag_ = (int64_t*)scratch(sizeof(int64_t) * nd * nh);
    if (!ok()) return;
    memset(zeros(), 0, sizeof(S) * width * cg);
    for (int64_t i = 0; i < nd * nh; ++i) tag_[i] = -1;
  }
  RowCache(const RowCache&) = delete;
  RowCache& operator=(const RowCache&) = delete;
  ~RowCache() {
    free(data_);
    free(tag_);
  }
  bool ok() const { return data_ && tag_; }
  S* zeros() const { return data_ + slots_ * width_ * cg_; }
  int64_t width() const { return width_; }

  // Row (b, d, h) of group gi: copied on first use, for all groups at once (every caller reads
  // each row for all groups in turn); the zero row outside the tensor. The pointer stays valid
  // until row() is asked for another row that maps to the same slot, in any group.
  const S* row(int64_t gi, int64_t b, int64_t d, int64_t h) {
    if (d < 0 || d >= D_ || h < 0 || h >= H_) return zeros();
    const int64_t slot = (d % nd_) * nh_ + h % nh_, key = (b * D_ + d) * H_ + h;
    if (tag_[slot] != key) {
      tag_[slot] = key;
      fill(slot, b, d, h);
    }
    return data_ + (gi * nd_ * nh_ + slot) * width_ * cg_;
  }

 private:
  // Copies row (b, d, h) of every group into its slot. A channels-last row is read in memory
  // order, pixel by pixel across the groups: one sequential stream, where a group at a time
  // would read lines a pixel apart.
  void fill(int64_t slot, int64_t b, int64_t d, int64_t h) {
    const int64_t lo = clamp(-col0_, 0, width_), hi = clamp(W_ - col0_, lo, width_);
    const int64_t group_slots = nd_ * nh_, row_size = width_ * cg_;
    const T* from = src_ + b * st_[0] + d * st_[2] + h * st_[3] + (col0_ + lo) * st_[4];
    if constexpr (CHANNEL_MAJOR) {
      for (int64_t gi = 0; gi < G_; ++gi) {
        S* dst = data_ + (gi * group_slots + slot) * row_size;
        for (int64_t c = 0; c < cg_; ++c) {
          memset(dst + c * width_, 0, sizeof(S) * lo);
          memset(dst + c * width_ + hi, 0, sizeof(S) * (width_ - hi));
        }
        pack_channels(from + gi * cg_ * st_[1], st_[4], st_[1], hi - lo, cg_, dst + lo, width_);
      }
      return;
    }
    for (int64_t gi = 0; gi < G_; ++gi) {
      S* dst = data_ + (gi * group_slots + slot) * row_size;
      memset(dst, 0, sizeof(S) * lo * cg_);
      memset(dst + hi * cg_, 0, sizeof(S) * (width_ - hi) * cg_);
    }
    if (st_[1] == 1 && cg_ % 8 == 0) {
      for (int64_t i = lo; i < hi; ++i, from += st_[4])
        for (int64_t gi = 0; gi < G_; ++gi) {
          S* dst = data_ + (gi * group_slots + slot) * row_size + i * cg_;
          copy_vectors(from + gi * cg_, cg_, dst);
        }
      return;
    }
    for (int64_t gi = 0; gi < G_; ++gi)
      pack_pixels(from + gi * cg_ * st_[1], st_[4], st_[1], hi - lo, cg_,
                  data_ + (gi * group_slots + slot) * row_size + lo * cg_);
  }

  const T* src_;
  const int64_t* st_;
  int64_t G_, D_, H_, W_, cg_, col0_, width_, nd_, nh_, slots_;
  S* data_;
  int64_t* tag_;
};

// ---------------------------------------------------------------------------------------------
// Small matrix products in the accumulation type, for the fused op's span and its gradients:
//   C[p, c] = I[p, c] + sum_k A[p, k] * B[k, c],  p < n, c < N, k < K,
// A[p, k] = a[p * ap + k * ak] (any strides, so A may be a transposed buffer), B[k, c] =
// b[k * N + c] (packed), I[p, c] = init[p * ip + c] or 0 when init is null (ip = 0 broadcasts a
// bias), C[p, c] = out[p * op + c * oc]. init may be out itself (accumulation in place: every
// block reads its own values before writing them). Vectorized along c, P rows at a time.

// Rows p ... p + P - 1 of C, columns c ... c + LANES * NV - 1.
template <class S, class T, int LANES, int NV, int P>
inline void product_block(int64_t p, int64_t c, const S* a, int64_t ap, int64_t ak, const S* b,
                          int64_t N, int64_t K, const S* init, int64_t ip, T* out, int64_t op,
                          int64_t oc) {
  typedef Lanes<S, LANES> L;
  a += p * ap;
  b += c;
  out += p * op + c * oc;
  if (init) init += p * ip + c;
  typename L::V acc[P][NV];
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v)
      acc[j][v] = init ? L::load(init + j * ip + v * LANES) : typename L::V{};
  for (int64_t k = 0; k < K; ++k) {
    typename L::V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = L::load(b + k * N + v * LANES);
    for (int j = 0; j < P; ++j) {
      const S x = a[j * ap + k * ak];
      for (int v = 0; v < NV; ++v) acc[j][v] += x * bv[v];
    }
  }
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) L::store(out + j * op + v * LANES * oc, oc, acc[j][v]);
}

// One block of LANES * NV columns from column c, for all n rows: B's panel of those columns stays
// in L1 while the rows pass (B may be the whole span weight, larger than L2).
template <class S, class T, int LANES, int NV>
inline void product_columns(int64_t n, const S* a, int64_t ap, int64_t ak, const S* b, int64_t N,
                            int64_t K, const S* init, int64_t ip, T* out, int64_t op, int64_t oc,
                            int64_t c) {
  // 6 rows of two float32 vectors: 12 accumulators, 2 loads of B and 6 broadcasts per 12 FMAs.
  constexpr int P = sizeof(S) == 8 ? 2 : 6;
  int64_t p = 0;
  for (; p + P <= n; p += P)
    product_block<S, T, LANES, NV, P>(p, c, a, ap, ak, b, N, K, init, ip, out, op, oc);
  // The last rows 4 and 2 at a time where they can be: a row alone has only NV chains of
  // multiply-adds, too few to hide their latency (the span's gradients at R = 4: 4 rows).
  if (P > 4 && p + 4 <= n) {
    product_block<S, T, LANES, NV, 4>(p, c, a, ap, ak, b, N, K, init, ip, out, op, oc);
    p += 4;
  }
  if (P > 2 && p + 2 <= n) {
    product_block<S, T, LANES, NV, 2>(p, c, a, ap, ak, b, N, K, init, ip, out, op, oc);
    p += 2;
  }
  for (; p < n; ++p)
    product_block<S, T, LANES, NV, 1>(p, c, a, ap, ak, b, N, K, init, ip, out, op, oc);
}

template <class S, class T>
void product(int64_t n, const S* a, int64_t ap, int64_t ak, const S* b, int64_t N, int64_t K,
             const S* init, int64_t ip, T* out, int64_t op, int64_t oc) {
  int64_t c = 0;
  for (; c + 16 <= N; c += 16)
    product_columns<S, T, 8, 2>(n, a, ap, ak, b, N, K, init, ip, out, op, oc, c);
  if (c + 8 <= N) {
    product_columns<S, T, 8, 1>(n, a, ap, ak, b, N, K, init, ip, out, op, oc, c);
    c += 8;
  }
  for (; c < N; ++c) product_columns<S, T, 1, 1>(n, a, ap, ak, b, N, K, init, ip, out, op, oc, c);
}

// ---------------------------------------------------------------------------------------------
// Where forward and grad_input read the kernel. row(b, d, h) points at the kernel of output row
// (b, d, h); its value for group gi, tap t and column ow is at gi * group + t * tap + ow * pixel.

// A kernel tensor (B, G, T, D, H, W), read where it lies.
template <class T>
struct StoredKernel {
  typedef T Value;
  const T* k;
  const int64_t* ks;
  int64_t group, tap, pixel;
  StoredKernel(const T* k_, const int64_t* ks_)
      : k(k_), ks(ks_), group(ks_[1]), tap(ks_[2]), pixel(ks_[5]) {}
  static constexpr bool stored = true;  // rows read from memory, worth prefetching
  bool ok() const { return true; }
  const T* row(int64_t b, int64_t d, int64_t h) const {
    return k + b * ks[0] + d * ks[3] + h * ks[4];
  }
};

// Kernels generated from the features (the fused op; Li et al., CVPR 2021, Eq. 6): per pixel,
// kernel[j] = bias[j] + sum_r weight[j, r] * features[r], j = gi * T + t. A row is computed on
// first use into a ring of nd * nh slots (as in RowCache: the rows that one row of results reads
// never evict each other), pixel-major (OW, G * T), in the accumulation type; the kernel is never
// rounded to the storage type nor written to memory beyond this per-thread buffer. A pixel's
// G * T values are padded to a multiple of 8 (the weight's extra columns are zero): each pixel
// then starts on a vector, and the product computes whole vectors only.
template <class S, class T>
class GeneratedKernel {
 public:
  typedef S Value;
  int64_t group, tap, pixel;

  GeneratedKernel(const Problem& p, const Fused& f, int64_t nd, int64_t nh)
      : group(0), tap(1), pixel(0), feat_((const T*)f.features), fs_(f.features_stride),
        R_(f.hidden), OD_(p.out_size[0]), OH_(p.out_size[1]), OW_(p.out_size[2]), nd_(nd),
        nh_(nh), data_(nullptr), wt_(nullptr), bias_(nullptr), fbuf_(nullptr), tag_(nullptr) {
    const int64_t taps = p.kernel_size[0] * p.kernel_size[1] * p.kernel_size[2];
    const int64_t GT = p.groups * taps;
    group = taps;
    pixel = (GT + 7) / 8 * 8;
    data_ = (S*)scratch(sizeof(S) * ((nd * nh * OW_ + R_ + 1) * pixel + OW_ * R_));
    tag_ = (int64_t*)scratch(sizeof(int64_t) * nd * nh);
    if (!ok()) return;
    wt_ = data_ + nd * nh * OW_ * pixel;
    bias_ = wt_ + R_ * pixel;
    fbuf_ = bias_ + pixel;
    const T* w = (const T*)f.weight;
    const T* bias = (const T*)f.bias;
    for (int64_t j = 0; j < pixel; ++j) {
      for (int64_t r = 0; r < R_; ++r)
        wt_[r * pixel + j] =
            j < GT ? widen(w[j * f.weight_stride[0] + r * f.weight_stride[1]]) : S(0);
      bias_[j] = j < GT && bias ? widen(bias[j]) : S(0);
    }
    for (int64_t i = 0; i < nd * nh; ++i) tag_[i] = -1;
  }
  GeneratedKernel(const GeneratedKernel&) = delete;
  GeneratedKernel& operator=(const GeneratedKernel&) = delete;
  ~GeneratedKernel() {
    free(data_);
    free(tag_);
  }
  static constexpr bool stored = false;  // rows computed on first use
  bool ok() const { return data_ && tag_; }

  const S* row(int64_t b, int64_t d, int64_t h) {
    const int64_t slot = (d % nd_) * nh_ + h % nh_, key = (b * OD_ + d) * OH_ + h;
    S* dst = data_ + slot * OW_ * pixel;
    if (tag_[slot] == key) return dst;
    tag_[slot] = key;
    pack_pixels(feat_ + b * fs_[0] + d * fs_[2] + h * fs_[3], fs_[4], fs_[1], OW_, R_, fbuf_);
    product(OW_, fbuf_, R_, 1, wt_, pixel, R_, bias_, 0, dst, pixel, 1);
    return dst;
  }

 private:
  const T* feat_;
  const int64_t* fs_;
  int64_t R_, OD_, OH_, OW_, nd_, nh_;
  S *data_, *wt_, *bias_, *fbuf_;
  int64_t* tag_;
};

// ---------------------------------------------------------------------------------------------
// forward: out[b, c, o] = sum_t kernel[b, g(c), t, o] * input[b, c, o * s - p + tap_t * d]

// P output pixels, one block of LANES * NV channels. rows[r] + xo: the cached input row of tap
// row r (r = kd * KH + kh) at the first pixel's tap kw = 0, in the block's first channel; xp:
// step between the pixels, xw: step between taps. k[ko]: the first pixel's kernel at tap 0, kt
// its tap stride, kp the step between pixels. out: the first pixel's block; op: step between
// pixels; oc: channel stride.
template <class S, class T, class K, int LANES, int NV, int P>
inline void forward_block(const S* const* rows, int64_t nrows, int64_t xo, int64_t xp,
                          int64_t xw, int64_t KW, const K* k, int64_t ko, int64_t kt, int64_t kp,
                          T* out, int64_t op, int64_t oc) {
  typedef Lanes<S, LANES> L;
  typename L::V acc[P][NV];
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = typename L::V{};
  for (int64_t r = 0; r < nrows; ++r) {
    const S* xr = rows[r] + xo;
    const K* kr = k + ko + r * KW * kt;
    for (int64_t kw = 0; kw < KW; ++kw) {
      for (int j = 0; j < P; ++j) {
        const S w = widen(kr[kw * kt + j * kp]);
        const S* xq = xr + kw * xw + j * xp;
        for (int v = 0; v < NV; ++v) acc[j][v] += w * L::load(xq + v * LANES);
      }
    }
  }
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) L::store(out + j * op + v * LANES * oc, oc, acc[j][v]);
}

// P pixels of one group of 16 channels where pixel j + 1 reads at tap t - 1 the vector that
// pixel j reads at tap t (stride and dilation equal along the row: 1 and 1 above all), KW taps
// per tap row: pixel j's sum over tap rows r and taps t of weight * rows[r][xo + (j + t) * STEP].
// Each vector of a tap row is loaded once and multiplied into every pixel that reads it: P + KW
// - 1 loads instead of P * KW. k: the first tap row's weights, krow apart; at(kr, j, t): pixel
// j's weight of tap t in tap row kr. Every pixel adds its taps in the order of the generic
// blocks (r, then t ascending), so the results are theirs, bit for bit.
template <class S, class T, class K, int P, int KW, int STEP, class At>
inline void sliding_block(const S* const* rows, int64_t nrows, int64_t xo, const K* k,
                          int64_t krow, At at, T* out, int64_t op, int64_t oc) {
  typedef typename Acc<S>::V V;
  V acc[P][2];
  for (int j = 0; j < P; ++j) acc[j][0] = acc[j][1] = V{};
  for (int64_t r = 0; r < nrows; ++r, k += krow) {
    const S* xr = rows[r] + xo;
#pragma GCC unroll 16
    for (int q = 0; q < P + KW - 1; ++q) {
      V x0 = load8(xr + q * STEP), x1 = load8(xr + q * STEP + 8);
      in_register(x0);
      in_register(x1);
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) {
        const int t = q - j;
        if (t < 0 || t >= KW) continue;
        const S w = widen(at(k, j, t));
        acc[j][0] += w * x0;
        acc[j][1] += w * x1;
      }
    }
  }
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < 2; ++v) store8(out + j * op + v * 8 * oc, oc, acc[j][v]);
}

// The forward's sliding block, for a kernel whose taps (PIXEL_MAJOR: kt = 1) or pixels (kp = 1)
// are contiguous, so that the weights lie at compile-time offsets.
template <class S, class T, class K, int P, int KW, bool PIXEL_MAJOR>
inline void forward_block_sliding(const S* const* rows, int64_t nrows, int64_t xo, const K* k,
                                  int64_t ko, int64_t kt, int64_t kp, T* out, int64_t op,
                                  int64_t oc) {
  auto at = [=](const K* kr, int j, int t) {
    return PIXEL_MAJOR ? kr[j * kp + t] : kr[t * kt + j];
  };
  sliding_block<S, T, K, P, KW, 16>(rows, nrows, xo, k + ko, KW * kt, at, out, op, oc);
}

// Calls f(Int<KW>()) for KW = 3, 5 or 7, the row sizes the sliding blocks are built for; false
// (and no call) for another KW.
template <int N> struct Int { static constexpr int value = N; };
template <class F>
inline bool for_sliding_kw(int64_t KW, F f) {
  switch (KW) {
    case 3: f(Int<3>()); return true;
    case 5: f(Int<5>()); return true;
    case 7: f(Int<7>()); return true;
    default: return false;
  }
}

// Hints the cache lines of the values p[i * si + j * sj], i < ni, j < nj, to the cache (reads
// into L2; WRITE: for writing), one hint per line along a contiguous dimension (si or sj = 1),
// else per value. Always inlined: GCC drops calls to a function whose only effect is a hint.
template <bool WRITE, class T>
__attribute__((always_inline)) inline void prefetch(const T* p, int64_t ni, int64_t si,
                                                    int64_t nj, int64_t sj) {
  if (si == 1 && sj != 1) {  // the contiguous dimension inside
    const int64_t n = ni, s = si;
    ni = nj, si = sj, nj = n, sj = s;
  }
  const int64_t bytes = (sj == 1 ? nj : 1) * (int64_t)sizeof(T), runs = sj == 1 ? 1 : nj;
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t j = 0; j < runs; ++j) {
      const uintptr_t first = (uintptr_t)(p + i * si + j * sj);
      for (uintptr_t line = first & ~(uintptr_t)(kLine - 1); line < first + bytes; line += kLine)
        __builtin_prefetch((const void*)line, WRITE, 2);
    }
}

// The channel blocks of one group: 16 channels at a time, then 8, then one by one.
template <class S, class T, class K, int P>
inline void forward_pixels(const S* const* rows, int64_t nrows, int64_t xo, int64_t xp,
                           int64_t xw, int64_t KW, int64_t cg, const K* k, int64_t ko,
                           int64_t kt, int64_t kp, T* out, int64_t op, int64_t oc) {
  int64_t c = 0;
  if constexpr (P > 1) {  // the sliding blocks, where they apply (one pixel gains nothing)
    if (xw == xp && xp == 16 && cg == 16) {
      if (kt == 1 && for_sliding_kw(KW, [&](auto kw) {
            forward_block_sliding<S, T, K, P, decltype(kw)::value, true>(rows, nrows, xo, k, ko,
                                                                         kt, kp, out, op, oc);
          }))
        return;
      if (kp == 1 && for_sliding_kw(KW, [&](auto kw) {
            forward_block_sliding<S, T, K, P, decltype(kw)::value, false>(rows, nrows, xo, k, ko,
                                                                          kt, kp, out, op, oc);
          }))
        return;
    }
  }
  for (; c + 16 <= cg; c += 16)
    forward_block<S, T, K, 8, 2, P>(rows, nrows, xo + c, xp, xw, KW, k, ko, kt, kp,
                                    out + c * oc, op, oc);
  if (c + 8 <= cg) {
    forward_block<S, T, K, 8, 1, P>(rows, nrows, xo + c, xp, xw, KW, k, ko, kt, kp,
                                    out + c * oc, op, oc);
    c += 8;
  }
  for (; c < cg; ++c)
    forward_block<S, T, K, 1, 1, P>(rows, nrows, xo + c, xp, xw, KW, k, ko, kt, kp,
                                    out + c * oc, op, oc);
}

// Calls unit(row, gi) for every row in [row_begin, row_end) and every group gi. Rows outside,
// groups inside: a group-outside order kept one group's cached rows in L1, yet ran 20-30%
// slower (the kernel's and output's lines are shared between neighbouring groups).
template <class F>
inline void for_each_unit(int64_t row_begin, int64_t row_end, int64_t G, F unit) {
  for (int64_t row = row_begin; row < row_end; ++row)
    for (int64_t gi = 0; gi < G; ++gi) unit(row, gi);
}

// Whether grad_kernel goes by columns (grad_kernel_columns): stride and dilation 1 along the
// rows, a row size the blocks are built for, and a result whose pixels are adjacent along a row
// (op = 1: an NCHW kernel gradient). Measured at 8x256x56x56: 0.66x the time of
// grad_kernel_pixel into an NCHW result; into a channels-last one (pixels G * T values apart,
// so the vectors of 8 pixels went back to pixels' taps through 8x8 blocks) 1.4x, and in the
// fused backward (its kernel gradient then transposed for the products) 0.97-1.03x.
inline bool by_columns(const Geometry& g, int64_t op) {
  return g.SW == 1 && g.DW == 1 && (g.KW == 3 || g.KW == 5 || g.KW == 7) && op == 1;
}

// Output columns rounded up to whole vectors (grad_kernel by columns).
inline int64_t vector_columns(const Geometry& g) { return (g.OW + 7) / 8 * 8; }

// The input cache of forward and grad_kernel: input columns -PW ... read by the output row; for
// grad_kernel by columns, channel-major and as far as the last vector of output columns reads.
template <class S, bool CHANNEL_MAJOR = false, class T>
RowCache<S, T, CHANNEL_MAJOR> input_cache(const T* x, const int64_t* xs, const Geometry& g) {
  const int64_t width = CHANNEL_MAJOR ? vector_columns(g) + g.KW - 1
                                      : (g.OW - 1) * g.SW + (g.KW - 1) * g.DW + 1;
  return RowCache<S, T, CHANNEL_MAJOR>(x, xs, g.G, g.ID, g.IH, g.IW, g.cg, -g.PW, width,
                                       (g.KD - 1) * g.DD + 1, (g.KH - 1) * g.DH + 1);
}

// The cached input rows read by output row (b, od, oh) of group gi, one per tap row.
template <class Cache, class S>
void input_rows(Cache& cache, const Geometry& g, int64_t gi, int64_t b, int64_t od, int64_t oh,
                const S** rows) {
  for (int64_t kd = 0; kd < g.KD; ++kd)
    for (int64_t kh = 0; kh < g.KH; ++kh)
      rows[kd * g.KH + kh] =
          cache.row(gi, b, od * g.SD - g.PD + kd * g.DD, oh * g.SH - g.PH + kh * g.DH);
}

template <class T, class Kernel>
int forward(const Problem& p, Kernel& kernel, int64_t row_begin, int64_t row_end) {
  typedef typename Acc<T>::S S;
  typedef typename Kernel::Value K;
  constexpr int P = pixels<S>();
  const Geometry g(p);
  const int64_t* os = p.out_stride;
  RowCache<S, T> cache = input_cache<S>((const T*)p.a, p.a_stride, g);
  const int64_t nrows = g.KD * g.KH;
  const S** rows = (const S**)scratch(sizeof(S*) * nrows);
  // A result whose pixels are adjacent and channels apart (NCHW) is computed into a row of
  // pixels (channels innermost), then copied across 8 channels by 8 pixels: written in place,
  // each vector of channels went out as 8 single values.
  const bool by_row = channels_apart(os);
  T* row_buf = by_row ? (T*)scratch(sizeof(T) * g.OW * g.cg) : nullptr;
  if (!cache.ok() || !kernel.ok() || !rows || (by_row && !row_buf)) {
    free(rows);
    free(row_buf);
    return -1;
  }
  const int64_t xp = g.SW * g.cg, xw = g.DW * g.cg, taps = nrows * g.KW;
  const int64_t kt = kernel.tap, kp = kernel.pixel;
  // Pixels per hint: a block, or where pixels are contiguous (NCHW), a cache line of them.
  constexpr int64_t k_line = kLine / sizeof(K) > P ? kLine / sizeof(K) : P;
  constexpr int64_t o_line = kLine / sizeof(T) > P ? kLine / sizeof(T) : P;
  const int64_t k_run = kp == 1 ? k_line : P, o_run = os[4] == 1 ? o_line : P;
  // The unit's kernel values (when stored) and output, (b, od, oh) being row.
  auto kernel_of = [&](int64_t row, int64_t gi) {
    return kernel.row(row / g.OH / g.OD, row / g.OH % g.OD, row % g.OH) + gi * kernel.group;
  };
  auto out_of = [&](int64_t row, int64_t gi) {
    return (T*)p.out + row / g.OH / g.OD * os[0] + row / g.OH % g.OD * os[2] +
           row % g.OH * os[3] + gi * g.cg * os[1];
  };
  for_each_unit(row_begin, row_end, g.G, [&](int64_t row, int64_t gi) {
    const int64_t oh = row % g.OH, od = row / g.OH % g.OD, b = row / g.OH / g.OD;
    const K* k = kernel_of(row, gi);
    input_rows(cache, g, gi, b, od, oh, rows);
    T* o = out_of(row, gi);
    // The next unit's kernel (when stored) and output lines, hinted a block of pixels at a
    // time while this unit is computed (see Prefetch at the top).
    const int64_t next_row = gi + 1 < g.G ? row : row + 1, next_gi = gi + 1 < g.G ? gi + 1 : 0;
    const bool ahead = next_row < row_end;
    const K* next_k = nullptr;
    if constexpr (Kernel::stored) {  // a generated row would be computed (and overwritten)
      if (ahead) next_k = kernel_of(next_row, next_gi);
    }
    T* next_o = ahead ? out_of(next_row, next_gi) : nullptr;
    // Where the pixels are computed: the result, or the row buffer (op, oc its strides).
    T* dst = row_buf ? row_buf : o;
    const int64_t op = row_buf ? g.cg : os[4], oc = row_buf ? 1 : os[1];
    int64_t ow = 0;
    for (; ow + P <= g.OW; ow += P) {
      if (next_k && ow % k_run == 0)
        prefetch<false>(next_k + ow * kp, min(k_run, g.OW - ow), kp, taps, kt);
      if (next_o && ow % o_run == 0)
        prefetch<true>(next_o + ow * os[4], min(o_run, g.OW - ow), os[4], g.cg, os[1]);
      forward_pixels<S, T, K, P>(rows, nrows, ow * xp, xp, xw, g.KW, g.cg, k, ow * kp, kt, kp,
                                 dst + ow * op, op, oc);
    }
    for (; ow < g.OW; ++ow)
      forward_pixels<S, T, K, 1>(rows, nrows, ow * xp, xp, xw, g.KW, g.cg, k, ow * kp, kt, kp,
                                 dst + ow * op, op, oc);
    if (row_buf) pack_channels(row_buf, g.cg, 1, g.OW, g.cg, o, os[1]);
  });
  free(rows);
  free(row_buf);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// grad_kernel[b, g, t, o] = sum_{c in g} grad_out[b, c, o] * input[b, c, o * s - p + tap_t * d]

// The kernel gradient of one output pixel and group, over all taps. tap[t] + xo: the cached
// input of tap t for this pixel (the taps are padded to a multiple of 8 with the zero row).
// gl: the pixel's grad_out, cg channels. Each tap's dot product is a vector of partial sums;
// eight taps' vectors are folded at once (sum_lanes8). NV > 0: cg = 8 * NV, and the pixel's
// grad_out stays in registers; NV = 0: any cg.
template <class S, class T, int NV>
inline void grad_kernel_pixel(const S* const* tap, int64_t xo, int64_t taps, int64_t cg,
                              const S* gl, T* out, int64_t ot) {
  typedef typename Acc<S>::V V;
  V gv[NV > 0 ? NV : 1];
  for (int v = 0; v < NV; ++v) gv[v] = load8(gl + 8 * v);
  // The last taps, when fewer than four, are summed one at a time: cheaper than folding eight
  // vectors that are mostly the zero row's (K = 7: 49 = 6 * 8 + 1 taps).
  const int64_t folded_taps = NV > 0 && taps % 8 < 4 ? taps / 8 * 8 : taps;
  for (int64_t t = folded_taps; t < taps; ++t) {
    const S* x = tap[t] + xo;
    V part = gv[0] * load8(x);
    for (int v = 1; v < NV; ++v) part += gv[v] * load8(x + 8 * v);
    narrow(sum_lanes(part), out + t * ot);
  }
  for (int64_t t0 = 0; t0 < folded_taps; t0 += 8) {
    V part[8];
    if (NV > 0) {
      for (int j = 0; j < 8; ++j) {
        const S* x = tap[t0 + j] + xo;
        part[j] = gv[0] * load8(x);
        for (int v = 1; v < NV; ++v) part[j] += gv[v] * load8(x + 8 * v);
      }
    } else {
      for (int j = 0; j < 8; ++j) part[j] = V{};
      int64_t c = 0;
      for (; c + 8 <= cg; c += 8) {
        const V g8 = load8(gl + c);
        for (int j = 0; j < 8; ++j) part[j] += g8 * load8(tap[t0 + j] + xo + c);
      }
      for (; c < cg; ++c)
        for (int j = 0; j < 8; ++j) part[j][0] += gl[c] * tap[t0 + j][xo + c];
    }
    const V folded = sum_lanes8(part);
    if (ot == 1 && t0 + 8 <= taps) {
      store8(out + t0, folded);
    } else {
      for (int j = 0; j < 8 && t0 + j < taps; ++j) narrow(folded[j], out + (t0 + j) * ot);
    }
  }
}

// The grad_out row of unit (row, gi), row = (b, od, oh).
template <class T>
const T* grad_out_row(const T* go, const int64_t* gs, const Geometry& g, int64_t row,
                      int64_t gi) {
  return go + row / g.OH / g.OD * gs[0] + row / g.OH % g.OD * gs[2] + row % g.OH * gs[3] +
         gi * g.cg * gs[1];
}

// Room for grad_kernel_unit's rows: the tap rows, then the taps padded to a multiple of 8.
inline int64_t unit_rows(const Geometry& g) {
  return g.KD * g.KH + (g.KD * g.KH * g.KW + 7) / 8 * 8;
}

// Room for grad_kernel_unit's values: one pixel's grad_out, or by columns the unit's grad_out
// channel-major (zero past OW: zeroed once, before the first unit).
inline int64_t unit_values(const Geometry& g) { return g.cg * vector_columns(g); }

// The kernel gradient of one unit at stride and dilation 1, by columns: 8 output pixels per
// vector, dk[t * dt + ow]. xr[r]: the cached input rows, channel-major (cg rows of xw columns);
// go: grad_out, channel-major (cg rows of vector_columns). Each multiply-add serves 8 pixels of
// one tap, and no lane is summed (grad_kernel_pixel sums 16 channels' lanes per pixel and tap).
template <class S, class D, int KW>
void grad_kernel_columns(const S* const* xr, int64_t nrows, int64_t xw, const S* go, int64_t gw,
                         int64_t OW, int64_t cg, D* dk, int64_t dt) {
  typedef typename Acc<S>::V V;
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t ow = 0; ow < OW; ow += 8) {
      V acc[KW] = {};
      for (int64_t c = 0; c < cg; ++c) {
        V gv = load8(go + c * gw + ow);
        in_register(gv);
        const S* x = xr[r] + c * xw + ow;
        for (int kw = 0; kw < KW; ++kw) acc[kw] += gv * load8(x + kw);
      }
      D* d = dk + r * KW * dt + ow;
      for (int kw = 0; kw < KW; ++kw) {
        if (ow + 8 <= OW) {
          store8(d + kw * dt, acc[kw]);
        } else {
          for (int64_t j = 0; j < OW - ow; ++j) narrow(acc[kw][j], d + kw * dt + j);
        }
      }
    }
}

// The next unit's grad_out, hinted to the cache while unit (row, gi) is computed (in channels
// last its pixels lie C values apart, a stride the prefetchers did not follow: 0.9x the time of
// grad_kernel at 8x256x56x56).
template <class U>
inline void hint_next_unit(const U* go, const int64_t* gs, const Geometry& g, int64_t row,
                           int64_t gi, int64_t row_end) {
  const int64_t next_row = gi + 1 < g.G ? row : row + 1, next_gi = gi + 1 < g.G ? gi + 1 : 0;
  if (next_row < row_end)
    prefetch<false>(grad_out_row(go, gs, g, next_row, next_gi), g.OW, gs[4], g.cg, gs[1]);
}

// The kernel gradient of unit (row, gi), row = (b, od, oh) < row_end, every output pixel: from
// the group's cached input rows and grad_out go (strides gs), to out[ow * op + t * ot], pixel
// by pixel (grad_kernel_pixel). rows: unit_rows(g) pointers; gl: room for one pixel's grad_out.
template <class S, class T, class U, class G>
void grad_kernel_unit(RowCache<S, U>& cache, const Geometry& g, const G* go, const int64_t* gs,
                      int64_t row, int64_t gi, int64_t row_end, const S** rows, S* gl, T* out,
                      int64_t ot, int64_t op) {
  hint_next_unit(go, gs, g, row, gi, row_end);
  const int64_t nrows = g.KD * g.KH, taps = nrows * g.KW, xp = g.SW * g.cg;
  input_rows(cache, g, gi, row / g.OH / g.OD, row / g.OH % g.OD, row % g.OH, rows);
  const S** tap = rows + nrows;
  for (int64_t t = 0; t < taps; ++t) tap[t] = rows[t / g.KW] + (t % g.KW) * g.DW * g.cg;
  for (int64_t t = taps; t < (taps + 7) / 8 * 8; ++t) tap[t] = cache.zeros();
  const G* g_row = grad_out_row(go, gs, g, row, gi);
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    pack_pixels(g_row + ow * gs[4], 0, gs[1], 1, g.cg, gl);
    T* o = out + ow * op;
    if (g.cg == 16) {
      grad_kernel_pixel<S, T, 2>(tap, ow * xp, taps, g.cg, gl, o, ot);
    } else if (g.cg == 8) {
      grad_kernel_pixel<S, T, 1>(tap, ow * xp, taps, g.cg, gl, o, ot);
    } else {
      grad_kernel_pixel<S, T, 0>(tap, ow * xp, taps, g.cg, gl, o, ot);
    }
  }
}

// The same from a channel-major cache (by_columns: op = 1), by columns (grad_kernel_columns).
// buf: unit_values(g) values, zeroed before the first unit, for the unit's grad_out,
// channel-major, vector_columns(g) columns per channel (zero past OW).
template <class S, class T, class U>
void grad_kernel_unit(RowCache<S, U, true>& cache, const Geometry& g, const U* go,
                      const int64_t* gs, int64_t row, int64_t gi, int64_t row_end, const S** rows,
                      S* buf, T* out, int64_t ot, int64_t) {
  hint_next_unit(go, gs, g, row, gi, row_end);
  input_rows(cache, g, gi, row / g.OH / g.OD, row / g.OH % g.OD, row % g.OH, rows);
  const int64_t gw = vector_columns(g);
  pack_channels(grad_out_row(go, gs, g, row, gi), gs[4], gs[1], g.OW, g.cg, buf, gw);
  for_sliding_kw(g.KW, [&](auto kw) {
    grad_kernel_columns<S, T, decltype(kw)::value>(rows, g.KD * g.KH, cache.width(), buf, gw,
                                                   g.OW, g.cg, out, ot);
  });
}

// Not inlined into the OpenMP region that calls it: there GCC made some of its copies calls to
// memcpy, and grad_kernel at 8x256x56x56 in channels last took 1.18x the time.
template <class T, bool COLUMNS>
__attribute__((noinline)) int grad_kernel_rows(const Problem& p, int64_t row_begin,
                                               int64_t row_end) {
  typedef typename Acc<T>::S S;
  const Geometry g(p);
  const T* go = (const T*)p.b;
  const int64_t *gs = p.b_stride, *os = p.out_stride;
  auto cache = input_cache<S, COLUMNS>((const T*)p.a, p.a_stride, g);
  const S** rows = (const S**)scratch(sizeof(S*) * unit_rows(g));
  S* buf = (S*)scratch(sizeof(S) * unit_values(g));
  if (!cache.ok() || !rows || !buf) {
    free(rows);
    free(buf);
    return -1;
  }
  memset(buf, 0, sizeof(S) * unit_values(g));
  for_each_unit(row_begin, row_end, g.G, [&](int64_t row, int64_t gi) {
    const int64_t oh = row % g.OH, od = row / g.OH % g.OD, b = row / g.OH / g.OD;
    T* o_row = (T*)p.out + b * os[0] + od * os[3] + oh * os[4] + gi * os[1];
    grad_kernel_unit(cache, g, go, gs, row, gi, row_end, rows, buf, o_row, os[2], os[5]);
  });
  free(rows);
  free(buf);
  return 0;
}

template <class T>
int grad_kernel(const Problem& p, int64_t row_begin, int64_t row_end) {
  if (by_columns(Geometry(p), p.out_stride[5]))
    return grad_kernel_rows<T, true>(p, row_begin, row_end);
  return grad_kernel_rows<T, false>(p, row_begin, row_end);
}

// ---------------------------------------------------------------------------------------------
// grad_input[b, c, i] = sum over (t, o) with i = o * s - p + tap_t * d of
//                       kernel[b, g(c), t, o] * grad_out[b, c, o]
//
// For one input row and group, the grad_out rows that reach it come from a RowCache (output
// columns o_lo + m, zero outside the output), and the kernel values of those rows are copied to
// kbuf[r][m][kw] (zero outside the output). The input columns i = rho + q * SW of one residue
// rho < SW are reached by the same taps, an arithmetic progression kw = kw0 + n * (SW / gcd),
// from buffer columns m = q + m0 - n * (DW / gcd), gcd = gcd(SW, DW).

struct Reach {  // the taps reaching the first column of a residue, as buffer offsets
  int64_t n;            // how many
  int64_t k0, kstep;    // offset of the first in a kbuf row; step to the next
  int64_t g0, gstep;    // the same in a cached grad_out row
};

// P input columns of one residue (SW apart), one block of LANES * NV channels starting at c.
template <class S, class T, int LANES, int NV, int P>
inline void grad_input_block(const S* const* grows, const S* kbuf, int64_t nrows, int64_t krow,
                             int64_t cg, int64_t KW, const Reach& re, int64_t c, T* out,
                             int64_t op, int64_t oc) {
  typedef Lanes<S, LANES> L;
  typename L::V acc[P][NV];
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = typename L::V{};
  for (int64_t r = 0; r < nrows; ++r) {
    const S* kq = kbuf + r * krow + re.k0;
    const S* gq = grows[r] + re.g0 + c;
    for (int64_t n = 0; n < re.n; ++n, kq += re.kstep, gq += re.gstep) {
      for (int j = 0; j < P; ++j) {
        const S w = kq[j * KW];
        for (int v = 0; v < NV; ++v) acc[j][v] += w * L::load(gq + j * cg + v * LANES);
      }
    }
  }
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) L::store(out + j * op + v * LANES * oc, oc, acc[j][v]);
}

// The same block for stride equal to dilation along the row (1 and 1 above all), 16 channels
// per group, KW known: column j of the residue is reached by tap n from buffer column j - n
// (relative to the first). Taken as
// sliding_block's pixels in reverse (pixel P - 1 - j, buffer columns from the right), column j
// adds its taps in grad_input_block's order (n ascending), so the results are its, bit for bit.
template <class S, class T, int P, int KW>
inline void grad_input_block_sliding(const S* const* grows, const S* kbuf, int64_t nrows,
                                     int64_t krow, const Reach& re, T* out, int64_t op,
                                     int64_t oc) {
  auto at = [](const S* kr, int j, int n) { return kr[n * (1 - KW) + (P - 1 - j) * KW]; };
  sliding_block<S, T, S, P, KW, -16>(grows, nrows, re.g0 + (P - 1) * 16, kbuf + re.k0, krow, at,
                                     out + (P - 1) * op, -op, oc);
}

template <class S, class T, int P>
inline void grad_input_pixels(const S* const* grows, const S* kbuf, int64_t nrows, int64_t krow,
                              int64_t cg, int64_t KW, const Reach& re, T* out, int64_t op,
                              int64_t oc) {
  // Stride equal to dilation along the row (1 and 1 above all): every tap reaches a column of
  // the residue, the next tap from one buffer column to the left.
  if constexpr (P > 1) {  // one column gains nothing from sliding
    if (cg == 16 && re.n == KW && re.kstep == 1 - KW && re.gstep == -16 &&
        for_sliding_kw(KW, [&](auto kw) {
          grad_input_block_sliding<S, T, P, decltype(kw)::value>(grows, kbuf, nrows, krow, re,
                                                                 out, op, oc);
        }))
      return;
  }
  int64_t c = 0;
  for (; c + 16 <= cg; c += 16)
    grad_input_block<S, T, 8, 2, P>(grows, kbuf, nrows, krow, cg, KW, re, c, out + c * oc, op,
                                    oc);
  if (c + 8 <= cg) {
    grad_input_block<S, T, 8, 1, P>(grows, kbuf, nrows, krow, cg, KW, re, c, out + c * oc, op,
                                    oc);
    c += 8;
  }
  for (; c < cg; ++c)
    grad_input_block<S, T, 1, 1, P>(grows, kbuf, nrows, krow, cg, KW, re, c, out + c * oc, op,
                                    oc);
}

inline int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

// Taps k of one dimension reaching input index i (i = o * s - p + k * d, 0 <= o < out_size).
inline int64_t taps_reaching(int64_t i, int64_t out_size, int64_t k, int64_t s, int64_t p,
                             int64_t d, int64_t* taps, int64_t* outs) {
  int64_t n = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t num = i + p - t * d;
    if (num < 0) break;  // more negative with every t
    if (num % s == 0 && num / s < out_size) {
      taps[n] = t;
      outs[n] = num / s;
      ++n;
    }
  }
  return n;
}

// The slots of output rows (in depth, in height) that `block` consecutive input rows read: the
// rows of grad_out and, in the fused op, of the generated kernel.
inline int64_t reaching_rows(int64_t K, int64_t D, int64_t S, int64_t block = 1) {
  return ((K - 1) * D + block - 1) / S + 1;
}

// Input rows that grad_input computes for one group before the next group. Each reads one tap
// row of every kernel row that reaches it, and a cache line holds parts of two or three tap
// rows: computed one input row at a time for all groups, the lines were evicted from L2 before
// the next input row read the rest of them. 7 rows: 0.8x the time of one in NCHW, 0.9x in
// channels last at 8x256x56x56 (4 and 14 were no better; BENCHMARKS.md).
constexpr int64_t kInputBlock = 7;

template <class T, class Kernel>
int grad_input(const Problem& p, Kernel& kernel, int64_t row_begin, int64_t row_end) {
  typedef typename Acc<T>::S S;
  constexpr int P = pixels<S>();
  const Geometry g(p);
  const int64_t* os = p.out_stride;
  // Output columns o_lo + m, m < width, cover every tap of every input column.
  const int64_t o_lo = floor_div(g.PW - (g.KW - 1) * g.DW, g.SW);
  const int64_t width = floor_div(g.IW - 1 + g.PW, g.SW) - o_lo + 1;
  const int64_t m_lo = clamp(-o_lo, 0, width), m_hi = clamp(g.OW - o_lo, m_lo, width);
  RowCache<S, T> cache((const T*)p.a, p.a_stride, g.G, g.OD, g.OH, g.OW, g.cg, o_lo, width,
                       reaching_rows(g.KD, g.DD, g.SD),
                       reaching_rows(g.KH, g.DH, g.SH, kInputBlock));
  const int64_t max_rows = g.KD * g.KH;
  S* kbuf = (S*)scratch(sizeof(S) * max_rows * width * g.KW);
  const S** grows = (const S**)scratch(sizeof(S*) * max_rows);
  int64_t* table = (int64_t*)scratch(sizeof(int64_t) * 2 * (g.KD + g.KH));
  Reach* reach = (Reach*)scratch(sizeof(Reach) * g.SW);
  // An NCHW result goes through a row of pixels, as in forward.
  const bool by_row = channels_apart(os);
  T* row_buf = by_row ? (T*)scratch(sizeof(T) * g.IW * g.cg) : nullptr;
  if (!cache.ok() || !kernel.ok() || !kbuf || !grows || !table || !reach || (by_row && !row_buf)) {
    free(kbuf);
    free(grows);
    free(table);
    free(reach);
    free(row_buf);
    return -1;
  }
  int64_t *d_tap = table, *d_out = d_tap + g.KD, *h_tap = d_out + g.KD, *h_out = h_tap + g.KH;
  // The next group's kernel values and result row are hinted whole, so only where they fit in
  // a quarter of a typical L2 (a long 1D row would evict this group's buffers).
  const bool hint = (max_rows * width * g.KW + g.IW * g.cg) * (int64_t)sizeof(T) <= (128 << 10);
  // The taps of each residue rho: kw with (rho + PW - kw * DW) = o * SW for an output column o.
  const int64_t e = g.SW / gcd(g.SW, g.DW), mstep = -(g.DW / gcd(g.SW, g.DW));
  for (int64_t rho = 0; rho < g.SW; ++rho) {
    Reach& re = reach[rho];
    re.n = 0;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t num = rho + g.PW - kw * g.DW;
      if (num % g.SW == 0) {
        const int64_t m0 = num / g.SW - o_lo;
        re.n = (g.KW - 1 - kw) / e + 1;
        re.k0 = m0 * g.KW + kw, re.kstep = mstep * g.KW + e;
        re.g0 = m0 * g.cg, re.gstep = mstep * g.cg;
        break;
      }
    }
  }
  for (int64_t row0 = row_begin; row0 < row_end;) {
    // A block of input rows of one (b, d) plane, computed group by group.
    int64_t row1 = row0 - row0 % g.IH + g.IH;
    if (row1 > row0 + kInputBlock) row1 = row0 + kInputBlock;
    if (row1 > row_end) row1 = row_end;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      for (int64_t row = row0; row < row1; ++row) {
        const int64_t ih = row % g.IH, id = row / g.IH % g.ID, b = row / g.IH / g.ID;
        const int64_t nd = taps_reaching(id, g.OD, g.KD, g.SD, g.PD, g.DD, d_tap, d_out);
        const int64_t nh = taps_reaching(ih, g.OH, g.KH, g.SH, g.PH, g.DH, h_tap, h_out);
        const int64_t nrows = nd * nh;
        T* o_row = (T*)p.out + b * os[0] + id * os[2] + ih * os[3];
        for (int64_t a = 0; a < nd; ++a) {
          for (int64_t f = 0; f < nh; ++f) {
            const int64_t r = a * nh + f;
            grows[r] = cache.row(gi, b, d_out[a], h_out[f]);
            S* kr = kbuf + r * width * g.KW;
            memset(kr, 0, sizeof(S) * m_lo * g.KW);
            memset(kr + m_hi * g.KW, 0, sizeof(S) * (width - m_hi) * g.KW);
            const auto* from = kernel.row(b, d_out[a], h_out[f]) + gi * kernel.group +
                               (d_tap[a] * g.KH + h_tap[f]) * g.KW * kernel.tap +
                               (o_lo + m_lo) * kernel.pixel;
            pack_pixels(from, kernel.pixel, kernel.tap, m_hi - m_lo, g.KW, kr + m_lo * g.KW);
            // The next group's values of this kernel row, hinted while this group is computed.
            if constexpr (Kernel::stored) {
              if (hint && gi + 1 < g.G)
                prefetch<false>(from + kernel.group, m_hi - m_lo, kernel.pixel, g.KW, kernel.tap);
            }
          }
        }
        T* o_g = o_row + gi * g.cg * os[1];
        if (hint && gi + 1 < g.G) prefetch<true>(o_g + g.cg * os[1], g.IW, os[4], g.cg, os[1]);
        // Where the pixels are computed (pixel stride px, channel stride oc).
        T* dst = by_row ? row_buf : o_g;
        const int64_t px = by_row ? g.cg : os[4], oc = by_row ? 1 : os[1], op = g.SW * px;
        for (int64_t rho = 0; rho < g.SW && rho < g.IW; ++rho) {
          const int64_t count = (g.IW - rho + g.SW - 1) / g.SW;  // columns of this residue
          T* o = dst + rho * px;
          Reach re = reach[rho];
          // Column q + P of a residue reads P buffer columns further than column q.
          int64_t q = 0;
          for (; q + P <= count; q += P, re.k0 += P * g.KW, re.g0 += P * g.cg, o += P * op)
            grad_input_pixels<S, T, P>(grows, kbuf, nrows, width * g.KW, g.cg, g.KW, re, o, op,
                                       oc);
          for (; q < count; ++q, re.k0 += g.KW, re.g0 += g.cg, o += op)
            grad_input_pixels<S, T, 1>(grows, kbuf, nrows, width * g.KW, g.cg, g.KW, re, o, op,
                                       oc);
        }
        if (by_row) pack_channels(row_buf, g.cg, 1, g.IW, g.cg, o_g, os[1]);
      }
    }
    row0 = row1;
  }
  free(row_buf);
  free(reach);
  free(kbuf);
  free(grows);
  free(table);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The fused op's backward through the generator, one output row (b, d, h) at a time:
//   dk[ow, j]           = sum_{c in g} grad_out[b, c, o] * input[b, c, o * s - p + tap_t * d]
//   grad_features[r, o] = sum_j dk[ow, j] * weight[j, r]
//   grad_weight[j, r]  += sum_ow dk[ow, j] * features[r, o],   grad_bias[j] += sum_ow dk[ow, j]
// with j = gi * T + t. dk (the kernel's gradient) lives in a per-thread row buffer only. The
// weight and bias gradients are summed per chunk of chunk_rows rows into that chunk's partial
// sums (partials + chunk * G * T * (R + 1): grad_weight transposed, (R, G * T), then grad_bias);
// the caller hands each thread whole chunks and adds the chunks up in order, so the sums do not
// depend on the thread count.
template <class T>
int fused_grad_features(const Problem& p, const Fused& f, int64_t row_begin, int64_t row_end) {
  typedef typename Acc<T>::S S;
  const Geometry g(p);
  const T* go = (const T*)p.b;
  const T* feat = (const T*)f.features;
  const int64_t *gs = p.b_stride, *fs = f.features_stride, *ds = f.grad_features_stride;
  const int64_t R = f.hidden, taps = g.KD * g.KH * g.KW, GT = g.G * taps;
  RowCache<S, T> cache = input_cache<S>((const T*)p.a, p.a_stride, g);
  const S** rows = (const S**)scratch(sizeof(S*) * unit_rows(g));
  S* buf = (S*)scratch(sizeof(S) * (g.cg + GT * R + g.OW * (2 * GT + R)));
  // grad_out with its channels apart (NCHW) is copied a row at a time, all groups, pixel-major
  // (pack_pixels, through 8x8 blocks), and the units read that row as a channels-last one
  // (row_strides): read in place, a pixel's channels lie a plane apart (0.8x the time of the
  // fused backward at 32x16x32x32 with 4 features).
  const int64_t C = g.G * g.cg;
  const bool copy_rows = channels_apart(gs);
  const int64_t row_strides[6] = {0, 1, 0, 0, C, 0};
  S* g_rows = copy_rows ? (S*)scratch(sizeof(S) * g.OW * C) : nullptr;
  if (!cache.ok() || !rows || !buf || (copy_rows && !g_rows)) {
    free(rows);
    free(buf);
    free(g_rows);
    return -1;
  }
  S *gl = buf, *w = gl + g.cg, *dk = w + GT * R, *fbuf = dk + g.OW * GT, *dkt = fbuf + g.OW * R;
  const T* wsrc = (const T*)f.weight;
  for (int64_t j = 0; j < GT; ++j)
    for (int64_t r = 0; r < R; ++r)
      w[j * R + r] = widen(wsrc[j * f.weight_stride[0] + r * f.weight_stride[1]]);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t oh = row % g.OH, od = row / g.OH % g.OD, b = row / g.OH / g.OD;
    // The row's units, from grad_out src with strides st (the tensor, or the copied row).
    auto units = [&](const auto* src, const int64_t* st) {
      for (int64_t gi = 0; gi < g.G; ++gi)
        grad_kernel_unit(cache, g, src, st, row, gi, row_end, rows, gl, dk + gi * taps, 1, GT);
    };
    if (copy_rows) {
      pack_pixels(go + b * gs[0] + od * gs[2] + oh * gs[3], gs[4], gs[1], g.OW, C, g_rows);
      units((const S*)g_rows, row_strides);
    } else {
      units(go, gs);
    }
    pack_pixels(feat + b * fs[0] + od * fs[2] + oh * fs[3], fs[4], fs[1], g.OW, R, fbuf);
    T* df = (T*)f.grad_features + b * ds[0] + od * ds[2] + oh * ds[3];
    // Each product is vectorized along its longer side: grad_features along the R features
    // when there are 8 or more, else along the pixels (from dk transposed: (G * T, OW)).
    if (R >= 8) {
      product(g.OW, dk, GT, 1, w, R, GT, (const S*)nullptr, 0, df, ds[4], ds[1]);
    } else {
      pack_channels(dk, GT, 1, g.OW, GT, dkt, g.OW);
      product(R, w, 1, R, dkt, g.OW, GT, (const S*)nullptr, 0, df, ds[1], ds[4]);
    }
    // grad_weight transposed, (R, G * T), along the G * T kernel values.
    S* dw = (S*)f.partials + row / f.chunk_rows * GT * (R + 1);
    S* db = dw + GT * R;
    product(R, fbuf, 1, R, dk, GT, g.OW, dw, GT, dw, GT, 1);
    for (int64_t ow = 0; ow < g.OW; ++ow)
      for (int64_t j = 0; j < GT; ++j) db[j] += dk[ow * GT + j];
  }
  free(g_rows);
  free(rows);
  free(buf);
  return 0;
}

// The passes by entry point; f is null for the unfused ones.
template <class T> struct Forward {
  static int run(const Problem& p, const Fused*, int64_t a, int64_t b) {
    StoredKernel<T> kernel((const T*)p.b, p.b_stride);
    return forward<T>(p, kernel, a, b);
  }
};
template <class T> struct GradInput {
  static int run(const Problem& p, const Fused*, int64_t a, int64_t b) {
    StoredKernel<T> kernel((const T*)p.b, p.b_stride);
    return grad_input<T>(p, kernel, a, b);
  }
};
template <class T> struct GradKernel {
  static int run(const Problem& p, const Fused*, int64_t a, int64_t b) {
    return grad_kernel<T>(p, a, b);
  }
};
template <class T> struct FusedForward {
  static int run(const Problem& p, const Fused* f, int64_t a, int64_t b) {
    GeneratedKernel<typename Acc<T>::S, T> kernel(p, *f, 1, 1);
    return forward<T>(p, kernel, a, b);
  }
};
template <class T> struct FusedGradInput {
  static int run(const Problem& p, const Fused* f, int64_t a, int64_t b) {
    const Geometry g(p);
    GeneratedKernel<typename Acc<T>::S, T> kernel(p, *f, reaching_rows(g.KD, g.DD, g.SD),
                                                  reaching_rows(g.KH, g.DH, g.SH, kInputBlock));
    return grad_input<T>(p, kernel, a, b);
  }
};
template <class T> struct FusedGradFeatures {
  static int run(const Problem& p, const Fused* f, int64_t a, int64_t b) {
    return fused_grad_features<T>(p, *f, a, b);
  }
};

#if INVOLUTION_DTYPE == 0
typedef float Storage;
#define INVOLUTION_ENTRY(name) name##_float32
#elif INVOLUTION_DTYPE == 1
typedef double Storage;
#define INVOLUTION_ENTRY(name) name##_float64
#elif INVOLUTION_DTYPE == 2
typedef bf16 Storage;
#define INVOLUTION_ENTRY(name) name##_bfloat16
#else
#error "INVOLUTION_DTYPE must be 0 (float32), 1 (float64) or 2 (bfloat16)"
#endif

// The rows [0, rows) in `threads` contiguous ranges of whole units of `unit` rows, one range per
// thread of an OpenMP team. Where the library shares torch's OpenMP runtime (build.py), the
// team is torch's own pool of threads: none of them waits for a core held by another pool.
template <template <class> class Pass>
int run(const Problem* p, const Fused* f, int64_t rows, int64_t unit, int threads) {
  const int64_t units = (rows + unit - 1) / unit;
  int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(min : status)
#endif
  {
#ifdef _OPENMP
    const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int64_t i = 0, n = 1;
    (void)threads;
#endif
    const int64_t begin = units * i / n * unit, end = units * (i + 1) / n * unit;
    if (begin < rows) status = Pass<Storage>::run(*p, f, begin, end < rows ? end : rows);
  }
  return status;
}

}  // namespace

// Entry points, of the storage type this compilation is for: int name_<type>(problem, f, rows,
// unit, threads). f: the fused op's operands (null for the unfused passes). rows: the result's
// rows, split among `threads` threads in whole units of `unit` rows. Returns 0, or -1 when
// scratch memory could not be allocated.
#define INVOLUTION_DEFINE(name, Pass)                                                              \
  int INVOLUTION_ENTRY(name)(const Problem* p, const Fused* f, int64_t rows, int64_t unit,         \
                             int threads) {                                                        \
    return run<Pass>(p, f, rows, unit, threads);                                                   \
  }

extern "C" {

INVOLUTION_DEFINE(involution_forward, Forward)
INVOLUTION_DEFINE(involution_grad_input, GradInput)
INVOLUTION_DEFINE(involution_grad_kernel, GradKernel)
// The fused op: forward; backward = grad_input (the kernel regenerated) + grad_features (the
// kernel's gradient taken back through the generator).
INVOLUTION_DEFINE(involution_fused_forward, FusedForward)
INVOLUTION_DEFINE(involution_fused_grad_input, FusedGradInput)
INVOLUTION_DEFINE(involution_fused_grad_features, FusedGradFeatures)

}  // extern "C"
