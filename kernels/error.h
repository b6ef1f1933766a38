// kraken::Error and KRAKEN_CHECK: the one error type of the whole project.
//
// It lives in the bottom layer so that every layer can throw it. A user mistake (a config key, a path,
// a shape, a shard header) throws kraken::Error with a message that names the thing and what was
// expected; tools print it and exit 2. KRAKEN_CHECK guards internal invariants: when it fires, the bug
// is ours, and the message says which file and line.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kraken {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
// Concatenates any streamable arguments: error_message("expected ", 3, " got ", x).
template <typename... Args>
std::string error_message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
[[noreturn]] inline void check_failed(const char* file, int line, const char* cond, const std::string& msg) {
  throw Error(error_message("internal error at ", file, ":", line, ": check '", cond, "' failed",
                            msg.empty() ? "" : ": ", msg));
}
}  // namespace detail

}  // namespace kraken

// Throws kraken::Error built from the streamed arguments.
#define KRAKEN_THROW(...) throw ::kraken::Error(::kraken::detail::error_message(__VA_ARGS__))

// Internal invariant: KRAKEN_CHECK(n > 0) or KRAKEN_CHECK(n > 0, "n=", n). (The trailing "" keeps the
// variadic part non-empty without C++20's __VA_OPT__.)
#define KRAKEN_CHECK(...) KRAKEN_CHECK_IMPL_(__VA_ARGS__, "")
#define KRAKEN_CHECK_IMPL_(cond, ...)                                                               \
  do {                                                                                              \
    if (!(cond))                                                                                    \
      ::kraken::detail::check_failed(__FILE__, __LINE__, #cond, ::kraken::detail::error_message(__VA_ARGS__)); \
  } while (0)
