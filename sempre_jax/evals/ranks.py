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
                       scores), at any scale, both ways at once: the queries
                       among the candidates and each candidate among the
                       queries (the transposed ground truths: user->text from
                       the text->user scores), from one pass over the scores.
                       Candidates are split over the devices of the mesh and
                       scanned in chunks; queries stream from the host (NumPy,
                       or rows read from disk) in blocks replicated to every
                       device; per device memory is O(query_chunk x
                       candidate_chunk + C / devices x D). The ground truths'
                       scores are direct dot products, taken in a first pass
                       (a candidate's best ground truth may be in any query
                       block); candidates are scored by a float32 matmul at
                       full precision; as the two float32 evaluations of one
                       dot product differ by up to ~1e-6 (measured: 7.7e-7 at
                       D = 1024), a score within `tie_tolerance` (default
                       1e-5; embeddings are L2-normalised, scores lie in
                       [-1, 1]) of the best ground truth's is a tie. Ground
                       truths are excluded from the counts by identity, not by
                       score.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.special import gammaln

from input_pipeline import progress
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

  def transpose(self, num_candidates: int) -> tuple["GroundTruth", np.ndarray]:
    """(the ground-truth queries of each of the candidates, as CSR; `order`
    [nnz]: entry e of the transpose is entry order[e] of this one)."""
    order = np.argsort(self.indices, kind="stable")
    queries = np.repeat(np.arange(len(self)), self.counts())[order]
    counts = np.bincount(self.indices, minlength=num_candidates)
    return GroundTruth(np.r_[0, np.cumsum(counts)].astype(np.int64), queries), order

  def width(self, start: int, stop: int) -> int:
    """The padded width of queries start..stop: their most ground truths,
    rounded up to a power of two (few widths, so few compilations)."""
    return 1 << int(max(self.counts(start, stop).max(initial=1), 1) - 1).bit_length()

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


def _best_of(scores: np.ndarray, offsets: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
  """Per CSR row of float32 `scores`: (the best score, the scores >= best - tol);
  (+inf, 0) for an empty row. float32 arithmetic, as on the devices."""
  counts = np.diff(offsets)
  full = counts > 0
  best = np.full(len(counts), np.inf, np.float32)
  tied = np.zeros(len(counts), np.int64)
  if full.any():
    best[full] = np.maximum.reduceat(scores, offsets[:-1][full])
    within = scores >= np.repeat(best, counts) - np.float32(tol)
    tied[full] = np.add.reduceat(within.astype(np.int64), offsets[:-1][full])
  return best, tied


class ExactRanker:
  """Ranks between queries and candidates, both ways, on all devices.

  Built once per run: its compiled functions depend only on shapes (one
  compilation per power-of-two bucket of ground truths per query and per
  number of candidates), so every call with new embeddings reuses them.
  `both(queries, candidates, gts)` ranks the Q queries among the C candidates
  and each candidate among the queries (a candidate's ground truths: the
  queries that have it as one), in two passes over blocks of query_chunk
  queries:

    1. the ground truths' scores (direct dot products, [q, G] per block) ->
       each query's and each candidate's best ground-truth score and its
       tied ground truths, on the host;
    2. S = block @ candidates.T, chunk by chunk on every device; per query
       (summed over the mesh) and per candidate (kept on its device across
       blocks): the other scores above best + tol and within tol of best.

  Every block's results are read before the next block is dispatched: on
  several CPU devices two computations with collectives in flight can
  deadlock (see sempre_jax/train.py).
  """

  def __init__(self, mesh: Mesh, *, query_chunk: int = 1024, candidate_chunk: int = 4096,
               tie_tolerance: float = TIE_TOLERANCE):
    if not (0 < query_chunk < 1 << 16 and 0 < candidate_chunk < 1 << 16):
      raise ValueError(f"query_chunk ({query_chunk}) and candidate_chunk ({candidate_chunk}) "
                       "must lie in [1, 65535]")
    self.mesh, self.query_chunk, self.candidate_chunk = mesh, query_chunk, candidate_chunk
    self.tol = tie_tolerance
    shard = lambda f, ins, outs: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=ins,
                                                       out_specs=outs))
    self._direct = shard(self._direct_per_device, (P(), P(), P(AXIS)), P())
    self._count = shard(self._count_per_device,
                        (P(), P(), P(), P(AXIS), P(AXIS), P(), P(AXIS), P(AXIS)),
                        (P(), P(), P(AXIS), P(AXIS)))
    self._pad = jax.jit(lambda c, extra: jnp.pad(c.astype(jnp.float32), ((0, extra), (0, 0))),
                        static_argnums=1, out_shardings=NamedSharding(mesh, P(AXIS)))

  def __call__(self, queries, candidates, gts: GroundTruth) -> Ranks:
    """The ranks of the queries among the candidates (`both`'s first half)."""
    return self.both(queries, candidates, gts)[0]

  def both(self, queries, candidates, gts: GroundTruth) -> tuple[Ranks, Ranks]:
    """queries [Q, D] (host rows: NumPy, or anything with .shape and row
    slices, e.g. embeddings on disk), candidates [C, D] (NumPy or a global
    array), gts: the ground truths of the Q queries -> (Ranks [Q] of the
    queries among the candidates, Ranks [C] of each candidate among the
    queries; zeros for a candidate that is no query's ground truth)."""
    if len(gts) != queries.shape[0]:
      raise ValueError(f"{queries.shape[0]} queries but {len(gts)} ground-truth sets")
    if len(gts) and gts.counts().min() == 0:
      raise ValueError("every query needs at least one ground truth")
    num = candidates.shape[0]
    if not len(gts):
      return Ranks.of([], [], []), Ranks.of(*np.zeros([3, num], np.int64))
    cands = self._place(candidates)
    put = functools.partial(mesh_lib.put_global, self.mesh)
    # Pass 1: the ground truths' scores, in the order of gts.indices.
    scores = np.concatenate([
        mesh_lib.to_host(self._direct(block, put(gt), cands))[gt >= 0]
        for _, _, block, gt in self._blocks(queries, gts)])
    best, tied_gts = _best_of(scores, gts.offsets, self.tol)
    transposed, order = gts.transpose(num)
    cand_best, cand_tied_gts = _best_of(scores[order], transposed.offsets, self.tol)
    # Pass 2: the counts.
    padding = cands.shape[0] - num
    cand_best = put(np.pad(cand_best, (0, padding), constant_values=np.inf), P(AXIS))
    cand_counts = [put(np.zeros(cands.shape[0], np.int32), P(AXIS))] * 2
    bar = progress.bar(len(gts), f"ranking {len(gts):,} x {num:,} both ways", "queries",
                       delay=10, disable=jax.process_index() > 0)
    num, above, tied = put(np.int32(num)), [], []
    for start, stop, block, gt in self._blocks(queries, gts):
      block_best = np.pad(best[start:stop], (0, self.query_chunk - (stop - start)))
      a, t, *cand_counts = self._count(block, put(gt), put(block_best), cands, cand_best, num,
                                       *cand_counts)
      a, t = mesh_lib.to_host((a, t))
      above.append(a[:stop - start])
      tied.append(t[:stop - start])
      bar.update(stop - start)
    bar.close()
    cand_above, cand_tied = (multihost_utils.process_allgather(c, tiled=True)[:len(cand_tied_gts)]
                             for c in cand_counts)
    return (Ranks.of(np.concatenate(above), np.concatenate(tied), tied_gts),
            Ranks.of(cand_above, cand_tied, cand_tied_gts))

  def _place(self, candidates) -> jax.Array:
    """[C, D] -> float32 [devices x c, D] split over the mesh (zero rows
    appended): c = n x chunk rows per device, n = ceil(C / devices /
    candidate_chunk) scan steps of equal chunks, multiples of 16 where
    candidate_chunk allows (little padding, aligned rows)."""
    n_dev = self.mesh.devices.size
    per_device = max(-(-candidates.shape[0] // n_dev), 1)
    n = -(-per_device // self.candidate_chunk)
    chunk = min(mesh_lib.round_up(-(-per_device // n), 16), self.candidate_chunk)
    extra = n_dev * n * chunk - candidates.shape[0]
    if isinstance(candidates, jax.Array):
      return self._pad(candidates, extra)
    return mesh_lib.put_global(
        self.mesh, np.pad(np.asarray(candidates, np.float32), ((0, extra), (0, 0))), P(AXIS))

  def _blocks(self, queries, gts: GroundTruth):
    """Per block of query_chunk queries: (start, stop, the queries [q, D]
    replicated on the mesh, zero rows after stop; their ground truths [q, G]
    int32, -1 pads, G = gts.width)."""
    q = self.query_chunk
    for start in range(0, len(gts), q):
      stop = min(start + q, len(gts))
      block = np.zeros([q, queries.shape[1]], np.float32)
      block[:stop - start] = queries[start:stop]
      gt = gts.padded(start, stop, q, gts.width(start, stop)).astype(np.int32)
      yield start, stop, mesh_lib.put_global(self.mesh, block), gt

  def _direct_per_device(self, queries, gt, cands):
    """queries [q, D], gt [q, G] (global candidate ids, -1 pads), cands [c, D]
    (this device's) -> [q, G] the ground truths' scores (-inf at pads)."""
    c = cands.shape[0]
    local = gt - jax.lax.axis_index(AXIS) * c
    mine = (gt >= 0) & (local >= 0) & (local < c)
    direct = jax.lax.map(lambda col: jnp.sum(queries * cands[col], axis=-1),
                         jnp.clip(local, 0, c - 1).T, batch_size=min(gt.shape[1], 16)).T
    return jax.lax.pmax(jnp.where(mine, direct, -jnp.inf), AXIS)

  def _count_per_device(self, queries, gt, best, cands, cand_best, num, cand_above, cand_tied):
    """queries [q, D], gt [q, G], best [q] (each query's best ground-truth
    score), cands [c, D] and cand_best [c] (this device's; +inf: no ground
    truth, or padding), num: C, cand_above / cand_tied [c] (this device's
    counts so far) -> (above [q], tied [q]) summed over the mesh, and the
    candidates' counts with this block's added. Rows without a ground truth
    (padding) count for no candidate.

    Each score is compared once per direction into one uint32, above + 2^16 x
    tied, and summed (fewer passes over the [q, chunk] scores: XLA:CPU writes
    each summand array out); the sums split back exactly while each counts
    fewer than 2^16 scores (query_chunk and the scan chunk, checked in __init__).
    """
    c, tol = cands.shape[0], self.tol
    n = -(-c // self.candidate_chunk)
    chunk = c // n
    real = (gt >= 0).any(axis=1)[:, None]

    def packed(s, best, keep):
      return jnp.where(keep, (s > best + tol).astype(jnp.uint32)
                       + ((jnp.abs(s - best) <= tol).astype(jnp.uint32) << 16), 0)

    def split(sums):
      return (sums & 0xFFFF).astype(jnp.int32), (sums >> 16).astype(jnp.int32)

    def body(carry, xs):
      block, block_best, start = xs
      s = jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)   # [q, chunk]
      other = (((start + jnp.arange(chunk)) < num)[None, :]
               & ~_ground_truth_mask(gt, start, chunk))
      above, tied = split(jnp.sum(packed(s, best[:, None], other), axis=1))
      return ((carry[0] + above, carry[1] + tied),
              split(jnp.sum(packed(s, block_best[None, :], other & real), axis=0)))

    starts = jax.lax.axis_index(AXIS) * c + chunk * jnp.arange(n)
    zeros = jax.lax.pcast(jnp.zeros(queries.shape[0], jnp.int32), AXIS, to="varying")
    (above, tied), (a, t) = jax.lax.scan(
        body, (zeros, zeros), (cands.reshape(n, chunk, -1), cand_best.reshape(n, chunk), starts))
    return (jax.lax.psum(above, AXIS), jax.lax.psum(tied, AXIS),
            cand_above + a.reshape(c), cand_tied + t.reshape(c))
