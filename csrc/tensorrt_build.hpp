// TensorRT plans built on the target from an engines folder's ONNX segments, for a folder whose
// own plans are missing or were built for another TensorRT version or GPU (Runtime(...,
// build_plans="auto")). They go to a cache keyed by what makes a plan valid: the segment's ONNX
// sha256, the TensorRT version, the compute capability, the precision and the batch profile; a
// timing cache beside them makes a rebuild fast. Written against the TensorRT 10 / 11 C++ API
// documentation (IBuilder, nvonnxparser::IParser, IOptimizationProfile, ITimingCache); it has NOT
// run: CI has no TensorRT and no GPU (it is compiled against both header sets in every CI run;
// scripts/gpu_check.sh runs it on a GPU).
#pragma once

#include <string>

#include "manifest.hpp"

namespace adadiff {

struct PlanBuildRequest {
  std::string cache_dir;           // created when missing
  std::string precision = "fp32";  // fp32 | fp16 | bf16 (fp16 / bf16 need TensorRT 10: 11 builds typed networks)
  int profile_min = 1, profile_opt = 1, profile_max = 1;
  int device_id = 0;
};

// Could this adadiff_rt build plans (TensorRT and its ONNX parser linked)?
bool tensorrt_can_build();

// Why the folder's own plans cannot serve a Runtime on GPU `device_id` with the linked TensorRT
// (no plans, a segment without one, another version or compute capability); "" when they can.
std::string tensorrt_plans_problem(const Manifest& m, int device_id);

// The cache's file name for segment `s`'s plan: every field that makes a plan valid is in it, so a
// changed ONNX file, TensorRT, GPU, precision or profile never meets an old plan.
std::string plan_cache_name(const SegmentDesc& s, const std::string& trt_version, const std::string& gpu_arch,
                            const std::string& precision, int pmin, int popt, int pmax);

// Plans for every segment of `m` in r.cache_dir, built where the cache has none (printing one line
// per plan to stderr: a build takes seconds to minutes each); returns their description, files as
// absolute paths. Throws std::runtime_error naming the segment and TensorRT's message.
TensorRtDesc tensorrt_cached_plans(const Manifest& m, const PlanBuildRequest& r);

}  // namespace adadiff
