// Validated TOML reading for the planner's files (see toml_reader.h).
#include "parallel/planner/toml_reader.h"

#include <fstream>
#include <sstream>

#include "kernels/error.h"

namespace kraken::parallel::planner::detail {
namespace {

// "an integer (3)" / "a string (\"x\")": what the file holds, for "expected ..., got ..." messages.
std::string describe(const toml::node& node) {
  std::ostringstream out;
  switch (node.type()) {
    case toml::node_type::integer: out << "the integer " << *node.value<int64_t>(); break;
    case toml::node_type::floating_point: out << "the number " << *node.value<double>(); break;
    case toml::node_type::string: out << "the string \"" << *node.value<std::string>() << "\""; break;
    case toml::node_type::boolean: out << (*node.value<bool>() ? "true" : "false"); break;
    case toml::node_type::table: out << "a table"; break;
    case toml::node_type::array: out << "an array"; break;
    default: out << "a " << node.type(); break;
  }
  return out.str();
}

int line_of_node(const toml::node& node) { return static_cast<int>(node.source().begin.line); }

}  // namespace

void fail_at(const std::string& source, int line, const std::string& key, const std::string& message) {
  KRAKEN_THROW(source, ":", line, ": ", key, ": ", message);
}

toml::table parse_toml(const std::string& text, const std::string& source) {
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    KRAKEN_THROW(source, ":", e.source().begin.line, ":", e.source().begin.column, ": TOML syntax error: ",
                 e.description());
  }
}

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) KRAKEN_THROW(path, ": cannot open the ", what, " file");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

TableReader::TableReader(const toml::table& table, const std::string& source, const std::string& path)
    : table_(table), source_(source), path_(path) {}

bool TableReader::has(const std::string& key) const { return table_.contains(key); }

int TableReader::line() const { return static_cast<int>(table_.source().begin.line); }

int TableReader::line_of(const std::string& key) const {
  const toml::node* node = table_.get(key);
  return node ? line_of_node(*node) : line();
}

std::string TableReader::key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

void TableReader::fail(const std::string& key, const std::string& message) const {
  fail_at(source_, line_of(key), key_path(key), message);
}

const toml::node* TableReader::find(const std::string& key, const char* expected) const {
  const toml::node* node = table_.get(key);
  if (!node) {
    // A missing key has no line of its own: point at the table that should hold it.
    fail_at(source_, line(), key_path(key), std::string("missing; expected ") + expected);
  }
  return node;
}

int64_t TableReader::integer(const std::string& key) {
  const toml::node* node = find(key, "an integer");
  if (!node->is_integer()) fail(key, "expected an integer, got " + describe(*node));
  return *node->value<int64_t>();
}

double TableReader::number(const std::string& key) {
  const toml::node* node = find(key, "a number");
  if (!node->is_number()) fail(key, "expected a number, got " + describe(*node));
  return *node->value<double>();
}

std::string TableReader::string(const std::string& key) {
  const toml::node* node = find(key, "a string");
  if (!node->is_string()) fail(key, "expected a string, got " + describe(*node));
  return *node->value<std::string>();
}

bool TableReader::boolean(const std::string& key) {
  const toml::node* node = find(key, "true or false");
  if (!node->is_boolean()) fail(key, "expected true or false, got " + describe(*node));
  return *node->value<bool>();
}

int64_t TableReader::integer_or(const std::string& key, int64_t fallback) {
  return has(key) ? integer(key) : fallback;
}

double TableReader::number_or(const std::string& key, double fallback) {
  return has(key) ? number(key) : fallback;
}

std::string TableReader::string_or(const std::string& key, const std::string& fallback) {
  return has(key) ? string(key) : fallback;
}

bool TableReader::boolean_or(const std::string& key, bool fallback) {
  return has(key) ? boolean(key) : fallback;
}

int64_t TableReader::positive_integer(const std::string& key) {
  const int64_t v = integer(key);
  if (v <= 0) fail(key, "expected a positive integer, got " + std::to_string(v));
  return v;
}

double TableReader::positive_number(const std::string& key) {
  const double v = number(key);
  if (!(v > 0)) fail(key, "expected a positive number, got " + describe(*table_.get(key)));
  return v;
}

double TableReader::non_negative_number(const std::string& key) {
  const double v = number(key);
  if (!(v >= 0)) fail(key, "expected a number >= 0, got " + describe(*table_.get(key)));
  return v;
}

const toml::table* TableReader::subtable(const std::string& key) {
  const toml::node* node = table_.get(key);
  if (!node) return nullptr;
  if (!node->is_table()) fail(key, "expected a table, got " + describe(*node));
  return node->as_table();
}

void TableReader::allow_only(std::initializer_list<const char*> keys) const {
  const toml::key* first = nullptr;
  for (const auto& [key, node] : table_) {
    bool known = false;
    for (const char* k : keys) known = known || key.str() == k;
    if (!known && (!first || key.source().begin.line < first->source().begin.line)) first = &key;
  }
  if (!first) return;
  std::string list;
  for (const char* k : keys) list += (list.empty() ? "" : ", ") + std::string(k);
  fail_at(source_, static_cast<int>(first->source().begin.line), key_path(std::string(first->str())),
          "unknown key; expected one of " + list);
}

}  // namespace kraken::parallel::planner::detail
