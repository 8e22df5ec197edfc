"""The integer network (:func:`~pyro_bqn.deploy.integer_network`) as an ONNX graph, for ONNX
Runtime: ``MatMulInteger`` (``uint8`` activations, ``int8`` weights, ``int32`` sums) and one
``GreaterOrEqual`` per sign layer; a convolution with its sign as one ``QLinearConv`` (bias
``1 - T``, every scale 1); ``ConvInteger`` before a float activation; float output scale.

**Activations** travel as ``uint8`` with a zero point, the input of the integer kernels:
signs ``±1`` as ``{0, 2}`` with zero point 1 (so a convolution's zero padding is the real
0), 8-bit input codes as ``0..255`` with zero point 128.

**Weights are stored packed**: each layer's integer weights as indices into the layer's
table of distinct values (``int8``, at most ``2**b`` entries), ``b`` bits each (1 for
binary, 2 for ternary and 2-bit weights; rounded up to 1, 2, 4 or 8), in the byte layout
of :func:`pyro_bqn.export.pack_indices`. A subgraph of constants (``BitShift``,
``BitwiseAnd``, ``Gather``) unpacks them; ONNX Runtime folds it into ``int8`` tensors once,
when the session is created, so runs pay nothing for the packing. Float weights (layers
whose levels are not integers) are stored as ``float32``.

Building the graph needs the ``onnx`` package (the optional extra ``onnx``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pyro_bqn.architectures import Reshape
from pyro_bqn.deploy.integer_network import (
    FloatAffine,
    InputCodes,
    IntegerConv2d,
    IntegerLinear,
    OutputScale,
    ScaledReLU,
    SignThreshold,
)
from pyro_bqn.export import pack_indices

__all__ = ["OPSET", "onnx_model"]

#: The ONNX opset of the graph (``BitwiseAnd`` needs 18).
OPSET = 18
_SIGN_ZERO, _CODE_ZERO = 1, 128


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:  # an optional dependency
        raise ImportError(
            "the ONNX export needs the onnx package: pip install 'pyro_bqn[onnx]'"
        ) from error
    return onnx


class _Graph:
    """Nodes and constants of the graph being built; ``value`` names the current tensor and
    ``zero_point`` its ``uint8`` zero point (``None`` for float and ``int32`` tensors)."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.constants: list[Any] = []
        self.count = 0
        self.value = "input"
        self.zero_point: int | None = None

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def constant(self, array: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        self.constants.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str | None = None, **attributes) -> str:
        output = self.name(stem or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], **attributes))
        return output

    def apply(self, op: str, *inputs: str, **attributes) -> None:
        """Replace the current tensor by ``op(current, *inputs)``."""
        self.value = self.node(op, [self.value, *inputs], **attributes)

    def to_float(self) -> None:
        """The current ``uint8`` tensor's real values as float32 (minus its zero point)."""
        if self.zero_point is not None:
            self.apply("Cast", to=self.onnx.TensorProto.FLOAT)
            self.apply("Sub", self.constant(np.float32(self.zero_point)))
            self.zero_point = None

    def packed_integers(self, weight: torch.Tensor) -> str:
        """An ``int8`` tensor of ``weight``'s values and shape, stored packed (module
        docstring) and unpacked by a subgraph of constants."""
        table, indices = torch.unique(weight, return_inverse=True)
        bits = next(b for b in (1, 2, 4, 8) if table.numel() <= 2**b)
        packed = pack_indices(indices.reshape(-1), bits).numpy()
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        packed_name, axis = self.constant(packed, "packed"), self.constant(np.int64([1]))
        rows = self.node("Unsqueeze", [packed_name, axis])
        codes = self.node("BitShift", [rows, self.constant(shifts)], direction="RIGHT")
        codes = self.node("BitwiseAnd", [codes, self.constant(np.uint8(2**bits - 1))])
        codes = self.node("Reshape", [codes, self.constant(np.int64([-1]))])
        codes = self.node(
            "Slice",
            [codes, self.constant(np.int64([0])), self.constant(np.int64([weight.numel()]))],
        )
        codes = self.node("Cast", [codes], to=self.onnx.TensorProto.INT64)
        values = self.node("Gather", [self.constant(table.numpy(), "table"), codes])
        return self.node("Reshape", [values, self.constant(np.int64(list(weight.shape)))])


def _integer_input(graph: _Graph, module: nn.Module) -> str:
    if graph.zero_point is None:
        raise ValueError(f"{type(module).__name__} needs an integer input")
    return graph.constant(np.uint8(graph.zero_point))


def _add(graph: _Graph, module: nn.Module) -> None:
    onnx = graph.onnx
    if isinstance(module, InputCodes):
        offset, step = (float(module.offset), float(module.step))
        graph.apply("Sub", graph.constant(np.float32(offset)))
        graph.apply("Div", graph.constant(np.float32(step)))
        graph.apply("Round")
        graph.apply("Clip", graph.constant(np.float32(0)), graph.constant(np.float32(255)))
        graph.apply("Cast", to=onnx.TensorProto.UINT8)
        graph.zero_point = _CODE_ZERO
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ValueError("only a Flatten from dimension 1 to the last can be exported")
        graph.apply("Flatten", axis=1)
    elif isinstance(module, Reshape):
        graph.apply("Reshape", graph.constant(np.int64([-1, *module.shape])))
    elif isinstance(module, nn.MaxPool2d):
        kernel = list(torch.nn.modules.utils._pair(module.kernel_size))
        stride = list(torch.nn.modules.utils._pair(module.stride))
        graph.apply("MaxPool", kernel_shape=kernel, strides=stride)
    elif isinstance(module, IntegerLinear):
        zero = _integer_input(graph, module)
        weight = graph.packed_integers(module.weight.t().contiguous())
        graph.apply("MatMulInteger", weight, zero)
        graph.zero_point = None
    elif isinstance(module, IntegerConv2d):
        zero = _integer_input(graph, module)
        pads = list(module.padding) * 2
        graph.apply("ConvInteger", graph.packed_integers(module.weight), zero, pads=pads)
        graph.zero_point = None
    elif isinstance(module, FloatAffine):
        if graph.zero_point is not None:
            graph.to_float()
        weight = module.weight.to(torch.float32)
        if module.padding is None:
            graph.apply("MatMul", graph.constant(weight.t().contiguous().numpy()))
        else:
            pads = list(module.padding) * 2
            graph.apply("Conv", graph.constant(weight.numpy()), pads=pads)
    elif isinstance(module, SignThreshold):
        graph.apply("GreaterOrEqual", graph.constant(module.threshold.numpy()))
        two, zero = graph.constant(np.uint8(2)), graph.constant(np.uint8(0))
        graph.apply("Where", two, zero)
        graph.zero_point = _SIGN_ZERO
    elif isinstance(module, OutputScale):
        graph.apply("Cast", to=onnx.TensorProto.FLOAT)
        graph.apply("Mul", graph.constant(module.scale.numpy()))
        graph.apply("Add", graph.constant(module.shift.numpy()))
        if isinstance(module, ScaledReLU):
            graph.apply("Relu")
    else:
        raise ValueError(f"{type(module).__name__} has no ONNX form")


def _conv_sign(graph: _Graph, conv: IntegerConv2d, sign: SignThreshold) -> None:
    """A convolution and its sign as one ``QLinearConv`` (ONNX Runtime's fast integer
    convolution; ``ConvInteger`` is slower than a float one): with every scale 1 and bias
    ``1 - T`` its ``uint8`` output ``clamp(s - T + 1, 0, 255)`` is positive iff ``s >= T``,
    and ``2 min(out, 1)`` gives the signs as ``{0, 2}``. The sums are exact (``|s| < 2**24``,
    the float requantisation multiplies by 1)."""
    zero = _integer_input(graph, conv)
    one = graph.constant(np.float32(1.0))
    bias = (1 - sign.threshold.reshape(-1).to(torch.int64)).to(torch.int32)
    inputs = [
        graph.value,
        one,
        zero,
        graph.packed_integers(conv.weight),
        one,
        graph.constant(np.int8(0)),
        one,
        graph.constant(np.uint8(0)),
        graph.constant(bias.numpy()),
    ]
    graph.value = graph.node("QLinearConv", inputs, pads=list(conv.padding) * 2)
    graph.apply("Min", graph.constant(np.uint8(1)))
    graph.apply("Mul", graph.constant(np.uint8(2)))
    graph.zero_point = _SIGN_ZERO


def onnx_model(network: nn.Sequential, num_features: int) -> Any:
    """The ONNX model (``onnx.ModelProto``) of an integer network: input ``"input"``
    ``float32`` ``(N, num_features)``, output ``"logits"`` ``float32`` ``(N, C)``.

    :raises ValueError: for a module that has no ONNX form here.
    :raises ImportError: if the ``onnx`` package is not installed.
    """
    onnx = _import_onnx()
    graph = _Graph(onnx)
    modules = list(network)
    index = 0
    while index < len(modules):
        after = modules[index + 1] if index + 1 < len(modules) else None
        if isinstance(modules[index], IntegerConv2d) and isinstance(after, SignThreshold):
            _conv_sign(graph, modules[index], after)
            index += 2
        else:
            _add(graph, modules[index])
            index += 1
    graph.nodes.append(onnx.helper.make_node("Identity", [graph.value], ["logits"]))
    float_type = onnx.TensorProto.FLOAT
    body = onnx.helper.make_graph(
        graph.nodes,
        "pyro_bqn_integer_network",
        [onnx.helper.make_tensor_value_info("input", float_type, ["N", num_features])],
        [onnx.helper.make_tensor_value_info("logits", float_type, ["N", None])],
        graph.constants,
    )
    model = onnx.helper.make_model(
        body, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="pyro_bqn"
    )
    onnx.checker.check_model(model)
    return model
