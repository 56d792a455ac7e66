"""What a CPU can check of the GPU path: bf16 results within bf16's own error of
float32's (under CPU autocast, the same casts CUDA's autocast makes), a training
epoch that reads nothing back from the device per step, padded length buckets that
change no logit, --compile building a bounded number of graphs, and the precision
recorded for what ran."""
import json
import os

import pytest
import torch

import train_utils
from cola import STUDENT, cli, common, subset_dir
from conftest import TINY
from model import GPT, DistilRNN, GPTClassifier, GPTConfig, RNNConfig, add_lora, set_trainable
from train_utils import TrainConfig, fit, infer, make_training, train_epoch
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
        params, optimizer, scheduler = make_training(classifier, TrainConfig(epochs=1, batch_size=2), len(batches))
        reads.clear()
        loss, predictions, labels = train_epoch(classifier, batches, optimizer, scheduler, params, CPU, bar=bar,
                                                **kwargs)
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
    params, optimizer, scheduler = make_training(classifier, TrainConfig(epochs=1, lr=0.0), len(batches))
    torch.manual_seed(0)
    loss, _, _ = train_epoch(classifier, batches, optimizer, scheduler, params, CPU, grad_clip=0)
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
                                                                       dynamic=kwargs.get("dynamic")))


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
    fit(classifier, split, split, cfg, CPU, progress=False, compile=True)
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


def test_auto_precision_follows_the_measured_rule(monkeypatch):
    """The one rule, for the device each mode runs on (see resolve_precision's figures)."""
    monkeypatch.setattr(train_utils, "has_amx", lambda: False)
    assert train_utils.precision_of(CPU) == "float32"
    monkeypatch.setattr(train_utils, "has_amx", lambda: True)
    assert train_utils.precision_of(CPU) == "bf16-autocast"
    assert train_utils.precision_of(torch.device("cuda")) == "tf32"
