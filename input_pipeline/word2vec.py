"""Where do the initial word and user embeddings come from?

As in the paper (section 4.3): Word2Vec (gensim, skip-gram) trained on the
cleaned training texts initialises the text encoder's word embeddings, and
each user starts at the mean of the word vectors of the words of their
training posts. Written to the data directory as `word2vec_init.npz`:
words [V, dim] (row i = vocabulary id i; <pad> is zero, <unk> and words
gensim did not keep get the mean vector) and users [U, dim] (users without
a vocabulary word in training get the mean vector).
"""

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import sparse

INIT_FILE = "word2vec_init.npz"


def train(sentences: Iterable[Sequence[str]], dim: int = 300, epochs: int = 5, seed: int = 0):
  """Skip-gram Word2Vec (a gensim model) on a restartable iterable of word lists.

  Deterministic: the same sentences and seed give the same vectors in any
  process. One worker thread (gensim's threads take jobs in a racy order) and a
  hash of words that Python's per-process salt does not change.
  """
  import gensim   # imported here: readers of INIT_FILE need no gensim
  return gensim.models.Word2Vec(sentences=sentences, vector_size=dim, window=5,
                                min_count=1, sg=1, epochs=epochs, workers=1,
                                seed=seed, hashfxn=_stable_hash)


def _stable_hash(word: str) -> int:
  return zlib.crc32(word.encode("utf-8"))


def word_matrix(model, vocab: Sequence[str]) -> np.ndarray:
  """[V, dim] vectors in vocabulary order (row 0 <pad> = 0; unknown -> mean)."""
  kv = model.wv
  mean = kv.vectors.mean(0) if len(kv) else np.zeros(kv.vector_size, np.float32)
  out = np.stack([kv[w] if w in kv.key_to_index else mean for w in vocab])
  out[0] = 0.0
  return out.astype(np.float32)


def user_means(words: np.ndarray, users: np.ndarray, token_ids: np.ndarray,
               num_users: int) -> np.ndarray:
  """Mean word vector of each user's training tokens: [U, dim].

  users, token_ids: [K] one entry per (training token, its post's user); ids
  0/1 (pad/unk) are skipped. Users without a word get the mean word vector.
  """
  keep = token_ids > 1
  users, token_ids = users[keep], token_ids[keep]
  counts = sparse.csr_matrix((np.ones(len(users)), (users, token_ids)),
                             shape=(num_users, len(words)))      # [U, V] token counts
  sums = counts @ words.astype(np.float64)
  counts = np.bincount(users, minlength=num_users)
  fallback = words[2:].mean(0) if len(words) > 2 else np.zeros(words.shape[1])
  out = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], fallback)
  return out.astype(np.float32)
