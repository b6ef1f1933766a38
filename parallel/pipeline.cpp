#include "parallel/pipeline.h"

#include <algorithm>
#include <deque>

#include "kernels/error.h"
#include "runtime/autograd.h"

namespace kraken::parallel {

namespace {

// Activations of micro-batch i travel with tag 2i, their gradients with 2i + 1 (wrapping: MPI keeps
// the messages of one pair and tag in order, so a reused tag cannot be confused).
int activation_tag(int mb) { return (2 * mb) % (Communicator::kMaxTag + 1); }
int gradient_tag(int mb) { return (2 * mb + 1) % (Communicator::kMaxTag + 1); }

struct InFlight {
  int micro_batch = 0;
  Tensor input;   // stages > 0: the received activation, a leaf requiring grad
  Tensor output;  // the boundary activation, or the loss on the last stage
};

class Schedule {
 public:
  Schedule(Communicator& pp, const PipelineStage& stage, int micro_batches)
      : pp_(pp), stage_(stage), m_(micro_batches), s_(pp.rank()), p_(pp.size()) {}

  PipelineResult run() {
    const int warmup = std::min(p_ - s_ - 1, m_);
    const int steady = m_ - warmup;
    // Warm-up: forwards only, filling the pipeline behind this stage.
    for (int i = 0; i < warmup; ++i) {
      Tensor input = recv_forward(i);
      Tensor output = forward(i, input);
      if (!last()) sends_.push_back(pp_.send_async(output, s_ + 1, activation_tag(i)));
    }
    // Steady state: forward micro-batch warmup + j, then backward micro-batch j.
    Tensor input = steady > 0 ? recv_forward(warmup) : Tensor();
    for (int j = 0; j < steady; ++j) {
      const int f = warmup + j;
      Tensor output = forward(f, input);
      Tensor grad = send_forward_recv_backward(output, f, j);
      Tensor dx = backward(j, grad);
      if (j == steady - 1) {
        if (!first()) sends_.push_back(pp_.send_async(dx, s_ - 1, gradient_tag(j)));
      } else {
        input = send_backward_recv_forward(dx, j, f + 1);
      }
    }
    // Cool-down: the backwards of the warm-up micro-batches.
    for (int i = steady; i < m_; ++i) {
      Tensor grad = recv_backward(i);
      Tensor dx = backward(i, grad);
      if (!first()) sends_.push_back(pp_.send_async(dx, s_ - 1, gradient_tag(i)));
    }
    KRAKEN_CHECK(alive_.empty(), alive_.size(), " micro-batches left without backward");
    for (Handle& h : sends_) h.wait();
    return std::move(result_);
  }

 private:
  bool first() const { return s_ == 0; }
  bool last() const { return s_ == p_ - 1; }

  Tensor new_activation() const {
    return Tensor::empty(stage_.activation_shape, stage_.activation_dtype, stage_.device);
  }

  Tensor recv_forward(int mb) {
    if (first()) return Tensor();
    Tensor input = new_activation();
    pp_.recv(input, s_ - 1, activation_tag(mb));
    return input.set_requires_grad(true);
  }

  Tensor recv_backward(int mb) {
    if (last()) return Tensor();
    Tensor grad = new_activation();
    pp_.recv(grad, s_ + 1, gradient_tag(mb));
    return grad;
  }

  // The output goes to the next stage while the gradient of an earlier micro-batch comes back.
  Tensor send_forward_recv_backward(const Tensor& output, int f, int b) {
    if (last()) return Tensor();
    Tensor grad = new_activation();
    pp_.send_recv_async({P2POp{P2POp::Kind::Send, output, s_ + 1, activation_tag(f)},
                         P2POp{P2POp::Kind::Recv, grad, s_ + 1, gradient_tag(b)}})
        .wait();
    return grad;
  }

  // The input gradient goes to the previous stage while the next activation comes in.
  Tensor send_backward_recv_forward(const Tensor& dx, int b, int f) {
    if (first()) return Tensor();
    Tensor input = new_activation();
    pp_.send_recv_async({P2POp{P2POp::Kind::Send, dx, s_ - 1, gradient_tag(b)},
                         P2POp{P2POp::Kind::Recv, input, s_ - 1, activation_tag(f)}})
        .wait();
    return input.set_requires_grad(true);
  }

  Tensor forward(int mb, const Tensor& input) {
    Tensor output = stage_.forward(mb, input);
    runtime::check_defined("pipeline stage forward", output, "output");
    if (last()) {
      if (output.numel() != 1)
        KRAKEN_THROW("pipeline: the last stage's forward must return the micro-batch loss (one element), got ",
                     output.describe());
      result_.losses.push_back(output.item());
    } else if (output.shape() != stage_.activation_shape || output.dtype() != stage_.activation_dtype) {
      KRAKEN_THROW("pipeline: stage ", s_, " forward returned ", output.describe(), ", the boundary carries ",
                   runtime::dtype_name(stage_.activation_dtype), " ", runtime::shape_str(stage_.activation_shape));
    }
    alive_.push_back({mb, input, output});
    return output;
  }

  // Backward of the oldest micro-batch alive; returns its input gradient (stages > 0).
  Tensor backward(int mb, const Tensor& grad) {
    KRAKEN_CHECK(!alive_.empty() && alive_.front().micro_batch == mb, "backward of micro-batch ", mb,
                 " out of order");
    InFlight item = std::move(alive_.front());
    alive_.pop_front();
    if (stage_.before_backward) stage_.before_backward(mb);
    if (last()) {
      // The step's loss is the mean over micro-batches: seed each backward with 1/M.
      runtime::backward(item.output, Tensor::full(item.output.shape(), 1.0f / static_cast<float>(m_),
                                                  item.output.device()));
    } else {
      runtime::backward(item.output, grad);
    }
    if (first()) return Tensor();
    Tensor dx = item.input.grad();
    if (!dx.defined()) dx = Tensor::zeros(stage_.activation_shape, stage_.activation_dtype, stage_.device);
    return dx;
  }

  Communicator& pp_;
  const PipelineStage& stage_;
  const int m_, s_, p_;
  std::deque<InFlight> alive_;
  std::vector<Handle> sends_;
  PipelineResult result_;
};

}  // namespace

PipelineResult run_1f1b(Communicator& pp, const PipelineStage& stage, int micro_batches) {
  if (micro_batches < 1) KRAKEN_THROW("run_1f1b: micro_batches must be at least 1, got ", micro_batches);
  if (!stage.forward) KRAKEN_THROW("run_1f1b: the stage has no forward function");
  if (pp.size() > 1 && stage.activation_shape.empty())
    KRAKEN_THROW("run_1f1b: the stage boundary's activation_shape is not set");
  return Schedule(pp, stage, micro_batches).run();
}

void sync_tied_gradients(const std::vector<Tensor>& tied, Communicator& embedding) {
  if (embedding.size() == 1) return;
  std::vector<Handle> handles;
  for (const Tensor& t : tied) {
    runtime::check_defined("sync_tied_gradients", t, "parameter");
    Tensor grad = t.grad();
    if (!grad.defined()) {
      grad = Tensor::zeros(t.shape(), runtime::DType::F32, t.device());
      Tensor(t).set_grad(grad);
    }
    // Each stage's gradient is a partial of the tied weight's: their sum is the whole gradient.
    handles.push_back(embedding.all_reduce_async(grad, ReduceOp::Sum));
  }
  for (Handle& h : handles) h.wait();
}

}  // namespace kraken::parallel
