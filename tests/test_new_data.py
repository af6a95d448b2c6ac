"""New data through a trained model: prepare --vocab_from, evaluate --data (the
same posts rank as in the model's own test split; unknown authors left out or
cold-started; other datasets refused, the workdir untouched), fold-in against
independent references, launch/embed.py's export."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import du2mce
from input_pipeline import loader, prepare, records, word2vec
from sempre_jax.analysis import coldstart, embed, export, newdata, space as space_lib
from sempre_jax.analysis import workdir as workdir_lib
from sempre_jax.models import du2mce as du2mce_model
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = [[f"t{k}w{i}" for i in range(6)] for k in range(4)]


def _posts(users, per_user, rng, prefix, split=None):
  """Posts whose words are the author's own 3 words and their topic's words."""
  out = []
  for i in range(per_user):
    for u in users:
      k = int(u.strip("un")) % 4
      words = list(rng.choice([f"{u}a", f"{u}b", f"{u}c"], 3)) + list(rng.choice(TOPICS[k], 3))
      post = {"post_id": f"{prefix}{u}-{i}", "user_id": u, "text": " ".join(words)}
      if split:
        post["split"] = split(i)
      out.append(post)
  return out


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _prepare(posts, out, **options):
  options = {"workers": 1, "min_count": 1, "word2vec_dim": 8, **options}
  return prepare.prepare(posts, str(out), prepare.Options(**options), log=lambda *a: None)


def _config(data_dir):
  config = du2mce.get_config("tu")
  config.data.dir = data_dir
  config.model.update(embed_dim=16, word_dim=8, user_dim=8, text_filters=(8, 8, 8))
  config.update(batch_size=32, num_epochs=5, learning_rate=0.01, log_every_steps=1000,
                checkpoint_every_steps=1000)
  del config.evals["val"]
  config.best = ""
  config.evals.test.batch_size = 64
  return config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A DU2MCE trained on a crawl of 16 users: (workdir, data dir, posts, test results)."""
  d = tmp_path_factory.mktemp("model")
  posts = _posts([f"u{i}" for i in range(16)], 20, np.random.default_rng(0), "a")
  data = d / "data"
  _prepare(_write(d / "posts.jsonl", posts), data, test_fraction=0.25,
           validation_fraction=0.0)
  _, results = conftest.run(_config(str(data)), d / "work")
  return str(d / "work"), str(data), {p["post_id"]: p for p in posts}, results["test"]


def _split_posts(data_dir, split):
  meta = records.read_metadata(data_dir)
  return [p.decode() for b in loader.eval_batches(data_dir, meta, split, 256, None)
          for p in b["post_id"]]


def _snapshot(directory):
  return {os.path.relpath(os.path.join(r, f), directory): open(os.path.join(r, f), "rb").read()
          for r, _, files in os.walk(directory) for f in files}


# ------------------------------------------------------------ prepare --vocab_from --

def test_vocab_from_keeps_the_vocabulary_users_and_word_vectors(model, tmp_path):
  _, data, _, _ = model
  rng = np.random.default_rng(1)
  posts = _posts(["u3", "n1", "u0", "n0"], 4, rng, "b", split=lambda i: "test")
  posts[0]["text"] += " neverseenword"
  report = _prepare(_write(tmp_path / "b.jsonl", posts), tmp_path / "b", vocab_from=data,
                    split_field="split", word2vec_dim=0)
  out = str(tmp_path / "b")
  vocab = records.read_lines(data, records.VOCAB_FILE)
  assert records.read_lines(out, records.VOCAB_FILE) == vocab
  known = records.read_lines(data, records.USERS_FILE)
  assert records.read_lines(out, records.USERS_FILE) == known + ["n1", "n0"]
  meta = records.read_metadata(out)
  assert (meta["num_known_users"], meta["num_users"]) == (16, 18)
  assert report["vocab_from"]["new_users"] == 2 and report["vocab_from"]["posts_by_new_users"] == 8
  assert report["posts_per_split"] == {"train": 0, "validation": 0, "test": 16}
  # Tokens are the reference's ids (unknown words: <unk>).
  index = {w: i for i, w in enumerate(vocab)}
  b = {p["post_id"]: p for p in posts}
  for batch in loader.eval_batches(out, meta, "test", 64, None):
    for pid, tokens, user in zip(batch["post_id"], batch["tokens"], batch["user"]):
      words = b[pid.decode()]["text"].split()
      assert tokens[:len(words)].tolist() == [index.get(w, records.UNK_ID) for w in words]
      assert (known + ["n1", "n0"])[user] == b[pid.decode()]["user_id"]
  # Word vectors copied; a new user's row: the mean vector of their training words.
  with np.load(os.path.join(data, word2vec.INIT_FILE)) as ref, \
      np.load(os.path.join(out, word2vec.INIT_FILE)) as got:
    np.testing.assert_array_equal(got["words"], ref["words"])
    np.testing.assert_array_equal(got["users"][:16], ref["users"])
    assert got["users"].shape == (18, 8)     # n0, n1 have no training post: the mean word
    np.testing.assert_allclose(got["users"][16], ref["words"][2:].mean(0), rtol=1e-5)


def test_new_users_rows_are_the_mean_of_their_training_words(model, tmp_path):
  _, data, _, _ = model
  posts = _posts(["n5", "u1"], 6, np.random.default_rng(2), "c",
                 split=lambda i: "train" if i < 3 else "test")
  _prepare(_write(tmp_path / "c.jsonl", posts), tmp_path / "c", vocab_from=data,
           split_field="split")
  vocab = {w: i for i, w in enumerate(records.read_lines(data, records.VOCAB_FILE))}
  with np.load(os.path.join(data, word2vec.INIT_FILE)) as z:
    words = z["words"]
  ids = [vocab.get(w, 1) for p in posts if p["user_id"] == "n5" and p["split"] == "train"
         for w in p["text"].split()]
  ids = [i for i in ids if i > 1]
  with np.load(tmp_path / "c" / word2vec.INIT_FILE) as got:
    np.testing.assert_allclose(got["users"][16], words[ids].mean(0), rtol=1e-5)


# ------------------------------------------------------------ evaluate --data --

def test_the_same_posts_prepared_apart_rank_as_in_the_models_test_split(model, tmp_path):
  """The acceptance: the model's test posts, prepared as another crawl with
  --vocab_from, give the in-dataset results."""
  work, data, posts, in_dataset = model
  same = [{**posts[p], "split": "test"} for p in _split_posts(data, "test")]
  _prepare(_write(tmp_path / "same.jsonl", same), tmp_path / "same", vocab_from=data,
           split_field="split")
  got = newdata.evaluate(work, str(tmp_path / "same"))["test"]
  assert got["new_data"]["unknown_posts"] == 0 and got["new_data"]["posts"] == len(same)
  for task in ("text->user", "text->user (2+ posts)", "user->text"):
    assert got[task]["queries"] == in_dataset[task]["queries"] > 0
    for key, value in in_dataset[task].items():
      assert got[task][key] == pytest.approx(value, rel=1e-9), (task, key)
  assert os.path.exists(os.path.join(work, f"eval_test_step{_step(work)}_same.json"))


def _step(work):
  return workdir_lib.checkpoints.find_step(work, "best")


@pytest.fixture(scope="module")
def with_new_users(model, tmp_path_factory):
  """The model's test posts and 4 new users' posts (3 to fold in, 5 to rank each)."""
  _, data, posts, _ = model
  d = tmp_path_factory.mktemp("new")
  rows = [{**posts[p], "split": "test"} for p in _split_posts(data, "test")]
  rows += _posts([f"n{i}" for i in range(4)], 8, np.random.default_rng(3), "n",
                 split=lambda i: "train" if i < 3 else "test")
  _prepare(_write(d / "posts.jsonl", rows), d / "data", vocab_from=data, split_field="split")
  return str(d / "data"), rows


@pytest.mark.parametrize("cold_start", ["none", "avg_text", "fold_in"])
def test_unknown_authors_are_left_out_unless_cold_start_gives_them_a_vector(
    model, with_new_users, cold_start):
  work, _, _, in_dataset = model
  data, rows = with_new_users
  got = newdata.evaluate(work, data, cold_start=cold_start)["test"]
  info = got["new_data"]
  new_tests = sum(r["user_id"].startswith("n") and r["split"] == "test" for r in rows)
  assert (info["unknown_users"], info["unknown_posts"], info["unknown_texts"]) == (
      4, new_tests, new_tests)
  queries = got["text->user"]["queries"]
  if cold_start == "none":
    assert info["left_out_posts"] == new_tests
    assert (queries, got["text->user"]["candidates"]) == (in_dataset["text->user"]["queries"],
                                                         16)
  else:
    assert info["left_out_posts"] == 0 and info["cold_start_users"][cold_start] == 4
    assert (queries, got["text->user"]["candidates"]) == (
        in_dataset["text->user"]["queries"] + new_tests, 20)
    # The users with 2+ training posts are the model's: the new users' queries are not.
    assert got["text->user (2+ posts)"]["queries"] == in_dataset["text->user"]["queries"]
    assert got["text->user"]["median_rank"] < got["text->user"]["random_median_rank"]


def test_another_dataset_is_refused_in_one_line_and_the_workdir_is_untouched(
    model, with_new_users, tmp_path):
  work, _, posts, _ = model
  before = _snapshot(work)
  _prepare(_write(tmp_path / "other.jsonl", list(posts.values())[:200]), tmp_path / "other",
           test_fraction=0.3)
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
                        f"--workdir={work}", f"--data={tmp_path / 'other'}"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode == 1, run.stderr[-2000:]
  assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
  assert "another vocabulary" in run.stderr and "--vocab_from=" in run.stderr
  # Same vocabulary, other users (two swapped): refused by identity, not by shape.
  swapped = tmp_path / "swapped"
  shutil.copytree(with_new_users[0], swapped)
  users = records.read_lines(str(swapped), records.USERS_FILE)
  users[0], users[1] = users[1], users[0]
  records.write_lines(str(swapped), records.USERS_FILE, users)
  with pytest.raises(ValueError, match=r"user 0 is 'u1', the model's 'u0'"):
    newdata.evaluate(work, str(swapped), cold_start="fold_in")
  assert _snapshot(work) == before


# ------------------------------------------------------------------ fold-in --

@pytest.fixture(scope="module")
def space(model, with_new_users):
  work, _, _, _ = model
  exp, variables, _ = workdir_lib.restore(work)
  data = with_new_users[0]
  return exp, variables["params"], space_lib.Space(exp.module, variables["params"], data,
                                                   records.read_metadata(data))


def _reference_loss(known, texts, owner, users, margin):
  """L of coldstart's docstring in NumPy (text-user only, weight 1)."""
  out = 0.0
  for k, u in enumerate(users):
    a = texts[owner == k]
    hinge = np.maximum(0, margin - (a @ u)[:, None] + a @ known.T).mean(1)
    out += hinge.mean()
  return out


def test_fold_in_starts_at_the_towers_view_of_its_rows_and_lowers_the_loss(space):
  exp, params, s = space
  ev = coldstart.evidence(s, "train", 16)
  assert ev.num_users == 4 and np.bincount(ev.text_user).tolist() == [3, 3, 3, 3]
  known = s.users(np.arange(16))
  rows = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  fold = lambda steps: coldstart.fold_in(exp.module, params["user"], known, ev, {"tu": 1.0},
                                         rows, margin=0.2, steps=steps, learning_rate=0.05)
  start, folded = fold(0)
  assert folded.all()
  # Reference: the model's own user tower with these rows in its table.
  table = {**params, "user": {**params["user"], "user_embed": {"embedding": rows}}}
  tower = du2mce_model.DU2MCE(**{**_fields(exp.module), "num_users": 4})
  want = tower.apply({"params": table}, np.arange(4), method=tower.embed_user)
  np.testing.assert_allclose(start, want, atol=1e-6)
  end, _ = fold(100)
  ref = lambda users: _reference_loss(known, ev.texts, ev.text_user, users, 0.2)
  assert ref(end) < 0.8 * ref(start), (ref(end), ref(start))
  # Users fold in independently: one at a time gives the same vectors.
  for k in range(4):
    one = coldstart.Evidence(ev.texts[ev.text_user == k], np.zeros(3, np.int64),
                             ev.images[:0], ev.image_user[:0], 1)
    alone, _ = coldstart.fold_in(exp.module, params["user"], known, one, {"tu": 1.0},
                                 rows[k:k + 1], margin=0.2, steps=100, learning_rate=0.05)
    np.testing.assert_allclose(alone[0], end[k], atol=1e-5)


def _fields(module):
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in ("parent", "name")}


def test_avg_text_is_the_normalised_mean_text_embedding(space):
  _, _, s = space
  ev = coldstart.evidence(s, "train", 16)
  got = coldstart.avg_text(ev)
  for k in range(4):
    mean = ev.texts[ev.text_user == k].mean(0)
    np.testing.assert_allclose(got[k], mean / np.linalg.norm(mean), atol=1e-5)


# -------------------------------------------------------------------- embed --

def test_embed_writes_the_export_format(model, tmp_path):
  work, data, posts, _ = model
  rows = [posts[p] for p in _split_posts(data, "test")[:6]]
  rows += _posts(["n7"], 3, np.random.default_rng(4), "e")
  path = _write(tmp_path / "posts.jsonl", rows)
  out = str(tmp_path / "export")
  counts = embed.embed(work, path, out, prepare.Options(word2vec_dim=0))
  assert counts["new_users"] == {"fold_in": 1, "avg_text": 0}
  manifest = export.read_manifest(out)
  assert manifest["posts"] == os.path.abspath(path) and manifest["data_dir"] is None
  load = lambda name: [(np.load(p + ".npy"), open(p + ".tsv").read().splitlines()[1:])
                       for p in export.shard_paths(out, name)]
  (texts, text_ids), = load("texts")
  (users, user_ids), = load("users")
  assert sorted(line.split("\t")[0] for line in text_ids) == sorted(r["post_id"] for r in rows)
  names = [line.split("\t")[1] for line in user_ids]
  assert sorted(names) == sorted({r["user_id"] for r in rows})
  np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1, atol=1e-5)
  # The known posts and users are where the model puts them (launch/export.py's space).
  model_space = space_lib.Space.restore(work)
  meta = records.read_metadata(data)
  by_id = {}
  for batch in loader.eval_batches(data, meta, "test", 256, None):
    for pid, tokens in zip(batch["post_id"], batch["tokens"]):
      by_id[pid.decode()] = tokens
  for vector, line in zip(texts, text_ids):
    pid = line.split("\t")[0]
    if pid in by_id:
      np.testing.assert_allclose(vector, model_space.texts(by_id[pid][None])[0], atol=1e-5)
  known = records.read_lines(data, records.USERS_FILE)
  for vector, line in zip(users, user_ids):
    index, name = line.split("\t")
    if name in known:
      assert int(index) == known.index(name)
      np.testing.assert_allclose(vector, model_space.users(np.array([int(index)]))[0],
                                 atol=1e-5)
