"""Embeds new posts, their images and their users with a workdir's checkpoint.

  python launch/embed.py --workdir=runs/du2mce --posts=new_posts.jsonl --out=runs/new \\
      [--checkpoint=best] [--text_fields=subject,text] [--image_features=FEATS.npz]
      [--cold_start=fold_in|avg_text|none]

The posts file is read as launch/prepare_data.py reads one (the same field
flags), with the vocabulary and users of the workdir's data; users new to the
model get a vector by cold start from their posts (sempre_jax/analysis/coldstart.py).
Writes launch/export.py's files (NPY + TSV + FAISS per shard, export.json,
projector/) for the texts, images and authors of the posts.
"""

from absl import flags

from input_pipeline import prepare
from sempre_jax import cli
from sempre_jax.analysis import coldstart, embed

_D = prepare.Options()
cli.define_checkpoint_flags()
flags.DEFINE_string("posts", None, "The posts: one JSON object a line.")
flags.DEFINE_string("out", None, "Output directory.")
cli.define_crawl_flags(_D)
flags.DEFINE_string("image_root", None, "Folder of the images (default: the posts' folder).")
flags.DEFINE_string("image_features", None, ".npz: image path or id -> feature vector.")
flags.DEFINE_enum("cold_start", "fold_in", coldstart.METHODS, "Vectors of users new to "
                  "the model (none: their posts are written, they are not).")
flags.DEFINE_integer("fold_in_steps", 100, "Adam steps of fold-in.")
flags.DEFINE_float("fold_in_learning_rate", 0.0, "Adam learning rate of fold-in (0: the "
                   "config's learning_rate, the rate the user rows trained with).")
flags.DEFINE_integer("shard_rows", 1_000_000, "Rows per shard of each modality.")
flags.DEFINE_integer("projector_rows", 10_000, "Rows per modality in the projector files.")
flags.mark_flags_as_required(["posts", "out"])
FLAGS = flags.FLAGS


def main():
  options = prepare.Options(
      id_field=FLAGS.id_field, user_field=FLAGS.user_field,
      text_fields=tuple(FLAGS.text_fields), image_field=FLAGS.image_field,
      image_root=FLAGS.image_root, image_features=FLAGS.image_features, word2vec_dim=0)
  counts = embed.embed(FLAGS.workdir, FLAGS.posts, FLAGS.out, options, FLAGS.checkpoint,
                       FLAGS.cold_start, steps=FLAGS.fold_in_steps,
                       learning_rate=FLAGS.fold_in_learning_rate, shard_rows=FLAGS.shard_rows,
                       projector_rows=FLAGS.projector_rows)
  new = counts["new_users"]
  print(f"Embedded {FLAGS.posts} with {FLAGS.workdir} into {FLAGS.out}: {counts['texts']} "
        f"texts, {counts['images']} images, {counts['users']} users ({new['fold_in']} new "
        f"ones folded in, {new['avg_text']} by Avg-Text, "
        f"{counts['new_users_without_vector']} without a vector)")


if __name__ == "__main__":
  cli.run(main)
