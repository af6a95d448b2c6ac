"""What does a model train and get evaluated on, read from a prepared dataset?

A prepared dataset (input_pipeline: shards, metadata.json, vocab, users, maybe
graph.npz with actions and follows) serves two kinds of models (their DATA):
  posts     batches of posts from the train shards (input_pipeline/loader.py);
            one example = one post.
  triplets  batches of (user, acted post, negative post) triplets from the
            actions (input_pipeline/interactions.py): each user's actions are
            split into train/validation/test, negatives drawn by the paper's
            rule, users optionally described by bags of semantic clusters.
            One example = one triplet.
`Data` reads what the kind needs once per run and hands it to the trainer and
the evaluators.

A posts batch travels to the devices as the records' rows (loader.py); its
`Feed` completes it inside the step: the rows unpacked, and the frozen image
inputs gathered by image id from their table, placed on the mesh once
(mesh.put_table: replicated up to config.data.replicated_table_mib, 2 GiB by
default, e.g. 262k images of 2048-d features; above, split by rows over the
devices, gathered with a reduce-scatter). Triplet batches carry their posts.
"""

import dataclasses
import functools
import os
from collections.abc import Mapping

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from input_pipeline import interactions, loader, records
from sempre_jax import mesh as mesh_lib
from sempre_jax.models import encoders

CLUSTERS_FILE = "semantic_clusters.npy"
UNITS = {"posts": "posts", "triplets": "triplets"}
REPLICATED_TABLE_MIB = 2048


@dataclasses.dataclass(frozen=True)
class Feed:
  """A posts batch's completion on the devices: `tables` (on the mesh, laid
  out by `specs`) are passed to the step, which runs `inputs` per device."""
  tables: dict
  specs: dict

  def inputs(self, batch: Mapping, tables: Mapping) -> dict:
    """{"posts": rows [b, ROW_INTS]}, this device's table parts -> the model's batch."""
    return loader.model_inputs(batch["posts"], {
        key: functools.partial(mesh_lib.take_rows, table, spec=self.specs[key])
        for key, table in tables.items()})


class Data:
  """A prepared dataset as a model of kind `kind` ("posts" or "triplets") sees it."""

  def __init__(self, config: ml_collections.ConfigDict, kind: str, data_dir: str,
               metadata: Mapping, workdir: str):
    self.config, self.kind, self.data_dir, self.metadata = config, kind, data_dir, metadata
    self.workdir = workdir
    self.unit = UNITS[kind]
    self.image_key = encoders.image_key(config.model.image_input)

  @property
  def sizes(self) -> dict[str, int]:
    """What a model is sized by: num_users, vocab_size, feature_dim, num_clusters."""
    ic = self.config.data.get("interactions") or {}
    return {"num_users": self.metadata["num_users"], "vocab_size": self.metadata["vocab_size"],
            "feature_dim": self.metadata.get("feature_dim", 0),
            "num_clusters": ic.get("semantic_clusters", 0) if self.kind == "triplets" else 0}

  @property
  def num_train(self) -> int:
    """Training examples of one epoch: posts, or training actions."""
    if self.kind == "posts":
      return self.metadata["splits"]["train"]["num_posts"]
    return len(self.action_splits["train"])

  def train_dataset(self, batch_size: int, process_index: int,
                    process_count: int) -> grain.IterDataset:
    """This process's part of each global batch of `batch_size * process_count`
    examples, endless; its iterators have get_state()/set_state() for exact resume."""
    seed = self.config.seed
    if self.kind == "posts":
      return loader.train_dataset(
          self.data_dir, self.metadata, batch_size=batch_size, seed=seed,
          process_index=process_index, process_count=process_count,
          streams=self.config.data.get("streams", 0))
    ic = self.config.data.interactions
    negatives = interactions.Negatives(self.interactions, self.action_splits["train"],
                                       ic.negatives, ic.window_minutes, ic.images_only)
    return _Triplets(lambda: interactions.TripletIterator(
        self.interactions, self.action_splits["train"], negatives,
        batch_size=batch_size * process_count, image_key=self.image_key, seed=seed,
        bags=self.bags,
        clusters=self.clusters if self.config.model.get("semantic_triplets") else None,
        process_index=process_index, process_count=process_count))

  @functools.cached_property
  def tables(self) -> dict[str, np.ndarray]:
    """{image key: its table [num_images, ...]} (memory-mapped) of a posts model."""
    if self.kind != "posts":
      return {}
    return {self.image_key: records.read_table(self.data_dir, self.metadata, self.image_key)}

  def feed(self, mesh: Mesh) -> Feed | None:
    """The tables placed on `mesh` for the train step (None: batches are complete)."""
    if self.kind != "posts":
      return None
    limit = self.config.data.get("replicated_table_mib", REPLICATED_TABLE_MIB) << 20
    placed = {k: mesh_lib.put_table(mesh, t, limit) for k, t in self.tables.items()}
    return Feed({k: a for k, (a, _) in placed.items()}, {k: s for k, (_, s) in placed.items()})

  def host_inputs(self, batch: Mapping) -> dict:
    """A train batch as the model sees it, completed on the host (what the
    Feed does on the devices)."""
    if self.kind != "posts":
      return dict(batch)
    return loader.model_inputs(batch["posts"], loader.host_gather(self.tables))

  # ------------------------------------------------------------ triplets ---

  @functools.cached_property
  def interactions(self) -> interactions.Interactions:
    """The post table, follows and actions of the dataset."""
    return interactions.load(self.data_dir, self.metadata, self.image_key)

  @functools.cached_property
  def action_splits(self) -> dict[str, np.ndarray]:
    """{split: indices into interactions.actions}, per user (config.data.interactions)."""
    ic = self.config.data.interactions
    return interactions.split_actions(self.interactions, ic.test, ic.validation,
                                      ic.images_only, ic.order_by, self.config.seed)

  @functools.cached_property
  def clusters(self) -> np.ndarray | None:
    """[N] semantic cluster of each post (-1: no text), computed once per
    workdir by process 0; None without config.data.interactions.semantic_clusters."""
    k = self.config.data.interactions.semantic_clusters
    if not k:
      return None
    path = os.path.join(self.workdir, CLUSTERS_FILE)
    if not os.path.exists(path) and jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      np.save(path, interactions.semantic_clusters(
          self.interactions, self.metadata["vocab_size"], k, seed=self.config.seed))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("semantic clusters")
    return np.load(path)

  @functools.cached_property
  def bags(self) -> np.ndarray | None:
    """[U, K] each user's bag of the clusters of their own posts, or None."""
    if self.clusters is None:
      return None
    return interactions.user_bags(self.interactions, self.clusters,
                                  self.config.data.interactions.semantic_clusters)


class _Triplets(grain.IterDataset):
  """The triplet iterator as a grain dataset (so that it composes with grain's
  transformations and prefetch)."""

  def __init__(self, make_iterator):
    super().__init__()
    self._make_iterator = make_iterator

  def __iter__(self) -> interactions.TripletIterator:
    return self._make_iterator()
