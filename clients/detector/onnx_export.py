"""The portable files of a detector bundle: the TCN's streaming step as an ONNX graph, and the frontend's arrays.

``step.onnx`` (opset 17) runs one frame: inputs ``frame`` ``[1, n_mels]`` and one cache per causal convolution
(``cache_0`` for the input projection, ``cache_1`` ... for the residual blocks, ``[1, channels_in, context]``,
zeros at the start of a stream); outputs ``probabilities`` ``[1, n_classes]`` (the sigmoid of the logits) and
``new_cache_0`` ... (the caches for the next frame). It computes exactly ``TCN.step``: each causal convolution
concatenates its cache and the frame, takes every ``dilation``-th column as its taps and applies the kernel as one
matrix product; LayerNorm over the channels, ReLU and the residual sums follow the model.

``frontend.npz`` holds the training frontend's ``window`` ``[n_fft]`` and mel ``filterbank``
``[n_fft // 2 + 1, n_mels]`` (float32), so a numpy frontend computes the same frames
(:class:`clients.detector.portable.NumpyFrames`).

Writing them needs the ``onnx`` package; running them, only numpy and onnxruntime.
"""

from __future__ import annotations

import io

import numpy as np

from fl.frontend import Frontend
from fl.models import TCN, CausalConv1d

OPSET = 17


def frontend_arrays(frontend: Frontend) -> bytes:
    """``frontend.npz``'s bytes: the frontend's window and mel filterbank."""
    buffer = io.BytesIO()
    np.savez(buffer, window=frontend.window.numpy().astype(np.float32),
             filterbank=frontend.filterbank.numpy().astype(np.float32))
    return buffer.getvalue()


def cache_shapes(model: TCN) -> list[list[int]]:
    """The shape of each cache input, in order (input projection first)."""
    convs = [model.input_proj, *(block.conv for block in model.blocks)]
    return [[1, conv.in_channels, conv.context] for conv in convs]


class _Graph:
    """A small builder of ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        import onnx

        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.name(op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], **attrs))
        return output


def _causal_conv(g: _Graph, conv: CausalConv1d, x: str, cache: str, new_cache: str) -> str:
    """``CausalConv1d.step``: x ``[1, C_in]`` with its cache ``[1, C_in, context]`` -> ``[1, C_out]``."""
    window = g.op("Concat", [cache, g.op("Unsqueeze", [x, g.const("axis", np.array([2], np.int64))])], axis=2)
    context = conv.context
    g.op("Slice", [window, g.const("start", np.array([1], np.int64)),
                   g.const("end", np.array([context + 1], np.int64)), g.const("axis", np.array([2], np.int64))],
         output=new_cache)
    taps = g.op("Gather", [window, g.const("taps", np.arange(0, context + 1, conv.tap_stride, dtype=np.int64))],
                axis=2)  # [1, C_in, kernel]
    flat = g.op("Reshape", [taps, g.const("shape", np.array([1, -1], np.int64))])
    weight = conv.weight.detach().cpu().numpy().reshape(conv.out_channels, -1).T.astype(np.float32)
    return g.op("Add", [g.op("MatMul", [flat, g.const("w", weight)]),
                        g.const("b", conv.bias.detach().cpu().numpy().astype(np.float32))])


def _linear(g: _Graph, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
    return g.op("Add", [g.op("MatMul", [x, g.const("w", weight.T.astype(np.float32))]),
                        g.const("b", bias.astype(np.float32))])


def _layer_norm(g: _Graph, x: str, norm) -> str:
    return g.op("LayerNormalization", [x, g.const("gamma", norm.weight.detach().cpu().numpy()),
                                       g.const("beta", norm.bias.detach().cpu().numpy())],
                axis=-1, epsilon=float(norm.eps))


def step_onnx(model: TCN) -> bytes:
    """The serialized ONNX model of ``model.step`` followed by a sigmoid (see the module docstring)."""
    g = _Graph()
    onnx, helper = g.onnx, g.onnx.helper
    shapes = cache_shapes(model)
    inputs = [helper.make_tensor_value_info("frame", onnx.TensorProto.FLOAT, [1, model.n_mels])]
    inputs += [helper.make_tensor_value_info(f"cache_{i}", onnx.TensorProto.FLOAT, shape)
               for i, shape in enumerate(shapes)]
    outputs = [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, model.n_classes])]
    outputs += [helper.make_tensor_value_info(f"new_cache_{i}", onnx.TensorProto.FLOAT, shape)
                for i, shape in enumerate(shapes)]
    h = _causal_conv(g, model.input_proj, "frame", "cache_0", "new_cache_0")
    h = g.op("Relu", [_layer_norm(g, h, model.input_norm)])
    for i, block in enumerate(model.blocks, start=1):
        y = _causal_conv(g, block.conv, h, f"cache_{i}", f"new_cache_{i}")
        y = g.op("Relu", [_layer_norm(g, y, block.norm)])
        pointwise = block.pointwise
        y = _linear(g, y, pointwise.weight.detach().cpu().numpy()[:, :, 0], pointwise.bias.detach().cpu().numpy())
        h = g.op("Add", [h, y])
    h = g.op("Relu", [_layer_norm(g, h, model.out_norm)])
    logits = _linear(g, h, model.head.weight.detach().cpu().numpy(), model.head.bias.detach().cpu().numpy())
    g.op("Sigmoid", [logits], output="probabilities")
    graph = helper.make_graph(g.nodes, "fedsound_tcn_step", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fedsound")
    proto.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
