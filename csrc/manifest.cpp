// The manifest's descriptions: tensors and segments, files verified by sha256 before use, time tables
// (reading manifest.json is manifest_read.cpp).
#include "manifest.hpp"

#include <openssl/evp.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace adadiff {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
  }
  return "?";
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Int64: return 8;
  }
  return 0;
}

int64_t TensorDesc::row_elems() const {
  int64_t n = 1;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

std::string TensorDesc::shape_str(int batch) const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += shape[i] == kBatchDim ? (batch > 0 ? std::to_string(batch) : std::string("B")) : std::to_string(shape[i]);
  }
  return s + "]";
}

int SegmentDesc::input_index(const std::string& n) const {
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].name == n) return int(i);
  return -1;
}

int SegmentDesc::output_index(const std::string& n) const {
  for (size_t i = 0; i < outputs.size(); ++i)
    if (outputs[i].name == n) return int(i);
  return -1;
}

const TensorDesc& SegmentDesc::input(const std::string& n) const {
  int i = input_index(n);
  if (i < 0) throw std::runtime_error("manifest: segment " + name + " has no input '" + n + "'");
  return inputs[i];
}

const TensorDesc& SegmentDesc::output(const std::string& n) const {
  int i = output_index(n);
  if (i < 0) throw std::runtime_error("manifest: segment " + name + " has no output '" + n + "'");
  return outputs[i];
}

int Manifest::segment_index(const std::string& name) const {
  for (size_t i = 0; i < segments.size(); ++i)
    if (segments[i].name == name) return int(i);
  return -1;
}

const SegmentDesc& Manifest::segment(const std::string& name) const {
  int i = segment_index(name);
  if (i < 0) throw std::runtime_error("manifest: no segment named " + name);
  return segments[i];
}

bool is_plain_file_name(const std::string& name) {
  if (name.empty() || name == "." || name == "..") return false;
  for (char c : name)
    if (c == '/' || c == '\\' || c == '\0') return false;
  return true;
}

namespace {

// OpenSSL's SHA-256, streamed in 4 MiB reads: TensorRT plans run to gigabytes, and with reads this
// large the time goes into the hash itself (SHA-NI or AVX2 code in libcrypto), not into syscalls.
std::string sha256_file(const std::string& path) {
  struct CloseFile {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  struct FreeDigest {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
  };
  std::unique_ptr<std::FILE, CloseFile> file(std::fopen(path.c_str(), "rb"));
  if (!file) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  std::unique_ptr<EVP_MD_CTX, FreeDigest> ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("OpenSSL: cannot start a SHA-256 digest");
  std::vector<unsigned char> buf(size_t(4) << 20);
  for (;;) {
    const size_t n = std::fread(buf.data(), 1, buf.size(), file.get());
    if (n > 0 && EVP_DigestUpdate(ctx.get(), buf.data(), n) != 1)
      throw std::runtime_error("OpenSSL: SHA-256 of " + path + " failed");
    if (n < buf.size()) {
      if (std::ferror(file.get())) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
      break;
    }
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md, &len) != 1) throw std::runtime_error("OpenSSL: SHA-256 of " + path + " failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

}  // namespace

std::string Manifest::verified_path(const std::string& what, const std::string& file, const std::string& sha) const {
  if (!is_plain_file_name(file))
    throw std::runtime_error("manifest: " + what + " names file '" + file +
                             "', which is not a plain file name inside the engines folder");
  // A plain name may still be a symbolic link: its target must lie in the folder itself, the rule
  // Python's manifest.check_files applies (the file's real path directly inside the folder's).
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path real = fs::canonical(fs::path(dir) / file, ec);
  if (ec)
    throw std::runtime_error(what + ": file " + file + " is missing or unreadable (" + dir + "/" + file + ": " +
                             ec.message() + ")");
  const fs::path real_dir = fs::canonical(dir, ec);
  if (ec || real.parent_path() != real_dir)
    throw std::runtime_error(what + ": file " + file + " resolves to " + real.string() + ", outside the engines folder " +
                             (ec ? dir : real_dir.string()) + " (a link in the folder may point only to a file in it)");
  std::string got;
  try {
    got = sha256_file(real.string());
  } catch (const std::exception& e) {
    throw std::runtime_error(what + ": file " + file + " is missing or unreadable (" + e.what() + ")");
  }
  if (got != sha)
    throw std::runtime_error(what + ": file " + file + " does not match its sha256 in manifest.json (expected " +
                             sha + ", found " + got + "); the engines folder was modified or is damaged");
  return real.string();
}

int TimeTable::bin(float t) const {
  int k = 0;
  for (double b : bounds) k += double(t) < b ? 1 : 0;
  return k;
}

void check_time_table(const TimeTable& t, int depth, bool thresholds, const std::string& where) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(where + ": " + what); };
  const int k = t.bins();
  if (k < 1 || k > kMaxTableBins) fail("needs 1.." + std::to_string(kMaxTableBins) + " bins, got " + std::to_string(k));
  if (int(t.bounds.size()) != k - 1)
    fail("t_bounds must hold one value fewer than the bins (" + std::to_string(k - 1) + "), got " +
         std::to_string(t.bounds.size()));
  if (int(t.max_layer.size()) != k) fail("max_layers must hold one value per bin");
  for (size_t j = 0; j < t.bounds.size(); ++j) {
    if (!(t.bounds[j] > 0.0 && t.bounds[j] < 1.0)) fail("t_bounds must lie in (0, 1)");
    if (j > 0 && !(t.bounds[j] < t.bounds[j - 1])) fail("t_bounds must strictly decrease (bin 0 is the noisiest)");
  }
  for (int i = 0; i < k; ++i) {
    if (t.min_layer[size_t(i)] < 1 || t.max_layer[size_t(i)] > depth || t.min_layer[size_t(i)] > t.max_layer[size_t(i)])
      fail("bin " + std::to_string(i) + ": layers must satisfy 1 <= min <= max <= " + std::to_string(depth) + ", got " +
           std::to_string(t.min_layer[size_t(i)]) + ".." + std::to_string(t.max_layer[size_t(i)]));
  }
  if (thresholds) {
    if (int(t.threshold.size()) != k) fail("thresholds must hold one value per bin");
    for (float v : t.threshold)
      if (!(v >= 0.0f && v <= 1.0f)) fail("thresholds must lie in [0, 1], got " + std::to_string(v));
  }
}

}  // namespace adadiff
