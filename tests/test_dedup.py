"""Near-duplicate texts (input_pipeline/dedup.py) against brute-force Jaccard."""

import numpy as np
import pytest

from input_pipeline import dedup


def brute_force_pairs(sets, threshold):
  """[P, 2] (i < j) with |i & j| >= threshold |i | j|, from every pair's overlap."""
  a = sets.astype(np.int32)
  inter = (a @ a.T).toarray()
  size = np.diff(sets.indptr)
  union = size[:, None] + size[None, :] - inter
  i, j = np.nonzero(np.triu(inter >= threshold * union - 1e-9, 1))
  return np.stack([i, j], 1)


def sets_of(lists, num_words):
  indptr = np.r_[0, np.cumsum([len(x) for x in lists])]
  return dedup.word_sets(indptr, np.concatenate(lists), num_words)


def test_every_pair_of_an_oversized_block_is_found():
  """2,100 texts of word A, 7 of 8 common words and a word of their own: A is
  the rarest word they share, so it heads all their prefixes (one block, over
  the former cut at 2,000 sets), and texts with the same 7 common words are
  near-duplicates (J = 8/10). Around them, 600 texts of the 8 common words and
  one more (which makes them more common than A), Zipf texts, and planted
  near-duplicates of those (a word added)."""
  rng = np.random.default_rng(0)
  vocab, zipf_vocab = 5000, 2800
  common, word_a = np.arange(8), vocab - 1
  template = [np.r_[word_a, rng.choice(common, 7, replace=False), vocab - 2 - i]
              for i in range(2100)]
  filler = [np.r_[common, rng.integers(8, zipf_vocab)] for _ in range(600)]
  p = 1.0 / np.arange(1, zipf_vocab + 1) ** 1.1
  plain = [rng.choice(zipf_vocab, n, p=p / p.sum()) for n in rng.integers(3, 15, 600)]
  sources = rng.integers(0, 600, 150)
  planted = [np.r_[plain[i], rng.integers(zipf_vocab)] for i in sources]
  set_of_post, sets = sets_of(template + filler + plain + planted, vocab)
  df = np.bincount(sets.indices, minlength=vocab)
  assert df[word_a] == 2100 and (df[common] > df[word_a]).all()
  assert len(np.unique(set_of_post[:2100])) == 2100

  got, stats = dedup.near_duplicate_pairs(sets, 0.8)
  want = brute_force_pairs(sets, 0.8)
  np.testing.assert_array_equal(got, want)
  assert stats["near_duplicate_pairs"] == len(want)
  inside = np.isin(want, set_of_post[:2100]).all(axis=1)
  assert inside.sum() > 200_000                     # ~C(2100, 2) / 8 pairs in the block
  # Every planted copy still similar enough to its source is found.
  found = set(map(tuple, got.tolist()))
  due = 0
  for k, i in enumerate(sources):
    a, b = set_of_post[2700 + i], set_of_post[3300 + k]
    x, y = set(plain[i].tolist()), set(planted[k].tolist())
    if a != b and len(x & y) >= 0.8 * len(x | y):
      due += 1
      assert (min(a, b), max(a, b)) in found
  assert due > 50


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 1.0])
def test_random_corpora_match_brute_force(threshold):
  """Small vocabularies (many shared words), sizes 1-12, near-copies, and
  chunks of a few candidates (every chunk boundary case)."""
  rng = np.random.default_rng(int(threshold * 10))
  for _ in range(6):
    n, vocab = int(rng.integers(50, 300)), int(rng.integers(5, 60))
    lists = [rng.choice(vocab, min(int(k), vocab), replace=False)
             for k in rng.integers(1, 13, n)]
    lists += [np.unique(np.r_[lists[i], rng.integers(0, vocab, 1)])
              for i in rng.integers(0, n, n // 5)]
    _, sets = sets_of(lists, vocab)
    got, stats = dedup.near_duplicate_pairs(sets, threshold,
                                            pair_chunk=int(rng.integers(1, 400)))
    np.testing.assert_array_equal(got, brute_force_pairs(sets, threshold))
    assert stats["candidate_pairs"] >= len(got)


def test_threshold_out_of_range_is_refused():
  _, sets = sets_of([np.array([0, 1])], 2)
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="threshold"):
      dedup.near_duplicate_pairs(sets, bad)
