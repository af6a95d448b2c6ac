"""DU2MCE with the paper's defaults, on the embedded corpus unless data.dir is set.

  python launch/train.py --config=configs/du2mce.py --workdir=runs/du2mce
  python launch/train.py --config=configs/du2mce.py --config.data.dir=DATA
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_devices = 0            # 0: every device of the job

  config.data = ml_collections.ConfigDict()
  config.data.dir = ml_collections.config_dict.placeholder(str)  # None: embedded corpus
  config.data.num_shards = 4
  config.data.split_fractions = {"test": 0.2, "validation": 0.02}
  config.data.embedded = {           # input_pipeline.synthetic.CorpusSpec
      "num_users": 500, "num_topics": 64, "posts_per_user": 40.0,
      "image_fraction": 0.5, "reshare_prob": 0.1, "feature_dim": 2048,
      "signal": 0.3, "image_size": 0, "seed": 0}

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 1024
  config.model.word_dim = 300
  config.model.user_dim = 300
  config.model.text_widths = (2, 3, 4)
  config.model.text_filters = (512, 256, 256)
  config.model.image_input = "features"   # or "pixels" (needs data with image_size > 0)
  config.model.dtype = "float32"          # compute dtype: "bfloat16" for mixed precision
  config.model.init_from_word2vec = True  # word/user tables from the data's word2vec_init.npz

  config.loss = ml_collections.ConfigDict()
  config.loss.l1 = 0.1     # text-user
  config.loss.l2 = 0.45    # image-text; image-user gets 1 - l1 - l2
  config.loss.margin = 0.2
  config.loss.mining = "all"   # or "hardest"
  config.loss.candidate_chunk = 0   # > 0: scan candidates in chunks (huge global batches)

  config.batch_size = 1000
  config.num_epochs = 20
  config.learning_rate = 5e-4
  config.lr_decay = 10.0
  config.lr_decay_epochs = 10

  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3

  config.eval = ml_collections.ConfigDict()
  config.eval.split = "test"
  config.eval.batch_size = 1000
  config.eval.max_image_text_pairs = 5000
  config.eval.every_steps = 100        # validation (best checkpoint); 0: never
  config.eval.query_chunk = 1024       # queries ranked per call
  config.eval.candidate_chunk = 4096   # candidates scored per scan step and device
  config.eval.tie_tolerance = 1e-5     # scores this close to the ground truth's tie
  return config
