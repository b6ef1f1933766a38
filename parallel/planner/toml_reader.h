// Validated reading of one TOML table: every read names the key, the line and what was expected, and
// keys outside the table's list are errors (a typo must not silently fall back to a default).
//
// Internal to the planner's readers (cluster, profile, training config); not part of its API.
#pragma once

#include <toml++/toml.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace kraken::parallel::planner::detail {

// Throws kraken::Error "<source>:<line>: <key>: <message>".
[[noreturn]] void fail_at(const std::string& source, int line, const std::string& key, const std::string& message);

// Parses TOML text; a syntax error becomes a kraken::Error "<source>:<line>:<column>: <reason>".
toml::table parse_toml(const std::string& text, const std::string& source);

std::string read_text_file(const std::string& path, const char* what);

class TableReader {
 public:
  // `path` is the table's name in messages ("group[2]", "model"); empty for the root.
  TableReader(const toml::table& table, const std::string& source, const std::string& path);

  bool has(const std::string& key) const;
  int line() const;  // the table's own line (where a missing key would have gone)
  int line_of(const std::string& key) const;
  std::string key_path(const std::string& key) const;

  // Required values. Integers must be whole TOML integers; numbers accept integers or floats.
  int64_t integer(const std::string& key);
  double number(const std::string& key);
  std::string string(const std::string& key);
  bool boolean(const std::string& key);
  // Optional values: `fallback` when the key is absent (a present key of the wrong type is an error).
  int64_t integer_or(const std::string& key, int64_t fallback);
  double number_or(const std::string& key, double fallback);
  std::string string_or(const std::string& key, const std::string& fallback);
  bool boolean_or(const std::string& key, bool fallback);

  // Range checks that name the key and line of the value.
  int64_t positive_integer(const std::string& key);
  double positive_number(const std::string& key);
  double non_negative_number(const std::string& key);

  const toml::table* subtable(const std::string& key);  // null when absent; error when not a table
  // Every key outside `keys` is an error naming it and its line (the first in the file). Called before
  // reading, so that a misspelt key is reported as unknown rather than its intended key as missing.
  void allow_only(std::initializer_list<const char*> keys) const;
  [[noreturn]] void fail(const std::string& key, const std::string& message) const;

 private:
  const toml::node* find(const std::string& key, const char* expected) const;
  const toml::table& table_;
  std::string source_;
  std::string path_;
};

}  // namespace kraken::parallel::planner::detail
