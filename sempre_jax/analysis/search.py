"""What in the network matches a text that a person types? (paper Fig. 5)

The query is cleaned as the posts were (`input_pipeline.text.clean_text`),
its words mapped with the dataset's vocabulary (unknown words -> UNK; a query
without a known word is an error), truncated to MAX_LEN tokens and embedded
with the text tower. The top images, posts and users are those of highest
cosine with it: embedded again from the checkpoint, or searched in the FAISS
indexes of an export of the same checkpoint. One pass over the ids of the
records then describes them (the posts carrying each image, each post's
author, split and words, each user's number of training posts).
"""

import os

import faiss
import numpy as np

from input_pipeline import records, text as text_lib
from sempre_jax.analysis import export, space as space_lib

MODALITIES = ("images", "posts", "users")
SHOWN_POSTS = 5   # post ids printed per image


def encode_query(query: str, vocab: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
  """(token ids [MAX_LEN], the words kept, the unknown ones) of a query text."""
  words = text_lib.clean_text(query)
  ids = text_lib.encode(words, {w: i for i, w in enumerate(vocab)})
  unknown = [w for w, i in zip(words, ids) if i == records.UNK_ID]
  if len(unknown) == len(words):
    raise ValueError(f"no word of the query {query!r} is in the vocabulary "
                     f"({len(vocab)} words; after cleaning: {words})")
  return records.pad_tokens(ids).astype(np.int32), words, unknown


def search(space: space_lib.Space, query: str, k: int = 5,
           export_dir: str | None = None) -> dict:
  """The k best images, posts and users for a query text (see the module)."""
  if space.vocab is None:
    raise FileNotFoundError(f"{space.data_dir} has no {records.VOCAB_FILE}")
  tokens, words, unknown = encode_query(query, space.vocab)
  vector = space.texts(tokens[None])                                 # [1, D]
  best = (_search_export(space, vector, k, export_dir) if export_dir
          else _search_space(space, vector, k))
  return {"query": query, "words": words, "unknown": unknown,
          "truncated": len(words) > records.MAX_LEN, "step": space.step,
          "searched": export_dir or "embedded from the checkpoint",
          **_describe(space, best)}


def _search_space(space: space_lib.Space, vector: np.ndarray, k: int) -> dict:
  """{modality: [(score, key)]}: keys are image ids, post ids and user indices."""
  top = {name: space_lib.TopK(k) for name in MODALITIES}
  users = np.arange(space.metadata["num_users"])
  top["users"].add(space.users(users) @ vector[0], users.tolist())
  for posts in space.posts(label="query"):
    top["posts"].add(posts.texts @ vector[0], posts.post_id[posts.has_text])
    top["images"].add(posts.images @ vector[0], posts.image_id[posts.new_image].tolist())
  return {name: t.best() for name, t in top.items()}


def _search_export(space: space_lib.Space, vector: np.ndarray, k: int,
                   export_dir: str) -> dict:
  """The same from the FAISS indexes of an export of the space's checkpoint."""
  manifest = export.read_manifest(export_dir)
  if (manifest["step"], manifest["data_dir"]) != (space.step, os.path.abspath(space.data_dir)):
    raise ValueError(f"{export_dir} exports step {manifest['step']} of "
                     f"{manifest['data_dir']}, not the checkpoint's step {space.step} of "
                     f"{os.path.abspath(space.data_dir)}")
  out = {}
  for name, part, key in (("images", "images", int), ("posts", "texts", str),
                          ("users", "users", int)):
    top = space_lib.TopK(k)
    for path in export.shard_paths(export_dir, part):
      scores, rows = faiss.read_index(path + ".faiss").search(vector, k)
      found = rows[0] >= 0
      with open(path + ".tsv", encoding="utf-8") as f:
        ids = [line.split("\t", 1)[0] for line in f][1:]
      top.add(scores[0][found], [key(ids[r]) for r in rows[0][found]])
    out[name] = top.best()
  return out


def _describe(space: space_lib.Space, best: dict) -> dict:
  """Results with their ids, from one pass over the ids of the records."""
  images = {i: [] for _, i in best["images"]}
  posts, users = {p: None for _, p in best["posts"]}, {u: 0 for _, u in best["users"]}
  keys = {name: np.array(list(d), dtype=object if name == "posts" else np.int64)
          for name, d in (("images", images), ("posts", posts), ("users", users))}
  for batch in space.posts(towers=(), label="describing"):
    for i in np.flatnonzero(np.isin(batch.image_id, keys["images"])):
      images[int(batch.image_id[i])].append(batch.post_id[i])
    for i in np.flatnonzero(np.isin(batch.post_id, keys["posts"])):
      posts[batch.post_id[i]] = {"user_id": space.user_names[batch.user[i]],
                                 "split": batch.split, "words": space.words(batch.tokens[i])}
    if batch.split == "train":
      for u in batch.user[np.isin(batch.user, keys["users"])]:
        users[int(u)] += 1
  return {
      "images": [{"score": s, "image_id": i, "post_ids": images[i]}
                 for s, i in best["images"]],
      "posts": [{"score": s, "post_id": p, **posts[p]} for s, p in best["posts"]],
      "users": [{"score": s, "user_id": space.user_names[u], "train_posts": users[u]}
                for s, u in best["users"]]}


def format_results(result: dict) -> str:
  """The results as readable lines."""
  notes = [f"unknown, as UNK: {' '.join(result['unknown'])}"] if result["unknown"] else []
  if result["truncated"]:
    notes.append(f"truncated to the first {records.MAX_LEN}")
  lines = [f"Query {result['query']!r} -> words: {' '.join(result['words'])}"
           + (f" ({'; '.join(notes)})" if notes else ""),
           f"Step {result['step']}, {result['searched']}"]
  lines.append(f"\nTop {len(result['images'])} images:")
  for rank, r in enumerate(result["images"], 1):
    more = len(r["post_ids"]) - SHOWN_POSTS
    lines.append(f"{rank:>3}. {r['score']:.3f}  image {r['image_id']}  posts "
                 + ", ".join(r["post_ids"][:SHOWN_POSTS])
                 + (f" (+{more} more)" if more > 0 else ""))
  lines.append(f"\nTop {len(result['posts'])} posts:")
  for rank, r in enumerate(result["posts"], 1):
    lines.append(f"{rank:>3}. {r['score']:.3f}  {r['post_id']} by {r['user_id']} "
                 f"({r['split']}): {r['words']}")
  lines.append(f"\nTop {len(result['users'])} users:")
  for rank, r in enumerate(result["users"], 1):
    lines.append(f"{rank:>3}. {r['score']:.3f}  {r['user_id']} "
                 f"({r['train_posts']} training posts)")
  return "\n".join(lines)
