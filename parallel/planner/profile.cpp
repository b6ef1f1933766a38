// Layer times: the profile file reader and the analytic roofline used where nothing was measured.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <tuple>

#include "kernels/error.h"
#include "parallel/planner/description.h"
#include "parallel/planner/toml_reader.h"

namespace kraken::parallel::planner {
namespace {

bool parse_kind(const std::string& name, LayerKind& kind) {
  for (LayerKind k : {LayerKind::Embedding, LayerKind::KrakenLayer, LayerKind::LmHead}) {
    if (name == layer_kind_name(k)) {
      kind = k;
      return true;
    }
  }
  return false;
}

}  // namespace

Profile parse_profile(const std::string& text, const std::string& source, const ModelDesc& model) {
  const toml::table root = detail::parse_toml(text, source);
  detail::TableReader r(root, source, "");
  r.allow_only({"device", "model", "layer"});
  Profile profile;
  profile.device_type = r.string("device");

  // The shape that was measured must be the one being planned: a layer's time depends on all of these.
  const toml::table* shape = r.subtable("model");
  if (!shape) detail::fail_at(source, 1, "model", "missing; expected a [model] table with the measured shape");
  detail::TableReader s(*shape, source, "model");
  s.allow_only({"n_embd", "n_head", "degree", "mlp_expansion", "context", "seq_len", "vocab_size", "bias"});
  const ModelConfig& c = model.config;
  auto expect_int = [&](const char* key, int64_t want) {
    const int64_t got = s.integer(key);
    if (got != want)
      s.fail(key, "the profile was measured with " + std::to_string(got) + " but the model has " +
                      std::to_string(want));
  };
  expect_int("n_embd", c.n_embd);
  expect_int("n_head", c.n_head);
  expect_int("degree", c.degree);
  expect_int("mlp_expansion", c.mlp_expansion);
  expect_int("context", c.context);
  // The tokens per sequence measured (absent in older files: the whole context).
  const int64_t measured_seq = s.has("seq_len") ? s.integer("seq_len") : c.context;
  if (measured_seq != c.sequence())
    s.fail(s.has("seq_len") ? "seq_len" : "context",
           "the profile was measured with sequences of " + std::to_string(measured_seq) +
               " tokens but the model trains on " + std::to_string(c.sequence()));
  expect_int("vocab_size", model.vocab_padded);
  if (s.boolean("bias") != c.bias)
    s.fail("bias", std::string("the profile was measured with bias = ") + (c.bias ? "false" : "true") +
                       " but the model has bias = " + (c.bias ? "true" : "false"));

  const toml::node* layers = root.get("layer");
  if (!layers) detail::fail_at(source, 1, "layer", "missing; expected one or more [[layer]] measurements");
  const toml::array* arr = layers->as_array();
  if (!arr || !arr->is_array_of_tables() || arr->empty()) r.fail("layer", "expected one or more [[layer]] tables");
  for (size_t i = 0; i < arr->size(); ++i) {
    detail::TableReader e(*arr->get(i)->as_table(), source, "layer[" + std::to_string(i) + "]");
    e.allow_only({"kind", "tp", "micro_batch", "seconds"});
    ProfileEntry entry;
    const std::string kind = e.string("kind");
    if (!parse_kind(kind, entry.kind))
      e.fail("kind", "expected \"embedding\", \"kraken_layer\" or \"lm_head\", got \"" + kind + "\"");
    entry.tp = static_cast<int>(e.positive_integer("tp"));
    const bool tp_ok = c.degree > 1 ? c.degree % entry.tp == 0 : c.n_head % entry.tp == 0;
    if (!tp_ok)
      e.fail("tp", "expected a divisor of " + std::string(c.degree > 1 ? "the degree (" : "n_head (") +
                       std::to_string(c.degree > 1 ? c.degree : c.n_head) + "), got " + std::to_string(entry.tp));
    entry.micro_batch = static_cast<int>(e.positive_integer("micro_batch"));
    entry.seconds = e.positive_number("seconds");
    for (const ProfileEntry& other : profile.entries) {
      if (other.kind == entry.kind && other.tp == entry.tp && other.micro_batch == entry.micro_batch)
        detail::fail_at(source, e.line(), "layer[" + std::to_string(i) + "]",
                        "a second measurement of " + kind + " at tp = " + std::to_string(entry.tp) +
                            ", micro_batch = " + std::to_string(entry.micro_batch));
    }
    profile.entries.push_back(entry);
  }
  return profile;
}

Profile load_profile(const std::string& path, const ModelDesc& model) {
  return parse_profile(detail::read_text_file(path, "profile"), path, model);
}

std::string format_profile(const Profile& profile, const ModelDesc& model, const std::string& comment) {
  const ModelConfig& c = model.config;
  std::ostringstream out;
  std::istringstream lines(comment);
  for (std::string line; std::getline(lines, line);) out << "# " << line << "\n";
  if (!comment.empty()) out << "\n";
  out << "device = \"" << profile.device_type << "\"\n\n";
  out << "[model]\n"
      << "n_embd = " << c.n_embd << "\nn_head = " << c.n_head << "\ndegree = " << c.degree
      << "\nmlp_expansion = " << c.mlp_expansion << "\ncontext = " << c.context << "\nseq_len = " << c.sequence()
      << "\nvocab_size = " << model.vocab_padded << "\nbias = " << (c.bias ? "true" : "false") << "\n";
  out.precision(17);
  for (const ProfileEntry& e : profile.entries)
    out << "\n[[layer]]\nkind = \"" << layer_kind_name(e.kind) << "\"\ntp = " << e.tp << "\nmicro_batch = " << e.micro_batch
        << "\nseconds = " << e.seconds << "\n";
  return out.str();
}

double analytic_layer_seconds(const ModelDesc& model, const LayerDesc& layer, const DeviceType& device, int tp,
                              int micro_batch) {
  const double tokens = double(micro_batch) * model.config.sequence();
  const double flops = layer.flops_per_rank(tp) * tokens;
  const double bytes = layer.traffic_per_rank(tp) * tokens * model.activation_bytes(device) +
                       layer.params_per_rank(tp) * model.bytes_per_param;
  const double compute_s = flops / (device.peak_flops * device.compute_efficiency);
  const double memory_s = bytes / (device.memory_bandwidth * device.memory_efficiency);
  // Backward does twice the forward's matrix work (input and weight gradients) and rereads what the
  // forward saved: forward + backward ≈ 3 × forward, as in the 6N FLOPs-per-token rule.
  return 3.0 * std::max(compute_s, memory_s);
}

double layer_seconds(const ModelDesc& model, const LayerDesc& layer, const DeviceType& device,
                     const std::vector<Profile>& profiles, int tp, int micro_batch) {
  // The nearest measurement of this kind on this device: same tp first, then the nearest tp; within
  // those the nearest micro-batch. "Nearest" is in ratio (2 is as near to 4 as 8 is); on a tie the
  // larger, better-utilised size.
  const ProfileEntry* nearest = nullptr;
  std::tuple<double, double, int, int> nearest_key;  // (tp distance, micro-batch distance, −mb, −tp)
  for (const Profile& p : profiles) {
    if (p.device_type != device.name) continue;
    for (const ProfileEntry& e : p.entries) {
      if (e.kind != layer.kind) continue;
      if (e.tp == tp && e.micro_batch == micro_batch) return e.seconds;
      const auto key = std::make_tuple(std::fabs(std::log(double(e.tp) / tp)),
                                       std::fabs(std::log(double(e.micro_batch) / micro_batch)), -e.micro_batch, -e.tp);
      if (!nearest || key < nearest_key) {
        nearest = &e;
        nearest_key = key;
      }
    }
  }
  const double analytic = analytic_layer_seconds(model, layer, device, tp, micro_batch);
  if (!nearest) return analytic;
  return nearest->seconds * analytic / analytic_layer_seconds(model, layer, device, nearest->tp, nearest->micro_batch);
}

}  // namespace kraken::parallel::planner
