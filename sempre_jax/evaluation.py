"""How good is the space, exactly?

Retrieval on a held-out split with exact ranks: the rank of a query's ground
truth is 1 + the number of candidates scoring strictly above it, and with
several ground truths the best-ranked one counts. Exact ties (the oracle has
them) count as the expected rank under random tie-breaking: with t other
candidates and g ground truths tied at the best ground-truth score, t / (g + 1)
is added. No sorting: ranks are counts over all candidates.

Tasks (queries -> candidates, ground truth):
  text->user   every text of the split -> all users, its author.
  text->user (2+ posts)  the same, only texts whose author has 2+ training posts.
  image->text  unique images of the split (at most `max_image_text_pairs`) ->
               the texts of the posts carrying those images, the texts of the
               image's own posts.
  image->user  the same images -> all users, the users who posted the image.
On the embedded corpus the oracle (the planted model's posterior) is ranked
the same way, so the best achievable ranks are printed beside the model's.
"""

import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import loader, synthetic
from sempre_jax import models

TASKS = ("text->user", "text->user (2+ posts)", "image->text", "image->user")
RECALL_AT = (1, 5, 10, 50)
JOINT_TASKS = ("text->user", "image->text", "image->user")


# ------------------------------------------------------------------- ranks --

@jax.jit
def ranks_from_scores(scores: jnp.ndarray, gt_mask: jnp.ndarray) -> jnp.ndarray:
  """scores, gt_mask: [Q, C] -> [Q] rank of the best ground truth (1 = top)."""
  best_gt = jnp.max(jnp.where(gt_mask, scores, -jnp.inf), axis=1, keepdims=True)
  above = jnp.sum(scores > best_gt, axis=1)
  tied = scores == best_gt
  tied_others = jnp.sum(tied & ~gt_mask, axis=1)
  tied_gts = jnp.sum(tied & gt_mask, axis=1)
  return 1 + above + tied_others / (tied_gts + 1)


def ground_truth_mask(gts: Sequence[np.ndarray], num_candidates: int) -> np.ndarray:
  """Lists of candidate indices -> [Q, C] bool."""
  mask = np.zeros([len(gts), num_candidates], bool)
  for q, gt in enumerate(gts):
    mask[q, gt] = True
  return mask


def exact_ranks(score_fn, num_queries: int, gts: Sequence[np.ndarray],
                num_candidates: int, chunk: int = 1024) -> np.ndarray:
  """Ranks for all queries; score_fn(start, stop) -> [stop - start, C] scores."""
  out = []
  for start in range(0, num_queries, chunk):
    stop = min(start + chunk, num_queries)
    mask = ground_truth_mask(gts[start:stop], num_candidates)
    out.append(np.asarray(ranks_from_scores(score_fn(start, stop), mask)))
  return np.concatenate(out) if out else np.zeros([0], np.int64)


def rank_metrics(ranks: np.ndarray, num_candidates: int) -> dict:
  """Median/mean rank, R@K (fraction with rank <= K) and the random baseline."""
  if len(ranks) == 0:
    return {"queries": 0, "candidates": num_candidates}
  out = {"queries": int(len(ranks)), "candidates": int(num_candidates),
         "median_rank": float(np.median(ranks)), "mean_rank": float(np.mean(ranks)),
         "random_median_rank": num_candidates / 2}
  for k in RECALL_AT:
    out[f"R@{k}"] = float(np.mean(ranks <= k))
  return out


def with_joint_metric(results: dict) -> dict:
  """Adds "joint": the paper's normalised joint metric, the sum over the tasks
  that have queries of median rank / number of candidates (0 is perfect)."""
  done = [t for t in JOINT_TASKS if results[t].get("queries")]
  results["joint"] = {
      "normalised_median_rank": float(sum(results[t]["median_rank"] / results[t]["candidates"]
                                          for t in done)),
      "tasks": done}
  return results


# ---------------------------------------------------------------- embedder --

class Embedder:
  """One tower at a time over arrays [N, ...] in fixed-size batches -> [N, D].

  The last batch is padded, so each tower compiles once.
  """

  def __init__(self, model: models.DU2MCE, params, batch_size: int):
    self.batch_size, self.embed_dim = batch_size, model.embed_dim
    self._fns = {
        tower: jax.jit(lambda p, *xs, method=getattr(type(model), f"embed_{tower}"):
                       model.apply({"params": p}, *xs, method=method))
        for tower in models.MODALITIES}
    self._params = params

  def __call__(self, tower: str, *arrays: np.ndarray) -> jnp.ndarray:
    fn, bs, out = self._fns[tower], self.batch_size, []
    for start in range(0, len(arrays[0]), bs):
      chunk = [a[start:start + bs] for a in arrays]
      pad = bs - len(chunk[0])
      chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
      out.append(fn(self._params, *chunk)[:bs - pad])
    return jnp.concatenate(out) if out else jnp.zeros([0, self.embed_dim])


# --------------------------------------------------------------- evaluator --

class RetrievalEvaluator:
  """Exact retrieval metrics of a model on one split (built from config.eval)."""

  def __init__(self, config: ml_collections.ConfigDict, model: models.DU2MCE,
               data_dir: str, metadata: Mapping):
    self.model = model
    self.batch_size = config.batch_size
    self.image_key = models.image_key(model.image_input)
    self.num_users = metadata["num_users"]
    posts = _collect(loader.eval_batches(
        data_dir, metadata, config.split, config.batch_size, model.image_input))
    self.split = config.split
    self.texts = {k: posts[k][posts["text_mask"].any(1)]
                  for k in ("tokens", "text_mask", "user")}
    self.repeat_author = train_posts_per_user(data_dir, metadata)[self.texts["user"]] >= 2
    self._images_and_captions(posts, config.max_image_text_pairs)
    oracle_path = os.path.join(data_dir, synthetic.ORACLE_FILE)
    self.oracle = (self._oracle_metrics(synthetic.Oracle.load(oracle_path), posts)
                   if os.path.exists(oracle_path) else None)

  def _images_and_captions(self, posts, max_pairs: int) -> None:
    """Unique images (the first `max_pairs` ids) with their captions and posters."""
    with_image = np.flatnonzero(posts["image_mask"] & posts["text_mask"].any(1))
    order = with_image[np.argsort(posts["image_id"][with_image], kind="stable")]
    _, starts = np.unique(posts["image_id"][order], return_index=True)
    groups = np.split(order, starts[1:])[:max_pairs] if len(order) else []
    caption_posts = np.concatenate(groups) if groups else np.zeros([0], int)
    self.captions = {k: posts[k][caption_posts] for k in ("tokens", "text_mask")}
    self._image_posts = np.array([g[0] for g in groups], int)
    self.images = posts[self.image_key][self._image_posts]
    sizes = [len(g) for g in groups]
    bounds = np.cumsum([0] + sizes)
    self.image_caption_gt = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    self.image_user_gt = [np.unique(posts["user"][g]) for g in groups]

  def _oracle_metrics(self, oracle: synthetic.Oracle, posts) -> dict:
    feats = posts["image_features"][self._image_posts]
    caps = self.captions
    return self._metrics(
        text_user=lambda a, b: oracle.text_user(self.texts["tokens"][a:b],
                                                self.texts["text_mask"][a:b]),
        image_text=lambda a, b: oracle.image_text(feats[a:b], caps["tokens"],
                                                  caps["text_mask"]),
        image_user=lambda a, b: oracle.image_user(feats[a:b]))

  def _metrics(self, text_user, image_text, image_user) -> dict:
    n_img, n_caps = len(self.image_caption_gt), len(self.captions["tokens"])
    text_gt = [np.array([u]) for u in self.texts["user"]]
    text_ranks = exact_ranks(text_user, len(text_gt), text_gt, self.num_users)
    return with_joint_metric({
        "text->user": rank_metrics(text_ranks, self.num_users),
        "text->user (2+ posts)": rank_metrics(text_ranks[self.repeat_author],
                                              self.num_users),
        "image->text": rank_metrics(exact_ranks(
            image_text, n_img, self.image_caption_gt, n_caps), n_caps),
        "image->user": rank_metrics(exact_ranks(
            image_user, n_img, self.image_user_gt, self.num_users), self.num_users),
    })

  def run(self, params) -> dict:
    """{task: metrics} for the model, plus "oracle" when the split has one."""
    embed = Embedder(self.model, params, self.batch_size)
    users = embed("user", np.arange(self.num_users, dtype=np.int32))
    texts = embed("text", self.texts["tokens"], self.texts["text_mask"])
    caps = embed("text", self.captions["tokens"], self.captions["text_mask"])
    imgs = embed("image", self.images)
    results = self._metrics(
        text_user=lambda a, b: texts[a:b] @ users.T,
        image_text=lambda a, b: imgs[a:b] @ caps.T,
        image_user=lambda a, b: imgs[a:b] @ users.T)
    if self.oracle is not None:
      results["oracle"] = self.oracle
    return results


def train_posts_per_user(data_dir: str, metadata: Mapping) -> np.ndarray:
  """[U] number of training posts of each user."""
  counts = np.zeros([metadata["num_users"]], np.int64)
  for batch in loader.eval_batches(data_dir, {**metadata, "feature_dim": 0}, "train",
                                   4096, "features"):
    counts += np.bincount(batch["user"], minlength=len(counts))
  return counts


def _collect(batches) -> dict[str, np.ndarray]:
  parts = list(batches)
  if not parts:
    raise ValueError("the evaluation split has no records")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------ report --

def format_table(results: Mapping) -> str:
  """A readable table of model (and oracle) metrics per task."""
  head = (f"{'task':<21} {'queries':>7} {'cands':>6} {'random':>7} | {'median':>7} "
          f"{'mean':>7} {'R@1':>5} {'R@5':>5} {'R@10':>5}")
  has_oracle = "oracle" in results
  if has_oracle:
    head += f" | {'oracle med':>10} {'mean':>7} {'R@1':>5} {'R@10':>5}"
  lines = [head, "-" * len(head)]
  for task in TASKS:
    r = results[task]
    if not r.get("queries"):
      lines.append(f"{task:<21} {'(no queries in this split)':>30}")
      continue
    line = (f"{task:<21} {r['queries']:>7} {r['candidates']:>6} "
            f"{r['random_median_rank']:>7.1f} | {r['median_rank']:>7.1f} "
            f"{r['mean_rank']:>7.1f} {r['R@1']:>5.2f} {r['R@5']:>5.2f} {r['R@10']:>5.2f}")
    if has_oracle:
      o = results["oracle"][task]
      line += (f" | {o['median_rank']:>10.1f} {o['mean_rank']:>7.1f} "
               f"{o['R@1']:>5.2f} {o['R@10']:>5.2f}")
    lines.append(line)
  return "\n".join(lines)


def write_results(results: Mapping, path: str) -> None:
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
