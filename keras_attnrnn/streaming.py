"""Streaming: one step of a trained layer as a Keras model with explicit state.

`streaming_step(layer)` builds a functional `keras.Model` that runs the
layer's cell once: one token and the state in, the output and the new state
out, the state of a constant size. It uses the layer's own weights and its
cell's `call`, so the math is the one the layer runs over a sequence, and it
exports with `model.export(path, format=...)` to a function a runtime
(TensorFlow, ONNX Runtime, LiteRT) calls token by token. See docs/export.md,
"Streaming".
"""

import keras
import numpy as np

from keras_attnrnn.aaren import AarenCell
from keras_attnrnn.attnrnn import AttnRNNCell
from keras_attnrnn.larnn import LARNNCell

# The names of each cell's state tensors, in the cell's state order.
STATE_NAMES = {
    AttnRNNCell: ("h",),
    LARNNCell: ("h", "c", "window", "valid"),
    AarenCell: ("y", "w", "m", "u"),
}
INPUT_NAME = "inputs"
OUTPUT_NAME = "outputs"
NEW_STATE_PREFIX = "new_"


def _cell(layer, argument="layer"):
    """The built cell of `layer` (a cell, a fused layer or a
    `keras.layers.RNN` of one of this package's cells)."""
    cell = layer
    if isinstance(layer, keras.layers.RNN):
        if layer.go_backwards:
            raise ValueError(
                f"Received an invalid value for argument `{argument}`: "
                f"{layer.name} has go_backwards=True, and a streaming step "
                "processes tokens in the order they arrive. Pass a layer "
                "with go_backwards=False."
            )
        cell = layer.cell
    if _names(cell) is None:
        supported = ", ".join(c.__name__ for c in STATE_NAMES)
        raise ValueError(
            f"Received an invalid value for argument `{argument}`, expected "
            f"one of {supported}, the fused layer of one (AttnRNN, LARNN, "
            "Aaren) or a keras.layers.RNN of one, got "
            f"{type(layer).__name__} {layer!r}."
        )
    if not cell.built:
        raise ValueError(
            f"Received an invalid value for argument `{argument}`: "
            f"{layer.name} is not built, so it has no weights to stream "
            "with. Call it on an input (or `build` it) first."
        )
    return cell


def _names(cell):
    for klass, names in STATE_NAMES.items():
        if isinstance(cell, klass):
            return names
    return None


def _check_batch_size(batch_size):
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size <= 0
    ):
        raise ValueError(
            "Received an invalid value for argument `batch_size`, expected "
            f"a positive integer or None, got {batch_size!r}."
        )
    return batch_size


def state_names(layer):
    """The names of the state tensors of a streaming step, in order
    (not exported at the top level: `streaming_initial_state` gives them as
    its keys).

    Args:
        layer: An `AttnRNNCell`, `LARNNCell` or `AarenCell`, the fused layer
            of one (`AttnRNN`, `LARNN`, `Aaren`), or a `keras.layers.RNN` of
            one.

    Returns:
        A tuple of strings: `("h",)` for AttnRNN, `("h", "c", "window",
        "valid")` for LARNN, `("y", "w", "m", "u")` for Aaren. The step's
        inputs are `"inputs"` and these; its outputs `"outputs"` and these
        with the prefix `"new_"`.
    """
    return _names(_cell(layer))


def streaming_step(layer, batch_size=None, name=None):
    """One step of a recurrent layer as a model: a token and the state in.

    Builds a functional `keras.Model` that runs the layer's cell once, with
    the layer's own weights (the variables are shared, not copied): the
    inputs are a dict with the token's features `"inputs"`, shape
    `(batch, features)`, and each state tensor by name (see `state_names`),
    shape `(batch, size)`; the outputs a dict with the step's output
    `"outputs"`, shape `(batch, units)`, and the new state tensors, named
    `"new_" + name`. The state has the same shapes at every step, however
    many tokens came before. Feeding a sequence one token at a time, each
    new state into the next step, gives the outputs the layer computes for
    the whole sequence at once (`return_sequences=True`), starting from
    `streaming_initial_state(layer)`. To leave out a masked token, skip its
    step.

    The model exports like any Keras model, `step.export(path,
    format="onnx")` and so on, to a function a runtime calls token by token
    with named inputs and outputs (docs/export.md, "Streaming"). Keras's
    default export signature leaves the batch size open, and torch's
    exporters then trace a batch of 1; to keep the batch size, pass
    `input_signature=[{n: keras.InputSpec(shape=t.shape, dtype=t.dtype,
    name=n) for n, t in step.input.items()}]`. The model runs in inference
    mode (no dropout).

    Args:
        layer: A built `AttnRNNCell`, `LARNNCell` or `AarenCell`, the fused
            layer of one (`AttnRNN`, `LARNN`, `Aaren`), or a
            `keras.layers.RNN` of one, with `go_backwards=False`.
        batch_size: Positive integer, the batch size the model's inputs
            declare, or `None` (default) for any.
        name: String, the model's name. Default: `"<layer name>_step"`.

    Returns:
        A `keras.Model` mapping `{"inputs": x, **state}` to
        `{"outputs": y, **{"new_" + name: s for name, s in new_state}}`.

    Example:

    >>> layer = keras_attnrnn.Aaren(16, num_heads=2, return_sequences=True)
    >>> sequence = np.random.random((1, 10, 8)).astype("float32")
    >>> whole = layer(sequence)
    >>> step = keras_attnrnn.streaming_step(layer)
    >>> state = keras_attnrnn.streaming_initial_state(layer, batch_size=1)
    >>> outputs = []
    >>> for t in range(10):
    ...     result = step({"inputs": sequence[:, t], **state})
    ...     result = keras.tree.map_structure(keras.ops.convert_to_numpy, result)
    ...     state = {n: result["new_" + n] for n in state}
    ...     outputs.append(result["outputs"])
    >>> streamed = np.stack(outputs, axis=1)
    >>> bool(np.abs(streamed - keras.ops.convert_to_numpy(whole)).max() < 1e-5)
    True
    >>> {n: tuple(s.shape) for n, s in state.items()}
    {'y': (1, 16), 'w': (1, 16), 'm': (1, 2), 'u': (1, 2)}
    """
    cell = _cell(layer)
    batch_size = _check_batch_size(batch_size)
    if name is not None and not isinstance(name, str):
        raise ValueError(
            "Received an invalid value for argument `name`, expected a "
            f"string or None, got {name!r}."
        )
    names = _names(cell)
    sizes = cell.state_size
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    inputs = {
        INPUT_NAME: keras.Input(
            (cell.input_dim,), batch_size=batch_size, name=INPUT_NAME
        )
    }
    for state_name, size in zip(names, sizes):
        inputs[state_name] = keras.Input(
            (size,),
            batch_size=batch_size,
            dtype=cell.compute_dtype,
            name=state_name,
        )
    output, new_states = cell(
        inputs[INPUT_NAME], [inputs[n] for n in names], training=False
    )
    if not isinstance(new_states, (list, tuple)):
        new_states = [new_states]
    outputs = {OUTPUT_NAME: output}
    for state_name, state in zip(names, new_states):
        outputs[NEW_STATE_PREFIX + state_name] = state
    return keras.Model(inputs, outputs, name=name or f"{layer.name}_step")


def streaming_initial_state(layer, batch_size=1):
    """The state a streaming step starts a sequence from, as NumPy arrays.

    The layer's default initial state (`cell.get_initial_state`): filled with
    `initial_state_value` (0.001) for AttnRNN, zeros (the empty state) for
    LARNN and Aaren.

    Args:
        layer: What `streaming_step` takes.
        batch_size: Positive integer, the batch size. Default: 1.

    Returns:
        A dict from each name of `state_names(layer)` to a NumPy array of
        shape `(batch_size, size)`, in the cell's compute dtype.

    Example:

    >>> layer = keras_attnrnn.AttnRNN(16)
    >>> layer.build((None, None, 8))
    >>> state = keras_attnrnn.streaming_initial_state(layer, batch_size=2)
    >>> {n: (s.shape, round(float(s[0, 0]), 6)) for n, s in state.items()}
    {'h': ((2, 16), 0.001)}
    """
    cell = _cell(layer)
    if batch_size is None:
        raise ValueError(
            "Received an invalid value for argument `batch_size`, expected "
            "a positive integer, got None."
        )
    batch_size = _check_batch_size(batch_size)
    states = cell.get_initial_state(batch_size)
    states = list(states) if isinstance(states, (list, tuple)) else [states]
    return {
        n: np.asarray(keras.ops.convert_to_numpy(s))
        for n, s in zip(_names(cell), states)
    }
