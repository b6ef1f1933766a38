#include "train/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "kernels/error.h"

namespace kraken::train {
namespace {

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) KRAKEN_THROW("cannot open '", path, "' to sync it: ", std::strerror(errno));
  // Some file systems refuse fsync on directories (EINVAL); that loses nothing we can do better.
  if (::fsync(fd) != 0 && errno != EINVAL) {
    const int err = errno;
    ::close(fd);
    KRAKEN_THROW("fsync of '", path, "' failed: ", std::strerror(err));
  }
  ::close(fd);
}

void remove_tree(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (!d) {
    ::unlink(path.c_str());
    return;
  }
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string child = path + "/" + name;
    if (is_dir(child)) remove_tree(child);
    else ::unlink(child.c_str());
  }
  ::closedir(d);
  ::rmdir(path.c_str());
}

std::string parent_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

void make_directories(const std::string& path) {
  if (path.empty() || is_dir(path)) return;
  make_directories(parent_of(path));
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST)
    KRAKEN_THROW("cannot create directory '", path, "': ", std::strerror(errno));
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) KRAKEN_THROW("cannot write '", tmp, "': ", std::strerror(errno));
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      KRAKEN_THROW("writing '", tmp, "' failed: ", std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    KRAKEN_THROW("cannot sync '", tmp, "': ", std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    KRAKEN_THROW("cannot rename '", tmp, "' to '", path, "': ", std::strerror(err));
  }
  fsync_path(parent_of(path));
}

CheckpointStore::CheckpointStore(std::string dir, int64_t keep) : dir_(std::move(dir)), keep_(keep) {
  KRAKEN_CHECK(keep_ >= 1);
}

std::string CheckpointStore::save(int64_t step, const CheckpointContents& contents) {
  make_directories(dir_);
  const std::string final_dir = dir_ + "/" + step_name(step);
  const std::string tmp_dir = final_dir + ".tmp";
  remove_tree(tmp_dir);  // a leftover from a crash during an earlier save
  make_directories(tmp_dir);
  runtime::save_safetensors(tmp_dir + "/model.safetensors", contents.model, {{"format", "kraken"}});
  runtime::save_safetensors(tmp_dir + "/optimizer.safetensors", contents.optimizer, {{"format", "kraken"}});
  nlohmann::json state = contents.state;
  state["step"] = step;
  write_file_atomically(tmp_dir + "/state.json", state.dump(2) + "\n");
  fsync_path(tmp_dir);
  // Replacing an existing step (a resumed run saving the step it resumed from) goes through a
  // side name, because rename() cannot replace a non-empty directory.
  const std::string old_dir = final_dir + ".old";
  if (is_dir(final_dir)) {
    remove_tree(old_dir);
    if (::rename(final_dir.c_str(), old_dir.c_str()) != 0)
      KRAKEN_THROW("cannot move aside '", final_dir, "': ", std::strerror(errno));
  }
  if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0)
    KRAKEN_THROW("cannot rename '", tmp_dir, "' to '", final_dir, "': ", std::strerror(errno));
  fsync_path(dir_);
  remove_tree(old_dir);

  const auto all = list();
  for (size_t i = 0; i + static_cast<size_t>(keep_) < all.size(); ++i) remove_tree(all[i].second);
  return final_dir;
}

std::vector<std::pair<int64_t, std::string>> CheckpointStore::list() const {
  std::vector<std::pair<int64_t, std::string>> out;
  DIR* d = ::opendir(dir_.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() != 13 || name.rfind("step_", 0) != 0) continue;  // step_NNNNNNNN exactly
    if (name.find_first_not_of("0123456789", 5) != std::string::npos) continue;
    const std::string path = dir_ + "/" + name;
    if (!is_file(path + "/state.json")) continue;
    out.emplace_back(std::stoll(name.substr(5)), path);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

std::string CheckpointStore::latest() const {
  const auto all = list();
  return all.empty() ? std::string() : all.back().second;
}

int64_t LoadedCheckpoint::step() const { return state.at("step").get<int64_t>(); }

LoadedCheckpoint open_checkpoint(const std::string& dir) {
  if (!is_dir(dir)) KRAKEN_THROW("checkpoint '", dir, "' is not a directory");
  const std::string state_path = dir + "/state.json";
  std::ifstream in(state_path);
  if (!in) KRAKEN_THROW("checkpoint '", dir, "' has no state.json (incomplete or not a checkpoint)");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json state = nlohmann::json::parse(text.str(), nullptr, false);
  if (state.is_discarded() || !state.is_object()) KRAKEN_THROW("'", state_path, "' is not valid JSON");
  if (!state.contains("step") || !state["step"].is_number_integer())
    KRAKEN_THROW("'", state_path, "' has no integer \"step\"");
  for (const char* f : {"/model.safetensors", "/optimizer.safetensors"})
    if (!is_file(dir + f)) KRAKEN_THROW("checkpoint '", dir, "' is missing ", (f + 1));
  return LoadedCheckpoint{dir, std::move(state), runtime::SafetensorsFile::open(dir + "/model.safetensors"),
                          runtime::SafetensorsFile::open(dir + "/optimizer.safetensors")};
}

void load_tensors(const runtime::SafetensorsFile& file, const NamedTensors& targets, bool allow_extra) {
  std::set<std::string> wanted;
  for (const auto& [name, tensor] : targets) {
    wanted.insert(name);
    if (!file.contains(name)) KRAKEN_THROW("'", file.path(), "' has no tensor '", name, "'");
    runtime::Tensor dst = tensor;
    file.load_into(name, dst);
  }
  if (!allow_extra)
    for (const std::string& name : file.names())
      if (!wanted.count(name))
        KRAKEN_THROW("'", file.path(), "' holds tensor '", name, "', which this model does not have");
}

}  // namespace kraken::train
