"""Preemption (SIGTERM, SIGKILL) and non-finite guards of the training loop."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import du2mce
from input_pipeline import records
from sempre_jax import checkpoints, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.batch_size=16", "--config.num_epochs=12", "--config.num_devices=2",
        "--config.data.embedded.num_users=12", "--config.data.embedded.num_topics=3",
        "--config.data.embedded.posts_per_user=10", "--config.data.embedded.feature_dim=8",
        "--config.model.embed_dim=16", "--config.model.word_dim=8",
        "--config.model.user_dim=8", "--config.model.text_filters=(8, 8, 8)",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.evals.val.batch_size=64", "--config.evals.test.batch_size=64"]


def _start(workdir):
  return subprocess.Popen(
      [sys.executable, "launch/train.py", "--config=configs/du2mce.py",
       f"--workdir={workdir}", *TINY], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, step, timeout=120):
  """Reads progress lines until `step` was printed; returns the lines read."""
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
      return lines
  proc.kill()
  raise AssertionError(f"step {step} never printed: {lines[-5:]}")


def _finish(proc, timeout=180):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _final_params(workdir):
  directory = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  return step, state["params"]


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("whole")
  rc, out, err = _finish(_start(workdir))
  assert rc == 0, err[-2000:]
  return _final_params(workdir)


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
  proc = _start(tmp_path)
  _wait_for_step(proc, 4)
  proc.send_signal(signal.SIGTERM)
  rc, out, err = _finish(proc)
  assert rc == 0, err[-2000:]
  assert "Stopped by SIGTERM after step" in out
  stopped_at = int(out.split("Stopped by SIGTERM after step ")[1].split(";")[0])
  step, _ = _final_params(tmp_path)
  assert step == stopped_at < uninterrupted[0]          # saved off the 3-step schedule
  rc, out, err = _finish(_start(tmp_path))
  assert rc == 0, err[-2000:]
  assert f"Resuming from the checkpoint at step {stopped_at}" in out
  step, params = _final_params(tmp_path)
  assert step == uninterrupted[0]
  _assert_same(params, uninterrupted[1])


def test_sigkill_at_a_random_step_resumes_exactly(tmp_path, uninterrupted):
  kill_at = int(np.random.default_rng().integers(2, uninterrupted[0] - 2))
  proc = _start(tmp_path)
  _wait_for_step(proc, kill_at)
  proc.kill()
  proc.wait()
  rc, out, err = _finish(_start(tmp_path))
  assert rc == 0, err[-2000:]
  step, params = _final_params(tmp_path)
  assert step == uninterrupted[0], (kill_at, out[-500:])
  _assert_same(params, uninterrupted[1])


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(0)
  posts = [dict(post_id=f"p{i}", user=i % 6, tokens=rng.integers(2, 30, 6), image_id=i)
           for i in range(48)]
  features = rng.normal(size=[48, 4]).astype(np.float32)
  features[37] = np.nan
  np.save(records.table_path(str(data), "image_features"), features)
  meta = {"num_users": 6, "vocab_size": 30, "max_len": records.MAX_LEN, "feature_dim": 4,
          "image_size": 0, "num_images": 48,
          "splits": {"train": records.write_split(str(data), "train", [records.rows_of(posts)],
                                                  2, block_posts=8),
                     "test": records.write_split(str(data), "test", [records.rows_of(posts[:8])],
                                                 1)}}
  records.write_metadata(str(data), meta)
  config = du2mce.get_config()
  config.data.dir = str(data)
  config.model.update(embed_dim=8, word_dim=4, user_dim=4, text_filters=(4, 4, 4))
  config.update(batch_size=8, num_epochs=1, checkpoint_every_steps=1, log_every_steps=100)
  config.model.init_from_word2vec = False
  del config.evals["val"]            # the data has no validation split
  config.best = ""
  with pytest.raises(train.TrainingStopped, match=r"non-finite loss.* at step (\d+)") as e:
    train.train_and_evaluate(config, str(tmp_path / "work"), str(data), meta)
  bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
  assert bad_step > 1, "choose another seed: the NaN post landed in the first batch"
  step, params = _final_params(str(tmp_path / "work"))
  assert step == bad_step - 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
