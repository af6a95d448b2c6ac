"""DU2MCE sized for the MediaEval 2016 tweets on a 2-core CPU (smaller text filters
and batch, 10 epochs).

  python launch/prepare_data.py --posts=../shared/data/mediaeval2016/posts.jsonl \\
      --out=runs/tweets_data --held_out_authors=any --seed=3 --split_by=size \\
      --validation_fraction=0.15 --test_fraction=0.15 \\
      --image_encoder=efficientnet_lite0 --image_size=32
  python launch/train.py --config=configs/du2mce_tweets.py \\
      --config.data.dir=runs/tweets_data
  python launch/train.py --config=configs/du2mce_tweets.py:pixels \\
      --config.data.dir=runs/tweets_data

Variants: "features" (default; the paper's frozen ImageNet features, here
efficientnet_lite0's, from prepare's --image_encoder) and "pixels" (a small
CNN trained from scratch on the 32 x 32 images, not in the paper). The
measurements behind these values, over prepare seeds 3, 4 and 5:
docs/real_data.md (benchmarks/real_data.py).
"""

from configs import du2mce

VARIANTS = {
    "features": {"model.image_input": "features"},
    "pixels": {"model.image_input": "pixels"},
}


def get_config(variant: str = "features"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown tweets variant {variant!r}; one of {sorted(VARIANTS)}")
  config = du2mce.get_config()
  config.model.embed_dim = 1024      # the paper's D
  config.model.text_filters = (128, 128, 128)
  config.batch_size = 200
  config.num_epochs = 10
  config.lr_decay_epochs = 7
  config.learning_rate = 1e-3
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  for name in ("val", "test"):
    config.evals[name].batch_size = 500
  config.update_from_flattened_dict(VARIANTS[variant])
  return config
