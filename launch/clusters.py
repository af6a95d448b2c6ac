"""User clusters of a workdir's checkpoint as a page (the paper's Fig. 4).

  python launch/clusters.py --workdir=runs/du2mce --out=runs/du2mce/clusters \
      [--checkpoint=best|latest|STEP] [--clusters=50] [--top_words=30] [--images=8]

Writes OUT/index.html (open it in a browser), a word cloud per cluster, the
images nearest to each cluster, and OUT/clusters.json.
"""

from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import clusters, space

cli.define_checkpoint_flags()
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("clusters", 50, "Number of clusters (at most the number of users).")
flags.DEFINE_integer("top_words", 30, "Top words per cluster.")
flags.DEFINE_integer("images", 8, "Images nearest to each cluster's centroid.")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS


def main():
  embeddings = space.Space.restore(FLAGS.workdir, FLAGS.checkpoint)
  result = clusters.user_clusters(embeddings, num_clusters=FLAGS.clusters,
                                  top_words=FLAGS.top_words, images=FLAGS.images)
  page = clusters.write_page(embeddings, result, FLAGS.out)
  sizes = [c["size"] for c in result["clusters"]]
  print(f"{len(sizes)} clusters of {result['users_clustered']} users (sizes {min(sizes)} "
        f"to {max(sizes)}) at step {embeddings.step} of {FLAGS.workdir}: {page}")


if __name__ == "__main__":
  cli.run(main)
