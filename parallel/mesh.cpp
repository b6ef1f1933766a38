#include "parallel/mesh.h"

#include <algorithm>
#include <atomic>
#include <sstream>

#include "parallel/communicator_impl.h"
#include "parallel/world.h"

namespace kraken::parallel {
namespace {

// Which axes vary inside each group.
struct GroupAxes {
  const char* name;
  bool tp, dp, pp, ex;
};
constexpr GroupAxes kGroups[] = {
    {"tp", true, false, false, false},    {"dp", false, true, false, false},
    {"pp", false, false, true, false},    {"ex", false, false, false, true},
    {"mp", true, false, true, false},     {"tp_dp", true, true, false, false},
    {"dp_ex", false, true, false, true},  {"tp_dp_pp", true, true, true, false},
    {"world", true, true, true, true},
};
constexpr const char* kEmbedding = "embedding";

std::atomic<int> g_live_meshes{0};

}  // namespace

std::string MeshSizes::str() const {
  std::ostringstream out;
  out << "ex=" << ex << " pp=" << pp << " dp=" << dp << " tp=" << tp;
  return out.str();
}

std::string MeshCoords::str() const {
  std::ostringstream out;
  out << "ex=" << ex << " pp=" << pp << " dp=" << dp << " tp=" << tp;
  return out.str();
}

void check_mesh_sizes(const MeshSizes& sizes, int world_size) {
  if (sizes.ex < 1 || sizes.pp < 1 || sizes.dp < 1 || sizes.tp < 1)
    KRAKEN_THROW("mesh sizes ", sizes.str(), ": every size must be at least 1");
  if (sizes.world() != world_size)
    KRAKEN_THROW("mesh sizes ", sizes.str(), " multiply to ", sizes.world(), " ranks, but the world has ", world_size,
                 " (ex·pp·dp·tp must equal the number of processes)");
}

MeshCoords coords_of(int rank, const MeshSizes& sizes) {
  check_mesh_sizes(sizes, static_cast<int>(sizes.world()));
  if (rank < 0 || rank >= sizes.world())
    KRAKEN_THROW("rank ", rank, " outside a mesh of ", sizes.world(), " ranks (", sizes.str(), ")");
  MeshCoords c;
  c.tp = rank % sizes.tp;
  c.dp = (rank / sizes.tp) % sizes.dp;
  c.pp = (rank / (sizes.tp * sizes.dp)) % sizes.pp;
  c.ex = rank / (sizes.tp * sizes.dp * sizes.pp);
  return c;
}

int rank_of(const MeshCoords& c, const MeshSizes& sizes) {
  check_mesh_sizes(sizes, static_cast<int>(sizes.world()));
  if (c.tp < 0 || c.tp >= sizes.tp || c.dp < 0 || c.dp >= sizes.dp || c.pp < 0 || c.pp >= sizes.pp || c.ex < 0 ||
      c.ex >= sizes.ex)
    KRAKEN_THROW("coordinates ", c.str(), " outside the mesh ", sizes.str());
  return c.tp + sizes.tp * (c.dp + sizes.dp * (c.pp + sizes.pp * c.ex));
}

const std::vector<std::string>& mesh_group_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const GroupAxes& g : kGroups) out.push_back(g.name);
    out.push_back(kEmbedding);
    return out;
  }();
  return names;
}

std::vector<int> mesh_group_ranks(const std::string& name, int rank, const MeshSizes& sizes) {
  const MeshCoords me = coords_of(rank, sizes);
  std::vector<int> ranks;
  if (name == kEmbedding) {
    if (me.pp != 0 && me.pp != sizes.pp - 1) return ranks;
    MeshCoords first = me, last = me;
    first.pp = 0;
    last.pp = sizes.pp - 1;
    ranks.push_back(rank_of(first, sizes));
    if (sizes.pp > 1) ranks.push_back(rank_of(last, sizes));
    return ranks;
  }
  const GroupAxes* axes = nullptr;
  for (const GroupAxes& g : kGroups)
    if (name == g.name) axes = &g;
  if (!axes) KRAKEN_THROW("unknown mesh group '", name, "'");
  // Every rank that agrees with `me` on the axes that do not vary, in world-rank order.
  for (int r = 0; r < sizes.world(); ++r) {
    const MeshCoords c = coords_of(r, sizes);
    if ((axes->tp || c.tp == me.tp) && (axes->dp || c.dp == me.dp) && (axes->pp || c.pp == me.pp) &&
        (axes->ex || c.ex == me.ex))
      ranks.push_back(r);
  }
  return ranks;
}

std::unique_ptr<Mesh> Mesh::build(World& world, const MeshSizes& sizes) {
  check_mesh_sizes(sizes, world.size());
  if (g_live_meshes.fetch_add(1) != 0) {
    g_live_meshes.fetch_sub(1);
    KRAKEN_THROW("Mesh::build: a Mesh already exists; process groups are built once per run (destroy the "
                 "existing Mesh before building another)");
  }
  std::unique_ptr<Mesh> mesh(new Mesh());
  mesh->sizes_ = sizes;
  mesh->rank_ = world.rank();
  mesh->coords_ = coords_of(world.rank(), sizes);
  for (const std::string& name : mesh_group_names()) {
    const std::vector<int> ranks = mesh_group_ranks(name, world.rank(), sizes);
#if KRAKEN_WITH_MPI
    if (world.mpi_initialized()) {
      // color: the group's smallest world rank names it; key: the position inside it.
      const int color = ranks.empty() ? MPI_UNDEFINED : ranks.front();
      const int key = ranks.empty() ? 0 : static_cast<int>(std::find(ranks.begin(), ranks.end(), world.rank()) - ranks.begin());
      MPI_Comm comm = MPI_COMM_NULL;
      KRAKEN_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, color, key, &comm));
      if (comm == MPI_COMM_NULL) continue;
      std::unique_ptr<Communicator> group = detail::make_mpi_communicator(comm, name);
      KRAKEN_CHECK(group->world_ranks() == ranks, "group ", name, " was built with other ranks than planned");
      mesh->groups_[name] = std::move(group);
      continue;
    }
#endif
    if (ranks.empty()) continue;
    KRAKEN_CHECK(ranks.size() == 1, "a world of one has groups of one");
    mesh->groups_[name] = Communicator::single(name);
  }
  return mesh;
}

Mesh::~Mesh() {
  groups_.clear();
  g_live_meshes.fetch_sub(1);
}

bool Mesh::has_group(const std::string& name) const { return groups_.count(name) != 0; }

Communicator& Mesh::group(const std::string& name) const {
  auto it = groups_.find(name);
  if (it != groups_.end()) return *it->second;
  const auto& names = mesh_group_names();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    std::ostringstream known;
    for (const std::string& n : names) known << " " << n;
    KRAKEN_THROW("unknown mesh group '", name, "' (known:", known.str(), ")");
  }
  KRAKEN_THROW("rank ", rank_, " (", coords_.str(), ") is in no '", name, "' group (mesh ", sizes_.str(), ")");
}

}  // namespace kraken::parallel
