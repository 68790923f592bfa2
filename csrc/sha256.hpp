// SHA-256 (FIPS 180-4) of a file, as lowercase hex.
// A ~100-line implementation instead of OpenSSL: no link dependency on machines (the bare GPU
// box, wheels) that lack libssl headers; speed is irrelevant for a few megabytes of engines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace adadiff {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hex_digest();  // finalizes; the object must not be updated afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// Throws std::runtime_error naming the file when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace adadiff
