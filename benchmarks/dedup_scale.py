"""How long does exact near-duplicate detection take on a big crawl?

  python benchmarks/dedup_scale.py [--posts=100000] [--threshold=0.8]

Synthetic texts: Zipf-distributed words (exponent 1.1) over a 50k-word
vocabulary, 4-25 words each; `--planted` of them are near-duplicates of an
earlier text (one word replaced, or one added); `--templates` share 8 of 10
very common words plus one word of their own, so a common word heads the
prefix of every one of them (one huge prefix block with real near-duplicate
pairs inside). Prints the wall time of input_pipeline.dedup (word sets, then
near_duplicate_pairs), the candidate and found pairs, whether every planted
pair was found, and the process's peak RSS.
"""

import resource
import time

import numpy as np
from absl import app, flags

from input_pipeline import dedup

flags.DEFINE_integer("posts", 100_000, "Number of texts.")
flags.DEFINE_integer("planted", 5_000, "Near-duplicates of earlier texts among them.")
flags.DEFINE_integer("templates", 5_000, "Texts of common words + one of their own.")
flags.DEFINE_float("threshold", 0.8, "Jaccard threshold.")
FLAGS = flags.FLAGS
VOCAB = 50_000


def corpus(rng, posts: int, planted: int, templates: int):
  """(lists of word ids, [planted, 2] (original, copy) text indices)."""
  p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
  plain = posts - planted - templates
  lengths = rng.integers(4, 26, plain)
  drawn = np.searchsorted(np.cumsum(p), rng.random(lengths.sum()) * p.sum())
  lists = np.split(np.minimum(drawn, VOCAB - 1), np.cumsum(lengths)[:-1])
  common = np.arange(10)                                  # the 10 most frequent words
  lists += [np.r_[rng.choice(common, 8, replace=False), VOCAB - 1 - i]
            for i in range(templates)]
  pairs = []
  for _ in range(planted):
    src = int(rng.integers(len(lists)))
    copy = np.unique(lists[src])
    if len(copy) >= 5 and rng.random() < 0.5:            # J = (n-1)/(n+1) >= 0.8 for n >= 9
      copy[rng.integers(len(copy))] = rng.integers(VOCAB)
    else:
      copy = np.r_[copy, rng.integers(VOCAB)]
    pairs.append((src, len(lists)))
    lists.append(copy)
  return lists, np.array(pairs)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  lists, planted = corpus(rng, FLAGS.posts, FLAGS.planted, FLAGS.templates)
  indptr = np.r_[0, np.cumsum([len(x) for x in lists])]
  words = np.concatenate(lists)
  t0 = time.perf_counter()
  set_of_post, sets = dedup.word_sets(indptr, words, VOCAB)
  t1 = time.perf_counter()
  pairs, stats = dedup.near_duplicate_pairs(sets, FLAGS.threshold)
  t2 = time.perf_counter()
  # A planted pair must be found when its two sets are distinct and similar enough.
  a, b = set_of_post[planted[:, 0]], set_of_post[planted[:, 1]]
  inter = np.array([len(np.intersect1d(lists[i], lists[j])) for i, j in planted])
  union = np.array([len(np.union1d(lists[i], lists[j])) for i, j in planted])
  due = (a != b) & (inter >= FLAGS.threshold * union - 1e-9)
  found = {tuple(p) for p in pairs.tolist()}
  missed = sum((min(x, y), max(x, y)) not in found for x, y in zip(a[due], b[due]))
  print(f"{len(lists):,} texts, {sets.shape[0]:,} distinct word sets; word sets "
        f"{t1 - t0:.1f}s, near-duplicate pairs {t2 - t1:.1f}s: "
        f"{stats['candidate_pairs']:,} candidates verified, "
        f"{stats['near_duplicate_pairs']:,} pairs with J >= {FLAGS.threshold}; "
        f"planted pairs due {int(due.sum()):,}, missed {missed}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
