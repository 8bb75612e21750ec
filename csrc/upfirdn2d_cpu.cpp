// upfirdn2d on the CPU: each output pixel computed directly from the input, polyphase (only
// the filter taps that land on real input samples, never the zero-inserted image).
//
// Along one axis the outputs o = ph + P * m of phase ph (P = up / gcd(up, down)) all use the
// same taps g[k0 + j * up] on inputs ix0 + m * S + j (S = down / gcd(up, down)), so each
// phase is a short dense correlation. Rows are loaded into a zero-margined float buffer, so
// the inner loops have no bounds checks.
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
#include "upfirdn2d.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace genfast {
namespace upfirdn2d {
namespace {

constexpr int64_t kMaxLanes = 64;            // channels per pixel processed together (NHWC)
constexpr int64_t kStripBytes = 256 * 1024;  // x-pass rows kept per task (separable)
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
  int64_t lo, hi;  // input index range the phases read (may extend past [0, in))

  AxisPlan(int64_t up_, int64_t down_, int64_t pad0_, int64_t in_, int64_t out_, int64_t taps_)
      : up(up_), down(down_), pad0(pad0_), in(in_), out(out_), taps(taps_) {
    const int64_t g = std::gcd(up, down);
    P = up / g;
    S = down / g;
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
  std::vector<F> buf;    // one input row with zero margins: [span][lanes]
  std::vector<F> tmp;    // one phase's outputs (lanes == 1)
  std::vector<F> acc;    // one output row: [ow][lanes]
  std::vector<F> strip;  // x-pass rows (separable): [rows][ow][lanes]
};

// Load input row iy of a plane into buf (position ix at (ix - ax.lo) * lanes). Positions
// outside [0, in) stay zero from the allocation.
template <typename T, typename F>
inline void load_row(F* __restrict buf, const T* __restrict x, const PlaneView& v, int64_t iy, const AxisPlan& ax,
                     int64_t lanes) {
  const int64_t b = std::max<int64_t>(ax.lo, 0), e = std::min(ax.hi + 1, ax.in);
  const T* __restrict src = x + v.base + iy * v.row;
  if (lanes == 1) {
    for (int64_t ix = b; ix < e; ++ix) buf[ix - ax.lo] = F(to_float(src[ix]));
  } else {
    for (int64_t ix = b; ix < e; ++ix) {
      F* __restrict d = buf + (ix - ax.lo) * lanes;
      const T* __restrict s = src + ix * v.pos;
      for (int64_t c = 0; c < lanes; ++c) d[c] = F(to_float(s[c]));
    }
  }
}

// One phase's dense correlation for lanes == 1, with the input step S as a constant where
// that matters for vectorisation.
template <int64_t kS, typename F>
inline void phase_dot(F* __restrict tmp, const F* __restrict src, const float* __restrict g, int64_t up, int64_t k0,
                      int64_t ntaps, int64_t count, int64_t S_runtime) {
  const int64_t S = kS > 0 ? kS : S_runtime;
  for (int64_t m = 0; m < count; ++m) tmp[m] = F(0);
  for (int64_t j = 0; j < ntaps; ++j) {
    const F gj = F(g[k0 + j * up]);
    const F* __restrict s = src + j;
    for (int64_t m = 0; m < count; ++m) tmp[m] += gj * s[m * S];
  }
}

// x pass of one loaded row: out[o][lane] (+)= sum_j g[k0 + j * up] * buf[ix0 + m * S + j][lane].
template <typename F>
inline void x_pass(F* __restrict out, const F* __restrict buf, const float* __restrict g, const AxisPlan& ax,
                   int64_t lanes, bool accumulate, F* __restrict tmp) {
  for (int64_t ph = 0; ph < int64_t(ax.phases.size()); ++ph) {
    const Phase& p = ax.phases[ph];
    if (lanes == 1) {
      if (p.ntaps == 0) {
        if (!accumulate)
          for (int64_t m = 0; m < p.count; ++m) out[ph + m * ax.P] = F(0);
        continue;
      }
      const F* src = buf + (p.ix0 - ax.lo);
      if (ax.S == 1) phase_dot<1>(tmp, src, g, ax.up, p.k0, p.ntaps, p.count, 1);
      else if (ax.S == 2) phase_dot<2>(tmp, src, g, ax.up, p.k0, p.ntaps, p.count, 2);
      else phase_dot<0>(tmp, src, g, ax.up, p.k0, p.ntaps, p.count, ax.S);
      if (ax.P == 1) {
        if (accumulate) for (int64_t m = 0; m < p.count; ++m) out[m] += tmp[m];
        else for (int64_t m = 0; m < p.count; ++m) out[m] = tmp[m];
      } else {
        if (accumulate) for (int64_t m = 0; m < p.count; ++m) out[ph + m * ax.P] += tmp[m];
        else for (int64_t m = 0; m < p.count; ++m) out[ph + m * ax.P] = tmp[m];
      }
    } else {
      for (int64_t m = 0; m < p.count; ++m) {
        F* __restrict o = out + (ph + m * ax.P) * lanes;
        F a[kMaxLanes];
        for (int64_t c = 0; c < lanes; ++c) a[c] = accumulate ? o[c] : F(0);
        const F* __restrict s = buf + (p.ix0 - ax.lo + m * ax.S) * lanes;
        for (int64_t j = 0; j < p.ntaps; ++j) {
          const F gj = F(g[p.k0 + j * ax.up]);
          const F* __restrict sj = s + j * lanes;
          for (int64_t c = 0; c < lanes; ++c) a[c] += gj * sj[c];
        }
        for (int64_t c = 0; c < lanes; ++c) o[c] = a[c];
      }
    }
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
GF_CPU_MULTIVERSION void run_task(const Args& a, const Plan& pl, int64_t task, Scratch<typename Compute<T>::type>& s) {
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
  s.buf.assign(size_t(ax.span() * lanes), F(0));
  s.tmp.resize(size_t(a.ow));
  s.acc.resize(size_t(row_len));
  F* acc = s.acc.data();

  if (a.separable) {
    // x pass of every input row the strip's outputs read, then the y pass from that strip.
    int64_t iy_lo = a.h, iy_hi = -1;
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const RowTaps t = row_taps(ay, oy);
      if (t.ntaps == 0) continue;
      iy_lo = std::min(iy_lo, t.iy0);
      iy_hi = std::max(iy_hi, t.iy0 + t.ntaps - 1);
    }
    iy_lo = std::max<int64_t>(iy_lo, 0);
    iy_hi = std::min(iy_hi, a.h - 1);
    if (iy_hi >= iy_lo) {
      s.strip.resize(size_t((iy_hi - iy_lo + 1) * row_len));
      for (int64_t iy = iy_lo; iy <= iy_hi; ++iy) {
        load_row(s.buf.data(), x, vin, iy, ax, lanes);
        x_pass(s.strip.data() + (iy - iy_lo) * row_len, s.buf.data(), a.g, ax, lanes, false, s.tmp.data());
      }
    }
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const RowTaps t = row_taps(ay, oy);
      std::fill(acc, acc + row_len, F(0));
      for (int64_t j = 0; j < t.ntaps; ++j) {
        const int64_t iy = t.iy0 + j;
        if (iy < 0 || iy >= a.h) continue;
        const F gk = F(a.g[t.k0 + j * ay.up]);
        const F* __restrict r = s.strip.data() + (iy - iy_lo) * row_len;
        for (int64_t i = 0; i < row_len; ++i) acc[i] += gk * r[i];
      }
      store_row(y, acc, vout, oy, a.ow, lanes);
    }
  } else {
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const RowTaps t = row_taps(ay, oy);
      std::fill(acc, acc + row_len, F(0));
      for (int64_t j = 0; j < t.ntaps; ++j) {
        const int64_t iy = t.iy0 + j;
        if (iy < 0 || iy >= a.h) continue;
        load_row(s.buf.data(), x, vin, iy, ax, lanes);
        x_pass(acc, s.buf.data(), a.g + (t.k0 + j * ay.up) * a.fw, ax, lanes, true, s.tmp.data());
      }
      store_row(y, acc, vout, oy, a.ow, lanes);
    }
  }
}

template <typename T>
void run(const Args& a) {
  using F = typename Compute<T>::type;
  Plan pl{AxisPlan(a.upx, a.downx, a.padx0, a.w, a.ow, a.fw), AxisPlan(a.upy, a.downy, a.pady0, a.h, a.oh, a.fh),
          1, 1, 1, 1};
  pl.lanes = a.channels_last ? std::min(a.c, kMaxLanes) : 1;
  pl.cblocks = a.channels_last ? (a.c + pl.lanes - 1) / pl.lanes : 1;
  const int64_t planes = a.channels_last ? a.n * pl.cblocks : a.n * a.c;
  // Strips: enough rows to amortise the separable pass's overlap, few enough to stay in cache
  // and to give every thread work when there are few planes.
  const int64_t row_bytes = std::max<int64_t>(1, a.ow * pl.lanes * int64_t(sizeof(F)));
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
    for (int64_t task = 0; task < tasks; ++task) run_task<T>(a, pl, task, scratch);
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
