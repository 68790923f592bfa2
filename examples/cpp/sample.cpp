// Samples images from an engines folder with adadiff_rt from C++: open the folder, draw noise,
// run the sampling loop with early exit, print what it did and write the images as one PGM (one
// channel) or PPM (three) strip.
//
//   adadiff_sample ENGINES_DIR [--out FILE] [--n 4] [--steps 20] [--seed 0] [--threshold T]
//
// Exit status 0 on success, 2 with one "error: ..." line on stderr otherwise.
#include <adadiff/load.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string engines, out;
  int n = 4, steps = 20;
  uint64_t seed = 0;
  std::optional<double> threshold;  // unset: the folder's default (manifest exit.threshold)
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--out") a.out = value();
    else if (arg == "--n") a.n = std::stoi(value());
    else if (arg == "--steps") a.steps = std::stoi(value());
    else if (arg == "--seed") a.seed = std::stoull(value());
    else if (arg == "--threshold") a.threshold = std::stod(value());
    else if (!arg.empty() && arg[0] != '-' && a.engines.empty()) a.engines = arg;
    else throw std::invalid_argument("unknown argument " + arg);
  }
  if (a.engines.empty())
    throw std::invalid_argument("usage: adadiff_sample ENGINES_DIR [--out FILE] [--n 4] [--steps 20] [--seed 0] [--threshold T]");
  if (a.n < 1 || a.steps < 1) throw std::invalid_argument("--n and --steps must be >= 1");
  return a;
}

// The images side by side, [-1, 1] mapped to 0..255: binary PGM for one channel, PPM for three.
void write_strip(const std::string& path, const std::vector<float>& images, int n, const adadiff::ModelDesc& c) {
  if (c.in_chans != 1 && c.in_chans != 3) throw std::runtime_error("--out writes 1- or 3-channel images only");
  const int s = c.img_size, width = n * s;
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  f << (c.in_chans == 1 ? "P5" : "P6") << "\n" << width << " " << s << "\n255\n";
  for (int row = 0; row < s; ++row)
    for (int x = 0; x < width; ++x)
      for (int ch = 0; ch < c.in_chans; ++ch) {
        const int img = x / s, col = x % s;
        const float v = images[((size_t(img) * c.in_chans + ch) * s + row) * s + col];
        f.put(char(std::lround((std::fmin(std::fmax(v, -1.0f), 1.0f) + 1.0f) * 127.5f)));
      }
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    std::unique_ptr<adadiff::Runtime> rt = adadiff::open_runtime(a.engines);  // OpenVINO on the CPU
    const adadiff::Manifest& m = rt->manifest();
    const adadiff::ModelDesc& c = m.model;
    std::cout << "engines: " << m.dir << " (" << rt->engine().name() << ", depth " << c.depth << ", "
              << c.img_size << "x" << c.img_size << "x" << c.in_chans << ", max batch " << m.max_batch << ")\n";

    std::vector<float> noise(size_t(a.n) * size_t(c.image_elems()));
    std::mt19937_64 gen(a.seed);
    std::normal_distribution<float> normal;
    for (float& v : noise) v = normal(gen);
    std::vector<int64_t> labels(size_t(a.n));
    for (int i = 0; i < a.n; ++i) labels[size_t(i)] = c.conditional() ? i % c.num_classes : 0;

    adadiff::SampleOptions o;  // dpm++; guidance and the exit policy from the manifest
    o.steps = a.steps;
    o.exit.threshold = a.threshold;
    std::vector<float> images(noise.size());
    std::vector<int64_t> layers;  // [steps, rows]: the layer each row exited at, step by step
    int steps = 0, rows = 0;
    rt->sample(a.n, noise.data(), c.conditional() ? labels.data() : nullptr, o, images.data(), layers, steps, rows);

    double sum = 0, sq = 0, used = 0;
    for (float v : images) sum += v, sq += double(v) * v;
    for (int64_t l : layers) used += double(l);
    const double mean = sum / double(images.size());
    std::printf("sampled %d images, %d steps (%d rows a step, guidance %.2f, policy %s)\n", a.n, steps, rows,
                rt->resolve_guidance(o), m.exit.policy.c_str());
    std::printf("mean layers %.2f of %d; layers by step:", used / double(layers.size()), c.depth);
    for (int k = 0; k < steps; ++k) {
      double step = 0;
      for (int r = 0; r < rows; ++r) step += double(layers[size_t(k) * size_t(rows) + size_t(r)]);
      std::printf(" %.1f", step / rows);
    }
    std::printf("\nimages: mean %.4f, std %.4f\n", mean, std::sqrt(std::fmax(sq / double(images.size()) - mean * mean, 0.0)));
    if (!a.out.empty()) {
      write_strip(a.out, images, a.n, c);
      std::printf("wrote %s (%d x %d)\n", a.out.c_str(), a.n * c.img_size, c.img_size);
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
