// Element rules shared by the CPU loops and the CUDA kernels, so both devices decide exits
// and update samples with literally the same code (and the oracle's float32 op order).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ADADIFF_HD __host__ __device__ __forceinline__
#else
#define ADADIFF_HD inline
#endif

namespace adadiff {

// UemAuthors: the AdaDiff authors' rule (one decision per batch; in blocks need a second trigger).
enum class Policy : int { Uem = 0, Static = 1, Saturation = 2, Schedule = 3, UemAuthors = 4 };
enum class Granularity : int { Sample = 0, Batch = 1 };

// Exit parameters that depend on the step's time (the manifest's exit.schedule and
// exit.uem_time, docs/MANIFEST.md). A row's bin is the number of bounds above its t (bounds
// descend), so bin 0 holds the noisiest steps. The arrays live where the runtime's buffers live.
struct TimeTableView {
  const double* bounds = nullptr;     // [bins - 1], descending
  const int* min_layer = nullptr;     // [bins] schedule: the exit layer; uem-time: first layer that may exit
  const int* max_layer = nullptr;     // [bins] uem-time: every row has exited after this layer
  const float* threshold = nullptr;   // [bins] uem-time: exit when u < threshold
  int bins = 0;                       // 0: no table (the paper's rule, one threshold)
};

// Compared in double: t is float32 and the bounds are the JSON's doubles, as the oracle compares them.
ADADIFF_HD int table_bin(const TimeTableView& tb, float t) {
  int k = 0;
  for (int j = 0; j + 1 < tb.bins; ++j) k += double(t) < tb.bounds[j] ? 1 : 0;
  return k;
}

struct ExitParams {
  Policy policy = Policy::Uem;
  Granularity granularity = Granularity::Sample;
  float threshold = 0.1f;  // float32, as torch compares a float32 score with a Python float
  int patience = 1;
  int layer = 0;  // 0-based layer just run
  int n_layers = 1;
  int static_layer = 0;  // 1-based exit layer of `static` (already resolved: 0 means n_layers)
  int group_rows = 0;    // uem-authors: rows per group that decides apart (guidance: the batch; 0: one group)
  TimeTableView table;   // `schedule`, and `uem` with time-dependent thresholds (uem-time)
  // 0: no row exits at this layer, whatever the score (the host decided: a threshold no score can
  // pass, so it need not read the count back); -1: the rule decides.
  int forced = -1;
};

// Pointers into runtime buffers (host or device, all on the same side).
struct ExitBuffers {
  const float* score;   // [n] u (uem) or relative change (saturation)
  const float* t;       // [B] time of each original sample (read only through a time table)
  const int* active;    // [n] original sample of each working row
  const int* count;     // [n] consecutive layers below threshold (uem-authors: in blocks triggered)
  int* new_active;      // [n - m] kept rows' samples, in order
  int* new_count;       // [n - m]
  int* exit_idx;        // [m] working rows that exit now
  int* exit_dest;       // [m] their original samples
  int* keep_idx;        // [n - m] working rows that continue
  int64_t* exit_layer;  // [B] per original sample
  float* u_all;         // [B, n_layers] (uem only)
  int* m_out;           // number exiting
};

// The oracle's rule (adadiff_export/sampling/early_exit.py). A serial loop on purpose: n is at most a
// few hundred rows, and one ordered pass yields the exit list, the kept list and the count at once.
ADADIFF_HD void decide_exits(const ExitParams& p, const ExitBuffers& b, int n) {
  const bool last = p.layer == p.n_layers - 1;
  const bool authors = p.policy == Policy::UemAuthors;
  const bool scored = !last && (p.policy == Policy::Uem || p.policy == Policy::Saturation || authors);
  const int here = p.layer + 1;  // 1-based layer just run
  bool batch_below = false;
  if (scored && p.granularity == Granularity::Batch && !authors) {
    float sum = 0.0f;  // torch's float32 mean; differences of an ulp only matter at the threshold itself
    for (int j = 0; j < n; ++j) sum += b.score[j];
    batch_below = sum / float(n) < p.threshold;
  }
  // uem-authors: the mean of each group (at most two: the halves of a guided call) decides for the group.
  bool group_trig[2] = {false, false};
  if (scored && authors) {
    float sum[2] = {0.0f, 0.0f};
    int rows[2] = {0, 0};
    for (int j = 0; j < n; ++j) {
      const int g = p.group_rows > 0 && b.active[j] >= p.group_rows ? 1 : 0;
      sum[g] += b.score[j];
      ++rows[g];
    }
    for (int g = 0; g < 2; ++g) group_trig[g] = rows[g] > 0 && sum[g] / float(rows[g]) < p.threshold;
  }
  int m = 0, w = 0;
  for (int j = 0; j < n; ++j) {
    if (scored && p.policy != Policy::Saturation) b.u_all[int64_t(b.active[j]) * p.n_layers + p.layer] = b.score[j];
    int c = b.count[j];
    bool exits;
    if (last) {
      exits = true;
    } else if (p.forced == 0) {
      c = 0;
      exits = false;
    } else if (p.policy == Policy::Static) {
      exits = here >= p.static_layer;
    } else if (p.policy == Policy::Schedule) {
      exits = here >= p.table.min_layer[table_bin(p.table, b.t[b.active[j]])];
    } else if (authors) {
      // In blocks (layers 1..k, k = n_layers / 2) exit at the second trigger, consecutive or not; the
      // mid block and the out blocks at the first.
      const bool trig = group_trig[p.group_rows > 0 && b.active[j] >= p.group_rows ? 1 : 0];
      if (here <= p.n_layers / 2) {
        c = trig ? c + 1 : c;
        exits = c >= 2;
      } else {
        exits = trig;
      }
    } else if (p.table.bins > 0) {
      // uem-time: rows may exit from the bin's first layer on and all have by its last.
      const int k = table_bin(p.table, b.t[b.active[j]]);
      const bool below = here >= p.table.min_layer[k] && b.score[j] < p.table.threshold[k];
      c = below ? c + 1 : 0;
      exits = c >= p.patience || here >= p.table.max_layer[k];
    } else {
      bool below = p.granularity == Granularity::Batch ? batch_below : b.score[j] < p.threshold;
      c = below ? c + 1 : 0;
      exits = c >= p.patience;
    }
    if (exits) {
      b.exit_idx[m] = j;
      b.exit_dest[m] = b.active[j];
      b.exit_layer[b.active[j]] = p.layer + 1;
      ++m;
    } else {
      b.keep_idx[w] = j;
      b.new_active[w] = b.active[j];
      b.new_count[w] = c;
      ++w;
    }
  }
  *b.m_out = m;
}

enum class StepKind : int { Ddim = 0, DpmFirst = 1, DpmSecond = 2, Euler = 3 };

// Coefficients of one sampler step, computed in float64 on the host exactly as samplers.py does
// with Python floats, then rounded to float32 where torch would round the Python scalar.
struct StepCoefs {
  StepKind kind = StepKind::Ddim;
  float s_t = 0, a_t = 1;       // x0 = (x - s_t * eps) / a_t
  float c_x0 = 0, c_eps = 0;    // ddim: x = c_x0 * x0 + c_eps * eps
  float r_x = 0, r_d = 0;       // dpm: x = r_x * x - r_d * d
  float d_cur = 0, d_prev = 0;  // dpm second order: d = d_cur * x0 - d_prev * x0_prev
  float half_beta = 0, beta = 0, sigma = 1, dt = 0;  // euler
  float noise = 0;              // scale of the Gaussian added after the update (0: none)
  bool final_x0 = false;        // the last step returns x0 instead of stepping to t_eps
  uint64_t seed = 0;
  uint64_t step = 0;
};

ADADIFF_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A counter-based standard normal: element i of step s under seed k is the same on CPU and GPU
// and independent of how the work is split, so stochastic samplers are reproducible per seed.
ADADIFF_HD float gaussian(uint64_t seed, uint64_t step, uint64_t i) {
  uint64_t a = splitmix64(seed ^ splitmix64((step << 40) ^ i));
  uint64_t b = splitmix64(a);
  double u1 = (double((a >> 11) + 1)) * (1.0 / 9007199254740992.0);  // (0, 1]
  double u2 = double(b >> 11) * (1.0 / 9007199254740992.0);
  return float(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

ADADIFF_HD float sampler_element(const StepCoefs& c, float x, float eps, float* x0_prev, uint64_t i) {
  if (c.final_x0) return (x - c.s_t * eps) / c.a_t;
  float out;
  if (c.kind == StepKind::Euler) {
    float drift = c.half_beta * x - (c.beta * eps) / c.sigma;
    out = x + drift * c.dt;
  } else {
    float x0 = (x - c.s_t * eps) / c.a_t;
    if (c.kind == StepKind::Ddim) {
      out = c.c_x0 * x0 + c.c_eps * eps;
    } else {
      float d = c.kind == StepKind::DpmFirst ? x0 : c.d_cur * x0 - c.d_prev * (*x0_prev);
      out = c.r_x * x - c.r_d * d;
      *x0_prev = x0;
    }
  }
  if (c.noise > 0.0f) out = out + c.noise * gaussian(c.seed, c.step, i);
  return out;
}

// eps = uncond + w * (cond - uncond), cond being the first half of the batched call.
ADADIFF_HD float cfg_element(float cond, float uncond, float w) { return uncond + w * (cond - uncond); }

ADADIFF_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

}  // namespace adadiff
