// engines/manifest.json (docs/MANIFEST.md): parsed and validated once per Runtime.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace adadiff {

enum class DType { Float32, Float16, BFloat16, Int64 };
const char* dtype_name(DType d);
size_t dtype_size(DType d);

constexpr int64_t kBatchDim = -1;  // the manifest's symbolic "B"

struct TensorDesc {
  std::string name;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;  // kBatchDim first, static dims after
  int64_t row_elems() const;   // product of the static dims
  std::string shape_str(int batch) const;
};

struct SegmentDesc {
  std::string name, kind, file, sha256, block;
  int index = 0;      // layers: 1-based
  int skip_from = 0;  // out layers: 1-based in layer, 0 = none
  std::vector<TensorDesc> inputs, outputs;
  const TensorDesc& input(const std::string& n) const;
  const TensorDesc& output(const std::string& n) const;
  int input_index(const std::string& n) const;   // -1 when absent
  int output_index(const std::string& n) const;  // -1 when absent
};

struct ModelDesc {
  int img_size = 0, in_chans = 0, patch_size = 0, embed_dim = 0, depth = 0, num_heads = 0;
  int num_classes = 0, null_class = -1, num_tokens = 0, num_extra_tokens = 0;
  int num_in_blocks() const { return depth / 2; }
  int64_t image_elems() const { return int64_t(in_chans) * img_size * img_size; }
  int64_t hidden_elems() const { return int64_t(num_tokens) * embed_dim; }
  bool conditional() const { return num_classes > 0; }
};

struct ScheduleDesc {
  double beta_min = 0.1, beta_max = 20.0, t_eps = 1e-3;
};

// Exit parameters by the step's time (docs/MANIFEST.md, exit.schedule and exit.uem_time): bin k
// covers bounds[k-1] > t >= bounds[k] (bounds descend; bin 0 is the noisiest). A schedule has one
// exit layer per bin (min_layer == max_layer, no thresholds); uem-time lets a row exit from
// min_layer on once u < threshold, and after max_layer at the latest.
struct TimeTable {
  std::vector<double> bounds;
  std::vector<int> min_layer, max_layer;
  std::vector<float> threshold;
  int bins() const { return int(min_layer.size()); }
  bool empty() const { return min_layer.empty(); }
  int bin(float t) const;
};

constexpr int kMaxTableBins = 1024;

// Throws std::invalid_argument naming `where` unless the table is well formed for a model of
// `depth` layers: bounds descending in (0, 1), layers in 1..depth, min <= max, thresholds in [0, 1].
void check_time_table(const TimeTable& t, int depth, bool thresholds, const std::string& where);

struct ExitDefaults {
  std::string policy = "uem", granularity = "sample";
  double threshold = 0.1, guidance = 1.0;
  int patience = 1;
  int layer = 0;  // static: the exit layer (0 = full depth)
  TimeTable schedule, uem_time;  // empty when the folder was not calibrated for them
};

struct PlanDesc {
  std::string file, sha256;
};

struct TensorRtDesc {
  bool present = false;
  std::string version, gpu_arch, precision;
  int profile_min = 1, profile_opt = 1, profile_max = 0;
  std::map<std::string, PlanDesc> plans;
};

struct Manifest {
  std::string dir;  // the engines folder
  int version = 0;
  ModelDesc model;
  ScheduleDesc schedule;
  int max_batch = 0;
  std::vector<SegmentDesc> segments;  // stem, layer_1..layer_N, head, full
  ExitDefaults exit;
  TensorRtDesc tensorrt;

  const SegmentDesc& segment(const std::string& name) const;
  int segment_index(const std::string& name) const;
  // The real path of `file` after checking that it lies in the folder (a symbolic link may point only
  // inside it) and has its sha256; throws naming the segment and file.
  std::string verified_path(const std::string& what, const std::string& file, const std::string& sha) const;
};

// Version 2 added exit.layer, exit.schedule and exit.uem_time; version 1 folders still load.
constexpr int kManifestVersion = 2;
constexpr int kOldestManifestVersion = 1;

// Reads and validates <dir>/manifest.json; throws std::runtime_error naming the field at fault.
Manifest load_manifest(const std::string& dir);

// The manifest's "model" object (JSON text) as load_manifest reads and checks it: for sizing a
// Runtime before a folder exists (`build --max-batch` asks adadiff_rt.check_memory).
ModelDesc model_from_json(const std::string& text);

// A file name the manifest may use: plain, inside the folder (no '/', '\\', "..", not absolute).
bool is_plain_file_name(const std::string& name);

}  // namespace adadiff
