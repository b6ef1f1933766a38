#include "runtime/dtype.h"

#include "kernels/error.h"

namespace kraken::runtime {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::U16: return 2;
  }
  KRAKEN_CHECK(false, "unknown dtype");
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::U16: return "u16";
  }
  return "?";
}

const char* dtype_safetensors_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::U16: return "U16";
  }
  return "?";
}

bool dtype_from_safetensors_name(const std::string& name, DType* out) {
  if (name == "F32") *out = DType::F32;
  else if (name == "BF16") *out = DType::BF16;
  else if (name == "I32") *out = DType::I32;
  else if (name == "U16") *out = DType::U16;
  else return false;
  return true;
}

std::string Device::str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

Device parse_device(const std::string& text) {
  if (text == "cpu") return Device::cpu();
  if (text == "cuda") return Device::cuda(0);
  if (text.rfind("cuda:", 0) == 0 && text.size() > 5) {
    const std::string digits = text.substr(5);
    if (digits.find_first_not_of("0123456789") == std::string::npos && digits.size() < 4)
      return Device::cuda(std::stoi(digits));
  }
  KRAKEN_THROW("unknown device '", text, "': expected \"cpu\", \"cuda\" or \"cuda:N\"");
}

}  // namespace kraken::runtime
