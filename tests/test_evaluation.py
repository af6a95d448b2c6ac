"""Metrics: hand cases, the exact random baseline against simulation; the
evaluator: compiled once, streamed ranks against a NumPy reference."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax._src import dispatch, monitoring

from configs import du2mce
from input_pipeline import records
from sempre_jax import mesh as mesh_lib
from sempre_jax.evals import ranks, retrieval, retrieval as evaluation
from sempre_jax.experiment import Experiment
from tests import conftest


def test_rank_metrics_hand_case():
  untied = ranks.Ranks.of(above=[0, 1, 5, 19], tied=[0] * 4, tied_gts=[1] * 4)
  m = evaluation.rank_metrics(untied, num_candidates=100)
  assert m["median_rank"] == 4.0 and m["mean_rank"] == 7.25
  assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (0.25, 0.5, 0.75, 1.0)
  assert m["random_median_rank"] == 50 and m["random_mean_rank"] == 50.5
  assert m["random_R@10"] == pytest.approx(0.1)


def test_rank_metrics_under_ties_hand_case():
  """One ground truth tied with 29 others at the top (expected rank 15.5: R@10
  is 10/30, not 0), and 2 ground truths tied with 3 others below 4 candidates
  (rank 5 w.p. 2/5, 6 w.p. 3/10, 7 w.p. 1/5, 8 w.p. 1/10: R@5 = 2/5, R@10 = 1)."""
  tied = ranks.Ranks.of(above=[0, 4], tied=[29, 3], tied_gts=[1, 2])
  m = evaluation.rank_metrics(tied, num_candidates=100, num_gts=np.array([1, 2]))
  assert m["mean_rank"] == pytest.approx((15.5 + 6) / 2)
  assert m["median_rank"] == pytest.approx((15.5 + 6) / 2)
  assert m["R@1"] == pytest.approx(1 / 30 / 2)
  assert m["R@5"] == pytest.approx((5 / 30 + 2 / 5) / 2)
  assert m["R@10"] == pytest.approx((10 / 30 + 1) / 2)
  assert m["R@50"] == 1.0


def test_random_baseline_matches_simulation():
  """Best of g ground truths shuffled among C candidates, g from 1 to 30."""
  rng = np.random.default_rng(0)
  c, gts = 200, rng.integers(1, 31, 4000)
  simulated = np.array([rng.permutation(c)[:g].min() + 1 for g in gts])
  m = evaluation.random_metrics(gts, c)
  assert abs(m["random_median_rank"] - np.median(simulated)) <= 1
  assert abs(m["random_mean_rank"] - simulated.mean()) < 0.05 * simulated.mean()
  for k in evaluation.RECALL_AT:
    assert abs(m[f"random_R@{k}"] - np.mean(simulated <= k)) < 0.02


def test_joint_metric_sums_normalised_medians_of_tasks_with_queries():
  results = {"text->user": {"queries": 3, "median_rank": 5.0, "candidates": 500},
             "image->text": {"queries": 0, "candidates": 0},
             "image->user": {"queries": 2, "median_rank": 50.0, "candidates": 500}}
  joint = evaluation.with_joint_metric(results)["joint"]
  assert joint["normalised_median_rank"] == 5 / 500 + 50 / 500
  assert joint["tasks"] == ["text->user", "image->user"]
  # Model selection counts only the tasks whose loss weight is non-zero.
  assert evaluation.selection_metric(results, {"tu": 0.0, "it": 0.5, "iu": 0.5}) == 50 / 500


def test_random_baseline_equals_the_full_cdf():
  """The bisection's median and the R@K equal those read off the CDF at every
  k = 1..C (the former evaluator's [C x distinct g] table), many distinct g."""
  rng = np.random.default_rng(1)
  for c, high in ((1, 2), (7, 8), (500, 60), (3000, 400)):
    gts = rng.integers(1, high, 2000)
    ks = np.arange(1, c + 1)
    g, weight = np.unique(gts, return_counts=True)
    cdf = evaluation.random_rank_cdf(ks, g, weight, c)
    m = evaluation.random_metrics(gts, c)
    assert m["random_median_rank"] == ks[np.searchsorted(cdf, 0.5 - 1e-12)]
    for k in evaluation.RECALL_AT:
      assert m[f"random_R@{k}"] == cdf[min(k, c) - 1]


# ------------------------------------------------------- the evaluator itself --

@contextlib.contextmanager
def compilations():
  """The names of the XLA compilations inside the block (a list filled as they happen)."""
  names = []
  listener = lambda event, duration, **kw: names.append(kw.get("fun_name", "?")) \
      if event == dispatch.BACKEND_COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """DU2MCE on a 12-user embedded corpus, and two parameter sets."""
  config = du2mce.get_config()
  config.data.embedded.update(num_users=12, num_topics=3, posts_per_user=20, feature_dim=8)
  config.model.update(embed_dim=16, word_dim=8, user_dim=8, text_filters=(8, 8, 8))
  config.evals.test.update(batch_size=16, query_chunk=16, candidate_chunk=4)
  workdir = tmp_path_factory.mktemp("evaluation")
  exp = Experiment(config, *conftest.prepared(config, workdir), str(workdir))
  batch = exp.data.host_inputs(next(iter(exp.data.train_dataset(16, 0, 1))))
  return exp, [exp.init_variables(jax.random.key(seed), batch) for seed in (0, 1)]


def test_second_run_compiles_nothing(experiment):
  """The evaluator's embedder and ranker are built once: a second run, with
  other parameters, reuses every compiled function (4 devices)."""
  exp, (first, second) = experiment
  evaluator = retrieval.build(exp.config.evals.test, exp, mesh_lib.make_mesh())
  before = evaluator.run(first)
  with compilations() as compiled:
    after = evaluator.run(second)
  assert compiled == []
  for task in evaluation.TASKS:
    assert after[task]["queries"] == before[task]["queries"] > 0
    assert after[task]["mean_rank"] != before[task]["mean_rank"]
  assert after["oracle"] == before["oracle"]


class Codes(nn.Module):
  """Towers that look up small-integer codes (exact float32 scores, many ties):
  a text is the sum of its words' codes, an image its features, a user its code."""
  num_users: int
  vocab_size: int
  embed_dim: int
  image_input: str = "features"

  def setup(self):
    self.words = self.param("words", nn.initializers.zeros, (self.vocab_size, self.embed_dim))
    self.users = self.param("users", nn.initializers.zeros, (self.num_users, self.embed_dim))

  def embed_text(self, tokens, text_mask):
    return jnp.sum(self.words[tokens] * text_mask[..., None], axis=1)

  def embed_image(self, image):
    return image

  def embed_user(self, users):
    return self.users[users]


def reference_ranks(scores, gts):
  """(above, tied, tied_gts) per query by brute force: scores [Q, C], gts: sets."""
  out = []
  for s, gt in zip(scores, gts):
    gt = np.isin(np.arange(len(s)), list(gt))
    best = s[gt].max()
    out.append([((s > best) & ~gt).sum(), ((s == best) & ~gt).sum(), (s[gt] == best).sum()])
  return ranks.Ranks.of(*np.array(out).reshape(-1, 3).T)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_streamed_ranks_match_a_numpy_reference(tmp_path, num_devices):
  """Every task's (above, tied, tied_gts), streamed through files, blocks of 4
  queries and chunks of 2 candidates, against brute force on score matrices
  built from the posts: ties everywhere, images posted by several users,
  users with several texts, images with several captions, posts without text."""
  rng = np.random.default_rng(0)
  num_users, dim, vocab = 6, 3, 8
  words = rng.integers(-1, 2, [vocab, dim]).astype(np.float32)
  codes = rng.integers(-1, 2, [num_users, dim]).astype(np.float32)
  pictures = rng.integers(-1, 2, [12, dim]).astype(np.float32)
  posts = []
  for i in range(70):
    image = int(rng.integers(-1, 12))
    posts.append(dict(post_id=f"p{i}", user=int(rng.integers(num_users)),
                      tokens=rng.integers(2, vocab, rng.integers(0, 3)), image_id=image))
  train = [dict(post_id=f"t{i}", user=i % 4, tokens=[2]) for i in range(10)]
  np.save(records.table_path(str(tmp_path), "image_features"), pictures)
  meta = {"num_users": num_users, "vocab_size": vocab, "max_len": records.MAX_LEN,
          "feature_dim": dim, "image_size": 0, "num_images": 12,
          "splits": {"train": records.write_split(str(tmp_path), "train",
                                                  [records.rows_of(train)], 1),
                     "test": records.write_split(str(tmp_path), "test",
                                                 [records.rows_of(posts)], 3, block_posts=8)}}
  records.write_metadata(str(tmp_path), meta)
  config = ml_collections.ConfigDict(dict(
      du2mce.RETRIEVAL, split="test", batch_size=8, max_image_text_pairs=5, query_chunk=4,
      candidate_chunk=2))
  model = Codes(num_users, vocab, dim)
  evaluator = retrieval.RetrievalEvaluator(config, model, str(tmp_path), meta,
                                           mesh_lib.make_mesh(num_devices))
  got = evaluator.model_ranks({"words": words, "users": codes})

  # The tasks from the posts in split order (blocks of 8 over 3 shards), by hand.
  texts = [p for p in posts if len(p["tokens"])]
  text_vec = np.array([words[p["tokens"]].sum(0) for p in texts], np.float64)
  image_ids = list(dict.fromkeys(p["image_id"] for p in posts if p["image_id"] >= 0))
  image_vec = pictures[image_ids].astype(np.float64)
  posters = [{p["user"] for p in posts if p["image_id"] == i} for i in image_ids]
  text_users = sorted({p["user"] for p in texts})
  image_users = sorted({p["user"] for p in posts if p["image_id"] >= 0})
  captioned = sorted({image_ids.index(p["image_id"]) for p in texts if p["image_id"] >= 0})[:5]
  captions = [t for t, p in enumerate(texts) if p["image_id"] >= 0
              and image_ids.index(p["image_id"]) in captioned]
  caption_image = [captioned.index(image_ids.index(texts[t]["image_id"])) for t in captions]
  text_user = text_vec @ codes.T
  image_user = image_vec @ codes.T
  image_text = image_vec[captioned] @ text_vec[captions].T
  expected = {
      "text->user": reference_ranks(text_user, [{p["user"]} for p in texts]),
      "image->user": reference_ranks(image_user, posters),
      "user->text": reference_ranks(text_user.T[text_users], [
          {t for t, p in enumerate(texts) if p["user"] == u} for u in text_users]),
      "user->image": reference_ranks(image_user.T[image_users], [
          {i for i, users in enumerate(posters) if u in users} for u in image_users]),
      "image->text": reference_ranks(image_text, [
          {c for c, i in enumerate(caption_image) if i == j} for j in range(len(captioned))]),
      "text->image": reference_ranks(image_text.T, [{i} for i in caption_image]),
  }
  for task, want in expected.items():
    for field in ("above", "tied", "tied_gts"):
      np.testing.assert_array_equal(getattr(got[task], field), getattr(want, field),
                                    err_msg=f"{task} {field}")
  every = ranks.Ranks.concatenate(list(expected.values()))
  assert every.tied.sum() > 100 and (every.tied_gts > 1).sum() > 10
  assert max(len(p) for p in posters) > 1 and len(texts) < len(posts)
  results = evaluator.run({"params": {"words": words, "users": codes}})
  for task, want in expected.items():
    assert results[task]["mean_rank"] == pytest.approx(want.rank.mean())
