"""Exports the user, text and image embeddings of a workdir's checkpoint.

  python launch/export.py --workdir=runs/du2mce --out=runs/du2mce/export \
      [--checkpoint=best|latest|STEP] [--shard_rows=1000000] [--projector_rows=10000]

Writes NPY + TSV (ids) + a FAISS index per shard of each modality, export.json,
and TensorBoard projector files (`tensorboard --logdir OUT/projector`). In a
multi-process job each process writes its own part (see sempre_jax/analysis/export.py).
"""

import jax
from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import export, space

cli.define_checkpoint_flags()
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("shard_rows", 1_000_000, "Rows per shard of each modality's part.")
flags.DEFINE_integer("projector_rows", 10_000, "Rows per modality in the projector files.")
flags.DEFINE_bool("distributed", False, "Join a multi-process job (cluster environment).")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS


def main():
  if FLAGS.distributed:
    jax.distributed.initialize()
  embeddings = space.Space.restore(FLAGS.workdir, FLAGS.checkpoint)
  counts = export.export_embeddings(
      embeddings, FLAGS.out, process=jax.process_index(), count=jax.process_count(),
      shard_rows=FLAGS.shard_rows, projector_rows=FLAGS.projector_rows)
  print(f"Exported step {embeddings.step} of {FLAGS.workdir} to {FLAGS.out}: "
        + ", ".join(f"{n} {name}" for name, n in counts.items()))


if __name__ == "__main__":
  cli.run(main)
