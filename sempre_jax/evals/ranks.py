"""Where does each query's ground truth rank among all candidates, exactly?

The rank of a query's ground truth is 1 + the number of candidates scoring
above it, counted over every candidate (no sampling, no sorting). A query may
have several ground truths; the best-scored one counts. Ties are counted one
way, everywhere: as the expectation under random tie-breaking. Each query gives
`Ranks` (above, t, g): `above` candidates score above the best ground truth,
t other candidates are tied with it, and g ground truths are tied at the best
score. The best ground truth then lands at 1 + above + M, M the smallest
position of g ground truths shuffled among t + g tied items, so

    rank (expected)   = 1 + above + t / (g + 1)          E[M] = (t + g + 1) / (g + 1)
    P(rank <= K)      = P(M <= k) = 1 - C(t, k) / C(t + g, k),   k = K - above

(0 for k <= 0, 1 for k > t: hypergeometric, the first k tied positions all go
to other candidates with probability C(t, k) / C(t + g, k)). R@K is the mean
of P(rank <= K) over queries, the exact expected recall; a query with 29 other
candidates tied with its one ground truth at the top has R@10 = 10/30. Median
rank is the median of the expected ranks (not the expected median); mean rank
is exact. Ranks are fractional only when there are ties.

Two ways in:
  `ranks_from_scores`  an explicit score matrix [Q, C] (the oracle, small
                       tasks): ties are exact equality.
  `ExactRanker`        query and candidate embeddings [*, D] (dot-product
                       scores), at any scale: candidates are split over the
                       devices of the mesh and scanned in chunks, queries come
                       in chunks; per device memory is O(query_chunk x
                       candidate_chunk + C / devices x D). The best ground
                       truth's score is a direct dot product, candidates are
                       scored by a float32 matmul at full precision; as the two
                       float32 evaluations of one dot product differ by up to
                       ~1e-6 (measured: 7.7e-7 at D = 1024), a candidate within
                       `tie_tolerance` (default 1e-5; embeddings are
                       L2-normalised, scores lie in [-1, 1]) of the best
                       ground truth's score is a tie. Ground truths are
                       excluded from the counts by identity, not by score.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.special import gammaln

from sempre_jax import mesh as mesh_lib

TIE_TOLERANCE = 1e-5
AXIS = mesh_lib.AXIS


@dataclasses.dataclass(frozen=True)
class Ranks:
  """Per query [Q] (int64): candidates above the best ground truth, other
  candidates tied with it, ground truths tied at the best score (>= 1)."""
  above: np.ndarray
  tied: np.ndarray
  tied_gts: np.ndarray

  @classmethod
  def of(cls, above, tied, tied_gts) -> "Ranks":
    return cls(*(np.asarray(x, np.int64).reshape(-1) for x in (above, tied, tied_gts)))

  @classmethod
  def concatenate(cls, parts: Sequence["Ranks"]) -> "Ranks":
    if not parts:
      return cls.of([], [], [])
    return cls(*(np.concatenate(x) for x in zip(*(dataclasses.astuple(p) for p in parts))))

  def __len__(self) -> int:
    return len(self.above)

  def __getitem__(self, index) -> "Ranks":
    """The queries selected by `index` (a slice, indices or a boolean mask)."""
    return Ranks(self.above[index], self.tied[index], self.tied_gts[index])

  @property
  def rank(self) -> np.ndarray:
    """[Q] expected rank under random tie-breaking: 1 + above + t / (g + 1)."""
    return 1.0 + self.above + self.tied / (self.tied_gts + 1.0)

  def recall_at(self, k: int) -> np.ndarray:
    """[Q] P(rank <= k) under random tie-breaking: 1 - C(t, j) / C(t + g, j),
    j = k - above clipped to [0, t + 1] (float64, via log-gamma)."""
    t, g = self.tied.astype(np.float64), self.tied_gts.astype(np.float64)
    j = np.clip(k - self.above, 0, self.tied + 1).astype(np.float64)
    inside = j <= t
    jj = np.where(inside, j, 0.0)
    log_miss = (gammaln(t + 1) - gammaln(t - jj + 1)
                - gammaln(t + g + 1) + gammaln(t + g - jj + 1))
    return np.where(inside, 1.0 - np.exp(log_miss), 1.0)


# --------------------------------------------------------- ground truths --

@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """The ground-truth candidates of each query, as CSR: query q's are
  indices[offsets[q]:offsets[q + 1]] (sorted, unique)."""
  offsets: np.ndarray   # [Q + 1] int64
  indices: np.ndarray   # [nnz] int64

  @classmethod
  def single(cls, targets: Sequence[int]) -> "GroundTruth":
    """One ground truth per query: targets [Q]."""
    targets = np.asarray(targets, np.int64)
    return cls(np.arange(len(targets) + 1, dtype=np.int64), targets)

  @classmethod
  def from_pairs(cls, queries: np.ndarray, candidates: np.ndarray,
                 num_queries: int) -> "GroundTruth":
    """(query, candidate) pairs, any order, repeats allowed."""
    pairs = np.unique(np.stack([np.asarray(queries, np.int64),
                                np.asarray(candidates, np.int64)], 1).reshape(-1, 2), axis=0)
    counts = np.bincount(pairs[:, 0], minlength=num_queries)
    return cls(np.r_[0, np.cumsum(counts)].astype(np.int64), pairs[:, 1])

  @classmethod
  def from_lists(cls, lists: Sequence[Sequence[int]]) -> "GroundTruth":
    queries = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
    cands = np.concatenate([np.asarray(x, np.int64) for x in lists]) if lists else []
    return cls.from_pairs(queries, cands, len(lists))

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """[stop - start] number of ground truths of queries start..stop (all by default)."""
    stop = len(self) if stop is None else stop
    return np.diff(self.offsets[start:stop + 1])

  def padded(self, start: int, stop: int, rows: int, width: int) -> np.ndarray:
    """[rows, width] ground truths of queries start..stop, each row sorted,
    -1 in front as padding (rows past stop are all -1)."""
    out = np.full([rows, width], -1, np.int64)
    counts = self.counts(start, stop)
    row = np.repeat(np.arange(stop - start), counts)
    col = width - counts[row] + (np.arange(len(row)) - np.repeat(
        np.r_[0, np.cumsum(counts)[:-1]], counts))
    out[row, col] = self.indices[self.offsets[start]:self.offsets[stop]]
    return out


# -------------------------------------------------------- explicit scores --

@jax.jit
def _counts_from_scores(scores, gt_mask):
  best = jnp.max(jnp.where(gt_mask, scores, -jnp.inf), axis=1, keepdims=True)
  tied = scores == best
  return (jnp.sum((scores > best) & ~gt_mask, axis=1),
          jnp.sum(tied & ~gt_mask, axis=1), jnp.sum(tied & gt_mask, axis=1))


def ranks_from_scores(scores: np.ndarray, gts: GroundTruth, chunk: int = 1024) -> Ranks:
  """Ranks from an explicit score matrix [Q, C] (exact ties), in query chunks."""
  out = []
  for start in range(0, len(gts), chunk):
    stop = min(start + chunk, len(gts))
    mask = np.zeros([stop - start, scores.shape[1]], bool)
    counts = gts.counts(start, stop)
    mask[np.repeat(np.arange(stop - start), counts),
         gts.indices[gts.offsets[start]:gts.offsets[stop]]] = True
    out.append(Ranks.of(*_counts_from_scores(scores[start:stop], mask)))
  return Ranks.concatenate(out)


# ------------------------------------------------------------- embeddings --

def _ground_truth_mask(gt, start, size):
  """gt [q, G] candidate ids -> [q, size]: is candidate start + j a ground truth
  of query i? (a scatter of the q x G ids, not a search per candidate)."""
  local = gt - start
  local = jnp.where((gt >= 0) & (local >= 0) & (local < size), local, size)   # size: dropped
  rows = jnp.broadcast_to(jnp.arange(gt.shape[0])[:, None], gt.shape)
  return jnp.zeros((gt.shape[0], size), bool).at[rows, local].set(True, mode="drop")


class ExactRanker:
  """Ranks of ground truths among fixed candidates [C, D], on all devices.

  The candidates are padded and split over the mesh; each call ranks a block
  of queries [<= query_chunk, D] (replicated to every device): each device
  scores its candidates chunk by chunk, and the counts are summed over the
  mesh. One compilation per power-of-two bucket of ground truths per query.
  """

  def __init__(self, mesh: Mesh, candidates, *, query_chunk: int = 1024,
               candidate_chunk: int = 4096, tie_tolerance: float = TIE_TOLERANCE):
    n_dev = mesh.devices.size
    self.mesh, self.query_chunk, self.tol = mesh, query_chunk, tie_tolerance
    self.num_candidates, self.dim = candidates.shape
    per_device = -(-self.num_candidates // n_dev)
    self.chunk = min(candidate_chunk, max(per_device, 1))
    self.padded = n_dev * mesh_lib.round_up(per_device, self.chunk)
    extra = self.padded - self.num_candidates
    sharding = NamedSharding(mesh, P(AXIS))
    if isinstance(candidates, jax.Array):
      self.candidates = jax.jit(lambda c: jnp.pad(c.astype(jnp.float32), ((0, extra), (0, 0))),
                                out_shardings=sharding)(candidates)
    else:
      self.candidates = mesh_lib.put_global(
          mesh, np.pad(np.asarray(candidates, np.float32), ((0, extra), (0, 0))), P(AXIS))
    self._fns = {}

  def _fn(self, width: int):
    if width not in self._fns:
      self._fns[width] = jax.jit(jax.shard_map(
          self._per_device, mesh=self.mesh, in_specs=(P(), P(), P(AXIS)), out_specs=P()))
    return self._fns[width]

  def _per_device(self, queries, gt, cands):
    """queries [q, D], gt [q, G] (global ids, sorted, -1 pads), cands [c, D]
    (this device's) -> (above, tied others, tied ground truths): [q] each."""
    c, tol = cands.shape[0], self.tol
    base = jax.lax.axis_index(AXIS) * c
    local = gt - base
    mine = (gt >= 0) & (local >= 0) & (local < c)
    local = jnp.clip(local, 0, c - 1)
    direct = jax.lax.map(lambda col: jnp.sum(queries * cands[col], axis=-1), local.T,
                         batch_size=min(gt.shape[1], 16)).T        # [q, G]
    direct = jnp.where(mine, direct, -jnp.inf)
    best = jax.lax.pmax(jnp.max(direct, axis=1), AXIS)          # [q]
    tied_gts = jax.lax.psum(jnp.sum(direct >= best[:, None] - tol, axis=1), AXIS)

    def body(carry, xs):
      above, tied = carry
      block, start = xs
      s = jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)   # [q, chunk]
      ids = start + jnp.arange(self.chunk)
      other = (ids < self.num_candidates)[None, :] & ~_ground_truth_mask(gt, start, self.chunk)
      above += jnp.sum(other & (s > best[:, None] + tol), axis=1)
      tied += jnp.sum(other & (jnp.abs(s - best[:, None]) <= tol), axis=1)
      return (above, tied), None

    n = c // self.chunk
    starts = base + self.chunk * jnp.arange(n)
    zeros = jax.lax.pcast(jnp.zeros(queries.shape[0], jnp.int32), AXIS, to="varying")
    (above, tied), _ = jax.lax.scan(
        body, (zeros, zeros), (cands.reshape(n, self.chunk, -1), starts))
    return jax.lax.psum(above, AXIS), jax.lax.psum(tied, AXIS), tied_gts

  def __call__(self, queries, gts: GroundTruth) -> Ranks:
    """queries [Q, D] (NumPy or a global array), gts of the Q queries -> their Ranks."""
    if len(gts) != queries.shape[0]:
      raise ValueError(f"{queries.shape[0]} queries but {len(gts)} ground-truth sets")
    if len(gts) and gts.counts().min() == 0:
      raise ValueError("every query needs at least one ground truth")
    out = []
    for start in range(0, len(gts), self.query_chunk):
      stop = min(start + self.query_chunk, len(gts))
      out.append(self.rank_block(queries[start:stop], gts, start, stop))
    return Ranks.concatenate(out)

  def rank_block(self, queries, gts: GroundTruth, start: int, stop: int) -> Ranks:
    """Ranks of queries start..stop of `gts`, whose embeddings are `queries`."""
    q = self.query_chunk
    width = 1 << int(max(gts.counts(start, stop).max(), 1) - 1).bit_length()
    gt = gts.padded(start, stop, q, width)
    if isinstance(queries, jax.Array):
      queries = jnp.pad(queries.astype(jnp.float32), ((0, q - (stop - start)), (0, 0)))
    else:
      queries = mesh_lib.put_global(self.mesh, np.pad(
          np.asarray(queries, np.float32), ((0, q - (stop - start)), (0, 0))))
    counts = self._fn(width)(queries, mesh_lib.put_global(self.mesh, gt.astype(np.int32)),
                             self.candidates)
    return Ranks.of(*mesh_lib.to_host(counts))[:stop - start]
