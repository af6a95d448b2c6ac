"""D-Sempre, CDL and AMNL on a user's crawl: posts with PNG images, actions.jsonl
and follows.jsonl written by hand, prepared by prepare's own code, trained a few
steps through the shared trainer; without the files, one line naming the flag."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from input_pipeline import prepare
from tests import conftest, test_family

WORDS = [[f"topic{k}word{i}" for i in range(8)] for k in range(3)]


def _png(color) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (12, 12), color).save(buf, format="PNG")
  return buf.getvalue()


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
  """24 users of 3 topics, 10 posts each (half with an image of the topic's
  colour), 30 likes each of their topic's posts, each following 4 users of it."""
  d = tmp_path_factory.mktemp("crawl")
  (d / "images").mkdir()
  rng = np.random.default_rng(0)
  colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
  for k, c in enumerate(colors):
    for v in range(4):
      (d / "images" / f"t{k}v{v}.png").write_bytes(_png(tuple(x + 10 * v for x in c)))
  users = [f"user{u}" for u in range(24)]
  topic = {u: i % 3 for i, u in enumerate(users)}
  posts = []
  for i in range(10):
    for u in users:
      k = topic[u]
      post = {"post_id": f"{u}-{i}", "user_id": u, "timestamp": 1_500_000_000 + 600 * len(posts),
              "text": " ".join(rng.choice(WORDS[k], 5))}
      if i % 2 == 0:
        post["image"] = f"images/t{k}v{rng.integers(4)}.png"
      posts.append(post)
  by_topic = [[p for p in posts if topic[p["user_id"]] == k] for k in range(3)]
  actions, follows = [], []
  for u in users:
    mine = [p for p in by_topic[topic[u]] if p["user_id"] != u]
    for j, p in enumerate(rng.choice(len(mine), 30, replace=False)):
      actions.append({"user_id": u, "post_id": mine[p]["post_id"], "kind": "like",
                      "timestamp": mine[p]["timestamp"] + 60 * (j + 1)})
    peers = [v for v in users if topic[v] == topic[u] and v != u]
    follows += [{"user_id": u, "followee_id": v} for v in rng.choice(peers, 4, replace=False)]
  return (_jsonl(d / "posts.jsonl", posts), _jsonl(d / "actions.jsonl", actions),
          _jsonl(d / "follows.jsonl", follows))


@pytest.fixture(scope="module")
def prepared(crawl, tmp_path_factory):
  """{"graph": data with actions and follows, "actions": without follows, "plain":
  without either}."""
  posts, actions, follows = crawl
  out = {}
  for name, extra in (("graph", dict(actions=actions, follows=follows)),
                      ("actions", dict(actions=actions)), ("plain", {})):
    d = str(tmp_path_factory.mktemp(name))
    prepare.prepare(posts, d, prepare.Options(image_size=12, min_count=1, word2vec_dim=0,
                                              workers=1, **extra), log=lambda *a: None)
    out[name] = d
  return out


def _config(name, data_dir):
  config = test_family.tiny(name)
  config.data.dir = data_dir
  config.update(batch_size=32, num_epochs=1)
  if "val" in config.evals:      # the test split only: a few steps, one evaluation
    del config.evals["val"]
    config.best = ""
  config.data.interactions.update(semantic_clusters=6 if config.data.interactions.semantic_clusters
                                  else 0)
  if name == "cdl":
    config.data.interactions.update(test=4, validation=2)
  return config


@pytest.mark.parametrize("name", ["dsempre", "cdl", "amnl"])
def test_family_trains_on_a_prepared_crawl(prepared, tmp_path, capsys, name):
  config = _config(name, prepared["graph"])
  state, results = conftest.run(config, tmp_path)
  assert int(state.step) > 0
  results = results["test"]
  assert results["users"] > 0 and np.isfinite(results["AUC"])
  out = capsys.readouterr().out
  assert all(np.isfinite(float(line.split("loss ")[1].split()[0]))
             for line in out.splitlines() if line.startswith("step"))
  assert "Results of test on the test split" in out and "AUC" in out


@pytest.mark.parametrize("name,data,flag", [("dsempre", "plain", "--actions"),
                                            ("cdl", "plain", "--actions"),
                                            ("amnl", "actions", "--follows")])
def test_a_crawl_without_the_files_names_the_flag(prepared, tmp_path, name, data, flag):
  with pytest.raises((ValueError, FileNotFoundError), match=flag) as e:
    conftest.run(_config(name, prepared[data]), tmp_path)
  assert "\n" not in str(e.value) and "launch/prepare_data.py" in str(e.value)
