#include "models/kraken.h"

#include <cmath>
#include <cstdlib>
#include <string>

#include "kernels/error.h"
#include "parallel/collectives.h"
#include "runtime/ops.h"

namespace kraken::models {

using runtime::ParamSpec;
using runtime::Shape;
using runtime::Tensor;
namespace ops = runtime::ops;

void KrakenConfig::validate() const {
  auto need = [](bool ok, const char* key, int64_t value, const char* expected) {
    if (!ok) KRAKEN_THROW("model.", key, " = ", value, ": ", expected);
  };
  need(n_layer >= 1, "n_layer", n_layer, "must be at least 1");
  need(n_embd >= 1, "n_embd", n_embd, "must be at least 1");
  need(n_head >= 1, "n_head", n_head, "must be at least 1");
  need(degree >= 1, "degree", degree, "must be at least 1");
  need(context >= 1, "context", context, "must be at least 1");
  need(vocab_size >= 1 && vocab_size <= 65536, "vocab_size", vocab_size, "must be in [1, 65536] (tokens are uint16)");
  need(mlp_expansion >= 1, "mlp_expansion", mlp_expansion, "must be at least 1");
  if (n_head % degree != 0)
    KRAKEN_THROW("model.n_head = ", n_head, " is not divisible by model.degree = ", degree,
                 ": every sub-layer needs the same number of heads");
  if (n_embd % heads_per_sublayer() != 0)
    KRAKEN_THROW("model.n_embd = ", n_embd, " is not divisible by the ", heads_per_sublayer(),
                 " heads of a sub-layer (n_head / degree)");
  if (!(dropout >= 0.0f && dropout < 1.0f)) KRAKEN_THROW("model.dropout = ", dropout, ": must be in [0, 1)");
}

int64_t KrakenConfig::parameter_count() const {
  const int64_t C = n_embd, e = mlp_expansion, k = degree, L = n_layer;
  const int64_t per_sub = (4 + 2 * e) * C * C + (bias ? (9 + e) * C : 2 * C);
  int64_t total = padded_vocab() * C + context * C + k * L * per_sub;
  if (k > 1) total += k * C * C + (bias ? C : 0);
  total += bias ? 2 * C : C;  // ln_f
  return total;
}

double KrakenConfig::training_flops_per_token(int64_t seq_len) const {
  // 2 FLOPs a multiply-add, ×3 for forward and backward; a causal query attends to (T + 1) / 2 keys on
  // average, which llm.c rounds to T / 2: forward q·kᵀ and p·v 2 · 2 · C · T/2 a sub-layer and token.
  const double k = static_cast<double>(degree), L = static_cast<double>(n_layer);
  const double C = static_cast<double>(n_embd), T = static_cast<double>(seq_len);
  return 6.0 * static_cast<double>(parameter_count()) + 6.0 * k * L * C * T;
}

double KrakenConfig::full_attention_training_flops_per_token(int64_t seq_len) const {
  const double C = static_cast<double>(n_embd), e = static_cast<double>(mlp_expansion);
  const double k = static_cast<double>(degree), L = static_cast<double>(n_layer);
  double matrix_params = k * L * (4 + 2 * e) * C * C + static_cast<double>(padded_vocab()) * C;
  if (degree > 1) matrix_params += k * C * C;
  return 6.0 * matrix_params + 12.0 * k * L * static_cast<double>(seq_len) * C;
}

KrakenModel::KrakenModel(const KrakenConfig& config, const runtime::Device& device, const ModelShard& shard)
    : config_(config), shard_(shard) {
  config_.validate();
  if (shard_.last_layer < 0) shard_.last_layer = config_.n_layer;
  KRAKEN_CHECK(0 <= shard_.first_layer && shard_.first_layer <= shard_.last_layer &&
               shard_.last_layer <= config_.n_layer);
  const int64_t C = config_.n_embd, e = config_.mlp_expansion, k = config_.degree, L = config_.n_layer;
  const int tp = shard_.tp_size, r = shard_.tp_rank;
  if (tp > 1) {
    KRAKEN_CHECK(shard_.tp != nullptr && shard_.tp->size() == tp, "tp_size ", tp, " without a matching group");
    if (k > 1 && k % tp != 0) KRAKEN_THROW("tensor parallelism tp = ", tp, " must divide model.degree = ", k);
    if (k == 1 && config_.n_head % tp != 0) KRAKEN_THROW("tensor parallelism tp = ", tp, " must divide model.n_head = ", config_.n_head);
    if (k == 1 && (e * C) % tp != 0) KRAKEN_THROW("tensor parallelism tp = ", tp, " must divide the MLP width ", e * C);
  }
  local_streams_ = k > 1 ? k / tp : 1;
  first_stream_ = k > 1 ? r * local_streams_ : 0;

  // GPT-2 initialisation: N(0, 0.02) everywhere, the residual projections scaled by 1/√(2·L·k)
  // (kraken.md: model.py:245-250; the extra k is Kraken's). Biases 0, LayerNorm γ = 1, β = 0.
  const float proj_std = 0.02f / std::sqrt(2.0f * static_cast<float>(L * k));
  using Init = ParamSpec::Init;
  auto spec = [&](Init init, float std, bool decay) {
    ParamSpec p;
    p.init = init;
    p.init_std = std;
    p.weight_decay = decay;
    p.replicated = tp > 1;  // by default a tensor every tp rank holds whole; the split ones say otherwise
    return p;
  };
  auto split = [&](ParamSpec p, int dim, int blocks) {  // Megatron-LM: this rank's columns/rows
    p.shard = runtime::ShardSpec{dim, tp, r, blocks};
    p.replicated = false;
    return p;
  };
  const ParamSpec matrix = spec(Init::Normal, 0.02f, true), proj = spec(Init::Normal, proj_std, true);
  const ParamSpec embedding = spec(Init::Normal, 0.02f, false), zero_bias = spec(Init::Zeros, 0.0f, false);
  const ParamSpec ln_gain = spec(Init::Ones, 0.0f, false);
  const bool bias = config_.bias;
  const bool mt = megatron();

  if (shard_.has_embedding) {
    wte_ = register_parameter("wte.weight", {config_.padded_vocab(), C}, embedding, device);
    wpe_ = register_parameter("wpe.weight", {config_.context, C}, embedding, device);
  }
  for (int64_t l = shard_.first_layer; l < shard_.last_layer; ++l) {
    std::vector<SubLayer> subs;
    for (int64_t i = first_stream_; i < first_stream_ + local_streams_; ++i) {
      // Degree 1 uses GPT-2's names (h.{l}.…); degree k adds the sub-layer index (h.{l}.{i}.…).
      const std::string p = "h." + std::to_string(l) + "." + (k > 1 ? std::to_string(i) + "." : "");
      // Under Kraken's tensor parallelism a sub-layer lives whole on one rank: not replicated.
      ParamSpec own_matrix = matrix, own_proj = proj, own_bias = zero_bias, own_gain = ln_gain;
      if (k > 1) own_matrix.replicated = own_proj.replicated = own_bias.replicated = own_gain.replicated = false;
      const int64_t cols = mt ? C / tp : C, hidden = mt ? e * C / tp : e * C;
      SubLayer s;
      s.ln_1_w = register_parameter(p + "ln_1.weight", {C}, own_gain, device);
      if (bias) s.ln_1_b = register_parameter(p + "ln_1.bias", {C}, own_bias, device);
      s.c_attn_w = register_parameter(p + "attn.c_attn.weight", {3 * cols, C}, mt ? split(own_matrix, 0, 3) : own_matrix, device);
      if (bias) s.c_attn_b = register_parameter(p + "attn.c_attn.bias", {3 * cols}, mt ? split(own_bias, 0, 3) : own_bias, device);
      s.attn_proj_w = register_parameter(p + "attn.c_proj.weight", {C, cols}, mt ? split(own_proj, 1, 1) : own_proj, device);
      if (bias) s.attn_proj_b = register_parameter(p + "attn.c_proj.bias", {C}, own_bias, device);
      s.ln_2_w = register_parameter(p + "ln_2.weight", {C}, own_gain, device);
      if (bias) s.ln_2_b = register_parameter(p + "ln_2.bias", {C}, own_bias, device);
      s.c_fc_w = register_parameter(p + "mlp.c_fc.weight", {hidden, C}, mt ? split(own_matrix, 0, 1) : own_matrix, device);
      if (bias) s.c_fc_b = register_parameter(p + "mlp.c_fc.bias", {hidden}, mt ? split(own_bias, 0, 1) : own_bias, device);
      s.mlp_proj_w = register_parameter(p + "mlp.c_proj.weight", {C, hidden}, mt ? split(own_proj, 1, 1) : own_proj, device);
      if (bias) s.mlp_proj_b = register_parameter(p + "mlp.c_proj.bias", {C}, own_bias, device);
      subs.push_back(s);
    }
    layers_.push_back(std::move(subs));
  }
  if (shard_.has_head) {
    if (!shard_.has_embedding) {
      // The LM head is tied to wte, which the first stage owns: this stage keeps a copy whose gradient
      // is summed with the owner's (parallel::sync_tied_gradients).
      ParamSpec tied = embedding;
      tied.tied_copy = true;
      wte_ = register_parameter("wte.weight", {config_.padded_vocab(), C}, tied, device);
    }
    if (k > 1) {
      // Row-parallel under tp: this rank multiplies its own streams by its columns of W_conj.
      ParamSpec conj = matrix;
      if (tp > 1) conj = split(conj, 1, 1);
      conj_w_ = register_parameter("conjunction.weight", {C, local_streams_ * C}, conj, device);
      if (bias) conj_b_ = register_parameter("conjunction.bias", {C}, zero_bias, device);
    }
    ln_f_w_ = register_parameter("ln_f.weight", {C}, ln_gain, device);
    if (bias) ln_f_b_ = register_parameter("ln_f.bias", {C}, zero_bias, device);
  }
}

void KrakenModel::set_compute_dtype(runtime::DType dtype) {
  if (dtype != runtime::DType::F32 && dtype != runtime::DType::BF16)
    KRAKEN_THROW("KrakenModel: compute dtype must be f32 or bf16, not ", runtime::dtype_name(dtype));
  compute_dtype_ = dtype;
  layer_stacks_.clear();  // (buffers of another dtype: compute_copy_targets makes new ones)
  param_buffers_.clear();
  copies_current_ = false;
}

Tensor KrakenModel::compute(const Tensor& param) {
  if (!param.defined() || compute_dtype_ == runtime::DType::F32) return param;
  const auto copy = compute_copies_.find(param.impl());
  if (copy != compute_copies_.end()) return copy->second;
  return ops::cast(param, compute_dtype_);
}

std::vector<Tensor> KrakenModel::product_params(const std::vector<SubLayer>& subs) const {
  std::vector<Tensor> params;
  for (const SubLayer& s : subs)
    for (const Tensor* p : {&s.c_attn_w, &s.c_attn_b, &s.attn_proj_w, &s.attn_proj_b, &s.c_fc_w, &s.c_fc_b,
                            &s.mlp_proj_w, &s.mlp_proj_b})
      if (p->defined()) params.push_back(*p);
  return params;
}

std::vector<Tensor> KrakenModel::head_product_params() const {
  std::vector<Tensor> params;
  for (const Tensor* p : {&conj_w_, &conj_b_, &wte_})
    if (p->defined()) params.push_back(*p);
  return params;
}

void KrakenModel::cast_for_compute(const std::vector<Tensor>& params) {
  // Into the persistent buffers where compute_copy_targets made them (nothing to cast while they are
  // current), else new tensors.
  std::vector<Tensor> into;
  for (const Tensor& p : params) {
    const auto buffer = param_buffers_.find(p.impl());
    into.push_back(buffer != param_buffers_.end() ? buffer->second : Tensor());
  }
  const std::vector<Tensor> copies = ops::cast_many(params, compute_dtype_, into, copies_current_);
  for (size_t k = 0; k < params.size(); ++k) compute_copies_[params[k].impl()] = copies[k];
}

std::vector<std::vector<Tensor>> KrakenModel::stack_lists(const std::vector<SubLayer>& subs) {
  std::vector<std::vector<Tensor>> lists;
  for (Tensor SubLayer::*member : {&SubLayer::c_attn_w, &SubLayer::c_attn_b, &SubLayer::attn_proj_w,
                                   &SubLayer::attn_proj_b, &SubLayer::c_fc_w, &SubLayer::c_fc_b,
                                   &SubLayer::mlp_proj_w, &SubLayer::mlp_proj_b}) {
    lists.emplace_back();
    for (const SubLayer& s : subs) lists.back().push_back(s.*member);
  }
  return lists;
}

std::vector<std::pair<Tensor, Tensor>> KrakenModel::compute_copy_targets() {
  std::vector<std::pair<Tensor, Tensor>> targets;
  if (compute_dtype_ == runtime::DType::F32) return targets;
  copies_current_ = false;  // new buffers hold nothing yet; the next forward fills them
  auto buffer_of = [&](const Tensor& p) {
    Tensor& b = param_buffers_[p.impl()];
    if (!b.defined()) b = Tensor::empty(p.shape(), compute_dtype_, p.device());
    targets.emplace_back(p, b);
  };
  if (!megatron()) layer_stacks_.resize(layers_.size());
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    if (megatron()) {
      for (const Tensor& p : product_params(layers_[layer])) buffer_of(p);
      continue;
    }
    const std::vector<std::vector<Tensor>> lists = stack_lists(layers_[layer]);
    std::vector<Tensor>& stacks = layer_stacks_[layer];
    stacks.resize(lists.size());
    for (size_t k = 0; k < lists.size(); ++k) {
      const std::vector<Tensor>& list = lists[k];
      if (!list[0].defined()) continue;  // an absent bias
      Shape shape = list[0].shape();
      shape.insert(shape.begin(), static_cast<int64_t>(list.size()));
      if (!stacks[k].defined()) stacks[k] = Tensor::empty(shape, compute_dtype_, list[0].device());
      for (size_t i = 0; i < list.size(); ++i)
        targets.emplace_back(list[i], stacks[k].slice(static_cast<int64_t>(i), static_cast<int64_t>(i) + 1)
                                          .reshape(list[i].shape()));
    }
  }
  if (shard_.has_head)
    for (const Tensor& p : head_product_params()) buffer_of(p);
  return targets;
}

namespace {
thread_local int projection_biases_override = -1;  // a ProjectionBiasesScope's setting, or -1
}  // namespace

// KRAKEN_PROJECTION_BIASES is read once. Under `norms` (in bf16) b + bias is rounded once more than in the
// product's epilogue; the switch is there to measure one placement against the other.
bool projection_biases_in_norms() {
  if (projection_biases_override >= 0) return projection_biases_override == 1;
  static const bool in_norms = [] {
    const char* v = std::getenv("KRAKEN_PROJECTION_BIASES");
    if (v == nullptr || *v == '\0' || std::string(v) == "norms") return true;
    if (std::string(v) == "products") return false;
    KRAKEN_THROW("KRAKEN_PROJECTION_BIASES=", v,
                 ": expected norms (GPT-2's projection biases added in the LayerNorm after the residual add; the "
                 "default) or products (in the products' epilogues)");
  }();
  return in_norms;
}

ProjectionBiasesScope::ProjectionBiasesScope(bool in_norms) : previous_(projection_biases_override) {
  projection_biases_override = in_norms ? 1 : 0;
}
ProjectionBiasesScope::~ProjectionBiasesScope() { projection_biases_override = previous_; }

Tensor KrakenModel::dropout(const Tensor& x, runtime::Generator* gen, bool training) {
  if (config_.dropout == 0.0f || !training) return x;
  KRAKEN_CHECK(gen != nullptr, "dropout > 0 needs a generator");
  return ops::dropout(x, config_.dropout, *gen, training);
}

namespace {

// The tensors (each of one shape) as one (n, ...) tensor, their gradients back to each: a view for one,
// else one copy. Undefined tensors (absent biases) stack to undefined.
Tensor stack(const std::vector<Tensor>& ts) {
  if (!ts[0].defined()) return Tensor();
  Shape one = ts[0].shape();
  one.insert(one.begin(), 1);
  std::vector<Tensor> rows;
  for (const Tensor& t : ts) rows.push_back(ops::reshape(t, one));
  return rows.size() == 1 ? rows[0] : ops::concat(rows, 0);
}

// Stacked streams (n, B, T, C) ↔ side by side (B, T, n·C), the layout of the conjunction's input and of
// a pipeline stage's boundary activation.
Tensor side_by_side(const Tensor& X) {
  const int64_t n = X.size(0);
  const Shape stream(X.shape().begin() + 1, X.shape().end());
  if (n == 1) return ops::reshape(X, stream);
  std::vector<Tensor> streams = ops::split(X, std::vector<int64_t>(static_cast<size_t>(n), 1), 0);
  for (Tensor& x : streams) x = ops::reshape(x, stream);
  return ops::concat(streams, -1);
}
Tensor stacked(const Tensor& input, int64_t n) {
  if (n == 1) return stack({input});
  const int64_t C = input.size(-1) / n;
  return stack(ops::split(input, std::vector<int64_t>(static_cast<size_t>(n), C), -1));
}

// c_attn's bias columns whose gradient is zero, the keys' (qkv is q, k and v side by side, `width` each):
// softmax ignores the shift q·b_k a key bias adds to every score of a query, so the linear sums none of
// that third of its output gradient (ops::BiasColumns).
ops::BiasColumns keys_bias_columns(const Tensor& c_attn_bias, int64_t width) {
  return c_attn_bias.defined() ? ops::BiasColumns{width, width} : ops::BiasColumns{};
}

}  // namespace

// a_i = x_i + Attn_i(LN1_i(x_i)); m_i = a_i − x_i + S (= a_i at degree 1 and in the first layer);
// x_i ← a_i + MLP_i(LN2_i(m_i)) — for all i at once, on X (n, B, T, C).
KrakenModel::Unsummed KrakenModel::layer_forward(const std::vector<SubLayer>& subs, const std::vector<Tensor>& stacks,
                                                 const Tensor& X, const Tensor& h1, bool sum_here,
                                                 bool mlp_bias_onward, parallel::PendingReduce& pending,
                                                 runtime::Generator* gen, bool training) {
  const int64_t n = X.size(0), B = X.size(1), T = X.size(2), C = X.size(3);
  // The sub-layers' matrices and biases, each kind stacked (n, ...) in the compute dtype: one node and,
  // under mixed precision, one cast launch each way for the layer (ops::stack_many; it stands in for
  // cast_for_compute here) — into the persistent stacks where there are some, and no cast at all while
  // the optimizer keeps them current. The LayerNorms take their parameters one per sub-layer.
  auto each = [&](Tensor SubLayer::*member) {
    std::vector<Tensor> ts;
    for (const SubLayer& s : subs) ts.push_back(s.*member);
    return ts;
  };
  const std::vector<Tensor> W = ops::stack_many(stack_lists(subs), compute_dtype_, stacks, copies_current_);
  const Tensor &c_attn_w = W[0], &c_attn_b = W[1], &attn_proj_w = W[2], &attn_proj_b = W[3];
  const Tensor &c_fc_w = W[4], &c_fc_b = W[5], &mlp_proj_w = W[6], &mlp_proj_b = W[7];

  // Attn_i(LN1_i(x_i)): the n sub-layers' heads as one attention over n·B sequences (on a GPU one launch
  // that fills it, where each sub-layer's B·H/k heads alone would leave it half idle).
  // Without dropout the two projections' biases leave their products for the LayerNorm after the residual
  // add where that LayerNorm is one (ops::add_bias_layernorm), whose backward sums the bias's gradient in
  // its own pass over the residual stream's gradient, where the product's backward read it again: the
  // attention projection's at LN2 where LN2 follows a plain add (GPT-2; a Kraken layer without S, where
  // the fork is not fused with LN2), the MLP projection's at the next layer's LN1 (or GPT-2's ln_f),
  // handed on in Unsummed::m_bias. (Under dropout the bias is added before it drops, so it stays.)
  const bool biases_to_norms =
      attn_proj_b.defined() && !(training && config_.dropout > 0.0f) && projection_biases_in_norms();
  const bool ln2_after_add = !pending.valid() && !sum_here;  // (then S stays undefined)
  const bool attn_bias_to_ln2 = biases_to_norms && ln2_after_add;
  Tensor qkv = ops::linear(h1, c_attn_w, c_attn_b, keys_bias_columns(c_attn_b, C));  // (n, B, T, 3C)
  Tensor y = ops::attention(ops::reshape(qkv, {n * B, T, 3 * C}), config_.heads_per_sublayer());  // (n·B, T, C)
  Tensor attn = dropout(
      ops::linear(ops::reshape(y, {n, B, T, C}), attn_proj_w, attn_bias_to_ln2 ? Tensor() : attn_proj_b), gen,
      training);
  Tensor S;
  if (pending.valid()) S = parallel::wait_all_reduce(pending);  // in flight during the attention

  // Where a_i is both the residual stream and LN2's input, the add runs fused with LN2
  // (ops::add_layernorm). m_i = attn_i + S feeds LN2 alone: fused, its unused sum would get a zero
  // gradient to copy in backward, which costs the pass the fusion saves.
  Tensor a, h;
  if (ln2_after_add) {
    std::vector<Tensor> a_h = ops::add_bias_layernorm(X, attn, attn_bias_to_ln2 ? attn_proj_b : Tensor(),
                                                      each(&SubLayer::ln_2_w), each(&SubLayer::ln_2_b));
    a = a_h[0];
    h = a_h[1];
  } else if (sum_here) {
    // Every sub-layer here: S summed in the fork's own pass and LN2 taken as m is made, one kernel on a
    // GPU (ops::residual_fork_summed_layernorm: S never stored, m not read back); backward one kernel too,
    // LN2's gradient of m summed into S's and added to X's as it is made, never stored
    std::vector<Tensor> a_h =
        ops::residual_fork_summed_layernorm(X, attn, each(&SubLayer::ln_2_w), each(&SubLayer::ln_2_b));
    a = a_h[0];
    h = a_h[1];
  } else {
    // a = X + attn and m = attn + S, S (B, T, C) the all-reduced sum joining every sub-layer: one pass over
    // X and attn (and one back) on a GPU (ops::residual_fork)
    std::vector<Tensor> a_m = ops::residual_fork(X, attn, S);
    a = a_m[0];
    h = ops::layernorm(a_m[1], each(&SubLayer::ln_2_w), each(&SubLayer::ln_2_b));
  }
  // MLP_i(h_i): c_fc, GELU and c_proj as one op (on the GPU in bf16 the GELU runs in the products'
  // epilogues, forward and backward). The bias handed on is (n, C); GPT-2's (C,), as its last add takes it.
  if (biases_to_norms && mlp_bias_onward)
    return {a, ops::mlp(h, c_fc_w, c_fc_b, mlp_proj_w, Tensor()), n == 1 ? ops::reshape(mlp_proj_b, {C}) : mlp_proj_b};
  Tensor m = ops::mlp(h, c_fc_w, c_fc_b, mlp_proj_w, mlp_proj_b);
  return {a, dropout(m, gen, training), Tensor()};
}

// Megatron-LM (degree 1, one stream): this rank's heads and MLP columns. copy_to_tp: identity forward,
// all-reduce of dh backward; reduce_from_tp: all-reduce of the partial projections forward (on the
// critical path), identity backward. The biases after a row-parallel product are added once, after the sum.
Tensor KrakenModel::megatron_layer_forward(const SubLayer& s, const Tensor& x, runtime::Generator* gen, bool training) {
  Tensor h = ops::layernorm(x, s.ln_1_w, s.ln_1_b);
  const Tensor c_attn_b = compute(s.c_attn_b);
  Tensor qkv = ops::linear(parallel::copy_to_tp(h, *shard_.tp), compute(s.c_attn_w), c_attn_b,
                           keys_bias_columns(c_attn_b, config_.n_embd / shard_.tp_size));  // (B, T, 3C/tp)
  Tensor y = ops::attention(qkv, config_.n_head / shard_.tp_size);                                           // (B, T, C/tp)
  Tensor o = parallel::reduce_from_tp(ops::linear(y, compute(s.attn_proj_w)), *shard_.tp);
  std::vector<Tensor> a_h;
  if (s.attn_proj_b.defined() && !(training && config_.dropout > 0.0f) && projection_biases_in_norms()) {
    // the bias added, and its gradient summed, in LN2's pass (as layer_forward's)
    a_h = ops::add_bias_layernorm(x, o, compute(s.attn_proj_b), s.ln_2_w, s.ln_2_b);
  } else {
    if (s.attn_proj_b.defined()) o = ops::add(o, compute(s.attn_proj_b));
    a_h = ops::add_layernorm(x, dropout(o, gen, training), s.ln_2_w, s.ln_2_b);
  }
  // This rank's eC/tp hidden columns: c_fc column-parallel and c_proj row-parallel, so the block between
  // copy_to_tp and reduce_from_tp is this rank's whole MLP.
  Tensor partial = ops::mlp(parallel::copy_to_tp(a_h[1], *shard_.tp), compute(s.c_fc_w), compute(s.c_fc_b),
                            compute(s.mlp_proj_w), Tensor());  // (B, T, C), this rank's share of the sum
  Tensor m = parallel::reduce_from_tp(partial, *shard_.tp);
  if (s.mlp_proj_b.defined()) m = ops::add(m, compute(s.mlp_proj_b));
  return ops::add(a_h[0], dropout(m, gen, training));
}

Tensor KrakenModel::forward(const Tensor& ids, runtime::Generator* gen, bool training) {
  KRAKEN_CHECK(shard_.has_embedding && shard_.has_head, "forward() needs the whole depth; pipeline stages use stage_forward()");
  return stage_forward(ids, Tensor(), gen, training);
}

Tensor KrakenModel::stage_forward(const Tensor& ids, const Tensor& input, runtime::Generator* gen, bool training) {
  const int64_t n = local_streams_;
  const bool kraken_tp = config_.degree > 1 && shard_.tp_size > 1;
  struct DropCopies {  // however the forward ends, its bf16 copies go (the tape keeps what backward needs)
    std::unordered_map<const runtime::TensorImpl*, Tensor>& copies;
    ~DropCopies() { copies.clear(); }
  } drop_copies{compute_copies_};
  Tensor X;  // the streams stacked, (n, B, T, C)
  if (shard_.has_embedding) {
    runtime::check_dtype("KrakenModel::forward", ids, runtime::DType::I32, "ids");
    runtime::check_dim("KrakenModel::forward", ids, 2, "ids");
    const int64_t T = ids.size(1);
    if (T > config_.context)
      KRAKEN_THROW("sequence length ", T, " exceeds the model's context of ", config_.context, " positions");
    // x0 = wte[idx] + wpe[pos]  (B, T, C), looked up and added in f32, then in the compute dtype (one
    // kernel on a GPU in bf16)
    Tensor x0 = ops::token_position_embedding(wte_, wpe_, ids, compute_dtype_);
    x0 = dropout(x0, gen, training);
    // Under Kraken's tp every rank's streams start from x0, so dL/dx0 sums over all ranks' streams.
    if (kraken_tp) x0 = parallel::copy_to_tp(x0, *shard_.tp);
    X = stack(std::vector<Tensor>(static_cast<size_t>(n), x0));
  } else {
    runtime::check_dim("KrakenModel::stage_forward", input, 3, "boundary activation");
    runtime::check_dtype("KrakenModel::stage_forward", input, compute_dtype_, "boundary activation");
    if (input.size(-1) != n * config_.n_embd)
      KRAKEN_THROW("stage input ", runtime::shape_str(input.shape()), ": expected ", n, " streams of ", config_.n_embd, " channels");
    X = stacked(input, n);
  }

  // Mixed precision: each layer's weights and biases are cast to bf16 together as the layer starts (stacked
  // for the grouped products by ops::stack_many in layer_forward; ops::cast_many under Megatron's tp), and
  // the head's before the head (ops::cast_many: on a GPU one launch each way, where one cast per use took
  // ~100 launches for GPT-2 and ~200 for the Kraken presets, most of them for biases); compute() hands
  // out the copies. One node per layer rather than one for the model: backward runs a node only after
  // everything recorded later, so a model-wide cast would hold every weight's bf16 gradient to the end of
  // backward (250 MB more for GPT-2 124M, 3 GB for 1.5B) and hand all gradients to their f32 masters at
  // once, after the last layer — too late for whatever starts on them as they complete (parallel::GradSync
  // starts each bucket's all-reduce from a grad-ready hook while backward goes on). Per layer, a layer's
  // weight gradients are ready when its backward is, as with one cast per use. The casts come after the
  // embedding: backward adds the tied wte's head gradient before the embedding's, in the order one cast
  // per use gave (the same sum, the same bits).
  const bool mixed = compute_dtype_ != runtime::DType::F32;

  Unsummed unsummed;  // the previous layer's output, its two terms not yet added
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    if (megatron()) {
      if (mixed) cast_for_compute(product_params(layers_[layer]));
      const Shape stream(X.shape().begin() + 1, X.shape().end());
      X = stack({megatron_layer_forward(layers_[layer][0], ops::reshape(X, stream), gen, training)});
      continue;
    }
    // x_i = a_i + m_i (the previous layer's) and h1_i = LN1_i(x_i) in one pass (ops::add_layernorm);
    // in a stage's first layer X comes whole.
    const std::vector<SubLayer>& subs = layers_[layer];
    std::vector<Tensor> ln_1_w, ln_1_b;
    for (const SubLayer& s : subs) ln_1_w.push_back(s.ln_1_w), ln_1_b.push_back(s.ln_1_b);
    Tensor h1;
    if (unsummed.defined()) {
      std::vector<Tensor> x_h = ops::add_bias_layernorm(unsummed.a, unsummed.m, unsummed.m_bias, ln_1_w, ln_1_b);
      X = x_h[0];
      h1 = x_h[1];
    } else {
      h1 = ops::layernorm(X, ln_1_w, ln_1_b);
    }
    // S = Σ_j x_j over every sub-layer of the layer: the layer's one collective when sub-layers live on
    // different ranks. Started here, after the previous layer (and this one's LN1, fused with its last
    // add); first needed at LN2, after this layer's attention, which runs while it is in flight (kraken.md
    // "Parallel mapping"). With every sub-layer on this rank it is summed where it is used instead, in
    // the residual fork (layer_forward). Degree 1 needs no S (m = a).
    parallel::PendingReduce pending;
    const bool mixes = shard_.first_layer + static_cast<int64_t>(layer) > 0 && config_.degree > 1;
    if (mixes && kraken_tp) pending = parallel::start_all_reduce(ops::sum_stack(X), *shard_.tp);
    // The MLP projection's bias goes on to the next LayerNorm: the next layer's LN1 on this stage, or
    // GPT-2's ln_f (else its last add below); a Kraken model's last layer keeps it in its product, whose
    // streams go to the conjunction or the next stage without a LayerNorm.
    const bool mlp_bias_onward = config_.degree == 1 || layer + 1 < layers_.size();
    unsummed = layer_forward(subs, layer < layer_stacks_.size() ? layer_stacks_[layer] : std::vector<Tensor>(), X,
                             h1, mixes && !kraken_tp, mlp_bias_onward, pending, gen, training);
  }
  // GPT-2's last add (with the MLP projection's bias) runs fused with ln_f below; otherwise the streams
  // are summed here (the conjunction or the next stage comes next).
  const bool add_at_ln_f = unsummed.m_bias.defined() && shard_.has_head && config_.degree == 1;
  if (unsummed.defined() && !add_at_ln_f)
    X = ops::add(unsummed.a, unsummed.m_bias.defined() ? ops::add(unsummed.m, unsummed.m_bias) : unsummed.m);

  if (!shard_.has_head) return side_by_side(X);  // (B, T, n·C) to the next stage
  if (mixed) cast_for_compute(head_product_params());
  // z = W_conj · concat_i(x_i) (+ b); degree 1 has no conjunction. Row-parallel under tp: each rank
  // multiplies its own streams by its columns, one all-reduce sums the parts, the bias is added once.
  Tensor z;
  if (config_.degree == 1) {
    if (!add_at_ln_f) z = side_by_side(X);
  } else if (kraken_tp) {
    z = parallel::reduce_from_tp(ops::linear(side_by_side(X), compute(conj_w_)), *shard_.tp);
    if (conj_b_.defined()) z = ops::add(z, compute(conj_b_));
  } else {
    z = ops::linear(side_by_side(X), compute(conj_w_), compute(conj_b_));
  }
  Tensor h = add_at_ln_f ? side_by_side(ops::add_bias_layernorm(unsummed.a, unsummed.m, unsummed.m_bias, ln_f_w_,
                                                                  ln_f_b_)[1])
                         : ops::layernorm(z, ln_f_w_, ln_f_b_);
  return ops::matmul(h, compute(wte_), false, true);                     // (B, T, Vp), tied LM head
}

Tensor KrakenModel::loss(const Tensor& ids, const Tensor& targets, runtime::Generator* gen, bool training,
                         float expected_dloss) {
  Tensor logits = forward(ids, gen, training);
  return ops::cross_entropy(logits, targets, config_.vocab_size, -1, expected_dloss);
}

}  // namespace kraken::models
