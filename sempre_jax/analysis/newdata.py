"""How does a workdir's model rank another prepared dataset?

A dataset prepared with `launch/prepare_data.py --vocab_from=MODEL_DATA` shares
the model's vocabulary and user indices: the model's users first, users new
to it after them. `check` refuses any other (one line): its vocab.txt, or the
first lines of its users.txt, are not those of the model's data (identities,
compared by content, not array shapes), or its image features have another
size.

`evaluate` runs the config's final retrieval evaluators on the dataset's split
through a view, a temporary dataset that holds
  train   the model's training split (linked): the per-user training counts
          of "text->user (2+ posts)" are the model's;
  SPLIT   the dataset's split, whose posts by users unknown to the model are
          left out (they have no trained row: no candidate, no query), unless
          cold start (analysis/coldstart.py) gives them a vector from their
          posts of the dataset's train split; users with a vector are then
          candidates like the model's, renumbered after them;
  tables  the image tables of both, the model's images first (the dataset's
          image ids shifted after them).
Every evaluator runs before anything is written: a failed command leaves the
workdir as it was.
"""

import hashlib
import os
import tempfile
from collections.abc import Mapping

import jax
import numpy as np

from input_pipeline import loader, records
from sempre_jax import evals, mesh as mesh_lib, train
from sempre_jax.analysis import coldstart, space as space_lib, workdir as workdir_lib
from sempre_jax.experiment import Experiment


def _digest(lines: list[str]) -> str:
  return hashlib.sha256("".join(f"{x}\n" for x in lines).encode()).hexdigest()[:12]


def check(model_dir: str, model_meta: Mapping, data_dir: str, data_meta: Mapping) -> None:
  """ValueError (one line) unless `data_dir` has the vocabulary, the users (as
  its first users) and the image feature size of the model's data `model_dir`."""
  fix = f"prepare it with launch/prepare_data.py --vocab_from={model_dir}"
  vocab = [records.read_lines(d, records.VOCAB_FILE) for d in (model_dir, data_dir)]
  users = [records.read_lines(d, records.USERS_FILE) for d in (model_dir, data_dir)]
  for d, v, u in zip((model_dir, data_dir), vocab, users):
    if v is None or u is None:
      raise FileNotFoundError(f"{d} has no {records.VOCAB_FILE} or {records.USERS_FILE}")
  if vocab[0] != vocab[1]:
    raise ValueError(f"{data_dir} has another vocabulary than the model's data {model_dir} "
                     f"({records.VOCAB_FILE} sha256 {_digest(vocab[1])}, the model's "
                     f"{_digest(vocab[0])}): {fix}")
  known = users[0]
  if users[1][:len(known)] != known:
    i = next((i for i, (a, b) in enumerate(zip(known, users[1])) if a != b),
             len(users[1]))
    theirs = repr(users[1][i]) if i < len(users[1]) else "absent"
    raise ValueError(f"{data_dir} has other users than the model's data {model_dir} (user "
                     f"{i} is {theirs}, the model's {known[i]!r}; {records.USERS_FILE} sha256 "
                     f"{_digest(users[1][:len(known)])}, the model's {_digest(known)}): {fix}")
  dims = model_meta.get("feature_dim", 0), data_meta.get("feature_dim", 0)
  if data_meta.get("num_images") and dims[1] and dims[1] != dims[0]:
    raise ValueError(f"{data_dir} has image features of size {dims[1]}, the model's data "
                     f"{dims[0]}: extract them with the model's data's CNN")


def _filtered_split(data_dir: str, meta: Mapping, split: str, user_map: np.ndarray,
                    num_known: int, image_offset: int, out_dir: str) -> tuple[dict, dict]:
  """Writes the posts of `split` whose author u has user_map[u] >= 0, as
  author user_map[u] and with image ids shifted by `image_offset` (the view's
  tables: the model's images first), into out_dir; returns (split metadata,
  counts: users >= num_known are unknown to the model)."""
  reader = loader.split_reader(data_dir, meta, split)
  counts = dict.fromkeys(("posts", "texts", "unknown_posts", "unknown_texts",
                          "left_out_posts", "left_out_texts"), 0)
  unknown_users = set()

  def blocks():
    for j in range(reader.num_blocks):
      rows, ids = reader.block(j)
      has_text = (rows["tokens"] != records.PAD_ID).any(1)
      unknown, kept = rows["user"] >= num_known, user_map[rows["user"]] >= 0
      for key, sel in (("", np.ones(len(rows), bool)), ("unknown_", unknown),
                       ("left_out_", ~kept)):
        counts[key + "posts"] += int(sel.sum())
        counts[key + "texts"] += int((has_text & sel).sum())
      unknown_users.update(rows["user"][unknown].tolist())
      out = rows[kept].copy()
      out["user"] = user_map[out["user"]]
      out["image_id"] = np.where(out["image_id"] >= 0, out["image_id"] + image_offset, -1)
      yield out, [i for i, k in zip(ids, kept) if k]

  try:
    split_meta = records.write_split(out_dir, split, blocks(), 1, reader.block_posts)
  finally:
    reader.close()
  counts["unknown_users"] = len(unknown_users)
  return split_meta, counts


def _view_tables(model_dir: str, model_meta: Mapping, data_dir: str, data_meta: Mapping,
                 out_dir: str) -> dict:
  """Writes the view's image tables into out_dir, the model's images [0, n0)
  then the dataset's [n0, n0 + n1) (the model's training split keeps its image
  ids); returns the view's metadata entries for them."""
  n0, n1 = model_meta.get("num_images", 0), data_meta.get("num_images", 0)
  meta = {"num_images": n0 + n1, "feature_dim": model_meta.get("feature_dim", 0),
          "image_size": 0}
  for key in records.TABLE_FILES:
    try:
      parts = [records.read_table(d, m, key) for d, m in ((model_dir, model_meta),
                                                          (data_dir, data_meta))]
    except ValueError:        # no pixels on one side: a pixels model cannot rank it
      continue
    if not n1:
      parts[1] = np.zeros((0, *parts[0].shape[1:]), parts[0].dtype)
    if parts[0].shape[1:] != parts[1].shape[1:] or not parts[0].size + parts[1].size:
      continue
    table = records.new_table(out_dir, key, (n0 + n1, *parts[0].shape[1:]), parts[0].dtype)
    table[:n0], table[n0:] = parts
    table.flush()
    if key == "image":
      meta["image_size"] = model_meta["image_size"]
  return meta


def evaluate(workdir: str, data_dir: str, checkpoint: str = "best", cold_start: str = "none",
             *, steps: int = 100, learning_rate: float | None = None) -> dict:
  """Ranks the dataset's split with the config's final retrieval evaluators
  (see the module); writes WORKDIR/eval_<name>_stepN_<data>[_<cold start>].json
  and returns {name: results}, each with a "new_data" entry of counts."""
  if cold_start not in coldstart.METHODS:
    raise ValueError(f"--cold_start must be one of {coldstart.METHODS}, got {cold_start!r}")
  exp, variables, step = workdir_lib.restore(workdir, checkpoint)
  if exp.model_def.DATA != "posts":
    raise ValueError(f"{workdir} holds a {exp.config.model.name} model; --data ranks "
                     "retrieval with a model of posts (DU2MCE)")
  data_meta = records.read_metadata(data_dir)
  check(exp.data_dir, exp.metadata, data_dir, data_meta)
  names = [n for n, b in exp.config.evals.items()
           if not b.every_steps and b.type == "retrieval"]
  splits = sorted({exp.config.evals[n].split for n in names})
  if not names or "train" in splits:
    raise ValueError("--data ranks a held-out split with the config's final retrieval "
                     f"evaluators; the config has {dict(exp.config.evals)}")
  for split in splits:
    if not data_meta["splits"].get(split, {}).get("num_posts"):
      raise ValueError(f"{data_dir} has no post in its {split} split (the split of the "
                       "config's final evaluators): prepare it with --split_field or "
                       f"--{split}_fraction")
  num_known = exp.metadata["num_users"]
  params, how = variables["params"], {}
  vectors = np.zeros([0, exp.module.embed_dim], np.float32)
  if cold_start != "none":
    space = space_lib.Space(exp.module, params, data_dir, data_meta,
                            batch_size=space_lib.eval_batch_size(exp.config))
    vectors, how = coldstart.new_user_vectors(
        space, params, data_dir, "train", num_known, cold_start, exp.term_weights(),
        margin=exp.config.loss.margin, steps=steps,
        learning_rate=learning_rate or exp.config.learning_rate)
  new = np.array(sorted(how), np.int64)
  user_map = np.full([data_meta["num_users"]], -1, np.int64)
  user_map[:num_known] = np.arange(num_known)
  user_map[num_known + new] = num_known + np.arange(len(new))
  module, params = coldstart.with_new_users(exp.module, params, vectors[new])
  mesh = mesh_lib.make_mesh(exp.config.get("num_devices"))
  results, info = {}, {}
  with tempfile.TemporaryDirectory() as view:
    model_train = exp.metadata["splits"]["train"]
    for shard in model_train["shards"]:
      for ext in ("", ".index"):
        os.symlink(os.path.abspath(os.path.join(exp.data_dir, shard + ext)),
                   os.path.join(view, shard + ext))
    view_splits = {"train": model_train}
    for split in splits:
      view_splits[split], counts = _filtered_split(data_dir, data_meta, split, user_map,
                                                   num_known, exp.metadata["num_images"],
                                                   view)
      info[split] = {"data_dir": os.path.abspath(data_dir), "cold_start": cold_start,
                     **counts, "cold_start_users": {
                         m: sum(v == m for v in how.values()) for m in ("fold_in", "avg_text")}}
      if not view_splits[split]["num_posts"]:
        raise ValueError(f"every post of the {split} split of {data_dir} is by a user "
                         "unknown to the model: give them a vector with --cold_start=fold_in")
    meta = {**exp.metadata, **_view_tables(exp.data_dir, exp.metadata, data_dir, data_meta, view),
            "num_users": num_known + len(new), "splits": view_splits}
    view_exp = Experiment(exp.config, view, meta, workdir)
    view_exp.module = module
    evaluators = {}
    for name in names:
      block = exp.config.evals[name]
      evaluators[name] = evals.get(block.type).build(block, view_exp, mesh)
      results[name] = evaluators[name].run({"params": params})
      results[name]["new_data"] = info[block.split]
  tag = os.path.basename(os.path.normpath(data_dir)) + (
      "" if cold_start == "none" else f"_{cold_start}")
  if jax.process_index() == 0:
    print(f"Ranking {data_dir} with the checkpoint at step {step} of {workdir}")
    for split, c in info.items():
      print(describe(split, c))
  for name, evaluator in evaluators.items():
    train.report(name, evaluator, results[name], workdir, suffix=f"_step{step}_{tag}")
  return results


def describe(split: str, c: Mapping) -> str:
  """One paragraph of the counts of a ranked split (the "new_data" entry)."""
  line = (f"{split} split: {c['posts']} posts ({c['texts']} with a text); "
          f"{c['unknown_users']} authors unknown to the model wrote {c['unknown_posts']} of "
          f"them ({c['unknown_texts']} texts, text->user queries)")
  if c["cold_start"] != "none":
    made = c["cold_start_users"]
    line += (f"; cold start ({c['cold_start']}) from the dataset's train split: "
             f"{made['fold_in']} users folded in, {made['avg_text']} by Avg-Text")
  return line + (f"; left out (no vector: not a candidate, no query): {c['left_out_posts']} "
                 f"posts, {c['left_out_texts']} texts")

