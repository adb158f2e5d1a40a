"""EfficientNetB0: rescales and normalises inside the model, so it is fed raw 0..255 pixels."""
import keras

from . import preprocessing
from ._registry import BackboneSpec, register


def _build(input_size, weights):
    return keras.applications.EfficientNetB0(
        include_top=False, weights=weights, input_shape=(input_size, input_size, 3)
    )


@register
def efficientnetb0() -> BackboneSpec:
    return BackboneSpec(
        name="efficientnetb0",
        build=_build,
        preprocess=preprocessing.raw,
        preprocessing="raw",
        input_size=224,
        layer_groups=(
            ("stem", ("input", "rescaling", "normalization", "stem_")),
            *((f"block{b}", (f"block{b}",)) for b in range(1, 8)),
            ("top", ("top_",)),
        ),
        last_conv_layer="top_activation",
        imagenet_file="efficientnetb0_notop.h5",
        imagenet_origin="https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        imagenet_hash="50bc09e76180e00e4465e1a485ddc09d",
        meta={"paper": "Tan & Le 2019", "family": "efficientnet"},
    )
