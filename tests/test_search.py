"""Free-text queries: a planted topic's words find that topic's posts and users,
the same from an export's FAISS shards, and a query without a known word fails."""

import os
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import loader, oracle, records
from sempre_jax.analysis import export, search, space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topic_query_finds_its_posts_and_users(trained_workdir, tmp_path):
  embeddings = space.Space.restore(str(trained_workdir))
  data_dir, meta = embeddings.data_dir, embeddings.metadata
  planted = oracle.load(data_dir)
  topic_of, text_topics = {}, []
  for batch in loader.eval_batches(data_dir, meta, "train", 512, None):
    ids = [p.decode() for p in batch["post_id"]]
    topics = planted.topics(ids)
    topic_of.update(zip(ids, topics))
    text_topics += list(topics[batch["text_mask"].any(1)])
  z = int(np.bincount(text_topics).argmax())                # the most posted topic
  query = " ".join(f"TOPIC{z:02d}w{i:02d}" for i in range(records.MAX_LEN))
  result = search.search(embeddings, query, k=10)
  assert result["unknown"] == [] and len(result["words"]) == records.MAX_LEN

  # Posts: mostly of the topic, against its share of the texts (chance).
  hits = [topic_of[r["post_id"]] == z for r in result["posts"] if r["post_id"] in topic_of]
  assert len(hits) >= 5 and np.mean(hits) >= 0.8 > np.mean(np.equal(text_topics, z))
  # Users: mostly interested in the topic, against the share of users who are
  # (text->user is the noisiest task of this tiny model: 3 of the top 5).
  theta = planted.theta                                      # [U, T] in the data's user ids
  names = records.read_lines(data_dir, records.USERS_FILE)
  interested = [theta[names.index(r["user_id"]), z] > 0 for r in result["users"][:5]]
  assert np.mean(interested) >= max(0.6, 2 * np.mean(theta[:, z] > 0))
  assert all(r["train_posts"] > 0 for r in result["users"])
  assert all(r["post_ids"] for r in result["images"])

  # The same results from the FAISS shards of an export of the checkpoint.
  out = str(tmp_path / "export")
  export.export_embeddings(embeddings, out, shard_rows=300)
  assert len(export.shard_paths(out, "texts")) > 1
  exported = search.search(embeddings, query, k=10, export_dir=out)
  for name in search.MODALITIES:
    assert exported[name] == [{**r, "score": pytest.approx(r["score"], abs=1e-5)}
                              for r in result[name]], name


def test_query_without_a_known_word_fails(trained_workdir):
  run = subprocess.run(
      [sys.executable, "launch/query.py", f"--workdir={trained_workdir}",
       "--text=healthy food!"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert "no word of the query 'healthy food!' is in the vocabulary" in run.stderr
