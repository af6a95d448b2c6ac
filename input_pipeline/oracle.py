"""What would the planted truth rank first?

A corpus with known truth (the embedded corpus, `synthetic.py`) ships the
parameters of its generative model as a truth file keyed by strings: user
ids, words and post ids, never by the indices of a prepared dataset (prepare
builds its own vocabulary and user index). `launch/prepare_data.py
--oracle=FILE` copies that file into the prepared dataset as `oracle.npz`,
and `load(data_dir)` translates it into the dataset's ids with its
`users.txt` and `vocab.txt`: an `Oracle` that scores every task with the true
posterior of the model.

Truth file (`write_truth`; U users, T topics, W words, F features, N posts):
  users [U] str, log_pi [U] author log-prior, theta [U, T] interests,
  words [W] str, log_phi [T, W] topic-word log-probs (words absent from the
  file are background words: no evidence about the topic),
  mu [T, F] image topic means (unit Gaussian noise),
  post_ids [N] str, post_topics [N] int (each post's planted topic).
In the dataset's ids, a word prepare mapped to <unk> and a word not in the
truth carry no evidence (log_phi column 0); a dataset user the truth does not
know gets log_pi = -inf (never ranked first) and no interests.
"""

import dataclasses
import os
import zipfile
from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp

from input_pipeline import records

ORACLE_FILE = "oracle.npz"
FOLLOW_BOOST = 3.0     # actions favour followed authors this much
TRUTH_KEYS = ("users", "log_pi", "theta", "words", "log_phi", "mu", "post_ids",
              "post_topics")


def action_weight(theta_uz, followed):
  """The planted odds that a user acts on a post: (theta_u[z_post] + 0.01)
  x FOLLOW_BOOST when the user follows its author (the generator's draw)."""
  return (theta_uz + 0.01) * np.where(followed, FOLLOW_BOOST, 1.0)


@dataclasses.dataclass
class Oracle:
  """The planted model's true scores for the retrieval and recommendation tasks,
  in a dataset's ids (U users, V vocabulary ids).

  Each method returns log-scores whose order is the Bayes-optimal ranking of the
  candidates; ranks computed from them are the best achievable. Scores are
  rounded to 1e-6 nats so that candidates the model cannot tell apart tie
  exactly instead of being ordered by float round-off.
  """
  log_pi: np.ndarray       # [U] author prior
  theta: np.ndarray        # [U, T] user interests
  mu: np.ndarray           # [T, F] image topic means (unit noise)
  log_phi: np.ndarray      # [T, V] topic word log-probs (0: no evidence)
  post_ids: np.ndarray     # [N] str, sorted
  post_topics: np.ndarray  # [N] planted topic of each post of post_ids

  def _text_loglik(self, tokens, mask) -> np.ndarray:
    """log p(topic words of text | z) up to a per-text constant: [Q, T]."""
    onehot_counts = np.zeros([len(tokens), self.log_phi.shape[1]])
    np.add.at(onehot_counts, (np.arange(len(tokens))[:, None], tokens), mask)
    return onehot_counts @ self.log_phi.T

  def _image_loglik(self, features) -> np.ndarray:
    """log N(x; mu_z, I) up to a per-image constant: [Q, T]."""
    return features @ self.mu.T - 0.5 * np.sum(self.mu**2, axis=1)

  def _user_scores(self, topic_loglik) -> np.ndarray:
    """log pi_u + log sum_z theta_uz p(. | z): [Q, U]."""
    m = topic_loglik.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      return self.log_pi + m + np.log(np.exp(topic_loglik - m) @ self.theta.T)

  def text_user(self, tokens, mask) -> np.ndarray:
    """P(author | text) scores: tokens/mask [Q, L] -> [Q, U]."""
    return _round(self._user_scores(self._text_loglik(tokens, mask)))

  def image_user(self, features) -> np.ndarray:
    """P(poster | image) scores: features [Q, F] -> [Q, U]."""
    return _round(self._user_scores(self._image_loglik(features)))

  def user_text(self, tokens, mask) -> np.ndarray:
    """log P(author = u | text c), for ranking texts per user: [U, C]."""
    return _round(_posterior(self._user_scores(self._text_loglik(tokens, mask))).T)

  def user_image(self, features) -> np.ndarray:
    """log P(poster = u | image c), for ranking images per user: [U, C]."""
    return _round(_posterior(self._user_scores(self._image_loglik(features))).T)

  def _image_text_terms(self, features, tokens, mask):
    """(log p(t_c | x_q) + k_c [Q, C], log p(t_c) + k_c [C]); k_c: a per-text constant."""
    log_pz = logsumexp(np.log(self.theta + 1e-300) + self.log_pi[:, None], axis=0)
    img = self._image_loglik(features) + log_pz
    log_pz_x = img - logsumexp(img, axis=1, keepdims=True)       # [Q, T]
    txt = self._text_loglik(tokens, mask)                         # [C, T]
    txt = txt - txt.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      numer = np.log(np.exp(log_pz_x) @ np.exp(txt).T)            # [Q, C]
    return numer, logsumexp(txt + log_pz, axis=1)

  def image_text(self, features, tokens, mask) -> np.ndarray:
    """Posterior that text c is image q's caption, prop. p(x_q, t_c) / p(t_c): [Q, C]."""
    numer, denom = self._image_text_terms(features, tokens, mask)
    return _round(numer - denom)

  def text_image(self, tokens, mask, features) -> np.ndarray:
    """Posterior that image q is text c's image, prop. p(t_c | x_q): [C, Q]."""
    return _round(self._image_text_terms(features, tokens, mask)[0].T)

  def topics(self, post_ids: Sequence[str]) -> np.ndarray:
    """The planted topic of each post: post_ids [n] -> [n]; ValueError names an unknown id."""
    post_ids = np.asarray(post_ids, str)
    i = np.minimum(np.searchsorted(self.post_ids, post_ids), max(len(self.post_ids) - 1, 0))
    unknown = np.flatnonzero(self.post_ids[i] != post_ids) if len(self.post_ids) \
        else np.arange(len(post_ids))
    if len(unknown):
      raise ValueError(f"post {str(post_ids[unknown[0]])!r} is not in the planted truth")
    return self.post_topics[i]

  def action_scores(self, users, post_ids, followed) -> np.ndarray:
    """log odds that each user acts on each post: users [n] dataset indices,
    post_ids [n] str, followed [n] bool (the user follows the author) -> [n]."""
    theta_uz = self.theta[np.asarray(users), self.topics(post_ids)]
    return _round(np.log(action_weight(theta_uz, followed)))


def _posterior(log_joint: np.ndarray) -> np.ndarray:
  """Rows of log p(x, u) -> log p(u | x)."""
  return log_joint - logsumexp(log_joint, axis=1, keepdims=True)


def _round(scores: np.ndarray) -> np.ndarray:
  return np.round(scores, 6)


# ------------------------------------------------------------ truth files --

def write_truth(path: str, **truth: np.ndarray) -> None:
  """Writes a truth file with the arrays TRUTH_KEYS (module docstring)."""
  if sorted(truth) != sorted(TRUTH_KEYS):
    raise ValueError(f"a truth file has the arrays {TRUTH_KEYS}, got {sorted(truth)}")
  records.save_npz(path, **{k: truth[k] for k in TRUTH_KEYS})


def read_truth(path: str) -> dict[str, np.ndarray]:
  """A truth file's arrays; ValueError (one line) when it is not one."""
  try:
    with np.load(path, allow_pickle=False) as z:
      truth = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a truth file (.npz): {e}") from None
  missing = [k for k in TRUTH_KEYS if k not in truth]
  if missing:
    raise ValueError(f"{path} is not a truth file: it lacks {missing}")
  U, T = truth["theta"].shape
  if (truth["users"].shape != (U,) or truth["log_pi"].shape != (U,)
      or truth["log_phi"].shape != (T, len(truth["words"])) or truth["mu"].shape[0] != T
      or truth["post_topics"].shape != truth["post_ids"].shape):
    raise ValueError(f"{path}: the truth's arrays disagree in shape "
                     f"{ {k: v.shape for k, v in truth.items()} }")
  return truth


def from_truth(truth: dict, vocab: Sequence[str], users: Sequence[str]) -> Oracle:
  """A truth (read_truth) in a dataset's ids: vocab [V] words, users [U] ids."""
  user_row = {u: i for i, u in enumerate(truth["users"].tolist())}
  rows = np.array([user_row.get(u, -1) for u in users], np.int64)
  known = rows >= 0
  log_pi = np.where(known, truth["log_pi"][rows], -np.inf)
  theta = np.where(known[:, None], truth["theta"][rows], 0.0)
  word_col = {w: i for i, w in enumerate(truth["words"].tolist())}
  cols = np.array([word_col.get(w, -1) if i > records.UNK_ID else -1
                   for i, w in enumerate(vocab)], np.int64)
  log_phi = np.where(cols >= 0, truth["log_phi"][:, np.maximum(cols, 0)], 0.0)
  order = np.argsort(truth["post_ids"], kind="stable")
  return Oracle(log_pi=log_pi, theta=theta, mu=truth["mu"], log_phi=log_phi,
                post_ids=truth["post_ids"][order], post_topics=truth["post_topics"][order])


def load(data_dir: str) -> Oracle | None:
  """The planted truth of a prepared dataset in its ids, or None when it has none."""
  path = os.path.join(data_dir, ORACLE_FILE)
  if not os.path.exists(path):
    return None
  return from_truth(read_truth(path), records.read_lines(data_dir, records.VOCAB_FILE),
                    records.read_lines(data_dir, records.USERS_FILE))
