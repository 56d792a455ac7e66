"""What a CPU can check of the GPU path: bf16 results within bf16's own error of
float32's (under CPU autocast, the same casts CUDA's autocast makes), a training
epoch that reads nothing back from the device per step, padded length buckets that
change no logit, --compile building a bounded number of graphs, and the precision
recorded for what ran."""
import json
import os
import re

import pytest
import torch

import train_utils
from cola import STUDENT, cli, common, subset_dir
from conftest import TINY
from model import GPT, DistilRNN, GPTClassifier, GPTConfig, RNNConfig, add_lora, set_trainable
from train_utils import EpochWatch, Loop, TrainConfig, autocast_for, fit, infer, make_training, train_epoch
from utils import Split, TokenizedSplit

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CPU = torch.device("cpu")
SENTENCES = ["The cat sat on the mat.", "Mat the on sat cat the.", "John seems to be happy.",
             "Who do you think that left?", "The more you eat, the fatter you get.",
             "A sentence that is a good deal longer than all of the others, so that its batch pads further."]

# bf16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 relative.
# Under autocast a product rounds both its inputs (<= 2u) and sums in float32, so a
# logit that went through P products in a row is off by about 2 * P * u of its scale
# (the errors of the terms partly cancel; this bounds their sum). A GPT-2 block has two
# products on the residual path (attention, MLP), plus the head: P = 2 * layers + 1.
BF16_U = 2.0 ** -8


def bf16_bound(scale, products):
    return 2 * products * BF16_U * scale


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=TINY["n_positions"], n_layer=TINY["n_layer"], n_head=TINY["n_head"],
                        n_embd=TINY["n_embd"]))
    classifier = set_trainable(GPTClassifier(add_lora(gpt, rank=4, alpha=8)))
    torch.nn.init.normal_(classifier.score.weight, std=0.5)  # logits spread out, as after training
    return classifier


def split_of(sentences, labels=None):
    labels = labels or [i % 2 for i in range(len(sentences))]
    return TokenizedSplit(Split(list(sentences), labels, "test"))


# ---------------------------------------------------------------------------
# bf16 paths: within bf16's error of float32, and really computed in bf16
# ---------------------------------------------------------------------------

def test_bf16_classifier_logits_within_bf16_error_of_float32():
    classifier = tiny_classifier().eval()
    batches = split_of(SENTENCES * 3).batches(4)
    exact = infer(classifier, batches, CPU, "float32")[0]
    bf16 = infer(classifier, batches, CPU, "bfloat16")[0]
    bound = bf16_bound(exact.abs().max(), products=2 * TINY["n_layer"] + 1)
    assert (bf16 - exact).abs().max() <= bound
    assert not torch.equal(bf16, exact)  # autocast did cast: this is not float32 again


def test_bf16_predict_tracks_peft_within_bf16_error(tmp_path, tmp_path_factory, tiny_ckpt, capsys):
    """predict --dtype bfloat16 against peft's float32 probabilities: a probability moves
    by at most a quarter of its logits' difference, itself off by twice a logit's bound."""
    import peft
    from transformers import GPT2ForSequenceClassification

    from cola import lora_subset_run
    from utils import encode
    out = lora_subset_run(tmp_path_factory, tiny_ckpt.path)
    printed = {}
    for dtype in ("float32", "bfloat16"):
        code, stdout, err = cli(capsys, "predict", "--checkpoint", out, "--dtype", dtype, *SENTENCES)
        assert code == 0, err
        printed[dtype] = torch.tensor([float(line.split("\t")[1]) for line in stdout.splitlines()])
    hf = GPT2ForSequenceClassification.from_pretrained(tiny_ckpt.path, num_labels=2, pad_token_id=50256)
    model = peft.PeftModel.from_pretrained(hf, os.path.join(out, "adapter")).eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([encode(s)])).logits for s in SENTENCES])
    reference = logits.softmax(-1)[:, 1]
    assert (printed["float32"] - reference).abs().max() < 1e-4  # 4 printed decimals
    bound = 2 * bf16_bound(logits.abs().max(), products=2 * TINY["n_layer"] + 1) / 4 + 1e-4
    assert (printed["bfloat16"] - reference).abs().max() <= bound


def test_bf16_hf_teacher_within_bf16_error_of_float32(tmp_path):
    """The teacher labels in the run's precision: a tiny BERT (2 layers; each has the
    attention's q/k/v, output and two MLP products, of which three lie on one path)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from distil import HFTeacher
    words = sorted({w.strip(".,?").lower() for s in SENTENCES for w in s.split()})
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}) \
        .save_pretrained(tmp_path)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    teacher = HFTeacher(str(tmp_path))
    exact = teacher.logits(SENTENCES, CPU, "float32")
    bf16 = teacher.logits(SENTENCES, CPU, "bfloat16")
    assert (bf16 - exact).abs().max() <= bf16_bound(exact.abs().max(), products=3 * 2 + 2)  # + pooler, head
    assert not torch.equal(bf16, exact)


# ---------------------------------------------------------------------------
# A training epoch reads nothing back from the device per step
# ---------------------------------------------------------------------------

def test_train_epoch_reads_the_device_once_not_per_step(monkeypatch):
    """Every .item(), .cpu() and float() of a tensor waits for the GPU: the loop makes
    a fixed number of them, however many steps, with the progress bar off; with it on,
    one per show_loss_every steps."""
    from tqdm import tqdm
    classifier = tiny_classifier()
    split = split_of(SENTENCES * 8)
    batches = split.batches(2, shuffle=True, generator=torch.Generator().manual_seed(0))
    reads = []
    for name in ("item", "cpu", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            (reads.append(_name), _real(self, *a, **k))[1])

    def epoch(bar=None, **kwargs):
        training = make_training(classifier, TrainConfig(epochs=1, batch_size=2), len(batches))
        reads.clear()
        loss, predictions, labels = train_epoch(classifier, batches, training, CPU, watch=EpochWatch(bar, **kwargs))
        return loss, predictions, labels, list(reads)

    loss, predictions, labels, quiet = epoch()
    assert len(batches) == 24 and len(quiet) <= 3, quiet  # the end of the epoch only
    assert len(predictions) == len(labels) == len(split) and 0 < loss < 10
    with tqdm(total=len(batches), disable=False, file=open(os.devnull, "w")) as bar:
        shown = epoch(bar, show_loss_every=6)[3]
    assert shown.count("item") == len(batches) // 6


def test_epoch_accounting_equals_the_per_step_sum():
    """The loss piled up on the device is the mean over the epoch's sentences."""
    classifier = tiny_classifier()
    split = split_of(SENTENCES * 3)
    batches = split.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0))
    training = make_training(classifier, TrainConfig(epochs=1, lr=0.0), len(batches))
    torch.manual_seed(0)
    loss, _, _ = train_epoch(classifier, batches, training, CPU, grad_clip=0)
    with torch.no_grad():  # lr 0: the weights never moved, so the same losses again, one by one
        classifier.train()
        per_step = [float(torch.nn.functional.cross_entropy(classifier(b.idx, b.lengths), b.labels)) * len(b.labels)
                    for b in batches]
    assert loss == pytest.approx(sum(per_step) / len(split), rel=1e-6)


# ---------------------------------------------------------------------------
# Padded length buckets
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: tiny_classifier(),
    lambda: DistilRNN(RNNConfig(n_embd=16, hidden=24)),
    lambda: DistilRNN(RNNConfig(n_embd=16, hidden=24, rnn_type="lstm", bidirectional=True)),
], ids=["gpt2+lora", "rnn", "bilstm"])
def test_padded_buckets_give_the_same_logits(make):
    torch.manual_seed(0)
    model = make().eval()
    split = split_of(SENTENCES * 2)
    plain = split.batches(3)
    padded = split.batches(3, pad_to=16)
    assert all(b.idx.shape[1] % 16 == 0 for b in padded)
    assert any(p.idx.shape[1] > b.idx.shape[1] for p, b in zip(padded, plain))
    torch.testing.assert_close(infer(model, padded, CPU)[0], infer(model, plain, CPU)[0], atol=1e-6, rtol=1e-5)


def test_padding_never_exceeds_the_models_context():
    split = TokenizedSplit(Split(["word " * 40], [1], "test"), max_len=20)
    assert split.make_batch([0], pad_to=16).idx.shape == (1, 20)


# ---------------------------------------------------------------------------
# --compile: a few graphs, not one per length
# ---------------------------------------------------------------------------

def eager_compile(monkeypatch):
    """torch.compile with the eager backend: dynamo traces and counts graphs as with
    inductor, without its minutes of compiling."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real(model, backend="eager",
                                                                       dynamic=kwargs.get("dynamic"),
                                                                       fullgraph=kwargs.get("fullgraph", False)))


def test_compile_builds_one_graph_per_padded_shape(monkeypatch):
    from torch._dynamo.utils import counters
    import torch._dynamo
    eager_compile(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    sentences = [" ".join(["word"] * n) + "." for n in range(1, 41)]  # 40 lengths
    split = split_of(sentences * 2)
    classifier = tiny_classifier()
    cfg = TrainConfig(epochs=2, batch_size=8)
    fit(classifier, (split, split), cfg, CPU, loop=Loop(progress=False, compile=True))
    generator = torch.Generator().manual_seed(cfg.seed)  # fit's batches, epoch after epoch
    shapes = {tuple(b.idx.shape) for _ in range(cfg.epochs)
              for b in split.batches(8, shuffle=True, generator=generator, pad_to=16)}
    assert counters["stats"]["unique_graphs"] == len(shapes)  # one graph per padded shape, no recompiles
    assert len(shapes) <= 3 < len({len(t) for t in split.tokens})  # widths 16, 32, 48 against ~40 lengths


def test_compile_on_cpu_says_in_one_line_that_it_may_not_pay(tmp_path, tmp_path_factory, capsys, monkeypatch):
    eager_compile(monkeypatch)
    code, _, err = cli(capsys, "rnn", *STUDENT, "--epochs", "1", "--data-dir", subset_dir(tmp_path_factory),
                       "--out-dir", tmp_path / "run", "--compile", *common(tmp_path))
    assert code == 0, err
    lines = err.splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("note: --compile")]
    assert len(notes) == 1 and "CPU" in lines[notes[0]]
    assert notes[0] < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))


# ---------------------------------------------------------------------------
# The precision recorded is the precision that ran
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,recorded", [("float32", "float32"), ("tf32", "float32"),
                                            ("bfloat16", "bf16-autocast")])
def test_metrics_record_the_precision_that_ran(dtype, recorded, tmp_path, tmp_path_factory, capsys):
    """tf32 is a CUDA mode: on a CPU it runs, and is recorded, as float32."""
    code, _, err = cli(capsys, "rnn", *STUDENT, "--epochs", "1", "--data-dir", subset_dir(tmp_path_factory),
                       "--out-dir", tmp_path / "run", "--dtype", dtype, *common(tmp_path))
    assert code == 0, err
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["environment"]["precision"] == recorded and metrics["args"]["dtype"] == dtype


@pytest.mark.parametrize("amx", [False, True])
def test_auto_precision_follows_the_measured_rule(amx, monkeypatch):
    """auto picks, per device and kind of work, one of the explicit precisions, and
    the name recorded is that precision's (docs/benchmarks.md has the measurements)."""
    monkeypatch.setattr(train_utils, "has_amx", lambda: amx)
    cuda = torch.device("cuda")
    picks = {(device.type, bound): train_utils.resolve_precision(device, "auto", bound)
             for device in (CPU, cuda) for bound in (True, False)}
    assert picks[("cpu", True)] == ("bfloat16" if amx else "float32")  # batched work on a CPU
    assert picks[("cpu", False)] == "float32"  # gen on any CPU
    assert picks[("cuda", True)] == "tf32" and picks[("cuda", False)] == "bfloat16"
    for (kind, bound), precision in picks.items():  # an explicit --dtype of auto's pick is the same run
        device = torch.device(kind)
        assert train_utils.precision_of(device, "auto", bound) == train_utils.precision_of(device, precision, bound)
        assert train_utils.resolve_precision(device, precision, bound) == precision


# ---------------------------------------------------------------------------
# Precision switches: one API that every reader accepts, set on every pass
# ---------------------------------------------------------------------------

def tf32_state():
    """Every reading of the TF32 switches, legacy and per-backend (all must succeed)."""
    b = torch.backends
    return {"matmul precision": torch.get_float32_matmul_precision(), "matmul allow_tf32": b.cuda.matmul.allow_tf32,
            "cudnn allow_tf32": b.cudnn.allow_tf32, "matmul fp32": b.cuda.matmul.fp32_precision,
            "cudnn rnn fp32": b.cudnn.rnn.fp32_precision, "cudnn conv fp32": b.cudnn.conv.fp32_precision}


def test_a_tf32_pass_leaves_every_precision_reader_working():
    """torch's compiler reads torch.get_float32_matmul_precision(); setting the
    per-backend fp32_precision alone makes that raise ("mix of the legacy and new APIs")."""
    before = tf32_state()
    with train_utils.tf32_products("tf32"):
        inside = tf32_state()
    assert inside["matmul precision"] == "high" and inside["matmul allow_tf32"] and inside["cudnn allow_tf32"]
    assert inside["matmul fp32"] == inside["cudnn rnn fp32"] == inside["cudnn conv fp32"] == "tf32"
    assert tf32_state() == before


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_every_other_pass_is_ieee_float32_whatever_torchs_defaults(precision):
    """torch lets cuDNN (its RNNs included) use TF32 by default: float32 must not."""
    torch.backends.cudnn.allow_tf32 = True  # torch's default, set again in case a test changed it
    with train_utils.tf32_products(precision):
        inside = tf32_state()
    assert inside["matmul precision"] == "highest" and not inside["matmul allow_tf32"]
    assert not inside["cudnn allow_tf32"] and "tf32" not in (inside["cudnn rnn fp32"], inside["cudnn conv fp32"])
    assert torch.backends.cudnn.allow_tf32  # restored


def test_inductor_compiles_inside_a_tf32_pass():
    """The default backend (inductor) reads the legacy matmul precision when it
    chooses among matrix-product kernels (select_algorithm): on a CPU, under
    max_autotune with its C++ GEMM template, which needs frozen weights."""
    import torch._dynamo
    import torch._inductor.config as inductor
    torch._dynamo.reset()
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(32, 32).eval(), torch.randn(32, 32)
    with inductor.patch(max_autotune=True, freezing=True, max_autotune_gemm_backends="CPP,ATEN"), \
            train_utils.tf32_products("tf32"), torch.no_grad():
        compiled = torch.compile(linear, dynamic=False)(x)
        torch.testing.assert_close(compiled, linear(x))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# The student's RNN computes in the precision that the run records
# ---------------------------------------------------------------------------

def rnn_handed(rnn_type, precision, train):
    """(autocast on inside the RNN, dtype of the RNN's input, dtype of its output)
    for a forward of a tiny student in precision on the CPU."""
    torch.manual_seed(0)
    model = DistilRNN(RNNConfig(vocab_size=60, n_embd=8, hidden=12, rnn_type=rnn_type))
    model.python_steps = False  # the kernel, so that the RNN module's own hook sees it
    seen = []
    model.rnn.register_forward_hook(lambda module, inputs, output: seen.append(
        (torch.is_autocast_enabled("cpu"), inputs[0].data.dtype, output[0].data.dtype)))
    model.train(train)
    idx, lengths = torch.randint(0, 60, (3, 7)), torch.tensor([7, 4, 2])
    with torch.set_grad_enabled(train), autocast_for(CPU, precision):
        model(idx, lengths, lengths)
    return seen[0], model.rnn_runs_in("cpu", precision)


@pytest.mark.parametrize("rnn_type", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_rnn_is_handed_what_its_recorded_precision_says(rnn_type, precision, train):
    (autocast_on, input_dtype, output_dtype), runs_in = rnn_handed(rnn_type, precision, train)
    expected = torch.bfloat16 if runs_in == "bfloat16" else torch.float32
    assert output_dtype == expected and autocast_on == (runs_in == "bfloat16")
    assert input_dtype in (torch.float32, expected) and torch.float16 not in (input_dtype, output_dtype)


def test_on_cuda_under_bf16_every_rnn_runs_in_float32_outside_autocast():
    """CUDA's autocast casts cuDNN's RNNs to float16, not to the autocast dtype."""
    for rnn_type in ("rnn", "gru", "lstm"):
        model = DistilRNN(RNNConfig(vocab_size=10, n_embd=4, hidden=4, rnn_type=rnn_type))
        assert model.rnn_runs_in("cuda", "bfloat16") == "float32"
        assert model.rnn_runs_in("cuda", "tf32") == "tf32" and model.rnn_runs_in("cuda", "float32") == "float32"


@pytest.mark.parametrize("rnn_type,recorded", [("rnn", "bf16-autocast"), ("gru", "float32")])
def test_metrics_record_what_the_rnn_ran_in(rnn_type, recorded, tmp_path, tmp_path_factory, capsys):
    code, _, err = cli(capsys, "rnn", *STUDENT, "--epochs", "1", "--rnn-type", rnn_type, "--dtype", "bfloat16",
                       "--data-dir", subset_dir(tmp_path_factory), "--out-dir", tmp_path / "run", *common(tmp_path))
    assert code == 0, err
    with open(tmp_path / "run" / "metrics.json") as f:
        environment = json.load(f)["environment"]
    assert environment["precision"] == "bf16-autocast"
    assert environment["precision_parts"] == {"model": "bf16-autocast", "rnn": recorded}


# ---------------------------------------------------------------------------
# No host sync in a student's step either
# ---------------------------------------------------------------------------

def count_reads(monkeypatch):
    """Every .item(), .cpu(), .tolist(), float(), int() and bool() of a tensor, by
    name: each waits for the GPU when the tensor lives there. A packed sequence's
    batch_sizes are exempt: torch keeps them on the host whatever the device
    (nn.RNN reads them), so reading them waits for nothing."""
    import rnn_steps
    host = set()  # storages of every batch_sizes tensor that packing made
    real_pack = rnn_steps.pack
    monkeypatch.setattr(rnn_steps, "pack", lambda *a: (lambda p: (
        host.add(p.batch_sizes.untyped_storage().data_ptr()), p)[1])(real_pack(*a)))
    reads = []
    for name in ("item", "cpu", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (
            None if self.untyped_storage().data_ptr() in host else reads.append(_name), _real(self, *a, **k))[1])
    return reads


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_a_student_epoch_reads_the_device_once_not_per_step(pool, monkeypatch):
    """The kernel's path (the one CUDA takes): packing is planned from the lengths
    kept on the host, so nothing is read back per step."""
    torch.manual_seed(0)
    student = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=12, pool=pool))
    student.python_steps = False
    batches = split_of(SENTENCES * 8).batches(2, shuffle=True, generator=torch.Generator().manual_seed(0))
    training = make_training(student, TrainConfig(epochs=1, batch_size=2), len(batches))
    reads = count_reads(monkeypatch)
    train_epoch(student, batches, training, CPU)
    assert len(batches) == 24 and len(reads) <= 3, reads


def test_packing_on_the_host_is_torchs_packing():
    from rnn_steps import pack
    x, lengths = torch.randn(4, 6, 3), torch.tensor([2, 6, 1, 4])
    ours = pack(x, lengths, lengths)
    theirs = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_a_batch_on_the_device_keeps_its_lengths_on_the_host():
    batch = split_of(SENTENCES).batches(3)[0]
    moved = batch.to(CPU)
    assert moved.host_lengths.device.type == "cpu" and torch.equal(moved.host_lengths, batch.lengths)
    assert moved.to(CPU).host_lengths is moved.host_lengths


# ---------------------------------------------------------------------------
# --compile compiles the student, in one graph per batch shape
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [dict(), dict(rnn_type="gru", pool="max"), dict(rnn_type="lstm", bidirectional=True,
                                                                                  pool="mean")],
                         ids=["rnn", "gru-max", "bilstm-mean"])
def test_the_student_compiles_in_one_graph_with_eager_numbers(shape):
    """fullgraph: a break (nn.RNN's packing) is an error here, not a silent fall-back."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=12, **shape))
    compiled = torch.compile(student, backend="eager", fullgraph=True, dynamic=False)
    batch = split_of(SENTENCES).batches(6, pad_to=16)[0]
    eager = student(batch.idx, batch.lengths)
    with train_utils.compile_limits():
        traced = compiled(batch.idx, batch.lengths)
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
    traced.sum().backward()
    assert all(p.grad is not None for p in student.rnn.parameters())


def test_compiled_student_builds_one_graph_per_padded_shape(monkeypatch):
    """Max pooling pads the outputs to the batch's width (total_length), not to the
    longest sentence: every length is no longer a graph of its own."""
    from torch._dynamo.utils import counters
    import torch._dynamo
    eager_compile(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    sentences = [" ".join(["word"] * n) + "." for n in range(1, 41)]
    split = split_of(sentences * 2)
    torch.manual_seed(0)
    student = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=12, pool="max"))
    fit(student, (split, split), TrainConfig(epochs=2, batch_size=8), CPU,
        loop=Loop(progress=False, compile=True))
    generator = torch.Generator().manual_seed(0)
    shapes = {tuple(b.idx.shape) for _ in range(2) for b in split.batches(8, shuffle=True, generator=generator,
                                                                          pad_to=16)}
    assert counters["stats"]["unique_graphs"] == len(shapes) <= 3


def test_past_the_graph_limit_compile_fails_in_one_line_not_silently(monkeypatch):
    import torch._dynamo
    eager_compile(monkeypatch)
    torch._dynamo.reset()
    monkeypatch.setattr(train_utils, "COMPILE_GRAPH_LIMIT", 1)
    sentences = [" ".join(["word"] * n) + "." for n in (2, 20, 40)]
    split = split_of(sentences * 4)
    student = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=12))
    with pytest.raises(train_utils.CompileError, match="more than 1 batch shapes"):
        fit(student, (split, split), TrainConfig(epochs=1, batch_size=4), CPU,
            loop=Loop(progress=False, compile=True))


def test_the_epoch_line_counts_the_shapes_the_model_received(monkeypatch, capsys):
    eager_compile(monkeypatch)
    import torch._dynamo
    torch._dynamo.reset()
    received = set()
    student = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=12))
    real_forward = DistilRNN.forward
    monkeypatch.setattr(DistilRNN, "forward", lambda self, idx, lengths, *a: (
        received.add(tuple(idx.shape)) if self.training else None, real_forward(self, idx, lengths, *a))[1])
    split = split_of([" ".join(["word"] * n) + "." for n in range(1, 30)])
    fit(student, (split, split), TrainConfig(epochs=1, batch_size=8), CPU,
        loop=Loop(progress=False, compile=True))
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1/1"))
    assert f"| {len(received)} compiled shapes so far" in line


# ---------------------------------------------------------------------------
# Bounded shapes under torchrun
# ---------------------------------------------------------------------------

def test_a_padded_batch_keeps_its_width_on_every_rank():
    split = split_of(SENTENCES)
    padded = split.batches(6, pad_to=16)[0]
    for rank in range(2):
        assert padded.shard(rank, 2).idx.shape[1] == padded.idx.shape[1]
    plain = split.batches(6)[0]  # unpadded: each rank's part trimmed to its own longest
    assert [plain.shard(r, 2).idx.shape[1] for r in range(2)] == [int(plain.lengths[:3].max()),
                                                                  int(plain.lengths[3:].max())]


RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import torch._dynamo
from torch._dynamo.utils import counters
real = torch.compile
torch.compile = lambda model, **kw: real(model, backend="eager", dynamic=kw.get("dynamic"),
                                         fullgraph=kw.get("fullgraph", False))
dist.init_process_group("gloo")
from model import DistilRNN, RNNConfig
from train_utils import Loop, TrainConfig, fit
from utils import Split, TokenizedSplit
sentences = [" ".join(["word"] * n) + "." for n in range(1, 41)] * 2
split = TokenizedSplit(Split(sentences, [i % 2 for i in range(len(sentences))], "test"))
torch.manual_seed(0)
student = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=12, pool="max"))
fit(student, (split, split), TrainConfig(epochs=2, batch_size=8), torch.device("cpu"),
    loop=Loop(progress=False, compile=True))
with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({{"graphs": counters["stats"]["unique_graphs"]}}, f)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_compile_no_more_graphs_than_padded_shapes(tmp_path):
    """Each rank's shard keeps the padded width: torch's own recompile log and graph
    count, and the epoch line's count, stay within the padded shapes."""
    import socket
    import subprocess
    import sys
    from conftest import PROJECT_ROOT
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=PROJECT_ROOT, out=str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "TORCH_LOGS": "recompiles"}) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in ranks]
    assert all(p.returncode == 0 for p in ranks), errs
    split = split_of([" ".join(["word"] * n) + "." for n in range(1, 41)] * 2)
    generator = torch.Generator().manual_seed(0)
    widths = {b.idx.shape[1] for _ in range(2) for b in split.batches(8, shuffle=True, generator=generator, pad_to=16)}
    for rank, err in enumerate(errs):
        graphs = json.loads((tmp_path / f"rank{rank}.json").read_text())["graphs"]
        # the student's forward, recompiled once per new shape (DDP's own wrapper frame aside)
        recompiles = len(re.findall(r"\[__recompiles\] Recompiling function forward in .*model\.py", err))
        counted = [int(line.split("| ")[-1].split()[0]) for line in err.splitlines() if "compiled shapes" in line]
        assert graphs == recompiles + 1 and graphs <= len(widths), (graphs, recompiles, widths)
        assert counted[-1] <= len(widths) if rank == 0 else not counted  # rank 0 prints the epoch lines


# ---------------------------------------------------------------------------
# The CUDA-graph step: torch's documented pattern
# ---------------------------------------------------------------------------

def test_a_compiled_step_clears_gradients_and_marks_the_step_before_the_forward(monkeypatch):
    """zero_grad and cudagraph_mark_step_begin come before each forward (on CUDA,
    faked here), so a replay never overwrites a tensor that is still to be read."""
    events = []
    monkeypatch.setattr(train_utils, "replays_cuda_graphs", lambda device, compiled: compiled)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    classifier = tiny_classifier()
    classifier.register_forward_pre_hook(lambda *a: events.append("forward"))
    batches = split_of(SENTENCES * 2).batches(4)
    training = make_training(classifier, TrainConfig(epochs=1), len(batches))
    optimizer = training.optimizer
    real_zero = optimizer.zero_grad
    monkeypatch.setattr(optimizer, "zero_grad", lambda **k: (events.append("zero"), real_zero(**k))[1])
    train_epoch(classifier, batches, training, CPU, compiled=True)
    assert events == ["zero", "mark", "forward"] * len(batches)


def test_predictions_survive_a_model_that_reuses_its_output_memory():
    """A CUDA graph's replay writes its outputs into the same memory every step: the
    predictions piled up over the epoch must not be those outputs."""
    class Replayed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))
            self.out = None
            self.calls = 0

        def forward(self, idx, lengths):
            self.calls += 1
            if self.out is None:
                self.out = torch.zeros(idx.size(0), 2)
            logits = self.w + torch.tensor([0.0, 1.0]) * (1 if self.calls % 2 else -1)  # alternates argmax
            self.out.copy_(logits.detach().expand(idx.size(0), 2))
            return self.out + 0 * self.w.sum()

    model = Replayed()
    batches = split_of(SENTENCES * 2).batches(6)
    training = make_training(model, TrainConfig(epochs=1, lr=0.0), len(batches))
    _, predictions, _ = train_epoch(model, batches, training, CPU, grad_clip=0)
    assert predictions.tolist() == [1] * 6 + [0] * 6
