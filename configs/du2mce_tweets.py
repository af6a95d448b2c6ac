"""DU2MCE sized for the MediaEval 2016 tweets on a 2-core CPU (pixels, smaller towers).

  python launch/prepare_data.py --posts=../shared/data/mediaeval2016/posts.jsonl \\
      --out=runs/tweets_data --held_out_authors=any --seed=3 --image_size=32
  python launch/train.py --config=configs/du2mce_tweets.py \\
      --config.data.dir=runs/tweets_data
"""

from configs import du2mce


def get_config():
  config = du2mce.get_config()
  config.model.image_input = "pixels"
  config.model.embed_dim = 256
  config.model.text_filters = (128, 128, 128)
  config.batch_size = 200
  config.num_epochs = 6
  config.lr_decay_epochs = 4
  config.learning_rate = 1e-3
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  for name in ("val", "test"):
    config.evals[name].batch_size = 500
  return config
