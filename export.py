"""A trained student as an ONNX model (`python run.py export`), for deploy.py to run
with onnxruntime and no PyTorch.

The graph is written here, node by node, from DistilRNN's trained weights, with
ONNX's own recurrent operators (RNN, GRU, LSTM): they take each sentence's length
(sequence_lens), so a batch is padded, not packed, and a sentence's states, its
reverse direction included, never read a pad, as packing guarantees in torch
(whose packed sequences torch.onnx does not export). Batch size and length stay
free. Pooling masks the pads (-inf for max, 0 for the mean's sum), as
DistilRNN.forward does. onnx and onnxruntime are imported where used: run.py
imports this file for every mode.

--quantize int8 stores every matrix in int8, one scale per row: the embedding
tables are gathered in int8 and scaled per token (the table is most of the bytes),
the recurrent weights are scaled back once when onnxruntime loads the graph (its
constant folding) and multiply in float32, and the head's products go through
onnxruntime's dynamic quantization (int8 weights, activations quantized on the fly).
"""
import logging
import os
import shutil
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

import deploy
from checkpoints import CheckpointError, HFTokens, find_adapter_dir, load_student
from train_utils import accuracy, confusion, mcc_from_confusion
from utils import EOT_TOKEN, GPT2_TOKENS, UserError, atomic_dir, bpe_files, save_json, sha256_of_file

OPSET = 17
QUANTIZE = ("int8",)
LABELS = ["unacceptable", "acceptable"]  # CoLA's labels 0 and 1

# torch's gate order -> ONNX's, as row blocks of the stacked weights (GRU: r z n -> z r h;
# LSTM: i f g o -> i o f c)
GATE_ORDER = {"rnn": [0], "gru": [1, 0, 2], "lstm": [0, 3, 1, 2]}


class GraphBuilder:
    """Nodes and initializers of one ONNX graph, each node named after its place."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def const(self, name, array):
        from onnx import numpy_helper
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, outputs=1, **attributes):
        from onnx import helper
        name = f"{op_type}_{len(self.nodes)}"
        names = [f"{name}_out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attributes))
        return names[0] if len(names) == 1 else names


def int8_rows(matrix, scale_dtype=np.float32):
    """(int8 matrix, scale per row in scale_dtype): symmetric, a row's largest |value|
    at 127, the values rounded against the scale as stored."""
    scale = (np.abs(matrix).max(axis=-1, keepdims=True) / 127).astype(scale_dtype)
    scale[scale == 0] = 1.0
    values = np.clip(np.round(matrix / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return values, scale


def weight(graph, name, matrix, quantize):
    """A constant matrix; in int8 (one scale per row along its last axis) scaled back
    to float32 by a constant subgraph that onnxruntime folds once, at load."""
    from onnx import TensorProto
    if not quantize:
        return graph.const(name, matrix)
    values, scale = int8_rows(matrix)
    return graph.op("Mul", [graph.op("Cast", [graph.const(f"{name}.int8", values)], to=TensorProto.FLOAT),
                            graph.const(f"{name}.scale", scale)])


def lookup(graph, name, table, input_ids, quantize):
    """The rows of an embedding table for input_ids; in int8, each gathered row
    scaled by its own token's scale, so the float32 table never exists. The scales
    are float16: a 384-wide row then costs 386 bytes, not 1,536."""
    from onnx import TensorProto
    if not quantize:
        return graph.op("Gather", [graph.const(name, table), input_ids])
    values, scale = int8_rows(table, np.float16)
    rows = graph.op("Cast", [graph.op("Gather", [graph.const(f"{name}.int8", values), input_ids])],
                    to=TensorProto.FLOAT)
    scales = graph.op("Gather", [graph.const(f"{name}.scale", scale), input_ids])
    return graph.op("Mul", [rows, graph.op("Cast", [scales], to=TensorProto.FLOAT)])


def recurrent_weights(state, rnn_type, layer, directions, hidden):
    """W, R, B of ONNX's RNN/GRU/LSTM for one layer, from torch's weight_ih_l{k},
    weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k} (and _reverse for the backward
    direction): the gates reordered, the directions stacked first."""
    order = GATE_ORDER[rnn_type]

    def gates(tensor):
        blocks = np.split(tensor, len(order), axis=0)
        return np.concatenate([blocks[i] for i in order], axis=0)

    suffixes = ["", "_reverse"][:directions]
    w = np.stack([gates(state[f"rnn.weight_ih_l{layer}{s}"]) for s in suffixes])
    r = np.stack([gates(state[f"rnn.weight_hh_l{layer}{s}"]) for s in suffixes])
    b = np.stack([np.concatenate([gates(state[f"rnn.bias_ih_l{layer}{s}"]), gates(state[f"rnn.bias_hh_l{layer}{s}"])])
                  for s in suffixes])
    assert w.shape[1] == len(order) * hidden
    return w, r, b


def pooled(graph, x, lengths, pool):
    """max or mean over the real tokens of x (tokens, batch, width): the pads masked
    with what the pooling ignores, -inf for max, 0 for the sum."""
    from onnx import TensorProto
    axes = [graph.const(f"axis{axis}", np.array([axis], dtype=np.int64)) for axis in range(3)]
    tokens = graph.op("Squeeze", [graph.op("Shape", [x], start=0, end=1)])
    steps = graph.op("Range", [graph.const("zero", np.array(0, dtype=np.int64)), tokens,
                               graph.const("one", np.array(1, dtype=np.int64))])
    real = graph.op("Less", [graph.op("Unsqueeze", [steps, axes[1]]), graph.op("Unsqueeze", [lengths, axes[0]])])
    real = graph.op("Unsqueeze", [real, axes[2]])  # (tokens, batch, 1)
    pad = graph.const("pad_value", np.array(-np.inf if pool == "max" else 0.0, dtype=np.float32))
    masked = graph.op("Where", [real, x, pad])
    if pool == "max":
        return graph.op("ReduceMax", [masked], axes=[0], keepdims=0)
    total = graph.op("ReduceSum", [masked, axes[0]], keepdims=0)
    return graph.op("Div", [total, graph.op("Unsqueeze", [graph.op("Cast", [lengths], to=TensorProto.FLOAT), axes[1]])])


def linear(graph, name, features, state, output=None):
    """features @ weight^T + bias of the nn.Linear called name, as MatMul and Add (the
    MatMul is what onnxruntime's dynamic quantization takes)."""
    product = graph.op("MatMul", [features, graph.const(f"{name}.w", state[f"{name}.weight"].T)])
    return graph.op("Add", [product, graph.const(f"{name}.b", state[f"{name}.bias"])], [output] if output else 1)


def student_graph(student, quantize=None):
    """The ONNX model of a DistilRNN in eval mode: inputs input_ids (batch, tokens)
    and lengths (batch,), int64, right-padded; output logits (batch, classes)."""
    from onnx import TensorProto, helper
    cfg = student.config
    state = {name: t.detach().float().cpu().numpy() for name, t in student.state_dict().items()}
    graph = GraphBuilder()
    input_ids, lengths = "input_ids", "lengths"
    embedded = lookup(graph, "embedding", state["embedding.weight"], input_ids, quantize)
    if student.static_embedding is not None:  # the frozen channel first, as DistilRNN.embed
        static = lookup(graph, "static_embedding", state["static_embedding.weight"], input_ids, quantize)
        embedded = graph.op("Concat", [static, embedded], axis=-1)
    x = graph.op("Transpose", [embedded], perm=[1, 0, 2])  # (tokens, batch, width): ONNX's time-major layout
    sequence_lens = graph.op("Cast", [lengths], to=TensorProto.INT32)
    directions = 2 if cfg.bidirectional else 1
    op_type = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}[cfg.rnn_type]
    attributes = {"hidden_size": cfg.hidden, "direction": "bidirectional" if cfg.bidirectional else "forward"}
    if cfg.rnn_type == "rnn":
        attributes["activations"] = ["Relu"] * directions  # DistilRNN's RNN is nn.RNN(nonlinearity="relu")
    if cfg.rnn_type == "gru":
        attributes["linear_before_reset"] = 1  # torch's GRU: r * (W_hn h + b_hn)
    shape_keep_last = graph.const("shape_keep_2_merge_rest", np.array([0, 0, -1], dtype=np.int64))
    for layer in range(cfg.n_layers):
        w, r, b = recurrent_weights(state, cfg.rnn_type, layer, directions, cfg.hidden)
        outputs = [f"layer{layer}_y", f"layer{layer}_h"] + ([f"layer{layer}_c"] if cfg.rnn_type == "lstm" else [])
        graph.op(op_type, [x, weight(graph, f"rnn.w{layer}", w, quantize), weight(graph, f"rnn.r{layer}", r, quantize),
                           graph.const(f"rnn.b{layer}", b), sequence_lens], outputs, **attributes)
        # Y: (tokens, directions, batch, hidden) -> (tokens, batch, directions * hidden), forward first
        x = graph.op("Reshape", [graph.op("Transpose", [outputs[0]], perm=[0, 2, 1, 3]), shape_keep_last])
    if cfg.pool == "last":
        # Y_h (directions, batch, hidden): forward after the last real token, backward after the first
        features = graph.op("Reshape", [graph.op("Transpose", [outputs[1]], perm=[1, 0, 2]),
                                        graph.const("shape_keep_1_merge_rest", np.array([0, -1], dtype=np.int64))])
    else:
        features = pooled(graph, x, lengths, cfg.pool)
    if student.mlp is not None:
        features = graph.op("Relu", [linear(graph, "mlp", features, state)])
    linear(graph, "classifier", features, state, output="logits")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
              helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.n_classes])
    model = helper.make_model(helper.make_graph(graph.nodes, "DistilRNN", inputs, [output], graph.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gpt2-lora-distil")
    model.ir_version = 8  # what onnxruntime reads at opset 17
    return model


def write_model(model, path, quantize):
    """student.onnx; int8: the head's MatMuls through onnxruntime's dynamic quantization."""
    import onnx
    onnx.checker.check_model(model)
    if not quantize:
        onnx.save(model, path)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # its advice to pre-process the graph is for transformers
    try:
        quantize_dynamic(model, path, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    finally:
        logger.setLevel(level)


def tokenizer_files(tokenizer, directory):
    """The tokenizer's files, written into directory; returns export.json's entry."""
    if tokenizer is GPT2_TOKENS:
        for path in bpe_files():
            shutil.copyfile(path, os.path.join(directory, os.path.basename(path)))
        return {"kind": "gpt2-bpe", "files": ["encoder.json", "vocab.bpe"],
                "special_tokens": {"<|endoftext|>": EOT_TOKEN}, "vocab_size": tokenizer.vocab_size}
    assert isinstance(tokenizer, HFTokens)
    backend = getattr(tokenizer.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("the student's tokenizer has no fast (tokenizers) form, which deploy.py reads; "
                        "export takes students on GPT-2's tokenizer or on a fast Hugging Face tokenizer")
    backend.save(os.path.join(directory, "tokenizer.json"))
    return {"kind": "tokenizers", "file": "tokenizer.json", "files": ["tokenizer.json"]}


def check_out(out, overwrite):
    """--out: new or an empty directory, or an export to replace with --overwrite
    (never another directory)."""
    if not os.path.lexists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or another --out")
    if not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; pass a directory for the export")
    if os.listdir(out) and not deploy.is_export(out):
        raise UserError(f"--out {out} holds files but no export; --overwrite replaces only an export: "
                        "pass another --out")


def export_student(checkpoint, out, quantize=None, overwrite=False):
    """Write checkpoint's student into out as student.onnx, its tokenizer's files and
    export.json, built beside out and renamed in. Returns export.json's contents."""
    if quantize not in (None, *QUANTIZE):
        raise UserError(f"--quantize {quantize}: choose {', '.join(QUANTIZE)}")
    if os.path.isdir(checkpoint) and find_adapter_dir(checkpoint) is not None:
        raise UserError(f"{checkpoint} is a LoRA run: export writes rnn/distil students only; classify with "
                        f"the LoRA run through python run.py predict --checkpoint {checkpoint}")
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist" if not os.path.exists(checkpoint)
                              else f"--checkpoint {checkpoint} is a file; pass the run's directory (its --out-dir)")
    if not os.path.isfile(os.path.join(checkpoint, "student.json")):
        raise CheckpointError(f"{checkpoint} holds no student (student.json of an rnn/distil run) to export")
    check_out(out, overwrite)
    student, tokenizer = load_student(checkpoint)
    settings = {}

    def write(tmp):
        write_model(student_graph(student, quantize), os.path.join(tmp, deploy.MODEL_FILE), quantize)
        tokenizer_entry = tokenizer_files(tokenizer, tmp)
        names = [deploy.MODEL_FILE, *tokenizer_entry["files"]]
        settings.update({"format": deploy.FORMAT, "labels": LABELS, "pad_id": tokenizer.pad_id,
                         "unk_id": getattr(tokenizer, "unk_id", tokenizer.pad_id), "tokenizer": tokenizer_entry,
                         "checkpoint": os.path.abspath(checkpoint),
                         "checkpoint_sha256": sha256_of_file(os.path.join(checkpoint, "student.safetensors")),
                         "opset": OPSET, "quantized": quantize, "student": asdict(student.config),
                         "files": {name: sha256_of_file(os.path.join(tmp, name)) for name in names}})
        save_json(os.path.join(tmp, deploy.EXPORT_FILE), settings)
    atomic_dir(out, write)
    return settings


def evaluate_export(directory, val, batch_size=64):
    """An export's loss, accuracy, MCC and confusion on a split, as train_utils.evaluate
    gives them for a model; returns (result, description)."""
    student = deploy.load(directory)
    logits = torch.from_numpy(student.logits(val.sentences, batch_size))
    labels = torch.tensor(val.labels, dtype=torch.long)
    predictions = logits.argmax(-1)
    matrix = confusion(predictions, labels)
    loss = float(F.cross_entropy(logits, labels)) if len(labels) else 0.0
    result = {"loss": loss, "acc": accuracy(predictions, labels), "mcc": mcc_from_confusion(matrix),
              "confusion": matrix, "n": len(labels), "logits": logits}
    return result, student.description


def describe(settings, out):
    size = os.path.getsize(os.path.join(out, deploy.MODEL_FILE)) / 2 ** 20
    return f"wrote {out}: {deploy.MODEL_FILE} ({size:.1f} MB, {settings['quantized'] or 'float32'}, opset {OPSET})"


if __name__ == "__main__":
    raise SystemExit("export.py is run through run.py: python run.py export --checkpoint RUN --out DIR")
