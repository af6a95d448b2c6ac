"""Free-text query of a workdir's checkpoint (the paper's Fig. 5): the top
images, posts and users for a text typed by a person.

  python launch/query.py --workdir=runs/du2mce --text="healthy food" \
      [--k=5] [--checkpoint=best|latest|STEP] [--export=runs/du2mce/export]

With --export (launch/export.py's output for the same checkpoint) the FAISS
indexes are searched instead of embedding the dataset again.
"""

from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import search, space

cli.define_checkpoint_flags()
flags.DEFINE_string("text", None, "The query text.")
flags.DEFINE_integer("k", 5, "Results per modality.")
flags.DEFINE_string("export", None, "An export of the same checkpoint to search instead.")
flags.mark_flag_as_required("text")
FLAGS = flags.FLAGS


def main():
  result = search.search(space.Space.restore(FLAGS.workdir, FLAGS.checkpoint),
                         FLAGS.text, FLAGS.k, FLAGS.export)
  print(search.format_results(result))


if __name__ == "__main__":
  cli.run(main)
