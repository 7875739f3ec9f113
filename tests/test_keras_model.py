"""The Keras 3 adapter (torch backend): flat state in and out, training, batch norm, output kind."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedguard.client import training
from fedguard.models import keras_models, torch_models
from fedguard.models.adapter import TorchModel
from fedguard.models.keras_adapter import KerasModel, keras


def _weights_flat(model: keras.Model) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in model.get_weights()])


def _bn_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(6,)),
            keras.layers.Dense(8, name="fc"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(2, name="logits"),
        ],
        name="bn_net",
    )


def test_flat_round_trip_reaches_keras_weights() -> None:
    keras.utils.set_random_seed(0)
    model = keras_models.image_cnn((1, 28, 28), 2)
    adapter = KerasModel(model)
    assert adapter.spec.size == 121_410 == model.count_params()
    assert adapter.spec.size == TorchModel(torch_models.image_cnn((1, 28, 28), 2)).spec.size
    assert adapter.spec.names[:2] == ("image_cnn/conv1/kernel", "image_cnn/conv1/bias")
    assert {t.dtype for t in adapter.spec.tensors} == {"float32"}
    np.testing.assert_array_equal(adapter.get_flat().numpy(), _weights_flat(model))

    new = torch.randn(adapter.spec.size, generator=torch.Generator().manual_seed(1))
    adapter.set_flat(new)
    np.testing.assert_array_equal(_weights_flat(model), new.numpy())
    assert torch.equal(adapter.get_flat(), new)
    # A second build names its tensors the same (the built-in layers are named).
    assert KerasModel(keras_models.image_cnn((1, 28, 28), 2)).spec == adapter.spec


def test_builtin_matches_its_torch_twin() -> None:
    """Given the torch weights (kernels transposed), the Keras CNN computes the same function."""
    torch.manual_seed(0)
    torch_net = torch_models.image_cnn((1, 28, 28), 3)
    keras_net = KerasModel(keras_models.image_cnn((1, 28, 28), 3))
    to_keras = [
        w.detach().permute(2, 3, 1, 0) if w.ndim == 4 else w.detach().T if w.ndim == 2 else w
        for w in torch_net.state_dict().values()
    ]
    keras_net.set_flat(torch.cat([w.reshape(-1) for w in to_keras]))
    x = torch.randn(5, 1, 28, 28)
    expected = torch.softmax(torch_net(x), dim=-1)
    torch.testing.assert_close(keras_net.forward(x, training=False), expected)


def test_speech_cnns_match_their_torch_twins() -> None:
    """Both speech models exist in both registries with the same weights and, given the torch
    weights (Conv1D kernels ``[k, in, out]``), the Keras ``speech_cnn`` computes the same function
    (its GroupNormalization has torch's epsilon)."""
    shape = (1, 12, 16)
    for name in ("speech_cnn", "brief_speech_cnn"):
        torch_size = TorchModel(torch_models.BUILTIN[name](shape, 3)).spec.size
        assert KerasModel(keras_models.BUILTIN[name](shape, 3)).spec.size == torch_size, name
    torch.manual_seed(0)
    torch_net = torch_models.speech_cnn(shape, 3)
    keras_net = KerasModel(keras_models.speech_cnn(shape, 3))
    to_keras = [
        w.detach().permute(2, 1, 0) if w.ndim == 3 else w.detach().T if w.ndim == 2 else w
        for w in torch_net.state_dict().values()
    ]
    keras_net.set_flat(torch.cat([w.reshape(-1) for w in to_keras]))
    x = torch.randn(5, *shape)
    expected = torch.softmax(torch_net(x), dim=-1)
    torch.testing.assert_close(keras_net.forward(x, training=False), expected)


def test_training_learns_two_blobs() -> None:
    keras.utils.set_random_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(128) % 2
    x = torch.randn(128, 1, 28, 28, generator=g) * 0.5
    x[y == 1, :, :14, :14] += 1.0  # class 1: a brighter top-left quadrant
    adapter = KerasModel(keras_models.image_cnn((1, 28, 28), 2))

    def loss() -> float:
        with torch.no_grad():
            return float(
                torch.nn.functional.nll_loss(adapter.log_probabilities(x, training=False), y)
            )

    before = loss()
    cfg = training.LocalTraining(
        optimizer=training.LocalOptimizer.ADAM, lr=1e-3, epochs=2, batch_size=32
    )
    stats = training.train(adapter, x, y, cfg, generator=g)
    assert stats.steps == 8 and stats.num_examples == 128
    with torch.no_grad():
        accuracy = float((adapter.forward(x, training=False).argmax(-1) == y).float().mean())
    assert before > 0.6 and loss() < 0.1
    assert accuracy >= 0.95


def test_batch_norm_statistics_travel_and_train() -> None:
    keras.utils.set_random_seed(0)
    adapter = KerasModel(_bn_model())
    spec = {t.name: t for t in adapter.spec.tensors}
    mean, var = spec["bn_net/bn/moving_mean"], spec["bn_net/bn/moving_variance"]
    assert adapter.spec.size == adapter.module.count_params() == 6 * 8 + 8 + 4 * 8 + 8 * 2 + 2
    trainable = {s.offset for s in adapter.trainable()}
    assert mean.offset not in trainable and var.offset not in trainable
    assert sum(s.numel for s in adapter.trainable()) == adapter.spec.size - 16

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g) * 3.0 + 2.0
    y = (x[:, 0] > 2.0).long()
    before = adapter.get_flat()
    cfg = training.LocalTraining(optimizer=training.LocalOptimizer.ADAM, lr=1e-2, batch_size=16)
    training.train(adapter, x, y, cfg, generator=g)
    after = adapter.get_flat()
    for t in (mean, var):
        assert not torch.equal(
            after[t.offset : t.offset + t.numel], before[t.offset : t.offset + t.numel]
        )

    # The statistics in the vector are the ones inference uses.
    out = adapter.forward(x[:4], training=False)
    shifted = after.clone()
    shifted[mean.offset : mean.offset + mean.numel] += 1.0
    adapter.set_flat(shifted)
    assert not torch.allclose(adapter.forward(x[:4], training=False), out)
    np.testing.assert_array_equal(_weights_flat(adapter.module), shifted.numpy())


def test_output_kind_is_read_off_the_last_layer() -> None:
    assert KerasModel(keras_models.logistic_regression((4,), 3)).outputs_probabilities
    assert not KerasModel(_bn_model()).outputs_probabilities
    softmax_layer = keras.Sequential([keras.layers.Dense(3), keras.layers.Softmax()])
    assert KerasModel(softmax_layer, input_shape=(4,)).outputs_probabilities
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(5, activation="softmax")(inputs)
    functional = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    assert not KerasModel(functional).outputs_probabilities
    forced = KerasModel(functional, outputs_probabilities=True)
    assert forced.outputs_probabilities


def test_unbuilt_model_needs_an_input_shape() -> None:
    model = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="input_shape"):
        KerasModel(model)
    adapter = KerasModel(model, input_shape=(2, 3))
    assert adapter.spec.size == 6 * 2 + 2
    assert adapter.forward(torch.zeros(4, 2, 3), training=False).shape == (4, 2)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_non_torch_backend_is_refused(backend: str) -> None:
    """Keras fixes its backend at its first import, so each backend is tried in a fresh
    interpreter: KERAS_BACKEND=jax makes importing fedguard.models.keras_adapter raise our
    ImportError naming the backend; torch (the control) imports."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run(
        [sys.executable, "-c", "import fedguard.models.keras_adapter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if backend == "torch":
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: fedguard runs Keras 3 on the torch backend, but Keras is using 'jax': "
        "set KERAS_BACKEND=torch before Keras is first imported."
    ), done.stderr
