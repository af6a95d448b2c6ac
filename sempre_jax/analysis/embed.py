"""How do new posts, images and users land in a trained model's space?

`embed` prepares a posts file with the vocabulary, users and word vectors of
the workdir's data (prepare's `vocab_from`, into a temporary dataset, every
post in its train split), gives the users new to the model a vector by cold
start from all their posts (analysis/coldstart.py), and writes the posts'
texts and images and their authors (known ones with their trained vectors)
with launch/export.py's writer (analysis/export.py): the same files, with
export.json naming the posts file and the workdir instead of a data_dir (the
temporary dataset is gone).
"""

import dataclasses
import os
import tempfile

import numpy as np

from input_pipeline import prepare, records
from sempre_jax.analysis import coldstart, export, space as space_lib, workdir as workdir_lib


def embed(workdir: str, posts_path: str, out_dir: str, options: prepare.Options,
          checkpoint: str = "best", cold_start: str = "fold_in", *, steps: int = 100,
          learning_rate: float | None = None, shard_rows: int = 1_000_000,
          projector_rows: int = 10_000) -> dict:
  """Writes the export of the posts of `posts_path` (read with `options`' fields);
  returns {"users", "texts", "images": rows written, "new_users": {how: count},
  "new_users_without_vector": count}."""
  exp, variables, step = workdir_lib.restore(workdir, checkpoint)
  if exp.model_def.DATA != "posts":
    raise ValueError(f"{workdir} holds a {exp.config.model.name} model; embedding needs a "
                     "model of posts (DU2MCE)")
  options = dataclasses.replace(
      options, vocab_from=exp.data_dir, split_field=None, test_fraction=0.0,
      validation_fraction=0.0, interest_field=None, actions=None, follows=None, oracle=None)
  num_known, params = exp.metadata["num_users"], variables["params"]
  batch_size = space_lib.eval_batch_size(exp.config)
  with tempfile.TemporaryDirectory() as data_dir:
    prepare.prepare(posts_path, data_dir, options, log=lambda *a: None)
    meta = records.read_metadata(data_dir)
    base = space_lib.Space(exp.module, params, data_dir, meta, batch_size=batch_size)
    posters = np.unique(np.concatenate(
        [posts.user for posts in base.posts(towers=(), label="reading ids")]))
    vectors, how = np.zeros([meta["num_users"] - num_known, exp.module.embed_dim]), {}
    if cold_start != "none" and len(vectors):
      vectors, how = coldstart.new_user_vectors(
          base, params, data_dir, "train", num_known, cold_start, exp.term_weights(),
          margin=exp.config.loss.margin, steps=steps,
        learning_rate=learning_rate or exp.config.learning_rate)
    module, params = coldstart.with_new_users(exp.module, params, vectors)
    space = space_lib.Space(module, params, data_dir, meta, batch_size=batch_size, step=step)
    with_vector = (posters < num_known) | np.isin(posters - num_known, list(how))
    counts = export.export_embeddings(
        space, out_dir, shard_rows=shard_rows, projector_rows=projector_rows,
        users=posters[with_vector],
        manifest={"data_dir": None, "workdir": os.path.abspath(workdir),
                  "posts": os.path.abspath(posts_path), "cold_start": cold_start})
  counts["new_users"] = {m: sum(v == m for v in how.values()) for m in ("fold_in", "avg_text")}
  counts["new_users_without_vector"] = int((~with_vector).sum())
  return counts
