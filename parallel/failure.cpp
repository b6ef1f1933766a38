#include "parallel/failure.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "kernels/error.h"
#include "parallel/communicator.h"
#include "parallel/world.h"

namespace kraken::parallel {

int run_guarded(const std::function<int()>& main) {
  int code = 1;
  std::string message;
  try {
    return main();
  } catch (const Error& e) {
    code = 2;
    message = e.what();
  } catch (const std::exception& e) {
    message = e.what();
  } catch (...) {
    message = "unknown exception";
  }
  World* world = nullptr;
  try {
    world = &World::get();
  } catch (const std::exception& e) {
    message += std::string(" (and the MPI world could not be set up: ") + e.what() + ")";
  }
  std::string rank = "?";
  if (world) {
    rank = std::to_string(world->rank());
  } else if (const char* env = std::getenv("OMPI_COMM_WORLD_RANK")) {
    rank = env;
  }
  std::fprintf(stderr, "rank %s: error: %s\n", rank.c_str(), message.c_str());
  std::fflush(stderr);
  if (world && world->size() > 1) world->abort(code);  // the other ranks may wait for us forever
  if (!world && launched_by_mpi_launcher()) std::_Exit(code);
  return code;
}

uint64_t text_hash(const std::string& text) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a offset basis
  for (unsigned char c : text) {
    h ^= c;
    h *= 0x100000001b3ull;  // FNV prime
  }
  return h;
}

void check_same_on_all_ranks(const std::string& what, const std::string& text) {
  check_same_on_all_ranks(what, text, World::get().communicator());
}

void check_same_on_all_ranks(const std::string& what, const std::string& text, Communicator& comm) {
  const uint64_t mine = text_hash(text);
  Tensor local = Tensor::empty({1, 2}, runtime::DType::I32);
  local.data<int32_t>()[0] = static_cast<int32_t>(mine & 0xffffffffu);
  local.data<int32_t>()[1] = static_cast<int32_t>(mine >> 32);
  const std::vector<int32_t> all = comm.all_gather(local).to_int_vector();
  auto hash_of = [&](int r) {
    return static_cast<uint64_t>(static_cast<uint32_t>(all[static_cast<size_t>(2 * r)])) |
           (static_cast<uint64_t>(static_cast<uint32_t>(all[static_cast<size_t>(2 * r + 1)])) << 32);
  };
  std::vector<int> differ;
  for (int r = 1; r < comm.size(); ++r)
    if (hash_of(r) != hash_of(0)) differ.push_back(comm.world_ranks()[static_cast<size_t>(r)]);
  if (differ.empty()) return;
  std::ostringstream ranks;
  for (size_t i = 0; i < differ.size(); ++i) ranks << (i ? ", " : "") << differ[i];
  KRAKEN_THROW(what, " differs between ranks: rank", differ.size() > 1 ? "s " : " ", ranks.str(), " differ",
               differ.size() > 1 ? "" : "s", " from rank ", comm.world_ranks()[0],
               " (every rank must be started with the same ", what, ")");
}

}  // namespace kraken::parallel
