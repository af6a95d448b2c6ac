"""One process of a multi-process JAX job (run by tests/test_multihost.py).

Usage: python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES CASE OUT_NPZ [ARGS]
  step   one sharded train step on a fixed global batch, each process feeding
         its part, and exact ranks over candidates split across the processes;
  train  multihost_case.train_run(DATA_DIR, WORKDIR): the training loop.
Process 0 writes the results (loss, parameters, ranks) to OUT_NPZ.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests import multihost_case  # noqa: E402


def main(port: str, process_id: str, num_processes: str, case: str, out: str, *args) -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(num_processes),
                             process_id=int(process_id))
  if case == "step":
    loss, params = multihost_case.one_step(process_index=jax.process_index(),
                                           process_count=jax.process_count())
    results = dict(loss=loss, ranks=multihost_case.global_ranks(), **params)
  else:
    results = multihost_case.train_run(*args)
  if jax.process_index() == 0:
    np.savez(out, **results)


if __name__ == "__main__":
  main(*sys.argv[1:])
