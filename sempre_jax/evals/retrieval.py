"""How good is the space, exactly?

Retrieval on a held-out split with exact ranks (`sempre_jax.evals.ranks`: every
candidate counted, the best-ranked of several ground truths counts, ties as
the expectation under random tie-breaking: expected ranks, and R@K the exact
expected recall), computed on all devices, at any scale: each run embeds the
split's texts and images once into temporary files (under $TMPDIR: 4 D bytes
per text and image, 8.7 GB at the paper's 1.89M texts and 251k images, D =
1024) and streams them through the ranker in blocks; only the user vectors
(candidates of four tasks) stay on the devices. Each pair of modalities is
ranked both ways from one pass over its scores: text x user gives text->user
and user->text, image x user image->user and user->image, caption x image
text->image and image->text. The evaluator is built once per training run
(its embedder and ranker compile once, on shapes) and serves every run.

Tasks (queries -> candidates, ground truth):
  text->user   every text of the split -> all users, its author.
  text->user (2+ posts)  the same, only texts whose author has 2+ training posts.
  image->text  unique images of the split that have a caption (the first
               `max_image_text_pairs`) -> the texts of the posts carrying
               those images, the image's own captions.
  image->user  every unique image of the split -> all users, its posters.
  user->text   users with a text in the split -> every text of the split,
               the user's texts.
  text->image  the captions of image->text -> its images, the caption's image.
  user->image  users with an image in the split -> every unique image of the
               split, the user's images.
Beside each metric the random baseline is exact: the distribution of the best
of g ground truths placed at random among C candidates. The normalised joint
metric is the paper's: the sum over text->user, image->text and image->user
of median rank / number of candidates (0 is perfect; best checkpoints use the
tasks whose loss weight is non-zero). On the embedded corpus the oracle (the
planted model's posterior) is ranked the same way beside the model.
"""

import functools
import os
import tempfile
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.special import gammaln

from input_pipeline import loader, oracle as planted, progress
from sempre_jax import mesh as mesh_lib
from sempre_jax.evals import ranks
from sempre_jax.models import du2mce, encoders

TASKS = ("text->user", "text->user (2+ posts)", "image->text", "image->user",
         "user->text", "text->image", "user->image")
JOINT_TASKS = ("text->user", "image->text", "image->user")
TERM_TASK = {"tu": "text->user", "it": "image->text", "iu": "image->user"}
RECALL_AT = (1, 5, 10, 50)


# ---------------------------------------------------------------- metrics --

def random_rank_cdf(k: np.ndarray, g: np.ndarray, weight: np.ndarray,
                    num_candidates: int) -> np.ndarray:
  """P(rank <= k) under a random ranking, pooled over queries of which
  weight[j] have g[j] ground truths: 1 - sum_j weight_j C(C - k, g_j) / C(C, g_j)
  / sum_j weight_j, for k [K] -> [K] (memory O(K x len(g)))."""
  k = np.asarray(k, np.float64)[:, None]
  c = float(num_candidates)
  log_choose = lambda n, r: gammaln(n + 1) - gammaln(r + 1) - gammaln(n - r + 1)
  with np.errstate(invalid="ignore"):
    above = np.where(c - k >= g, np.exp(log_choose(c - k, g) - log_choose(c, g)), 0.0)
  return 1.0 - (above * weight).sum(1) / weight.sum()


def random_metrics(num_gts: np.ndarray, num_candidates: int) -> dict:
  """Median rank, mean rank and R@K of a random ranking (exact), for queries
  with num_gts [Q] ground truths each. The median is the smallest k with
  P(rank <= k) >= 1/2, found by bisection (the CDF at ~log2 C points, not at
  all C); the mean is that of (C + 1) / (g + 1)."""
  c = num_candidates
  g, weight = np.unique(np.asarray(num_gts, np.int64), return_counts=True)
  cdf = lambda k: random_rank_cdf(k, g, weight, c)
  low, high = 1, c                      # P(rank <= C) = 1
  while low < high:
    mid = (low + high) // 2
    low, high = (low, mid) if cdf([mid])[0] >= 0.5 - 1e-12 else (mid + 1, high)
  out = {"random_median_rank": float(low),
         "random_mean_rank": float(np.mean((c + 1) / (np.asarray(num_gts) + 1)))}
  for k, value in zip(RECALL_AT, cdf([min(k, c) for k in RECALL_AT])):
    out[f"random_R@{k}"] = float(value)
  return out


def rank_metrics(ranks_: ranks.Ranks, num_candidates: int,
                 num_gts: np.ndarray | None = None) -> dict:
  """Median and mean of the expected ranks, R@K (the expected fraction of
  queries with rank <= K under random tie-breaking) and the random baseline."""
  if len(ranks_) == 0:
    return {"queries": 0, "candidates": int(num_candidates)}
  num_gts = np.ones(len(ranks_), np.int64) if num_gts is None else num_gts
  expected = ranks_.rank
  out = {"queries": int(len(ranks_)), "candidates": int(num_candidates),
         "median_rank": float(np.median(expected)), "mean_rank": float(np.mean(expected))}
  for k in RECALL_AT:
    out[f"R@{k}"] = float(np.mean(ranks_.recall_at(k)))
  out.update(random_metrics(num_gts, num_candidates))
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


def selection_metric(results: Mapping, weights: Mapping[str, float]) -> float:
  """The paper's model-selection score (section 4.3): the sum of median rank /
  candidates over the tasks whose loss weight is non-zero (lower is better)."""
  tasks = [TERM_TASK[t] for t, w in weights.items() if w > 0]
  return float(sum(results[t]["median_rank"] / results[t]["candidates"]
                   for t in tasks if results[t].get("queries")))


# ---------------------------------------------------------------- embedder --

class Embedder:
  """One tower at a time over host arrays [N, ...] -> a global [N, D] array.

  Built once per run: each tower compiles once (batches are split over the
  devices of `mesh`, every process passes the same arrays, and the last batch
  is padded) and serves every call, whatever the parameters.
  """

  def __init__(self, model, batch_size: int, mesh: Mesh):
    self.mesh, self.embed_dim = mesh, model.embed_dim
    self.batch_size = mesh_lib.round_up(batch_size, mesh.devices.size)
    self._fns = {
        tower: jax.jit(lambda p, *xs, method=getattr(type(model), f"embed_{tower}"):
                       model.apply({"params": p}, *xs, method=method))
        for tower in du2mce.MODALITIES}

  def place(self, params):
    """`params` replicated on the mesh (as they are when they already are)."""
    placed = all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(
        NamedSharding(self.mesh, P()), x.ndim) for x in jax.tree.leaves(params))
    return params if placed else mesh_lib.put_global(self.mesh, params)

  def __call__(self, params, tower: str, *arrays: np.ndarray) -> jax.Array:
    """tower(arrays) with `params` (place host parameters once with `place`)."""
    fn, bs, out, placed = self._fns[tower], self.batch_size, [], self.place(params)
    for start in range(0, len(arrays[0]), bs):
      chunk = [a[start:start + bs] for a in arrays]
      n = len(chunk[0])
      chunk = [np.concatenate([c, np.zeros((bs - n,) + c.shape[1:], c.dtype)]) for c in chunk]
      out.append(fn(placed, *mesh_lib.put_global(self.mesh, chunk, P(mesh_lib.AXIS)))[:n])
    if not out:
      return jnp.zeros([0, self.embed_dim])
    return jnp.concatenate(out) if len(out) > 1 else out[0]


def _host(x) -> np.ndarray:
  """A global array -> all its rows as float32 NumPy, on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)


class RowFile:
  """Embeddings [N, D] in a float32 file, read back a block at a time: rows
  [start:stop] (a slice) or rows[indices] (an index array). Nothing stays
  mapped or cached in the process (file pages live in the OS page cache)."""

  def __init__(self, path: str, dim: int):
    self.path, self.shape = path, (os.path.getsize(path) // (4 * dim), dim)

  def __getitem__(self, index) -> np.ndarray:
    n, dim = self.shape
    if isinstance(index, slice):
      start, stop, step = index.indices(n)
      if step != 1:
        raise ValueError("RowFile reads contiguous slices only")
      return np.fromfile(self.path, np.float32, max(stop - start, 0) * dim,
                         offset=4 * dim * start).reshape(-1, dim)
    index = np.asarray(index, np.int64)
    out = np.empty([len(index), dim], np.float32)
    with open(self.path, "rb") as f:
      for row, i in zip(out, index):
        f.seek(4 * dim * int(i))
        f.readinto(row)
    return out


# --------------------------------------------------------------- evaluator --

def _first_positions(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(unique keys in order of first appearance, index of each key's first row)."""
  uniq, first = np.unique(keys, return_index=True)
  order = np.argsort(first, kind="stable")
  return uniq[order], first[order]


class RetrievalEvaluator:
  """Exact retrieval metrics of a model on one split (built from config.eval)."""

  def __init__(self, config: ml_collections.ConfigDict, model: du2mce.DU2MCE,
               data_dir: str, metadata: Mapping, mesh: Mesh):
    self.config, self.model, self.mesh = config, model, mesh
    self.data_dir, self.metadata, self.split = data_dir, metadata, config.split
    self.image_key = encoders.image_key(model.image_input)
    self.num_users = metadata["num_users"]
    post = _collect(loader.eval_batches(data_dir, metadata, self.split, 4096, None),
                    ("user", "text_mask", "image_mask", "image_id"))
    self._build_tasks(post["user"], post["text_mask"].any(1),
                      np.where(post["image_mask"], post["image_id"], -1),
                      config.max_image_text_pairs)
    self.repeat_author = train_posts_per_user(data_dir, metadata)[
        post["user"][self.text_posts]] >= 2
    self.first_image_post = np.zeros(len(post["user"]), bool)
    self.first_image_post[self.image_posts] = True
    truth = planted.load(data_dir)
    self.oracle = self._metrics(self._oracle_ranks(truth)) if truth is not None else None
    self.embedder = Embedder(model, config.batch_size, mesh)
    self.ranker = ranks.ExactRanker(mesh, query_chunk=config.query_chunk,
                                    candidate_chunk=config.candidate_chunk,
                                    tie_tolerance=config.tie_tolerance)

  def _build_tasks(self, user, has_text, image_id, max_pairs: int) -> None:
    """Queries, candidates and ground truths of every task, from the split's
    posts (user [N], has_text [N], image_id [N], -1 = none)."""
    self.text_posts = np.flatnonzero(has_text)                   # text t = post
    text_of_post = np.cumsum(has_text) - 1
    with_image = np.flatnonzero(image_id >= 0)
    images, self.image_posts = _first_positions(image_id[with_image])
    self.image_posts = with_image[self.image_posts]              # image i = post
    image_of_post = np.full(len(user), -1)
    sorter = np.argsort(images)
    image_of_post[with_image] = sorter[np.searchsorted(images, image_id[with_image],
                                                       sorter=sorter)]
    # image->text: the first images (in file order) with a caption, and their captions.
    captioned = with_image[has_text[with_image]]
    pair_images = np.unique(image_of_post[captioned])[:max_pairs]
    captions = captioned[np.isin(image_of_post[captioned], pair_images)]
    self.pair_images = pair_images                                # [Pi] image indices
    self.caption_texts = text_of_post[captions]                   # [Pc] text indices
    caption_image = np.searchsorted(pair_images, image_of_post[captions])
    # Users with a text / an image in the split.
    self.text_users = np.unique(user[self.text_posts])
    self.image_users = np.unique(user[with_image])
    self.gt = {
        "text->user": ranks.GroundTruth.single(user[self.text_posts]),
        "image->user": ranks.GroundTruth.from_pairs(
            image_of_post[with_image], user[with_image], len(images)),
        "image->text": ranks.GroundTruth.from_pairs(
            caption_image, np.arange(len(captions)), len(pair_images)),
        "text->image": ranks.GroundTruth.single(caption_image),
        "user->text": ranks.GroundTruth.from_pairs(
            np.searchsorted(self.text_users, user[self.text_posts]),
            np.arange(len(self.text_posts)), len(self.text_users)),
        "user->image": ranks.GroundTruth.from_pairs(
            np.searchsorted(self.image_users, user[with_image]),
            image_of_post[with_image], len(self.image_users)),
    }
    self.num_candidates = {
        "text->user": self.num_users, "image->user": self.num_users,
        "image->text": len(captions), "text->image": len(pair_images),
        "user->text": len(self.text_posts), "user->image": len(images)}

  def _metrics(self, task_ranks: Mapping[str, np.ndarray]) -> dict:
    out = {t: rank_metrics(task_ranks[t], self.num_candidates[t], self.gt[t].counts())
           for t in self.gt}
    out["text->user (2+ posts)"] = rank_metrics(
        task_ranks["text->user"][self.repeat_author], self.num_users)
    return with_joint_metric({t: out[t] for t in TASKS})

  def _oracle_ranks(self, oracle: planted.Oracle) -> dict:
    """The planted posterior's ranks (explicit score matrices; small corpora)."""
    post = _collect(loader.eval_batches(self.data_dir, self.metadata, self.split, 4096,
                                        "features"), ("tokens", "text_mask", "image_features"))
    tok, mask = post["tokens"][self.text_posts], post["text_mask"][self.text_posts]
    feats = post["image_features"][self.image_posts]
    text_user = oracle.text_user(tok, mask)                       # [T, U]
    image_user = oracle.image_user(feats)                         # [I, U]
    ct, cm = tok[self.caption_texts], mask[self.caption_texts]
    pf = feats[self.pair_images]
    scores = {
        "text->user": text_user, "image->user": image_user,
        "image->text": oracle.image_text(pf, ct, cm),
        "text->image": oracle.text_image(ct, cm, pf),
        "user->text": oracle.user_text(tok, mask)[self.text_users],
        "user->image": oracle.user_image(feats)[self.image_users]}
    return {t: ranks.ranks_from_scores(s, self.gt[t]) for t, s in scores.items()}

  def model_ranks(self, params) -> dict:
    """{task: ranks.Ranks} of the model with `params`. The split's texts and
    images are embedded once, into files of a temporary directory (under
    $TMPDIR, removed after the run), and stream from there; each pair of
    modalities is ranked both ways from one pass over its scores (text->user
    and user->text from the text x user scores)."""
    embed = functools.partial(self.embedder, self.embedder.place(params))
    kind = self.config.get("user_vectors", "model")
    users = (embed("user", np.arange(self.num_users, dtype=np.int32)) if kind == "model"
             else self._average_users(embed, kind))
    with tempfile.TemporaryDirectory(prefix="sempre_eval_") as scratch:
      texts, images = self._embed_split(embed, scratch)
      text_user, user_text = self.ranker.both(texts, users, self.gt["text->user"])
      image_user, user_image = self.ranker.both(images, users, self.gt["image->user"])
      text_image, image_text = self.ranker.both(
          texts[self.caption_texts], images[self.pair_images], self.gt["text->image"])
    return {"text->user": text_user, "image->user": image_user,
            "image->text": image_text, "text->image": text_image,
            "user->text": user_text[self.text_users],
            "user->image": user_image[self.image_users]}

  def _embed_split(self, embed, directory: str) -> tuple["RowFile", "RowFile"]:
    """The split's texts [T, D] and unique images [I, D], embedded batch by
    batch into float32 files in `directory`."""
    paths = [os.path.join(directory, f"{kind}.f32") for kind in ("texts", "images")]
    n = 0
    bar = progress.bar(len(self.first_image_post), f"embedding the {self.split} split", "posts",
                       delay=10, disable=jax.process_index() > 0)
    with open(paths[0], "wb") as texts, open(paths[1], "wb") as images:
      for batch in loader.eval_batches(self.data_dir, self.metadata, self.split,
                                       self.config.batch_size, self.model.image_input):
        t = np.flatnonzero(batch["text_mask"].any(1))
        i = np.flatnonzero(self.first_image_post[n:n + len(batch["user"])])
        n += len(batch["user"])
        texts.write(_host(embed("text", batch["tokens"][t], batch["text_mask"][t])).tobytes())
        images.write(_host(embed("image", batch[self.image_key][i])).tobytes())
        bar.update(len(batch["user"]))
    bar.close()
    return RowFile(paths[0], self.model.embed_dim), RowFile(paths[1], self.model.embed_dim)

  def _average_users(self, embed: "Embedder", kind: str) -> jax.Array:
    """[U, D] each user as the normalised mean of the embeddings of the texts
    ("avg_text") or images ("avg_image") of their training posts (Table 4
    baselines); users without one are zero vectors."""
    if kind not in ("avg_text", "avg_image"):
      raise ValueError(f"eval.user_vectors must be model, avg_text or avg_image, got {kind!r}")
    sums = jnp.zeros([self.num_users, self.model.embed_dim])
    image_input = self.model.image_input if kind == "avg_image" else None
    for batch in loader.eval_batches(self.data_dir, self.metadata, "train",
                                     self.config.batch_size, image_input):
      if kind == "avg_text":
        rows = np.flatnonzero(batch["text_mask"].any(1))
        vectors = embed("text", batch["tokens"][rows], batch["text_mask"][rows])
      else:
        rows = np.flatnonzero(batch["image_mask"])
        vectors = embed("image", batch[self.image_key][rows])
      sums = sums.at[batch["user"][rows]].add(vectors)
    return encoders.l2_normalize(sums)

  def run(self, variables) -> dict:
    """{task: metrics} for the model with `variables` ({"params": ...}), plus
    "oracle" when the split has one."""
    results = self._metrics(self.model_ranks(variables["params"]))
    if self.oracle is not None:
      results["oracle"] = self.oracle
    return results


def train_posts_per_user(data_dir: str, metadata: Mapping) -> np.ndarray:
  """[U] number of training posts of each user."""
  counts = np.zeros([metadata["num_users"]], np.int64)
  for batch in loader.eval_batches(data_dir, metadata, "train", 4096, None):
    counts += np.bincount(batch["user"], minlength=len(counts))
  return counts


def _collect(batches, keys: Sequence[str]) -> dict[str, np.ndarray]:
  parts = [{k: b[k] for k in keys} for b in batches]
  if not parts:
    raise ValueError("the evaluation split has no records")
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


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
  lines.append(f"normalised joint metric (sum of median rank / candidates over "
               f"{', '.join(results['joint']['tasks'])}): "
               f"{results['joint']['normalised_median_rank']:.4f}"
               + (f" (oracle {results['oracle']['joint']['normalised_median_rank']:.4f})"
                  if has_oracle else ""))
  return "\n".join(lines)


# ---------------------------------------------------------------- registry --

class Retrieval(RetrievalEvaluator):
  """The retrieval evaluator of a run (sempre_jax/evals: the Evaluator protocol)."""

  def __init__(self, config: ml_collections.ConfigDict, exp, mesh: Mesh):
    super().__init__(config, exp.module, exp.data_dir, exp.metadata, mesh)
    self.weights = exp.term_weights()

  def score(self, results: Mapping) -> float:
    """The paper's selection (section 4.3) over the terms trained in any stage."""
    return selection_metric(results, self.weights)

  def format(self, results: Mapping) -> str:
    return ("ranks are exact; random = the median rank of a random ranking\n"
            + format_table(results))

  def scalars(self, results: Mapping) -> dict:
    out = {(t, k): v for t in TASKS for k, v in results[t].items()}
    out[("joint_normalised_median_rank",)] = results["joint"]["normalised_median_rank"]
    return out


build = Retrieval
