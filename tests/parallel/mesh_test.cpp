// Rank arithmetic of the mesh, without MPI: the worked example of mesh.h, round trips, group
// membership and the errors. (The groups built under mpirun are checked by tests/parallel/mpi.)
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "kernels/error.h"
#include "parallel/mesh.h"
#include "parallel/world.h"

namespace kraken::parallel {
namespace {

using Groups = std::vector<std::vector<int>>;

// Every distinct group of `name` over the whole mesh, as the sorted set of world-rank lists.
std::set<std::vector<int>> all_groups(const std::string& name, const MeshSizes& sizes) {
  std::set<std::vector<int>> out;
  for (int r = 0; r < sizes.world(); ++r) {
    std::vector<int> g = mesh_group_ranks(name, r, sizes);
    if (!g.empty()) out.insert(g);
  }
  return out;
}

std::set<std::vector<int>> as_set(const Groups& groups) { return {groups.begin(), groups.end()}; }

TEST(MeshArithmetic, WorkedSixteenRankExampleFromTheHeader) {
  const MeshSizes sizes{2, 2, 2, 2};  // ex, pp, dp, tp
  const MeshCoords c = coords_of(13, sizes);
  EXPECT_EQ(c, (MeshCoords{1, 1, 0, 1}));  // ex 1, pp 1, dp 0, tp 1
  EXPECT_EQ(rank_of(c, sizes), 13);
  EXPECT_EQ(all_groups("tp", sizes),
            as_set({{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(all_groups("dp", sizes),
            as_set({{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(all_groups("pp", sizes),
            as_set({{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}}));
  EXPECT_EQ(all_groups("ex", sizes),
            as_set({{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
  EXPECT_EQ(all_groups("mp", sizes), as_set({{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}}));
  EXPECT_EQ(all_groups("embedding", sizes), all_groups("pp", sizes));  // PP = 2: first and last stage
  EXPECT_EQ(all_groups("tp_dp", sizes), as_set({{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}}));
  EXPECT_EQ(all_groups("dp_ex", sizes),
            as_set({{0, 2, 8, 10}, {1, 3, 9, 11}, {4, 6, 12, 14}, {5, 7, 13, 15}}));
  EXPECT_EQ(all_groups("tp_dp_pp", sizes), as_set({{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}}));
  EXPECT_EQ(all_groups("world", sizes).size(), 1u);
}

TEST(MeshArithmetic, EmbeddingGroupSkipsMiddleStages) {
  const MeshSizes sizes{1, 4, 2, 2};  // pp = 4 on 16 ranks: stages 1 and 2 (ranks 4…11) are in none
  EXPECT_EQ(all_groups("embedding", sizes), as_set({{0, 12}, {1, 13}, {2, 14}, {3, 15}}));
  for (int r = 4; r < 12; ++r) EXPECT_TRUE(mesh_group_ranks("embedding", r, sizes).empty()) << "rank " << r;
  // A single stage holds both ends: the group is the rank alone.
  EXPECT_EQ(mesh_group_ranks("embedding", 3, MeshSizes{1, 1, 2, 2}), (std::vector<int>{3}));
}

TEST(MeshArithmetic, RankOfInvertsCoordsOfForEveryRankAndShape) {
  for (const MeshSizes sizes : {MeshSizes{1, 1, 1, 1}, MeshSizes{1, 2, 3, 4}, MeshSizes{3, 1, 2, 1},
                                MeshSizes{2, 4, 1, 3}, MeshSizes{1, 1, 8, 1}}) {
    std::set<std::vector<int>> seen;
    for (int r = 0; r < sizes.world(); ++r) {
      const MeshCoords c = coords_of(r, sizes);
      ASSERT_EQ(rank_of(c, sizes), r) << sizes.str();
      seen.insert({c.ex, c.pp, c.dp, c.tp});
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), sizes.world()) << "coordinates are unique for " << sizes.str();
  }
}

TEST(MeshArithmetic, TpIsInnermostSoTpGroupsAreAdjacentRanks) {
  const MeshSizes sizes{1, 2, 2, 4};
  for (int r = 0; r < sizes.world(); ++r) {
    const std::vector<int> g = mesh_group_ranks("tp", r, sizes);
    ASSERT_EQ(g.size(), 4u);
    EXPECT_EQ(g.back() - g.front(), 3) << "rank " << r;
    EXPECT_EQ(g.front() % 4, 0);
  }
}

TEST(MeshArithmetic, GroupsPartitionTheWorldAndGroupRankIsTheCoordinate) {
  const MeshSizes sizes{2, 2, 3, 2};
  for (const std::string& name : mesh_group_names()) {
    if (name == "embedding") continue;
    std::vector<int> count(static_cast<size_t>(sizes.world()), 0);
    for (const std::vector<int>& g : all_groups(name, sizes))
      for (int r : g) count[static_cast<size_t>(r)] += 1;
    EXPECT_TRUE(std::all_of(count.begin(), count.end(), [](int c) { return c == 1; })) << name;
  }
  for (int r = 0; r < sizes.world(); ++r) {
    const MeshCoords c = coords_of(r, sizes);
    auto position = [&](const std::string& name) {
      const std::vector<int> g = mesh_group_ranks(name, r, sizes);
      return static_cast<int>(std::find(g.begin(), g.end(), r) - g.begin());
    };
    EXPECT_EQ(position("tp"), c.tp);
    EXPECT_EQ(position("dp"), c.dp);
    EXPECT_EQ(position("pp"), c.pp);
    EXPECT_EQ(position("ex"), c.ex);
    EXPECT_EQ(position("mp"), c.tp + sizes.tp * c.pp);
  }
}

TEST(MeshArithmetic, OutOfRangeRanksCoordinatesAndSizesAreErrors) {
  const MeshSizes sizes{1, 2, 2, 2};
  EXPECT_THROW(coords_of(8, sizes), Error);
  EXPECT_THROW(coords_of(-1, sizes), Error);
  EXPECT_THROW(rank_of(MeshCoords{0, 2, 0, 0}, sizes), Error);
  EXPECT_THROW(rank_of(MeshCoords{0, 0, 0, -1}, sizes), Error);
  EXPECT_THROW(check_mesh_sizes(MeshSizes{1, 0, 2, 2}, 0), Error);
  EXPECT_THROW(mesh_group_ranks("sp", 0, sizes), Error);
  try {
    check_mesh_sizes(MeshSizes{1, 2, 2, 2}, 6);
    FAIL() << "sizes multiplying to 8 accepted for a world of 6";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiply to 8 ranks, but the world has 6"), std::string::npos) << e.what();
  }
}

TEST(Mesh, WorldOfOneBuildsEveryGroupOfSizeOne) {
  World& world = World::get();
  ASSERT_EQ(world.size(), 1) << "this suite runs without mpirun";
  auto mesh = Mesh::build(world, MeshSizes{});
  for (const std::string& name : mesh_group_names()) {
    ASSERT_TRUE(mesh->has_group(name)) << name;
    EXPECT_EQ(mesh->group(name).size(), 1) << name;
    EXPECT_EQ(mesh->group(name).rank(), 0) << name;
  }
  EXPECT_TRUE(mesh->is_first_stage());
  EXPECT_TRUE(mesh->is_last_stage());
  EXPECT_THROW(mesh->group("sp"), Error);
}

TEST(Mesh, BuildingTwiceWhileOneIsAliveIsAnErrorAndRebuildingAfterwardsWorks) {
  World& world = World::get();
  {
    auto mesh = Mesh::build(world, MeshSizes{});
    try {
      Mesh::build(world, MeshSizes{});
      FAIL() << "a second Mesh was built";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(Mesh::build(world, MeshSizes{}));
}

TEST(Mesh, SizesThatDoNotMultiplyToTheWorldAreAnError) {
  EXPECT_THROW(Mesh::build(World::get(), MeshSizes{1, 1, 2, 1}), Error);
  EXPECT_NO_THROW(Mesh::build(World::get(), MeshSizes{}));  // the failed build left nothing behind
}

}  // namespace
}  // namespace kraken::parallel
