"""What TensorRT's ONNX parser accepts, and the checks an exported graph passes before a strongly typed build.

`SUPPORTED` is the "Operator Support Matrix" of onnx-tensorrt's docs/operators.md at the ONNX-TensorRT 10.1 GA
release (https://github.com/onnx/onnx-tensorrt/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/docs/operators.md,
"TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"): every operator marked "Y" with
its "Supported Types" column (which names the data operand's types). TensorRT 11.x documents opsets up to 25
(https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html), pointing at the same list.

`graph_problems(model)` lists what a build would trip on (an operator outside the list, a data type the operator
does not take, a non-static input or output shape, an untyped tensor), `opset_problem` an opset outside the range;
`precision_problems(model, dtype)` what a strongly typed build would compute in another precision than the export
asked for: a strongly typed network takes every tensor's type from the graph (the builder's precision flags are
gone in TensorRT 11), so the graph must already say float32 everywhere, or half precision where it should.
"""

from __future__ import annotations

from collections import Counter

SOURCE = ("https://github.com/onnx/onnx-tensorrt/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/docs/operators.md "
          "(ONNX-TensorRT 10.1 GA)")
TENSORRT_VERSION = "10.1"
OPSETS = {10: (9, 20), 11: (9, 25)}  # TensorRT major -> the documented opset range (sources above)

_F = ("FP32", "FP16", "BF16")
_FI = (*_F, "INT32", "INT64")
_FIB = (*_FI, "BOOL")
_GROUPS = {
    _F: """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh
        CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization GRU
        HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log
        LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus Pow
        PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize RNN Round
        ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample""",
    _FI: """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul
        Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
        ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK""",
    _FIB: """Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop
        OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where""",
    (*_FIB, "UINT8"): "Cast CastLike",
    ("FP32", "FP16"): "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign",
    ("BOOL",): "And Not Or Xor",
    ("INT8", "FP8", "INT4"): "DequantizeLinear",
    (*_F, "INT8", "INT32", "INT64"): "Gelu",
    (*_F, "FP8", "INT32", "INT64"): "Mean",
}
SUPPORTED: dict[str, frozenset[str]] = {op: frozenset(types) for types, ops in _GROUPS.items() for op in ops.split()}

# ONNX TensorProto element types -> the list's type names (and the export's dtype names)
TYPES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8", 11: "DOUBLE",
         17: "FP8", 22: "INT4"}
HALF = {"float16": "FP16", "bfloat16": "BF16"}
HEAVY = ("Conv", "ConvTranspose")  # always in the export's compute dtype
MIXED = ("Gemm", "MatMul")  # half but for the float32 time embedding (Gemm) and attention logits (MatMul)
FLOAT32_OPS = ("Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization")  # float32 by design


def graph_dtype(graph: str, dtype: str) -> str:
    """The compute dtype of graph `graph` in an export in `dtype`: the tokens graph is always float32."""
    return "float32" if graph == "tokens" else dtype


def opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def tensor_types(model) -> dict[str, str]:
    """tensor name -> type name (`TYPES`) of every typed tensor: inputs, outputs, value_info, initializers and
    Constant outputs (the export writes shape inference into the file, so every intermediate tensor is typed)."""
    g = model.graph
    out = {v.name: TYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
           for v in [*g.input, *g.output, *g.value_info]}
    out.update({t.name: TYPES.get(t.data_type, str(t.data_type)) for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = TYPES.get(n.attribute[0].t.data_type, str(n.attribute[0].t.data_type))
    return out


def _operand(node) -> str:
    """The tensor whose type the list's "Supported Types" names: the data input (the output for a source)."""
    return node.input[0] if node.input and node.input[0] else node.output[0]


def opset_problem(model, tensorrt_major: int) -> str | None:
    """Why `model`'s opset is outside the range TensorRT `tensorrt_major`.x documents, or None. (A later 10.x parser
    may take more than the 10.1 page says: the build warns, the parser decides.)"""
    low, high = OPSETS.get(tensorrt_major, OPSETS[max(OPSETS)])
    version = opset(model)
    if low <= version <= high:
        return None
    return f"opset {version} is outside {low}..{high}, the range documented for TensorRT {tensorrt_major}.x"


def graph_problems(model) -> list[str]:
    """What TensorRT's documented ONNX support (`SUPPORTED`) does not cover in `model` (an onnx.ModelProto), and
    inputs or outputs without a static shape; empty when nothing."""
    problems = []
    types = tensor_types(model)
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"node {n.name!r}: operator {n.domain}.{n.op_type} is not an ONNX operator (a plugin)")
        elif n.op_type not in SUPPORTED:
            problems.append(f"node {n.name!r}: operator {n.op_type} is not in TensorRT's supported list ({SOURCE})")
        elif (t := types.get(_operand(n))) is None:
            problems.append(f"node {n.name!r} ({n.op_type}): tensor {_operand(n)!r} has no type")
        elif t not in SUPPORTED[n.op_type]:
            problems.append(f"node {n.name!r}: {n.op_type} on {t} (TensorRT's list has {sorted(SUPPORTED[n.op_type])})")
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if not dims or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            problems.append(f"{v.name!r} has no static shape ({[d.dim_value or d.dim_param for d in dims]}); the "
                            "engines are built for static shapes: export with a fixed --batch")
    return problems


def compute_types(model) -> dict[str, Counter]:
    """op type -> Counter of the type names its nodes compute in (their data operand's type)."""
    types, out = tensor_types(model), {}
    for n in model.graph.node:
        out.setdefault(n.op_type, Counter())[types.get(_operand(n), "untyped")] += 1
    return out


def precision_problems(model, dtype: str) -> list[str]:
    """Where a strongly typed build of `model` would not compute as an export in `dtype` ("float32", "float16",
    "bfloat16") should: float32 graphs hold no half or double tensor; half-precision graphs run every Conv /
    ConvTranspose and at least half the Gemm / MatMul nodes in that half type (the time embedding's Gemms and the
    attention logits' MatMuls are float32 by design, `export.graphs`), every Softmax and normalisation in float32, and
    nothing in the other half type or double. Inputs and outputs are float32 either way (the backend binds
    float32 buffers). The tokens graph is float32 in every export: check it with dtype "float32"."""
    problems, ops = [], compute_types(model)
    types = set(tensor_types(model).values())
    half = HALF.get(dtype)
    other = ({"FP16", "BF16"} - {half}) | {"DOUBLE"}
    if types & other:
        problems.append(f"a {dtype} graph holds {sorted(types & other)} tensors: a strongly typed build would compute "
                        "those parts in that type")
    if half is not None:
        for op in HEAVY:
            wrong = {t: n for t, n in ops.get(op, Counter()).items() if t != half}
            if wrong:
                problems.append(f"{op} computes in {wrong}, not all in {half}")
        for op in MIXED:
            counts = ops.get(op, Counter())
            if counts.get(half, 0) < counts.get("FP32", 0):
                problems.append(f"{op} computes in {dict(counts)}: fewer in {half} than in FP32")
        for op in FLOAT32_OPS:
            wrong = {t: n for t, n in ops.get(op, Counter()).items() if t != "FP32"}
            if wrong:
                problems.append(f"{op} computes in {wrong}: softmax and normalisation stay float32")
    for v in [*model.graph.input, *model.graph.output]:
        t = TYPES.get(v.type.tensor_type.elem_type)
        if t != "FP32":
            problems.append(f"graph {'input' if v in model.graph.input else 'output'} {v.name!r} is {t}, not FP32")
    return problems
