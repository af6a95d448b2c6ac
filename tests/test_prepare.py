"""The prepare job: bad input reported (never fatal), leakage-free splits on real
tweets, Word2Vec initialisation reaching the model, a corpus without images."""

import collections
import hashlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy import sparse

from configs import du2mce
from input_pipeline import interactions, loader, prepare, records, text, word2vec
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWEETS = os.path.join(ROOT, "..", "shared", "data", "mediaeval2016", "posts.jsonl")
IMAGES = ["rgb.png", "grey.png", "cmyk.jpg", "rgba.png", "palette.png"]
WORDS = ["storm", "flood", "shark", "street", "city", "rescue", "river", "night"]


def _png(mode, size=(20, 12), color=None):
  buf = io.BytesIO()
  fmt = "JPEG" if mode == "CMYK" else "PNG"
  Image.new(mode, size, color if color is not None else (
      (10, 200, 30, 40)[:len(mode)] if mode != "P" else 3)).save(buf, format=fmt)
  return buf.getvalue()


def _read_split(data_dir, split):
  """The posts of a split as dicts of their fields."""
  batches = loader.eval_batches(data_dir, records.read_metadata(data_dir), split, 512, None)
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["user"]))]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
  """A crawl with every kind of bad input; returns (dir, expected valid post ids)."""
  d = tmp_path_factory.mktemp("crawl")
  (d / "images").mkdir()
  (tmp_path_factory.getbasetemp() / "outside.png").write_bytes(_png("RGB"))
  for name, data in {"rgb.png": _png("RGB"), "grey.png": _png("L"),
                     "cmyk.jpg": _png("CMYK"), "rgba.png": _png("RGBA"),
                     "palette.png": _png("P"), "corrupt.jpg": b"not an image at all",
                     "truncated.png": _png("RGB", (64, 64))[:-40] ,
                     "bomb.png": _png("L", (3000, 3000), 0)}.items():
    (d / "images" / name).write_bytes(data)
  trunc = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      trunc, format="JPEG")
  (d / "images" / "truncated.jpg").write_bytes(trunc.getvalue()[:len(trunc.getvalue()) // 2])
  os.symlink(tmp_path_factory.getbasetemp() / "outside.png", d / "images" / "link.png")
  rng = np.random.default_rng(0)
  lines, valid = [], []

  def post(pid, user="u1", words=None, image=None, **extra):
    t = " ".join(rng.choice(WORDS, 6)) if words is None else words
    return json.dumps({"post_id": pid, "user_id": user, "text": t, "image": image,
                       "timestamp": "Wed Apr 17 18:57:37 +0000 2013", **extra})

  for i in range(30):
    lines.append(post(f"ok{i}", user=f"u{i % 3}")); valid.append(f"ok{i}")
  for i, img in enumerate(IMAGES):
    lines.append(post(f"img{i}", image=f"images/{img}")); valid.append(f"img{i}")
  lines.append(b'{"post_id": "broken", "user_id": "u1", "text": "a'.decode())  # malformed
  lines.append(None)                                                          # bad UTF-8
  lines.append(json.dumps({"post_id": "nouser", "text": "storm flood"}))
  lines.append(json.dumps({"post_id": "empty", "user_id": "u1", "text": "", "image": None}))
  lines.append(post("ok0"))                                                   # duplicate id
  for pid, img in [("corrupt", "images/corrupt.jpg"), ("trunc", "images/truncated.jpg"),
                   ("bomb", "images/bomb.png"), ("escape", "../outside.png"),
                   ("abs", str(tmp_path_factory.getbasetemp() / "outside.png")),
                   ("link", "images/link.png"), ("missing", "images/nope.png")]:
    lines.append(post(pid, image=img)); valid.append(pid)   # keeps its text
  lines.append(post("urlonly", words="http://t.co/x @cnn :)", image="images/rgb.png"))
  valid.append("urlonly")                                   # keeps its image
  lines.append(post("nothing", words="http://t.co/y", image="images/corrupt.jpg"))
  path = d / "posts.jsonl"
  with open(path, "wb") as f:
    for line in lines:
      f.write(b'{"post_id": "utf", "user_id": "u1", "text": "\xff\xfe"}\n' if line is None
              else line.encode() + b"\n")
  return str(path), valid


EXPECTED = {"malformed_json": 1, "invalid_utf8": 1, "missing_user_id": 1,
            "no_text_no_image": 1, "duplicate_post_id": 1, "corrupt_image": 2,
            "truncated_image": 1, "image_too_large": 1, "image_outside_corpus": 3,
            "image_missing": 1, "non_rgb_image": 4, "empty_text_after_cleaning": 2,
            "nothing_left_after_cleaning": 1}


@pytest.fixture(scope="module")
def prepared_bad(bad_corpus, tmp_path_factory):
  posts, valid = bad_corpus
  out = str(tmp_path_factory.mktemp("prepared"))
  options = prepare.Options(test_fraction=0, validation_fraction=0, min_count=2,
                            max_image_pixels=1_000_000, image_size=16, word2vec_dim=8,
                            workers=1)
  return prepare.prepare(posts, out, options, log=lambda *a: None), out, valid


def test_every_bad_input_is_counted_and_every_valid_post_is_written(prepared_bad, bad_corpus):
  report, out, valid = prepared_bad
  assert {r: p["count"] for r, p in report["problems"].items()} == EXPECTED
  assert report["problems"]["malformed_json"]["examples"] == ["line 36"]
  assert report["posts_valid"] == report["posts_written"] == len(valid)
  written = _read_split(out, "train")
  assert sorted(str(p["post_id"], "utf-8") for p in written) == sorted(valid)
  by_id = {str(p["post_id"], "utf-8"): p for p in written}
  assert by_id["urlonly"]["image_mask"] and not by_id["urlonly"]["text_mask"].any()
  assert not by_id["corrupt"]["image_mask"] and by_id["corrupt"]["text_mask"].any()
  assert by_id["img0"]["image_id"] == by_id["urlonly"]["image_id"]       # same file
  # The pixel table's row of an image: the file, decoded, converted and fitted.
  pixels = records.read_table(out, records.read_metadata(out), "image")
  for i, name in enumerate(IMAGES):
    with Image.open(os.path.join(os.path.dirname(bad_corpus[0]), "images", name)) as img:
      expected = ImageOps.fit(img.convert("RGB"), (16, 16), Image.BILINEAR)
    np.testing.assert_array_equal(pixels[by_id[f"img{i}"]["image_id"]], np.asarray(expected))
  assert json.load(open(os.path.join(out, prepare.REPORT_FILE)))["posts_written"] == len(valid)


def test_strict_stops_at_the_first_bad_record(bad_corpus, tmp_path):
  posts, _ = bad_corpus
  with pytest.raises(prepare.PrepareError, match="line 36: malformed_json"):
    prepare.prepare(posts, str(tmp_path), prepare.Options(strict=True, workers=1))
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"),
                        f"--posts={posts}", f"--out={tmp_path}", "--strict", "--workers=1"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode != 0 and "line 36: malformed_json" in run.stderr


# ------------------------------------------------------------- word2vec ------

def test_word2vec_rows_and_user_means_match_gensim():
  sentences = [["storm", "flood", "city"], ["shark", "storm"], ["city", "night"]] * 5
  model = word2vec.train(sentences, dim=8, epochs=2)
  vocab = [text.PAD, text.UNK, "storm", "city", "flood", "shark", "night"]
  words = word2vec.word_matrix(model, vocab)
  for i, w in enumerate(vocab[2:], 2):
    np.testing.assert_array_equal(words[i], model.wv[w])
  assert not words[0].any()
  users = np.array([0, 0, 0, 1, 1, 0])
  token_ids = np.array([2, 3, 1, 5, 2, 0])   # unk and pad are not words
  means = word2vec.user_means(words, users, token_ids, 3)
  np.testing.assert_allclose(means[0], (model.wv["storm"] + model.wv["city"]) / 2, rtol=1e-6)
  np.testing.assert_allclose(means[1], (model.wv["shark"] + model.wv["storm"]) / 2, rtol=1e-6)
  np.testing.assert_allclose(means[2], words[2:].mean(0), rtol=1e-6)   # no words


def _tiny_config(data_dir, dim, **overrides):
  config = du2mce.get_config()
  config.data.dir = data_dir
  config.model.update(embed_dim=16, word_dim=dim, user_dim=dim, text_filters=(8, 8, 8),
                      image_input="pixels")
  config.update({"batch_size": 8, "num_epochs": 0, "log_every_steps": 1, **overrides})
  del config.evals["val"]            # a tiny corpus: no validation split to select on
  config.best = ""
  config.evals.test.batch_size = 32
  return config


def test_word2vec_initialisation_reaches_the_model(prepared_bad, bad_corpus, tmp_path):
  report, out, _ = prepared_bad
  config = _tiny_config(out, 8)
  config.evals.test.split = "train"
  state, _ = conftest.run(config, tmp_path / "run")
  init = np.load(os.path.join(out, word2vec.INIT_FILE))
  np.testing.assert_array_equal(state.params["text"]["word_embed"]["embedding"], init["words"])
  np.testing.assert_array_equal(state.params["user"]["user_embed"]["embedding"], init["users"])
  # Independently: each user's row is the mean of the vectors of its training words.
  vocab = open(os.path.join(out, "vocab.txt")).read().split("\n")[:-1]
  index = {w: i for i, w in enumerate(vocab)}
  raw = {}
  for line in open(bad_corpus[0], "rb"):
    try:
      p = json.loads(line)
      raw.setdefault(p["post_id"], p)
    except ValueError:
      pass
  tokens = collections.defaultdict(list)
  for rec in _read_split(out, "train"):
    words = text.clean_text(raw[str(rec["post_id"], "utf-8")]["text"])
    tokens[int(rec["user"])] += [index[w] for w in words if w in index]
  for u, ids in tokens.items():
    np.testing.assert_allclose(init["users"][u], init["words"][ids].mean(0), rtol=1e-5)
  config.model.word_dim = 16
  with pytest.raises(ValueError, match="word_embed"):
    conftest.run(config, tmp_path / "run2")


# ------------------------------------------------------ a corpus without images --

def test_text_only_corpus_trains_and_evaluates(tmp_path, capsys):
  rng = np.random.default_rng(1)
  lines = [json.dumps({"post_id": str(i), "user_id": f"u{i % 6}", "subject": "re",
                       "text": " ".join(rng.choice(WORDS, 8)) + f" w{i}"})
           for i in range(240)]
  (tmp_path / "posts.jsonl").write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "data")
  report = prepare.prepare(str(tmp_path / "posts.jsonl"), out, prepare.Options(
      text_fields=("subject", "text"), word2vec_dim=8, workers=1), log=lambda *a: None)
  assert report["num_images"] == 0 and report["feature_dim"] == 0
  # 240 posts: a validation split of 2% is too small to measure (a warning).
  validation = report["posts_per_split"]["validation"]
  assert validation < prepare.MIN_HELD_OUT
  assert f"warning: the validation split has {validation} posts" in prepare.summary(report)
  assert [n for n in report["notes"] if "no images" in n and "image_input=features" in n]
  train_users = {int(p["user"]) for p in _read_split(out, "train")}
  test_posts = _read_split(out, "test")
  assert test_posts and {int(p["user"]) for p in test_posts} <= train_users
  # image_input="features" with feature_dim 0: an image tower without parameters.
  config = _tiny_config(out, 8, num_epochs=1)
  config.model.image_input = "features"
  state, results = conftest.run(config, tmp_path / "r")
  results = results["test"]
  assert "image" not in state.params and int(state.step) > 0
  table = capsys.readouterr().out
  assert "image->text" in table and "(no queries in this split)" in table
  counts = np.bincount([int(p["user"]) for p in _read_split(out, "train")])
  texts = [p for p in test_posts if p["text_mask"].any()]
  assert results["text->user (2+ posts)"]["queries"] == sum(
      counts[int(p["user"])] >= 2 for p in texts)
  assert results["image->text"]["queries"] == 0


# ------------------------------------------------------------ real tweets ----

@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
  if not os.path.exists(TWEETS):
    pytest.skip(f"real data not found at {TWEETS}")
  out = str(tmp_path_factory.mktemp("tweets"))
  report = prepare.prepare(TWEETS, out, prepare.Options(
      held_out_authors="any", seed=3, word2vec_dim=0, workers=2), log=lambda *a: None)
  return report, out


def _pixel_hash(path):
  with Image.open(path) as img:
    rgb = img.convert("RGB")
  return hashlib.sha256(rgb.tobytes()).hexdigest()


def test_real_tweets_no_image_or_near_duplicate_text_in_two_splits(tweets):
  report, out = tweets
  assert report["posts_written"] == report["posts_valid"] > 15_000
  raw = {}
  with open(TWEETS) as f:
    for line in f:
      p = json.loads(line)
      raw[p["post_id"]] = p
  folder = os.path.dirname(TWEETS)
  hashes, split_of_hash, sets, split_of_set = {}, {}, {}, {}
  for split in records.SPLITS:
    for rec in _read_split(out, split):
      p = raw[str(rec["post_id"], "utf-8")]
      if rec["image_mask"]:
        if p["image"] not in hashes:
          hashes[p["image"]] = _pixel_hash(os.path.join(folder, p["image"]))
        split_of_hash.setdefault(hashes[p["image"]], set()).add(split)
      words = frozenset(text.clean_text(p["text"]))
      if words:
        split_of_set.setdefault(words, set()).add(split)
  assert all(len(s) == 1 for s in split_of_hash.values())
  assert all(len(s) == 1 for s in split_of_set.values())      # exact duplicates
  # Near-duplicates, brute force: Jaccard >= 0.8 between word sets of two splits.
  keys = list(split_of_set)
  vocab = {w: i for i, w in enumerate({w for k in keys for w in k})}
  rows = np.repeat(np.arange(len(keys)), [len(k) for k in keys])
  cols = [vocab[w] for k in keys for w in k]
  x = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(keys), len(vocab)))
  split = np.array([next(iter(split_of_set[k])) for k in keys])
  sizes = np.asarray(x.sum(1)).ravel()
  for a in records.SPLITS:
    for b in records.SPLITS:
      if a < b and (split == a).any() and (split == b).any():
        ia, ib = np.flatnonzero(split == a), np.flatnonzero(split == b)
        inter = (x[ia] @ x[ib].T).tocoo()
        jac = inter.data / (sizes[ia][inter.row] + sizes[ib][inter.col] - inter.data)
        assert not (jac >= 0.8 - 1e-9).any(), (a, b)


def test_users_file_maps_indices_back_to_original_ids(prepared_bad):
  report, out, _ = prepared_bad
  users = records.read_lines(out, records.USERS_FILE)
  assert len(users) == records.read_metadata(out)["num_users"] == report["users"]
  for post in _read_split(out, "train"):
    pid = str(post["post_id"], "utf-8")
    if pid.startswith("ok"):
      assert users[post["user"]] == f"u{int(pid[2:]) % 3}"


# ------------------------------------------------------------------ interests --

def test_interest_field_collects_each_users_values_over_all_kept_posts(tmp_path):
  rng = np.random.default_rng(2)
  post = lambda pid, user, **extra: json.dumps(
      {"post_id": pid, "user_id": user, "text": " ".join(rng.choice(WORDS, 6)), **extra})
  groups = {"u0": ["sci.space", "rec.autos"], "u1": ["rec.autos"], "u2": [None],
            "u3": ["talk\tpolitics  misc"], "u4": [f"g{i}" for i in range(20)]}
  lines = [post(f"{u}-{i}", u, **({"group": g[i % len(g)]} if g[i % len(g)] else {}))
           for i in range(20) for u, g in groups.items()]
  lines += [post("u1-0", "u1", group="comp.dropped"),      # a duplicate id: dropped
            post("u2-x", "u2", group=["a", "list"])]        # not a value: no interest
  (tmp_path / "posts.jsonl").write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "data")
  report = prepare.prepare(str(tmp_path / "posts.jsonl"), out, prepare.Options(
      interest_field="group", word2vec_dim=0, workers=1), log=lambda *a: None)
  assert report["interests"] == {"field": "group", "labels": 23, "users_with_interests": 4}
  assert "interests (group): 23 labels, 4 of 5 users have one" in prepare.summary(report)
  users = records.read_lines(out, records.USERS_FILE)
  interests = dict(zip(users, records.read_lines(out, records.INTERESTS_FILE)))
  assert interests == {"u0": "rec.autos\tsci.space", "u1": "rec.autos", "u2": "",
                       "u3": "talk politics misc",
                       "u4": "\t".join(sorted(f"g{i}" for i in range(20)))}
  # The labels are over the posts of every split: some of u4's are held out.
  held_out = [str(p["post_id"], "utf-8") for split in ("validation", "test")
              for p in _read_split(out, split)]
  assert any(pid.startswith("u4-") for pid in held_out)
  plain = prepare.prepare(str(tmp_path / "posts.jsonl"), str(tmp_path / "plain"),
                          prepare.Options(word2vec_dim=0, workers=1), log=lambda *a: None)
  assert plain["interests"] is None
  assert records.read_lines(str(tmp_path / "plain"), records.INTERESTS_FILE) is None


# ---------------------------------------------------------- actions, follows --

def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def social_crawl(tmp_path_factory):
  """Posts (one image known only by its vector, one post whose image has no vector),
  actions and follows with one line of each kind of problem."""
  d = tmp_path_factory.mktemp("social")
  (d / "images").mkdir()
  (d / "images" / "rgb.png").write_bytes(_png("RGB"))
  vector = np.arange(4, dtype=np.float32)
  np.savez(d / "feats.npz", f1=vector)
  rng = np.random.default_rng(3)
  stamp = lambda i: 1_420_070_400 + 60 * i
  posts = [{"post_id": f"p{i}", "user_id": f"u{i % 3}", "timestamp": stamp(i),
            "text": " ".join(rng.choice(WORDS, 6))} for i in range(10)]
  posts += [{"post_id": "pf", "user_id": "u0", "text": "storm", "image": "f1"},
            {"post_id": "pgone", "user_id": "u1", "text": "http://t.co/x",
             "image": "images/rgb.png"}]                 # no vector: nothing left
  actions = [{"user_id": "u1", "post_id": "p0", "timestamp": 100, "kind": "like"},
             {"user_id": "u1", "post_id": "p0", "timestamp": 200},     # duplicate_action
             {"user_id": "lurker", "post_id": "p1"},                   # the post's time
             {"user_id": "u2", "post_id": "nope"},                     # unknown_post_id
             {"user_id": "u2", "post_id": "pgone"},                    # post_not_written
             {"user_id": "u2", "post_id": "p2", "timestamp": "yesterday"},
             {"post_id": "p3"}, {"user_id": "u2"}, "{not json",
             {"user_id": "u0", "post_id": "pf", "timestamp": "2015-01-01T00:00:00+00:00",
              "kind": "reshare"}]
  follows = [{"user_id": "u0", "followee_id": "u1"}, {"user_id": "u0", "followee_id": "u1"},
             {"user_id": "u1", "followee_id": "u1"}, {"user_id": "u2"},
             {"user_id": "lurker", "followee_id": "ghost"}, "[1, 2]"]
  return dict(posts=_jsonl(d / "posts.jsonl", posts),
              actions=_jsonl(d / "actions.jsonl", actions),
              follows=_jsonl(d / "follows.jsonl", follows),
              features=str(d / "feats.npz"), vector=vector, stamp=stamp)


def test_actions_and_follows_become_the_graph(social_crawl, tmp_path):
  c = social_crawl
  out = str(tmp_path / "data")
  report = prepare.prepare(c["posts"], out, prepare.Options(
      actions=c["actions"], follows=c["follows"], image_features=c["features"],
      test_fraction=0, validation_fraction=0, min_count=1, word2vec_dim=0, workers=1),
      log=lambda *a: None)
  count = lambda kind: {r: p["count"] for r, p in report[kind]["problems"].items()}
  assert count("actions") == {"duplicate_action": 1, "unknown_post_id": 1,
                              "post_not_written": 1, "bad_timestamp": 1, "missing_user_id": 1,
                              "missing_post_id": 1, "malformed_json": 1}
  assert count("follows") == {"duplicate_follow": 1, "self_follow": 1,
                              "missing_followee_id": 1, "malformed_json": 1}
  # Users who only act or follow come after those with posts.
  users = records.read_lines(out, records.USERS_FILE)
  assert users == ["u0", "u1", "u2", "lurker", "ghost"] and report["users_without_posts"] == 2
  meta = records.read_metadata(out)
  assert (meta["num_users"], meta["users_with_posts"], meta["image_size"]) == (5, 3, 0)
  data = interactions.load(out, meta, "image_features")
  row = {p: r for r, p in enumerate(data.post_ids)}
  assert sorted(row) == sorted([f"p{i}" for i in range(10)] + ["pf"])
  u = {name: i for i, name in enumerate(users)}
  assert data.actions.tolist() == [[u["u1"], row["p0"], 100],
                                   [u["lurker"], row["p1"], c["stamp"](1)],
                                   [u["u0"], row["pf"], 1_420_070_400]]
  assert data.follows.tolist() == [[u["u0"], u["u1"]], [u["lurker"], u["ghost"]]]
  with np.load(os.path.join(out, records.GRAPH_FILE)) as g:
    assert g["action_kinds"].tolist() == ["like", "", "reshare"]
  # The image known only by its vector: features, no pixels.
  np.testing.assert_array_equal(data.posts["image_features"][row["pf"]], c["vector"])
  assert data.posts["image_mask"].sum() == 1 and report["images_without_pixels"] == 1
  assert "actions: 3 written; problems: bad_timestamp 1" in prepare.summary(report)


def test_prepare_is_byte_identical_across_processes(social_crawl, tmp_path):
  """Same command and seed, different hash salts: the same bytes (Word2Vec included)."""
  c = social_crawl
  outs = [tmp_path / "a", tmp_path / "b"]
  runs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), f"--posts={c['posts']}",
       f"--out={out}", f"--actions={c['actions']}", f"--follows={c['follows']}",
       f"--image_features={c['features']}", "--min_count=1", "--word2vec_dim=8",
       "--test_fraction=0.2"], env={**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": seed},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out, seed in zip(outs, "12")]
  for run in runs:
    assert run.wait(timeout=300) == 0, run.stderr.read().decode()
  names = sorted(os.listdir(outs[0]))
  assert names == sorted(os.listdir(outs[1])) and word2vec.INIT_FILE in names
  for name in names:
    a, b = (open(o / name, "rb").read() for o in outs)
    if name == prepare.REPORT_FILE:
      a, b = ({**json.loads(x), "seconds": 0, "out_dir": ""} for x in (a, b))
    assert a == b, name


# ------------------------------------------------------ crawls that cannot work --

def _bad_crawls(d):
  """{case: (flags, words the one-line error must contain)}."""
  (d / "empty.jsonl").write_text("")
  _jsonl(d / "authors.jsonl", [{"post_id": str(i), "author": "a", "text": "storm flood"}
                               for i in range(5)])
  _jsonl(d / "rare.jsonl", [{"post_id": str(i), "user_id": "a", "text": f"w{i} x{i}"}
                            for i in range(5)])
  (d / "not_truth.npz").write_bytes(b"no")
  ok = f"--posts={d / 'rare.jsonl'}"
  return {
      "empty file": ([f"--posts={d / 'empty.jsonl'}"], ["empty.jsonl is empty"]),
      "bad field name": ([f"--posts={d / 'authors.jsonl'}", "--word2vec_dim=0"],
                         ["5 of 5 lines have no field 'user_id' (set --user_field)",
                          "'author'"]),
      "no word reaches min_count": ([ok], ["--min_count=5", "distinct words"]),
      "missing actions": ([ok, f"--actions={d / 'nope.jsonl'}"], ["--actions:"]),
      "missing features": ([ok, f"--image_features={d / 'nope.npz'}"], ["--image_features:"]),
      "not a truth file": ([ok, f"--oracle={d / 'not_truth.npz'}"], ["--oracle:"]),
  }


@pytest.mark.parametrize("case", ["empty file", "bad field name", "no word reaches min_count",
                                  "missing actions", "missing features", "not a truth file"])
def test_a_crawl_that_cannot_work_is_one_line_and_exit_1(tmp_path, case):
  flags, words = _bad_crawls(tmp_path)[case]
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"),
                        f"--out={tmp_path / 'out'}", "--workers=1", *flags],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode == 1
  assert run.stderr.startswith("prepare_data: ") and run.stderr.count("\n") == 1, run.stderr
  for w in words:
    assert w in run.stderr
