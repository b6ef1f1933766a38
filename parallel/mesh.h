// Mesh: the grid of ranks and every process group, built once (Megatron-LM's parallel_state).
//
// Four axes, innermost first: tp (tensor parallel: a Kraken layer's sub-layers, or Megatron's split
// matrices), dp (data parallel replicas), pp (pipeline stages), ex (OptEx evaluation groups, each an
// independent copy of the whole dp × pp × tp job). tp is innermost so that a tp group is made of
// neighbouring ranks, which launchers place on one node (the fastest links); ex is outermost.
//
//   rank = tp + TP·(dp + DP·(pp + PP·ex))          (TP, DP, PP, EX: the sizes; EX·PP·DP·TP = world)
//   tp = rank mod TP,  dp = ⌊rank/TP⌋ mod DP,  pp = ⌊rank/(TP·DP)⌋ mod PP,  ex = ⌊rank/(TP·DP·PP)⌋
//
// Worked example, 16 ranks with EX = PP = DP = TP = 2:
//   rank 13 = 1 + 2·(0 + 2·(1 + 2·1))  →  tp 1, dp 0, pp 1, ex 1
//   tp groups  {0,1} {2,3} {4,5} … {14,15}                      (8 groups of 2: adjacent ranks)
//   dp groups  {0,2} {1,3} {4,6} {5,7} {8,10} … {13,15}         (stride TP)
//   pp groups  {0,4} {1,5} {2,6} {3,7} {8,12} … {11,15}         (stride TP·DP)
//   ex groups  {0,8} {1,9} … {7,15}                             (stride TP·DP·PP)
//   mp (tp×pp, one model replica) {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
//   embedding (first and last stage, other coordinates equal) = the pp groups here, since PP = 2;
//   with PP = 4 on 16 ranks (TP = 2, DP = 2) it is {0,12} {1,13} {2,14} {3,15} and ranks 4…11 are in
//   none.
//
// Groups (name: the axes that vary inside it; a group's rank is the member's position in world-rank
// order, so e.g. a tp group's rank is the tp coordinate):
//   tp, dp, pp, ex         one axis each
//   mp                     tp, pp      one model replica (tensor and pipeline parallel ranks)
//   tp_dp                  tp, dp      one pipeline stage of one ex group
//   dp_ex                  dp, ex      all copies of the same model shard (every replica, every ex group)
//   tp_dp_pp               tp, dp, pp  one ex group (an ordinary training job)
//   world                  all
//   embedding              first and last pp stage, for tied input/output embeddings
// Nothing but Mesh::build calls MPI_Comm_split.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace kraken::parallel {

class World;

struct MeshSizes {
  int ex = 1;
  int pp = 1;
  int dp = 1;
  int tp = 1;
  int64_t world() const { return int64_t{ex} * pp * dp * tp; }
  std::string str() const;  // "ex=1 pp=2 dp=2 tp=2"
};

struct MeshCoords {
  int ex = 0;
  int pp = 0;
  int dp = 0;
  int tp = 0;
  bool operator==(const MeshCoords& o) const { return ex == o.ex && pp == o.pp && dp == o.dp && tp == o.tp; }
  std::string str() const;  // "ex=0 pp=1 dp=0 tp=1"
};

// Throws kraken::Error unless every size is ≥ 1 and they multiply to world_size.
void check_mesh_sizes(const MeshSizes& sizes, int world_size);
// The equations above. Ranks and coordinates out of range throw kraken::Error.
MeshCoords coords_of(int rank, const MeshSizes& sizes);
int rank_of(const MeshCoords& coords, const MeshSizes& sizes);

// Every group's name, in the order Mesh::build creates them.
const std::vector<std::string>& mesh_group_names();
// The world ranks of group `name` that contains `rank`, in group-rank order; empty when `rank` is in
// no such group (only "embedding", for the middle stages).
std::vector<int> mesh_group_ranks(const std::string& name, int rank, const MeshSizes& sizes);

class Mesh {
 public:
  // Collective over the world: builds every group once. Sizes must multiply to the world size; only
  // one Mesh may be alive at a time (build again after the previous one is gone).
  static std::unique_ptr<Mesh> build(World& world, const MeshSizes& sizes);
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  const MeshSizes& sizes() const { return sizes_; }
  const MeshCoords& coords() const { return coords_; }
  int rank() const { return rank_; }
  bool is_first_stage() const { return coords_.pp == 0; }
  bool is_last_stage() const { return coords_.pp == sizes_.pp - 1; }

  bool has_group(const std::string& name) const;
  // The group by name; an unknown name, or one this rank is not in, throws kraken::Error.
  Communicator& group(const std::string& name) const;
  Communicator& tp() const { return group("tp"); }
  Communicator& dp() const { return group("dp"); }
  Communicator& pp() const { return group("pp"); }
  Communicator& ex() const { return group("ex"); }
  Communicator& mp() const { return group("mp"); }

 private:
  Mesh() = default;
  MeshSizes sizes_;
  MeshCoords coords_;
  int rank_ = 0;
  std::map<std::string, std::unique_ptr<Communicator>> groups_;
};

}  // namespace kraken::parallel
