// The runtime's buffers: one list of what a Runtime allocates for its capacity, which the
// constructor allocates and memory_needed adds up, the memory check before any allocation, and the
// hidden-state pool the exit loop draws from.
#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "runtime.hpp"

namespace adadiff {

Runtime::Runtime(Manifest manifest, std::unique_ptr<Ops> ops, std::unique_ptr<Engine> engine)
    : m_(std::move(manifest)), ops_(std::move(ops)), engine_(std::move(engine)) {
  const int cap = std::min(2 * m_.max_batch, engine_->max_batch());
  if (cap < 1) throw std::runtime_error("engine " + engine_->name() + " accepts no batch at all");
  set_sizes(m_.model, cap, m_.segments[1].outputs.size() == 3);
  require_memory(m_.model, m_.max_batch, cap_, maps_, *ops_);
  Ops* o = ops_.get();
  each_allocation([o](auto& storage, size_t bytes) {
    if constexpr (std::is_same_v<std::decay_t<decltype(storage)>, Buffer>) {
      storage = Buffer(o, bytes);
    } else {
      storage.assign(bytes / sizeof(storage[0]), {});
    }
  });
  free_.reserve(hidden_.size());
  saved_.reserve(k_);
}

Runtime::Runtime(const ModelDesc& model, int capacity, bool u_map) { set_sizes(model, capacity, u_map); }

void Runtime::set_sizes(const ModelDesc& c, int capacity, bool u_map) {
  n_layers_ = c.depth;
  k_ = c.num_in_blocks();
  img_ = c.image_elems();
  hid_ = c.hidden_elems();
  dim_ = c.embed_dim;
  seg_head_ = n_layers_ + 1;
  seg_full_ = n_layers_ + 2;
  cap_ = capacity;
  maps_ = u_map;
}

template <class F>
void Runtime::each_allocation(F&& a) {
  const size_t f = sizeof(float), i32 = sizeof(int), i64 = sizeof(int64_t), cap = size_t(cap_);
  a(x_in_, cap * img_ * f);
  a(t_in_, cap * f);
  a(y_in_, cap * i64);
  a(u_, cap * f);
  a(score_, cap * f);
  a(eps_head_, cap * img_ * f);
  a(eps_out_, cap * img_ * f);
  a(u_all_, cap * n_layers_ * f);
  a(exit_layer_, cap * i64);
  a(static_layers_, cap * i64);
  a(t_rows_, cap * f);
  a(graph_thr_, cap * size_t(n_layers_) * f);
  a(tb_bounds_, kMaxTableBins * sizeof(double));
  a(tb_min_, kMaxTableBins * sizeof(int));
  a(tb_max_, kMaxTableBins * sizeof(int));
  a(tb_thr_, kMaxTableBins * sizeof(float));
  for (auto& b : temb_) a(b, cap * dim_ * f);
  for (auto& b : active_) a(b, cap * i32);
  for (auto& b : count_) a(b, cap * i32);
  a(exit_idx_, cap * i32);
  a(exit_dest_, cap * i32);
  a(keep_idx_, cap * i32);
  a(exit_count_, i32);
  a(x_state_, cap * img_ * f);
  a(x0_prev_, cap * img_ * f);
  a(eps_cfg_, cap * img_ * f);
  // Live hidden states peak at: k saved skips + the current state + the new one + one gather target.
  hidden_.resize(size_t(k_ + 4));
  for (auto& b : hidden_) a(b, cap * hid_ * f);
  if (maps_) a(u_map_, cap * img_ * f);
}

uint64_t Runtime::memory_needed(const ModelDesc& model, int capacity, bool u_map) {
  Runtime sizes(model, capacity, u_map);
  uint64_t total = 0;
  sizes.each_allocation([&total](auto&, size_t bytes) { total += bytes; });
  return total;
}

namespace {

std::string human_bytes(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = double(b);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char out[32];
  std::snprintf(out, sizeof out, u ? "%.1f %s" : "%.0f %s", v, units[u]);
  return out;
}

}  // namespace

void require_memory(const ModelDesc& model, int max_batch, int capacity, bool u_map, const Ops& ops) {
  const uint64_t need = Runtime::memory_needed(model, capacity, u_map);
  const FreeMemory free = ops.free_memory();
  if (need <= free.bytes) return;
  // The buffers grow linearly in the rows: fixed + per_row x rows.
  const uint64_t per_row = Runtime::memory_needed(model, 2, u_map) - Runtime::memory_needed(model, 1, u_map);
  const uint64_t fixed = Runtime::memory_needed(model, 1, u_map) - per_row;
  const double rows_per_batch = double(capacity) / double(max_batch);
  const uint64_t fits = free.bytes > fixed ? uint64_t(double((free.bytes - fixed) / per_row) / rows_per_batch) : 0;
  throw std::runtime_error(
      "max_batch " + std::to_string(max_batch) + " needs " + human_bytes(need) + " of " +
      (ops.is_cuda() ? "GPU" : "host") + " memory for adadiff_rt's buffers (" + std::to_string(capacity) + " rows" +
      (capacity == 2 * max_batch ? ", twice max_batch so that guided sampling fits one call" : "") + ", " +
      human_bytes(per_row) + " a row); " + free.source + " is " + human_bytes(free.bytes) +
      ". Rebuild the engines with a smaller max_batch (python -m adadiff_export build --max-batch N; at most " +
      std::to_string(fits) + " fits now) or free memory");
}

Runtime::~Runtime() = default;

int Runtime::take() {
  if (free_.empty()) throw std::logic_error("adadiff_rt: hidden-state pool exhausted (a bug)");
  int id = free_.back();
  free_.pop_back();
  return id;
}

void Runtime::give(int id) { free_.push_back(id); }

}  // namespace adadiff
