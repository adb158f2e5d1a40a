"""Input scaling per weights family. Inputs are float32 RGB in 0..255, any leading shape."""
import tensorflow as tf

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def caffe(images):
    """VGG16/ResNet50 ImageNet weights: RGB to BGR, ImageNet mean subtracted, 0..255 scale."""
    bgr = tf.reverse(tf.cast(images, tf.float32), axis=[-1])
    return bgr - tf.constant(IMAGENET_BGR_MEAN, dtype=tf.float32)


def raw(images):
    """EfficientNet: the model rescales and normalises inside, so it takes raw 0..255 pixels."""
    return tf.cast(images, tf.float32)


def lite(images):
    """EfficientNet-Lite's TF reference: RGB scaled to about -1..1 as (x - 127) / 128."""
    return (tf.cast(images, tf.float32) - 127.0) / 128.0


BY_NAME = {"caffe": caffe, "raw": raw, "lite": lite}
