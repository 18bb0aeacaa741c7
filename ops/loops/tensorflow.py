"""The tensorflow driver: XLA-compiled while loops with a `tf.custom_gradient`.

The same structure as the jax driver: the forward loop saves each step's
residuals, the backward loop runs the model's `backward_step` in the opposite
order, and `backward_finish` forms the weight gradients as single large
matmuls over all steps. Both loops are compiled with XLA (`jit_compile`), so
the steps' `keras.ops` cost nothing at run time; the time dimension may be
unknown.
"""

import functools
import sys

import tensorflow as tf

PARALLEL_ITERATIONS = 32


def scan(body, carry, xs, reverse):
    """A jax-style scan: `body(carry, xs_t) -> (carry, ys_t)` over axis 0.

    `xs` is a tuple of time-major tensors (entries may be None); the `ys` of
    all steps are stacked on a new leading axis.
    """
    first = next(x for x in xs if x is not None)
    n = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
    xs_ta = [
        None if x is None
        else tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x)
        for x in xs
    ]
    # One step outside the loop gives the structure, dtypes and shapes of ys
    # (its ops are unused and pruned from the compiled graph).
    ys_spec = body(carry, [None if x is None else x[0] for x in xs])[1]
    # The element shapes are given: LiteRT's converter otherwise mistakes the
    # rank of slices inside the loop (a SLICE failure in the interpreter).
    ys_ta = [
        tf.TensorArray(y.dtype, size=n, element_shape=y.shape)
        for y in tf.nest.flatten(ys_spec)
    ]

    def loop(i, carry, ys_ta):
        xs_t = [None if ta is None else ta.read(i) for ta in xs_ta]
        carry, ys_t = body(carry, xs_t)
        ys_ta = [ta.write(i, y) for ta, y in zip(ys_ta, tf.nest.flatten(ys_t))]
        return i + (-1 if reverse else 1), carry, ys_ta

    start = n - 1 if reverse else 0
    _, carry, ys_ta = tf.while_loop(
        lambda i, *_: i >= 0 if reverse else i < n,
        loop,
        (tf.constant(start) if isinstance(start, int) else start, carry, ys_ta),
        parallel_iterations=PARALLEL_ITERATIONS,
        maximum_iterations=n,
    )
    return carry, tf.nest.pack_sequence_as(ys_spec, [ta.stack() for ta in ys_ta])


def _forward(model, reverse, config, x, state0, w, m, extras):
    def body(carry, xs_t):
        return model.forward_step(tuple(carry), tuple(xs_t), w, extras, config)

    final, ys = scan(body, tuple(state0), (x, m), reverse)
    return tuple(final), ys, model.residuals(x, state0, ys, tuple(final))


def _backward(model, reverse, config, residuals, w, m, extras, cotangents):
    carry, xs = model.backward_setup(residuals, m, w, cotangents, config, reverse)

    def body(carry, xs_t):
        return model.backward_step(tuple(carry), tuple(xs_t), w, extras, config)

    carry, ys = scan(body, tuple(carry), tuple(xs), not reverse)
    return model.backward_finish(
        residuals, m, w, extras, tuple(carry), ys, config, reverse
    )


def _compile(model, jit_compile=True):
    """The model's forward and backward loops, XLA-compiled by default."""
    forward = functools.partial(_forward, model)
    backward = functools.partial(_backward, model)
    return (
        tf.function(forward, jit_compile=jit_compile),
        tf.function(backward, jit_compile=jit_compile),
    )


_compiled = functools.lru_cache(maxsize=None)(_compile)

# The modules whose frames on the stack mean "this trace is for ONNX".
_ONNX_CONVERTERS = ("tf2onnx", "keras.src.export.onnx")


def _tracing_for_onnx():
    """Whether tf2onnx is tracing this call (Keras's `export(format="onnx")`
    or tf2onnx's own `from_keras` / `from_function`).

    tf2onnx does not inline a call of an XLA-compiled function: it writes a
    `PartitionedCall` node, which ONNX does not have. There is no API that
    says what a trace is for, so the stack is read (module names only).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_ONNX_CONVERTERS):
            return True
        frame = frame.f_back
    return False


def run(model, x, state0, w, mask, extras, reverse, config):
    """See `ops/loops/__init__.py`."""
    # Eager calls share one pair of functions per model (each shape traced
    # once). Inside a traced function (Keras's train and predict functions,
    # every export) a new pair is traced with this call's static shapes: a
    # shared function would serve a call with the trace of an earlier, more
    # general shape (`tf.function` dispatches to a supertype), whose unknown
    # shapes LiteRT's converter can only keep as TensorFlow (Flex) ops.
    # For ONNX the loops are plain graph functions, which tf2onnx inlines
    # (measured: XLA halves the time of `fit` and `predict` on the CPU, so it
    # stays everywhere else).
    if tf.executing_eagerly():
        forward, backward = _compiled(model)
    else:
        forward, backward = _compile(model, jit_compile=not _tracing_for_onnx())
    names = sorted(w)
    size = len(state0)
    reverse = bool(reverse)

    @tf.custom_gradient
    def recurrence(x, *flat):
        # The gradient is ours: stopping the tape at the compiled calls keeps
        # tensorflow from exporting their loops' internals for its own.
        x, *flat = [tf.stop_gradient(v) for v in (x, *flat)]
        state = tuple(flat[:size])
        weights = dict(zip(names, flat[size:]))
        final, ys, residuals = forward(
            reverse, config, x, state, weights, mask, extras
        )

        def grad(d_hs, *d_final):
            if d_hs is None:
                d_hs = tf.zeros_like(ys[0])
            d_final = tuple(
                tf.zeros_like(v) if d is None else d for d, v in zip(d_final, final)
            )
            dx, d_state, d_w = backward(
                reverse, config, residuals, weights, mask, extras, (d_hs, d_final)
            )
            return (dx, *d_state, *[d_w[n] for n in names])

        return (ys[0], *final), grad

    hs, *final = recurrence(x, *state0, *[w[n] for n in names])
    return hs, tuple(final)
