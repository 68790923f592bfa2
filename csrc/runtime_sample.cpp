// Runtime::sample: the samplers' whole loop in C++ (mirrors adadiff_export/sampling/samplers.py: the
// same time grid bit for bit, DPM-Solver++(2M), DDIM and Euler-Maruyama, classifier-free guidance as one
// batched call), each step's denoiser call through the exit loop of runtime.cpp.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime.hpp"

namespace adadiff {

namespace {

[[noreturn]] void invalid(const std::string& what) { throw std::invalid_argument(what); }

// torch.linspace(start, end, points, dtype=float64): the same two-sided formula, so the time grid
// (and everything computed from it) matches samplers.time_grid bit for bit.
double linspace_at(double start, double end, int points, int i) {
  if (points == 1) return start;
  const double step = (end - start) / double(points - 1);
  const int halfway = points / 2;
  return i < halfway ? start + step * i : end - step * double(points - i - 1);
}

struct Schedule {
  ScheduleDesc d;
  double beta(double t) const { return d.beta_min + t * (d.beta_max - d.beta_min); }
  double log_alpha(double t) const { return -0.25 * t * t * (d.beta_max - d.beta_min) - 0.5 * t * d.beta_min; }
  double alpha(double t) const { return std::exp(log_alpha(t)); }
  double sigma(double t) const {
    double a = alpha(t);
    return std::sqrt(1 - a * a);
  }
  double lambda(double t) const { return std::log(alpha(t) / sigma(t)); }
  // Inverse of lambda for the linear VP schedule (schedule.py: VPSchedule.t_of_lambda).
  double t_of_lambda(double lam) const {
    const double log_alpha = -0.5 * std::log1p(std::exp(-2.0 * lam));
    const double b0 = d.beta_min, b1 = d.beta_max;
    if (b1 == b0) return -2.0 * log_alpha / b0;
    return (-b0 + std::sqrt(b0 * b0 - 4.0 * (b1 - b0) * log_alpha)) / (b1 - b0);
  }
  // Step n of samplers.time_grid: uniform in log-SNR for dpm++/ddim, uniform in t for euler.
  double grid(bool uniform_t, int steps, int n) const {
    if (n == 0) return 1.0;
    if (n == steps) return d.t_eps;
    if (uniform_t) return linspace_at(1.0, d.t_eps, steps + 1, n);
    return t_of_lambda(linspace_at(lambda(1.0), lambda(d.t_eps), steps + 1, n));
  }
};

}  // namespace

int Runtime::resolve_steps(const SampleOptions& o) const {
  if (o.steps < 0) invalid("steps must be >= 1, got " + std::to_string(o.steps));
  if (o.steps > 0) return o.steps;
  if (o.sampler == "dpm++") return 50;
  if (o.sampler == "ddim") return 100;
  if (o.sampler == "euler") return 1000;
  invalid("sampler must be one of 'dpm++', 'ddim', 'euler', got '" + o.sampler + "'");
}

double Runtime::resolve_guidance(const SampleOptions& o) const {
  const double w = o.guidance ? *o.guidance : m_.exit.guidance;
  if (!std::isfinite(w) || w < 0) invalid("guidance must be a finite number >= 0, got " + std::to_string(w));
  if (w != 1.0 && !m_.model.conditional())
    invalid("guidance " + std::to_string(w) + " needs a class-conditional model; this one is unconditional (use 1)");
  return w;
}

void Runtime::sample(int batch, const float* noise, const int64_t* y_in, const SampleOptions& o, float* images,
                     std::vector<int64_t>& layers, int& steps_out, int& batch_eff_out, bool device_io) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope on(*ops_);
  calls_ = 0;
  if (o.sampler != "dpm++" && o.sampler != "ddim" && o.sampler != "euler")
    invalid("sampler must be one of 'dpm++', 'ddim', 'euler', got '" + o.sampler + "'");
  const int steps = resolve_steps(o);
  const double w = resolve_guidance(o);
  const bool guided = w != 1.0;
  if (!(o.eta >= 0) || !std::isfinite(o.eta)) invalid("eta must be a finite number >= 0");
  Resolved r = resolve(o.exit);
  if (guided) r.p.group_rows = batch;  // uem-authors: the halves decide apart, as the authors' two calls do
  const int limit = guided ? std::min(m_.max_batch, cap_ / 2) : std::min(m_.max_batch, cap_);
  const int64_t* y = device_io ? read_back(batch, nullptr, y_in).second : y_in;  // the labels are rebuilt on the host
  check_inputs("sample", batch, device_io ? nullptr : noise, nullptr, y, limit);
  bind_table(r);
  const int be = guided ? 2 * batch : batch;
  const int64_t n_img = int64_t(batch) * img_;

  // Everything the loop needs is allocated or uploaded here, before it starts. The exit layers of
  // every step grow one buffer that later calls reuse: no device allocation per call once warm.
  const size_t history_bytes = size_t(steps) * be * sizeof(int64_t);
  if (history_.bytes() < history_bytes) history_ = Buffer(ops_.get(), history_bytes);
  Buffer& history = history_;
  put(x_state_.as(), noise, n_img * sizeof(float), device_io);
  if (y) {
    std::vector<int64_t> yy(be, m_.model.null_class);
    for (int i = 0; i < batch; ++i) yy[i] = y[i];
    ops_->upload(y_in_.as(), yy.data(), be * sizeof(int64_t));
  }
  const Schedule sch{m_.schedule};
  double h_prev = 0.0;
  float* x = x_state_.as<float>();
  for (int n = 0; n < steps; ++n) {
    const bool uniform_t = o.sampler == "euler";
    const double t = sch.grid(uniform_t, steps, n);
    const double s = sch.grid(uniform_t, steps, n + 1);
    ops_->fill_f32(t_in_.as<float>(), be, float(t));
    std::fill_n(t_rows_.begin(), be, float(t));
    const void* xin = x;
    if (guided) {
      ops_->copy(x_in_.as(), x, n_img * sizeof(float));
      ops_->copy(x_in_.as<float>() + n_img, x, n_img * sizeof(float));
      xin = x_in_.as();
    }
    run_exit_loop(be, xin, t_rows_.data(), r, history.as<int64_t>() + int64_t(n) * be);
    const float* eps = eps_out_.as<float>();
    if (guided) {
      ops_->cfg_combine(eps_cfg_.as<float>(), eps, n_img, float(w));
      eps = eps_cfg_.as<float>();
    }
    StepCoefs c;
    c.seed = o.seed;
    c.step = uint64_t(n);
    const double a_t = sch.alpha(t), s_t = sch.sigma(t), a_s = sch.alpha(s), s_s = sch.sigma(s);
    c.a_t = float(a_t);
    c.s_t = float(s_t);
    if (o.sampler == "ddim") {
      c.kind = StepKind::Ddim;
      const double cn = o.eta * (s_s / s_t) * std::sqrt(std::max(0.0, 1.0 - (a_t / a_s) * (a_t / a_s)));
      c.c_x0 = float(a_s);
      c.c_eps = float(std::sqrt(std::max(0.0, s_s * s_s - cn * cn)));
      c.noise = cn > 0 ? float(cn) : 0.0f;
    } else if (o.sampler == "dpm++") {
      const double h = sch.lambda(s) - sch.lambda(t);
      c.kind = n == 0 ? StepKind::DpmFirst : StepKind::DpmSecond;
      if (n > 0) {
        const double rr = h_prev / h;
        c.d_cur = float(1 + 1 / (2 * rr));
        c.d_prev = float(1 / (2 * rr));
      }
      c.r_x = float(s_s / s_t);
      c.r_d = float(a_s * std::expm1(-h));
      h_prev = h;
    } else {
      const double dt = t - s, beta = sch.beta(t);
      c.kind = StepKind::Euler;
      c.half_beta = float(0.5 * beta);
      c.beta = float(beta);
      c.sigma = float(s_t);
      c.dt = float(dt);
      c.noise = n < steps - 1 ? float(std::sqrt(beta * dt)) : 0.0f;
    }
    c.final_x0 = o.final_x0 && n == steps - 1;
    ops_->sampler_step(c, x, eps, x0_prev_.as<float>(), n_img);
  }
  ops_->clamp_unit(x, n_img);
  get(images, x, n_img * sizeof(float), device_io);
  layers.resize(size_t(steps) * be);
  ops_->download(layers.data(), history.as(), layers.size() * sizeof(int64_t));
  steps_out = steps;
  batch_eff_out = be;
}

}  // namespace adadiff
