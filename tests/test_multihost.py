"""Two local processes form one JAX job (CPU, gloo, loopback) and match one process:
a train step, and exact ranks with the candidates split over both processes."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sempre_jax.evals import ranks
from tests import multihost_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  port, out = _free_port(), tmp_path / "two.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "tests/multihost_worker.py", str(port), str(i),
                             str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the 2-process job did not finish in 120 s")
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-2000:] for l in logs)

  loss, params = multihost_case.one_step(process_index=0, process_count=1)
  two = np.load(out)
  np.testing.assert_allclose(two["loss"], loss, rtol=1e-6)
  assert set(two.files) - {"loss", "ranks"} == set(params)
  for k, v in params.items():
    np.testing.assert_allclose(two[k], v, atol=1e-6, err_msg=k)
  queries, cands, gts = multihost_case.rank_case()
  np.testing.assert_array_equal(
      two["ranks"], multihost_case.rank_counts(ranks.ranks_from_scores(queries @ cands.T, gts)))
