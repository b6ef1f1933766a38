#include "parallel/world.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "parallel/communicator_impl.h"

namespace kraken::parallel {

bool launched_by_mpi_launcher() {
  if (const char* forced = std::getenv("KRAKEN_MPI_INIT")) return std::string(forced) == "1";
  // Open MPI's mpirun, PMIx launchers (Open MPI 5, Slurm with PMIx), and PMI-1/2 launchers (MPICH's
  // Hydra, Slurm with PMI2) each set one of these.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"})
    if (std::getenv(name)) return true;
  return false;
}

World& World::get() {
  static World world;
  return world;
}

World::World() {
#if KRAKEN_WITH_MPI
  if (launched_by_mpi_launcher()) {
    int initialized = 0;
    KRAKEN_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      int provided = 0;
      KRAKEN_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
      if (provided < MPI_THREAD_MULTIPLE)
        KRAKEN_THROW("this MPI library does not support MPI_THREAD_MULTIPLE (provided level ", provided,
                     "), which the communication threads need");
    }
    mpi_ = true;
    KRAKEN_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
    KRAKEN_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
    MPI_Comm node = MPI_COMM_NULL;
    KRAKEN_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
    KRAKEN_MPI_CHECK(MPI_Comm_rank(node, &local_rank_));
    KRAKEN_MPI_CHECK(MPI_Comm_size(node, &local_size_));
    KRAKEN_MPI_CHECK(MPI_Comm_free(&node));
    MPI_Comm dup = MPI_COMM_NULL;
    KRAKEN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
    communicator_ = detail::make_mpi_communicator(dup, "world");
    return;
  }
#endif
  communicator_ = Communicator::single("world");
}

World::~World() {
  communicator_.reset();  // joins its thread and frees its MPI_Comm before MPI goes away
#if KRAKEN_WITH_MPI
  if (mpi_) {
    // No checks here or in abort(): a destructor must not throw, and abort has nowhere to report to.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
#endif
}

void World::abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
#if KRAKEN_WITH_MPI
  if (mpi_ && size_ > 1) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::_Exit(code);
}

}  // namespace kraken::parallel
