// The message of the kraken::Error a call throws ("(no error)" when it throws none), for tests that
// check what an error says.
#pragma once

#include <functional>
#include <string>

#include "kernels/error.h"

namespace kraken::testing {

inline std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace kraken::testing
