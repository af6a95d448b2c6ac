"""Which crawls measure cold start on 20 Newsgroups authors held out of training?

  python benchmarks/coldstart_newsgroups.py --out=runs/coldstart \
      [--posts=../shared/data/newsgroups20/posts.jsonl] [--new_authors=150] [--fold_in_posts=2]

Picks `new_authors` authors at random (seed 0) among those with at least
fold_in_posts + 2 posts and writes two crawls:
  OUT/known/posts.jsonl  every post of the other authors (the model trains on it);
  OUT/new/posts.jsonl    every post of the picked authors, each with a field
                         "split": "train" for the author's first `fold_in_posts`
                         posts (in file order: the evidence cold start folds in),
                         "test" for the rest (the queries).
Then prints the commands of docs/new_data.md (prepare, train, evaluate with each
cold start).
"""

import collections
import json
import os

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("posts", os.path.join(ROOT, "..", "shared", "data", "newsgroups20",
                                          "posts.jsonl"), "The newsgroups posts.")
flags.DEFINE_string("out", None, "Output folder of the two crawls.")
flags.DEFINE_integer("new_authors", 150, "Authors held out of training.")
flags.DEFINE_integer("fold_in_posts", 2, "Posts of a held-out author that fold in.")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  with open(FLAGS.posts) as f:
    posts = [json.loads(line) for line in f if line.strip()]
  counts = collections.Counter(p["user_id"] for p in posts)
  eligible = sorted(u for u, n in counts.items() if n >= FLAGS.fold_in_posts + 2)
  new = set(np.random.default_rng(0).choice(eligible, FLAGS.new_authors, replace=False))
  seen = collections.Counter()
  crawls = {"known": [], "new": []}
  for p in posts:
    if p["user_id"] in new:
      seen[p["user_id"]] += 1
      split = "train" if seen[p["user_id"]] <= FLAGS.fold_in_posts else "test"
      crawls["new"].append({**p, "split": split})
    else:
      crawls["known"].append(p)
  for name, rows in crawls.items():
    os.makedirs(os.path.join(FLAGS.out, name), exist_ok=True)
    with open(os.path.join(FLAGS.out, name, "posts.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  print(f"{len(crawls['known'])} posts of {len(counts) - len(new)} authors in "
        f"{FLAGS.out}/known, {len(crawls['new'])} posts of {len(new)} held-out authors in "
        f"{FLAGS.out}/new ({FLAGS.fold_in_posts} each to fold in)")
  o = FLAGS.out
  print(f"""
python launch/prepare_data.py --posts={o}/known/posts.jsonl --out={o}/known_data \\
    --text_fields=subject,text --interest_field=group
python launch/train.py --config=configs/du2mce_newsgroups.py \\
    --config.data.dir={o}/known_data --workdir={o}/model
python launch/prepare_data.py --posts={o}/new/posts.jsonl --out={o}/new_data \\
    --text_fields=subject,text --vocab_from={o}/known_data --split_field=split
for c in none avg_text fold_in; do
  python launch/evaluate.py --workdir={o}/model --data={o}/new_data --cold_start=$c
done""")


if __name__ == "__main__":
  app.run(main)
