"""Which posts repeat the same content, and which posts must share a split?

Texts are compared as sets of cleaned words (ids). Exact duplicates share a
set; near-duplicates have a Jaccard similarity J = |x & y| / |x | y| >= t
(`threshold`, 0 < t <= 1). Every such pair is found (an exact all-pairs
similarity join, no sampling, no block cut), by prefix filtering with the
asymmetric prefixes of PPJoin (Xiao et al. 2008): with words ordered rarest
first (document frequency over the distinct sets) and sets ordered by size,
a pair y before x (|y| <= |x|) has J >= t only if |y| >= t |x| and they share
o >= t (|x| + |y|) / (1 + t) words, so their first common word lies among the
first |x| - ceil(t |x|) + 1 words of x (its probe prefix) and the first
|y| - ceil(2t / (1 + t) |y|) + 1 words of y (its index prefix). Candidates are
the pairs sharing a word of x's probe prefix and y's index prefix within that
size window, counted by sparse products of the prefix incidence matrices in
chunks of x (memory bounded by `pair_chunk` candidates), and each is verified
exactly. The work is the number of candidates, not a block's square.
Posts are then grouped: posts sharing an image (pixel hash) or a (near-)
duplicate text are connected, and a group is a connected component.
"""

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

_PAIR_CHUNK = 2_000_000   # candidate pairs counted and verified at a time


def word_sets(indptr: np.ndarray, word_ids: np.ndarray, num_words: int):
  """Per-post word lists (CSR) -> (set_of_post [N], set_matrix [T, W] binary csr).

  set_of_post is the index of the post's distinct word set, -1 when empty.
  """
  n = len(indptr) - 1
  rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
  key = np.unique(rows * num_words + word_ids.astype(np.int64))
  rows, cols = key // num_words, key % num_words
  posts = sparse.csr_matrix((np.ones(len(key), np.int8), (rows, cols)),
                            shape=(n, num_words))
  # A set's key: the sum of random 64-bit values of its words (no collisions in practice).
  salt = np.random.default_rng(0).integers(0, 2**63, num_words, dtype=np.uint64)
  with np.errstate(over="ignore"):
    set_key = np.zeros(n, np.uint64)
    np.add.at(set_key, rows, salt[cols])
  nonempty = np.flatnonzero(np.diff(posts.indptr) > 0)
  _, first, inverse = np.unique(set_key[nonempty], return_index=True,
                                return_inverse=True)
  set_of_post = np.full(n, -1, np.int64)
  set_of_post[nonempty] = inverse.ravel()
  return set_of_post, posts[nonempty[first]]


def near_duplicate_pairs(sets: sparse.csr_matrix, threshold: float = 0.8,
                         pair_chunk: int = _PAIR_CHUNK) -> tuple[np.ndarray, dict]:
  """Distinct word sets [T, W] (binary csr) -> ([P, 2] pairs (i < j) with
  Jaccard >= threshold, stats: candidate_pairs verified, near_duplicate_pairs)."""
  if not 0 < threshold <= 1:
    raise ValueError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
  t, eps = threshold, 1e-9
  sizes = np.diff(sets.indptr)
  num_sets, num_words = sets.shape
  if num_sets == 0:
    return np.zeros([0, 2], np.int64), {"candidate_pairs": 0, "near_duplicate_pairs": 0}
  # Rows in size order (r = 0..T-1), each row's words rarest first.
  by_size = np.lexsort((np.arange(num_sets), sizes))
  where = np.empty(num_sets, np.int64)
  where[by_size] = np.arange(num_sets)
  df = np.bincount(sets.indices, minlength=num_words)
  word_rank = np.empty(num_words, np.int64)
  word_rank[np.lexsort((np.arange(num_words), df))] = np.arange(num_words)
  rows = np.repeat(np.arange(num_sets), sizes)
  order = np.lexsort((word_rank[sets.indices], rows))
  position = np.empty(len(order), np.int64)
  position[order] = np.arange(len(order)) - sets.indptr[rows[order]]
  probe_len = sizes - np.ceil(t * sizes - eps).astype(np.int64) + 1
  index_len = sizes - np.ceil(2 * t / (1 + t) * sizes - eps).astype(np.int64) + 1

  def prefix(length):      # [T, W] incidence of each row's first `length` words
    first = position < length[rows]
    return sparse.csr_matrix((np.ones(int(first.sum()), np.float32),
                              (where[rows[first]], sets.indices[first])),
                             shape=(num_sets, num_words))

  probe, index = prefix(probe_len), prefix(index_len)
  size = sizes[by_size]                                       # [T] in size order
  # Chunks of probe rows with about pair_chunk candidates each (an upper bound:
  # pairs sharing a probe word of x and an index word of y, any sizes).
  per_row = probe @ np.asarray(index.sum(axis=0), np.float64).ravel()
  total = np.cumsum(per_row)
  cuts = np.searchsorted(total, pair_chunk * np.arange(1, total[-1] // pair_chunk + 1))
  bounds = np.unique(np.r_[0, cuts, num_sets])
  found, stats = [], {"candidate_pairs": 0}
  for a, b in zip(bounds[:-1], bounds[1:]):
    lo = int(np.searchsorted(size, t * size[a] - eps))       # smallest |y| >= t |x|
    shared = (probe[a:b] @ index[lo:b].T).tocoo()
    x, y = a + shared.row, lo + shared.col
    keep = (y < x) & (size[y] >= t * size[x] - eps)
    x, y = by_size[x[keep]], by_size[y[keep]]
    inter = np.asarray(sets[x].multiply(sets[y]).sum(axis=1)).ravel()
    union = sizes[x] + sizes[y] - inter
    hit = inter >= t * union - eps
    stats["candidate_pairs"] += int(len(x))
    found.append(np.sort(np.stack([x[hit], y[hit]], 1), axis=1))
  found = (np.unique(np.concatenate(found), axis=0) if found
           else np.zeros([0, 2], np.int64))
  stats["near_duplicate_pairs"] = int(len(found))
  return found.astype(np.int64), stats


def group_posts(image_of_post: np.ndarray, set_of_post: np.ndarray,
                num_sets: int, set_pairs: np.ndarray) -> np.ndarray:
  """[N] group id per post: components linked by shared images or near-duplicate texts."""
  n = len(image_of_post)
  num_images = int(image_of_post.max(initial=-1)) + 1
  img_node = n + np.maximum(image_of_post, 0)
  set_node = n + num_images + np.maximum(set_of_post, 0)
  has_img, has_set = image_of_post >= 0, set_of_post >= 0
  src = np.concatenate([np.flatnonzero(has_img), np.flatnonzero(has_set),
                        n + num_images + set_pairs[:, 0]])
  dst = np.concatenate([img_node[has_img], set_node[has_set],
                        n + num_images + set_pairs[:, 1]])
  size = n + num_images + num_sets
  graph = sparse.coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(size, size))
  _, labels = csgraph.connected_components(graph, directed=False)
  return labels[:n]
