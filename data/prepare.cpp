#include "data/prepare.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>

#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "data/tokenizer.h"
#include "kernels/error.h"

namespace kraken::data {

namespace fs = std::filesystem;

// ---- listing documents -----------------------------------------------------------------------------

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One pass over a JSONL file to find its non-blank lines; the JSON itself is parsed when the line is
// tokenised, on the worker threads.
void list_jsonl(const std::string& path, int32_t file, std::vector<DocumentRef>& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) KRAKEN_THROW("input ", path, ": cannot open");
  std::vector<char> buf(1 << 20);
  int64_t offset = 0, line = 1, line_start = 0;
  bool blank = true;
  auto finish_line = [&](int64_t end) {
    if (!blank) out.push_back({file, line, line_start, end - line_start});
    ++line;
    line_start = end + 1;
    blank = true;
  };
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const int64_t got = in.gcount();
    for (int64_t i = 0; i < got; ++i) {
      const char c = buf[i];
      if (c == '\n') finish_line(offset + i);
      else if (c != ' ' && c != '\t' && c != '\r') blank = false;
    }
    offset += got;
  }
  if (in.bad()) KRAKEN_THROW("input ", path, ": read failed");
  if (!blank) out.push_back({file, line, line_start, offset - line_start});
}

}  // namespace

DocumentList list_documents(const std::vector<std::string>& inputs) {
  if (inputs.empty()) KRAKEN_THROW("no inputs: give text files, directories or .jsonl files");
  DocumentList list;
  auto add_file = [&](const std::string& path) {
    const int32_t index = static_cast<int32_t>(list.files.size());
    list.files.push_back(path);
    if (ends_with(path, ".jsonl")) {
      list_jsonl(path, index, list.documents);
    } else {
      list.documents.push_back({index, 0, 0, static_cast<int64_t>(fs::file_size(path))});
    }
  };
  for (const std::string& input : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(input, ec);
    if (ec || !fs::exists(st)) KRAKEN_THROW("input ", input, ": no such file or directory");
    if (fs::is_directory(st)) {
      std::vector<std::string> found;
      for (fs::recursive_directory_iterator it(input, fs::directory_options::follow_directory_symlink, ec), end;
           !ec && it != end; it.increment(ec)) {
        if (it->is_regular_file() && it->path().extension() == ".txt") found.push_back(it->path().string());
      }
      if (ec) KRAKEN_THROW("input ", input, ": cannot list the directory: ", ec.message());
      if (found.empty()) KRAKEN_THROW("input ", input, ": the directory holds no *.txt file");
      std::sort(found.begin(), found.end());
      for (const std::string& path : found) add_file(path);
    } else if (fs::is_regular_file(st)) {
      add_file(input);
    } else {
      KRAKEN_THROW("input ", input, ": neither a regular file nor a directory");
    }
  }
  return list;
}

std::string read_document(const DocumentList& list, const DocumentRef& doc, const std::string& jsonl_field) {
  const std::string& path = list.files[doc.file];
  std::ifstream in(path, std::ios::binary);
  if (!in) KRAKEN_THROW("input ", path, ": cannot open");
  std::string bytes;
  if (doc.line == 0) {
    in.seekg(0, std::ios::end);
    bytes.resize(static_cast<size_t>(in.tellg()));
    in.seekg(0);
  } else {
    bytes.resize(static_cast<size_t>(doc.length));
    in.seekg(doc.offset);
  }
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (in.gcount() != static_cast<std::streamsize>(bytes.size()))
    KRAKEN_THROW("input ", path, ": read failed (the file changed while it was being prepared?)");
  if (doc.line == 0) return bytes;

  nlohmann::json j;
  try {
    j = nlohmann::json::parse(bytes);
  } catch (const nlohmann::json::parse_error& e) {
    KRAKEN_THROW("input ", path, ":", doc.line, ": invalid JSON: ", e.what());
  }
  if (!j.is_object()) KRAKEN_THROW("input ", path, ":", doc.line, ": expected a JSON object, got ", j.type_name());
  const auto it = j.find(jsonl_field);
  if (it == j.end()) KRAKEN_THROW("input ", path, ":", doc.line, ": no field '", jsonl_field, "' (see --jsonl-field)");
  if (!it->is_string())
    KRAKEN_THROW("input ", path, ":", doc.line, ": field '", jsonl_field, "' is ", it->type_name(), ", expected a string");
  return it->get<std::string>();
}

// ---- the split -------------------------------------------------------------------------------------

namespace {
uint64_t mix64(uint64_t x) {  // SplitMix64's finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

std::vector<bool> choose_validation(int64_t n, double val_fraction, int64_t val_docs, uint64_t seed) {
  int64_t k = val_docs;
  if (k < 0) {
    if (!(val_fraction >= 0.0 && val_fraction < 1.0))
      KRAKEN_THROW("validation fraction ", val_fraction, " is outside [0, 1)");
    k = static_cast<int64_t>(std::llround(val_fraction * static_cast<double>(n)));
    if (val_fraction > 0.0 && k == 0) k = 1;
  }
  if (k > 0 && k >= n)
    KRAKEN_THROW("a validation split of ", k, " of ", n, " documents leaves no training document",
                 " (lower --val-fraction or --val-docs, or give more documents)");
  std::vector<std::pair<uint64_t, int64_t>> keyed(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keyed[i] = {mix64(seed ^ mix64(static_cast<uint64_t>(i))), i};
  std::vector<bool> is_val(static_cast<size_t>(n), false);
  if (k == 0) return is_val;
  std::nth_element(keyed.begin(), keyed.begin() + (k - 1), keyed.end());
  for (int64_t i = 0; i < k; ++i) is_val[keyed[i].second] = true;
  return is_val;
}

// ---- writing one split -----------------------------------------------------------------------------

namespace {

// The token stream of one split, cut into shards of at most `shard_tokens`.
class SplitWriter {
 public:
  SplitWriter(std::string prefix, int64_t shard_tokens) : prefix_(std::move(prefix)), shard_tokens_(shard_tokens) {}

  void append(const uint16_t* tokens, int64_t n) {
    while (n > 0) {
      if (!current_) {
        char suffix[32];
        std::snprintf(suffix, sizeof(suffix), "%06zu.bin", shards_.size());
        current_ = std::make_unique<LlmcShardWriter>(prefix_ + suffix);
      }
      const int64_t take = std::min(n, shard_tokens_ - current_->size());
      current_->append(tokens, take);
      tokens += take;
      n -= take;
      total_ += take;
      if (current_->size() == shard_tokens_) close_current();
    }
  }
  void finish() {
    if (current_ && current_->size() > 0) close_current();
  }
  const std::vector<std::string>& shards() const { return shards_; }
  int64_t total() const { return total_; }

 private:
  void close_current() {
    current_->commit();
    shards_.push_back(current_->path());
    current_.reset();
  }
  std::string prefix_;
  int64_t shard_tokens_;
  std::unique_ptr<LlmcShardWriter> current_;
  std::vector<std::string> shards_;
  int64_t total_ = 0;
};

// Existing shards of this name would mix with the new ones under a glob: remove them or refuse.
void clear_old_shards(const std::string& out_dir, const std::string& name, bool overwrite) {
  std::vector<fs::path> old;
  for (const auto& entry : fs::directory_iterator(out_dir)) {
    const std::string file = entry.path().filename().string();
    for (const char* split : {"_train_", "_val_"}) {
      const std::string prefix = name + split;
      if (file.compare(0, prefix.size(), prefix) == 0 && (ends_with(file, ".bin") || ends_with(file, ".bin.tmp")))
        old.push_back(entry.path());
    }
  }
  std::sort(old.begin(), old.end());
  if (old.empty()) return;
  if (!overwrite)
    KRAKEN_THROW("output ", old.front().string(), " already exists (", old.size(),
                 " shard files of this name in ", out_dir, "): pass --overwrite to replace them, or another --name");
  for (const fs::path& p : old) fs::remove(p);
}

}  // namespace

// ---- the whole run ---------------------------------------------------------------------------------

PrepareSummary prepare_shards(const PrepareOptions& o, const std::function<void(const PrepareProgress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  if (o.shard_tokens < 1 || o.shard_tokens > INT32_MAX)
    KRAKEN_THROW("shard size ", o.shard_tokens, " tokens is outside [1, ", INT32_MAX, "] (the llm.c header's int32 count)");
  if (o.name.empty() || o.name.find('/') != std::string::npos)
    KRAKEN_THROW("shard name '", o.name, "' must be non-empty and contain no '/'");
  if (o.out_dir.empty()) KRAKEN_THROW("no output directory given");
  if (o.threads < 0) KRAKEN_THROW("thread count ", o.threads, " is negative");

  const Tokenizer tokenizer = Tokenizer::load(o.vocab_dir);
  if (tokenizer.vocab_size() > 65536)
    KRAKEN_THROW("vocabulary of ", tokenizer.vocab_size(), " tokens does not fit the shards' uint16 ids");
  const int32_t eot = tokenizer.eot_id();
  const DocumentList list = list_documents(o.inputs);
  const int64_t n = static_cast<int64_t>(list.documents.size());
  if (n == 0) KRAKEN_THROW("the inputs hold no document (empty JSONL files?)");
  const std::vector<bool> is_val = choose_validation(n, o.val_fraction, o.val_docs, o.seed);

  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) KRAKEN_THROW("output directory ", o.out_dir, ": cannot create: ", ec.message());
  clear_old_shards(o.out_dir, o.name, o.overwrite);
  const std::string stem = (fs::path(o.out_dir) / o.name).string();
  SplitWriter train(stem + "_train_", o.shard_tokens), val(stem + "_val_", o.shard_tokens);

  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<BpeCache> caches(static_cast<size_t>(threads));
  PrepareSummary summary;
  PrepareProgress prog;
  prog.documents_total = n;
  if (progress) progress(prog);

  // Rounds of documents: the threads tokenise one round (taking documents in turn), then this thread
  // appends the round's tokens in document order. A round is bounded by bytes so memory stays flat.
  const int64_t round_bytes = int64_t{8} << 20 << (threads > 1 ? 1 : 0);
  std::vector<std::vector<uint16_t>> tokens;
  std::vector<std::exception_ptr> errors;
  std::vector<int64_t> text_bytes;
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin, planned = 0;
    while (end < n && (end == begin || planned < round_bytes)) planned += list.documents[end++].length;
    const int64_t count = end - begin;
    tokens.assign(static_cast<size_t>(count), {});
    errors.assign(static_cast<size_t>(count), nullptr);
    text_bytes.assign(static_cast<size_t>(count), 0);
    std::atomic<int64_t> next{0};
    auto work = [&](int worker) {
      std::vector<int32_t> ids;
      for (int64_t i; (i = next.fetch_add(1)) < count;) {
        try {
          const std::string text = read_document(list, list.documents[begin + i], o.jsonl_field);
          text_bytes[i] = static_cast<int64_t>(text.size());
          ids.clear();
          ids.push_back(eot);  // before each document, as llm.c's scripts do
          tokenizer.encode(text, caches[worker], ids);
          tokens[i].assign(ids.begin(), ids.end());  // ids < 65536, checked above
        } catch (...) {
          errors[i] = std::current_exception();
        }
      }
    };
    const int used = static_cast<int>(std::min<int64_t>(threads, count));
    std::vector<std::thread> pool;
    for (int w = 1; w < used; ++w) pool.emplace_back(work, w);
    work(0);
    for (std::thread& t : pool) t.join();

    for (int64_t i = 0; i < count; ++i) {
      if (errors[i]) std::rethrow_exception(errors[i]);  // the first failing document, in order
      const std::vector<uint16_t>& t = tokens[i];
      if (is_val[begin + i]) {
        val.append(t.data(), static_cast<int64_t>(t.size()));
        ++summary.val_documents;
      } else {
        train.append(t.data(), static_cast<int64_t>(t.size()));
        ++summary.train_documents;
      }
      summary.bytes += text_bytes[i];
    }
    begin = end;
    prog.documents_done = begin;
    prog.bytes_done = summary.bytes;
    prog.tokens = train.total() + val.total();
    prog.seconds = seconds();
    if (progress) progress(prog);
  }
  train.finish();
  val.finish();

  summary.documents = n;
  summary.train_tokens = train.total();
  summary.val_tokens = val.total();
  summary.train_shards = train.shards();
  summary.val_shards = val.shards();
  summary.seconds = seconds();
  return summary;
}

}  // namespace kraken::data
