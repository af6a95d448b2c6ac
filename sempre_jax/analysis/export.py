"""How do embeddings leave the program for analysis?

Each process of a job writes its part of every modality (users by index % P,
texts by post, images by image id % P: the parts never overlap), streamed
into shards of at most `shard_rows` rows as the posts are embedded:
  {name}-{p:05d}-of-{P:05d}-shard-{s:05d}-of-{S:05d}.npy    [N, D] float32,
                              L2-normalised embeddings
  ....tsv    the ids of each row (with a header)
  ....faiss  a FAISS IndexFlatIP over the rows (inner product = cosine)
name is users, texts or images; p of P is the process, s of S the shard of
its part (files in sorted order = rows in order). A shard is written as
`...-shard-{s:05d}.*` and renamed with `-of-{S:05d}` when its part is done,
so a name without it is an interrupted export.
Process 0 also writes `export.json` (the checkpoint step, the data directory,
the number of processes) and TensorBoard projector files (`projector/`:
vectors and metadata TSVs of its first `projector_rows` rows of each
modality, and projector_config.pbtxt). `shard_paths` lists the shards of a
finished export and checks that every part is complete.
"""

import glob
import json
import os
from collections.abc import Mapping, Sequence

import faiss
import numpy as np

from sempre_jax.analysis import space as space_lib

PROJECTOR_DIR = "projector"
MANIFEST_FILE = "export.json"
HEADERS = {"users": ("index", "user_id"), "texts": ("post_id", "user_id", "split"),
           "images": ("image_id", "post_id", "split")}


class PartWriter:
  """One modality's part of this process, streamed into shards (see the module);
  keeps its first `keep_rows` rows for the projector."""

  def __init__(self, out_dir: str, name: str, dim: int, *, process: int, count: int,
               shard_rows: int, keep_rows: int = 0):
    self.prefix = os.path.join(out_dir, f"{name}-{process:05d}-of-{count:05d}-shard-")
    for stale in glob.glob(glob.escape(self.prefix) + "*"):   # an earlier export's
      os.remove(stale)
    self.header, self.dim = HEADERS[name], dim
    self.shard_rows, self.keep_rows = shard_rows, keep_rows
    self.vectors, self.rows, self.kept_vectors, self.kept_rows = [], [], [], []
    self.buffered, self.shards, self.written, self.kept = 0, 0, 0, 0

  def add(self, vectors: np.ndarray, rows: Sequence[Sequence]) -> None:
    """vectors [N, D] and their N id rows (one value per header column)."""
    vectors, rows = np.asarray(vectors, np.float32), list(rows)
    keep = min(len(rows), self.keep_rows - self.kept)
    if keep > 0:
      self.kept_vectors.append(vectors[:keep])
      self.kept_rows.append(rows[:keep])
      self.kept += keep
    while rows:
      take = min(len(rows), self.shard_rows - self.buffered)
      self.vectors.append(vectors[:take])
      self.rows += rows[:take]
      vectors, rows, self.buffered = vectors[take:], rows[take:], self.buffered + take
      if self.buffered == self.shard_rows:
        self._flush()

  def _flush(self) -> None:
    base = f"{self.prefix}{self.shards:05d}"
    vectors = np.ascontiguousarray(np.concatenate(self.vectors) if self.vectors
                                   else np.zeros([0, self.dim], np.float32))
    np.save(base + ".npy", vectors)
    with open(base + ".tsv", "w", encoding="utf-8") as f:
      f.write("\t".join(self.header) + "\n")
      f.writelines("\t".join(map(str, row)) + "\n" for row in self.rows)
    index = faiss.IndexFlatIP(self.dim)
    index.add(vectors)
    faiss.write_index(index, base + ".faiss")
    self.written += len(vectors)
    self.shards += 1
    self.vectors, self.rows, self.buffered = [], [], 0

  def close(self) -> int:
    """Writes the last shard (an empty one for an empty part), names every shard
    with the count; returns the number of rows written."""
    if self.buffered or not self.shards:
      self._flush()
    for s in range(self.shards):
      for ext in (".npy", ".tsv", ".faiss"):
        os.replace(f"{self.prefix}{s:05d}{ext}",
                   f"{self.prefix}{s:05d}-of-{self.shards:05d}{ext}")
    return self.written

  def projector_part(self) -> tuple:
    """(vectors [K, D], header, rows) of the kept rows."""
    return (np.concatenate(self.kept_vectors) if self.kept_vectors
            else np.zeros([0, self.dim], np.float32), self.header,
            [row for rows in self.kept_rows for row in rows])


def read_manifest(out_dir: str) -> dict:
  """export.json of a finished export (step, data_dir, processes, shard_rows)."""
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {out_dir} is not a finished export "
                            "(make one with launch/export.py)")
  with open(path) as f:
    return json.load(f)


def shard_paths(out_dir: str, name: str) -> list[str]:
  """The shards of a modality of a finished export (paths without extension, in
  row order); raises ValueError when a part is missing or incomplete."""
  count = read_manifest(out_dir)["processes"]
  out = []
  for p in range(count):
    prefix = os.path.join(out_dir, f"{name}-{p:05d}-of-{count:05d}-shard-")
    found = sorted(glob.glob(glob.escape(prefix) + "*.faiss"))
    expected = [f"{prefix}{s:05d}-of-{len(found):05d}.faiss" for s in range(len(found))]
    if not found or found != expected:
      raise ValueError(f"the shards {prefix}* are missing or incomplete (found "
                       f"{[os.path.basename(f) for f in found]})")
    out += [f[:-len(".faiss")] for f in found]
  return out


def write_projector(out_dir: str, parts: Mapping[str, tuple]) -> None:
  """TensorBoard projector files for {name: (vectors, header, rows)}."""
  directory = os.path.join(out_dir, PROJECTOR_DIR)
  os.makedirs(directory, exist_ok=True)
  config = []
  for name, (vectors, header, rows) in parts.items():
    np.savetxt(os.path.join(directory, f"{name}_vectors.tsv"), vectors,
               delimiter="\t", fmt="%.5f")
    with open(os.path.join(directory, f"{name}_metadata.tsv"), "w", encoding="utf-8") as f:
      f.write("\t".join(header) + "\n")
      f.writelines("\t".join(map(str, row)) + "\n" for row in rows)
    config.append(f'embeddings {{\n  tensor_name: "{name}"\n'
                  f'  tensor_path: "{name}_vectors.tsv"\n'
                  f'  metadata_path: "{name}_metadata.tsv"\n}}\n')
  with open(os.path.join(directory, "projector_config.pbtxt"), "w") as f:
    f.write("".join(config))


def export_embeddings(space: space_lib.Space, out_dir: str, *, process: int = 0,
                      count: int = 1, shard_rows: int = 1_000_000,
                      projector_rows: int = 10_000, users: np.ndarray | None = None,
                      manifest: Mapping | None = None) -> dict:
  """Writes this process's part of every modality; returns {name: rows written}.

  users: the user indices to write (default: every user); manifest: entries
  added to (or replacing those of) export.json."""
  if shard_rows < 1:
    raise ValueError(f"shard_rows must be positive, got {shard_rows}")
  os.makedirs(out_dir, exist_ok=True)
  keep = projector_rows if process == 0 else 0
  writers = {name: PartWriter(out_dir, name, space.model.embed_dim, process=process,
                              count=count, shard_rows=shard_rows, keep_rows=keep)
             for name in HEADERS}
  names = space.user_names
  users = np.arange(space.metadata["num_users"]) if users is None else np.asarray(users)
  for start in range(process, len(users), count * shard_rows):
    part = users[start:start + count * shard_rows:count]
    writers["users"].add(space.users(part), [(u, names[u]) for u in part])
  for posts in space.posts(process=process, count=count, label="export"):
    writers["texts"].add(posts.texts, [
        (p, names[u], posts.split)
        for p, u in zip(posts.post_id[posts.has_text], posts.user[posts.has_text])])
    writers["images"].add(posts.images, [
        (i, p, posts.split)
        for i, p in zip(posts.image_id[posts.new_image], posts.post_id[posts.new_image])])
  counts = {name: writer.close() for name, writer in writers.items()}
  if process == 0:
    write_projector(out_dir, {n: w.projector_part() for n, w in writers.items()})
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
      json.dump({"step": space.step, "data_dir": os.path.abspath(space.data_dir),
                 "processes": count, "shard_rows": shard_rows, **(manifest or {})}, f,
                indent=1)
  return counts
