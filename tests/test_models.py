"""Model builders: shapes, normalization inside the model, architecture facts, bad input."""

import keras
import numpy as np
import pytest

from tfadv import models


@pytest.mark.parametrize("name, kwargs, shape", [
    ("digits_cnn", {}, (8, 8, 1)),
    ("madry_mnist_cnn", {}, (28, 28, 1)),
    ("small_cnn", {}, (28, 28, 1)),
    ("preact_resnet18", {}, (32, 32, 3)),
    ("wide_resnet", {"depth": 10, "width": 1}, (32, 32, 3)),
    ("gowal_cnn", {"size": "small"}, (28, 28, 1)),
    ("gowal_cnn", {"size": "medium"}, (32, 32, 3)),
])
def test_builders_map_images_to_logits(name, kwargs, shape):
    model = models.MODELS[name](input_shape=shape, num_classes=7, **kwargs)
    out = model(np.random.rand(2, *shape).astype("float32"), training=False)
    assert tuple(out.shape) == (2, 7)


def test_parameter_counts_match_the_papers_architectures():
    # PreAct ResNet-18 for CIFAR-10 has 11.17M parameters (Rice et al.'s PyTorch model).
    assert abs(models.preact_resnet18().count_params() - 11_173_962) < 20_000
    # Madry's MNIST model: 3.27M parameters.
    assert models.madry_mnist_cnn().count_params() == 3_274_634
    # Gowal et al.'s large IBP CNN on MNIST: convs 64, 64, 128 (stride 2), 128, 128 (3x3, same
    # padding), fc512, fc10.
    convs = 9 * (1 * 64 + 64 * 64 + 64 * 128 + 128 * 128 + 128 * 128) + 64 + 64 + 3 * 128
    dense = (14 * 14 * 128) * 512 + 512 + 512 * 10 + 10
    assert models.gowal_cnn(size="large").count_params() == convs + dense


def test_wrn_blocks_per_stage():
    model = models.wide_resnet(depth=16, width=2)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    # stem + 3 stages x 2 blocks x 2 convs + 3 projection shortcuts
    assert len(convs) == 1 + 3 * 2 * 2 + 3
    assert max(l.filters for l in convs) == 64 * 2


def test_normalization_lives_inside_the_model():
    model = models.digits_cnn(mean=0.5, std=0.25)
    norm = model.get_layer("normalize")
    x = np.full((1, 8, 8, 1), 0.75, "float32")
    np.testing.assert_allclose(norm(x), np.ones_like(x), atol=1e-6)


def test_small_cnn_head_starts_at_zero():
    model = models.small_cnn()
    np.testing.assert_array_equal(model.get_layer("logits").get_weights()[0], 0.0)


def test_weight_decay_uses_the_pytorch_convention():
    model = models.digits_cnn(weight_decay=2e-4)
    kernels = [l.kernel for l in model.layers if hasattr(l, "kernel")]
    expected = 1e-4 * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
    assert np.isclose(float(sum(model.losses)), expected, rtol=1e-4)


@pytest.mark.parametrize("call, needle", [
    (lambda: models.build_model("resnet50", (8, 8, 1), 10), "model name must be one of"),
    (lambda: models.wide_resnet(depth=30), "depth must be an integer 6n"),
    (lambda: models.digits_cnn(num_classes=1), "num_classes must be >= 2"),
    (lambda: models.digits_cnn(input_shape=(8, 8)), "input_shape must be"),
    (lambda: models.digits_cnn(std=0.0), "std must be > 0"),
    (lambda: models.small_cnn(input_shape=(8, 8, 1)), "small_cnn needs images of at least"),
])
def test_bad_arguments(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
