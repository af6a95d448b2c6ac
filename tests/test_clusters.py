"""launch/clusters.py end to end: a page whose pictures open, the clusters asked
for, top words without the corpus's most common words."""

import html.parser
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from input_pipeline import loader, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Page(html.parser.HTMLParser):
  """[(section class, [img src])] of a page."""

  def __init__(self):
    super().__init__()
    self.sections = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "section":
      self.sections.append((attrs.get("class"), []))
    elif tag == "img":
      self.sections[-1][1].append(attrs["src"])


def test_clusters_page(trained_workdir, tmp_path):
  out = tmp_path / "clusters"
  run = subprocess.run(
      [sys.executable, "launch/clusters.py", f"--workdir={trained_workdir}", f"--out={out}",
       "--clusters=4", "--top_words=10", "--images=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "posts/s" in run.stderr and "4 clusters" in run.stdout

  page = _Page()
  page.feed((out / "index.html").read_text())
  assert [c for c, _ in page.sections] == ["cluster"] * 4
  for _, sources in page.sections:
    assert len(sources) == 1 + 3                     # the word cloud and 3 pictures
    for src in sources:
      assert not os.path.isabs(src) and (out / src).is_file(), src
      with Image.open(out / src) as img:
        assert img.format == "PNG"
        img.verify()

  data_dir = str(trained_workdir / "data")
  meta = records.read_metadata(data_dir)
  vocab = records.read_lines(data_dir, records.VOCAB_FILE)
  counts = np.zeros([meta["vocab_size"]], np.int64)
  posts_of = np.zeros([meta["num_users"]], np.int64)
  for batch in loader.eval_batches(data_dir, meta, "train", 512, None):
    counts += np.bincount(batch["tokens"].ravel(), minlength=len(counts))
    posts_of += np.bincount(batch["user"], minlength=len(posts_of))
  counts[[records.PAD_ID, records.UNK_ID]] = 0
  at_200 = np.sort(counts)[::-1][199]               # the 200th most common count

  result = json.loads((out / "clusters.json").read_text())
  clusters = result["clusters"]
  assert sum(c["size"] for c in clusters) == (posts_of > 0).sum()
  assert [c["size"] for c in clusters] == sorted((c["size"] for c in clusters), reverse=True)
  dropped = {vocab.index(w) for w in result["common_words_dropped"]}
  assert len(dropped) == 200 and all(counts[t] >= at_200 for t in dropped)
  for c in clusters:
    assert len(c["images"]) == 3 and 0 < len(c["top_words"]) <= 10
    for word, n in c["top_words"]:
      t = vocab.index(word)
      assert t not in dropped and counts[t] <= at_200 and n <= counts[t], word
    scores = [i["score"] for i in c["images"]]
    assert scores == sorted(scores, reverse=True)
