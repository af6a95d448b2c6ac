"""The sharded train step against one device, training stages, guards on a
workdir's config and data, and the main job end to end."""

import hashlib
import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce
from input_pipeline import records
from sempre_jax import checkpoints, mesh as mesh_lib, train
from sempre_jax.experiment import Experiment
from sempre_jax.models import du2mce as du2mce_model
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.batch_size=64", "--config.num_epochs=8",
        "--config.data.embedded.num_users=40", "--config.data.embedded.num_topics=8",
        "--config.data.embedded.posts_per_user=30", "--config.data.embedded.feature_dim=32",
        "--config.data.embedded.signal=1.0",
        "--config.model.embed_dim=32", "--config.model.word_dim=16",
        "--config.model.user_dim=16", "--config.model.text_filters=(16, 16, 16)",
        "--config.learning_rate=0.003", "--config.log_every_steps=5",
        "--config.checkpoint_every_steps=10", "--config.evals.val.batch_size=128",
        "--config.evals.test.batch_size=128", "--config.evals.val.every_steps=20"]


def _small_config():
  """A 12-user embedded corpus and 8-d towers: a few seconds per run."""
  config = du2mce.get_config()
  config.data.embedded.update(num_users=12, num_topics=3, posts_per_user=10, feature_dim=8)
  config.model.update(embed_dim=16, word_dim=8, user_dim=8, text_filters=(8, 8, 8))
  config.update(batch_size=16, checkpoint_every_steps=1000, log_every_steps=1000)
  for block in config.evals.values():
    block.batch_size = 64
  return config


def _one_step(module, config, mesh):
  """(step, zero_sums) of DU2MCE's loss with the config's loss settings."""
  return train.make_train_step(du2mce_model.loss_fn(module, config, config.loss), mesh)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """A small prepared embedded corpus, its Experiment and a training batch."""
  config = _small_config()
  workdir = tmp_path_factory.mktemp("small")
  exp = Experiment(config, *conftest.prepared(config, workdir), str(workdir))
  batch = exp.data.host_inputs(next(iter(exp.data.train_dataset(16, 0, 1))))
  assert batch["image_mask"].any() and not batch["image_mask"].all()
  return exp, batch


@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_four_devices_match_one_device(experiment, mining):
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  exp, batch = experiment
  config = _small_config()
  config.loss.mining = mining
  tx = train.make_optimizer(config, steps_per_epoch=10)
  init = train.create_train_state(exp.init_variables(jax.random.key(0), batch), tx)
  out = {}
  for n in (1, 4):
    mesh = mesh_lib.make_mesh(n)
    state = jax.device_put(jax.tree.map(np.array, init), NamedSharding(mesh, P()))
    step, zero_sums = _one_step(exp.module, config, mesh)
    sums = zero_sums(state, mesh_lib.shard_batch(mesh, batch))
    for _ in range(2):
      state, sums = step(state, sums, mesh_lib.shard_batch(mesh, batch))
    out[n] = (float(sums["loss"]), jax.tree.map(np.asarray, state.params))
  assert out[1][0] > 0
  np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-5)
  chex.assert_trees_all_close(out[4][1], out[1][1], atol=1e-5)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), out[1][1], init.params)
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("replicated_mib", [2048, 0])     # replicated; split over devices
def test_the_fed_step_gathers_image_inputs_like_the_host(experiment, replicated_mib):
  """Rows + the feature table placed on 4 devices (replicated, or split by rows)
  train exactly like the batch completed on the host, on 1 device."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  exp, _ = experiment
  rows = next(iter(exp.data.train_dataset(16, 0, 1)))
  batch = exp.data.host_inputs(rows)
  config = _small_config()
  init = train.create_train_state(exp.init_variables(jax.random.key(0), batch),
                                  train.make_optimizer(config, steps_per_epoch=10))
  out = {}
  for n, fed in ((1, False), (4, True)):
    mesh = mesh_lib.make_mesh(n)
    exp.config.data.replicated_table_mib = replicated_mib
    feed = exp.data.feed(mesh) if fed else None
    del exp.config.data["replicated_table_mib"]
    loss = du2mce_model.loss_fn(exp.module, config, config.loss)
    step, zero_sums = train.make_train_step(loss, mesh, feed=feed)
    given = mesh_lib.shard_batch(mesh, rows if fed else batch)
    state = jax.device_put(jax.tree.map(np.array, init), NamedSharding(mesh, P()))
    state, sums = step(state, zero_sums(state, given), given)
    out[n] = (float(sums["loss"]), jax.tree.map(np.asarray, state.params))
  assert feed.specs == {"image_features": P() if replicated_mib else P(mesh_lib.AXIS)}
  np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-5)
  chex.assert_trees_all_close(out[4][1], out[1][1], atol=1e-5)


def test_take_rows_from_a_table_split_over_the_devices():
  """Pixel-like uint8 rows, 10 rows over 4 devices (padded), ids -1 -> zeros."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  mesh = mesh_lib.make_mesh(4)
  table = np.random.default_rng(0).integers(1, 255, [10, 2, 2, 3], dtype=np.uint8)
  ids = np.array([9, -1, 0, 3, 3, 7, -1, 8], np.int32)
  placed, spec = mesh_lib.put_table(mesh, table, max_replicated_bytes=0)
  assert spec == P(mesh_lib.AXIS) and placed.shape == (12, 2, 2, 3)
  take = jax.jit(jax.shard_map(lambda t, i: mesh_lib.take_rows(t, i, spec), mesh=mesh,
                               in_specs=(spec, P(mesh_lib.AXIS)), out_specs=P(mesh_lib.AXIS)))
  got = np.asarray(take(placed, mesh_lib.put_global(mesh, ids, P(mesh_lib.AXIS))))
  np.testing.assert_array_equal(got[ids >= 0], table[ids[ids >= 0]])
  assert not got[ids < 0].any()


def _run_main(workdir, *extra):
  return subprocess.run(
      [sys.executable, "launch/train.py", "--config=configs/du2mce.py",
       f"--workdir={workdir}", *TINY, *extra], cwd=ROOT, capture_output=True, text=True,
      timeout=300)


def _tree_digest(path) -> dict:
  """{relative path: sha256} of every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
  return out


def _tensorboard_scalars(workdir) -> dict:
  """{tag: {step: value}} of every TensorBoard event file in `workdir` (TFRecord
  frames, read and CRC-checked by records.read_framed)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    path = os.path.join(workdir, name)
    fd, offset, index = os.open(path, os.O_RDONLY), 0, 0
    try:
      while offset < os.path.getsize(path):
        payload = records.read_framed(fd, offset, path, index)
        offset, index = offset + 16 + len(payload), index + 1
        event = event_pb2.Event.FromString(payload)
        for value in event.summary.value:
          out.setdefault(value.tag, {})[event.step] = value.simple_value
    finally:
      os.close(fd)
  return out


def test_main_job_trains_evaluates_and_resumes(tmp_path):
  first = _run_main(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "launch/prepare_data.py" in first.stdout      # the command it ran, printed
  assert "posts/s" in first.stdout and "ETA" in first.stdout
  assert "oracle med" in first.stdout
  results = json.load(open(tmp_path / "eval_test.json"))
  for task in ("text->user", "image->text", "image->user"):
    model, oracle = results[task], results["oracle"][task]
    assert oracle["median_rank"] <= model["median_rank"] or model["median_rank"] <= 2
    # Even a tiny run learns the planted structure: far better than chance.
    assert model["median_rank"] < 0.5 * model["random_median_rank"], (task, model)
  # Validation every 20 steps; the best score's state is kept and tested.
  log = [json.loads(line) for line in open(tmp_path / train.VALIDATION_LOG)]
  assert [v["step"] for v in log] == [20, 40, 60, 80, 100, 112]
  # TensorBoard holds what the console and the validation log say.
  scalars = _tensorboard_scalars(tmp_path)
  printed = {int(m[1]): float(m[2]) for m in
             re.finditer(r"step +(\d+)/112 \| loss ([\d.]+)", first.stdout)}
  assert sorted(printed) == [*range(5, 112, 5), 112]
  assert scalars["train/loss"].keys() == printed.keys()
  for step, loss in printed.items():
    assert abs(scalars["train/loss"][step] - loss) <= 5e-5, step
  assert scalars["val/selection_score"] == pytest.approx({v["step"]: v["score"] for v in log})
  best = min(log, key=lambda v: (v["score"], -v["step"]))     # ties: the later step
  assert checkpoints.find_step(str(tmp_path), "best") == best["step"]
  again = subprocess.run([sys.executable, "launch/evaluate.py", f"--workdir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  step = again.stdout.split("checkpoint at step ")[1].split()[0]
  assert int(step) == best["step"]
  assert json.load(open(tmp_path / f"eval_test_step{step}.json")) == results

  _check_export(tmp_path)

  # Another data dir, or another loss, on this workdir: refused, nothing changed.
  before = _tree_digest(tmp_path)
  for extra, key in ((f"--config.data.dir={tmp_path / 'data'}", "data.dir"),
                     ("--config.loss.l1=0.3", "loss.l1")):
    refused = _run_main(tmp_path, extra)
    assert refused.returncode == 1 and key in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert _tree_digest(tmp_path) == before

  second = _run_main(tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in second.stdout
  assert "launch/prepare_data.py" not in second.stdout       # the data is reused
  assert "posts/s" not in second.stdout        # nothing left to train
  assert json.load(open(tmp_path / "eval_test.json")) == results


def test_pixel_encoder_trains_on_encoded_images(tmp_path):
  config = _small_config()
  config.data.embedded.update(image_size=16, image_fraction=0.8)
  config.model.image_input = "pixels"
  exp = Experiment(config, *conftest.prepared(config, tmp_path), str(tmp_path))
  batch = exp.data.host_inputs(next(iter(exp.data.train_dataset(8, 0, 1))))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["image"][batch["image_mask"]].std() > 10        # real pictures
  assert not batch["image"][~batch["image_mask"]].any()        # missing -> zeros
  mesh = mesh_lib.make_mesh(1)
  state = train.create_train_state(exp.init_variables(jax.random.key(0), batch),
                                   train.make_optimizer(config, 10))
  step, zero_sums = _one_step(exp.module, config, mesh)
  before = np.asarray(state.params["image"]["convnet"]["conv0"]["kernel"])
  state = jax.device_put(state, NamedSharding(mesh, P()))
  state, sums = step(state, zero_sums(state, mesh_lib.shard_batch(mesh, batch)),
                     mesh_lib.shard_batch(mesh, batch))
  assert np.isfinite(float(sums["loss"])) and sums["it_pairs"] > 0
  assert np.abs(np.asarray(state.params["image"]["convnet"]["conv0"]["kernel"]) - before).max() > 0


def test_interrupted_run_resumes_exactly(tmp_path):
  """Training 2 epochs, then resuming to 4, equals 4 epochs in one go (bitwise)."""
  config = _small_config()

  def run(workdir, epochs):
    config.num_epochs = epochs
    return conftest.run(config, workdir)[0]

  whole = run(tmp_path / "whole", 4)
  run(tmp_path / "split", 2)
  resumed = run(tmp_path / "split", 4)
  assert int(resumed.step) == int(whole.step) > 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.params),
               jax.tree.map(np.asarray, whole.params))


def test_a_new_stage_starts_a_fresh_optimizer(tmp_path):
  """Bridging: text-user, then image-text with the text and user towers frozen.
  The image tower's first update of stage 2 is at most the learning rate per
  parameter (Adam's first step, |m/sqrt(v)| = 1), not several times it as with
  moments carried over; the frozen towers do not move."""
  config = _small_config()
  config.update_from_flattened_dict(du2mce.VARIANTS["bridging"])
  config.update(num_epochs=4, checkpoint_every_steps=1, keep_checkpoints=1000,
                learning_rate=1e-3)
  config.model.init_from_word2vec = False
  del config.evals["val"]
  config.best = ""
  conftest.run(config, tmp_path)
  exp = Experiment(config, *conftest.prepared(config, tmp_path), str(tmp_path))
  boundary = exp.stages(exp.data.num_train // config.batch_size)[0].end_step
  at, after = (checkpoints.restore_variables(str(tmp_path), s)["params"]
               for s in (boundary, boundary + 1))
  delta = jax.tree.map(lambda a, b: np.abs(b - a).max(), at, after)
  assert 0 < max(jax.tree.leaves(delta["image"])) <= 1.5 * config.learning_rate, delta["image"]
  assert max(jax.tree.leaves({k: delta[k] for k in ("text", "user")})) == 0


def test_a_missing_word2vec_init_or_validation_split_stops_before_training(tmp_path):
  config = _small_config()
  data_dir, metadata = conftest.prepared(config, tmp_path / "made")
  os.remove(os.path.join(data_dir, "word2vec_init.npz"))
  with pytest.raises(FileNotFoundError, match="init_from_word2vec"):
    train.train_and_evaluate(config, str(tmp_path / "a"), data_dir, metadata)
  assert not (tmp_path / "a").exists()
  config.model.init_from_word2vec = False
  config.evals.val.split = "nosuchsplit"
  with pytest.raises(ValueError, match="config.evals.val"):
    train.train_and_evaluate(config, str(tmp_path / "b"), data_dir, metadata)
  assert not (tmp_path / "b").exists()


def test_bfloat16_compute_keeps_float32_parameters_and_loss(experiment):
  exp, batch = experiment
  model32 = exp.module
  model16 = model32.clone(dtype=jnp.bfloat16)
  config = _small_config()
  state = train.create_train_state(model16.init(jax.random.key(0), batch),
                                   train.make_optimizer(config, 10))
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
          if hasattr(x, "dtype") and x.ndim} == {np.dtype(np.float32)}
  emb16 = model16.apply({"params": state.params}, batch)
  emb32 = model32.apply({"params": state.params}, batch)
  for k in emb32:
    assert emb16[k].dtype == jnp.float32
    np.testing.assert_allclose(emb16[k], emb32[k], atol=2e-2)
  mesh = mesh_lib.make_mesh(1)
  step, zero_sums = _one_step(model16, config, mesh)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  state, sums = step(state, zero_sums(state, mesh_lib.shard_batch(mesh, batch)),
                     mesh_lib.shard_batch(mesh, batch))
  assert np.isfinite(float(sums["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def _check_export(workdir):
  """launch/export.py: parts in shards of at most --shard_rows rows with ids, FAISS
  top-1 over the shards = brute force, projector files."""
  out, shard_rows = workdir / "export", 200
  run = subprocess.run([sys.executable, "launch/export.py", f"--workdir={workdir}",
                        f"--out={out}", f"--shard_rows={shard_rows}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "posts/s" in run.stderr and "ETA" in run.stderr
  meta = json.load(open(workdir / "data" / "metadata.json"))
  shards, vectors, rows = {}, {}, {}
  for n in ("users", "texts", "images"):
    shards[n] = sorted(p.name[:-len(".npy")] for p in out.glob(f"{n}-*.npy"))
    assert shards[n] == [f"{n}-00000-of-00001-shard-{s:05d}-of-{len(shards[n]):05d}"
                         for s in range(len(shards[n]))]
    parts = [np.load(out / f"{s}.npy") for s in shards[n]]
    assert all(len(p) == shard_rows for p in parts[:-1]) and 0 < len(parts[-1]) <= shard_rows
    vectors[n] = np.concatenate(parts)
    rows[n] = [r for s in shards[n] for r in (out / f"{s}.tsv").read_text().splitlines()[1:]]
  assert len(vectors["users"]) == meta["num_users"]
  assert len(vectors["texts"]) == sum(m["num_posts"] for m in meta["splits"].values())
  assert len(vectors["images"]) == meta["num_images"]
  assert len(shards["texts"]) > 1 and len(shards["images"]) > 1
  for n in vectors:
    assert len(rows[n]) == len(vectors[n])
    np.testing.assert_allclose(np.linalg.norm(vectors[n], axis=1), 1, atol=1e-4)
  assert len({r.split("\t")[0] for r in rows["images"]}) == meta["num_images"]
  import faiss
  index = faiss.read_index(str(out / f"{shards['users'][0]}.faiss"))
  _, top1 = index.search(vectors["texts"], 1)
  np.testing.assert_array_equal(top1[:, 0], np.argmax(vectors["texts"] @ vectors["users"].T, 1))
  best, start = np.full([len(vectors["images"])], -np.inf), 0   # top-1 text over the shards
  arg = np.zeros([len(vectors["images"])], np.int64)
  for s in shards["texts"]:
    index = faiss.read_index(str(out / f"{s}.faiss"))
    score, i = index.search(vectors["images"], 1)
    arg = np.where(score[:, 0] > best, start + i[:, 0], arg)
    best, start = np.maximum(best, score[:, 0]), start + index.ntotal
  np.testing.assert_array_equal(arg, np.argmax(vectors["images"] @ vectors["texts"].T, 1))
  config = (out / "projector" / "projector_config.pbtxt").read_text()
  for path in re.findall(r'_path: "([^"]+)"', config):
    assert (out / "projector" / path).exists()
