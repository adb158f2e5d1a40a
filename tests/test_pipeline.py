"""Augmentation: each intensity change does what its setting says, alone, and nothing when off."""
import numpy as np

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
