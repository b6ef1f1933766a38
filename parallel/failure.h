// Failing loudly under MPI: an exception on one rank ends the whole job with its message, never a hang.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace kraken::parallel {

class Communicator;

// Runs `main` and returns its result. An exception prints "rank R: error: <message>" to stderr and
// ends the job: with more than one rank, MPI_Abort (the other ranks may be blocked in a collective
// that will never complete), exit code 2 for a kraken::Error (a user mistake) and 1 for anything else;
// a world of one returns that code instead. Every tool's main is `return run_guarded([&] { … });`.
int run_guarded(const std::function<int()>& main);

// Collective over `comm` (default: the world). Hashes `text` (e.g. the config file's contents), gathers
// every rank's hash and throws kraken::Error on every rank if they differ, naming the ranks that differ
// from rank 0: "config differs between ranks: ranks 2, 3 differ from rank 0".
void check_same_on_all_ranks(const std::string& what, const std::string& text);
void check_same_on_all_ranks(const std::string& what, const std::string& text, Communicator& comm);

// FNV-1a, 64 bit: the hash check_same_on_all_ranks compares.
uint64_t text_hash(const std::string& text);

}  // namespace kraken::parallel
