"""ResNet50: stem then four residual stages; caffe preprocessing."""
import keras

from . import preprocessing
from ._registry import BackboneSpec, register


def _build(input_size, weights):
    return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))


@register
def resnet50() -> BackboneSpec:
    return BackboneSpec(
        name="resnet50",
        build=_build,
        preprocess=preprocessing.caffe,
        preprocessing="caffe",
        input_size=224,
        layer_groups=(
            ("stem", ("input", "conv1_", "pool1_")),
            ("conv2", ("conv2_",)),
            ("conv3", ("conv3_",)),
            ("conv4", ("conv4_",)),
            ("conv5", ("conv5_",)),
        ),
        last_conv_layer="conv5_block3_out",
        imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_origin="https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_hash="4d473c1dd8becc155b73f8504c6f6626",
        meta={"paper": "He et al. 2015", "family": "resnet"},
    )
