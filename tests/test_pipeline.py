"""Augmentation: each intensity change does what its setting says, alone, and nothing when off."""
import numpy as np
import pytest

from benchmark import pipeline
from benchmark.config import AugmentConfig

GEOMETRY_OFF = dict(rotation_degrees=0.0, shift=0.0, shear=0.0, zoom=0.0, horizontal_flip=False)


def _images(n=16, size=24, noise=20.0):
    """Mid-grey images with a bright square: nothing clips at 0 or 255 under mild changes."""
    rng = np.random.default_rng(0)
    images = (110 + rng.uniform(-noise, noise, (n, size, size, 3))).astype("float32")
    images[:, 8:16, 8:16, :] += 60
    return images


def _augment(noise=20.0, **intensity):
    layers = pipeline.augmenter(AugmentConfig(**GEOMETRY_OFF, **intensity), seed=3)
    images = _images(noise=noise)
    return images, np.asarray(layers(images, training=True))


def test_intensity_changes_are_off_by_default_and_geometry_off_means_no_layers():
    defaults = AugmentConfig()
    assert (defaults.contrast, defaults.brightness, defaults.sharpness) == (0.0, 0.0, 0.0)
    assert pipeline.augmenter(AugmentConfig(**GEOMETRY_OFF), seed=3) is None


def test_contrast_scales_each_image_about_its_mean_within_the_factor():
    images, out = _augment(contrast=0.3)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), rtol=1e-4)
    ratio = out.std(axis=(1, 2, 3)) / images.std(axis=(1, 2, 3))
    assert np.all((ratio >= 0.7 - 1e-4) & (ratio <= 1.3 + 1e-4)) and ratio.std() > 0.02  # random per image


def test_brightness_shifts_every_pixel_of_an_image_alike_within_the_range():
    images, out = _augment(brightness=0.1)
    shift = out - images
    per_image = shift.reshape(len(shift), -1)
    np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], axis=1), atol=1e-3)
    assert np.abs(per_image[:, 0]).max() <= 0.1 * 255 + 1e-3 and per_image[:, 0].std() > 1


def test_sharpness_keeps_flat_areas_and_moves_only_edges_both_ways():
    images, out = _augment(noise=0.0, sharpness=0.8)
    for flat in ((slice(None), slice(10, 14), slice(10, 14)), (slice(None), slice(2, 6), slice(2, 6))):
        np.testing.assert_allclose(out[flat], images[flat], atol=1e-3)  # inside the square, and away from it and the border
    edge = out[:, 8, 8:16, 0] - images[:, 8, 8:16, 0]  # the square's top row: blurred darker, sharpened brighter
    assert (edge.mean(axis=1) < -1).any() and (edge.mean(axis=1) > 1).any()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_mixup_mixes_inputs_labels_and_weights_by_one_beta_weight(n_classes):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(16, 5, 5, 3)).astype("float32")
    labels = (rng.integers(0, 2, (16, 1)).astype("float32") if n_classes == 2
              else rng.integers(0, n_classes, 16).astype("int32"))
    weights = rng.uniform(0.5, 2.0, 16).astype("float32")
    mixed, targets, mixed_weights = pipeline.mixup(inputs, labels, weights, np.random.default_rng(7), 0.4, n_classes)
    draw = np.random.default_rng(7)  # the same draws, by hand
    lam, partner = draw.beta(0.4, 0.4), draw.permutation(16)
    one_hot = labels if n_classes == 2 else np.eye(n_classes)[labels]
    np.testing.assert_allclose(mixed, lam * inputs + (1 - lam) * inputs[partner], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[partner], rtol=1e-5)
    np.testing.assert_allclose(mixed_weights, lam * weights + (1 - lam) * weights[partner], rtol=1e-5)
    assert targets.shape == ((16, 1) if n_classes == 2 else (16, n_classes)) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(0), one_hot.sum(0), rtol=1e-5)  # a reordering keeps the class totals
    assert 0 < lam < 1 and not np.allclose(mixed, inputs)
    assert pipeline.mixup(inputs, labels, None, np.random.default_rng(7), 0.4, n_classes)[2] is None
