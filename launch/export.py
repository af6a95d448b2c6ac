"""Exports the user, text and image embeddings of a workdir's checkpoint.

  python launch/export.py --workdir=runs/du2mce --out=runs/du2mce/export \
      [--checkpoint=best|latest|STEP] [--projector_rows=10000]

Writes NPY + TSV (ids) + a FAISS index per modality, and TensorBoard projector
files (`tensorboard --logdir OUT/projector`). In a multi-process job each
process writes its own part.
"""

import sys

import jax
from absl import app, flags, logging

from sempre_jax import export, train

flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_string("checkpoint", "best", "'best' (on validation), 'latest' or a step number.")
flags.DEFINE_integer("projector_rows", 10_000, "Rows per modality in the projector files.")
flags.DEFINE_bool("distributed", False, "Join a multi-process job (cluster environment).")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    jax.distributed.initialize()
  try:
    config, model, data_dir, metadata, params, step = train.restore_checkpoint(
        FLAGS.workdir, FLAGS.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  counts = export.export_embeddings(
      model, params, data_dir, metadata, FLAGS.out, batch_size=config.eval.batch_size,
      process=jax.process_index(), count=jax.process_count(),
      projector_rows=FLAGS.projector_rows)
  print(f"Exported step {step} of {FLAGS.workdir} to {FLAGS.out}: "
        + ", ".join(f"{n} {name}" for name, n in counts.items()))


if __name__ == "__main__":
  app.run(main)
