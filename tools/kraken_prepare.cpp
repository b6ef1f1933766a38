// kraken-prepare: text files, directories or JSONL to llm.c token shards (train and val).
// The work is data::prepare_shards (data/prepare.h); this file parses argv and prints progress.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "data/prepare.h"
#include "kernels/error.h"

namespace {

std::string human(double x) {
  char buf[32];
  if (x >= 1e9) std::snprintf(buf, sizeof(buf), "%.2fG", x / 1e9);
  else if (x >= 1e6) std::snprintf(buf, sizeof(buf), "%.2fM", x / 1e6);
  else if (x >= 1e3) std::snprintf(buf, sizeof(buf), "%.1fk", x / 1e3);
  else std::snprintf(buf, sizeof(buf), "%.0f", x);
  return buf;
}

int run(int argc, char** argv) {
  kraken::data::PrepareOptions o;
  CLI::App app{
      "kraken-prepare: tokenise text with GPT-2's BPE into llm.c token shards.\n"
      "Each document (a text file; every *.txt under a directory; a line of a .jsonl file) is preceded by\n"
      "<|endoftext|> (id 50256), as llm.c's data scripts do. Writes <out-dir>/<name>_train_000000.bin, ...\n"
      "and <name>_val_000000.bin, ...; the validation documents are chosen by --seed."};
  app.add_option("inputs", o.inputs, "text files, directories (*.txt, recursively) or .jsonl files")->required();
  app.add_option("--vocab-dir", o.vocab_dir, "folder with GPT-2's encoder.json and vocab.bpe")->required();
  app.add_option("--out-dir", o.out_dir, "folder for the shards (created if missing)")->required();
  app.add_option("--name", o.name, "shard name prefix")->capture_default_str();
  app.add_option("--jsonl-field", o.jsonl_field, "field of each JSONL object that holds the text")->capture_default_str();
  auto* fraction = app.add_option("--val-fraction", o.val_fraction, "fraction of documents for validation")
                       ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  app.add_option("--val-docs", o.val_docs, "number of documents for validation (instead of --val-fraction)")
      ->check(CLI::NonNegativeNumber)->excludes(fraction);
  app.add_option("--seed", o.seed, "seed of the train/val split")->capture_default_str();
  app.add_option("--shard-tokens", o.shard_tokens, "tokens per shard")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--threads", o.threads, "tokeniser threads (0: all cores)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_flag("--overwrite", o.overwrite, "replace existing shards of this name in --out-dir");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints --help, or the usage error
    return code == 0 ? 0 : 2;
  }

  // On a terminal the progress line rewrites itself; in a log, one line every few seconds.
  const bool tty = isatty(STDERR_FILENO) != 0;
  double last_print = -1e9;
  auto progress = [&](const kraken::data::PrepareProgress& p) {
    const bool done = p.documents_done == p.documents_total;
    if (!tty && !done && p.seconds - last_print < 5.0) return;
    if (tty && !done && p.seconds - last_print < 0.2) return;
    last_print = p.seconds;
    const double rate = p.seconds > 0 ? p.tokens / p.seconds : 0.0;
    std::fprintf(stderr, "%sprepare: %lld/%lld documents (%.1f%%), %s tokens, %sB read, %s tokens/s%s",
                 tty ? "\r" : "", static_cast<long long>(p.documents_done), static_cast<long long>(p.documents_total),
                 p.documents_total ? 100.0 * p.documents_done / p.documents_total : 100.0, human(p.tokens).c_str(),
                 human(p.bytes_done).c_str(), human(rate).c_str(), tty ? "\033[K" : "\n");
    if (tty && done) std::fputc('\n', stderr);
    std::fflush(stderr);
  };

  const kraken::data::PrepareSummary s = kraken::data::prepare_shards(o, progress);
  const long long tokens = s.train_tokens + s.val_tokens;
  std::printf("documents  %lld (train %lld, val %lld), %s bytes of text\n", static_cast<long long>(s.documents),
              static_cast<long long>(s.train_documents), static_cast<long long>(s.val_documents),
              human(static_cast<double>(s.bytes)).c_str());
  std::printf("tokens     %lld (train %lld, val %lld)\n", tokens, static_cast<long long>(s.train_tokens),
              static_cast<long long>(s.val_tokens));
  std::printf("shards     train %zu, val %zu in %s\n", s.train_shards.size(), s.val_shards.size(), o.out_dir.c_str());
  std::printf("time       %.2f s, %s tokens/s\n", s.seconds, human(s.seconds > 0 ? tokens / s.seconds : 0.0).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const kraken::Error& e) {
    std::fprintf(stderr, "kraken-prepare: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kraken-prepare: error: %s\n", e.what());
    return 2;
  }
}
