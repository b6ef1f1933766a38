// World: this process's place among all processes of the job, and the MPI lifetime.
//
// World::get() initialises MPI once (MPI_THREAD_MULTIPLE, which the communication threads need) and
// finalises it at exit. A process is part of a multi-process world only when a launcher started it:
// mpirun (or another PMI launcher) leaves its variables in the environment. Without them, or in a
// build without MPI, the world is this process alone and MPI is never initialised, so a plain
// `./kraken-train` starts instantly. KRAKEN_MPI_INIT=1 forces initialisation (a launcher we do not
// recognise), KRAKEN_MPI_INIT=0 forbids it.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace kraken::parallel {

class World {
 public:
  static World& get();
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // This process's place among the processes on its node (MPI_COMM_TYPE_SHARED): pick the GPU with it.
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  bool mpi_initialized() const { return mpi_; }
  // Every process of the job (its own MPI_Comm, duplicated from MPI_COMM_WORLD).
  Communicator& communicator() { return *communicator_; }

  // Ends the whole job with `code` (MPI_Abort); a world of one just exits.
  [[noreturn]] void abort(int code);

 private:
  World();
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  bool mpi_ = false;
  std::unique_ptr<Communicator> communicator_;
};

// True when the environment says a launcher started this process (see the file comment).
bool launched_by_mpi_launcher();

}  // namespace kraken::parallel
