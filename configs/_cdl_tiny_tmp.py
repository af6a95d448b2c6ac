from configs import recommendation
from sempre_jax import cdl

def get_config(variant="cdl"):
  config = recommendation.get_config()
  config.data.embedded.update(num_users=40, num_topics=8, posts_per_user=30, feature_dim=32,
                              signal=1.0, image_size=32, actions_per_user=20)
  config.data.interactions.update(images_only=True, semantic_clusters=16, validation=0.0)
  config.model = cdl.default_model_config()
  config.model.update(name="cdl", image_input="pixels", embed_dim=32, image_width=1/16,
                      user_hidden=(64,))
  config.model.loss.variant = variant
  config.batch_size = 64
  config.num_epochs = 3
  config.eval.update(every_steps=0, max_candidates=100)
  return config
