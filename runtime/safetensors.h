// safetensors: the file format of checkpoints, exports and evaluation inputs.
//
// Layout (as the reference implementation defines it):
//   bytes [0, 8)        N, the header length, unsigned 64-bit little-endian
//   bytes [8, 8 + N)    UTF-8 JSON object: tensor name -> {"dtype": "F32", "shape": [2, 3],
//                       "data_offsets": [begin, end]}, plus an optional "__metadata__" object of
//                       string -> string. The header may be padded with trailing spaces.
//   bytes [8 + N, EOF)  the data region: each tensor's raw little-endian bytes at [begin, end) relative
//                       to the start of the region. The ranges tile the region exactly: no overlap,
//                       no gap, nothing after the last tensor.
// We support the dtypes F32, BF16, I32 and U16 (runtime/dtype.h); any other is rejected by name.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace kraken::runtime {

// Writes `tensors` in the given order to `path`, atomically: the bytes go to `path + ".tmp"` in the
// same directory, are fsync'ed, and the file is renamed over `path`; then the directory is fsync'ed.
// A reader therefore sees either the old file or the complete new one, never a torn one, even after a
// crash. Tensors may live on any device. The output is deterministic: the header holds
// "__metadata__" first (omitted when empty, keys sorted), then the tensors in the given order, each as
// {"dtype", "shape", "data_offsets"} in that order, with no whitespace; it is padded with spaces to a
// multiple of 8 bytes so the data region is 8-byte aligned. Throws kraken::Error on a duplicate or
// reserved name, an undefined tensor, or an I/O failure (naming the path and the errno text); on any
// failure `path` is left as it was and no .tmp file remains.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// An open safetensors file whose header has been fully validated; tensors are read on demand with
// pread straight into their destination (no intermediate copy on the host).
class SafetensorsFile {
 public:
  struct Entry {
    std::string name;
    DType dtype = DType::F32;
    Shape shape;
    uint64_t begin = 0;  // byte range [begin, end) relative to the data region
    uint64_t end = 0;
    uint64_t nbytes() const { return end - begin; }
  };

  // Opens and validates everything up front: the header length, the JSON, every entry's dtype,
  // shape and byte range, that the ranges tile the data region, and the metadata. Any problem throws
  // kraken::Error naming the file and the problem.
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  // Tensor names in the order the header lists them (for files we write, also the data order).
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  const Entry& entry(const std::string& name) const;  // throws naming the tensor and the file
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t data_offset() const { return data_offset_; }  // file offset of the data region: 8 + N

  // A new tensor on `device` holding the named tensor's data.
  Tensor load(const std::string& name, Device device = Device::cpu()) const;
  // Reads the named tensor into `dst` (any device, possibly a view into a larger buffer). Its shape
  // and dtype must match the file's exactly; the error names the tensor, both and the file.
  void load_into(const std::string& name, Tensor& dst) const;

 private:
  SafetensorsFile() = default;
  void read_at(void* dst, uint64_t bytes, uint64_t file_offset, const Entry& entry) const;

  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  uint64_t data_offset_ = 0;
  std::vector<Entry> entries_;                  // header order
  std::map<std::string, size_t> index_;         // name -> position in entries_
  std::map<std::string, std::string> metadata_;
};

// Every tensor of the file, in header order, on `device`.
std::vector<std::pair<std::string, Tensor>> load_safetensors(const std::string& path,
                                                             Device device = Device::cpu());

}  // namespace kraken::runtime
