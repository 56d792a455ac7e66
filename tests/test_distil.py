"""Distillation: the KD loss against a hand computation, the DistilRNN student's
invariance to padding, and `run.py distil` end to end: its equivalence to
`run.py rnn` at --kd-alpha 0, the teacher-logits cache, --teacher-logits files
and errors."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cola import PROJECT_ROOT, STUDENT, SUBSET_ROWS, assert_error, cli, common, lora_subset_run, subset_dir
import rnn_steps
from model import DistilRNN, RNNConfig
from rnn_steps import packed_relu_rnn, steps_in_python
from checkpoints import load_classifier, load_student
from distil import DistilConfig, DistilLoss, teacher_cache_dir
from rundir import read_metrics
from train_utils import accuracy, distillation_loss, evaluate
from utils import Split, TokenizedSplit, encode, load_cola

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SENTENCES = ["The cat sat on the mat.", "Mat the on sat cat the.", "John seems to be happy."]


# ---------------------------------------------------------------------------
# The distillation loss
# ---------------------------------------------------------------------------

def kd_by_hand(s, t, labels, alpha, temperature):
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, written out element by element."""
    batch, classes = s.shape
    kl = 0.0
    for i in range(batch):
        log_p_s = [float(v) for v in torch.log_softmax(s[i] / temperature, dim=0)]
        log_p_t = [float(v) for v in torch.log_softmax(t[i] / temperature, dim=0)]
        for c in range(classes):
            p_t = np.exp(log_p_t[c])
            kl += p_t * (log_p_t[c] - log_p_s[c])
    kl /= batch  # batch mean
    ce = -sum(float(torch.log_softmax(s[i], dim=0)[labels[i]]) for i in range(batch)) / batch
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def logits_case(classes=2, batch=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 2
    t = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return s, t, labels


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.3, 1.0), (0.9, 4.0), (1.0, 3.0), (0.0, 2.0)])
def test_kd_loss_equals_hand_computation(classes, alpha, temperature):
    s, t, labels = logits_case(classes)
    loss = distillation_loss(s, t, labels, alpha=alpha, temperature=temperature)
    assert float(loss) == pytest.approx(kd_by_hand(s, t, labels, alpha, temperature), abs=1e-10)


def test_kd_loss_special_cases():
    s, t, labels = logits_case()
    # alpha 0 is plain cross-entropy, exactly
    assert torch.equal(distillation_loss(s, t, labels, alpha=0.0), F.cross_entropy(s, labels))
    # the soft term vanishes when the student matches the teacher, whatever T
    for temperature in (0.5, 1.0, 7.0):
        assert float(distillation_loss(t.clone(), t, labels, alpha=1.0, temperature=temperature)) == \
            pytest.approx(0.0, abs=1e-12)
    # and is positive otherwise
    assert float(distillation_loss(s, t, labels, alpha=1.0)) > 0


@pytest.mark.parametrize("alpha_real", [0.0, 0.2, 0.5])
def test_kd_alpha_real_weighs_the_real_rows_only(alpha_real):
    """--kd-alpha-real: rows with a gold label mix teacher and label by alpha_real;
    synthetic rows (label -1) keep alpha times the teacher term; alpha_real = alpha is
    the plain loss, bit for bit."""
    s, t, labels = logits_case(batch=6)
    labels[3:] = -1
    alpha, temperature = 0.7, 2.0
    loss = distillation_loss(s, t, labels, alpha, temperature, alpha_real=alpha_real)
    real = kd_by_hand(s[:3], t[:3], labels[:3], alpha_real, temperature) * 3
    synthetic = alpha * (kd_by_hand(s[3:], t[3:], torch.zeros(3, dtype=torch.long), 1.0, temperature) * 3)
    assert float(loss) == pytest.approx((real + synthetic) / 6, abs=1e-10)
    assert torch.equal(distillation_loss(s, t, labels, alpha, temperature, alpha_real=alpha),
                       distillation_loss(s, t, labels, alpha, temperature))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_kd_mse_variant(alpha):
    s, t, labels = logits_case(classes=3)
    squared = sum(float(s[i, c] - t[i, c]) ** 2 for i in range(s.size(0)) for c in range(s.size(1)))
    mse = squared / s.numel()  # mean over every logit
    ce = float(F.cross_entropy(s, labels))
    loss = distillation_loss(s, t, labels, alpha=alpha, temperature=5.0, kind="mse")  # T plays no part
    assert float(loss) == pytest.approx(alpha * mse + (1 - alpha) * ce, abs=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 20.0])
def test_kd_soft_term_gradient(temperature):
    """d/ds [T^2 * KL(softmax(t/T) || softmax(s/T))] / B = T * (softmax(s/T) - softmax(t/T)) / B."""
    s, t, labels = logits_case(classes=3, batch=4)
    s.requires_grad_(True)
    distillation_loss(s, t, labels, alpha=1.0, temperature=temperature).backward()
    expected = temperature * (torch.softmax(s.detach() / temperature, -1) - torch.softmax(t / temperature, -1)) / 4
    torch.testing.assert_close(s.grad, expected, atol=1e-12, rtol=1e-9)
    # mixed with the labels: alpha times that plus (1 - alpha) times CE's (softmax(s) - onehot) / B
    s.grad = None
    distillation_loss(s, t, labels, alpha=0.25, temperature=temperature).backward()
    hard = (torch.softmax(s.detach(), -1) - F.one_hot(labels, 3)) / 4
    torch.testing.assert_close(s.grad, 0.25 * expected + 0.75 * hard, atol=1e-12, rtol=1e-9)


def test_kd_gradient_at_high_temperature_matches_logits():
    """Hinton et al.: for large T the soft gradient tends to (s - t) / C (logits centred), per row."""
    s, t, labels = logits_case(classes=3, batch=4)
    s.requires_grad_(True)
    distillation_loss(s, t, labels, alpha=1.0, temperature=1e4).backward()
    centred = (s.detach() - s.detach().mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
    torch.testing.assert_close(s.grad * 4, centred / 3, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------
# DistilRNN
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["last", "max", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rnn_type", ["rnn", "gru", "lstm"])
def test_distilrnn_padding_invariance(rnn_type, bidirectional, pool):
    torch.manual_seed(0)
    mlp = 0 if pool == "last" else 6  # the pooled students also get the ReLU layer
    model = DistilRNN(RNNConfig(vocab_size=100, n_embd=8, rnn_type=rnn_type, n_layers=2, hidden=16,
                                bidirectional=bidirectional, pool=pool, mlp_hidden=mlp)).eval()
    features = 16 * (2 if bidirectional else 1)  # both directions' states or outputs, side by side
    if mlp:
        assert (model.mlp.in_features, model.mlp.out_features, model.classifier.in_features) == (features, 6, 6)
    else:
        assert model.mlp is None and model.classifier.in_features == features
    lengths = [5, 1, 9, 3, 9]
    sentences = [torch.randint(0, 99, (n,)) for n in lengths]
    idx = torch.full((len(sentences), max(lengths) + 4), 99, dtype=torch.long)  # pads after every sentence
    for i, tokens in enumerate(sentences):
        idx[i, :len(tokens)] = tokens
    with torch.no_grad():
        together = model(idx, torch.tensor(lengths))
        assert together.shape == (5, 2)
        for i, tokens in enumerate(sentences):
            alone = model(tokens[None], torch.tensor([len(tokens)]))
            torch.testing.assert_close(together[i], alone[0], atol=1e-6, rtol=1e-6)
        if pool != "last":  # the pooling, by hand: the top layer's outputs at a sentence's tokens, unpacked
            outputs, _ = model.rnn(model.embedding(sentences[0])[None])
            pooled = outputs[0].amax(0) if pool == "max" else outputs[0].mean(0)
            by_hand = model.classifier(torch.relu(model.mlp(pooled)))
            torch.testing.assert_close(together[0], by_hand, atol=1e-6, rtol=1e-6)
        other = idx.clone()
        for i, n in enumerate(lengths):
            other[i, n:] = 7  # another padding value changes nothing either
        torch.testing.assert_close(model(other, torch.tensor(lengths)), together, atol=1e-6, rtol=1e-6)
        # while a real token does matter
        changed = idx.clone()
        changed[2, 0] = (changed[2, 0] + 1) % 99
        assert (model(changed, torch.tensor(lengths))[2] - together[2]).abs().max() > 1e-6


@pytest.mark.parametrize("pool", ["last", "max"])
@pytest.mark.parametrize("autocast", [False, True])
def test_python_steps_give_the_kernels_numbers_bit_for_bit(autocast, pool, monkeypatch):
    """DistilRNN's ReLU RNN on CPU runs step by step in Python (packed_relu_rnn) for
    speed; its outputs, final states and every gradient equal torch's kernel's
    exactly, in float32 and bf16 autocast, with dropout between layers drawn alike."""
    config = RNNConfig(vocab_size=100, n_embd=12, hidden=16, n_layers=3, dropout=0.3, pool=pool)
    torch.manual_seed(0)
    fast = DistilRNN(config)
    kernel = copy.deepcopy(fast)
    kernel.python_steps = False
    lengths = torch.tensor([5, 1, 9, 3, 9, 7])
    idx = torch.randint(0, 100, (6, 11))
    calls = []
    monkeypatch.setattr(rnn_steps, "packed_relu_rnn", lambda *a: calls.append(1) or packed_relu_rnn(*a))
    results = []
    for model in (fast, kernel):
        torch.manual_seed(1)  # the same dropout masks for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            packed = nn.utils.rnn.pack_padded_sequence(model.embed(idx), lengths, batch_first=True,
                                                       enforce_sorted=False)
            impl = packed_relu_rnn if model is fast else (lambda rnn, p: rnn(p))
            outputs, h_n = impl(model.rnn, packed)
            logits = model(idx, lengths)
        (logits.float().pow(2).sum() + outputs.data.float().sum() + h_n.float().sum()).backward()
        results.append([outputs.data, h_n, logits] + [p.grad for p in model.parameters()])
    assert results[0][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert h_n.shape == (3, 6, 16)
    assert len(calls) == 1  # the fast model's forward went through the Python steps, the other's did not
    with torch.no_grad():  # nothing to differentiate: torch's kernel, the faster then
        fast(idx, lengths)
    assert len(calls) == 1
    assert not steps_in_python(DistilRNN(RNNConfig(vocab_size=10, n_embd=4, hidden=4, rnn_type="gru")).rnn)
    assert not steps_in_python(DistilRNN(RNNConfig(vocab_size=10, n_embd=4, hidden=4, bidirectional=True)).rnn)


MALLINFO_PROBE = """
import ctypes, json, sys, torch
sys.path.insert(0, sys.argv[1])
from utils import keep_freed_memory
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
def where(mb):  # (MiB mapped on their own, MiB of the heap) while a block of mb MiB is alive
    block = torch.ones(mb << 18)
    info = libc.mallinfo2()
    return info.hblkhd >> 20, info.arena >> 20
before = where(64)
applied = keep_freed_memory()
after = where(64)
again = [where(64)[1] for _ in range(40)]  # the heap's size over 40 more blocks, each freed in turn
print(json.dumps([applied, before, after, again]))
"""


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """rnn and distil on CPU keep freed memory in the process's heap: a large block
    (the student's embedding gradient, every step) no longer comes mapped afresh from
    the OS. Checked in a fresh process through glibc's own accounting."""
    out = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, PROJECT_ROOT], capture_output=True, text=True,
                         check=True).stdout
    applied, before, after, again = json.loads(out)
    assert applied is True
    assert before[0] >= 64  # glibc's default: a 64 MiB block is mapped on its own
    assert after[0] < 64 and after[1] >= 64  # now it comes from the heap
    # and the heap reuses freed blocks: it may grow by a few blocks' worth at first (a freed block
    # can be a few bytes short of the next one's aligned request), then no more
    assert len(set(again[20:])) == 1 and again[-1] <= after[1] + 10 * 64, again


def test_distilrnn_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown rnn type"):
        DistilRNN(RNNConfig(vocab_size=10, n_embd=4, hidden=4, rnn_type="transformer"))


# ---------------------------------------------------------------------------
# DistilLoss: the right teacher row for every sentence of a shuffled batch
# ---------------------------------------------------------------------------

def test_teacher_logits_follow_the_rows_of_shuffled_batches():
    sentences = [f"Sentence {'very ' * (i % 5)}number {i}." for i in range(20)]
    train = TokenizedSplit(Split(sentences, [i % 2 for i in range(20)], "train"))
    logits = torch.randn(20, 2)
    loss_fn = DistilLoss(logits, DistilConfig(alpha=0.7, temperature=3.0, loss="kl"))
    batches = train.batches(6, shuffle=True, generator=torch.Generator().manual_seed(1), bucket_batches=1)
    for batch in batches:
        student = torch.randn(len(batch.labels), 2)
        expected = distillation_loss(student, logits[batch.rows], batch.labels, 0.7, 3.0, "kl")
        assert torch.equal(loss_fn(student, batch), expected)
        assert not torch.equal(loss_fn(student, batch),
                               distillation_loss(student, logits[:len(batch.rows)], batch.labels, 0.7, 3.0, "kl"))


# ---------------------------------------------------------------------------
# run.py distil / rnn end to end, on a subset of the real CoLA files
# ---------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path_factory):
    return subset_dir(tmp_path_factory)


@pytest.fixture
def teacher(tmp_path_factory, tmp_path, tiny_ckpt):
    """A private copy of a one-epoch LoRA run on the subset: a directory of its own, so
    a logits cache of its own (teacher_cache_dir), which tests may change."""
    shared = lora_subset_run(tmp_path_factory, tiny_ckpt.path)
    return shutil.copytree(shared, tmp_path / "teacher")


def distil_args(data, teacher, out, tmp_path, *extra, plots=False):
    """distil on the training sentences alone (--augment 0): test_teacher.py covers augmentation."""
    return ["distil", *STUDENT, "--data-dir", data, "--teacher", teacher, "--out-dir", out, "--augment", "0",
            *common(tmp_path, plots), *extra]


def cache_files(teacher):
    cache = teacher_cache_dir(teacher)
    return {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in sorted(os.listdir(cache))}


def student_tensors(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "student.safetensors"))


def test_distil_with_alpha_zero_reproduces_rnn(data, teacher, tmp_path, capsys):
    runs = tmp_path / "runs"
    # the same default student on both sides: named a teacher, both start from its vectors
    code, _, err = cli(capsys, "rnn", *STUDENT, "--teacher", teacher, "--data-dir", data, "--out-dir", runs / "rnn",
                       *common(tmp_path))
    assert code == 0, err
    code, _, err = cli(capsys, *distil_args(data, teacher, runs / "distil", tmp_path, "--kd-alpha", "0"))
    assert code == 0, err
    rnn, distil = read_metrics(runs / "rnn"), read_metrics(runs / "distil")
    assert rnn["mode"] == "rnn" and distil["mode"] == "distil"
    assert len(rnn["epochs"]) == len(distil["epochs"]) == 2
    for r, d in zip(rnn["epochs"], distil["epochs"]):
        assert {k: v for k, v in r.items() if k != "seconds"} == {k: d[k] for k in r if k != "seconds"}
    assert rnn["best_epoch"] == distil["best_epoch"] and rnn["params"] == distil["params"]
    assert rnn["args"]["init_embeddings"] == distil["args"]["init_embeddings"] == "teacher"
    assert rnn["student"] == distil["student"] == {"init_embeddings": "teacher", "n_embd": 16, "vocab_size": 50257}
    a, b = student_tensors(runs / "rnn"), student_tensors(runs / "distil")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # no implicit rnn-vs-distil plot pairing whatever runs sit side by side: compare names its runs
    assert not (tmp_path / "plots" / "rnn_vs_distil.png").exists()
    # and the teacher does change training once it has weight
    code, _, err = cli(capsys, *distil_args(data, teacher, tmp_path / "kd", tmp_path, "--kd-alpha", "0.5"))
    assert code == 0, err
    assert read_metrics(tmp_path / "kd")["epochs"][0]["train_loss"] != rnn["epochs"][0]["train_loss"]
    assert any(not torch.equal(a[key], t) for key, t in student_tensors(tmp_path / "kd").items())


def assert_same_run(a, b):
    """Two runs with the same epochs' records (seconds aside) and the same weights."""
    first, second = read_metrics(a), read_metrics(b)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in first["epochs"]] == \
        [{k: r[k] for k in r if k not in ("seconds", "val_agreement")} for r in second["epochs"]]
    assert first["best_epoch"] == second["best_epoch"] and first["params"] == second["params"]
    x, y = student_tensors(a), student_tensors(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key
    return first, x


@pytest.mark.parametrize("student_flags", [
    ["--pool", "max", "--bidirectional", "--rnn-type", "lstm", "--rnn-mlp", "16"],
    # a LoRA teacher's embeddings are its base GPT-2's (tiny_ckpt, 64 wide), reduced to 16 by PCA
    ["--init-embeddings", "teacher", "--embd-channels", "both", "--pool", "mean", "--rnn-type", "gru"],
    # a Hugging Face teacher gives its tokenizer (the tiny BERT's word vocabulary) and embeddings
    ["--init-embeddings", "teacher", "--embd-channels", "frozen", "hf"],
], ids=["pooled-lstm-mlp", "lora-teacher-embeddings-both", "hf-teacher-tokenizer-frozen"])
def test_distil_with_alpha_zero_reproduces_rnn_for_every_student(data, teacher, tiny_bert, tmp_path, capsys,
                                                                  student_flags):
    """One student definition: rnn builds distil's student for any student flags, the
    teacher's tokenizer and embeddings included (rnn reads --teacher for them alone)."""
    hf = student_flags[-1] == "hf"
    if hf:
        teacher, student_flags = shutil.copytree(tiny_bert, tmp_path / "bert"), student_flags[:-1]
    given_teacher = ["--teacher", teacher]  # named, the teacher's vectors are both sides' default
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, "rnn", *STUDENT, *student_flags, *given_teacher, "--data-dir", data,
                       "--out-dir", runs / "rnn", *common(tmp_path))
    assert code == 0, err
    assert "running the teacher" not in err  # rnn only reads it
    code, _, err = cli(capsys, *distil_args(data, teacher, runs / "distil", tmp_path, "--kd-alpha", "0",
                                            *student_flags))
    assert code == 0, err
    metrics, weights = assert_same_run(runs / "rnn", runs / "distil")
    with open(runs / "distil" / "student.json") as f:
        settings = json.load(f)
    if "frozen" in student_flags or "both" in student_flags:  # one embedding table is not trained
        assert metrics["params"]["trainable"] == metrics["params"]["total"] - settings["config"]["vocab_size"] * 16
    if "both" in student_flags:
        assert not torch.equal(weights["embedding.weight"], weights["static_embedding.weight"])
    assert settings["tokenizer"] == ("tokenizer/" if hf else "gpt2")


def test_distil_end_to_end(data, teacher, tmp_path, capsys):
    out = tmp_path / "distil"
    code, _, err = cli(capsys, *distil_args(data, teacher, out, tmp_path, "--kd-alpha", "0.5",
                                            "--kd-temperature", "2", "--rnn-type", "gru", plots=True))
    assert code == 0, err
    metrics = read_metrics(out)
    assert {"mode", "args", "params", "epochs", "best_epoch", "teacher", "distillation"} <= set(metrics)
    assert metrics["params"]["total"] == metrics["params"]["trainable"] > 0
    assert {k: metrics["distillation"][k] for k in ("alpha", "temperature", "loss", "augment")} == \
        {"alpha": 0.5, "temperature": 2.0, "loss": "mse", "augment": 0}  # mse: the default loss
    assert metrics["distillation"]["transfer_sentences"] == SUBSET_ROWS["train"]
    for epoch in metrics["epochs"]:
        assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_mcc", "seconds",
                "val_agreement"} <= set(epoch)
        assert 0 <= epoch["val_agreement"] <= 1
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    assert best["val_mcc"] == max(r["val_mcc"] for r in metrics["epochs"])
    assert {"metrics.json", "student.json", "student.safetensors"} <= set(os.listdir(out))
    with open(out / "student.json") as f:
        settings = json.load(f)
    assert settings["kind"] == "DistilRNN" and settings["trained_by"] == "distil"
    assert settings["config"]["hidden"] == 32 and settings["config"]["n_embd"] == 16
    assert settings["config"]["rnn_type"] == "gru"
    with open(tmp_path / "plots" / "distil_distil.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"

    # the teacher record and the agreement, recomputed from the cached teacher logits
    teacher_record = metrics["teacher"]
    assert teacher_record["source"] == os.path.abspath(teacher)
    val_cache = next(n for n in os.listdir(teacher_cache_dir(teacher)) if n.startswith("val-"))
    teacher_predictions = torch.from_numpy(np.load(os.path.join(teacher_cache_dir(teacher), val_cache))).argmax(-1)
    _, val = load_cola(data, "in")
    assert teacher_record["val_acc"] == pytest.approx(accuracy(teacher_predictions, val.labels), abs=1e-9)
    student, _ = load_student(str(out))
    result = evaluate(student, TokenizedSplit(val).batches(128), torch.device("cpu"))
    assert result["acc"] == pytest.approx(best["val_acc"], abs=1e-9)
    agreement = accuracy(result["logits"].argmax(-1), teacher_predictions)
    assert agreement == pytest.approx(best["val_agreement"], abs=1e-9)

    # predict and eval take the student checkpoint
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, *SENTENCES)
    assert code == 0, err
    assert "DistilRNN" in err
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert [line[2] for line in lines] == SENTENCES
    assert all(line[0] == str(int(float(line[1]) >= 0.5)) for line in lines)
    code, stdout, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", data, "--output", tmp_path / "e.json")
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == SUBSET_ROWS["in"]
    assert result["acc"] == pytest.approx(best["val_acc"], abs=1e-9)
    assert result["mcc"] == pytest.approx(best["val_mcc"], abs=1e-9)
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def tree_state(directory):
    """(path, size, modification time) of everything under directory."""
    state = []
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            status = os.stat(path)
            state.append((os.path.relpath(path, directory), status.st_size, status.st_mtime_ns))
    return sorted(state)


def test_the_teachers_directory_is_never_written(data, teacher, tmp_path, capsys, user_cache):
    """distil caches the logits under the user's cache folder, never inside TEACHER/;
    TEACHER/adapter is taken as the run it belongs to: the same teacher, the same cache."""
    before = tree_state(teacher)
    code, _, err = cli(capsys, *distil_args(data, teacher, tmp_path / "distil", tmp_path, "--epochs", "1"))
    assert code == 0, err
    assert err.count("running the teacher") == 2
    assert tree_state(teacher) == before
    cache = teacher_cache_dir(teacher)
    assert os.path.commonpath([cache, user_cache]) == user_cache and len(os.listdir(cache)) == 2
    adapter = os.path.join(teacher, "adapter")
    code, _, err = cli(capsys, *distil_args(data, adapter, tmp_path / "from-adapter", tmp_path, "--epochs", "1"))
    assert code == 0, err
    assert f"--teacher {adapter} is the adapter of the LoRA run {teacher}: taken as that run" in err
    assert "running the teacher" not in err and err.count("from cache") == 2  # its cache, not a new one
    assert read_metrics(tmp_path / "from-adapter")["teacher"]["source"] == os.path.abspath(teacher)
    assert tree_state(teacher) == before


def test_a_lora_teacher_loads_gpt2_once(data, teacher, tmp_path, capsys, monkeypatch):
    """--init-embeddings teacher with a LoRA teacher that must label: its GPT-2 is read
    once, for both the student's first vectors and the teacher's logits."""
    import checkpoints
    import distil
    real_load_gpt, loads = checkpoints.load_gpt, []

    def counted(*args, **kwargs):
        loads.append(args)
        return real_load_gpt(*args, **kwargs)
    for module in (checkpoints, distil):  # wherever it is looked up
        monkeypatch.setattr(module, "load_gpt", counted, raising=False)
    # no --rnn-embd: the student takes the base's width, starting from its vectors
    code, _, err = cli(capsys, "distil", "--rnn-hidden", "32", "--epochs", "1", "--data-dir", data,
                       "--teacher", teacher, "--out-dir", tmp_path / "distil", "--augment", "0",
                       "--init-embeddings", "teacher", *common(tmp_path))
    assert code == 0, err
    assert "running the teacher" in err and len(loads) == 1, loads


def test_teacher_cache_written_reused_and_invalidated(data, teacher, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    # float32, pinned: the cache is compared with the teacher's own float32 logits below
    args = distil_args(data, teacher, tmp_path / "distil", tmp_path, "--epochs", "1", "--overwrite",
                       "--dtype", "float32")
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert err.count("running the teacher") == 2  # train and validation, once each
    first = cache_files(teacher)
    assert [n.split("-")[0] for n in first] == ["train", "val"] and all(n.endswith(".npy") for n in first)
    assert len({n.split("-")[1] for n in first}) == 1  # one teacher key
    cache = teacher_cache_dir(teacher)
    train_name = next(iter(first))
    train_logits = np.load(os.path.join(cache, train_name))
    assert train_logits.shape == (SUBSET_ROWS["train"], 2) and train_logits.dtype == np.float32

    # the cache holds the teacher's own logits for each training sentence, in file order
    model, _, _ = load_classifier(str(teacher))
    train, _ = load_cola(data, "in")
    with torch.no_grad():
        for row in (0, 1, 150, SUBSET_ROWS["train"] - 1):
            tokens = encode(train.sentences[row])
            own = model(torch.tensor([tokens]), torch.tensor([len(tokens)]))[0]
            torch.testing.assert_close(torch.from_numpy(train_logits[row]), own, atol=1e-5, rtol=1e-5)

    # second run: read from the cache, nothing rewritten
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert "running the teacher" not in err
    assert err.count("from cache") == 2
    assert cache_files(teacher) == first  # same names, same modification times

    # a changed teacher adapter invalidates the cache: new files, the old ones removed
    adapter = os.path.join(teacher, "adapter", "adapter_model.safetensors")
    tensors = load_file(adapter)
    for key in tensors:
        if "lora_B" in key or "score" in key:
            tensors[key] = tensors[key] + 0.3 * torch.randn_like(tensors[key])
    save_file(tensors, adapter, metadata={"format": "pt"})
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert err.count("running the teacher") == 2
    third = cache_files(teacher)
    assert len(third) == 2 and not set(third) & set(first)
    new_train = np.load(os.path.join(cache, next(iter(third))))
    assert np.abs(new_train - train_logits).max() > 1e-3


def test_corrupt_teacher_cache_is_rebuilt(data, teacher, tmp_path, capsys):
    args = distil_args(data, teacher, tmp_path / "distil", tmp_path, "--epochs", "1", "--overwrite")
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    cache = teacher_cache_dir(teacher)
    names = sorted(os.listdir(cache))
    train_path = os.path.join(cache, names[0])
    original = np.load(train_path)
    for junk in (b"not a numpy file", None):
        if junk is None:  # a readable array of the wrong shape is as bad
            np.save(train_path, np.zeros((3, 2), np.float32))
        else:
            with open(train_path, "wb") as f:
                f.write(junk)
        code, _, err = cli(capsys, *args)
        assert code == 0, err
        assert "warning" in err and names[0] in err and "Traceback" not in err
        assert "teacher logits (val) from cache" in err
        assert sorted(os.listdir(cache)) == names
        assert np.array_equal(np.load(train_path), original)
    assert read_metrics(tmp_path / "distil")["teacher"]["source"] == os.path.abspath(teacher)


def test_teacher_logits_file(data, tmp_path, capsys):
    logits = tmp_path / "logits.npy"
    np.save(logits, np.random.default_rng(0).normal(size=(SUBSET_ROWS["train"], 2)).astype(np.float32))
    out = tmp_path / "distil"
    code, _, err = cli(capsys, "distil", *STUDENT, "--epochs", "1", "--data-dir", data, "--teacher-logits", logits,
                       "--out-dir", out, *common(tmp_path))
    assert code == 0, err
    metrics = read_metrics(out)
    assert metrics["teacher"]["source"] == os.path.abspath(logits)
    assert metrics["teacher"]["val_acc"] is None  # a file brings no validation logits
    assert os.path.isfile(out / "student.safetensors")

    for shape in ((SUBSET_ROWS["train"] - 1, 2), (SUBSET_ROWS["train"], 3)):
        np.save(logits, np.zeros(shape, np.float32))
        code, stdout, err = cli(capsys, "distil", *STUDENT, "--data-dir", data, "--teacher-logits", logits,
                                "--out-dir", tmp_path / "bad", *common(tmp_path))
        assert_error(code, stdout, err, str(logits), f"{shape}", f"({SUBSET_ROWS['train']}, 2)", only_line=False)
    code, stdout, err = cli(capsys, "distil", *STUDENT, "--data-dir", data, "--teacher-logits",
                            tmp_path / "none.npy", "--out-dir", tmp_path / "bad", *common(tmp_path))
    assert_error(code, stdout, err, "does not exist", only_line=False)
    assert not os.path.exists(tmp_path / "bad" / "metrics.json")


@pytest.mark.parametrize("flags,fragment", [
    (["--kd-temperature", "0"], "--kd-temperature must be > 0"),
    (["--kd-temperature", "-2"], "--kd-temperature must be > 0"),
    (["--kd-alpha", "1.5"], "--kd-alpha must be in [0, 1]"),
    (["--kd-alpha", "-0.1"], "--kd-alpha must be in [0, 1]"),
    (["--kd-loss", "l1"], "--kd-loss"),
    (["--teacher", "a", "--teacher-logits", "b.npy"], "not allowed with"),
])
def test_bad_distil_flags(tmp_path, capsys, flags, fragment):
    code, out, err = cli(capsys, "distil", "--data-dir", tmp_path / "nodata", "--out-dir", tmp_path / "out",
                         *common(tmp_path), *flags)
    assert_error(code, out, err, fragment)
    assert not os.path.exists(tmp_path / "out")


def test_missing_or_wrong_teacher_dir(data, tmp_path, capsys):
    for teacher in (tmp_path / "no_such_teacher", tmp_path):
        code, out, err = cli(capsys, *distil_args(data, teacher, tmp_path / "out", tmp_path))
        assert_error(code, out, err, str(teacher), "does not exist" if "no_such" in str(teacher) else
                     "neither a LoRA run", only_line=False)
    assert not os.path.exists(tmp_path / "out")


def test_teacher_with_short_context_and_long_sentences(teacher, tmp_path, capsys):
    long_data = tmp_path / "long"
    long_data.mkdir()
    long_sentence = " ".join(["word"] * 200) + "."  # 201 tokens; the tiny teacher's base has 128 positions
    (long_data / "in_domain_train.tsv").write_text(f"s\t1\t\tA sentence.\ns\t0\t*\t{long_sentence}\n")
    (long_data / "in_domain_dev.tsv").write_text("s\t1\t\tA sentence.\n")
    code, _, err = cli(capsys, *distil_args(long_data, teacher, tmp_path / "out", tmp_path, "--epochs", "1"))
    assert code == 0, err


def test_teacher_cache_keeps_other_splits_and_separates_precisions(data, teacher, tmp_path, capsys):
    """Runs with other --val-split values share the teacher's training logits and keep
    each other's validation logits; logits made in another precision are not reused.
    --dtype reaches the teacher, and metrics.json says what precision it ran in."""
    args = distil_args(data, teacher, tmp_path / "distil", tmp_path, "--epochs", "1", "--overwrite",
                       "--dtype", "float32")
    for val_split, computed in (("in", 2), ("out", 1), ("in", 0), ("out", 0)):
        code, _, err = cli(capsys, *args, "--val-split", val_split)
        assert code == 0, err
        assert err.count("running the teacher") == computed, (val_split, err)
    assert len(cache_files(teacher)) == 3  # train, val in, val out
    float32_logits = {name.split("-")[0]: np.load(os.path.join(teacher_cache_dir(teacher), name))
                      for name in cache_files(teacher) if "val" not in name}
    # the same teacher under bf16 autocast (any machine: --dtype forces it): a key of its own,
    # so the float32 files of this teacher are replaced, never read as bf16 ones
    code, _, err = cli(capsys, *args[:-1], "bfloat16")
    assert code == 0, err
    assert err.count("running the teacher") == 2
    assert len({name.split("-")[1] for name in cache_files(teacher)}) == 1  # the other key's files went
    metrics = read_metrics(tmp_path / "distil")
    assert metrics["teacher"]["precision"] == metrics["environment"]["precision"] == "bf16-autocast"
    bf16_logits = {name.split("-")[0]: np.load(os.path.join(teacher_cache_dir(teacher), name))
                   for name in cache_files(teacher) if "val" not in name}
    assert not np.array_equal(bf16_logits["train"], float32_logits["train"])  # really computed in bf16
    code, _, err = cli(capsys, *args)
    assert err.count("running the teacher") == 2  # float32 again: recomputed, never read from bf16 files
    metrics = read_metrics(tmp_path / "distil")
    assert metrics["teacher"]["precision"] == metrics["environment"]["precision"] == "float32"


def test_lora_teacher_key_follows_its_base(tmp_path, tiny_ckpt, tmp_path_factory):
    """The key covers the base the adapter was trained on (a changed base file changes it)."""
    from distil import LoRATeacher
    run = lora_subset_run(tmp_path_factory, tiny_ckpt.path)
    base = shutil.copytree(tiny_ckpt.path, tmp_path / "base")
    first = LoRATeacher(run, str(base)).key()
    assert LoRATeacher(run, str(base)).key() == first
    os.utime(base / "model.safetensors", ns=(1, 1))
    assert LoRATeacher(run, str(base)).key() != first


def test_teacher_labelling_shows_progress_unless_no_progress(data, teacher, tmp_path, capsys):
    argv = [a for a in distil_args(data, teacher, tmp_path / "distil", tmp_path, "--epochs", "1")
            if a != "--no-progress"]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert "teacher:" in err and "sentence/s" in err  # tqdm's bar, labelled, in sentences
    shutil.rmtree(teacher_cache_dir(teacher))
    code, _, err = cli(capsys, *argv, "--no-progress", "--overwrite")
    assert code == 0, err
    assert "teacher:" not in err and "running the teacher" in err


def test_ctrl_c_while_the_teacher_labels_keeps_the_batches_done(data, teacher, tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-labelling: a one-line message (not an empty "error: "), the chunks
    already labelled kept, and the same command continues after them, ending with the
    same cache as an uninterrupted labelling."""
    import distil
    monkeypatch.setattr(distil, "LABEL_CHUNK", 64)
    argv = distil_args(data, teacher, tmp_path / "distil", tmp_path, "--epochs", "1", "--dtype", "float32")
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    cache = teacher_cache_dir(teacher)
    whole = {name: np.load(os.path.join(cache, name)) for name in cache_files(teacher)}
    shutil.rmtree(cache)
    real_logits, calls = distil.LoRATeacher.logits, []

    def interrupted_on_the_third_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_logits(self, *args, **kwargs)
    monkeypatch.setattr(distil.LoRATeacher, "logits", interrupted_on_the_third_chunk)
    code, _, err = cli(capsys, *argv, "--overwrite")
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err
    assert last.startswith("error: interrupted while the teacher labelled") and "128 of 300" in last
    assert [name for name in os.listdir(cache) if name.endswith(".partial.npy")]
    monkeypatch.setattr(distil.LoRATeacher, "logits", real_logits)
    code, _, err = cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert "continuing the teacher's labelling after 128 of 300" in err
    assert {name: np.load(os.path.join(cache, name)).tolist() for name in cache_files(teacher)} == \
        {name: array.tolist() for name, array in whole.items()}
    assert not [name for name in os.listdir(cache) if name.endswith(".partial.npy")]
