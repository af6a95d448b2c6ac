"""How do embeddings leave the program for analysis?

For each modality (users, texts, images) this process writes its part:
  {name}-{p:05d}-of-{P:05d}.npy    [N, D] float32, L2-normalised embeddings
  {name}-{p:05d}-of-{P:05d}.tsv    the ids of each row (with a header)
  {name}-{p:05d}-of-{P:05d}.faiss  a FAISS IndexFlatIP over the rows (inner
                                   product = cosine similarity)
and process 0 writes TensorBoard projector files (`projector/`: vectors and
metadata TSVs of up to `projector_rows` rows each, and projector_config.pbtxt).
Parts: users by index, texts by post (every P-th post of the dataset's
files), images by image id modulo P, so the parts of a job never overlap.
"""

import os
import sys
import time
from collections.abc import Mapping, Sequence

import faiss
import numpy as np

from input_pipeline import loader, records
from sempre_jax import evaluation, mesh as mesh_lib, models

PROJECTOR_DIR = "projector"


def _part_name(name: str, process: int, count: int) -> str:
  return f"{name}-{process:05d}-of-{count:05d}"


def write_part(out_dir: str, name: str, vectors: np.ndarray, header: Sequence[str],
               rows: Sequence[Sequence], process: int, count: int) -> None:
  """The .npy, .tsv and .faiss files of one modality's part."""
  base = os.path.join(out_dir, _part_name(name, process, count))
  vectors = np.ascontiguousarray(vectors, np.float32)
  np.save(base + ".npy", vectors)
  with open(base + ".tsv", "w", encoding="utf-8") as f:
    f.write("\t".join(header) + "\n")
    f.writelines("\t".join(map(str, row)) + "\n" for row in rows)
  index = faiss.IndexFlatIP(vectors.shape[1])
  index.add(vectors)
  faiss.write_index(index, base + ".faiss")


def write_projector(out_dir: str, parts: Mapping[str, tuple], max_rows: int) -> None:
  """TensorBoard projector files for {name: (vectors, header, rows)}."""
  directory = os.path.join(out_dir, PROJECTOR_DIR)
  os.makedirs(directory, exist_ok=True)
  config = []
  for name, (vectors, header, rows) in parts.items():
    n = min(len(vectors), max_rows)
    np.savetxt(os.path.join(directory, f"{name}_vectors.tsv"), vectors[:n],
               delimiter="\t", fmt="%.5f")
    with open(os.path.join(directory, f"{name}_metadata.tsv"), "w", encoding="utf-8") as f:
      f.write("\t".join(header) + "\n")
      f.writelines("\t".join(map(str, row)) + "\n" for row in rows[:n])
    config.append(f'embeddings {{\n  tensor_name: "{name}"\n'
                  f'  tensor_path: "{name}_vectors.tsv"\n'
                  f'  metadata_path: "{name}_metadata.tsv"\n}}\n')
  with open(os.path.join(directory, "projector_config.pbtxt"), "w") as f:
    f.write("".join(config))


def export_embeddings(model: models.DU2MCE, params, data_dir: str, metadata: Mapping,
                      out_dir: str, *, batch_size: int = 1000, process: int = 0,
                      count: int = 1, projector_rows: int = 10_000) -> dict:
  """Writes this process's part of every modality; returns {name: rows written}."""
  os.makedirs(out_dir, exist_ok=True)
  embed = evaluation.Embedder(model, params, batch_size, mesh_lib.make_mesh(local=True))
  image_key = models.image_key(model.image_input)
  user_names = records.read_lines(data_dir, records.USERS_FILE)
  users = np.arange(process, metadata["num_users"], count, dtype=np.int32)
  name_of = (lambda u: user_names[u]) if user_names else str
  parts = {"users": (np.asarray(embed("user", users)), ("index", "user_id"),
                     [(u, name_of(u)) for u in users])}

  text_vecs, text_rows, image_vecs, image_rows, seen = [], [], [], [], set()
  t0, n_posts, total = time.time(), 0, sum(
      m["num_posts"] for m in metadata["splits"].values())
  for split in metadata["splits"]:
    for batch in loader.eval_batches(data_dir, metadata, split, batch_size,
                                     model.image_input):
      index = n_posts + np.arange(len(batch["user"]))
      n_posts += len(index)
      mine = (index % count == process) & batch["text_mask"].any(axis=1)
      text_vecs.append(np.asarray(embed("text", batch["tokens"][mine],
                                        batch["text_mask"][mine])))
      text_rows += [(pid.decode(), name_of(u), split) for pid, u in
                    zip(batch["post_id"][mine], batch["user"][mine])]
      new = []                                   # the first post of each of my images
      for i, (has, img) in enumerate(zip(batch["image_mask"], batch["image_id"])):
        if has and img % count == process and img not in seen:
          seen.add(int(img))
          new.append(i)
      image_vecs.append(np.asarray(embed("image", batch[image_key][new])))
      image_rows += [(int(batch["image_id"][i]), batch["post_id"][i].decode(), split)
                     for i in new]
      rate = n_posts / max(time.time() - t0, 1e-9)
      print(f"\rexport: {n_posts}/{total} posts, {rate:,.0f} posts/s, ETA "
            f"{(total - n_posts) / max(rate, 1e-9):.0f}s   ", end="", file=sys.stderr)
  print(file=sys.stderr)
  parts["texts"] = (np.concatenate(text_vecs), ("post_id", "user_id", "split"), text_rows)
  parts["images"] = (np.concatenate(image_vecs), ("image_id", "post_id", "split"),
                     image_rows)
  for name, (vectors, header, rows) in parts.items():
    write_part(out_dir, name, vectors, header, rows, process, count)
  if process == 0:
    write_projector(out_dir, parts, projector_rows)
  return {name: len(rows) for name, (_, _, rows) in parts.items()}
