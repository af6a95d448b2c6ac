"""Which bfloat16 dot formulations does XLA run fast on this machine?

  python benchmarks/bf16_dots.py [--reps=5]

At the shapes of the DU2MCE features step (batch 1000, 20 positions, word_dim
300, filters 512/256/256 of widths 2/3/4, D = 1024), times float32 dots against
bfloat16 operands with a bfloat16 result (what flax's dtype=bfloat16 layers
ask for) and with a float32 result (preferred_element_type, what
sempre_jax/models/encoders.py asks for), each also with the left operand's
contracted axis outermost (what autodiff's weight gradient asks for), and says
whether the compiled dot keeps bfloat16 operands or XLA converts them to
float32 first. Repetitions are interleaved; prints GFLOP/s medians and ranges.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

flags.DEFINE_integer("reps", 5, "Interleaved timings per dot.")
FLAGS = flags.FLAGS

# (name, M, K, N): lhs [M, K] . rhs [K, N]
SHAPES = (("conv2 forward", 20000, 600, 512), ("conv4 forward", 20000, 1200, 256),
          ("conv2 weight grad", 600, 20000, 512), ("text proj", 1000, 1024, 1024),
          ("image proj", 1000, 2048, 1024), ("square 4096", 4096, 4096, 4096))
KINDS = {  # name: (operand dtype, result dtype, lhs stored [K, M])
    "f32": (jnp.float32, jnp.float32, False),
    "bf16->bf16": (jnp.bfloat16, jnp.bfloat16, False),
    "bf16->f32": (jnp.bfloat16, jnp.float32, False),
    "bf16->f32, lhs^T": (jnp.bfloat16, jnp.float32, True),
}


def dot_fn(result_dtype, lhs_transposed: bool):
  """jit(lhs, rhs) -> lhs . rhs; with lhs_transposed lhs is [K, M], contracted on axis 0."""
  dims = (((0,) if lhs_transposed else (1,), (0,)), ((), ()))
  return jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=result_dtype))


def converts_to_f32(f, a, b) -> bool:
  """Whether XLA feeds the compiled dot float32 copies of bfloat16 operands."""
  entry = f.lower(a, b).compile().as_text().split("ENTRY")[1]
  copies = [f"f32[{','.join(map(str, x.shape))}]" for x in (a, b) if x.dtype == jnp.bfloat16]
  return any(c in line and "convert" in line for line in entry.splitlines() for c in copies)


def main(argv):
  del argv
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"{'shape':<18} {'M x K x N':>18} " + " ".join(f"{k:>22}" for k in KINDS))
  for name, m, k, n in SHAPES:
    args, fns, rates, notes = {}, {}, {kind: [] for kind in KINDS}, {}
    for kind, (dtype, result, lhs_t) in KINDS.items():
      a = jax.random.normal(jax.random.key(0), (k, m) if lhs_t else (m, k)).astype(dtype)
      b = jax.random.normal(jax.random.key(1), (k, n)).astype(dtype)
      args[kind], fns[kind] = (a, b), dot_fn(result, lhs_t)
      fns[kind](a, b).block_until_ready()
      notes[kind] = "*" if converts_to_f32(fns[kind], a, b) else " "
    calls = max(1, int(1e10 / (2 * m * k * n)))
    for _ in range(FLAGS.reps):
      for kind in KINDS:
        t = time.perf_counter()
        for _ in range(calls):
          out = fns[kind](*args[kind])
        out.block_until_ready()
        rates[kind].append(2 * m * k * n * calls / (time.perf_counter() - t) / 1e9)
    cells = [f"{np.median(r):5.0f} ({min(r):4.0f}-{max(r):4.0f}){notes[kind]}"
             for kind, r in rates.items()]
    print(f"{name:<18} {f'{m}x{k}x{n}':>18} " + " ".join(f"{c:>22}" for c in cells))
  print("GFLOP/s, median (min-max); * = XLA converted the bfloat16 operands to float32")


if __name__ == "__main__":
  app.run(main)
