#pragma once

#include <memory>
#include <string>

#include "engine.hpp"
#include "manifest.hpp"

namespace adadiff {

struct OpenVinoOptions {
  std::string precision = "fp32";  // fp32 | bf16 (the CPU's inference precision hint)
  int threads = 0;                 // 0: OpenVINO's default
  std::string cache_dir;           // empty: no compiled-model cache
  int max_batch = 1;               // upper bound of the dynamic batch
  bool fuse_static = true;         // the static policy runs stem..layer L..head as one compiled graph
  bool fuse_exit = true;           // the uem policy runs as one graph that tests u itself (Engine::run_exit)
};

bool openvino_compiled();
std::unique_ptr<Engine> make_openvino_engine(const Manifest& m, const OpenVinoOptions& o);

}  // namespace adadiff
