// The autograd tape.
//
// Every differentiable op that sees an input needing a gradient records a Node: the edges to its
// inputs, the shape of each output, and a backward closure holding only what backward needs. Nodes
// are numbered in the order they are recorded, which is a topological order, so backward() collects
// the nodes reachable from the roots, walks them in reverse recording order (a loop, never recursion)
// and frees each closure as soon as it has run. Graphs of different micro-batches can be alive at
// once (pipeline schedules need that); backward() only walks the one it is given.
//
// Leaf tensors (parameters) accumulate: grad += contribution, across backward passes, until
// zero_grad(). When a leaf has received its last contribution of a pass its grad-ready hooks run, in
// the order the walk reaches them: that is where data-parallel gradient buckets start their
// all-reduce while backward continues.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "runtime/tensor.h"

namespace kraken::runtime {

// Where a gradient goes: an output of another node, or a leaf's accumulator.
struct Edge {
  std::shared_ptr<Node> node;
  int output_nr = 0;
  std::shared_ptr<TensorImpl> leaf;
  Shape shape;  // the shape the gradient must have
  DType dtype = DType::F32;
  bool valid() const { return node || leaf; }
};

struct OutputInfo {
  Shape shape;
  DType dtype = DType::F32;
  Device device;
};

class Node {
 public:
  // Receives one gradient per output (zeros where nothing flowed) and returns one per input, in the
  // order the inputs were given; an undefined tensor for inputs that need none.
  using BackwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& grad_outputs)>;

  Node(const char* name, std::vector<Edge> inputs, std::vector<OutputInfo> outputs, BackwardFn fn);
  const char* name() const { return name_; }
  uint64_t sequence() const { return sequence_; }
  const std::vector<Edge>& inputs() const { return inputs_; }
  const std::vector<OutputInfo>& outputs() const { return outputs_; }

 private:
  friend void backward(const std::vector<Tensor>&, const std::vector<Tensor>&, bool);
  const char* name_;
  uint64_t sequence_;
  std::vector<Edge> inputs_;
  std::vector<OutputInfo> outputs_;
  BackwardFn fn_;
};

// Gradient mode is per thread. NoGrad turns recording off for its scope (evaluation, optimizer steps).
bool grad_enabled();
class NoGrad {
 public:
  NoGrad();
  ~NoGrad();
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  bool previous_;
};

// True when grad mode is on and any input needs a gradient: then the op must call record().
bool needs_grad(const std::vector<Tensor>& inputs);

// Makes `outputs` the results of a new node over `inputs`. Inputs that need no gradient get no edge
// (their backward result is ignored). Save only detached tensors in `fn`: a closure that holds a
// tensor with history would keep that history alive.
void record(const char* name, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
            Node::BackwardFn fn);

// Runs the backward pass from `roots` with the given output gradients (a defined gradient for each
// root; for a one-element root an undefined gradient means 1). With keep_graph the closures survive
// for another pass.
void backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads, bool keep_graph = false);
void backward(const Tensor& root, const Tensor& grad = Tensor(), bool keep_graph = false);

// dst += src for gradients (any device, f32). Used by the engine and by ops that sum gradients.
void accumulate_into(Tensor& dst, const Tensor& src);

// For a backward closure that can add its gradient straight into a parameter's .grad() (a matrix
// product with beta = 1, a scatter-add) instead of returning a new tensor the engine then adds: the
// leaf's gradient buffer (created zeroed on first use), or an undefined tensor when `t` is not a leaf
// that requires grad. An op that used it returns an undefined gradient for that input. This saves a
// buffer the size of the parameter and a pass over it per use: for the tied 50,304 × C embedding,
// twice per step. Only valid inside backward, for the tensor the op was recorded with.
Tensor leaf_grad_accumulator(const Tensor& t);

// For a backward closure whose kernel can add the gradient an input has already collected into its own
// in the same pass (dx = so_far + ∂x: the LayerNorm backward, a broadcast add), where the engine would
// add the two afterwards in a pass of its own — and first copy the partial sum when another gradient
// shares it (an add's backward hands one tensor to both inputs): on a GPU, five passes over the tensor
// where one suffices. Hands over the sum collected so far for input `input` of the node being run (as
// numbered in record()) and forgets it, so the gradient the closure returns for that input must
// include it. Undefined when nothing has arrived yet, for a leaf or for an input without an edge, and
// when called outside a backward closure. Backward order decides which consumer sees a partial sum:
// the later-recorded consumers of a tensor have run by then.
Tensor take_gradient_so_far(size_t input);

// How many times backward has added two contributions to one non-leaf gradient since the process
// started (each a pass over the tensor, which a fold saves; tests read the difference across a pass).
uint64_t gradient_sums();

// Whether a gradient tensor can be written in place: `t` is its only handle (no other gradient, view or
// history shares its memory). True for what take_gradient_so_far handed over unless it is shared.
bool writable_in_place(const Tensor& t);

}  // namespace kraken::runtime
