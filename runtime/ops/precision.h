// Mixed precision in the op set: what every float op does with bf16 operands.
//
// Float ops take f32, or bf16 (the activations of mixed precision, DESIGN.md "Precision"). A bf16 op
// keeps its activations and their gradients in bf16 and computes in f32: it widens its inputs, runs
// the f32 arithmetic and rounds each output once (the contract of the bf16 CUDA kernels, kernels/
// elementwise.h). Parameters that a kernel only reads per column (LayerNorm's gamma and beta) stay f32,
// as do statistics kept for backward and scalar losses.
//
// The CPU has no bf16 kernels: there an op runs as cast(op_f32(cast(x, f32)), bf16), with the casts
// recorded on the tape, so forward rounds the output once and backward widens dout, runs the f32
// backward and rounds dx once — exactly what the CUDA kernels compute, which makes the CPU the
// reference of the GPU's bf16 path too (tests/gpu). The casts are extra passes over activations, cheap
// next to the products (bench/RESULTS.md: the CPU training shape runs as fast in bf16 as in fp32); it
// saves no memory or time on the CPU and exists to test and reproduce mixed-precision runs.
#pragma once

#include <initializer_list>

#include "kernels/error.h"
#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace kraken::runtime::ops::precision {

inline bool is_float(DType d) { return d == DType::F32 || d == DType::BF16; }

// f32 or bf16, else an error naming the op, the operand and what it is.
inline void check_float(const char* op, const Tensor& t, const char* which = "input") {
  check_defined(op, t, which);
  if (!is_float(t.dtype()))
    KRAKEN_THROW(op, ": ", which, " is ", t.describe(), "; expected f32 or bf16");
}

// Operands that must share one float dtype (undefined ones, an absent bias, are skipped).
inline DType common_float(const char* op, std::initializer_list<const Tensor*> operands) {
  const Tensor* first = nullptr;
  for (const Tensor* t : operands) {
    if (!t->defined()) continue;
    if (!is_float(t->dtype())) KRAKEN_THROW(op, ": operand ", t->describe(), " is not f32 or bf16");
    if (!first) first = t;
    else if (t->dtype() != first->dtype())
      KRAKEN_THROW(op, ": operands mix dtypes, ", first->describe(), " and ", t->describe(),
                   "; cast one first (ops::cast)");
  }
  return first ? first->dtype() : DType::F32;
}

// True when the op must take the widening path described above: bf16 on a device without bf16
// kernels (the CPU).
inline bool widen_on_cpu(const Tensor& x) { return x.dtype() == DType::BF16 && x.device().is_cpu(); }

inline Tensor widen(const Tensor& x) { return x.defined() ? cast(x, DType::F32) : x; }
inline Tensor narrow(const Tensor& x) { return cast(x, DType::BF16); }

}  // namespace kraken::runtime::ops::precision
