"""The student's shape and start: its embedding channels, the teacher's
input embeddings and tokenizer (conftest's tiny BERT, or a LoRA teacher's base
GPT-2), a student on the teacher's tokenizer predicting and evaluating from its
checkpoint alone, and each bad input's one-line error before any data is read.
Pooling and the ReLU layer: test_distil.py (padding invariance, and rnn = distil at
--kd-alpha 0 for these flags)."""
import json
import os
import shutil

import pytest
import torch

from checkpoints import load_classifier, load_student, save_student
from cola import SUBSET_ROWS, STUDENT, assert_error, cli, common, lora_subset_run, subset_dir
from distil import load_teacher
from model import DistilRNN, RNNConfig
from modes import student, student_start, student_width
from run import build_parser, init_embeddings
from train_utils import TrainConfig, make_training, train_epoch
from utils import GPT2_TOKENS, Split, TokenizedSplit

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def teacher_embeddings(teacher_dir):
    """The teacher's input embeddings as transformers loads them, in float32."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, dtype=torch.float32)
    return model.get_input_embeddings().weight.detach()


# ---------------------------------------------------------------------------
# Where the student starts
# ---------------------------------------------------------------------------

def test_teacher_embeddings_start_the_student_row_by_row(tiny_bert):
    from transformers import AutoTokenizer
    weight = teacher_embeddings(tiny_bert)  # (vocab, 32)
    vocab = len(AutoTokenizer.from_pretrained(tiny_bert))
    assert weight.shape == (vocab, 32)
    ids = torch.tensor(AutoTokenizer.from_pretrained(tiny_bert)("the cat sat .", add_special_tokens=False)["input_ids"])
    for width, channels in ((32, "trained"), (16, "both")):
        cfg = RNNConfig(n_embd=width, hidden=8, embd_channels=channels)
        tokenizer, embeddings = student_start(cfg, "teacher", teacher=load_teacher(tiny_bert))
        assert tokenizer.vocab_size == vocab and tokenizer.name == "tokenizer/"
        assert tokenizer.encode(["the cat sat ."]) == [ids.tolist()]  # no [CLS] or [SEP] around the sentence
        model = student(cfg, 0, tokenizer, embeddings)
        assert model.config.vocab_size == vocab and model.embedding.weight.shape == (vocab, width)
        if width == 32:  # as wide as the teacher: its rows, unchanged, token i's in row i
            assert torch.equal(model.embedding.weight, weight)
        else:  # narrower: each row centred and projected on the table's 16 principal directions
            centred = weight - weight.mean(0)
            directions = torch.linalg.svd(centred, full_matrices=False)[2][:16]
            expected = centred @ directions.t()
            torch.testing.assert_close(model.embedding.weight, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.embedding(ids), expected[ids], atol=1e-5, rtol=1e-5)
            # the projection keeps the largest share of the rows' variance a 16-wide table can
            assert model.embedding.weight.var(0).sum() > 0.5 * centred.var(0).sum()
            assert torch.equal(model.static_embedding.weight, model.embedding.weight)  # both channels start there
    # random starts stay on GPT-2's tokenizer, from the seed
    tokenizer, embeddings = student_start(RNNConfig(n_embd=16, hidden=8), "random")
    assert tokenizer is GPT2_TOKENS and embeddings is None


def test_lora_teachers_embeddings_are_its_base_gpt2s(tiny_ckpt, tmp_path_factory):
    teacher = load_teacher(lora_subset_run(tmp_path_factory, tiny_ckpt.path))
    tokenizer, embeddings = student_start(RNNConfig(n_embd=64, hidden=8), "teacher", teacher=teacher)
    assert tokenizer is GPT2_TOKENS
    torch.testing.assert_close(embeddings, tiny_ckpt.hf.transformer.wte.weight.detach(), atol=0, rtol=0)


def test_frozen_and_both_channels_train_only_the_trained_table():
    sentences = ["The cat sat.", "A dog ran.", "Birds sing.", "Cats sat the."]
    split = TokenizedSplit(Split(sentences, [1, 1, 1, 0], "tiny"))
    for channels in ("frozen", "both"):
        torch.manual_seed(0)
        model = DistilRNN(RNNConfig(n_embd=8, hidden=8, embd_channels=channels, pool="max"))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = TrainConfig(epochs=1, batch_size=2, lr=0.1)
        training = make_training(model, cfg, 2)
        trained = {id(p) for group in training.optimizer.param_groups for p in group["params"]}
        if channels == "frozen":
            assert id(model.embedding.weight) not in trained and model.static_embedding is None
        else:
            assert id(model.static_embedding.weight) not in trained and id(model.embedding.weight) in trained
        assert model.rnn.input_size == (8 if channels == "frozen" else 16)  # both: the two side by side
        train_epoch(model, split.batches(2), training, torch.device("cpu"))
        now = dict(model.named_parameters())
        frozen = "embedding.weight" if channels == "frozen" else "static_embedding.weight"
        assert torch.equal(now[frozen], start[frozen])
        used = torch.tensor(sorted({t for row in split.tokens for t in row}))
        if channels == "both":
            assert not torch.equal(now["embedding.weight"][used], start["embedding.weight"][used])
        assert not torch.equal(now["rnn.weight_ih_l0"], start["rnn.weight_ih_l0"])


def test_a_student_saved_before_these_settings_loads_as_it_ran(tmp_path):
    torch.manual_seed(0)
    model = DistilRNN(RNNConfig(vocab_size=50257, n_embd=8, hidden=8)).eval()
    save_student(model, tmp_path)
    with open(tmp_path / "student.json") as f:
        settings = json.load(f)
    assert settings["tokenizer"] == "gpt2" and not os.path.exists(tmp_path / "tokenizer")
    del settings["tokenizer"]  # as written before the field existed, and the config without the new fields
    settings["config"] = {k: v for k, v in settings["config"].items()
                          if k not in ("pool", "mlp_hidden", "embd_channels")}
    (tmp_path / "student.json").write_text(json.dumps(settings))
    loaded, tokenizer, _ = load_classifier(str(tmp_path))
    assert (loaded.config.pool, loaded.config.mlp_hidden, loaded.config.embd_channels) == ("last", 0, "trained")
    assert tokenizer is GPT2_TOKENS
    batch = TokenizedSplit.of_texts(["The cat sat."]).make_batch([0])
    with torch.no_grad():
        assert torch.equal(loaded(batch.idx, batch.lengths), model(batch.idx, batch.lengths))


# ---------------------------------------------------------------------------
# A student on the teacher's tokenizer stands alone
# ---------------------------------------------------------------------------

@pytest.fixture
def bert_student(tiny_bert, tmp_path, tmp_path_factory, capsys):
    """distil from a copy of the tiny BERT, on its tokenizer and embeddings, with the teacher
    moved away afterwards: (out dir, the CoLA subset)."""
    teacher = shutil.copytree(tiny_bert, tmp_path / "teacher")
    data = subset_dir(tmp_path_factory)
    out = tmp_path / "distil"
    code, _, err = cli(capsys, "distil", *STUDENT, "--epochs", "1", "--data-dir", data, "--teacher", teacher,
                       "--init-embeddings", "teacher", "--augment", "2", "--pool", "mean", "--out-dir", out,
                       *common(tmp_path))
    assert code == 0, err
    shutil.move(teacher, tmp_path / "gone")  # predict and eval must not need it
    return out, data


def test_student_on_the_teachers_tokenizer_predicts_and_evaluates_from_its_checkpoint_alone(
        bert_student, tmp_path, capsys):
    from transformers import AutoTokenizer
    out, data = bert_student
    with open(out / "student.json") as f:
        settings = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert settings["tokenizer"] == "tokenizer/" and settings["config"]["vocab_size"] == len(tokenizer) < 50257
    assert settings["config"]["pool"] == "mean"
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    distillation = metrics["distillation"]
    assert distillation["transfer_sentences"] == SUBSET_ROWS["train"] * 3 - distillation["duplicates_dropped"]

    sentences = ["The cat sat on the mat.", "Mat the on sat cat the."]
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, "--dtype", "float32", *sentences)
    assert code == 0, err
    # the probabilities of the student reading the teacher's tokens (no special ones), by hand
    model, _ = load_student(str(out))
    with torch.no_grad():
        for line, sentence in zip(stdout.splitlines(), sentences):
            ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            p = model(torch.tensor([ids]), torch.tensor([len(ids)])).softmax(-1)[0, 1]
            assert float(line.split("\t")[1]) == pytest.approx(float(p), abs=6e-5) and line.endswith(sentence)
    code, stdout, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", data, "--output", tmp_path / "e.json")
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    assert result["acc"] == pytest.approx(best["val_acc"], abs=1e-9)
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_a_tokenizer_that_does_not_fit_the_student_is_refused(bert_student, tmp_path, capsys):
    from transformers import BertTokenizer
    out, data = bert_student
    broken = tmp_path / "broken"
    for breakage, fragment in (("missing", "tokenizer is missing"), ("other vocabulary", "has 7 tokens but"),
                               ("named gpt2", "(gpt2) has 50257 tokens but")):
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(out, broken)
        if breakage == "missing":
            shutil.rmtree(broken / "tokenizer")
        elif breakage == "other vocabulary":
            shutil.rmtree(broken / "tokenizer")
            vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]
            BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(broken / "tokenizer")
        else:
            settings = json.loads((broken / "student.json").read_text())
            (broken / "student.json").write_text(json.dumps({**settings, "tokenizer": "gpt2"}))
        code, stdout, err = cli(capsys, "predict", "--checkpoint", broken, "The cat sat.")
        assert_error(code, stdout, err, fragment, only_line=False)
        code, stdout, err = cli(capsys, "eval", "--checkpoint", broken, "--data-dir", data)
        assert_error(code, stdout, err, fragment, only_line=False)


class RecordingTeacher:
    """A stand-in teacher: logits 0, and the texts it was asked to label."""
    description, mask_token, from_hub = "recording teacher", "[MASK]", False

    def __init__(self, directory):
        self.directory, self.source, self.texts = str(directory), str(directory), []

    def key(self):
        return "recording"

    def logits(self, texts, device, precision):
        self.texts += texts
        return torch.zeros(len(texts), 2)


@pytest.mark.parametrize("on_teachers_tokenizer", [True, False])
def test_the_student_reads_masked_words_as_its_tokenizers_mask(tiny_bert, tmp_path, on_teachers_tokenizer):
    """On the teacher's tokenizer the student reads each synthetic sentence exactly as
    the teacher does ([MASK] and all); on GPT-2's, a mask is end-of-text."""
    from checkpoints import HFTokens
    from distil import AugmentConfig, DistilConfig, teacher_targets
    from transformers import AutoTokenizer
    from utils import EOT_TOKEN
    hf = HFTokens(AutoTokenizer.from_pretrained(tiny_bert))
    tokenizer = hf if on_teachers_tokenizer else GPT2_TOKENS
    sentences = ["The cat sat on the mat.", "The dog sat on the rug.", "Mary saw the dog."] * 2
    train = TokenizedSplit(Split(sentences, [1, 1, 0] * 2, "train"), tokenizer=tokenizer)
    val = TokenizedSplit(Split(sentences[:2], [1, 0], "val"), tokenizer=tokenizer)
    teacher = RecordingTeacher(tmp_path)
    cfg = DistilConfig(augment=AugmentConfig(copies=4, mask_prob=0.3, swap_prob=0.1, seed=0))
    targets = teacher_targets(teacher, train, val, torch.device("cpu"), cfg, progress=False)
    synthetic = teacher.texts[len(sentences) + 2:]  # after the training and validation sentences
    assert len(set(synthetic)) == len(synthetic) and not set(synthetic) & set(sentences)
    assert len(targets.transfer) == len(sentences) + len(synthetic) == 6 + 4 * 6 - targets.duplicates
    assert targets.transfer.tokenizer is tokenizer and targets.transfer.pad_id == tokenizer.pad_id
    student_tokens = targets.transfer.tokens[len(sentences):]
    masked = [i for i, text in enumerate(synthetic) if "[MASK]" in text]
    assert masked
    if on_teachers_tokenizer:
        assert student_tokens == hf.encode(synthetic)
        assert all(hf.tokenizer.mask_token_id in student_tokens[i] for i in masked)
    else:
        assert student_tokens == GPT2_TOKENS.encode([t.replace("[MASK]", "<|endoftext|>") for t in synthetic])
        assert all(EOT_TOKEN in student_tokens[i] for i in masked)


@pytest.mark.parametrize("argv,expected", [
    (["distil"], "teacher"),                                   # distil's default teacher counts
    (["distil", "--teacher", "t"], "teacher"),
    (["distil", "--teacher-logits", "x.npy"], "random"),       # no teacher to read
    (["distil", "--teacher", "t", "--init-embeddings", "random"], "random"),
    (["rnn"], "random"),
    (["rnn", "--teacher", "t"], "teacher"),                   # rnn reads a teacher only for this
    (["rnn", "--init-embeddings", "gpt2"], "gpt2"),
])
def test_the_student_starts_from_the_teachers_vectors_wherever_one_is_named(argv, expected):
    args = build_parser().parse_args(argv)
    assert init_embeddings(args) == expected
    assert args.rnn_embd is None  # the width follows the vectors (student_width)


def test_the_default_width_follows_the_starting_vectors():
    auto = RNNConfig(n_embd=None)
    assert student_width(auto, torch.zeros(10, 384)).n_embd == 384    # MiniLM's
    assert student_width(auto, torch.zeros(10, 1024)).n_embd == 768   # wider ones reduced to the study's 768
    assert student_width(auto).n_embd == 768                           # random vectors
    assert student_width(RNNConfig(n_embd=16), torch.zeros(10, 384)).n_embd == 16  # as given


def test_distils_defaults_read_the_teachers_vectors_at_its_width_with_7_copies(tiny_bert, tmp_path, tmp_path_factory,
                                                                               capsys):
    """distil with no student or augmentation flags, a Hugging Face teacher: its
    tokenizer, its vectors at their width (the tiny BERT's 32), 7 synthetic copies."""
    teacher = shutil.copytree(tiny_bert, tmp_path / "bert")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "distil", "--teacher", teacher, "--rnn-hidden", "8", "--epochs", "1",
                       "--data-dir", subset_dir(tmp_path_factory), "--out-dir", out, *common(tmp_path))
    assert code == 0, err
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["args"]["init_embeddings"] == "teacher" and metrics["args"]["rnn_embd"] is None
    assert metrics["student"]["n_embd"] == 32 and metrics["student"]["init_embeddings"] == "teacher"
    assert metrics["distillation"]["augment"] == 7
    assert f"transfer set: {SUBSET_ROWS['train']} training sentences + " in err and "(7 each," in err


# ---------------------------------------------------------------------------
# Bad input: one line, before any data is read (--data-dir points nowhere)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["distil", "--init-embeddings", "teacher", "--teacher-logits", "x.npy"], "--teacher-logits gives no teacher"),
    (["rnn", "--teacher", "t", "--init-embeddings", "random"], "rnn reads --teacher only for --init-embeddings teacher"),
    (["rnn", "--rnn-mlp", "-1"], "--rnn-mlp must be >= 0"),
    (["distil", "--pool", "avg"], "argument --pool: invalid choice"),
    (["rnn", "--embd-channels", "static"], "argument --embd-channels: invalid choice"),
])
def test_bad_student_flags(tmp_path, capsys, argv, fragment):
    code, out, err = cli(capsys, *argv, "--data-dir", tmp_path / "nodata", "--out-dir", tmp_path / "out",
                         *common(tmp_path))
    assert_error(code, out, err, fragment)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("mode", ["distil", "rnn"])
@pytest.mark.parametrize("breakage,fragment", [
    ("get_input_embeddings is None", "has no input embeddings"),
    ("get_input_embeddings raises", "has no input embeddings"),
    ("student wider than the teacher", "--rnn-embd 64 exceeds the teacher's embedding width 32"),
    ("no teacher", "does not exist"),
])
def test_bad_teacher_embeddings_are_reported_before_the_data(tiny_bert, tmp_path, capsys, monkeypatch, mode,
                                                              breakage, fragment):
    from transformers import BertForSequenceClassification
    teacher = tiny_bert if breakage != "no teacher" else tmp_path / "no_teacher"
    if breakage == "get_input_embeddings is None":
        monkeypatch.setattr(BertForSequenceClassification, "get_input_embeddings", lambda self: None)
    elif breakage == "get_input_embeddings raises":
        def raises(self):
            raise NotImplementedError("no embeddings here")
        monkeypatch.setattr(BertForSequenceClassification, "get_input_embeddings", raises)
    width = "64" if breakage == "student wider than the teacher" else "16"
    code, out, err = cli(capsys, mode, "--teacher", teacher, "--init-embeddings", "teacher", "--rnn-embd", width,
                         "--data-dir", tmp_path / "nodata", "--out-dir", tmp_path / "out", *common(tmp_path))
    assert_error(code, out, err, fragment, str(teacher) if breakage != "student wider than the teacher" else "")
    assert not os.path.exists(tmp_path / "out")
