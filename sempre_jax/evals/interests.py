"""How well do user embeddings predict user interests?

The paper's user-interest task (Sikka et al. 2019, Table 3): each interest is
a binary task over users, a one-vs-rest linear SVM (C = 1) on a user feature
vector, scored by the F1 of its 5-fold stratified cross-validated predictions;
macro-F1 averages the interests. An interest with fewer positives (or
negatives) than folds cannot be cross-validated: it is skipped and listed.
Features are standardised on the training folds, so that C = 1 means the same
for every feature set.

Feature sets, compared on the same users (those with a training post), folds
and classifier:
  model      the user tower of a checkpoint: `user_vectors` "output" (default),
             its L2-normalised output in the common space [U, D], or "table",
             the user's row of the tower's embedding table [U, user_dim]
             (before the projection; DU2MCE);
  avg-text   the mean word vector of the user's training posts (the paper's
             baseline): the data's word2vec_init.npz "users" table, else
             Word2Vec trained here on the training texts;
  avg-image  the mean image feature vector of the user's training posts with
             an image (zeros without one); only for data with image features.
Beside them, `chance`: the F1 of the best predictor blind to the features,
calling every user positive, 2p / (1 + p) for an interest held by a share p
of the users (F1 = 2 TP / (predicted + actual positives) grows with the number
of users a blind predictor calls positive).

Interests come from the data's interests.txt (line i: user i's labels,
tab-separated): the planted topics of the embedded corpus, or a field of the
posts (launch/prepare_data.py --interest_field).
"""

import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from scipy import sparse
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from input_pipeline import loader, records, word2vec
from sempre_jax.evals import retrieval

CHANCE = "chance"
USER_VECTORS = ("output", "table")   # the model's user features: tower output, table row


# ------------------------------------------------------------------ labels --

def read_interests(data_dir: str, num_users: int) -> tuple[list[str], np.ndarray]:
  """(sorted labels [L], membership [U, L] bool) from the data's interests.txt."""
  lines = records.read_lines(data_dir, records.INTERESTS_FILE)
  if lines is None:
    raise FileNotFoundError(
        f"{os.path.join(data_dir, records.INTERESTS_FILE)} not found: the data has no "
        "interest labels; prepare it with launch/prepare_data.py --interest_field=FIELD")
  if len(lines) != num_users:
    raise ValueError(f"{records.INTERESTS_FILE} in {data_dir} has {len(lines)} lines "
                     f"for {num_users} users")
  per_user = [line.split("\t") if line else [] for line in lines]
  labels = sorted({x for xs in per_user for x in xs})
  index = {x: i for i, x in enumerate(labels)}
  member = np.zeros([num_users, len(labels)], bool)
  for u, xs in enumerate(per_user):
    member[u, [index[x] for x in xs]] = True
  return labels, member


# ------------------------------------------------------------------ scores --

def chance_f1(member: np.ndarray) -> np.ndarray:
  """[L] F1 of calling every user positive, 2p / (1 + p), for member [N, L]."""
  p = member.mean(0)
  return 2 * p / (1 + p)


def cross_validated_f1(features: np.ndarray, member: np.ndarray, folds: int = 5,
                       seed: int = 0) -> np.ndarray:
  """[L] F1 of each label's cross-validated linear SVM on features [N, F].

  member [N, L]: every label needs at least `folds` positives and negatives.
  `seed` fixes the folds and liblinear's shuffling.
  """
  cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
  svm = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=10_000, random_state=seed))
  return np.array([f1_score(y, cross_val_predict(svm, features, y, cv=cv), zero_division=0)
                   for y in member.T])


def interest_f1(features: Mapping[str, np.ndarray], labels: Sequence[str],
                member: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
  """Per-label and macro F1 of each feature set [N, F_k] on member [N, L].

  Labels with fewer than `folds` positives or negatives go to "skipped".
  """
  positives = member.sum(0)
  negatives = len(member) - positives
  ok = (positives >= folds) & (negatives >= folds)
  if not ok.any():
    raise ValueError(f"no interest has {folds}+ positive and negative users among "
                     f"{len(member)} users: nothing to cross-validate")
  scores = {CHANCE: chance_f1(member[:, ok])}
  scores.update({name: cross_validated_f1(x, member[:, ok], folds, seed)
                 for name, x in features.items()})
  kept = np.flatnonzero(ok)
  return dict(
      users=len(member), folds=folds, features=list(features),
      labels={labels[j]: {"positives": int(positives[j]),
                          **{k: float(v[i]) for k, v in scores.items()}}
              for i, j in enumerate(kept)},
      macro_f1={k: float(v.mean()) for k, v in scores.items()},
      skipped={labels[j]: f"{positives[j]} positives, {negatives[j]} negatives"
               for j in np.flatnonzero(~ok)})


# ---------------------------------------------------------------- features --

def _user_sums(users: np.ndarray, rows: np.ndarray, num_users: int) -> np.ndarray:
  """Sum of rows [N, F] per user (users [N]): [U, F]."""
  onehot = sparse.csr_matrix((np.ones(len(users)), (users, np.arange(len(users)))),
                             shape=(num_users, len(users)))
  return onehot @ rows.astype(np.float64)


def baseline_features(data_dir: str, metadata: Mapping, word2vec_dim: int = 300,
                      seed: int = 0) -> tuple[np.ndarray, dict, list[str]]:
  """(training posts per user [U], {"avg-text": [U, W], "avg-image": [U, F]},
  notes): the paper's averaged baselines, from the train split."""
  num_users, feature_dim = metadata["num_users"], metadata.get("feature_dim", 0)
  parts = list(loader.eval_batches(data_dir, metadata, "train", 4096,
                                   "features" if feature_dim else None))
  users = np.concatenate([b["user"] for b in parts])
  tokens = np.concatenate([b["tokens"] for b in parts])
  counts = np.bincount(users, minlength=num_users)
  path = os.path.join(data_dir, word2vec.INIT_FILE)
  if os.path.exists(path):
    with np.load(path) as z:
      avg_text = z["users"]
    notes = [f"avg-text: the users table of {word2vec.INIT_FILE}"]
  else:
    vocab = records.read_lines(data_dir, records.VOCAB_FILE)
    model = word2vec.train([[vocab[t] for t in row if t > records.UNK_ID] for row in tokens],
                           dim=word2vec_dim, seed=seed)
    avg_text = word2vec.user_means(word2vec.word_matrix(model, vocab),
                                   np.repeat(users, tokens.shape[1]), tokens.ravel(),
                                   num_users)
    notes = [f"avg-text: Word2Vec ({word2vec_dim}-d) trained on the training texts"]
  features = {"avg-text": avg_text}
  if feature_dim:
    image = np.concatenate([b["image_mask"] for b in parts])
    sums = _user_sums(users[image], np.concatenate(
        [b["image_features"] for b in parts])[image], num_users)
    with_image = np.bincount(users[image], minlength=num_users)
    features["avg-image"] = (sums / np.maximum(with_image, 1)[:, None]).astype(np.float32)
  else:
    notes.append("avg-image: skipped, the data has no image features (feature_dim 0)")
  return counts, features, notes


# --------------------------------------------------------------- evaluator --

class Interests:
  """Interest F1 of a model's user tower beside the averaged baselines, on the
  users with a training post (an evaluator: config.evals.<name> with type
  "interests", folds, seed; its score is -macro-F1 of the model). The labels,
  folds and baselines are fixed when it is built; each run embeds the users
  and cross-validates the model's features only."""

  def __init__(self, config: ml_collections.ConfigDict, exp, mesh):
    if exp.model_def.DATA != "posts":
      raise ValueError(f"the interests evaluator needs a model of posts with a user tower, "
                       f"not {exp.config.model.name}")
    self.config = config
    self.folds, self.seed = config.get("folds", 5), config.get("seed", 0)
    num_users = exp.metadata["num_users"]
    labels, member = read_interests(exp.data_dir, num_users)
    counts, baselines, self.notes = baseline_features(
        exp.data_dir, exp.metadata, exp.config.model.word_dim, seed=self.seed)
    self.users = np.flatnonzero(counts > 0)
    self.labels, self.member = labels, member[self.users]
    self.baselines = interest_f1({k: v[self.users] for k, v in baselines.items()}, labels,
                                 self.member, self.folds, self.seed)
    self.embedder = retrieval.Embedder(exp.module, config.get("batch_size", 1000), mesh)
    self.user_vectors = config.get("user_vectors", "output")
    if self.user_vectors not in USER_VECTORS:
      raise ValueError(f"interests: user_vectors must be one of {USER_VECTORS}, "
                       f"got {self.user_vectors!r}")

  def run(self, variables) -> dict:
    if self.user_vectors == "table":
      users = np.asarray(variables["params"]["user"]["user_embed"]["embedding"])[self.users]
    else:
      users = np.asarray(self.embedder(variables["params"], "user",
                                       self.users.astype(np.int32)))
    model = interest_f1({"model": users}, self.labels, self.member, self.folds, self.seed)
    results = {**self.baselines, "features": ["model", *self.baselines["features"]],
               "macro_f1": {**model["macro_f1"], **self.baselines["macro_f1"]},
               "labels": {k: {**row, **model["labels"][k]}
                          for k, row in self.baselines["labels"].items()},
               "notes": self.notes}
    return results

  def score(self, results: Mapping) -> float:
    return -results["macro_f1"]["model"]

  def format(self, results: Mapping) -> str:
    return format_table(results)

  def scalars(self, results: Mapping) -> dict:
    return {("macro_f1", k): v for k, v in results["macro_f1"].items()}


build = Interests


def format_table(results: Mapping) -> str:
  """One row per interest (F1 of chance and each feature set), then macro-F1."""
  columns = [CHANCE, *results["features"]]
  width = max(len("macro-F1"), *map(len, results["labels"]))
  head = f"{'interest':<{width}} {'users':>6} | " + " ".join(f"{c:>9}" for c in columns)
  row = lambda name, users, f1: (f"{name:<{width}} {users:>6} | "
                                 + " ".join(f"{f1[c]:>9.3f}" for c in columns))
  lines = [head, "-" * len(head)]
  lines += [row(label, r["positives"], r) for label, r in results["labels"].items()]
  lines += ["-" * len(head), row("macro-F1", "", results["macro_f1"])]
  skipped = results["skipped"]
  lines.append(f"{results['users']} users with a training post, {len(results['labels'])} "
               f"interests evaluated, {len(skipped)} skipped (fewer than "
               f"{results['folds']} positive or negative users)"
               + (": " + ", ".join(f"{k} ({v})" for k, v in list(skipped.items())[:10])
                  + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
                  if skipped else ""))
  lines += [f"note: {n}" for n in results["notes"]]
  return "\n".join(lines)
