"""Local processes form one JAX job (CPU, gloo, loopback) and match one process:
a train step, exact ranks with the candidates split over both processes, and
the training loop of 3 processes over 2 shard files."""

import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from sempre_jax.evals import ranks
from tests import multihost_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _job(num_processes: int, case: str, out, *args, timeout: int) -> dict:
  """Runs tests/multihost_worker.py as a job of processes with 1 CPU device
  each, at most `timeout` seconds; returns what process 0 wrote."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "tests/multihost_worker.py", str(port), str(i),
                             str(num_processes), case, str(out), *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the {num_processes}-process job did not finish in {timeout} s")
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-2000:] for l in logs)
  return dict(np.load(out))


def test_two_processes_match_one_process(tmp_path):
  two = _job(2, "step", tmp_path / "two.npz", timeout=120)
  loss, params = multihost_case.one_step(process_index=0, process_count=1)
  np.testing.assert_allclose(two["loss"], loss, rtol=1e-6)
  assert set(two) - {"loss", "ranks"} == set(params)
  for k, v in params.items():
    np.testing.assert_allclose(two[k], v, atol=1e-6, err_msg=k)
  queries, cands, gts = multihost_case.rank_case()
  np.testing.assert_array_equal(
      two["ranks"], multihost_case.rank_counts(ranks.ranks_from_scores(queries @ cands.T, gts)))


def test_three_processes_over_two_shard_files_train_like_one(tmp_path):
  """3 processes (1 device each) read a third of the train blocks each and
  train the same parameters as 1 process on 3 devices (3 data streams both)."""
  if jax.device_count() < 3:
    pytest.skip("needs 3 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  data_dir = multihost_case.prepared(str(tmp_path / "corpus"))
  three = _job(3, "train", tmp_path / "three.npz", data_dir, tmp_path / "three",
               timeout=300)
  one = multihost_case.train_run(data_dir, str(tmp_path / "one"), num_devices=3)
  chex.assert_trees_all_close(three, one, atol=1e-6)
  assert max(np.abs(v).max() for v in one.values()) > 0
