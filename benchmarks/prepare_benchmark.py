"""Prepares 1,000,000 synthetic raw posts; prints posts/s and peak RSS.

  python benchmarks/prepare_benchmark.py [--posts=1000000] [--workdir=/tmp/prepare_bench]

Posts: tweet-like texts of 5-25 words (Zipf vocabulary of 50,000 words, plus
URLs, mentions and hashtags), 20,000 users, and 30% of posts referencing one
of 200 small JPEGs (so many posts share an image). Word2Vec runs 1 epoch.
Peak RSS is the largest
resident set of this process or any of its worker processes.
"""

import json
import os
import resource
import time

import numpy as np
from absl import app, flags
from PIL import Image

from input_pipeline import prepare

flags.DEFINE_integer("posts", 1_000_000, "Number of raw posts.")
flags.DEFINE_string("workdir", "/tmp/prepare_bench", "Raw corpus and output go here.")
FLAGS = flags.FLAGS


def write_raw(path: str, n: int, num_images: int = 200, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  folder = os.path.join(os.path.dirname(path), "images")
  os.makedirs(folder, exist_ok=True)
  for i in range(num_images):
    pixels = rng.integers(0, 255, (4, 4, 3), np.uint8).repeat(40, 0).repeat(40, 1)
    Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"))
  vocab = np.array([f"w{i}" for i in range(50_000)])
  zipf = 1.0 / np.arange(1, len(vocab) + 1)
  zipf /= zipf.sum()
  with open(path, "w") as f:
    for start in range(0, n, 10_000):
      m = min(10_000, n - start)
      lengths = rng.integers(5, 26, m)
      words = vocab[rng.choice(len(vocab), lengths.sum(), p=zipf)]
      users = rng.integers(0, 20_000, m)
      imgs = np.where(rng.random(m) < 0.3, rng.integers(0, num_images, m), -1)
      ends = np.cumsum(lengths)
      for j in range(m):
        text = " ".join(words[ends[j] - lengths[j]:ends[j]])
        text = f"RT @user{users[j]} #{text} http://t.co/{start + j:x}"
        f.write(json.dumps({
            "post_id": str(start + j), "user_id": f"u{users[j]}", "text": text,
            "timestamp": 1_400_000_000 + start + j,
            "image": f"images/{imgs[j]}.jpg" if imgs[j] >= 0 else None}) + "\n")


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  raw = os.path.join(FLAGS.workdir, "raw", "posts.jsonl")
  os.makedirs(os.path.dirname(raw), exist_ok=True)
  if not os.path.exists(raw):
    t0 = time.time()
    write_raw(raw, FLAGS.posts)
    print(f"wrote {FLAGS.posts} raw posts in {time.time() - t0:.0f}s "
          f"({os.path.getsize(raw) / 2**20:.0f} MiB)", flush=True)
  t0 = time.time()
  report = prepare.prepare(raw, os.path.join(FLAGS.workdir, "data"),
                           prepare.Options(word2vec_epochs=1))
  seconds = time.time() - t0
  rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20   # KiB -> GiB
  print(prepare.summary(report))
  print(f"{report['posts_written']} posts in {seconds:.0f}s: "
        f"{report['posts_valid'] / seconds:,.0f} posts/s, peak RSS {rss:.2f} GiB "
        f"({os.cpu_count()} cores)")


if __name__ == "__main__":
  app.run(main)
