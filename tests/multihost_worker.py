"""One process of a 2-process JAX job (run by tests/test_multihost.py).

Usage: python tests/multihost_worker.py PORT PROCESS_ID OUT_NPZ
Runs one sharded train step on a fixed global batch, each process feeding its
half, and exact ranks over candidates split across both processes; process 0
writes the loss, the updated parameters and the ranks to OUT_NPZ.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests import multihost_case  # noqa: E402


def main(port: str, process_id: str, out: str) -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  loss, params = multihost_case.one_step(process_index=jax.process_index(),
                                         process_count=jax.process_count())
  ranks = multihost_case.global_ranks()
  if jax.process_index() == 0:
    np.savez(out, loss=loss, ranks=ranks, **params)


if __name__ == "__main__":
  main(*sys.argv[1:])
