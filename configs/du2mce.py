"""DU2MCE with the paper's defaults, on the embedded corpus unless data.dir is set.

  python launch/train.py --config=configs/du2mce.py --workdir=runs/du2mce
  python launch/train.py --config=configs/du2mce.py --config.data.dir=DATA
  python launch/train.py --config=configs/du2mce.py:merged --workdir=runs/merged

A variant after the colon selects a row of the paper's Tables 2 and 4:
  all (default)           every pair: (l1, l2, l3) = (0.1, 0.45, 0.45)
  tu, it, iu              a single pair: text-user, image-text or image-user only
  tu+it, tu+iu, it+iu     two pairs, weighted equally
  merged                  Merged-Modality: image and text summed into one content
                          vector per post, one loss against users
  bridging                Bridging-Modality: text-user first, then image-text with
                          the text and user towers frozen (half the epochs each)
  avg_text, avg_image     users as the mean of their training posts' text (image)
                          embeddings, of a model trained on image-text only
  both                    every pair, each term's hinge in both directions (VSE++),
                          not the paper's one-directional Eq. 4 (docs/evaluation.md)
"""

import ml_collections

# The retrieval evaluator's settings (sempre_jax/evals/retrieval.py).
RETRIEVAL = {
    "type": "retrieval",
    "batch_size": 1000,             # posts embedded per call
    "max_image_text_pairs": 5000,   # image->text: the first images with a caption
    "query_chunk": 1024,            # queries ranked per call
    "candidate_chunk": 4096,        # candidates scored per scan step and device
    "tie_tolerance": 1e-5,          # scores this close to the ground truth's tie
    "user_vectors": "model",        # or "avg_text" / "avg_image" (Table 4 baselines)
}

VARIANTS = {
    "all": {},
    "tu": {"loss.l1": 1.0, "loss.l2": 0.0},
    "it": {"loss.l1": 0.0, "loss.l2": 1.0},
    "iu": {"loss.l1": 0.0, "loss.l2": 0.0},
    "tu+it": {"loss.l1": 0.5, "loss.l2": 0.5},
    "tu+iu": {"loss.l1": 0.5, "loss.l2": 0.0},
    "it+iu": {"loss.l1": 0.0, "loss.l2": 0.5},
    "merged": {"model.merge_content": True, "loss.l1": 1.0, "loss.l2": 0.0},
    "bridging": {"stages": (
        {"share": 0.5, "loss": {"l1": 1.0, "l2": 0.0}, "frozen": ()},
        {"share": 0.5, "loss": {"l1": 0.0, "l2": 1.0}, "frozen": ("text", "user")})},
    "avg_text": {"loss.l1": 0.0, "loss.l2": 1.0, "evals.val.user_vectors": "avg_text",
                 "evals.test.user_vectors": "avg_text"},
    "avg_image": {"loss.l1": 0.0, "loss.l2": 1.0, "evals.val.user_vectors": "avg_image",
                  "evals.test.user_vectors": "avg_image"},
    "both": {"loss.directions": "both"},
}


def get_config(variant: str = "all") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown DU2MCE variant {variant!r}; one of {sorted(VARIANTS)}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_devices = 0            # 0: every device of the job

  config.data = ml_collections.ConfigDict()
  config.data.dir = ml_collections.config_dict.placeholder(str)  # None: embedded corpus
  config.data.num_shards = 4        # embedded corpus: shards per split
  config.data.split_fractions = {"test": 0.2, "validation": 0.02}
  config.data.streams = 0           # shuffled streams of train blocks (0: one per process)
  config.data.replicated_table_mib = 2048   # larger image tables split over the devices
  config.data.embedded = {           # input_pipeline.synthetic.CorpusSpec
      "num_users": 500, "num_topics": 64, "posts_per_user": 40.0,
      "image_fraction": 0.5, "reshare_prob": 0.1, "feature_dim": 2048,
      "signal": 0.3, "image_size": 0, "seed": 0}

  config.model = ml_collections.ConfigDict()
  config.model.name = "du2mce"
  config.model.embed_dim = 1024
  config.model.word_dim = 300
  config.model.user_dim = 300
  config.model.text_widths = (2, 3, 4)
  config.model.text_filters = (512, 256, 256)
  config.model.image_input = "features"   # or "pixels" (needs data with image_size > 0)
  config.model.dtype = "float32"          # compute dtype: "bfloat16" for mixed precision
  config.model.init_from_word2vec = True  # word/user tables from the data's word2vec_init.npz
  config.model.merge_content = False      # Merged-Modality baseline

  config.loss = ml_collections.ConfigDict()
  config.loss.l1 = 0.1     # text-user
  config.loss.l2 = 0.45    # image-text; image-user gets 1 - l1 - l2
  config.loss.margin = 0.2
  config.loss.directions = "one"   # Eq. 4's anchors (text; image); "both": VSE++
  config.loss.mining = "all"   # or "hardest"
  config.loss.candidate_chunk = 0   # > 0: scan candidates in chunks (huge global batches)

  config.batch_size = 1000
  config.num_epochs = 20
  config.learning_rate = 5e-4
  config.lr_decay = 10.0
  config.lr_decay_epochs = 10
  config.optimizer = "adam"
  config.momentum = 0.0
  config.weight_decay = 0.0
  config.stages = ()   # or ({"share" of num_epochs, "loss": {...}, "frozen": towers}, ...)

  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3

  # Evaluators (sempre_jax/evals/): each runs every `every_steps` during
  # training (0: only once, after training, on the best checkpoint); `best`
  # names the one whose score selects the best checkpoint (paper, section 4.3).
  config.evals = ml_collections.ConfigDict()
  config.evals.val = {**RETRIEVAL, "split": "validation", "every_steps": 100}
  config.evals.test = {**RETRIEVAL, "split": "test", "every_steps": 0}
  config.best = "val"
  config.update_from_flattened_dict(VARIANTS[variant])
  return config
