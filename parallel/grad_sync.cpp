#include "parallel/grad_sync.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <unordered_set>

#include "kernels/error.h"

namespace kraken::parallel {

using runtime::DType;

double GradSyncStats::hidden_fraction() const {
  if (comm_seconds <= 0.0) return 0.0;
  return std::clamp(1.0 - wait_seconds / comm_seconds, 0.0, 1.0);
}

struct GradSync::State {
  std::vector<Tensor> params;
  Communicator* dp = nullptr;
  std::vector<GradSyncBucket> buckets;
  std::vector<Tensor> buffers;          // one flat f32 buffer per bucket
  std::vector<size_t> bucket_of;        // parameter → bucket
  bool alive = true;                    // false once the GradSync is gone (hooks become no-ops)
  bool sync = true;

  // Per synchronisation round.
  std::vector<char> ready;              // parameter has received its last contribution
  std::vector<size_t> pending;          // per bucket: parameters not yet ready
  size_t next_to_start = 0;             // buckets are started in index order
  std::vector<Handle> handles;
  GradSyncStats stats;
  // Device all-reduces waited on (the compute stream ordered after them) but still running when finish()
  // returned: their time is counted once they are done (the next finish(), or stats()).
  std::vector<Handle> uncounted;

  void count_finished() {
    size_t kept = 0;
    for (Handle& h : uncounted) {
      if (h.done()) stats.comm_seconds += h.seconds();
      else uncounted[kept++] = h;
    }
    uncounted.resize(kept);
  }

  void reset_round() {
    std::fill(ready.begin(), ready.end(), 0);
    for (size_t b = 0; b < buckets.size(); ++b) pending[b] = buckets[b].params.size();
    next_to_start = 0;
    handles.assign(buckets.size(), Handle());
  }

  void start(size_t b) { handles[b] = dp->all_reduce_async(buffers[b], ReduceOp::Average); }

  // Starts every complete bucket whose predecessors have all been started.
  void start_ready_buckets() {
    while (next_to_start < buckets.size() && pending[next_to_start] == 0) start(next_to_start++);
  }

  void on_ready(size_t p) {
    if (!alive || !sync) return;
    if (ready[p])
      KRAKEN_THROW("GradSync: the gradient of ", params[p].name().empty() ? "a parameter" : params[p].name(),
                   " became ready twice before finish(); with gradient accumulation, call set_sync(false) "
                   "for every micro-batch but the last");
    ready[p] = 1;
    pending[bucket_of[p]] -= 1;
    start_ready_buckets();
  }
};

GradSync::GradSync(const std::vector<Tensor>& params, Communicator& dp, size_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  State& s = *state_;
  s.params = params;
  s.dp = &dp;
  if (bucket_bytes == 0) KRAKEN_THROW("GradSync: bucket size must be positive");
  std::unordered_set<const void*> seen;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    runtime::check_defined("GradSync", p, "parameter");
    if (!p.is_leaf() || !p.requires_grad())
      KRAKEN_THROW("GradSync: parameter ", i, " (", p.name(), ") is not a leaf that requires grad");
    runtime::check_dtype("GradSync", p, DType::F32, "parameter");
    if (p.device() != params[0].device())
      KRAKEN_THROW("GradSync: parameter ", p.name(), " on ", p.device().str(), ", parameter ", params[0].name(), " on ",
                   params[0].device().str(), "; all must share one device");
    if (!seen.insert(p.impl()).second)
      KRAKEN_THROW("GradSync: parameter ", i, " (", p.name(), ") is listed twice");
  }

  // Buckets in reverse registration order, closed once they reach bucket_bytes.
  s.bucket_of.assign(params.size(), 0);
  GradSyncBucket current;
  for (size_t k = params.size(); k-- > 0;) {
    current.params.push_back(k);
    current.numel += params[k].numel();
    if (static_cast<size_t>(current.numel) * sizeof(float) >= bucket_bytes) {
      s.buckets.push_back(std::move(current));
      current = GradSyncBucket();
    }
  }
  if (!current.params.empty()) s.buckets.push_back(std::move(current));

  // One flat buffer per bucket; each .grad() becomes a view of its slice.
  for (size_t b = 0; b < s.buckets.size(); ++b) {
    Tensor buffer = Tensor::zeros({s.buckets[b].numel}, DType::F32, params.empty() ? runtime::Device::cpu()
                                                                                   : params[0].device());
    int64_t offset = 0;
    for (size_t p : s.buckets[b].params) {
      Tensor param = params[p];
      Tensor view = Tensor::from_storage(buffer.impl()->storage, buffer.impl()->offset + offset, param.shape(), DType::F32);
      if (param.grad().defined()) view.copy_from(param.grad());
      param.set_grad(view);
      s.bucket_of[p] = b;
      offset += param.numel();
    }
    s.buffers.push_back(buffer);
  }
  s.ready.assign(params.size(), 0);
  s.pending.assign(s.buckets.size(), 0);
  s.reset_round();

  std::weak_ptr<State> weak = state_;
  for (size_t p = 0; p < params.size(); ++p) {
    Tensor param = params[p];
    param.add_grad_ready_hook([weak, p](Tensor&) {
      if (std::shared_ptr<State> state = weak.lock()) state->on_ready(p);
    });
  }
}

GradSync::~GradSync() {
  state_->alive = false;
  // Nothing may still write into the buffers once we are gone, except while unwinding after an error:
  // the peers may never come, and the operations keep the buffers alive themselves.
  if (std::uncaught_exceptions() > 0) return;
  for (Handle& h : state_->handles) {
    try {
      h.wait();
    } catch (...) {
    }
  }
}

void GradSync::set_sync(bool sync) { state_->sync = sync; }
bool GradSync::sync() const { return state_->sync; }

void GradSync::finish() {
  State& s = *state_;
  if (!s.sync) return;
  for (size_t p = 0; p < s.params.size(); ++p) {
    const Tensor grad = s.params[p].grad();
    if (!grad.defined() || !grad.shares_storage(s.buffers[s.bucket_of[p]]))
      KRAKEN_THROW("GradSync: the gradient of ", s.params[p].name().empty() ? "a parameter" : s.params[p].name(),
                   " was replaced; zero gradients in place (zero_grad) so they stay views of the bucket");
  }
  // Buckets with parameters that took no part in this pass start now, still in index order.
  while (s.next_to_start < s.buckets.size()) s.start(s.next_to_start++);
  const auto begin = std::chrono::steady_clock::now();
  for (Handle& h : s.handles) h.wait();
  s.stats.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  // A host all-reduce is done once waited on; a device one may still run (wait() orders the compute
  // stream, not the host), so its time is counted later.
  s.count_finished();
  for (Handle& h : s.handles) {
    if (h.done()) s.stats.comm_seconds += h.seconds();
    else s.uncounted.push_back(h);
  }
  int64_t bytes = 0;
  for (const GradSyncBucket& b : s.buckets) bytes += b.numel * static_cast<int64_t>(sizeof(float));
  s.stats.bytes = bytes;
  s.stats.syncs += 1;
  s.reset_round();
}

const std::vector<GradSyncBucket>& GradSync::buckets() const { return state_->buckets; }
size_t GradSync::started_buckets() const { return state_->next_to_start; }
const GradSyncStats& GradSync::stats() const {
  state_->count_finished();
  return state_->stats;
}
void GradSync::reset_stats() {
  state_->count_finished();
  state_->uncounted.clear();
  state_->stats = GradSyncStats{};
}

}  // namespace kraken::parallel
