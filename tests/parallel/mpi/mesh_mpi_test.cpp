// The groups Mesh::build makes under mpirun hold exactly the ranks written out below (by hand, from
// the layout tp innermost, then dp, pp, ex), in rank order, and communicate among themselves only.
// Runs on 4 and 8 ranks; each run checks the shapes of its size.
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "parallel/failure.h"
#include "parallel/mesh.h"
#include "tests/parallel/mpi/mpi_harness.h"

using kraken::parallel::Mesh;
using kraken::parallel::MeshSizes;
using kraken::parallel::ReduceOp;
using kraken::runtime::Tensor;
using kraken::testing::MpiHarness;

namespace {

using Groups = std::vector<std::vector<int>>;

struct Shape {
  std::string label;
  MeshSizes sizes;
  std::map<std::string, Groups> groups;  // group name → every group of that name (ranks absent: none)
};

std::vector<Shape> shapes_for(int world) {
  if (world == 4)
    return {
        {"dp=2 x tp=2", MeshSizes{1, 1, 2, 2},
         {{"tp", {{0, 1}, {2, 3}}}, {"dp", {{0, 2}, {1, 3}}}, {"pp", {{0}, {1}, {2}, {3}}},
          {"mp", {{0, 1}, {2, 3}}}, {"tp_dp", {{0, 1, 2, 3}}}, {"embedding", {{0}, {1}, {2}, {3}}},
          {"world", {{0, 1, 2, 3}}}}},
        {"pp=2 x dp=2", MeshSizes{1, 2, 2, 1},
         {{"tp", {{0}, {1}, {2}, {3}}}, {"dp", {{0, 1}, {2, 3}}}, {"pp", {{0, 2}, {1, 3}}},
          {"mp", {{0, 2}, {1, 3}}}, {"embedding", {{0, 2}, {1, 3}}}, {"dp_ex", {{0, 1}, {2, 3}}},
          {"tp_dp", {{0, 1}, {2, 3}}}}},
        {"pp=4", MeshSizes{1, 4, 1, 1},
         {{"pp", {{0, 1, 2, 3}}}, {"embedding", {{0, 3}}}, {"dp", {{0}, {1}, {2}, {3}}}}},
        {"ex=2 x dp=2", MeshSizes{2, 1, 2, 1},
         {{"ex", {{0, 2}, {1, 3}}}, {"dp", {{0, 1}, {2, 3}}}, {"dp_ex", {{0, 1, 2, 3}}},
          {"tp_dp_pp", {{0, 1}, {2, 3}}}}},
    };
  if (world == 8)
    return {
        {"pp=2 x dp=2 x tp=2", MeshSizes{1, 2, 2, 2},
         {{"tp", {{0, 1}, {2, 3}, {4, 5}, {6, 7}}}, {"dp", {{0, 2}, {1, 3}, {4, 6}, {5, 7}}},
          {"pp", {{0, 4}, {1, 5}, {2, 6}, {3, 7}}}, {"mp", {{0, 1, 4, 5}, {2, 3, 6, 7}}},
          {"tp_dp", {{0, 1, 2, 3}, {4, 5, 6, 7}}}, {"embedding", {{0, 4}, {1, 5}, {2, 6}, {3, 7}}},
          {"dp_ex", {{0, 2}, {1, 3}, {4, 6}, {5, 7}}}, {"world", {{0, 1, 2, 3, 4, 5, 6, 7}}}}},
        {"ex=2 x pp=2 x tp=2", MeshSizes{2, 2, 1, 2},
         {{"tp", {{0, 1}, {2, 3}, {4, 5}, {6, 7}}}, {"pp", {{0, 2}, {1, 3}, {4, 6}, {5, 7}}},
          {"ex", {{0, 4}, {1, 5}, {2, 6}, {3, 7}}}, {"mp", {{0, 1, 2, 3}, {4, 5, 6, 7}}},
          {"dp_ex", {{0, 4}, {1, 5}, {2, 6}, {3, 7}}}, {"tp_dp_pp", {{0, 1, 2, 3}, {4, 5, 6, 7}}}}},
        {"pp=4 x tp=2", MeshSizes{1, 4, 1, 2},
         {{"pp", {{0, 2, 4, 6}, {1, 3, 5, 7}}}, {"embedding", {{0, 6}, {1, 7}}}, {"tp", {{0, 1}, {2, 3}, {4, 5}, {6, 7}}}}},
    };
  return {};
}

std::string list(const std::vector<int>& v) {
  std::string s = "{";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "}";
}

void check_shape(MpiHarness& h, const Shape& shape) {
  const int me = h.rank();
  auto mesh = Mesh::build(h.world(), shape.sizes);
  for (const auto& [name, groups] : shape.groups) {
    const std::vector<int>* mine = nullptr;
    for (const auto& g : groups)
      for (int r : g)
        if (r == me) mine = &g;
    const std::string what = shape.label + " " + name;
    if (!mine) {
      h.expect(!mesh->has_group(name), what + ": rank " + std::to_string(me) + " should be in no group");
      continue;
    }
    if (!h.expect(mesh->has_group(name), what + ": missing")) continue;
    auto& comm = mesh->group(name);
    const int index = static_cast<int>(std::find(mine->begin(), mine->end(), me) - mine->begin());
    h.expect(comm.size() == static_cast<int>(mine->size()), what + ": size " + std::to_string(comm.size()));
    h.expect(comm.rank() == index, what + ": group rank " + std::to_string(comm.rank()) + ", want " +
                                       std::to_string(index));
    h.expect(comm.world_ranks() == *mine, what + ": world ranks " + list(comm.world_ranks()) + ", want " + list(*mine));
    // Communicate: gather everyone's world rank, and sum world rank + 1.
    const std::vector<int32_t> gathered = comm.all_gather(Tensor::from_ints({me}, {1})).to_int_vector();
    h.expect(std::vector<int>(gathered.begin(), gathered.end()) == *mine,
             what + ": gathered " + list(std::vector<int>(gathered.begin(), gathered.end())));
    Tensor sum = Tensor::full({1}, float(me + 1));
    comm.all_reduce(sum, ReduceOp::Sum);
    float want = 0;
    for (int r : *mine) want += float(r + 1);
    h.expect_near(sum.item(), want, 0, 0, what + ": sum of ranks + 1");
  }
}

}  // namespace

int main() {
  return kraken::parallel::run_guarded([] {
    MpiHarness h;
    const std::vector<Shape> shapes = shapes_for(h.size());
    if (shapes.empty()) KRAKEN_THROW("mesh_mpi_test runs on 4 or 8 ranks, not ", h.size());
    for (const Shape& shape : shapes) h.run("GroupsHoldTheWrittenOutRanks " + shape.label, [&] { check_shape(h, shape); });

    h.run("BuildingTwiceAndWrongSizesAreErrorsOnEveryRank", [&] {
      auto mesh = Mesh::build(h.world(), shapes[0].sizes);
      try {
        Mesh::build(h.world(), shapes[0].sizes);
        h.expect(false, "second Mesh built");
      } catch (const kraken::Error& e) {
        h.expect(std::string(e.what()).find("already exists") != std::string::npos, e.what());
      }
      mesh.reset();
      try {
        Mesh::build(h.world(), MeshSizes{1, 1, 3, 1});
        h.expect(false, "sizes for 3 ranks accepted");
      } catch (const kraken::Error& e) {
        h.expect(std::string(e.what()).find("multiply to 3 ranks") != std::string::npos, e.what());
      }
    });
    return h.finish();
  });
}
