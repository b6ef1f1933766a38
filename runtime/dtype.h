// Element types and devices: what every Tensor carries besides its shape.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kraken::runtime {

// f32 is the CPU's and the master weights' type; bf16 the GPU's activations; i32 token ids and
// targets; u16 token shards as they lie on disk.
enum class DType : uint8_t { F32, BF16, I32, U16 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);           // "f32", "bf16", "i32", "u16"
const char* dtype_safetensors_name(DType dtype);  // "F32", "BF16", "I32", "U16"
// Parses a safetensors dtype name; false for names we do not support.
bool dtype_from_safetensors_name(const std::string& name, DType* out);

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::CUDA, index}; }
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && (type == DeviceType::CPU || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cuda:1"
};

// "cpu", "cuda", "cuda:N"; anything else throws kraken::Error naming the text.
Device parse_device(const std::string& text);

}  // namespace kraken::runtime
