// The 1F1B pipeline schedule (PipeDream-Flush, as Megatron-LM runs it), generic over one stage.
//
// Stage s of P, M micro-batches: W = min(P − s − 1, M) warm-up forwards, then M − W steady steps of one
// forward and one backward, then W cool-down backwards. At most P − s micro-batches' graphs are alive
// at once (the autograd engine keeps each graph separate: backward walks only the one it is given).
//
//   forward  i: input = stage > 0 ? recv activation from s−1 (a leaf requiring grad) : undefined
//               output = stage.forward(i, input); stage < P−1 ? send output to s+1
//   backward i: stage < P−1 ? backward(output, grad received from s+1) : backward(loss, 1/M)
//               stage > 0 ? send input.grad() to s−1
//
// Sends are asynchronous (waited at the end of the schedule); where a stage both sends and receives
// in one step (steady state), the pair is posted together so neighbours never wait on each other's
// receive. Messages are tagged with the micro-batch (activations even, gradients odd tags).
#pragma once

#include <functional>
#include <vector>

#include "parallel/communicator.h"

namespace kraken::parallel {

struct PipelineStage {
  // Stage 0: input is undefined (the stage reads its micro-batch itself). Last stage: returns the
  // micro-batch's loss (one element); others: the boundary activation of `activation_shape`.
  std::function<Tensor(int micro_batch, const Tensor& input)> forward;
  runtime::Shape activation_shape;  // what every stage boundary carries, (B, T, C) for a transformer
  runtime::DType activation_dtype = runtime::DType::F32;
  runtime::Device device = runtime::Device::cpu();
  // Runs before micro-batch i's backward (e.g. GradSync::set_sync(i == last)).
  std::function<void(int micro_batch)> before_backward;
};

struct PipelineResult {
  std::vector<float> losses;  // last stage: each micro-batch's loss as forward returned it; else empty
};

// Runs forward and backward of `micro_batches` micro-batches over the pp group (this rank is stage
// pp.rank()). Parameter gradients accumulate as usual (the loss is scaled by 1/micro_batches).
PipelineResult run_1f1b(Communicator& pp, const PipelineStage& stage, int micro_batches);

// Sums the gradients of tied parameters (the input embedding on the first stage and the LM head on
// the last) over the "embedding" group, so both copies take the same step. A no-op for a group of one.
void sync_tied_gradients(const std::vector<Tensor>& tied, Communicator& embedding);

}  // namespace kraken::parallel
