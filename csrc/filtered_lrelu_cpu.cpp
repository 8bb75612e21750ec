// filtered_lrelu on the CPU: the whole chain (see kernels/filtered_lrelu.h) per task = one
// (n, c) plane, or a band of its output rows. The task builds the band of the intermediate T
// it needs in a thread-local buffer (upsample: horizontal pass per input row, then vertical),
// applies the activation (or the saved mask) in place, then downsamples from it; T never
// reaches memory. OpenMP over tasks; inputs and outputs of any strides (NCHW, channels_last,
// views); arithmetic in float (double for float64).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_isa.h"
#include "filtered_lrelu.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace filtered_lrelu {
namespace {

// Stage-1 geometry along one axis: output position t of the upsampling FIR reads input
// pixels j0(t) + m, m = 0.. with filter taps k0(t) + u * m (< taps), where
// j0(t) = ceil((t - pad) / u) and k0(t) = u * j0(t) - (t - pad) in [0, u).
struct UpAxis {
  int64_t u, pad, taps;
  int64_t j0(int64_t t) const { return ceil_div(t - pad, u); }
  int64_t k0(int64_t t) const { return u * j0(t) - (t - pad); }
  int64_t ntaps(int64_t t) const {
    const int64_t k = k0(t);
    return k < taps ? (taps - k + u - 1) / u : 0;
  }
};

// Column geometry shared by every row of every task.
struct Columns {
  int64_t tc_lo, tc_n;    // T columns computed: [tc_lo, tc_lo + tc_n)
  int64_t jx_lo, xp_len;  // padded input row: index j - jx_lo, j in [jx_lo, jx_lo + xp_len)
  int64_t rw;             // padded T' row length (index q, T column q - p2x)
  int64_t q_off;          // index q of T column tc_lo
};

template <typename F>
struct Buffers {
  std::vector<F> xp, h1, rp, hd, yrow, tmp, phase;
};

// One row of the upsampling FIR: dst[t - tc_lo] (+)= sum_m xp[j0(t) + m - jx_lo] * g[k0(t) + u m]
// for the tc_n columns. Done per phase (t mod u) so that the inner loops are contiguous.
template <typename F>
inline void up_row(const UpAxis& ax, const Columns& col, const F* xp, const float* g, F* dst, bool accumulate, F* tmp) {
  const int64_t u = ax.u;
  for (int64_t r = 0; r < std::min<int64_t>(u, col.tc_n); ++r) {
    const int64_t t = col.tc_lo + r;
    const int64_t count = (col.tc_n - r + u - 1) / u;
    const int64_t base = ax.j0(t) - col.jx_lo, k0 = ax.k0(t), nt = ax.ntaps(t);
    F* out = u == 1 ? dst : tmp;
    if (u != 1 || !accumulate)
      for (int64_t s = 0; s < count; ++s) out[s] = F(0);
    for (int64_t m = 0; m < nt; ++m) {
      const F coef = F(g[k0 + u * m]);
      const F* src = xp + base + m;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd
#endif
      for (int64_t s = 0; s < count; ++s) out[s] += src[s] * coef;
    }
    if (u != 1) {
      if (accumulate)
        for (int64_t s = 0; s < count; ++s) dst[r + u * s] += tmp[s];
      else
        for (int64_t s = 0; s < count; ++s) dst[r + u * s] = tmp[s];
    }
  }
}

// One row of the downsampling FIR: dst[o] (+)= sum_k src[o * d + k] * g[k], o < n. For d > 1
// the row is first split into its d phases (src[i * d + r]) so the loops stay contiguous.
template <typename F>
inline void down_row(const F* src, const float* g, int64_t taps, int64_t d, int64_t n, F* dst, bool accumulate,
                     F* phase) {
  if (!accumulate)
    for (int64_t o = 0; o < n; ++o) dst[o] = F(0);
  if (d == 1) {
    for (int64_t k = 0; k < taps; ++k) {
      const F coef = F(g[k]);
      const F* s = src + k;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd
#endif
      for (int64_t o = 0; o < n; ++o) dst[o] += s[o] * coef;
    }
    return;
  }
  for (int64_t r = 0; r < std::min(d, taps); ++r) {
    const int64_t len = n + (taps - 1 - r) / d;  // phase samples this filter phase reads
    for (int64_t i = 0; i < len; ++i) phase[i] = src[i * d + r];
    for (int64_t k = r, m = 0; k < taps; k += d, ++m) {
      const F coef = F(g[k]);
      const F* s = phase + m;
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd
#endif
      for (int64_t o = 0; o < n; ++o) dst[o] += s[o] * coef;
    }
  }
}

template <typename F>
inline void axpy(F* dst, const F* src, F coef, int64_t n) {
#ifdef GENFAST_WITH_OPENMP
#pragma omp simd
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i] * coef;
}

struct Band {
  int64_t plane, oy_begin, oy_end;
  int64_t own_end;  // codes of T rows < own_end are written by this band (the next band starts there)
};

// The whole chain for one band of output rows of one plane.
template <typename T>
GF_CPU_KERNEL void run_band(const Args& a, const Columns& col, const Band& band,
                            Buffers<typename Compute<T>::type>& buf) {
  using F = typename Compute<T>::type;
  const int64_t n = band.plane / a.C, c = band.plane % a.C;
  T* out = static_cast<T*>(a.out) + n * a.out_s[0] + c * a.out_s[1];
  auto write_zero_rows = [&](int64_t y0, int64_t y1) {
    for (int64_t oy = y0; oy < y1; ++oy)
      for (int64_t ox = 0; ox < a.ow; ++ox) out[oy * a.out_s[2] + ox * a.out_s[3]] = from_compute<T>(F(0));
  };
  // T rows this band needs, clipped to T.
  const int64_t tr_lo = std::max<int64_t>(0, band.oy_begin * a.d2 - a.p2y);
  const int64_t tr_hi = std::min<int64_t>(a.th - 1, (band.oy_end - 1) * a.d2 + a.g2h - 1 - a.p2y);
  if (tr_lo > tr_hi || col.tc_n <= 0) return write_zero_rows(band.oy_begin, band.oy_end);
  const int64_t ntr = tr_hi - tr_lo + 1;

  const UpAxis ax{a.u1, a.p1x, a.g1w}, ay{a.u1, a.p1y, a.g1h};
  // Input rows needed, clipped to the input (rows outside are zeros: skipped).
  const int64_t jy_lo = std::max<int64_t>(0, ay.j0(tr_lo));
  const int64_t jy_hi = std::min<int64_t>(a.in_h - 1, floor_div(tr_hi - a.p1y + a.g1h - 1, a.u1));
  const int64_t nxr = std::max<int64_t>(0, jy_hi - jy_lo + 1);

  // 1. Padded input rows (+ bias), in the compute type.
  const bool act = a.mode == ACT;
  const F bias = act && a.b ? F(to_float(static_cast<const T*>(a.b)[c])) : F(0);
  buf.xp.assign(size_t(std::max<int64_t>(nxr, 1) * col.xp_len), F(0));
  const T* xs = static_cast<const T*>(a.x);
  const int64_t x_base = n * a.in_s[0] + c * a.in_s[1];
  const int64_t j_begin = std::max<int64_t>(0, col.jx_lo), j_end = std::min<int64_t>(a.in_w, col.jx_lo + col.xp_len);
  for (int64_t i = 0; i < nxr; ++i) {
    F* row = buf.xp.data() + i * col.xp_len;
    const int64_t off = x_base + (jy_lo + i) * a.in_s[2];
    for (int64_t j = j_begin; j < j_end; ++j) row[j - col.jx_lo] = F(to_float(xs[off + j * a.in_s[3]])) + bias;
  }

  // 2. The T band, stored as padded T' rows (zeros where the downsampling reads outside T).
  buf.rp.assign(size_t(ntr * col.rw), F(0));
  buf.tmp.resize(size_t(col.tc_n + 1));
  if (a.g1_sep) {
    buf.h1.resize(size_t(std::max<int64_t>(nxr, 1) * col.tc_n));
    for (int64_t i = 0; i < nxr; ++i)
      up_row(ax, col, buf.xp.data() + i * col.xp_len, a.g1, buf.h1.data() + i * col.tc_n, false, buf.tmp.data());
  }
  for (int64_t tr = tr_lo; tr <= tr_hi; ++tr) {
    F* dst = buf.rp.data() + (tr - tr_lo) * col.rw + col.q_off;
    const int64_t j0 = ay.j0(tr), k0 = ay.k0(tr), nt = ay.ntaps(tr);
    for (int64_t m = 0; m < nt; ++m) {
      const int64_t jy = j0 + m;
      if (jy < jy_lo || jy > jy_hi) continue;
      const int64_t ky = k0 + a.u1 * m;
      if (a.g1_sep)
        axpy(dst, buf.h1.data() + (jy - jy_lo) * col.tc_n, F(a.g1[ky]), col.tc_n);
      else
        up_row(ax, col, buf.xp.data() + (jy - jy_lo) * col.xp_len, a.g1 + ky * a.g1w, dst, true, buf.tmp.data());
    }
    // 3. Activation (writing the sign record) or the saved mask, in place.
    uint8_t* codes = a.signs ? a.signs + (band.plane * a.th + tr) * a.tw + col.tc_lo : nullptr;
    if (act) {
      const F gain = F(a.gain), slope = F(a.slope), clamp = F(a.clamp);
      const bool has_clamp = a.clamp >= 0;
      const bool own = codes && tr < band.own_end;
      for (int64_t i = 0; i < col.tc_n; ++i) {
        const F z = dst[i];
        F v = (z > F(0) ? z : z * slope) * gain;
        uint8_t code = z > F(0) ? POSITIVE : NEGATIVE;
        if (has_clamp && (v > clamp || v < -clamp)) {
          v = v > clamp ? clamp : -clamp;
          code = CLAMPED;
        }
        dst[i] = v;
        if (own) codes[i] = code;
      }
    } else {
      const F table[4] = {F(a.gain), F(a.gain * a.slope), F(0), F(0)};
      for (int64_t i = 0; i < col.tc_n; ++i) dst[i] *= table[codes[i] & 3];
    }
  }

  // 4. Downsample into the output rows.
  buf.yrow.resize(size_t(a.ow));
  buf.phase.resize(size_t(col.rw / a.d2 + a.g2w + 1));
  F* yrow = buf.yrow.data();
  if (a.g2_sep) {
    buf.hd.resize(size_t(ntr * a.ow));
    for (int64_t i = 0; i < ntr; ++i)
      down_row(buf.rp.data() + i * col.rw, a.g2, a.g2w, a.d2, a.ow, buf.hd.data() + i * a.ow, false, buf.phase.data());
  }
  for (int64_t oy = band.oy_begin; oy < band.oy_end; ++oy) {
    std::fill(yrow, yrow + a.ow, F(0));
    for (int64_t k = 0; k < a.g2h; ++k) {
      const int64_t tr = oy * a.d2 + k - a.p2y;
      if (tr < tr_lo || tr > tr_hi) continue;  // outside T: zeros
      if (a.g2_sep)
        axpy(yrow, buf.hd.data() + (tr - tr_lo) * a.ow, F(a.g2[k]), a.ow);
      else
        down_row(buf.rp.data() + (tr - tr_lo) * col.rw, a.g2 + k * a.g2w, a.g2w, a.d2, a.ow, yrow, true,
                 buf.phase.data());
    }
    T* o = out + oy * a.out_s[2];
    if (a.out_s[3] == 1)
      for (int64_t ox = 0; ox < a.ow; ++ox) o[ox] = from_compute<T>(yrow[ox]);
    else
      for (int64_t ox = 0; ox < a.ow; ++ox) o[ox * a.out_s[3]] = from_compute<T>(yrow[ox]);
  }
}

Columns make_columns(const Args& a) {
  Columns col;
  col.rw = (a.ow - 1) * a.d2 + a.g2w;
  col.tc_lo = std::max<int64_t>(0, -a.p2x);
  const int64_t tc_hi = std::min<int64_t>(a.tw - 1, col.rw - 1 - a.p2x);
  col.tc_n = tc_hi - col.tc_lo + 1;
  col.q_off = col.tc_lo + a.p2x;
  col.jx_lo = ceil_div(col.tc_lo - a.p1x, a.u1);
  const int64_t jx_hi = floor_div(tc_hi - a.p1x + a.g1w - 1, a.u1);
  col.xp_len = std::max<int64_t>(1, jx_hi - col.jx_lo + 1);
  return col;
}

template <typename T>
void run(const Args& a) {
  using F = typename Compute<T>::type;
  const Columns col = make_columns(a);
  const int64_t planes = a.N * a.C;
  const int threads_wanted = std::max(1, a.num_threads);
  // Whole planes when there are enough of them; else bands of output rows (their T halos
  // are recomputed). Bands also bound the T buffer (~256 KiB) for very large planes.
  int64_t band_rows = a.oh;
  if (planes < 4 * threads_wanted) {
    const int64_t splits = (4 * threads_wanted + planes - 1) / planes;
    band_rows = std::max<int64_t>(4, (a.oh + splits - 1) / splits);
  }
  const int64_t cap = std::max<int64_t>(1, (int64_t(256 * 1024) / int64_t(sizeof(F))) / (col.rw * a.d2 + 1));
  band_rows = std::max<int64_t>(1, std::min({band_rows, cap, a.oh}));
  const int64_t bands = (a.oh + band_rows - 1) / band_rows;
  const int64_t tasks = planes * bands;
  const double work = double(planes) * double(a.th) * double(a.tw) * double(a.g1w + a.g2w);
  const int threads =
      int(std::max<int64_t>(1, std::min<int64_t>({int64_t(threads_wanted), tasks, int64_t(work / 2e5) + 1})));

#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    Buffers<F> buf;
#ifdef GENFAST_WITH_OPENMP
#pragma omp for schedule(dynamic)
#endif
    for (int64_t task = 0; task < tasks; ++task) {
      Band band;
      band.plane = task / bands;
      const int64_t b = task % bands;
      band.oy_begin = b * band_rows;
      band.oy_end = std::min(a.oh, band.oy_begin + band_rows);
      band.own_end = b + 1 < bands ? std::max<int64_t>(0, band.oy_end * a.d2 - a.p2y) : a.th;
      GF_CPU_DISPATCH(run_band<T>(a, col, band, buf));
    }
  }
}

}  // namespace

void filtered_lrelu_cpu(const Args& a) {
  if (a.N * a.C == 0 || a.oh <= 0 || a.ow <= 0) return;
  if (a.mode != ACT && a.mode != MASK) throw std::invalid_argument("filtered_lrelu: unknown mode");
  if (a.mode == MASK && a.signs == nullptr)
    throw std::invalid_argument("filtered_lrelu: MASK mode needs the sign record");
  switch (a.dtype) {
    case F32: return run<float>(a);
    case F64: return run<double>(a);
    case F16: return run<half_t>(a);
    case BF16: return run<bf16_t>(a);
  }
  throw std::invalid_argument(std::string("filtered_lrelu: unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace filtered_lrelu
}  // namespace genfast
