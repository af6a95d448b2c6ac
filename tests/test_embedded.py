"""The main job's data when none is given: the embedded corpus, written as a crawl
and prepared exactly as `launch/prepare_data.py` would prepare it."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from input_pipeline import embedded, prepare, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = dict(num_users=12, num_topics=3, posts_per_user=10, feature_dim=8, image_size=8,
            followees=3, actions_per_user=4, seed=2)


def test_ensure_gives_the_bytes_of_the_printed_command(tmp_path):
  logged = []
  data = embedded.ensure(SPEC, {"test": 0.2, "validation": 0.05}, num_shards=2,
                         word2vec_dim=8, seed=1, root=str(tmp_path), log=logged.append)
  assert data == str(tmp_path / "data")
  command = next(line.strip() for line in "\n".join(logged).split("\n")
                 if line.strip().startswith("python launch/prepare_data.py"))
  assert "--image_size=8" in command and "--interest_field=topic" in command
  assert any(line.startswith("Prepared ") for line in logged)
  crawl = tmp_path / "crawl"
  assert len(os.listdir(crawl / "images")) == records.read_metadata(data)["num_images"]
  # The same command by hand, into the same path (the report names its folder).
  os.rename(data, tmp_path / "by_ensure")
  args = shlex.split(command)
  run = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode == 0, run.stderr
  names = sorted(os.listdir(data))
  assert names == sorted(os.listdir(tmp_path / "by_ensure"))
  assert {"oracle.npz", "graph.npz", "word2vec_init.npz", "interests.txt"} <= set(names)
  for name in names:
    a, b = ((d / name).read_bytes() for d in (tmp_path / "data", tmp_path / "by_ensure"))
    if name == prepare.REPORT_FILE:
      a, b = ({**json.loads(x), "seconds": 0} for x in (a, b))
    assert a == b, name


def test_ensure_reuses_redoes_and_refuses(tmp_path):
  small = {**SPEC, "image_size": 0}
  make = lambda root, spec=small, log=None: embedded.ensure(
      spec, {"test": 0.2}, num_shards=1, word2vec_dim=0, seed=0, root=str(root),
      log=log or (lambda *a: None))
  data = make(tmp_path)
  logged = []
  assert make(tmp_path, log=logged.append) == data and logged == []     # nothing redone
  os.remove(os.path.join(data, prepare.REPORT_FILE))                     # an interrupted prepare
  make(tmp_path, log=logged.append)
  assert os.path.exists(os.path.join(data, prepare.REPORT_FILE))
  assert not any(line.startswith("Wrote") for line in logged)           # the crawl is kept
  with pytest.raises(ValueError, match=r"other settings \{'num_users': \(12, 13\)\}.*fresh"):
    make(tmp_path, {**small, "num_users": 13})
  with pytest.raises(ValueError, match="no setting \\['users'\\]"):
    make(tmp_path / "other", {"users": 3})
  os.makedirs(tmp_path / "foreign" / "data")
  with pytest.raises(ValueError, match="is not an embedded corpus.*fresh"):
    make(tmp_path / "foreign")


def test_embedded_imports_no_jax():
  run = subprocess.run([sys.executable, "-c", "import sys, input_pipeline.embedded; "
                        "sys.exit('jax' in sys.modules)"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode == 0
