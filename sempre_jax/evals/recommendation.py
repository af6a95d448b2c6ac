"""How well does a model rank the posts a user acts on?

The recommendation models (D-Sempre, CDL, AMNL) are judged per user: a list
of candidate posts (each paper's protocol) whose positives are the user's
held-out actions; the model scores every (user, candidate) pair and the
metrics are averaged over the users that have a positive and a negative:
  P@K = positives in the top K / K,   R@K = positives in the top K / positives,
  AUC = P(a positive outscores a negative), a tie counting 1/2.
P@K and R@K are exact expectations under random tie-breaking (a tie block
across the top-K cut contributes its positives in proportion to the slots
left). On the embedded corpus the planted odds of acting (the oracle:
(theta_u[z] + 0.01) x 3 if the user follows the author) are ranked the same
way beside the model: the best achievable on that data. Random baselines are exact expectations: E[P@K] = positives /
candidates (for K <= candidates), E[R@K] = min(K, C) / C, AUC = 0.5.

Protocols (config.eval.protocol):
  all        every post the user neither wrote nor acted on, plus the
             positives; at most `max_candidates` non-positives, a fixed
             random sample (D-Sempre's ranking of all posts).
  sampled    the user's held-out preferred images and `negatives_per_positive`
             x as many other images the user never acted on (CDL: 20 + 80).
  followees  the user's held-out re-shares and the posts of the user's
             followees that the user did not act on, published from the user's
             first held-out action on (AMNL).
In every protocol a post the user acted on, in any split, is never a
negative: the only known positives among a user's candidates are the
split's held-out actions being ranked.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import interactions, oracle as planted
from sempre_jax import mesh as mesh_lib

PROTOCOLS = ("all", "sampled", "followees")


def candidate_lists(data: interactions.Interactions, splits: Mapping[str, np.ndarray],
                    split: str, protocol: str, *, max_candidates: int = 1000,
                    negatives_per_positive: int = 4, images_only: bool = False,
                    seed: int = 0) -> dict:
  """(user, post, label) triples, grouped by user: {"user", "post", "label"} [n]."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"eval.protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if protocol == "followees":
    interactions.require_follows(data, "the followees protocol (AMNL's evaluation)")
  rng = np.random.default_rng(seed)
  n = data.num_posts
  held = data.actions[splits[split]]
  acted = np.unique(data.actions[:, 0] * n + data.actions[:, 1])   # every split's
  pool = np.flatnonzero(data.posts["image_mask"]) if images_only else np.arange(n)
  followees = data.followees
  author, stamp = data.posts["user"], data.posts["timestamp"]
  out = {"user": [], "post": [], "label": []}
  for u in np.unique(held[:, 0]):
    pos = np.unique(held[held[:, 0] == u, 1])
    if protocol == "followees":
      start = held[held[:, 0] == u, 2].min()
      cands = pool[np.isin(author[pool], followees[u]) & (stamp[pool] >= start)]
    else:
      cands = pool[author[pool] != u]
    neg = cands[~np.isin(u * n + cands, acted)]
    if protocol == "sampled":
      neg = rng.choice(neg, min(len(neg), negatives_per_positive * len(pos)), replace=False)
    elif protocol == "all" and len(neg) > max_candidates:
      neg = rng.choice(neg, max_candidates, replace=False)
    if len(neg) == 0:
      continue
    out["user"] += [u] * (len(pos) + len(neg))
    out["post"] += [*pos, *neg]
    out["label"] += [True] * len(pos) + [False] * len(neg)
  return {"user": np.asarray(out["user"], np.int64), "post": np.asarray(out["post"], np.int64),
          "label": np.asarray(out["label"], bool)}


def user_metrics(users: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 at: tuple[int, ...]) -> dict:
  """Per-user P@K, R@K, AUC (and random baselines), averaged over users.

  users, scores, labels: [n] one row per (user, candidate). Ties are exact
  expectations under random tie-breaking: sorted by score, a user's candidates
  form tie blocks; block b (n_b candidates, p_b positives, a_b of the user's
  candidates above it) puts E[hits] = p_b x clip(K - a_b, 0, n_b) / n_b in the
  top K. AUC = (sum over positives of negatives below + half the negatives
  tied) / (positives x negatives).
  """
  order = np.lexsort((-scores, users))
  users, scores, labels = users[order], scores[order], labels[order]
  n = len(users)
  new_user = np.r_[True, users[1:] != users[:-1]]
  new_block = new_user | np.r_[True, scores[1:] != scores[:-1]]
  user_of_row = np.cumsum(new_user) - 1
  starts, blocks = np.flatnonzero(new_user), np.flatnonzero(new_block)   # [U], [B]
  size = np.diff(np.r_[blocks, n])                                       # n_b
  user = user_of_row[blocks]
  pos = np.add.reduceat(labels.astype(np.int64), blocks)                 # p_b
  neg = size - pos
  above = blocks - starts[user]                                          # a_b
  c = np.diff(np.r_[starts, n]).astype(np.float64)
  p = np.bincount(user, pos).astype(np.float64)
  per_user = lambda x: np.bincount(user, x, minlength=len(starts))
  out = {}
  for k in at:
    hits = per_user(pos * np.clip(k - above, 0, size) / size)
    out[f"P@{k}"] = hits / k
    out[f"R@{k}"] = hits / p
    out[f"random_P@{k}"] = p / c * np.minimum(k, c) / k
    out[f"random_R@{k}"] = np.minimum(k, c) / c
  negatives_above = np.cumsum(neg) - neg
  negatives_above -= negatives_above[np.searchsorted(blocks, starts)][user]
  below = (c - p)[user] - negatives_above - neg
  out["AUC"] = per_user(pos * (below + 0.5 * neg)) / (p * (c - p))
  out["random_AUC"] = np.full(len(starts), 0.5)
  out = {k: float(np.mean(v)) for k, v in out.items()}
  out["users"] = len(starts)
  out["candidates_per_user"] = float(np.mean(c))
  out["positives_per_user"] = float(labels.sum() / max(len(starts), 1))
  return out


class RecommendationEvaluator:
  """P@K, R@K and AUC of a family model on one split of the actions."""

  def __init__(self, config: ml_collections.ConfigDict, model, data: interactions.Interactions,
               splits: Mapping[str, np.ndarray], split: str, *, image_key: str,
               bags: np.ndarray | None, images_only: bool,
               oracle: planted.Oracle | None = None):
    self.config, self.model, self.data, self.image_key = config, model, data, image_key
    self.lists = candidate_lists(
        data, splits, split, config.protocol, max_candidates=config.max_candidates,
        negatives_per_positive=config.negatives_per_positive, images_only=images_only,
        seed=config.seed)
    if not len(self.lists["user"]):
      raise ValueError(f"no user has held-out actions and candidates in the {split} split")
    self.oracle = None
    if oracle is not None:      # the planted odds of acting, ranked the same way
      u, p = self.lists["user"], self.lists["post"]
      follows = set((data.follows[:, 0] * data.num_users + data.follows[:, 1]).tolist())
      followed = np.array([k in follows for k in (u * data.num_users
                                                   + data.posts["user"][p]).tolist()])
      self.oracle = user_metrics(u, oracle.action_scores(u, data.post_ids[p], followed),
                                 self.lists["label"], tuple(config.at))
    self.users = {"user": np.arange(data.num_users, dtype=np.int32),
                  "followees": data.followees.astype(np.int32)}
    if bags is not None:
      self.users["user_bag"] = bags
    self.posts = np.unique(self.lists["post"])
    apply = lambda method: jax.jit(lambda v, x: model.apply(v, x, method=method))
    self._embed_users, self._embed_posts = apply("embed_users"), apply("embed_posts")
    self._score = jax.jit(lambda v, ur, pr, ui, pi: model.apply(
        v, jax.tree.map(lambda x: x[ui], ur), jax.tree.map(lambda x: x[pi], pr),
        method="score"))

  def _batched(self, fn, variables, tree, n: int, bs: int):
    """fn over the rows of a NumPy tree in padded batches -> concatenated outputs."""
    out = []
    for a in range(0, n, bs):
      part = jax.tree.map(lambda x: x[a:a + bs], tree)
      m = len(jax.tree.leaves(part)[0])
      part = jax.tree.map(lambda x: np.concatenate(
          [x, np.zeros((bs - m,) + x.shape[1:], x.dtype)]), part)
      out.append(jax.tree.map(lambda y: y[:m], fn(variables, part)))
    return jax.tree.map(lambda *ys: jnp.concatenate(ys), *out)

  def run(self, variables) -> dict:
    """Metrics of the model with `variables` ({"params": ..., maybe "batch_stats"})."""
    variables = mesh_lib.to_host(variables)
    bs = self.config.batch_size
    users = self._batched(self._embed_users, variables, self.users,
                          self.data.num_users, bs)
    posts = self._batched(self._embed_posts, variables,
                          {k: self.data.posts[k][self.posts]
                           for k in interactions.POST_FIELDS + (self.image_key,)},
                          len(self.posts), bs)
    rows = {"ui": self.lists["user"], "pi": np.searchsorted(self.posts, self.lists["post"])}
    scores = self._batched(lambda v, r: self._score(v, users, posts, r["ui"], r["pi"]),
                           variables, rows, len(rows["ui"]), 16 * bs)
    results = user_metrics(self.lists["user"], np.asarray(scores, np.float64),
                           self.lists["label"], tuple(self.config.at))
    if self.oracle is not None:
      results["oracle"] = self.oracle
    return results


def format_table(results: Mapping, at: tuple[int, ...]) -> str:
  """One line per metric: model beside random (and the oracle when there is one)."""
  oracle = results.get("oracle")
  lines = [f"{results['users']} users, {results['candidates_per_user']:.1f} candidates and "
           f"{results['positives_per_user']:.1f} positives per user",
           f"{'metric':<8} {'model':>7} {'random':>7}" + (f" {'oracle':>7}" if oracle else "")]
  for name in [f"P@{k}" for k in at] + [f"R@{k}" for k in at] + ["AUC"]:
    lines.append(f"{name:<8} {results[name]:>7.3f} {results['random_' + name]:>7.3f}"
                 + (f" {oracle[name]:>7.3f}" if oracle else ""))
  return "\n".join(lines)


# ---------------------------------------------------------------- registry --

class Recommendation(RecommendationEvaluator):
  """The recommendation evaluator of a run (sempre_jax/evals: the Evaluator protocol)."""

  def __init__(self, config: ml_collections.ConfigDict, exp, mesh):
    del mesh   # the per-user scoring is small: one device per process
    data = exp.data
    ic = exp.config.data.interactions
    super().__init__(config, exp.module, data.interactions, data.action_splits, config.split,
                     image_key=data.image_key, bags=data.bags, images_only=ic.images_only,
                     oracle=planted.load(data.data_dir))

  def score(self, results: Mapping) -> float:
    return -results[self.config.select]

  def format(self, results: Mapping) -> str:
    return format_table(results, tuple(self.config.at))

  def scalars(self, results: Mapping) -> dict:
    return {(k,): v for k, v in results.items() if isinstance(v, float)}


build = Recommendation
