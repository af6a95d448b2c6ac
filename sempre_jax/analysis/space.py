"""Where does each user, post and image of a dataset land in a checkpoint's space?

`Space` holds a checkpoint's towers and its dataset, and is what the analysis
tools share (export, clusters, query):
  users(...)   the user tower on user indices.
  texts(...)   the text tower on token ids.
  posts(...)   one streaming pass over the records of some splits (split after
               split, in the split's order) that yields each batch of posts with its ids
               and the embeddings of
                 texts   the posts with a text, of this process's share
                         (position of the post in the pass % P == p);
                 images  the first post of each image not seen before, of
                         this process's share (image id % P == p);
               with a progress bar (rate, ETA) on stderr. towers=() reads
               ids only (fast: no image is parsed).
  pictures(...)  the picture of some posts, from the dataset's pixel table.
Every embedding is L2-normalised by the model: a dot product is a cosine.
`TopK` keeps the best-scoring rows of such a stream in bounded memory.
"""

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from input_pipeline import loader, progress, records
from sempre_jax import mesh as mesh_lib
from sempre_jax.analysis import workdir as workdir_lib
from sempre_jax.evals import retrieval
from sempre_jax.models import du2mce, encoders


@dataclasses.dataclass
class Posts:
  """One batch of posts of one split, with the embeddings of its texts and new images."""
  split: str
  row: np.ndarray        # [N] position of each post in its split
  post_id: np.ndarray    # [N] str
  user: np.ndarray       # [N] user index
  tokens: np.ndarray     # [N, MAX_LEN] token ids, 0 = padding
  image_id: np.ndarray   # [N] unique-image index, -1 = no image
  has_text: np.ndarray   # [N] bool: the post's text is one of `texts`
  new_image: np.ndarray  # [N] bool: the post's image is one of `images`
  texts: np.ndarray | None   # [has_text.sum(), D] (None: text tower not asked)
  images: np.ndarray | None  # [new_image.sum(), D] (None: image tower not asked)


class Space:
  """A checkpoint's towers over its dataset, on this process's devices."""

  def __init__(self, model: du2mce.DU2MCE, params, data_dir: str, metadata: dict, *,
               batch_size: int = 1000, step: int | None = None):
    self.model, self.data_dir, self.metadata, self.step = model, data_dir, metadata, step
    self.batch_size = batch_size
    embedder = retrieval.Embedder(model, batch_size, mesh_lib.make_mesh(local=True))
    self.embedder = functools.partial(embedder, embedder.place(params))
    names = records.read_lines(data_dir, records.USERS_FILE)
    self.user_names = names or [str(u) for u in range(metadata["num_users"])]
    self.vocab = records.read_lines(data_dir, records.VOCAB_FILE)

  @classmethod
  def restore(cls, workdir: str, checkpoint: str = "best") -> "Space":
    """The space of a workdir's checkpoint ("best", "latest" or a step)."""
    exp, variables, step = workdir_lib.restore(workdir, checkpoint)
    if exp.model_def.DATA != "posts":
      raise ValueError(f"{workdir} holds a {exp.config.model.name} model; this tool needs "
                       "a model of posts (DU2MCE)")
    return cls(exp.module, variables["params"], exp.data_dir, exp.metadata,
               batch_size=eval_batch_size(exp.config), step=step)

  @property
  def has_images(self) -> bool:
    return self.metadata.get("num_images", 0) > 0

  def users(self, users: np.ndarray) -> np.ndarray:
    """User indices [N] -> [N, D]."""
    return np.asarray(self.embedder("user", np.asarray(users, np.int32)))

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    """Token ids [N, MAX_LEN] (0 = padding) -> [N, D]."""
    tokens = np.asarray(tokens, np.int32)
    return np.asarray(self.embedder("text", tokens, tokens != records.PAD_ID))

  def words(self, tokens: np.ndarray) -> str:
    """Token ids [MAX_LEN] -> the words of the text."""
    return " ".join(self.vocab[t] if self.vocab else str(t)
                    for t in tokens if t != records.PAD_ID)

  def posts(self, towers: Sequence[str] = ("text", "image"),
            splits: Sequence[str] | None = None, *, process: int = 0, count: int = 1,
            label: str = "embedding") -> Iterator[Posts]:
    """Every post of `splits` (all by default), batch by batch (see the module)."""
    splits = list(self.metadata["splits"]) if splits is None else list(splits)
    image_input = self.model.image_input if "image" in towers and self.has_images else None
    image_key = encoders.image_key(self.model.image_input)
    seen = np.zeros([self.metadata.get("num_images", 0)], bool)
    total = sum(self.metadata["splits"][s]["num_posts"] for s in splits)
    done, bar = 0, progress.bar(total, label, "posts")
    for split in splits:
      row = 0
      for batch in loader.eval_batches(self.data_dir, self.metadata, split,
                                       self.batch_size, image_input):
        n = len(batch["user"])
        has_text = (((done + np.arange(n)) % count == process)
                    & batch["text_mask"].any(axis=1))
        ids = batch["image_id"]
        mine = np.flatnonzero(batch["image_mask"] & (ids % count == process))
        mine = mine[~seen[ids[mine]]]
        _, first = np.unique(ids[mine], return_index=True)
        new_image = np.zeros([n], bool)
        new_image[mine[first]] = True
        seen[ids[mine]] = True
        images = None
        if "image" in towers:    # (a dataset without images has no new image)
          images = (np.asarray(self.embedder("image", batch[image_key][new_image]))
                    if image_input else np.zeros([0, self.model.embed_dim], np.float32))
        yield Posts(
            split=split, row=row + np.arange(n),
            post_id=np.array([p.decode() for p in batch["post_id"]], object),
            user=batch["user"], tokens=batch["tokens"], image_id=ids,
            has_text=has_text, new_image=new_image,
            texts=self.texts(batch["tokens"][has_text]) if "text" in towers else None,
            images=images)
        row += n
        done += n
        bar.update(n)
    bar.close()

  def pictures(self, locations: Sequence[tuple[str, int]]) -> list[bytes | None]:
    """The pictures (PNG bytes, from the pixel table) of posts given as (split,
    row); None where the post has no image or the dataset no pixels (an image
    known by its features only is a zero row of the table)."""
    if not self.metadata.get("image_size"):
      return [None] * len(locations)
    table = records.read_table(self.data_dir, self.metadata, "image")
    readers, out = {}, []
    try:
      for split, row in locations:
        if split not in readers:
          readers[split] = loader.split_reader(self.data_dir, self.metadata, split)
        block, at = divmod(int(row), readers[split].block_posts)
        image = int(readers[split].rows(block)["image_id"][at])
        pixels = table[image] if image >= 0 else None
        out.append(records.encode_png(np.asarray(pixels))
                   if pixels is not None and pixels.any() else None)
    finally:
      for reader in readers.values():
        reader.close()
    return out


def eval_batch_size(config) -> int:
  """Posts embedded per call: the largest of the config's evaluators."""
  return max([e.get("batch_size", 0) for e in config.evals.values()] or [1000])


class TopK:
  """The k highest scores of a stream of score matrices [N, C], per column,
  with the key of each row."""

  def __init__(self, k: int, columns: int = 1):
    self.k = k
    self.scores = np.zeros([columns, 0], np.float32)
    self.keys = np.zeros([columns, 0], object)

  def add(self, scores: np.ndarray, keys: Iterable) -> None:
    """scores [N, C] (or [N] for one column) and the N keys of the rows."""
    scores = np.asarray(scores, np.float32)
    new = (scores[:, None] if scores.ndim == 1 else scores).T            # [C, N]
    row_keys = np.fromiter(keys, object, len(scores))
    scores = np.concatenate([self.scores, new], axis=1)
    keys = np.concatenate([self.keys, np.broadcast_to(row_keys, new.shape)], axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
    self.scores = np.take_along_axis(scores, best, axis=1)
    self.keys = np.take_along_axis(keys, best, axis=1)

  def best(self, column: int = 0) -> list[tuple[float, object]]:
    """[(score, key)] of one column, best first."""
    return [(float(s), k) for s, k in zip(self.scores[column], self.keys[column])]
