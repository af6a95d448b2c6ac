"""The real-tweets protocol of docs/real_data.md: prepare, train, evaluate over seeds.

  python benchmarks/real_data.py --root=runs/real --name=features \\
      --config=configs/du2mce_tweets.py [--set=model.embed_dim=512 --set=...]
  python benchmarks/real_data.py --root=runs/real --name=pixels \\
      --config=configs/du2mce_tweets.py:pixels
  python benchmarks/real_data.py --root=runs/real        # the table only

For each prepare seed (3, 4, 5) the MediaEval 2016 tweets are prepared once
into ROOT/data_sSEED (held-out authors "any"; validation and test each 15% of
the images, `--split_by=size`; pixels at 32 x 32 and efficientnet_lite0
features, extracted by the first prepare and passed to the others as
`--image_features`, the same vectors), then the named model is trained in
ROOT/NAME_sSEED with `launch/train.py` (the best checkpoint on validation is
ranked on test). Runs that finished are reused. Prints, for every NAME in
ROOT, each seed's test ranks and the median [min, max] over seeds: median
rank, random median rank and their ratio per task, and the JSON of the table.
"""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
from absl import app, flags

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSTS = os.path.join(ROOT_DIR, "..", "shared", "data", "mediaeval2016", "posts.jsonl")
PREPARE = ("--held_out_authors=any", "--image_size=32", "--validation_fraction=0.15",
           "--test_fraction=0.15", "--split_by=size")
TASKS = ("image->text", "text->image", "image->user", "text->user")
COLUMNS = ("val image->text", *TASKS)

flags.DEFINE_string("root", "runs/real", "Prepared data and runs.")
flags.DEFINE_string("posts", POSTS, "The tweets (posts.jsonl).")
flags.DEFINE_list("seeds", ["3", "4", "5"], "Prepare seeds.")
flags.DEFINE_string("name", None, "Run name (none: print the table only).")
flags.DEFINE_string("config", "configs/du2mce_tweets.py", "Config[:variant] of the run.")
flags.DEFINE_multi_string("set", [], "A config override KEY=VALUE (--config.KEY=VALUE).")
flags.DEFINE_string("encoder", "efficientnet_lite0", "prepare's --image_encoder.")
FLAGS = flags.FLAGS


def run(cmd: list[str], log: str) -> None:
  print("$ " + " ".join(cmd), flush=True)
  env = {**os.environ, "PYTHONPATH": ROOT_DIR}
  with open(log, "w") as f:
    if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
      sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def prepare(seed: str) -> str:
  out = os.path.join(FLAGS.root, f"data_s{seed}")
  if os.path.exists(os.path.join(out, "metadata.json")):
    return out
  features = glob.glob(os.path.join(FLAGS.root, "data_s*", "image_features.npz"))
  source = (f"--image_features={features[0]}" if features
            else f"--image_encoder={FLAGS.encoder}")
  run([sys.executable, "launch/prepare_data.py", f"--posts={FLAGS.posts}", f"--out={out}",
       f"--seed={seed}", source, *PREPARE], out + ".log")
  return out


def train(name: str, seed: str, data: str) -> None:
  workdir = os.path.join(FLAGS.root, f"{name}_s{seed}")
  if os.path.exists(os.path.join(workdir, "eval_test.json")):
    return
  run([sys.executable, "launch/train.py", f"--config={FLAGS.config}",
       f"--config.data.dir={data}", f"--workdir={workdir}",
       *(f"--config.{s}" for s in FLAGS.set)], workdir + ".log")


def table() -> dict:
  """{name: {seed: {task: (median rank, random median rank)}}} of the finished runs."""
  out = {}
  for path in sorted(glob.glob(os.path.join(FLAGS.root, "*_s*", "eval_test.json"))):
    name, seed = re.fullmatch(r"(.*)_s(\d+)", os.path.basename(os.path.dirname(path))).groups()
    if seed not in FLAGS.seeds:
      continue
    with open(path) as f:
      results = json.load(f)
    row = {t: (results[t]["median_rank"], results[t]["random_median_rank"])
           for t in TASKS if results[t].get("queries")}
    val = selected_validation(os.path.dirname(path))
    if val is not None:
      row["val image->text"] = val
    out.setdefault(name, {})[seed] = row
  return out


def selected_validation(workdir: str):
  """image->text (median, random median rank) on validation at the selected step."""
  path = os.path.join(workdir, "validation.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  lines = [x for x in lines if x["evaluator"] == "val"]
  if not lines:
    return None
  # The step the trainer selects (checkpoints.Checkpoints.best_step): the lowest
  # score, the later of equal ones.
  best = min(lines, key=lambda x: (x["score"], -x["step"]))["results"]["image->text"]
  return best["median_rank"], best["random_median_rank"]


def print_table(rows: dict) -> None:
  head = f"{'run':<24} {'seed':>9} | " + " | ".join(f"{t:>24}" for t in COLUMNS)
  print(head + "\n" + "-" * len(head))
  for name, seeds in rows.items():
    for seed, tasks in sorted(seeds.items()):
      cells = [f"{tasks[t][0]:>7.1f}/{tasks[t][1]:<6.0f} {tasks[t][0] / tasks[t][1]:>8.1%}"
               if t in tasks else f"{'-':>24}" for t in COLUMNS]
      print(f"{name:<24} {seed:>9} | " + " | ".join(cells))
    cells = []
    for t in COLUMNS:
      ratio = [tasks[t][0] / tasks[t][1] for tasks in seeds.values() if t in tasks]
      med = [tasks[t][0] for tasks in seeds.values() if t in tasks]
      cells.append(f"{np.median(med):>6.1f} {np.median(ratio):>5.1%} "
                   f"[{min(ratio):.1%},{max(ratio):.1%}]" if ratio else f"{'-':>24}")
    print(f"{name:<24} {'median ' + str(len(seeds)):>9} | " + " | ".join(cells))
  print("cells: median rank / random median rank, ratio; the median row: median of the "
        "median ranks, median ratio [min, max] over seeds; val: validation at the "
        "selected checkpoint")
  print(json.dumps(rows))


def main(argv):
  del argv
  os.chdir(ROOT_DIR)
  os.makedirs(FLAGS.root, exist_ok=True)
  if FLAGS.name:
    for seed in FLAGS.seeds:
      train(FLAGS.name, seed, prepare(seed))
  print_table(table())


if __name__ == "__main__":
  app.run(main)
