// Text to token shards: what kraken-prepare does, as a library so that it can be tested.
//
// Documents come from text files (one document each), directories (every *.txt below, recursively, one
// document each, in path order) and JSONL files (name ending in .jsonl; one document per non-blank
// line, the string in field `jsonl_field`). Each document is encoded with GPT-2's tokenizer and
// preceded by `<|endoftext|>` (50256), as llm.c's fineweb.py and tinyshakespeare.py do; the stream of
// one split is cut into llm.c shards of `shard_tokens` tokens (a document may straddle two shards).
//
// The validation split is chosen per document, deterministically: the K documents with the smallest
// hash of (seed, document index), K = val_docs or round(val_fraction * documents) (at least one when
// the fraction is positive). Tokenisation runs on several threads, by documents; the output depends only
// on the inputs, the options and the seed, never on the thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kraken::data {

struct PrepareOptions {
  std::vector<std::string> inputs;        // files, directories, *.jsonl
  std::string jsonl_field = "text";
  std::string vocab_dir;                  // with encoder.json and vocab.bpe
  std::string out_dir;
  std::string name = "data";              // shards are <out_dir>/<name>_{train,val}_%06d.bin
  double val_fraction = 0.0005;           // as nanoGPT's OpenWebText split; ignored when val_docs >= 0
  int64_t val_docs = -1;
  uint64_t seed = 1337;
  int64_t shard_tokens = 100'000'000;     // as FineWeb's shards
  int threads = 0;                        // 0: all hardware threads
  bool overwrite = false;                 // else existing shards of this name are an error
};

struct PrepareProgress {
  int64_t documents_done = 0;
  int64_t documents_total = 0;
  int64_t bytes_done = 0;
  int64_t tokens = 0;
  double seconds = 0;
};

struct PrepareSummary {
  int64_t documents = 0;
  int64_t train_documents = 0;
  int64_t val_documents = 0;
  int64_t bytes = 0;         // of text read
  int64_t train_tokens = 0;  // including one <|endoftext|> per document
  int64_t val_tokens = 0;
  std::vector<std::string> train_shards;
  std::vector<std::string> val_shards;
  double seconds = 0;
};

// Runs the whole preparation; `progress` (if set) is called from the calling thread now and then.
PrepareSummary prepare_shards(const PrepareOptions& options,
                              const std::function<void(const PrepareProgress&)>& progress = {});

// ---- the steps, exposed for tests ------------------------------------------------------------------

// One document: a whole file (line == 0) or one line of a JSONL file (bytes [offset, offset + length)).
struct DocumentRef {
  int32_t file = 0;  // index into DocumentList::files
  int64_t line = 0;
  int64_t offset = 0;
  int64_t length = 0;
};
struct DocumentList {
  std::vector<std::string> files;
  std::vector<DocumentRef> documents;
};
DocumentList list_documents(const std::vector<std::string>& inputs);

// The text of one document (for JSONL, the string in `field`); errors name file and line.
std::string read_document(const DocumentList& list, const DocumentRef& doc, const std::string& jsonl_field);

// is_val[i] for documents 0..n-1 (see the split rule above); errors for a count that leaves no
// training document or a fraction outside [0, 1).
std::vector<bool> choose_validation(int64_t n, double val_fraction, int64_t val_docs, uint64_t seed);

}  // namespace kraken::data
