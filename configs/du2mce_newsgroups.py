"""DU2MCE sized for the 20 Newsgroups posts on a 2-core CPU (text only).

  python launch/prepare_data.py --posts=../shared/data/newsgroups20/posts.jsonl \\
      --out=runs/newsgroups_data --text_fields=subject,text --interest_field=group
  python launch/train.py --config=configs/du2mce_newsgroups.py \\
      --config.data.dir=runs/newsgroups_data --workdir=runs/newsgroups
  python launch/interests.py --workdir=runs/newsgroups

No images: image_input stays "features" with feature_dim 0 (an empty image
tower, no pixel CNN), and all the loss weight is on the text-user term.
Word and user tables start from the data's 300-d Word2Vec.
"""

from configs import du2mce


def get_config():
  config = du2mce.get_config()
  config.loss.l1 = 1.0
  config.loss.l2 = 0.0
  config.model.embed_dim = 256
  config.model.text_filters = (128, 128, 128)
  config.batch_size = 200
  config.num_epochs = 20
  config.learning_rate = 1e-3
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.eval.batch_size = 500
  config.eval.every_steps = 240
  return config
