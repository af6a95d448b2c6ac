"""Which posts repeat the same content, and which posts must share a split?

Texts are compared as sets of cleaned words (ids). Exact duplicates share a
set; near-duplicates have a Jaccard similarity >= `threshold`. Near-duplicate
pairs are found by prefix filtering, which misses no pair: with words ordered
rarest first (document frequency over the distinct sets), two sets with
J >= t share a word among the first |s| - ceil(t |s|) + 1 words of each, so
only sets sharing such a prefix word (a block) are compared, and each
candidate is verified exactly. A block larger than `max_block` (a word common
enough to head many prefixes) is compared only with its 32 nearest sets in
size order; such blocks are counted in the stats.
Posts are then grouped: posts sharing an image (pixel hash) or a (near-)
duplicate text are connected, and a group is a connected component.
"""

import math

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

_PAIR_CHUNK = 200_000
_WINDOW = 32   # neighbours compared in a block over max_block


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
                         max_block: int = 2000) -> tuple[np.ndarray, dict]:
  """Distinct word sets [T, W] -> ([P, 2] pairs with Jaccard >= threshold, stats)."""
  sizes = np.diff(sets.indptr)
  t = len(sizes)
  df = np.bincount(sets.indices, minlength=sets.shape[1])
  rank = np.empty(sets.shape[1], np.int64)
  rank[np.lexsort((np.arange(sets.shape[1]), df))] = np.arange(sets.shape[1])
  rows = np.repeat(np.arange(t), sizes)
  order = np.lexsort((rank[sets.indices], rows))            # rarest first in each set
  pos = np.arange(len(order)) - sets.indptr[rows[order]]
  prefix = sizes - np.ceil(threshold * sizes - 1e-9).astype(np.int64) + 1
  keep = order[pos < prefix[rows[order]]]
  block_word, block_set = sets.indices[keep], rows[keep]
  by_block = np.lexsort((sizes[block_set], block_word))
  block_word, block_set = block_word[by_block], block_set[by_block]
  starts = np.flatnonzero(np.r_[True, block_word[1:] != block_word[:-1]])
  bounds = np.r_[starts, len(block_word)]
  found, buffer, stats = [], [], {"candidate_pairs": 0, "blocks_over_max_block": 0}

  def verify():
    c = np.concatenate(buffer)
    buffer.clear()
    small, large = np.sort(sizes[c], 1).T
    c = c[small >= threshold * large - 1e-9]                     # length filter
    inter = np.asarray(sets[c[:, 0]].multiply(sets[c[:, 1]]).sum(1)).ravel()
    union = sizes[c[:, 0]] + sizes[c[:, 1]] - inter
    stats["candidate_pairs"] += len(c)
    found.append(c[inter >= threshold * union - 1e-9])

  pending = 0
  for a, b in zip(bounds[:-1], bounds[1:]):
    m = b - a
    if m < 2:
      continue
    if m <= max_block:
      i, j = np.triu_indices(m, 1)
    else:   # a very common prefix word: only neighbours in size order
      stats["blocks_over_max_block"] += 1
      offsets = np.arange(1, min(_WINDOW, m - 1) + 1)
      i = np.concatenate([np.arange(m - k) for k in offsets])
      j = i + np.repeat(offsets, m - offsets)
    members = block_set[a:b]
    buffer.append(np.sort(np.stack([members[i], members[j]], 1), 1))
    pending += len(i)
    if pending >= _PAIR_CHUNK:
      verify()
      pending = 0
  if buffer:
    verify()
  found = (np.unique(np.concatenate(found), axis=0) if found
           else np.zeros([0, 2], np.int64))
  stats["near_duplicate_pairs"] = int(len(found))
  return found, stats


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
