#include "runtime/autograd.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "kernels/elementwise.h"
#include "kernels/error.h"

namespace kraken::runtime {
namespace {
thread_local bool t_grad_enabled = true;
std::atomic<uint64_t> g_next_sequence{1};
}  // namespace

Node::Node(const char* name, std::vector<Edge> inputs, std::vector<OutputInfo> outputs, BackwardFn fn)
    : name_(name),
      sequence_(g_next_sequence.fetch_add(1)),
      inputs_(std::move(inputs)),
      outputs_(std::move(outputs)),
      fn_(std::move(fn)) {}

bool grad_enabled() { return t_grad_enabled; }
NoGrad::NoGrad() : previous_(t_grad_enabled) { t_grad_enabled = false; }
NoGrad::~NoGrad() { t_grad_enabled = previous_; }

bool needs_grad(const std::vector<Tensor>& inputs) {
  if (!t_grad_enabled) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

void record(const char* name, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
            Node::BackwardFn fn) {
  std::vector<Edge> edges;
  edges.reserve(inputs.size());
  for (const Tensor& in : inputs) {
    Edge e;
    if (in.defined() && in.requires_grad()) {
      if (in.grad_fn()) {
        e.node = in.grad_fn();
        e.output_nr = in.output_nr();
      } else {
        e.leaf = in.impl_ptr();
      }
      e.shape = in.shape();
      e.dtype = in.dtype();
    }
    edges.push_back(std::move(e));
  }
  std::vector<OutputInfo> infos;
  infos.reserve(outputs.size());
  for (const Tensor& out : outputs) infos.push_back({out.shape(), out.dtype(), out.device()});
  auto node = std::make_shared<Node>(name, std::move(edges), std::move(infos), std::move(fn));
  for (size_t i = 0; i < outputs.size(); ++i) {
    TensorImpl* impl = outputs[i].impl();
    KRAKEN_CHECK(impl && !impl->grad_fn, "output ", i, " of ", name, " already has history");
    impl->grad_fn = node;
    impl->output_nr = static_cast<int>(i);
  }
}

void accumulate_into(Tensor& dst, const Tensor& src) {
  check_same_shape("gradient accumulation", dst, src);
  check_same_device("gradient accumulation", dst, src);
  if (src.dtype() != dst.dtype() || (src.dtype() != DType::F32 && src.dtype() != DType::BF16))
    KRAKEN_THROW("gradient accumulation: cannot add ", src.describe(), " into ", dst.describe());
  const int64_t n = dst.numel();
  if (dst.dtype() == DType::BF16) {
    // Mixed precision's activation gradients: the sum in f32, rounded once (runtime/ops/precision.h).
    if (dst.device().is_cpu()) {
      std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
      kernels::cast_bf16_to_f32_cpu(a.data(), dst.data<uint16_t>(), n);
      kernels::cast_bf16_to_f32_cpu(b.data(), src.data<uint16_t>(), n);
      kernels::axpy_cpu(a.data(), b.data(), 1.0f, n);
      kernels::cast_f32_to_bf16_cpu(dst.data<uint16_t>(), a.data(), n);
      return;
    }
#if KRAKEN_WITH_CUDA
    kernels::add_bf16_cuda(dst.data<uint16_t>(), dst.data<uint16_t>(), src.data<uint16_t>(), n,
                           compute_stream(dst.device()));
#endif
    return;
  }
  if (dst.device().is_cpu()) {
    kernels::axpy_cpu(dst.data<float>(), src.data<float>(), 1.0f, n);
    return;
  }
#if KRAKEN_WITH_CUDA
  kernels::axpy_cuda(dst.data<float>(), src.data<float>(), 1.0f, n, compute_stream(dst.device()));
#endif
}

Tensor leaf_grad_accumulator(const Tensor& t) {
  if (!t.defined() || !t.is_leaf() || !t.requires_grad()) return Tensor();
  TensorImpl* impl = t.impl();
  if (!impl->grad) impl->grad = Tensor::zeros(impl->shape, impl->dtype, impl->storage->device()).impl_ptr();
  return Tensor(impl->grad);
}

namespace {

// The node backward() is running and its gradient buffers, for take_gradient_so_far.
struct RunningNode {
  Node* node = nullptr;
  std::unordered_map<Node*, std::vector<Tensor>>* buffers = nullptr;
};
thread_local RunningNode t_running;
std::atomic<uint64_t> g_gradient_sums{0};

// Whether t's memory is reachable through `handles` Tensor handles and nothing else: no other handle
// to its impl, no view sharing its storage, no autograd history. Such a gradient may be written in
// place or kept without a copy; any other may be seen elsewhere (an op's backward may return one
// tensor for several inputs — add returns dy twice — or a view of its output gradient).
bool owned_alone(const Tensor& t, long handles) {
  return t.impl_ptr().use_count() == handles && t.impl()->storage.use_count() == 1 && t.impl()->offset == 0 &&
         !t.requires_grad() && !t.grad_fn();
}

// Adds g into a non-leaf gradient buffer. The first contribution is kept as it is, without a copy. A
// later one is added in place into the buffer when it is its own (owned_alone), else into g when g is
// (the caller hands its handle over), else into a new sum: every way slot + g, which IEEE addition makes
// the same bits as g + slot. (A copy is a pass over the tensor: where an add's backward hands one
// gradient to two inputs, the next contribution to either is a fresh tensor to add into.)
void add_to_buffer(Tensor& slot, Tensor g) {
  if (!slot.defined()) {
    slot = std::move(g);
    return;
  }
  g_gradient_sums.fetch_add(1, std::memory_order_relaxed);
  if (slot.dtype() == g.dtype() && owned_alone(slot, 1)) {
    accumulate_into(slot, g);
    return;
  }
  if (slot.dtype() == g.dtype() && owned_alone(g, 1)) {
    accumulate_into(g, slot);
    slot = std::move(g);
    return;
  }
  Tensor sum = g.clone();
  accumulate_into(sum, slot);
  slot = sum;
}

// Adds g into a leaf's persistent .grad (owned by the leaf, so in place after the first). The first
// contribution is taken as it is when the engine's handle (`handles`) is its only one, else copied: on
// a GPU each copy is a pass over the parameter's gradient (GPT-2 124M: 0.5 GB a step).
void add_to_leaf(TensorImpl* leaf, const Tensor& g, long handles) {
  if (!leaf->grad) {
    leaf->grad = owned_alone(g, handles) ? g.impl_ptr() : g.clone().impl_ptr();
    return;
  }
  Tensor acc(leaf->grad);
  accumulate_into(acc, g);
}

void check_gradient(const Tensor& g, const Shape& shape, const char* node, size_t index) {
  if (g.shape() != shape)
    KRAKEN_THROW("backward of ", node, ": gradient for input ", index, " has shape ", shape_str(g.shape()),
                 ", expected ", shape_str(shape));
}

// A leaf that took part in the pass always ends it with a gradient (zeros if nothing flowed), so
// that gradient synchronisation sees every parameter of the graph.
void finish_leaf(const std::shared_ptr<TensorImpl>& leaf) {
  if (!leaf->grad) leaf->grad = Tensor::zeros(leaf->shape, leaf->dtype, leaf->storage->device()).impl_ptr();
  Tensor handle(leaf);
  for (auto& hook : leaf->grad_ready_hooks) hook(handle);
}

// KRAKEN_AUTOGRAD_SLOW_NODE_MS=x: every backward closure that keeps the host x ms or longer is named on
// stderr (up to 3 times per op name and process: a first call's set-up, then what repeats). A diagnostic
// for where a GPU backward waits: issuing a node's kernels takes microseconds, so a node that takes
// milliseconds waited for the device — a synchronisation, or a stream whose launch queue (~1,000 kernels)
// was full.
double slow_node_ms() {
  static const double ms = [] {
    const char* v = std::getenv("KRAKEN_AUTOGRAD_SLOW_NODE_MS");
    return v && *v ? std::atof(v) : 0.0;
  }();
  return ms;
}

void report_slow_node(const char* name, double ms) {
  static std::mutex mutex;
  static std::map<std::string, int> reported;
  std::lock_guard<std::mutex> lock(mutex);
  if (++reported[name] > 3) return;
  std::fprintf(stderr, "autograd: the backward of %s kept the host %.2f ms (KRAKEN_AUTOGRAD_SLOW_NODE_MS)\n", name,
               ms);
}

}  // namespace

Tensor take_gradient_so_far(size_t input) {
  const RunningNode& running = t_running;
  if (!running.node || input >= running.node->inputs().size()) return Tensor();
  const Edge& e = running.node->inputs()[input];
  if (!e.node) return Tensor();
  auto it = running.buffers->find(e.node.get());
  if (it == running.buffers->end() || static_cast<size_t>(e.output_nr) >= it->second.size()) return Tensor();
  Tensor so_far = std::move(it->second[static_cast<size_t>(e.output_nr)]);
  it->second[static_cast<size_t>(e.output_nr)] = Tensor();
  return so_far;
}

uint64_t gradient_sums() { return g_gradient_sums.load(std::memory_order_relaxed); }

bool writable_in_place(const Tensor& t) { return t.defined() && owned_alone(t, 1); }

void backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads, bool keep_graph) {
  KRAKEN_CHECK(roots.size() == grads.size(), "backward: ", roots.size(), " roots, ", grads.size(), " gradients");
  NoGrad no_grad;  // backward closures compute with plain ops; nothing they do is recorded

  // 1. Collect the graph and count, per leaf, the edges that will bring it a contribution.
  std::vector<Node*> order;
  std::unordered_set<Node*> seen;
  std::unordered_map<TensorImpl*, int> leaf_pending;
  std::vector<Node*> stack;
  for (const Tensor& root : roots) {
    check_defined("backward", root, "root");
    if (!root.requires_grad()) KRAKEN_THROW("backward from ", root.describe(), ", which does not require grad");
    if (Node* n = root.grad_fn().get(); n && seen.insert(n).second) stack.push_back(n);
  }
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    order.push_back(n);
    for (const Edge& e : n->inputs_) {
      if (e.node && seen.insert(e.node.get()).second) stack.push_back(e.node.get());
      if (e.leaf) leaf_pending[e.leaf.get()] += 1;
    }
  }
  std::sort(order.begin(), order.end(), [](Node* a, Node* b) { return a->sequence() > b->sequence(); });

  // 2. Seed the roots.
  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  for (size_t i = 0; i < roots.size(); ++i) {
    const Tensor& root = roots[i];
    Tensor g = grads[i];
    if (!g.defined()) {
      if (root.numel() != 1)
        KRAKEN_THROW("backward from ", root.describe(), ": a gradient is needed for a root with more than one element");
      g = Tensor::full(root.shape(), 1.0f, root.device());
    }
    if (g.shape() != root.shape())
      KRAKEN_THROW("backward: gradient ", shape_str(g.shape()), " for root of shape ", shape_str(root.shape()));
    if (root.grad_fn()) {
      auto& slots = buffers[root.grad_fn().get()];
      slots.resize(root.grad_fn()->outputs().size());
      add_to_buffer(slots[static_cast<size_t>(root.output_nr())], g);
    } else {
      add_to_leaf(root.impl(), g, 0);  // 0: never taken, the caller may hold and change it
      if (leaf_pending.find(root.impl()) == leaf_pending.end()) finish_leaf(root.impl_ptr());
    }
  }

  // 3. Walk in reverse recording order.
  for (Node* n : order) {
    std::vector<Tensor> grad_outputs;
    auto it = buffers.find(n);
    if (it != buffers.end()) grad_outputs = std::move(it->second);
    buffers.erase(n);
    grad_outputs.resize(n->outputs_.size());
    const bool any = std::any_of(grad_outputs.begin(), grad_outputs.end(), [](const Tensor& t) { return t.defined(); });

    std::vector<Tensor> grad_inputs;
    if (any) {
      for (size_t i = 0; i < grad_outputs.size(); ++i)
        if (!grad_outputs[i].defined()) {
          const OutputInfo& info = n->outputs_[i];
          grad_outputs[i] = Tensor::zeros(info.shape, info.dtype, info.device);
        }
      if (!n->fn_)
        KRAKEN_THROW("backward through ", n->name(), " a second time: its saved tensors were freed by the first "
                     "backward (pass keep_graph to run backward twice)");
      // take_gradient_so_far sees this node while its closure runs (and nothing once it has returned)
      struct Running {
        Running(Node* n, std::unordered_map<Node*, std::vector<Tensor>>* b) { t_running = {n, b}; }
        ~Running() { t_running = {}; }
      } running(n, &buffers);
      if (slow_node_ms() > 0.0) {
        const auto t0 = std::chrono::steady_clock::now();
        grad_inputs = n->fn_(grad_outputs);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (ms >= slow_node_ms()) report_slow_node(n->name(), ms);
      } else {
        grad_inputs = n->fn_(grad_outputs);
      }
      KRAKEN_CHECK(grad_inputs.size() == n->inputs_.size(), n->name(), " returned ", grad_inputs.size(),
                   " gradients for ", n->inputs_.size(), " inputs");
    }
    for (size_t i = 0; i < n->inputs_.size(); ++i) {
      const Edge& e = n->inputs_[i];
      if (!e.valid()) continue;
      const bool has = any && grad_inputs[i].defined();
      if (has) check_gradient(grad_inputs[i], e.shape, n->name(), i);
      if (e.node) {
        if (has) {
          auto& slots = buffers[e.node.get()];
          slots.resize(e.node->outputs().size());
          add_to_buffer(slots[static_cast<size_t>(e.output_nr)], std::move(grad_inputs[i]));
        }
      } else {
        if (has) add_to_leaf(e.leaf.get(), grad_inputs[i], 1);  // grad_inputs[i] is the engine's one handle
        if (--leaf_pending[e.leaf.get()] == 0) finish_leaf(e.leaf);
      }
    }
    if (!keep_graph) n->fn_ = nullptr;  // frees what the op saved for backward
  }
}

void backward(const Tensor& root, const Tensor& grad, bool keep_graph) {
  backward(std::vector<Tensor>{root}, std::vector<Tensor>{grad}, keep_graph);
}

}  // namespace kraken::runtime
