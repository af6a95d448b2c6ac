"""Which groups of users does the space find, and what do they post? (paper Fig. 4)

k-means on the embeddings of the users with a training post; per cluster:
  size        its number of users.
  top words   word counts over the training posts of its users, without the
              corpus's `common_words` most frequent words (counted over the
              training split) and padding/unknown.
  images      the images of the dataset (all splits) nearest to the cluster's
              centroid direction in the joint space (cosine with the image
              tower's embeddings).
`write_page` renders them as a folder that a browser opens without a server:
index.html (relative paths), a word cloud PNG per cluster, the images as
PNG files from the dataset's pixel table, and clusters.json with the same content.
"""

import html
import json
import os
from collections.abc import Mapping

import numpy as np
import wordcloud
from matplotlib import font_manager
from sklearn.cluster import KMeans

from input_pipeline import records
from sempre_jax.analysis import space as space_lib
from sempre_jax.evals import retrieval

PAGE_FILE = "index.html"
JSON_FILE = "clusters.json"
EXAMPLE_USERS = 10


def user_clusters(space: space_lib.Space, *, num_clusters: int = 50, top_words: int = 30,
                  images: int = 8, common_words: int = 200, seed: int = 0) -> dict:
  """The clusters of the space's users (see the module), largest first, as a
  JSON-able dict."""
  active = np.flatnonzero(retrieval.train_posts_per_user(space.data_dir, space.metadata))
  if not len(active):
    raise ValueError(f"no user of {space.data_dir} has a training post")
  users = space.users(active)                                         # [A, D]
  k = min(num_clusters, len(active))
  kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(users)   # k-means++
  order = np.argsort(-np.bincount(kmeans.labels_, minlength=k), kind="stable")
  label = np.argsort(order)[kmeans.labels_]                           # largest = 0
  centroids = kmeans.cluster_centers_[order]
  centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
  cluster_of = np.full([space.metadata["num_users"]], -1)
  cluster_of[active] = label

  vocab_size = space.metadata["vocab_size"]
  words = np.zeros([k, vocab_size], np.int64)                         # [K, V]
  nearest = space_lib.TopK(images, columns=k)
  for posts in space.posts(("image",) if images else (), label="clusters"):
    if posts.split == "train":
      c = np.broadcast_to(cluster_of[posts.user][:, None], posts.tokens.shape)
      keep = (c >= 0) & (posts.tokens != records.PAD_ID)
      words += np.bincount(c[keep] * vocab_size + posts.tokens[keep],
                           minlength=k * vocab_size).reshape(k, vocab_size)
    if images and posts.new_image.any():
      nearest.add(posts.images @ centroids.T, zip(
          posts.image_id[posts.new_image].tolist(), posts.post_id[posts.new_image],
          [posts.split] * int(posts.new_image.sum()), posts.row[posts.new_image].tolist()))
  corpus = words.sum(0)
  corpus[[records.PAD_ID, records.UNK_ID]] = 0
  common = np.argsort(-corpus, kind="stable")[:common_words]
  words[:, [records.PAD_ID, records.UNK_ID]] = 0
  words[:, common] = 0

  vocab = space.vocab or [str(t) for t in range(vocab_size)]
  clusters = []
  for c in range(k):
    members = active[label == c]
    closest = members[np.argsort(-(users[label == c] @ centroids[c]))][:EXAMPLE_USERS]
    top = [t for t in np.argsort(-words[c], kind="stable")[:top_words] if words[c, t]]
    clusters.append({
        "cluster": c, "size": int(len(members)),
        "example_users": [space.user_names[u] for u in closest],
        "top_words": [[vocab[t], int(words[c, t])] for t in top],
        "images": [{"image_id": key[0], "post_id": key[1], "split": key[2], "row": key[3],
                    "score": round(score, 4)} for score, key in nearest.best(c)]})
  return {"step": space.step, "data_dir": os.path.abspath(space.data_dir),
          "users_clustered": int(len(active)),
          "common_words_dropped": [vocab[t] for t in common if corpus[t]],
          "clusters": clusters}


def write_page(space: space_lib.Space, result: Mapping, out_dir: str, seed: int = 0) -> str:
  """Writes the clusters page, its pictures and clusters.json into out_dir;
  returns the page's path. Adds "word_cloud" and each image's "file" to the
  result (None when there is none)."""
  os.makedirs(out_dir, exist_ok=True)
  clusters = result["clusters"]
  found = space.pictures([(i["split"], i["row"]) for c in clusters for i in c["images"]])
  found = iter(found)
  font = font_manager.findfont("DejaVu Sans")     # wide script coverage (Arabic too)
  sections = []
  for c in clusters:
    name = f"cluster-{c['cluster']:03d}"
    c["word_cloud"] = None
    if c["top_words"]:
      c["word_cloud"] = f"{name}-words.png"
      wordcloud.WordCloud(width=480, height=240, background_color="white",
                          font_path=font, random_state=seed).generate_from_frequencies(
          dict(c["top_words"])).to_file(os.path.join(out_dir, c["word_cloud"]))
    for rank, image in enumerate(c["images"]):
      data = next(found)
      image["file"] = data and f"{name}-image-{rank}.png"
      if data:
        with open(os.path.join(out_dir, image["file"]), "wb") as f:
          f.write(data)
    sections.append(_section(c))
  with open(os.path.join(out_dir, JSON_FILE), "w") as f:
    json.dump(result, f, indent=1)
  pictures = any(i["file"] for c in clusters for i in c["images"])
  note = ("" if pictures else "<p class=note>" + (
      "The nearest images have no pixels in this dataset (prepared with image "
      "features only): they are listed by id." if space.has_images
      else "This dataset has no images.") + "</p>")
  page = os.path.join(out_dir, PAGE_FILE)
  with open(page, "w", encoding="utf-8") as f:
    f.write(_PAGE.format(
        title=html.escape(f"User clusters of {result['data_dir']} (step {result['step']})"),
        summary=html.escape(
            f"{len(clusters)} clusters of the {result['users_clustered']} users with a "
            f"training post; top words leave out the corpus's "
            f"{len(result['common_words_dropped'])} most common words."),
        note=note, sections="\n".join(sections)))
  return page


def _section(c: Mapping) -> str:
  cloud = (f'<img class=cloud src="{html.escape(c["word_cloud"])}" alt="word cloud">'
           if c["word_cloud"] else "<p class=note>No words.</p>")
  words = ", ".join(f"{html.escape(w)} ({n})" for w, n in c["top_words"])
  pictures = "".join(
      f'<figure><img class=picture src="{html.escape(i["file"])}" alt="image {i["image_id"]}">'
      f'<figcaption>image {i["image_id"]}<br>{i["score"]:.3f}</figcaption></figure>'
      if i["file"] else f"<figure>image {i['image_id']} ({i['score']:.3f})</figure>"
      for i in c["images"])
  users = html.escape(", ".join(c["example_users"]))
  return (f'<section class=cluster id="cluster-{c["cluster"]}">'
          f'<h2>Cluster {c["cluster"]}: {c["size"]} users</h2>{cloud}'
          f'<p class=words>{words}</p><div class=images>{pictures}</div>'
          f'<p class=users>users nearest the centroid: {users}</p></section>')


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em 2em; }}
section {{ border-top: 1px solid #ccc; padding: 0.5em 0; }}
.cloud {{ display: block; }}
.words, .users, .note {{ color: #444; font-size: 0.9em; }}
.images {{ display: flex; flex-wrap: wrap; gap: 0.5em; }}
figure {{ margin: 0; text-align: center; font-size: 0.8em; }}
.picture {{ width: 96px; height: 96px; object-fit: cover; image-rendering: pixelated; }}
</style></head>
<body><h1>{title}</h1><p>{summary}</p>{note}
{sections}
</body></html>
"""
