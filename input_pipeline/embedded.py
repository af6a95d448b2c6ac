"""How does the main job get data when none is given?

It makes the embedded corpus and takes the road a user's crawl takes:
`synthetic.write_crawl` writes the raw crawl to `root/crawl`, then the same
prepare code `launch/prepare_data.py` runs, with the options of the command
line it prints, prepares it into `root/data`:

  python launch/prepare_data.py --posts=ROOT/crawl/posts.jsonl --out=ROOT/data \
      --actions=ROOT/crawl/actions.jsonl --follows=ROOT/crawl/follows.jsonl \
      --image_features=ROOT/crawl/image_features.npz --oracle=ROOT/crawl/oracle.npz \
      --interest_field=topic --test_fraction=F --validation_fraction=F \
      --num_shards=N --word2vec_dim=D --seed=S [--image_size=S] [--block_posts=B]

Each step is skipped when its output is complete (a crawl is written to a
temporary folder, then renamed; a dataset is complete when it has its
report). `root/embedded.json` records the settings: a root made with other
settings, or holding a crawl or data that this module did not write, is
refused. No JAX here: the caller syncs processes.
"""

import dataclasses
import json
import os
import shlex
import shutil
import time
from collections.abc import Mapping

from input_pipeline import oracle, prepare, records, synthetic

CRAWL_DIR = "crawl"
DATA_DIR = "data"
SETTINGS_FILE = "embedded.json"


def prepare_flags(root: str, spec: synthetic.CorpusSpec, split_fractions: Mapping[str, float],
                  num_shards: int, word2vec_dim: int, seed: int,
                  block_posts: int = records.BLOCK_POSTS) -> dict:
  """The flags of launch/prepare_data.py that prepare root/crawl into root/data."""
  unknown = set(split_fractions) - {"test", "validation"}
  if unknown:
    raise ValueError(f"split_fractions has {sorted(unknown)}: only test and validation "
                     "are held out (the rest trains)")
  crawl = os.path.join(root, CRAWL_DIR)
  flags = dict(
      posts=os.path.join(crawl, synthetic.POSTS_FILE), out=os.path.join(root, DATA_DIR),
      actions=os.path.join(crawl, synthetic.ACTIONS_FILE),
      follows=os.path.join(crawl, synthetic.FOLLOWS_FILE),
      image_features=os.path.join(crawl, synthetic.FEATURES_FILE),
      oracle=os.path.join(crawl, oracle.ORACLE_FILE), interest_field="topic",
      test_fraction=float(split_fractions.get("test", 0.0)),
      validation_fraction=float(split_fractions.get("validation", 0.0)),
      num_shards=int(num_shards), word2vec_dim=int(word2vec_dim), seed=int(seed))
  if spec.image_size:
    flags["image_size"] = spec.image_size
  if block_posts != records.BLOCK_POSTS:
    flags["block_posts"] = int(block_posts)
  return flags


def command_line(flags: Mapping) -> str:
  """The prepare_data command line of `flags`."""
  return " ".join(["python launch/prepare_data.py"]
                  + [f"--{k}={shlex.quote(str(v))}" for k, v in flags.items()])


def ensure(spec: Mapping, split_fractions: Mapping[str, float], num_shards: int,
           word2vec_dim: int, seed: int, root: str, log=print,
           block_posts: int = records.BLOCK_POSTS) -> str:
  """The embedded corpus of `spec` (synthetic.CorpusSpec fields) prepared in
  root/data, written (crawl, then data) unless already there; returns root/data.

  ValueError (one line) for unknown spec fields or split names, and for a root
  that holds a corpus made with other settings.
  """
  fields = {f.name for f in dataclasses.fields(synthetic.CorpusSpec)}
  if set(spec) - fields:
    raise ValueError(f"the embedded corpus has no setting {sorted(set(spec) - fields)}; "
                     f"it has {sorted(fields)}")
  spec = synthetic.CorpusSpec(**spec)
  flags = prepare_flags(root, spec, split_fractions, num_shards, word2vec_dim, seed,
                        block_posts)
  _claim(root, {"spec": dataclasses.asdict(spec),
                "prepare": {k: v for k, v in flags.items() if k not in ("posts", "out")}})
  crawl, data = os.path.dirname(flags["posts"]), flags["out"]
  if not os.path.isdir(crawl):
    t0 = time.time()
    partial = crawl + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    counts = synthetic.write_crawl(spec, partial)
    os.replace(partial, crawl)
    log(f"Wrote the embedded corpus as a crawl to {crawl} in {time.time() - t0:.1f}s: "
        + ", ".join(f"{v} {k}" for k, v in counts.items()))
  if not os.path.exists(os.path.join(data, prepare.REPORT_FILE)):
    shutil.rmtree(data, ignore_errors=True)     # an interrupted prepare
    log(f"Preparing it as a user's crawl would be:\n  {command_line(flags)}")
    options = prepare.Options(**{k: v for k, v in flags.items() if k not in ("posts", "out")})
    log(prepare.summary(prepare.prepare(flags["posts"], data, options, log=log)))
  return data


def arguments(config: Mapping) -> dict:
  """The arguments of `ensure` a training config asks for: config.data.embedded,
  split_fractions, num_shards, seed, and Word2Vec of model.word_dim when the
  model starts from it (DU2MCE, word_dim = user_dim), else none."""
  model, data = config["model"], config["data"]
  init = model.get("init_from_word2vec") and model.get("word_dim") == model.get("user_dim")
  return dict(spec=dict(data["embedded"]), split_fractions=dict(data["split_fractions"]),
              num_shards=data["num_shards"], word2vec_dim=model["word_dim"] if init else 0,
              seed=config["seed"])


def for_config(config: Mapping, root: str, log=print) -> str:
  """`ensure` with a training config's arguments: root/data."""
  return ensure(**arguments(config), root=root, log=log)


def data_dir(root: str) -> str:
  """Where `ensure` prepares the embedded corpus under `root`."""
  return os.path.join(root, DATA_DIR)


def _claim(root: str, settings: dict) -> None:
  """Records `settings` in root/SETTINGS_FILE, or refuses a root made otherwise."""
  path = os.path.join(root, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      made = json.load(f)
    if made != settings:
      diff = {k: (made.get(part, {}).get(k), v) for part in settings
              for k, v in settings[part].items() if made.get(part, {}).get(k) != v}
      raise ValueError(f"{root} holds an embedded corpus made with other settings "
                       f"{diff or made} (made, wanted): use a fresh directory (a new "
                       "--workdir) for these")
    return
  for name in (CRAWL_DIR, DATA_DIR):
    if os.path.exists(os.path.join(root, name)):
      raise ValueError(f"{os.path.join(root, name)} exists but is not an embedded corpus "
                       f"of input_pipeline.embedded: use a fresh directory (a new --workdir)")
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    json.dump(settings, f, indent=1)
