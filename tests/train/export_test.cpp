// kraken-export's Hugging Face layout is loadable as GPT-2: an independent PyTorch implementation of
// GPT2LMHeadModel's forward (tests/train/fixtures/check_hf_export.py; transformers itself where it is
// installed, as on the GPU machines) reproduces Kraken's logits from the exported files. Skipped, with
// the reason, where no Python with PyTorch is installed.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "data/shard.h"
#include "runtime/autograd.h"
#include "runtime/safetensors.h"
#include "tests/support/temp_dir.h"
#include "train/inference.h"
#include "train/trainer.h"

namespace kraken::train {
namespace {

// A Python that has PyTorch: Debian's (/usr/bin/python3 with python3-torch) here, the image's python3
// (with transformers too) on the GPU machines.
std::string python_with_torch() {
  for (const char* python : {"python3", "/usr/bin/python3"})
    if (std::system((std::string(python) + " -c 'import torch' >/dev/null 2>&1").c_str()) == 0) return python;
  return "";
}

TEST(Export, HuggingFaceLayoutReproducesKrakenLogits) {
  const std::string python = python_with_torch();
  if (python.empty()) GTEST_SKIP() << "no python3 with torch here (apt-get install python3-torch)";
  testing::TempDir dir;
  std::vector<uint16_t> tokens(4000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>((i * 7) % 100);
  data::write_llmc_shard(dir / "train.bin", tokens);
  const std::string text = "[model]\nn_layer = 2\nn_embd = 32\nn_head = 4\ncontext = 16\nvocab_size = 100\n"
                           "[data]\ntrain = \"" + dir / "train.bin" + "\"\n"
                           "[train]\nbatch_size = 2\nseq_len = 16\nmax_steps = 3\nout_dir = \"" + dir / "run" + "\"\n"
                           "[optim]\nlr = 1e-2\n";
  TrainerOptions quiet;
  quiet.progress = false;
  quiet.handle_signals = false;
  Trainer(parse_config(text, "export.toml"), quiet).run();

  LoadedModel loaded = load_model(dir / "run");
  const std::vector<std::string> files = export_model(loaded, dir / "hf", /*hf_layout=*/true);
  ASSERT_EQ(files.size(), 2u);
  runtime::Tensor ids = runtime::Tensor::from_ints({3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79,
                                                    50, 28, 84, 19, 71, 69, 39, 93, 75, 10, 58, 20, 97, 49, 44, 59},
                                                   {2, 16});
  runtime::Tensor logits;
  {
    runtime::NoGrad no_grad;
    logits = loaded.model->forward(ids, nullptr, false);
  }
  // Kraken's logits cover the padded vocabulary (128); GPT-2's the real one (100).
  runtime::Tensor real = runtime::Tensor::empty({2, 16, 100});
  const std::vector<float> all = logits.to_vector();
  float* dst = real.data<float>();
  for (int64_t r = 0; r < 32; ++r)
    for (int64_t v = 0; v < 100; ++v) dst[r * 100 + v] = all[static_cast<size_t>(r * logits.size(-1) + v)];
  runtime::save_safetensors(dir / "ref.safetensors", {{"ids", ids}, {"logits", real}});

  const char* root = std::getenv("KRAKEN_SOURCE_DIR");
  const std::string script = std::string(root ? root : ".") + "/tests/train/fixtures/check_hf_export.py";
  const std::string command = python + " " + script + " " + dir / "hf" + " " + dir / "ref.safetensors";
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
}

TEST(Export, HuggingFaceLayoutNeedsDegreeOne) {
  testing::TempDir dir;
  LoadedModel loaded;
  loaded.config.model.degree = 2;
  loaded.config.model.n_head = 4;
  loaded.config.model.n_embd = 16;
  loaded.config.model.n_layer = 1;
  loaded.config.model.context = 4;
  loaded.config.model.vocab_size = 10;
  loaded.model = std::make_unique<models::KrakenModel>(loaded.config.model);
  try {
    export_model(loaded, dir / "hf", true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("degree 2"), std::string::npos) << e.what();
  }
  // The Kraken layout takes any degree and uses the authors' names (split before layer).
  const auto files = export_model(loaded, dir / "kraken", false);
  runtime::SafetensorsFile f = runtime::SafetensorsFile::open(files[0]);
  EXPECT_TRUE(f.contains("transformer.h.1.0.attn.c_attn.weight"));  // split 1, layer 0
  EXPECT_TRUE(f.contains("transformer.conjunction.weight"));
}

}  // namespace
}  // namespace kraken::train
