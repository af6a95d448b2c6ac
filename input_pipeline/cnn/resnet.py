"""What is a torchvision ResNet (ResNet-152, DU2MCE's image encoder) in Flax?

The bottleneck ResNet of torchvision ("v1.5": the stride sits on the 3x3
convolution): a 7x7 stride-2 stem (64 channels) with PyTorch's symmetric
padding, a 3x3 stride-2 max-pool, four stages of bottleneck blocks
(1x1 -> 3x3 -> 1x1 at widths 64, 128, 256, 512, output 4 x width; a 1x1
projection `downsample` on the first block of each stage), batch norm with
epsilon 1e-5, ReLU, global mean pool to 2048-d, a linear classifier.

There are no weights in this package: `load` reads a user-supplied file
(safetensors, or a torchvision state dict .pth read without executing pickled
code) named like torchvision's (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`); the block counts per stage are read from
the keys, ResNet-152's being (3, 8, 36, 3).
"""

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.cnn import weights
from input_pipeline.cnn.layers import Conv1x1

RESNET152 = (3, 8, 36, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
BN_EPSILON = 1e-5
# torchvision's ImageNet preprocessing, in [0, 255] pixel units.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGE_SIZE = 224


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=name)


def _pad(k: int) -> tuple:
  return ((k // 2, k // 2), (k // 2, k // 2))


class Bottleneck(nn.Module):
  """[B, H, W, C] -> [B, H / stride, W / stride, 4 width]."""
  width: int
  stride: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = EXPANSION * self.width
    y = nn.relu(_bn("bn1")(Conv1x1(self.width, name="conv1")(x)))
    y = nn.Conv(self.width, (3, 3), (self.stride, self.stride), padding=_pad(3),
                use_bias=False, name="conv2")(y)
    y = nn.relu(_bn("bn2")(y))
    y = _bn("bn3")(Conv1x1(out, name="conv3")(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = _bn("downsample_1")(Conv1x1(out, self.stride, name="downsample_0")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """RGB pixels in [0, 255], [B, H, W, 3] -> logits [B, num_classes], or with
  `pooled` the mean-pooled last stage [B, 2048]."""
  blocks: Sequence[int] = RESNET152
  num_classes: int = 1000

  @nn.compact
  def __call__(self, pixels: jnp.ndarray, pooled: bool = False) -> jnp.ndarray:
    x = (pixels.astype(jnp.float32) - jnp.asarray(MEAN_RGB)) / jnp.asarray(STDDEV_RGB)
    x = nn.Conv(64, (7, 7), (2, 2), padding=_pad(7), use_bias=False, name="conv1")(x)
    x = nn.relu(_bn("bn1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
    for s, (n, width) in enumerate(zip(self.blocks, WIDTHS)):
      for i in range(n):
        stride = 2 if i == 0 and s > 0 else 1
        x = Bottleneck(width, stride, name=f"layer{s + 1}_{i}")(x)
    x = jnp.mean(x, axis=(1, 2))
    if pooled:
      return x
    return nn.Dense(self.num_classes, name="fc")(x)


def block_counts(state: Mapping[str, np.ndarray]) -> tuple[int, ...]:
  """Blocks per stage read from torchvision keys (layer{1-4}.{i}.*)."""
  seen = {tuple(map(int, m.groups())) for k in state
          if (m := re.match(r"layer(\d)\.(\d+)\.", k))}
  counts = tuple(1 + max((i for s, i in seen if s == stage), default=-1) for stage in range(1, 5))
  if 0 in counts:
    raise ValueError(f"not a torchvision ResNet state dict: blocks per stage {counts}")
  return counts


def load(path: str) -> tuple[ResNet, dict]:
  """(module, variables) from a torchvision-named weights file (.safetensors/.pth/.npz)."""
  state = weights.read_state_dict(path)
  if "fc.weight" not in state:
    raise ValueError(f"{path}: no fc.weight; not a torchvision ResNet state dict")
  model = ResNet(block_counts(state), num_classes=state["fc.weight"].shape[0])
  variables = weights.to_flax(state)
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
  weights.check_variables(variables, expected, f"ResNet {model.blocks} from {path}")
  return model, variables
