"""Which image file may be read, and what do its pixels become?

`resolve` keeps every image path inside the corpus folder (relative paths
only; `..`, absolute paths and symlinks leading outside are refused).
`load_image` decodes with PIL under a pixel limit (decompression bombs are
refused before decoding), converts any mode to RGB, hashes the decoded pixels
(identical images in other files or formats share the hash) and returns the
image resized and center-cropped to `size` x `size`.
"""

import dataclasses
import hashlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


MAX_PIXELS = 40_000_000


class ImageError(ValueError):
  """An image that cannot be used; `reason` is the report's name for it."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class LoadedImage:
  pixels: np.ndarray  # uint8 [size, size, 3], RGB
  pixel_hash: bytes   # 16-byte BLAKE2b of the decoded RGB pixels and their shape
  mode: str           # the file's PIL mode before conversion ("RGB" needs none)


def resolve(root: str, path: str) -> str:
  """The real path of `path` under the real folder `root`; ImageError if outside/missing."""
  if os.path.isabs(path):
    raise ImageError("image_outside_corpus", path)
  real = os.path.realpath(os.path.join(root, path))
  if not real.startswith(root.rstrip(os.sep) + os.sep):
    raise ImageError("image_outside_corpus", path)
  if not os.path.isfile(real):
    raise ImageError("image_missing", path)
  return real


def load_image(path: str, size: int, max_pixels: int = MAX_PIXELS) -> LoadedImage:
  """An image file -> LoadedImage; ImageError names why it cannot be used."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > max_pixels:   # header only: nothing decoded yet
          raise ImageError("image_too_large", f"{img.width}x{img.height} pixels")
        mode = img.mode
        img.load()
        rgb = img.convert("RGB")
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError("image_too_large", str(e)) from None
  except UnidentifiedImageError as e:
    raise ImageError("corrupt_image", str(e)) from None
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, ImageError):
      raise
    reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
    raise ImageError(reason, str(e)) from None
  pixel_hash = hashlib.blake2b(rgb.tobytes() + f"{rgb.size}".encode(), digest_size=16)
  small = ImageOps.fit(rgb, (size, size), Image.BILINEAR)
  return LoadedImage(np.asarray(small, np.uint8), pixel_hash.digest(), mode)
