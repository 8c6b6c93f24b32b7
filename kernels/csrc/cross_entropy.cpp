// earkit._native: the CPU twin of the loss kernels (see kernels/reference.py, the spec).
//
// Five row-level functions behind a plain C ABI, called from kernels/native.py with ctypes:
//
//   earkit_hard_rows       per row lse, loss = lse - z[target], keep
//   earkit_guided_rows     per row lse_s, lse_t, loss = KL(softmax(t) || softmax(s)), keep,
//                          t = (1 + eta) za - eta zc, all in one pass over the three rows
//   earkit_window_weights  a_i = keep_i * [window sum of keep * loss > window_threshold]
//   earkit_hard_grad       out = row_scale * (softmax(z) - onehot(target))
//   earkit_guided_grad     out = row_scale * (softmax(s) - softmax(t))
//
// Inputs are row-major (N, V) with unit column stride and a row stride in elements; dtypes are
// coded 0 = fp32, 1 = fp16, 2 = bf16, and all math is fp32. Rows run in parallel (OpenMP); each
// row is processed in chunks of CH floats held in L1, with an online (running max) softmax, so
// the logits are read once by the forward and once by the backward. fp16/bf16 chunks are
// converted into a per-thread stack buffer first; fp32 rows are read in place.
//
// While a chunk's exp pass runs, the next chunk's raw bytes are prefetched (see Ahead), so the
// memory traffic overlaps the arithmetic instead of alternating with it.
//
// NaN must propagate (a NaN logit gives a NaN loss, never a masked one), so the file is built
// without -ffast-math: the vector code uses explicit GCC vector extensions (16 lanes with
// AVX-512, else 8), and its exp is a branch-free Cody-Waite + polynomial one (vscalefps for 2^n
// with AVX-512) that maps NaN to NaN, -inf (and x < -87.34) to exactly 0.
// Gradients may be written in place (out == logits / student): every element of a chunk is read
// before any element of that chunk is written, and the target logit is read before the row.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define EARKIT_API extern "C" __attribute__((visibility("default")))

// The vector helpers are internal (anonymous namespace), so a vector ABI note for builds
// without AVX (EARKIT_NATIVE_ARCH="") says nothing that matters here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// ----------------------------------------------------------------------------------------------
// vectors

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;  // AVX2 (or two SSE registers, or scalar code on other targets)
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

constexpr int64_t CH = 2048;  // chunk length in floats (8 KiB), a multiple of 2 * W
static_assert(CH % (2 * W) == 0, "chunk must hold whole vector pairs");

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline vf splat(float x) {
  vf v = {};
  return v + x;
}
inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf load_partial(const float* p, int64_t n, float fill) {
  vf v = splat(fill);
  std::memcpy(&v, p, static_cast<size_t>(n) * 4);
  return v;
}
inline void store_partial(float* p, vf v, int64_t n) { std::memcpy(p, &v, static_cast<size_t>(n) * 4); }

// max that ignores NaN lanes (NaN propagates through the exp sums instead)
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vf v) {
  // pairwise, for a little accuracy
  float t[W];
  std::memcpy(t, &v, sizeof v);
  for (int w = W / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// exp(x) for a vector: n = round(x log2 e), r = x - n ln2 (Cody-Waite, two constants), e^r by
// the Cephes polynomial in Horner form (rel. error ~1e-7 on |r| <= ln2 / 2), times 2^n.
// x < -87.33654 (where the result would be subnormal) gives exactly 0, -inf included;
// x > 88.7228 gives +inf; NaN gives NaN. About 13 vector instructions with AVX-512.
inline vf exp_poly(vf r) {
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

#if defined(__AVX512F__)
inline vf vexp(vf x) {
  const vf hi = splat(88.8f);
  const vf xc = x > hi ? hi : x;  // a NaN x compares false and stays NaN (one vminps)
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  // p * 2^n, overflow to inf included; lanes below lo are not computed and come out 0
  const __mmask16 live = _mm512_cmp_ps_mask(x, splat(-87.33654f), _CMP_NLT_UQ);  // also NaN lanes
  return (vf)_mm512_maskz_scalef_ps(live, exp_poly(r), (__m512)n);
}
#else
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654f);        // below: exactly 0
  const vf clamp_lo = splat(-87.5f);      // keeps n >= -126; a constant apart from lo so that
  const vf clamp_hi = splat(88.8f);       // the clamps compile to vmaxps / vminps
  const vf magic = splat(12582912.0f);    // 1.5 * 2^23: adding it rounds to an integer
  vf xc = x < clamp_lo ? clamp_lo : x;    // NaN compares false and stays NaN
  xc = xc > clamp_hi ? clamp_hi : xc;
  vf j = xc * 1.44269504088896341f + magic;
  vf n = j - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = exp_poly(r);
  // 2^n from exponent bits, in two halves so that n = 128 (overflow to inf) is right too
  vi ni = (vi)j - (vi)magic;  // vector casts reinterpret the bits
  vi n1 = ni >> 1;
  vi n2 = ni - n1;
  vi b1 = (n1 + 127) << 23;
  vi b2 = (n2 + 127) << 23;
  vf res = p * (vf)b1 * (vf)b2;
  return x < lo ? splat(0.0f) : res;
}
#endif

inline float sexp(float x) { return vexp(splat(x))[0]; }

// e * ((t - sht) - (s - shs)) where e = exp(t - sht) != 0, else 0: classes the target gives no
// mass (t = -inf) add nothing rather than 0 * -inf = NaN, while a NaN e (t = +inf) stays NaN (as
// the reference's where(p == 0, 0, ...)). The shifted logits are log-probabilities up to the
// small log-sums: the KL never subtracts numbers of the size of the logits.
inline vf cross(vf e, vf t, vf s, vf sht, vf shs) { return e == 0.0f ? splat(0.0f) : e * ((t - sht) - (s - shs)); }

// ----------------------------------------------------------------------------------------------
// dtypes

enum Dtype : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int64_t elem_size(int dtype) { return dtype == F32 ? 4 : 2; }

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t b = float_to_bits(f);
  uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(r);
}

typedef uint16_t half_t;  // IEEE binary16 bits

#if defined(__F16C__) && !defined(EARKIT_NO_F16C)
#define EARKIT_F16C 1
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#else
// Portable bit-level IEEE binary16 <-> binary32 (subnormals, inf and NaN handled; rounding to
// nearest even), for targets without F16C.
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return bits_to_float(sign | float_to_bits(v));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline uint16_t float_to_half(float f) {
  uint32_t b = float_to_bits(f);
  uint32_t sign = b & 0x80000000u;
  b ^= sign;
  uint32_t o;
  if (b >= 0x47800000u) {  // |f| >= 65536 (rounds to inf), inf or NaN
    o = b > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (b < 0x38800000u) {  // |f| < 2^-14: subnormal half or zero; let the FPU round
    float v = bits_to_float(b) + 0.5f;
    o = float_to_bits(v) - 0x3F000000u;
  } else {
    uint32_t odd = (b >> 13) & 1u;
    b += 0xC8000FFFu;  // rebias the exponent ((15 - 127) << 23) and add the rounding bias 0xFFF
    b += odd;
    o = b >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}
#endif

inline void half_to_float_n(float* d, const uint16_t* s, int64_t len) {
  int64_t i = 0;
#if defined(EARKIT_F16C)
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < len; ++i) d[i] = half_to_float(s[i]);
}

inline void float_to_half_n(uint16_t* d, const float* s, int64_t len) {
  int64_t i = 0;
#if defined(EARKIT_F16C)
  for (; i + 8 <= len; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < len; ++i) d[i] = float_to_half(s[i]);
}

// Element `j` of a row, as fp32.
inline float load_one(const char* row, int dtype, int64_t j) {
  if (dtype == F32) return reinterpret_cast<const float*>(row)[j];
  if (dtype == F16) {
    half_t h;
    std::memcpy(&h, row + 2 * j, 2);
    return half_to_float(h);
  }
  uint16_t h;
  std::memcpy(&h, row + 2 * j, 2);
  return bf16_to_float(h);
}

inline void store_one(char* row, int dtype, int64_t j, float v) {
  if (dtype == F32) {
    reinterpret_cast<float*>(row)[j] = v;
  } else if (dtype == F16) {
    half_t h = float_to_half(v);
    std::memcpy(row + 2 * j, &h, 2);
  } else {
    uint16_t h = float_to_bf16(v);
    std::memcpy(row + 2 * j, &h, 2);
  }
}

// Elements [c, c + len) of a row as fp32: a pointer into the row itself for fp32, else `buf`
// filled by conversion.
inline const float* chunk_f32(const char* row, int dtype, int64_t c, int64_t len, float* buf) {
  if (dtype == F32) return reinterpret_cast<const float*>(row) + c;
  if (dtype == F16) {
    half_to_float_n(buf, reinterpret_cast<const half_t*>(row) + c, len);
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(row) + c;
    for (int64_t i = 0; i < len; ++i) buf[i] = bf16_to_float(s[i]);
  }
  return buf;
}

// Writes src[0, len) into elements [c, c + len) of an fp16/bf16 row.
inline void store_chunk_half(char* row, int dtype, int64_t c, int64_t len, const float* src) {
  if (dtype == F16) {
    float_to_half_n(reinterpret_cast<half_t*>(row) + c, src, len);
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(row) + c;
    for (int64_t i = 0; i < len; ++i) d[i] = float_to_bf16(src[i]);
  }
}

// ----------------------------------------------------------------------------------------------
// prefetching the next chunk

// The compute passes over a chunk (exp) are compute bound and the reads of a fresh chunk memory
// bound; left alone the two alternate (measured: a streaming exp pass costs the sum of the two,
// the hardware prefetcher stops at each 4 KiB page). The compute loops therefore prefetch the raw
// bytes of the chunk that comes next (of up to four streams: the inputs, and the output with
// write intent), one 64-byte line per stream per vector step, so memory traffic overlaps the exp.
//
// GCC 12's dead code elimination deletes __builtin_prefetch in these loops (they have no other
// effect), so on x86 the instructions are written as volatile asm.
inline void prefetch_read(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}
inline void prefetch_write(const char* p) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__PRFCHW__)
  asm volatile("prefetchw %0" : : "m"(*p));
#elif defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

struct Ahead {
  const char* p[4];
  int64_t bytes[4];
  bool write[4];
  int n = 0;
  void add(const char* ptr, int64_t b, bool w = false) {
    if (ptr == nullptr || b <= 0) return;
    p[n] = ptr;
    bytes[n] = b;
    write[n] = w;
    ++n;
  }
  // the k-th line of every stream
  inline void line(int64_t k) const {
#if defined(EARKIT_NO_PREFETCH)
    return;
#endif
    const int64_t off = k * 64;
    for (int s = 0; s < n; ++s) {
      if (off < bytes[s]) {
        if (write[s])
          prefetch_write(p[s] + off);
        else
          prefetch_read(p[s] + off);
      }
    }
  }
};

// The raw bytes of the chunk after [c, c + CH) of row i: the rest of this row, else the start of
// row i + 1 (the next row this thread takes under schedule(static)), else nothing.
inline void add_next(Ahead& a, const char* base, int64_t row_bytes_stride, int64_t es, int64_t i, int64_t n,
                     int64_t v, int64_t c, bool write = false) {
  if (c + CH < v) {
    const int64_t len = v - c - CH < CH ? v - c - CH : CH;
    a.add(base + i * row_bytes_stride + (c + CH) * es, len * es, write);
  } else if (i + 1 < n) {
    a.add(base + (i + 1) * row_bytes_stride, (v < CH ? v : CH) * es, write);
  }
}

// ----------------------------------------------------------------------------------------------
// chunk loops (fp32, length len <= CH)

inline float chunk_max(const float* x, int64_t len) {
  vf m0 = splat(-kInf), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    m0 = vmax(loadu(x + i), m0);
    m1 = vmax(loadu(x + i + W), m1);
  }
  for (; i + W <= len; i += W) m0 = vmax(loadu(x + i), m0);
  if (i < len) m0 = vmax(load_partial(x + i, len - i, -kInf), m0);
  return hmax(vmax(m1, m0));
}

inline float chunk_sumexp(const float* x, int64_t len, float shift, const Ahead& ahead) {
  const vf sh = splat(shift);
  vf s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    ahead.line(i / W);
    ahead.line(i / W + 1);
    s0 += vexp(loadu(x + i) - sh);
    s1 += vexp(loadu(x + i + W) - sh);
  }
  for (; i + W <= len; i += W) s0 += vexp(loadu(x + i) - sh);
  if (i < len) s0 += vexp(load_partial(x + i, len - i, -kInf) - sh);  // shift is finite: exp(-inf) = 0
  return hsum(s0 + s1);
}

// t = c1 * a - c2 * c
inline void chunk_target(const float* a, const float* c, int64_t len, float c1, float c2, float* t) {
  int64_t i = 0;
  for (; i + W <= len; i += W) storeu(t + i, loadu(a + i) * c1 - loadu(c + i) * c2);
  for (; i < len; ++i) t[i] = a[i] * c1 - c[i] * c2;
}

// y = scale * exp(x - lse); y may be x
inline void chunk_softmax_scaled(const float* x, int64_t len, float lse, float scale, float* y, const Ahead& ahead) {
  const vf l = splat(lse), sc = splat(scale);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    ahead.line(i / W);
    storeu(y + i, vexp(loadu(x + i) - l) * sc);
  }
  if (i < len) store_partial(y + i, vexp(load_partial(x + i, len - i, -kInf) - l) * sc, len - i);
}

// y = scale * (exp(s - lse_s) - exp(t - lse_t)); y may be s
inline void chunk_softmax_diff(const float* s, const float* t, int64_t len, float lse_s, float lse_t, float scale,
                               float* y, const Ahead& ahead) {
  const vf ls = splat(lse_s), lt = splat(lse_t), sc = splat(scale);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    ahead.line(i / W);
    storeu(y + i, (vexp(loadu(s + i) - ls) - vexp(loadu(t + i) - lt)) * sc);
  }
  if (i < len) {
    vf a = load_partial(s + i, len - i, -kInf), b = load_partial(t + i, len - i, -kInf);
    store_partial(y + i, (vexp(a - ls) - vexp(b - lt)) * sc, len - i);
  }
}

// ----------------------------------------------------------------------------------------------
// online logsumexp state

// Running logsumexp: sum = sum of exp(x - shift) so far, where shift is the running max, or 0
// while that max is infinite (as torch.logsumexp does: all -inf gives -inf, any +inf gives +inf).
struct Lse {
  float max = -kInf;
  float shift = 0.0f;
  float sum = 0.0f;
  // Takes the max of the next chunk; returns the factor every accumulator tied to this shift
  // must be multiplied by (1 when the shift does not move).
  float update(float chunk_max) {
    if (!(chunk_max > max)) return 1.0f;
    max = chunk_max;
    float next = std::isinf(chunk_max) ? 0.0f : chunk_max;
    float f = std::exp(shift - next);
    shift = next;
    sum = rescale(sum, f);
    return f;
  }
  static float rescale(float acc, float f) { return acc == 0.0f ? acc : acc * f; }
  float value() const { return shift + std::log(sum); }
};

inline bool keep_above(float loss, int has_threshold, float threshold) {
  return has_threshold ? !(loss <= threshold) : true;
}

inline int resolve_threads(int num_threads) {
#if defined(_OPENMP)
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// C ABI

EARKIT_API int earkit_abi_version(void) { return 1; }

EARKIT_API int earkit_max_threads(void) { return resolve_threads(0); }

// loss, keep, lse: fp32 arrays of n. threshold is compared in fp32, as torch compares an fp32
// tensor with a Python float.
EARKIT_API void earkit_hard_rows(const void* logits, int64_t n, int64_t v, int64_t stride, int dtype,
                                 const int64_t* target, int64_t ignore_index, int has_threshold, double threshold,
                                 float* loss, float* keep, float* lse, int num_threads) {
  const int64_t es = elem_size(dtype);
  const float thr = static_cast<float>(threshold);
  const char* base = static_cast<const char*>(logits);
#pragma omp parallel num_threads(resolve_threads(num_threads)) if (n > 1)
  {
    alignas(64) float buf[CH];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const char* row = base + i * stride * es;
      Lse acc;
      for (int64_t c = 0; c < v; c += CH) {
        const int64_t len = v - c < CH ? v - c : CH;
        const float* x = chunk_f32(row, dtype, c, len, buf);
        Ahead ahead;
        add_next(ahead, base, stride * es, es, i, n, v, c);
        acc.update(chunk_max(x, len));
        acc.sum += chunk_sumexp(x, len, acc.shift, ahead);
      }
      const float l = acc.value();
      lse[i] = l;
      const int64_t t = target[i];
      if (t == ignore_index) {
        loss[i] = 0.0f;
        keep[i] = 0.0f;
      } else {
        const float picked = (t >= 0 && t < v) ? load_one(row, dtype, t) : kNaN;  // out of range: never read
        // log sum - (z_y - shift), both small: l - z_y would subtract two numbers of the logits'
        // size, and at 1e4 l is rounded to ~1e-3.
        const float li = std::log(acc.sum) - (picked - acc.shift);
        loss[i] = li;
        keep[i] = keep_above(li, has_threshold, thr) ? 1.0f : 0.0f;
      }
    }
  }
}

// t = (1 + eta) * anchor - eta * concept in fp32; loss = KL(softmax(t) || softmax(student)), as
//   sum e_i ((t_i - sht) - (s_i - shs)) / sum e - log sum e + log sum exp(s - shs),
// e_i = exp(t_i - sht), sht and shs the running shifts (row maxes): every term is a difference
// of log-probabilities, small whatever the logits' size. (sum p (t - s) - lse_t + lse_s, equal
// in exact arithmetic, subtracts numbers of the logits' size: at 1e4 each lse is rounded to
// ~1e-3, an error that masks and windows then act on.)
EARKIT_API void earkit_guided_rows(const void* student, int64_t s_stride, int s_dtype, const void* concept,
                                   int64_t c_stride, int c_dtype, const void* anchor, int64_t a_stride, int a_dtype,
                                   int64_t n, int64_t v, double eta, int has_threshold, double threshold, float* loss,
                                   float* keep, float* lse_student, float* lse_target, int num_threads) {
  const int64_t ss = elem_size(s_dtype) * s_stride, cs = elem_size(c_dtype) * c_stride,
                as = elem_size(a_dtype) * a_stride;
  const float c1 = static_cast<float>(1.0 + eta), c2 = static_cast<float>(eta);
  const float thr = static_cast<float>(threshold);
  const char* sb = static_cast<const char*>(student);
  const char* cb = static_cast<const char*>(concept);
  const char* ab = static_cast<const char*>(anchor);
#pragma omp parallel num_threads(resolve_threads(num_threads)) if (n > 1)
  {
    alignas(64) float sbuf[CH];
    alignas(64) float cbuf[CH];
    alignas(64) float abuf[CH];
    alignas(64) float tbuf[CH];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const char* srow = sb + i * ss;
      const char* crow = cb + i * cs;
      const char* arow = ab + i * as;
      Lse ls, lt;
      float kl = 0.0f;  // sum exp(t - lt.shift) * ((t - lt.shift) - (s - ls.shift))
      for (int64_t c = 0; c < v; c += CH) {
        const int64_t len = v - c < CH ? v - c : CH;
        const float* s = chunk_f32(srow, s_dtype, c, len, sbuf);
        chunk_target(chunk_f32(arow, a_dtype, c, len, abuf), chunk_f32(crow, c_dtype, c, len, cbuf), len, c1, c2,
                     tbuf);
        const float* t = tbuf;
        const float old_shs = ls.shift, old_sht = lt.shift, old_sum_t = lt.sum;
        ls.update(chunk_max(s, len));
        const float f = lt.update(chunk_max(t, len));
        // New shifts move every term's log-ratio by (shs' - shs) - (sht' - sht); the shifts are
        // finite (0 for an infinite max), and the sum is 0 while no target mass was seen.
        if (old_sum_t != 0.0f) kl += ((ls.shift - old_shs) - (lt.shift - old_sht)) * old_sum_t;
        // f == 0: the earlier classes' target mass underflows to 0 and takes their terms with it
        // (an infinite one too, as p = 0 does in the reference); a NaN still reaches lt.sum.
        kl = f == 0.0f ? 0.0f : Lse::rescale(kl, f);
        Ahead ahead;
        add_next(ahead, sb, ss, elem_size(s_dtype), i, n, v, c);
        add_next(ahead, cb, cs, elem_size(c_dtype), i, n, v, c);
        add_next(ahead, ab, as, elem_size(a_dtype), i, n, v, c);
        const vf shs = splat(ls.shift), sht = splat(lt.shift);
        vf as0 = {}, at0 = {}, ak0 = {}, as1 = {}, at1 = {}, ak1 = {};
        int64_t j = 0;
        for (; j + 2 * W <= len; j += 2 * W) {
          ahead.line(j / W);
          ahead.line(j / W + 1);
          vf s0 = loadu(s + j), t0 = loadu(t + j), s1 = loadu(s + j + W), t1 = loadu(t + j + W);
          vf e0 = vexp(t0 - sht), e1 = vexp(t1 - sht);
          as0 += vexp(s0 - shs);
          as1 += vexp(s1 - shs);
          at0 += e0;
          at1 += e1;
          ak0 += cross(e0, t0, s0, sht, shs);
          ak1 += cross(e1, t1, s1, sht, shs);
        }
        for (; j + W <= len; j += W) {
          vf s0 = loadu(s + j), t0 = loadu(t + j);
          vf e0 = vexp(t0 - sht);
          as0 += vexp(s0 - shs);
          at0 += e0;
          ak0 += cross(e0, t0, s0, sht, shs);
        }
        if (j < len) {
          // pad lanes: s = t = -inf gives exp(t) = 0, so cross() leaves them out of kl
          vf s0 = load_partial(s + j, len - j, -kInf), t0 = load_partial(t + j, len - j, -kInf);
          vf e0 = vexp(t0 - sht);
          as0 += vexp(s0 - shs);
          at0 += e0;
          ak0 += cross(e0, t0, s0, sht, shs);
        }
        ls.sum += hsum(as0 + as1);
        lt.sum += hsum(at0 + at1);
        kl += hsum(ak0 + ak1);
      }
      const float lss = ls.value(), ltt = lt.value();
      const float li = kl / lt.sum - std::log(lt.sum) + std::log(ls.sum);
      lse_student[i] = lss;
      lse_target[i] = ltt;
      loss[i] = li;
      keep[i] = keep_above(li, has_threshold, thr) ? 1.0f : 0.0f;
    }
  }
}

// weight_i = keep_i * [sum of keep * loss over the window of i > window_threshold]; windows of
// `window` rows run along each sequence of seq_len rows (the last one may be short). Without a
// threshold, weight = keep. `out` may be `keep`.
EARKIT_API void earkit_window_weights(const float* loss, const float* keep, int64_t n, int64_t seq_len,
                                      int64_t window, int has_threshold, double window_threshold, float* out,
                                      int num_threads) {
  if (!has_threshold) {
    if (out != keep) std::memmove(out, keep, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const float thr = static_cast<float>(window_threshold);
  const int64_t per_seq = (seq_len + window - 1) / window;
  const int64_t n_seq = (n + seq_len - 1) / seq_len;
  const int64_t total = n_seq * per_seq;
#pragma omp parallel for schedule(static) num_threads(resolve_threads(num_threads)) if (n >= 65536)
  for (int64_t w = 0; w < total; ++w) {
    const int64_t seq_start = (w / per_seq) * seq_len;
    const int64_t start = seq_start + (w % per_seq) * window;
    int64_t end = start + window;
    if (end > seq_start + seq_len) end = seq_start + seq_len;
    if (end > n) end = n;
    float sum = 0.0f;
    for (int64_t i = start; i < end; ++i) sum += keep[i] * loss[i];
    const float gate = !(sum <= thr) ? 1.0f : 0.0f;
    for (int64_t i = start; i < end; ++i) out[i] = keep[i] * gate;
  }
}

// out = row_scale * (exp(z - lse) - onehot(target)) in out_dtype; rows with row_scale == 0 are
// zeroed without reading the logits. out may be the logits buffer (same dtype and stride).
EARKIT_API void earkit_hard_grad(const void* logits, int64_t stride, int dtype, const int64_t* target, int64_t n,
                                 int64_t v, const float* lse, const float* row_scale, void* out, int64_t out_stride,
                                 int out_dtype, int num_threads) {
  const int64_t zs = elem_size(dtype) * stride, os = elem_size(out_dtype) * out_stride;
  const int64_t row_bytes = elem_size(out_dtype) * v;
  const char* zb = static_cast<const char*>(logits);
  char* ob = static_cast<char*>(out);
#pragma omp parallel num_threads(resolve_threads(num_threads)) if (n > 1)
  {
    alignas(64) float buf[CH];
    alignas(64) float gbuf[CH];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      char* orow = ob + i * os;
      const float scale = row_scale[i];
      if (scale == 0.0f) {
        std::memset(orow, 0, static_cast<size_t>(row_bytes));
        continue;
      }
      const char* zrow = zb + i * zs;
      const float l = lse[i];
      const int64_t t = target[i];
      const bool hot = t >= 0 && t < v;
      const float zt = hot ? load_one(zrow, dtype, t) : 0.0f;  // read before the row is overwritten
      for (int64_t c = 0; c < v; c += CH) {
        const int64_t len = v - c < CH ? v - c : CH;
        const float* x = chunk_f32(zrow, dtype, c, len, buf);
        Ahead ahead;
        add_next(ahead, zb, zs, elem_size(dtype), i, n, v, c);
        if (ob != zb || os != zs) add_next(ahead, ob, os, elem_size(out_dtype), i, n, v, c, true);
        if (out_dtype == F32) {
          chunk_softmax_scaled(x, len, l, scale, reinterpret_cast<float*>(orow) + c, ahead);
        } else {
          chunk_softmax_scaled(x, len, l, scale, gbuf, ahead);
          store_chunk_half(orow, out_dtype, c, len, gbuf);
        }
      }
      if (hot) store_one(orow, out_dtype, t, (sexp(zt - l) - 1.0f) * scale);
    }
  }
}

// out = row_scale * (exp(s - lse_s) - exp(t - lse_t)), t = (1 + eta) anchor - eta concept; rows
// with row_scale == 0 are zeroed without reading anything. out may be the student buffer.
EARKIT_API void earkit_guided_grad(const void* student, int64_t s_stride, int s_dtype, const void* concept,
                                   int64_t c_stride, int c_dtype, const void* anchor, int64_t a_stride, int a_dtype,
                                   int64_t n, int64_t v, double eta, const float* lse_student,
                                   const float* lse_target, const float* row_scale, void* out, int64_t out_stride,
                                   int out_dtype, int num_threads) {
  const int64_t ss = elem_size(s_dtype) * s_stride, cs = elem_size(c_dtype) * c_stride,
                as = elem_size(a_dtype) * a_stride, os = elem_size(out_dtype) * out_stride;
  const int64_t row_bytes = elem_size(out_dtype) * v;
  const float c1 = static_cast<float>(1.0 + eta), c2 = static_cast<float>(eta);
  const char* sb = static_cast<const char*>(student);
  const char* cb = static_cast<const char*>(concept);
  const char* ab = static_cast<const char*>(anchor);
  char* ob = static_cast<char*>(out);
#pragma omp parallel num_threads(resolve_threads(num_threads)) if (n > 1)
  {
    alignas(64) float sbuf[CH];
    alignas(64) float cbuf[CH];
    alignas(64) float abuf[CH];
    alignas(64) float tbuf[CH];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      char* orow = ob + i * os;
      const float scale = row_scale[i];
      if (scale == 0.0f) {
        std::memset(orow, 0, static_cast<size_t>(row_bytes));
        continue;
      }
      const char* srow = sb + i * ss;
      const char* crow = cb + i * cs;
      const char* arow = ab + i * as;
      const float ls = lse_student[i], lt = lse_target[i];
      for (int64_t c = 0; c < v; c += CH) {
        const int64_t len = v - c < CH ? v - c : CH;
        chunk_target(chunk_f32(arow, a_dtype, c, len, abuf), chunk_f32(crow, c_dtype, c, len, cbuf), len, c1, c2,
                     tbuf);
        const float* s = chunk_f32(srow, s_dtype, c, len, sbuf);
        Ahead ahead;
        add_next(ahead, sb, ss, elem_size(s_dtype), i, n, v, c);
        add_next(ahead, cb, cs, elem_size(c_dtype), i, n, v, c);
        add_next(ahead, ab, as, elem_size(a_dtype), i, n, v, c);
        if (ob != sb || os != ss) add_next(ahead, ob, os, elem_size(out_dtype), i, n, v, c, true);
        if (out_dtype == F32) {
          chunk_softmax_diff(s, tbuf, len, ls, lt, scale, reinterpret_cast<float*>(orow) + c, ahead);
        } else {
          chunk_softmax_diff(s, tbuf, len, ls, lt, scale, tbuf, ahead);  // t is dead once read
          store_chunk_half(orow, out_dtype, c, len, tbuf);
        }
      }
    }
  }
}
