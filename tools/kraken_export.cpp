// kraken-export CHECKPOINT OUT_DIR — model.safetensors + config.json for other tools.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "train/inference.h"

using namespace kraken;

int main(int argc, char** argv) {
  CLI::App app{"kraken-export: write a checkpoint's model for other tools"};
  std::string path, out_dir, format = "auto";
  app.add_option("checkpoint", path, "a checkpoint directory, or a run's checkpoint folder (its newest)")->required();
  app.add_option("out_dir", out_dir, "output folder")->required();
  app.add_option("--format", format,
                 "hf: Hugging Face GPT-2 (degree 1 only; GPT2LMHeadModel.from_pretrained loads it); "
                 "kraken: the Kraken authors' names (any degree); auto: hf for degree 1, else kraken")
      ->check(CLI::IsMember({"auto", "hf", "kraken"}));
  CLI11_PARSE(app, argc, argv);
  try {
    train::LoadedModel loaded = train::load_model(path);
    const bool hf = format == "hf" || (format == "auto" && loaded.config.model.degree == 1 && loaded.config.model.bias);
    for (const std::string& f : train::export_model(loaded, out_dir, hf)) std::printf("wrote %s\n", f.c_str());
    std::printf("format: %s, step %lld\n", hf ? "Hugging Face GPT-2" : "Kraken", (long long)loaded.step);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kraken-export: error: %s\n", e.what());
    return 2;
  }
}
