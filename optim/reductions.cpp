#include "optim/reductions.h"

#include "kernels/optimizer.h"
#include "runtime/dispatch.h"

namespace kraken::optim {

using runtime::Device;
using runtime::DType;
using runtime::Tensor;

namespace {

#if KRAKEN_WITH_CUDA
// Device doubles for the CUDA reductions: `results` accumulators (zeroed) followed by the partials
// scratch. Tensors have no f64 dtype, so the buffer is an f32 tensor of twice the count; device
// allocations are 256-byte aligned, which suits doubles.
struct DeviceDoubles {
  Tensor buffer;
  double* results = nullptr;
  double* partials = nullptr;
  int64_t count = 0;

  DeviceDoubles(const Device& device, int64_t results_count) : count(results_count) {
    buffer = Tensor::zeros({2 * (results_count + kernels::kReducePartials)}, DType::F32, device);
    results = static_cast<double*>(buffer.data_ptr());
    partials = results + results_count;
  }
  std::vector<double> fetch() const {
    std::vector<double> host(static_cast<size_t>(count));
    runtime::copy_bytes(host.data(), Device::cpu(), results, buffer.device(), sizeof(double) * host.size());
    return host;
  }
};
#endif

void check_flat_pair(const char* who, const Tensor& a, const Tensor& b) {
  runtime::check_dtype(who, a, DType::F32, "first operand");
  runtime::check_dtype(who, b, DType::F32, "second operand");
  runtime::check_same_device(who, a, b);
  if (a.numel() != b.numel())
    KRAKEN_THROW(who, ": ", a.describe(), " and ", b.describe(), " have different element counts");
}

}  // namespace

double sum_squares(const std::vector<Tensor>& xs) {
  double total = 0.0;
  for (size_t k = 0; k < xs.size();) {
    const Tensor& x = xs[k];
    runtime::check_dtype("sum_squares", x, DType::F32, "tensor");
    if (x.device().is_cpu()) {
      const float* data = x.data<float>();
      const int64_t n = x.numel();
      total += kernels::sum_squares_multi_cpu(&data, &n, 1);
      ++k;
      continue;
    }
    // A run of tensors on one GPU accumulates into one device double in a few multi-tensor launches,
    // fetched once (one sync per run, not per tensor).
    size_t end = k;
    while (end < xs.size() && xs[end].device() == x.device()) ++end;
    KRAKEN_ON_DEVICE(x.device(), (void)0, {
      DeviceDoubles acc(x.device(), 1);
      std::vector<const float*> data;
      std::vector<int64_t> sizes;
      for (size_t j = k; j < end; ++j) {
        runtime::check_dtype("sum_squares", xs[j], DType::F32, "tensor");
        data.push_back(xs[j].data<float>());
        sizes.push_back(xs[j].numel());
      }
      kernels::sum_squares_many_accumulate_cuda(acc.results, acc.partials, data.data(), sizes.data(),
                                                static_cast<int64_t>(data.size()), runtime::stream_of(x));
      total += acc.fetch()[0];
    });
    k = end;
  }
  return total;
}

std::vector<double> squared_distances(const Tensor& q, const std::vector<Tensor>& rows) {
  std::vector<const float*> ptrs;
  for (const Tensor& r : rows) {
    check_flat_pair("squared_distances", q, r);
    ptrs.push_back(r.data<float>());
  }
  std::vector<double> out(rows.size(), 0.0);
  const int64_t count = static_cast<int64_t>(rows.size());
  KRAKEN_ON_DEVICE(q.device(), kernels::squared_distances_cpu(out.data(), q.data<float>(), ptrs.data(), count, q.numel()), {
    DeviceDoubles acc(q.device(), count);
    for (int64_t r = 0; r < count; ++r)
      kernels::squared_distance_accumulate_cuda(acc.results + r, acc.partials, q.data<float>(), ptrs[r], q.numel(),
                                                runtime::stream_of(q));
    out = acc.fetch();
  });
  return out;
}

double squared_distance_indexed(const Tensor& a, const Tensor& b, const Tensor& idx) {
  if (b.defined()) check_flat_pair("squared_distance_indexed", a, b);
  runtime::check_dtype("squared_distance_indexed", idx, DType::I32, "index");
  runtime::check_same_device("squared_distance_indexed", a, idx);
  const float* bp = b.defined() ? b.data<float>() : nullptr;
  double result = 0.0;
  KRAKEN_ON_DEVICE(
      a.device(),
      result = bp ? kernels::squared_distance_indexed_cpu(a.data<float>(), bp, idx.data<int32_t>(), idx.numel())
                  : kernels::sum_squares_indexed_cpu(a.data<float>(), idx.data<int32_t>(), idx.numel()),
      {
        DeviceDoubles acc(a.device(), 1);
        kernels::squared_distance_indexed_accumulate_cuda(acc.results, acc.partials, a.data<float>(), bp,
                                                          idx.data<int32_t>(), idx.numel(), runtime::stream_of(a));
        result = acc.fetch()[0];
      });
  return result;
}

void weighted_sum_rows(Tensor& out, const std::vector<Tensor>& rows, const std::vector<double>& weights) {
  KRAKEN_CHECK(rows.size() == weights.size());
  std::vector<const float*> ptrs;
  for (const Tensor& r : rows) {
    check_flat_pair("weighted_sum_rows", out, r);
    ptrs.push_back(r.data<float>());
  }
  const int64_t count = static_cast<int64_t>(rows.size());
  KRAKEN_ON_DEVICE(out.device(),
                   kernels::weighted_sum_rows_cpu(out.data<float>(), ptrs.data(), weights.data(), count, out.numel()),
                   kernels::weighted_sum_rows_cuda(out.data<float>(), ptrs.data(), weights.data(), count, out.numel(),
                                                   runtime::stream_of(out)));
}

}  // namespace kraken::optim
