// upfirdn2d on the CPU: each output pixel computed directly from the input, polyphase (only
// the filter taps that land on real input samples, never the zero-inserted image).
//
// Along one axis the outputs o = ph + P * m of phase ph (P = up / gcd(up, down)) all use the
// same taps g[k0 + j * up] on inputs ix0 + m * S + j (S = down / gcd(up, down)), so each
// phase is a short dense correlation. The input rows a task reads are converted once into a
// zero-margined float buffer, split by position modulo S, so the inner loops have no bounds
// checks and read contiguous memory for any step.
//
// Layouts: NCHW rows are contiguous (the loops over output pixels vectorise); NHWC keeps a
// block of channels per pixel ("lanes", the loops over channels vectorise). Separable filters
// run as two passes (x into a float strip of rows, then y); full filters accumulate, per output
// row, one x pass per filter row that lands on an input row. OpenMP over (n, channel block,
// strip of output rows). 64-bit indices throughout.
#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_isa.h"
#include "upfirdn2d.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace upfirdn2d {
namespace {

constexpr int64_t kMaxLanes = 64;            // channels per pixel processed together (NHWC)
constexpr int64_t kStripBytes = 256 * 1024;  // input and x-pass rows kept per task
constexpr int64_t kMinOpsPerThread = 1 << 16;

struct Phase {
  int64_t count;  // outputs in this phase
  int64_t ix0;    // input index of tap j = 0 for m = 0
  int64_t k0;     // first filter tap of this phase
  int64_t ntaps;  // taps k0, k0 + up, ... below the filter size
};

// Polyphase plan of one axis.
struct AxisPlan {
  int64_t up, down, pad0, in, out, taps;
  int64_t P, S;
  std::vector<Phase> phases;
  int64_t lo, hi;     // input index range the phases read (may extend past [0, in))
  int64_t phase_len;  // outputs per phase, at most

  AxisPlan(int64_t up_, int64_t down_, int64_t pad0_, int64_t in_, int64_t out_, int64_t taps_)
      : up(up_), down(down_), pad0(pad0_), in(in_), out(out_), taps(taps_) {
    const int64_t g = std::gcd(up, down);
    P = up / g;
    S = down / g;
    phase_len = (out + P - 1) / P;
    lo = 0;
    hi = 0;
    bool first = true;
    for (int64_t ph = 0; ph < std::min(P, out); ++ph) {
      Phase p;
      const int64_t s0 = ph * down - pad0;
      p.ix0 = ceil_div(s0, up);
      p.k0 = p.ix0 * up - s0;
      p.ntaps = p.k0 < taps ? (taps - p.k0 + up - 1) / up : 0;
      p.count = (out - ph + P - 1) / P;
      if (p.ntaps > 0) {
        const int64_t last = p.ix0 + (p.count - 1) * S + p.ntaps - 1;
        lo = first ? p.ix0 : std::min(lo, p.ix0);
        hi = first ? last : std::max(hi, last);
        first = false;
      }
      phases.push_back(p);
    }
  }
  int64_t span() const { return hi - lo + 1; }
};

// Taps of the y axis for output row oy: input rows iy0 + j (only those inside [0, in)) with
// filter rows k0 + j * up.
struct RowTaps {
  int64_t iy0, k0, ntaps;
};
inline RowTaps row_taps(const AxisPlan& ax, int64_t oy) {
  const int64_t s0 = oy * ax.down - ax.pad0;
  RowTaps t;
  t.iy0 = ceil_div(s0, ax.up);
  t.k0 = t.iy0 * ax.up - s0;
  t.ntaps = t.k0 < ax.taps ? (ax.taps - t.k0 + ax.up - 1) / ax.up : 0;
  return t;
}

// Where one (n, channel block) plane lives: element (y, x, lane) at base + y * row + x * pos + lane.
struct PlaneView {
  int64_t base, row, pos;
};

template <typename F>
struct Scratch {
  std::vector<F> rows;         // the task's input rows, converted to F with zero margins (RowLayout)
  std::vector<F> tmp;          // the phases' outputs before interleaving (lanes == 1): [P][phase_len]
  std::vector<F> acc;          // one output row: [ow][lanes]
  std::vector<F> strip;        // x-pass rows (separable): [rows][ow][lanes]
  std::vector<const F*> ptrs;  // terms of one dot_rows call
  std::vector<F> weights;
};

// out[m] (+)= sum_k w[k] * ptr[k][m] for m < count: every tap of one output run in registers,
// one pass over out. K is a constant so the k loop unrolls and the m loop vectorises; out never
// overlaps the sources (ivdep).
template <int K, typename F>
inline void dot_fixed(F* __restrict out, const F* const* ptr, const F* w, int64_t count, bool accumulate) {
  const F* p[K];
  F c[K];
  for (int k = 0; k < K; ++k) {
    p[k] = ptr[k];
    c[k] = w[k];
  }
  if (accumulate) {
#pragma GCC ivdep
    for (int64_t m = 0; m < count; ++m) {
      F a = out[m];
      for (int k = 0; k < K; ++k) a += c[k] * p[k][m];
      out[m] = a;
    }
  } else {
#pragma GCC ivdep
    for (int64_t m = 0; m < count; ++m) {
      F a = F(0);
      for (int k = 0; k < K; ++k) a += c[k] * p[k][m];
      out[m] = a;
    }
  }
}

// Any number of terms, in chunks of at most 8.
template <typename F>
inline void dot_rows(F* __restrict out, const F* const* ptr, const F* w, int64_t terms, int64_t count,
                     bool accumulate) {
  if (terms == 0) {
    if (!accumulate) std::fill(out, out + count, F(0));
    return;
  }
  for (int64_t k = 0; k < terms; k += 8) {
    const bool acc = accumulate || k > 0;
    switch (std::min<int64_t>(8, terms - k)) {
      case 1: dot_fixed<1>(out, ptr + k, w + k, count, acc); break;
      case 2: dot_fixed<2>(out, ptr + k, w + k, count, acc); break;
      case 3: dot_fixed<3>(out, ptr + k, w + k, count, acc); break;
      case 4: dot_fixed<4>(out, ptr + k, w + k, count, acc); break;
      case 5: dot_fixed<5>(out, ptr + k, w + k, count, acc); break;
      case 6: dot_fixed<6>(out, ptr + k, w + k, count, acc); break;
      case 7: dot_fixed<7>(out, ptr + k, w + k, count, acc); break;
      default: dot_fixed<8>(out, ptr + k, w + k, count, acc); break;
    }
  }
}

// Memory layout of one loaded input row, position p = ix - ax.lo in [0, span):
//   lanes == 1: split by p % S into S runs of L = ceil(span / S) (p at (p % S) * L + p / S), so
//               the inputs ix0 + m * S + j of one tap are contiguous in m for any step S;
//   lanes > 1:  [span][lanes].
struct RowLayout {
  int64_t lanes, S, L, size;
  RowLayout(const AxisPlan& ax, int64_t lanes_) : lanes(lanes_), S(ax.S) {
    L = (ax.span() + S - 1) / S;
    size = lanes == 1 ? S * L : ax.span() * lanes;
  }
  // Where position q of a loaded row starts (lanes == 1: the run of q's residue class).
  template <typename F>
  const F* at(const F* row, int64_t q) const {
    return row + (q % S) * L + q / S;
  }
};

// Load input row iy of a plane into row. Positions outside [0, in) must already be zero.
template <typename T, typename F>
inline void load_row(F* __restrict row, const T* __restrict x, const PlaneView& v, int64_t iy, const AxisPlan& ax,
                     const RowLayout& rl) {
  const int64_t b = std::max<int64_t>(ax.lo, 0), e = std::min(ax.hi + 1, ax.in);
  const T* __restrict src = x + v.base + iy * v.row;
  if (rl.lanes == 1) {
    if (rl.S == 1) {
      for (int64_t ix = b; ix < e; ++ix) row[ix - ax.lo] = F(to_float(src[ix]));
    } else {
      // One residue class at a time: contiguous writes and no division per element.
      for (int64_t r = 0; r < rl.S; ++r) {
        const int64_t p0 = (b - ax.lo) + ((r - (b - ax.lo)) % rl.S + rl.S) % rl.S;  // first p >= b - lo, p % S == r
        F* __restrict d = row + r * rl.L + p0 / rl.S;
        const T* __restrict s = src + ax.lo + p0;
        const int64_t count = p0 < e - ax.lo ? (e - ax.lo - p0 + rl.S - 1) / rl.S : 0;
        for (int64_t k = 0; k < count; ++k) d[k] = F(to_float(s[k * rl.S]));
      }
    }
  } else {
    for (int64_t ix = b; ix < e; ++ix) {
      F* __restrict d = row + (ix - ax.lo) * rl.lanes;
      const T* __restrict s = src + ix * v.pos;
      for (int64_t c = 0; c < rl.lanes; ++c) d[c] = F(to_float(s[c]));
    }
  }
}

// out[m * P + ph] (+)= tmp[ph * phase_len + m]: the phases of an upsampling x pass, interleaved
// (P as a constant where it is common, so the loop vectorises).
template <int64_t kP, typename F>
inline void interleave(F* __restrict out, const F* __restrict tmp, const AxisPlan& ax, bool accumulate) {
  const int64_t P = kP > 0 ? kP : ax.P;
  const int64_t full = ax.out / P;  // rows of P outputs that every phase fills
  for (int64_t m = 0; m < full; ++m)
    for (int64_t ph = 0; ph < P; ++ph) {
      const F v = tmp[ph * ax.phase_len + m];
      out[m * P + ph] = accumulate ? out[m * P + ph] + v : v;
    }
  for (int64_t o = full * P; o < ax.out; ++o) {
    const F v = tmp[(o % P) * ax.phase_len + o / P];
    out[o] = accumulate ? out[o] + v : v;
  }
}

// x pass of one loaded row: out[o][lane] (+)= sum_j g[k0 + j * up] * row[ix0 + m * S + j][lane].
template <typename F>
inline void x_pass(F* __restrict out, const F* __restrict row, const float* __restrict g, const AxisPlan& ax,
                   const RowLayout& rl, bool accumulate, Scratch<F>& sc) {
  F* tmp = sc.tmp.data();
  const int64_t lanes = rl.lanes;
  for (int64_t ph = 0; ph < int64_t(ax.phases.size()); ++ph) {
    const Phase& p = ax.phases[ph];
    if (lanes == 1) {
      // Phase ph straight into out (P == 1), or into its own run of tmp, interleaved below.
      F* dst = ax.P == 1 ? out : tmp + ph * ax.phase_len;
      sc.ptrs.clear();
      sc.weights.clear();
      for (int64_t j = 0; j < p.ntaps; ++j) {
        sc.ptrs.push_back(rl.at(row, p.ix0 - ax.lo + j));
        sc.weights.push_back(F(g[p.k0 + j * ax.up]));
      }
      dot_rows(dst, sc.ptrs.data(), sc.weights.data(), p.ntaps, p.count, accumulate && ax.P == 1);
    } else {
      for (int64_t m = 0; m < p.count; ++m) {
        F* __restrict o = out + (ph + m * ax.P) * lanes;
        F a[kMaxLanes];
        for (int64_t c = 0; c < lanes; ++c) a[c] = accumulate ? o[c] : F(0);
        const F* __restrict s = row + (p.ix0 - ax.lo + m * ax.S) * lanes;
        for (int64_t j = 0; j < p.ntaps; ++j) {
          const F gj = F(g[p.k0 + j * ax.up]);
          const F* __restrict sj = s + j * lanes;
          for (int64_t c = 0; c < lanes; ++c) a[c] += gj * sj[c];
        }
        for (int64_t c = 0; c < lanes; ++c) o[c] = a[c];
      }
    }
  }
  if (lanes == 1 && ax.P > 1) {
    if (ax.P == 2)
      interleave<2>(out, tmp, ax, accumulate);
    else if (ax.P == 4)
      interleave<4>(out, tmp, ax, accumulate);
    else
      interleave<0>(out, tmp, ax, accumulate);
  }
}

template <typename T, typename F>
inline void store_row(T* __restrict y, const F* __restrict acc, const PlaneView& v, int64_t oy, int64_t ow,
                      int64_t lanes) {
  T* __restrict dst = y + v.base + oy * v.row;
  if (lanes == 1) {
    for (int64_t ox = 0; ox < ow; ++ox) dst[ox] = from_compute<T>(acc[ox]);
  } else {
    for (int64_t ox = 0; ox < ow; ++ox)
      for (int64_t c = 0; c < lanes; ++c) dst[ox * v.pos + c] = from_compute<T>(acc[ox * lanes + c]);
  }
}

struct Plan {
  AxisPlan ax, ay;
  int64_t lanes, cblocks, strip_rows, strips;
};

// One task: output rows [oy0, oy1) of one (n, channel block) plane.
template <typename T>
GF_CPU_KERNEL void run_task(const Args& a, const Plan& pl, int64_t task, Scratch<typename Compute<T>::type>& s) {
  using F = typename Compute<T>::type;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.out);
  const AxisPlan& ax = pl.ax;
  const AxisPlan& ay = pl.ay;
  const int64_t strip = task % pl.strips;
  const int64_t plane = task / pl.strips;
  const int64_t oy0 = strip * pl.strip_rows, oy1 = std::min(a.oh, oy0 + pl.strip_rows);

  // Plane geometry (same strides for x and out except their sizes).
  int64_t lanes;
  PlaneView vin, vout;
  if (a.channels_last) {
    const int64_t n = plane / pl.cblocks, c0 = (plane % pl.cblocks) * pl.lanes;
    lanes = std::min(pl.lanes, a.c - c0);
    vin = PlaneView{n * a.h * a.w * a.c + c0, a.w * a.c, a.c};
    vout = PlaneView{n * a.oh * a.ow * a.c + c0, a.ow * a.c, a.c};
  } else {
    lanes = 1;
    vin = PlaneView{plane * a.h * a.w, a.w, 1};
    vout = PlaneView{plane * a.oh * a.ow, a.ow, 1};
  }
  const int64_t row_len = a.ow * lanes;
  const RowLayout rl(ax, lanes);
  s.tmp.resize(size_t(ax.P * ax.phase_len));
  s.acc.resize(size_t(row_len));
  F* acc = s.acc.data();

  // The input rows this strip's outputs read: loaded (and converted) once.
  int64_t iy_lo = a.h, iy_hi = -1;
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const RowTaps t = row_taps(ay, oy);
    if (t.ntaps == 0) continue;
    iy_lo = std::min(iy_lo, t.iy0);
    iy_hi = std::max(iy_hi, t.iy0 + t.ntaps - 1);
  }
  iy_lo = std::max<int64_t>(iy_lo, 0);
  iy_hi = std::min(iy_hi, a.h - 1);
  const int64_t nrows = std::max<int64_t>(0, iy_hi - iy_lo + 1);
  s.rows.assign(size_t(nrows * rl.size), F(0));
  for (int64_t iy = iy_lo; iy <= iy_hi; ++iy) load_row(s.rows.data() + (iy - iy_lo) * rl.size, x, vin, iy, ax, rl);

  if (a.separable) {
    // x pass of every loaded row into the strip, then the y pass from it.
    s.strip.resize(size_t(nrows * row_len));
    for (int64_t r = 0; r < nrows; ++r)
      x_pass(s.strip.data() + r * row_len, s.rows.data() + r * rl.size, a.g, ax, rl, false, s);
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const RowTaps t = row_taps(ay, oy);
      s.ptrs.clear();
      s.weights.clear();
      for (int64_t j = 0; j < t.ntaps; ++j) {
        const int64_t iy = t.iy0 + j;
        if (iy < 0 || iy >= a.h) continue;
        s.ptrs.push_back(s.strip.data() + (iy - iy_lo) * row_len);
        s.weights.push_back(F(a.g[t.k0 + j * ay.up]));
      }
      dot_rows(acc, s.ptrs.data(), s.weights.data(), int64_t(s.ptrs.size()), row_len, false);
      store_row(y, acc, vout, oy, a.ow, lanes);
    }
  } else if (lanes == 1) {
    // Full filter: every (row, column) tap of one output phase in a single dot_rows.
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const RowTaps t = row_taps(ay, oy);
      for (int64_t ph = 0; ph < int64_t(ax.phases.size()); ++ph) {
        const Phase& p = ax.phases[ph];
        s.ptrs.clear();
        s.weights.clear();
        for (int64_t jy = 0; jy < t.ntaps; ++jy) {
          const int64_t iy = t.iy0 + jy;
          if (iy < 0 || iy >= a.h) continue;
          const F* row = s.rows.data() + (iy - iy_lo) * rl.size;
          const float* grow = a.g + (t.k0 + jy * ay.up) * a.fw;
          for (int64_t jx = 0; jx < p.ntaps; ++jx) {
            s.ptrs.push_back(rl.at(row, p.ix0 - ax.lo + jx));
            s.weights.push_back(F(grow[p.k0 + jx * ax.up]));
          }
        }
        F* dst = ax.P == 1 ? acc : s.tmp.data() + ph * ax.phase_len;
        dot_rows(dst, s.ptrs.data(), s.weights.data(), int64_t(s.ptrs.size()), p.count, false);
      }
      if (ax.P == 2)
        interleave<2>(acc, s.tmp.data(), ax, false);
      else if (ax.P == 4)
        interleave<4>(acc, s.tmp.data(), ax, false);
      else if (ax.P > 1)
        interleave<0>(acc, s.tmp.data(), ax, false);
      store_row(y, acc, vout, oy, a.ow, lanes);
    }
  } else {
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const RowTaps t = row_taps(ay, oy);
      std::fill(acc, acc + row_len, F(0));
      for (int64_t j = 0; j < t.ntaps; ++j) {
        const int64_t iy = t.iy0 + j;
        if (iy < 0 || iy >= a.h) continue;
        x_pass(acc, s.rows.data() + (iy - iy_lo) * rl.size, a.g + (t.k0 + j * ay.up) * a.fw, ax, rl, true, s);
      }
      store_row(y, acc, vout, oy, a.ow, lanes);
    }
  }
}

template <typename T>
void run(const Args& a) {
  using F = typename Compute<T>::type;
  Plan pl{AxisPlan(a.upx, a.downx, a.padx0, a.w, a.ow, a.fw),
          AxisPlan(a.upy, a.downy, a.pady0, a.h, a.oh, a.fh),
          1,
          1,
          1,
          1};
  pl.lanes = a.channels_last ? std::min(a.c, kMaxLanes) : 1;
  pl.cblocks = a.channels_last ? (a.c + pl.lanes - 1) / pl.lanes : 1;
  const int64_t planes = a.channels_last ? a.n * pl.cblocks : a.n * a.c;
  // Strips: enough rows to amortise the separable pass's overlap, few enough to stay in cache
  // and to give every thread work when there are few planes.
  // Bytes per output row: its x-pass row plus the input rows it accounts for (down / up of them).
  const int64_t row_bytes =
      std::max<int64_t>(1, (a.ow + pl.ax.span() * a.downy / a.upy) * pl.lanes * int64_t(sizeof(F)));
  pl.strip_rows = std::clamp<int64_t>(kStripBytes / row_bytes, 8, std::max<int64_t>(a.oh, 8));
  const int64_t threads_wanted = std::max<int64_t>(1, a.num_threads);
  while (pl.strip_rows > 8 && planes * ((a.oh + pl.strip_rows - 1) / pl.strip_rows) < 4 * threads_wanted)
    pl.strip_rows /= 2;
  pl.strips = (a.oh + pl.strip_rows - 1) / pl.strip_rows;
  const int64_t tasks = planes * pl.strips;
  const int64_t ops = a.n * a.c * a.oh * a.ow * std::max<int64_t>(1, (a.fh * a.fw) / (a.upx * a.upy));
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>({threads_wanted, tasks, ops / kMinOpsPerThread + 1})));

#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    Scratch<F> scratch;
#ifdef GENFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t task = 0; task < tasks; ++task) GF_CPU_DISPATCH(run_task<T>(a, pl, task, scratch));
  }
}

}  // namespace

void upfirdn2d_cpu(const Args& a) {
  if (a.n * a.c * a.oh * a.ow == 0) return;
  switch (a.dtype) {
    case F32: return run<float>(a);
    case F64: return run<double>(a);
    case F16: return run<half_t>(a);
    case BF16: return run<bf16_t>(a);
  }
  throw std::invalid_argument(std::string("upfirdn2d: unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace upfirdn2d
}  // namespace genfast
