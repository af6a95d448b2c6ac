"""Frozen-CNN feature extraction speed: images/s from files to pooled features.

  python benchmarks/image_features.py [--images=../shared/data/mediaeval2016]
      [--encoder=efficientnet_lite0] [--batch_size=64]

Times, on all local devices: loading the weights, the first call (jit
compilation included), then a second full pass over every image under
`--images` (decode + resize threads overlapping the batched forward pass),
and the two stages alone (decoding only; the forward pass on already-decoded
batches). Prints a table and a JSON line. Runs unchanged on CPU, GPU or TPU.
"""

import json
import os
import time
from concurrent import futures

import jax
import numpy as np
from absl import app, flags

from input_pipeline.cnn import features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("images", os.path.join(ROOT, "..", "shared", "data", "mediaeval2016"),
                    "Folder whose image files (recursively) are encoded.")
flags.DEFINE_string("encoder", "efficientnet_lite0", f"One of {features.ENCODERS[:2]}.")
flags.DEFINE_integer("batch_size", 64, "Images per forward pass (all devices together).")
FLAGS = flags.FLAGS


def main(_):
  files = features.image_files(FLAGS.images)
  print(f"{len(files)} images under {FLAGS.images}; devices: {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}; {os.cpu_count()} CPU cores", flush=True)
  t = time.perf_counter()
  encoder = features.load_encoder(FLAGS.encoder)
  load_s = time.perf_counter() - t

  def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t

  first = dict(list(files.items())[:FLAGS.batch_size])
  _, first_s = timed(lambda: features.extract_features(first, encoder, batch_size=FLAGS.batch_size,
                                                       progress=False))
  got, total_s = timed(lambda: features.extract_features(files, encoder,
                                                         batch_size=FLAGS.batch_size))
  with futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    pixels, decode_s = timed(lambda: list(pool.map(
        lambda p: features.load_pixels(p, encoder.resample), files.values())))
  batch_size, forward = features.sharded_forward(encoder, FLAGS.batch_size)
  batch = np.stack((pixels * batch_size)[:batch_size])
  forward(batch).block_until_ready()
  reps = -(-len(files) // batch_size)
  _, model_s = timed(lambda: [forward(batch).block_until_ready() for _ in range(reps)])
  r = dict(encoder=encoder.name, images=len(files), feature_dim=encoder.dim,
           batch_size=FLAGS.batch_size, load_s=round(load_s, 2),
           first_call_s=round(first_s, 2), images_per_s=round(len(got) / total_s, 1),
           decode_images_per_s=round(len(pixels) / decode_s, 1),
           model_images_per_s=round(reps * batch_size / model_s, 1))
  print(f"weights loaded in {r['load_s']} s; first call (compilation) {r['first_call_s']} s")
  print(f"{'stage':<22} {'images/s':>9}")
  for name, key in (("files -> features", "images_per_s"), ("decode + resize only",
                    "decode_images_per_s"), ("forward pass only", "model_images_per_s")):
    print(f"{name:<22} {r[key]:>9.1f}")
  print(json.dumps(r), flush=True)


if __name__ == "__main__":
  app.run(main)
