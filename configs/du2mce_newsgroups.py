"""DU2MCE sized for the 20 Newsgroups posts on a 2-core CPU (text only).

  python launch/prepare_data.py --posts=../shared/data/newsgroups20/posts.jsonl \\
      --out=runs/newsgroups_data --text_fields=subject,text --interest_field=group
  python launch/train.py --config=configs/du2mce_newsgroups.py \\
      --config.data.dir=runs/newsgroups_data --workdir=runs/newsgroups
  python launch/interests.py --workdir=runs/newsgroups

No images: the text-user pair only (the "tu" variant); image_input stays
"features" with feature_dim 0 (an image tower without parameters, no pixel
CNN). Word and user tables start from the data's 300-d Word2Vec; validation
every epoch keeps the best checkpoint.
"""

from configs import du2mce


def get_config():
  config = du2mce.get_config("tu")
  config.model.embed_dim = 256
  config.model.text_filters = (128, 128, 128)
  config.batch_size = 200
  config.num_epochs = 6
  config.learning_rate = 1e-3
  config.log_every_steps = 24
  config.checkpoint_every_steps = 500
  config.eval.batch_size = 500
  config.eval.every_steps = 48
  return config
