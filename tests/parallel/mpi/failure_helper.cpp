// Helper for failure_driver.cpp: a job in which one rank fails while the others wait for it. Without
// run_guarded's MPI_Abort every mode would hang; the driver checks that the job ends quickly, with a
// non-zero exit code and the failing rank's message.
//   error      rank 1 throws kraken::Error while rank 0 waits in a receive from it    (exit 2)
//   exception  the same with std::runtime_error                                      (exit 1)
//   in-flight  rank 1 throws with an all-reduce of a Mesh group still in flight, so the group is
//              destroyed while unwinding; rank 0 waits in a receive                     (exit 2)
//   config     the ranks' config texts differ; every rank throws naming rank 1         (exit 2)
#include <stdexcept>
#include <string>

#include "kernels/error.h"
#include "parallel/failure.h"
#include "parallel/mesh.h"
#include "parallel/world.h"

using kraken::parallel::World;
using kraken::runtime::Tensor;

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  return kraken::parallel::run_guarded([&]() -> int {
    World& world = World::get();
    auto& comm = world.communicator();
    const int r = world.rank();
    if (mode == "config") {
      kraken::parallel::check_same_on_all_ranks("config", r == 1 ? "n_layer = 3" : "n_layer = 2");
      return 0;
    }
    auto mesh = kraken::parallel::Mesh::build(world, kraken::parallel::MeshSizes{1, 1, world.size(), 1});
    comm.barrier();
    if (r == 1) {
      if (mode == "error") KRAKEN_THROW("deliberate failure on rank ", r);
      if (mode == "exception") throw std::runtime_error("deliberate std::runtime_error on rank 1");
      if (mode == "in-flight") {
        Tensor t = Tensor::zeros({1000});
        kraken::parallel::Handle pending = mesh->dp().all_reduce_async(t);  // rank 0 never joins
        KRAKEN_THROW("deliberate failure on rank 1 with an all-reduce in flight");
      }
      KRAKEN_THROW("unknown mode '", mode, "'");
    }
    Tensor never = Tensor::empty({4});
    comm.recv(never, 1, 0);  // waits forever: rank 1 fails instead of sending
    return 0;
  });
}
