#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "kernels/error.h"

// The format stores little-endian bytes and we read and write tensor memory as it lies; a big-endian
// host would need byte swapping that nobody here can test.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace kraken::runtime {
namespace {

// Insertion-ordered, so that names() can report the header's order.
using Json = nlohmann::ordered_json;

constexpr const char* kMetadataKey = "__metadata__";
// The reference implementation refuses headers above 100 MB; a larger length is a corrupt file (a
// GPT-2 XL header is about 60 KB), and honouring it would allocate whatever the corruption says.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Tensors on a GPU travel through a host buffer of at most this size, not a full host copy.
constexpr uint64_t kStagingBytes = 16u << 20;

std::string errno_text(int err) { return std::strerror(err); }

// Every reader error starts by naming the file.
template <typename... Args>
[[noreturn]] void fail(const std::string& path, const Args&... args) {
  KRAKEN_THROW("safetensors file '", path, "': ", args...);
}

// ---- writing -------------------------------------------------------------------------------------

void write_all(int fd, const void* data, uint64_t bytes, const std::string& tmp) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(bytes, 1u << 30));
    const ssize_t n = ::write(fd, p, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      KRAKEN_THROW("writing '", tmp, "': ", errno_text(errno));
    }
    if (n == 0) KRAKEN_THROW("writing '", tmp, "': the write made no progress");
    p += n;
    bytes -= static_cast<uint64_t>(n);
  }
}

void write_tensor(int fd, const Tensor& t, const std::string& tmp) {
  const uint64_t bytes = t.nbytes();
  if (t.device().is_cpu()) {
    write_all(fd, t.data_ptr(), bytes, tmp);
    return;
  }
  std::vector<char> staging(static_cast<size_t>(std::min(bytes, kStagingBytes)));
  const char* src = static_cast<const char*>(t.data_ptr());
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t chunk = std::min<uint64_t>(bytes - done, staging.size());
    copy_bytes(staging.data(), Device::cpu(), src + done, t.device(), chunk);
    write_all(fd, staging.data(), chunk, tmp);
    done += chunk;
  }
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// The header text, padded with spaces so that 8 + its length is a multiple of 8.
std::string build_header(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;  // std::map: sorted keys
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == kMetadataKey)
      KRAKEN_THROW("save_safetensors '", path, "': '", kMetadataKey, "' is reserved and cannot name a tensor");
    if (!seen.insert(name).second)
      KRAKEN_THROW("save_safetensors '", path, "': duplicate tensor name '", name, "'");
    if (!tensor.defined()) KRAKEN_THROW("save_safetensors '", path, "': tensor '", name, "' is undefined");
    Json entry = Json::object();
    entry["dtype"] = dtype_safetensors_name(tensor.dtype());
    entry["shape"] = tensor.shape();
    entry["data_offsets"] = Json::array({offset, offset + tensor.nbytes()});
    header[name] = std::move(entry);
    offset += tensor.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    // The only way dump() fails: a name or metadata string that is not valid UTF-8.
    KRAKEN_THROW("save_safetensors '", path, "': a tensor name or metadata string is not valid UTF-8 (", e.what(), ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

// fsync on the directory makes the rename itself durable. Some file systems cannot sync a directory
// and say EINVAL; there is nothing more to do on those.
void sync_directory(const std::string& dir, const std::string& path) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) KRAKEN_THROW("save_safetensors '", path, "': cannot open directory '", dir, "' to sync it: ", errno_text(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL)
    KRAKEN_THROW("save_safetensors '", path, "': syncing directory '", dir, "': ", errno_text(err));
}

// ---- reading -------------------------------------------------------------------------------------

// Tracks the keys of every open object while nlohmann parses, because its result keeps only the last
// of two equal keys and the duplicate would otherwise pass unseen.
struct DuplicateKeyFinder {
  std::vector<std::set<std::string>> open_objects;
  std::string current_tensor;  // the last key at depth 1, for context
  std::string problem;         // the first duplicate found

  bool operator()(int depth, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start: open_objects.emplace_back(); break;
      case Json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case Json::parse_event_t::key: {
        const std::string key = parsed.get<std::string>();
        if (depth == 1) current_tensor = key;
        if (!open_objects.empty() && !open_objects.back().insert(key).second && problem.empty()) {
          problem = depth == 1 ? "the header has the key '" + key + "' twice"
                               : "entry '" + current_tensor + "' has the key '" + key + "' twice";
        }
        break;
      }
      default: break;
    }
    return true;
  }
};

// A JSON integer in [0, limit], or an explanation of why it is not one.
bool as_unsigned(const Json& v, uint64_t limit, uint64_t* out, std::string* why) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    if (*out <= limit) return true;
    *why = v.dump() + " is too large";
    return false;
  }
  if (v.is_number_integer()) {  // signed and not unsigned: negative
    *why = v.dump() + " is negative";
    return false;
  }
  if (v.is_number_float())
    *why = v.dump() + " is not an integer (or is too large for one)";
  else
    *why = v.dump() + " is a JSON " + std::string(v.type_name()) + ", expected a non-negative integer";
  return false;
}

SafetensorsFile::Entry parse_entry(const std::string& path, const std::string& name, const Json& value,
                                   uint64_t data_bytes) {
  SafetensorsFile::Entry e;
  e.name = name;
  if (!value.is_object())
    fail(path, "entry '", name, "' is a JSON ", value.type_name(), ", expected an object with dtype, shape and data_offsets");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!value.contains(key)) fail(path, "tensor '", name, "' has no \"", key, "\"");

  const Json& dtype = value["dtype"];
  if (!dtype.is_string()) fail(path, "tensor '", name, "': \"dtype\" is a JSON ", dtype.type_name(), ", expected a string");
  if (!dtype_from_safetensors_name(dtype.get<std::string>(), &e.dtype))
    fail(path, "tensor '", name, "' has dtype '", dtype.get<std::string>(),
         "', which Kraken does not support (supported: F32, BF16, I32, U16)");

  const Json& shape = value["shape"];
  if (!shape.is_array()) fail(path, "tensor '", name, "': \"shape\" is a JSON ", shape.type_name(), ", expected an array");
  // numel and its byte size must both fit in int64 (Tensor counts elements in int64_t).
  const uint64_t kLimit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t numel = 1;
  for (const Json& d : shape) {
    uint64_t dim = 0;
    std::string why;
    if (!as_unsigned(d, kLimit, &dim, &why)) fail(path, "tensor '", name, "': shape ", shape.dump(), ": dimension ", why);
    e.shape.push_back(static_cast<int64_t>(dim));
    if (dim != 0 && numel > kLimit / dim)
      fail(path, "tensor '", name, "': shape ", shape.dump(), " has more elements than fit in 64 bits");
    numel *= dim;
  }
  if (numel > kLimit / dtype_size(e.dtype))
    fail(path, "tensor '", name, "': shape ", shape.dump(), " needs more bytes than fit in 64 bits");
  const uint64_t needed = numel * dtype_size(e.dtype);

  const Json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2)
    fail(path, "tensor '", name, "': \"data_offsets\" is ", offsets.dump(), ", expected [begin, end]");
  std::string why;
  if (!as_unsigned(offsets[0], std::numeric_limits<uint64_t>::max(), &e.begin, &why) ||
      !as_unsigned(offsets[1], std::numeric_limits<uint64_t>::max(), &e.end, &why))
    fail(path, "tensor '", name, "': data_offsets ", offsets.dump(), ": ", why);
  if (e.begin > e.end) fail(path, "tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] begin after they end");
  if (e.end > data_bytes)
    fail(path, "tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] run past the end of the data region (",
         data_bytes, " bytes); is the file truncated?");
  if (e.end - e.begin != needed)
    fail(path, "tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin,
         " bytes, but ", dtype_safetensors_name(e.dtype), " ", shape_str(e.shape), " needs ", needed, " bytes (size mismatch)");
  return e;
}

}  // namespace

// ---- save ------------------------------------------------------------------------------------------

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Everything that can be checked is checked before the file system is touched.
  const std::string header = build_header(path, tensors, metadata);
  const std::string tmp = path + ".tmp";

  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) KRAKEN_THROW("save_safetensors '", path, "': cannot create '", tmp, "': ", errno_text(errno));
  try {
    unsigned char length[8];
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(n >> (8 * i));
    write_all(fd, length, 8, tmp);
    write_all(fd, header.data(), header.size(), tmp);
    for (const auto& named : tensors) write_tensor(fd, named.second, tmp);
    // Unbuffered writes, so there is nothing to fflush; fsync makes the data durable before the
    // rename can expose it.
    if (::fsync(fd) != 0) KRAKEN_THROW("syncing '", tmp, "': ", errno_text(errno));
  } catch (const Error& e) {
    ::close(fd);
    ::unlink(tmp.c_str());
    KRAKEN_THROW("save_safetensors '", path, "': ", e.what());
  } catch (...) {  // e.g. bad_alloc for the staging buffer: still leave no .tmp behind
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    KRAKEN_THROW("save_safetensors '", path, "': closing '", tmp, "': ", errno_text(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    KRAKEN_THROW("save_safetensors '", path, "': renaming '", tmp, "' over it: ", errno_text(err));
  }
  sync_directory(directory_of(path), path);
}

// ---- open and validate -------------------------------------------------------------------------------

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.path_ = path;
  file.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file.fd_ < 0) fail(path, "cannot open: ", errno_text(errno));
  struct stat st {};
  if (::fstat(file.fd_, &st) != 0) fail(path, "cannot stat: ", errno_text(errno));
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  file.file_size_ = static_cast<uint64_t>(st.st_size);

  if (file.file_size_ < 8)
    fail(path, "the file is ", file.file_size_, " bytes, shorter than the 8-byte header length; truncated or not safetensors");
  SafetensorsFile::Entry none;
  none.name = "(header)";
  unsigned char length[8];
  file.read_at(length, 8, 0, none);
  uint64_t header_bytes = 0;
  for (int i = 0; i < 8; ++i) header_bytes |= static_cast<uint64_t>(length[i]) << (8 * i);
  if (header_bytes > kMaxHeaderBytes)
    fail(path, "header length ", header_bytes, " is absurdly large (the limit is ", kMaxHeaderBytes,
         " bytes; the file has ", file.file_size_, "); corrupt or not safetensors");
  if (header_bytes > file.file_size_ - 8)
    fail(path, "header length ", header_bytes, " runs past the end of the file (", file.file_size_,
         " bytes leave at most ", file.file_size_ - 8, " for the header); truncated or corrupt");
  file.data_offset_ = 8 + header_bytes;
  const uint64_t data_bytes = file.file_size_ - file.data_offset_;

  std::string text(static_cast<size_t>(header_bytes), '\0');
  file.read_at(text.data(), header_bytes, 8, none);
  DuplicateKeyFinder duplicates;
  Json header;
  try {
    header = Json::parse(text.begin(), text.end(), std::ref(duplicates));
  } catch (const nlohmann::json::parse_error& e) {
    fail(path, "the header is not valid JSON: ", e.what());
  }
  if (!duplicates.problem.empty()) fail(path, duplicates.problem);
  if (!header.is_object()) fail(path, "the header is a JSON ", header.type_name(), ", expected an object");

  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      if (!value.is_object()) fail(path, "\"", kMetadataKey, "\" is a JSON ", value.type_name(), ", expected an object");
      for (const auto& [mkey, mvalue] : value.items()) {
        if (!mvalue.is_string())
          fail(path, "\"", kMetadataKey, "\" value for '", mkey, "' is a JSON ", mvalue.type_name(), ", expected a string");
        file.metadata_[mkey] = mvalue.get<std::string>();
      }
      continue;
    }
    file.index_[key] = file.entries_.size();
    file.entries_.push_back(parse_entry(path, key, value, data_bytes));
  }

  // The ranges must tile [0, data_bytes): sorted by position, each starts where the previous ended.
  std::vector<const Entry*> by_offset;
  for (const Entry& e : file.entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry* e : by_offset) {
    if (e->begin < covered)
      fail(path, "tensors '", previous->name, "' [", previous->begin, ", ", previous->end, ") and '", e->name, "' [",
           e->begin, ", ", e->end, ") overlap in the data region");
    if (e->begin > covered)
      fail(path, "gap in the data region: bytes [", covered, ", ", e->begin, ") before tensor '", e->name,
           "' belong to no tensor (like the reference implementation, we require the tensors to cover the data "
           "region exactly)");
    covered = e->end;
    previous = e;
  }
  if (covered != data_bytes)
    fail(path, "gap in the data region: its last ", data_bytes - covered, " bytes [", covered, ", ", data_bytes,
         ") belong to no tensor (like the reference implementation, we require the tensors to cover the data "
         "region exactly)");
  return file;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    other.fd_ = -1;
    file_size_ = other.file_size_;
    data_offset_ = other.data_offset_;
    entries_ = std::move(other.entries_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

// ---- lookups and loads ---------------------------------------------------------------------------------

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const Entry& e : entries_) out.push_back(e.name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

const SafetensorsFile::Entry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) {
    std::string some;
    for (size_t i = 0; i < entries_.size() && i < 5; ++i) some += (i ? ", '" : "'") + entries_[i].name + "'";
    if (entries_.size() > 5) some += ", ...";
    fail(path_, "no tensor named '", name, "' (the file has ", entries_.size(), " tensors", entries_.empty() ? "" : ": ",
         some, ")");
  }
  return entries_[it->second];
}

void SafetensorsFile::read_at(void* dst, uint64_t bytes, uint64_t file_offset, const Entry& entry) const {
  char* p = static_cast<char*>(dst);
  while (bytes > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(bytes, 1u << 30));
    const ssize_t n = ::pread(fd_, p, chunk, static_cast<off_t>(file_offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path_, "reading '", entry.name, "': ", errno_text(errno));
    }
    if (n == 0) fail(path_, "the file ended while reading '", entry.name, "'; did it shrink after it was opened?");
    p += n;
    file_offset += static_cast<uint64_t>(n);
    bytes -= static_cast<uint64_t>(n);
  }
}

void SafetensorsFile::load_into(const std::string& name, Tensor& dst) const {
  const Entry& e = entry(name);
  if (!dst.defined()) fail(path_, "load_into('", name, "'): the destination tensor is undefined");
  if (dst.shape() != e.shape || dst.dtype() != e.dtype)
    fail(path_, "load_into: tensor '", name, "' is ", dtype_name(e.dtype), " ", shape_str(e.shape),
         " in the file, but the destination is ", dtype_name(dst.dtype()), " ", shape_str(dst.shape()));
  const uint64_t bytes = e.nbytes();
  const uint64_t at = data_offset_ + e.begin;
  if (dst.device().is_cpu()) {
    read_at(dst.data_ptr(), bytes, at, e);  // straight into the destination: no copy on the way
    return;
  }
  std::vector<char> staging(static_cast<size_t>(std::min(bytes, kStagingBytes)));
  char* out = static_cast<char*>(dst.data_ptr());
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t chunk = std::min<uint64_t>(bytes - done, staging.size());
    read_at(staging.data(), chunk, at + done, e);
    copy_bytes(out + done, dst.device(), staging.data(), Device::cpu(), chunk);
    done += chunk;
  }
}

Tensor SafetensorsFile::load(const std::string& name, Device device) const {
  const Entry& e = entry(name);
  Tensor t = Tensor::empty(e.shape, e.dtype, device);
  load_into(name, t);
  return t;
}

std::vector<std::pair<std::string, Tensor>> load_safetensors(const std::string& path, Device device) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  std::vector<std::pair<std::string, Tensor>> out;
  for (const std::string& name : file.names()) out.emplace_back(name, file.load(name, device));
  return out;
}

}  // namespace kraken::runtime
