"""`run.py LoRA`, predict and eval end to end (in-process through run.main), the
metrics (MCC, accuracy, confusion), metrics.json and plots, the best epoch's
checkpoint, PEFT-compatibility of a real run's adapter, one-line errors for bad
input, and atomic file writes."""
import io
import json
import math
import os
import shutil
import stat
import sys

import pytest
import torch

import train_utils
from cola import COLA_FILES, assert_error, cli, cola_dir, common, lora_full_run, read_rows, subset_dir
from conftest import EOT, TINY
from train_utils import accuracy, confusion, matthews_corrcoef, mcc_from_confusion
import utils
from utils import atomic_write, encode, load_cola

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SENTENCES = ["The cat sat on the mat.", "Mat the on sat cat the.", "John seems to be happy.",
             "Who do you think that left?", "The more you eat, the fatter you get."]


@pytest.fixture
def full_run(tmp_path_factory, tiny_ckpt):
    """(out dir, plots dir) of `run.py LoRA --epochs 1` on the full real CoLA directory."""
    return lora_full_run(tmp_path_factory, tiny_ckpt.path)


@pytest.fixture(scope="module")
def narrow_ckpt(tmp_path_factory):
    """A second tiny GPT-2 of another width (n_embd 32), as transformers saves it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("tiny32")
    GPT2LMHeadModel(GPT2Config(**{**TINY, "n_embd": 32})).save_pretrained(path)
    return str(path)


def parse_predictions(out):
    """stdout of predict -> [(label, probability, sentence)], one per line."""
    rows = []
    for line in out.splitlines():
        label, p, sentence = line.split("\t", 2)
        rows.append((int(label), float(p), sentence))
    return rows


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def test_confusion_layout_accuracy_and_asymmetric_mcc():
    labels = [1, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    preds = [1, 1, 1, 1, 0, 0, 0, 1, 0, 1]
    # by hand: tp at 0,1,2,3,9 -> 5; fn at 4,5 -> 2; tn at 6,8 -> 2; fp at 7 -> 1
    assert confusion(preds, labels) == [[2, 1], [2, 5]]  # [[tn, fp], [fn, tp]]
    expected = (5 * 2 - 1 * 2) / math.sqrt((5 + 1) * (5 + 2) * (2 + 1) * (2 + 2))  # 8 / sqrt(504)
    # a second definition to check against: MCC is Pearson's correlation of the two 0/1 vectors
    from statistics import correlation
    assert matthews_corrcoef(preds, labels) == pytest.approx(correlation(preds, labels), abs=1e-12)
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected, abs=1e-12)
    assert mcc_from_confusion([[2, 1], [2, 5]]) == pytest.approx(expected, abs=1e-12)
    assert accuracy(preds, labels) == pytest.approx(0.7)
    # tensors work as lists do; MCC is symmetric in predictions and labels
    assert matthews_corrcoef(torch.tensor(preds), torch.tensor(labels)) == pytest.approx(expected, abs=1e-12)
    assert matthews_corrcoef(labels, preds) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("preds,labels,expected", [
    ([0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0], 1.0),                     # perfect
    ([1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 0], -1.0),                    # inverse
    ([1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0], 0.0),                     # all one class: tn + fn = 0, undefined
    ([0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0], 0.0),                     # all the other: tp + fp = 0
    ([0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1], 0.0),                     # one class of labels: tn + fp = 0
    ([1, 0, 1, 1], [1, 1, 1, 0], -1 / 3),                               # sklearn's docs example: tp 2, fp 1, fn 1
    ([1, 0, 0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0, 0], 7 / 15),      # tp 2, tn 4, fp 1, fn 1
])
def test_mcc_cases(preds, labels, expected):
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected, abs=1e-12)


def test_mcc_edge_values():
    assert mcc_from_confusion([[0, 0], [0, 0]]) == 0.0
    assert accuracy([], []) == 0.0
    assert confusion([1, 1, 0], [0, 1, 0]) == [[1, 1], [0, 1]]


def test_best_epoch_is_the_first_maximum():
    history = [{"epoch": 1, "val_mcc": 0.1}, {"epoch": 2, "val_mcc": 0.3}, {"epoch": 3, "val_mcc": 0.3},
               {"epoch": 4, "val_mcc": -0.2}]
    assert train_utils.best_epoch(history)["epoch"] == 2


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, exception):
    path = tmp_path / "metrics.json"
    path.write_text("old contents")

    def write(tmp):
        assert os.path.dirname(tmp) == str(tmp_path)  # same directory: the rename is atomic
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise exception("disk full")

    with pytest.raises(exception):
        atomic_write(str(path), write)
    assert path.read_text() == "old contents"
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left behind


def test_atomic_write_replaces_and_creates(tmp_path):
    path = tmp_path / "a" / "b" / "file.txt"
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("one"))
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("two"))
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["file.txt"]
    # the writers built on it
    utils.save_json(str(tmp_path / "m.json"), {"x": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": [1, 2]}
    from safetensors.torch import load_file
    utils.save_tensors(str(tmp_path / "t.safetensors"), {"w": torch.arange(6.0).view(2, 3)})
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["w"], torch.arange(6.0).view(2, 3))


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "atomic.txt"), lambda tmp: open(tmp, "w").write("x"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        # safetensors writes a file of its own over the temporary name: its mode must follow too
        utils.save_tensors(str(tmp_path / "student.safetensors"), {"w": torch.zeros(2)})
    finally:
        os.umask(umask)
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "student.safetensors").st_mode) == 0o644


# ---------------------------------------------------------------------------
# `run.py LoRA` on the full CoLA directory: metrics.json, plots, the adapter
# ---------------------------------------------------------------------------

def test_lora_run_metrics_schema(full_run, tiny_ckpt):
    out, plots = full_run
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert {"mode", "args", "params", "epochs", "best_epoch"} <= set(metrics)
    assert metrics["mode"] == "LoRA"
    assert metrics["args"]["data_dir"] == cola_dir() and metrics["args"]["epochs"] == 1
    assert metrics["args"]["weights"] == tiny_ckpt.path
    from checkpoints import load_gpt
    base = load_gpt(tiny_ckpt.path).num_params()
    trainable = 8_320  # 2 layers * 4 * (256 + 128 + 320 + 320) + head 2 * 64
    assert metrics["params"] == {"total": base + trainable, "trainable": trainable}
    assert len(metrics["epochs"]) == 1
    epoch = metrics["epochs"][0]
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_mcc", "seconds"} <= set(epoch)
    assert epoch["epoch"] == 1 and metrics["best_epoch"] == 1
    assert 0 < epoch["train_loss"] < 5 and 0 < epoch["val_loss"] < 5
    assert 0 <= epoch["train_acc"] <= 1 and 0 <= epoch["val_acc"] <= 1 and -1 <= epoch["val_mcc"] <= 1
    assert epoch["seconds"] > 0
    # the validation set is the full in-domain dev file: its accuracy is a multiple of 1/527
    assert round(epoch["val_acc"] * 527) == pytest.approx(epoch["val_acc"] * 527, abs=1e-3)
    lora = metrics["lora"]
    assert lora["rank"] == 4 and lora["alpha"] == 8.0 and lora["train_layernorm"] is False
    assert lora["base"] == os.path.abspath(tiny_ckpt.path)
    with open(os.path.join(plots, "LoRA_LoRA.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_eval_reproduces_the_runs_validation_metrics(full_run, tmp_path, capsys):
    out, _ = full_run
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    output = tmp_path / "eval.json"
    code, stdout, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", cola_dir(), "--batch-size", 128,
                            "--output", output)
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["n"] == 527
    assert result["mcc"] == pytest.approx(best["val_mcc"], abs=1e-9)
    assert result["acc"] == pytest.approx(best["val_acc"], abs=1e-9)
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    c = result["confusion"]
    labels = [label for label, _ in read_rows(os.path.join(cola_dir(), COLA_FILES["in"]))]
    assert c["tn"] + c["fp"] == labels.count(0) and c["fn"] + c["tp"] == labels.count(1)
    assert result["acc"] == pytest.approx((c["tn"] + c["tp"]) / 527)
    assert f"MCC {result['mcc']:.4f}" in stdout and "(527 sentences)" in stdout
    # out-of-domain validation through the same checkpoint
    code, stdout, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", cola_dir(), "--val-split", "out",
                            "--output", tmp_path / "eval_out.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval_out.json").read_text())["n"] == 516


def test_saved_adapter_is_the_best_epochs(tmp_path_factory, tmp_path, tiny_ckpt, capsys, monkeypatch):
    """Validation MCC scripted to 0.2, 0.6, 0.4: epoch 2 is best, and the adapter on
    disk must be epoch 2's weights, not the last epoch's."""
    real_evaluate = train_utils.evaluate
    scripted = iter([0.2, 0.6, 0.4])

    def evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        result["mcc"] = next(scripted)
        return result

    data = subset_dir(tmp_path_factory)
    out = tmp_path / "LoRA"
    with monkeypatch.context() as patch:
        patch.setattr(train_utils, "evaluate", evaluate)
        code, _, err = cli(capsys, "LoRA", "--weights", tiny_ckpt.path, "--data-dir", data, "--epochs", 3,
                           "--lr", "3e-3", "--out-dir", out, *common(tmp_path))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["epochs"]
    assert [r["val_mcc"] for r in epochs] == [0.2, 0.6, 0.4]
    assert metrics["best_epoch"] == 2
    assert abs(epochs[1]["val_loss"] - epochs[2]["val_loss"]) > 1e-4  # the epochs are distinguishable
    code, _, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", data, "--batch-size", 128,
                       "--output", tmp_path / "eval.json")
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["loss"] == pytest.approx(epochs[1]["val_loss"], rel=1e-5)
    assert result["acc"] == pytest.approx(epochs[1]["val_acc"], abs=1e-9)


# ---------------------------------------------------------------------------
# predict, and the adapter in PEFT
# ---------------------------------------------------------------------------

def test_predict_prints_one_line_per_sentence(full_run, capsys, monkeypatch):
    out, _ = full_run
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, *SENTENCES)
    assert code == 0, err
    rows = parse_predictions(stdout)
    assert [s for _, _, s in rows] == SENTENCES
    for label, p, _ in rows:
        assert 0 <= p <= 1 and label == int(p >= 0.5)
    # one per line on stdin; small batches give the same numbers
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(SENTENCES[:3]) + "\n"))
    code, stdout2, err = cli(capsys, "predict", "--checkpoint", out, "--batch-size", 1)
    assert code == 0, err
    assert parse_predictions(stdout2) == rows[:3]
    # a blank line is not dropped in silence (every later answer would be one line off)
    monkeypatch.setattr(sys, "stdin", io.StringIO(SENTENCES[0] + "\n\n" + SENTENCES[1] + "\n"))
    code, stdout3, err = cli(capsys, "predict", "--checkpoint", out)
    assert_error(code, stdout3, err, "line 2", "blank", only_line=False)
    code, stdout3, err = cli(capsys, "predict", "--checkpoint", out, SENTENCES[0], " ")
    assert_error(code, stdout3, err, "argument 2", "blank", only_line=False)


def test_real_runs_adapter_in_peft_reproduces_predict(full_run, tiny_ckpt, capsys):
    import peft
    from transformers import GPT2ForSequenceClassification
    out, _ = full_run
    # float32, pinned: compared with peft's float32 below (test_bf16_predict_tracks_peft allows bf16's error)
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, "--dtype", "float32", *SENTENCES)
    assert code == 0, err
    printed = torch.tensor([p for _, p, _ in parse_predictions(stdout)])
    hf = GPT2ForSequenceClassification.from_pretrained(tiny_ckpt.path, num_labels=2, pad_token_id=EOT)
    model = peft.PeftModel.from_pretrained(hf, os.path.join(out, "adapter")).eval()
    tokens = [encode(s) for s in SENTENCES]
    width = max(map(len, tokens))
    idx = torch.tensor([t + [EOT] * (width - len(t)) for t in tokens])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens])
    with torch.no_grad():
        probabilities = model(input_ids=idx, attention_mask=mask).logits.softmax(-1)[:, 1]
    # predict prints 4 decimals: up to 5e-5 of rounding
    assert (probabilities - printed).abs().max() < 1e-4
    assert probabilities.max() - probabilities.min() > 1e-4  # not one constant answer


# ---------------------------------------------------------------------------
# Bad input: exit status 2 and one line on stderr
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora-alpha", "-1"], "--lora-alpha must be > 0"),
    (["--lora-targets", "c_attn,foo"], "foo"),
    (["--lora-targets", ","], "--lora-targets"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_lora_flags(tmp_path, tiny_ckpt, capsys, flags, fragment):
    code, out, err = cli(capsys, "LoRA", "--weights", tiny_ckpt.path, "--data-dir", tmp_path / "nodata",
                         "--out-dir", tmp_path / "out", *common(tmp_path), *flags)
    assert_error(code, out, err, fragment)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("mode", ["predict", "eval"])
def test_missing_checkpoint(tmp_path, capsys, mode):
    extra = ["a sentence."] if mode == "predict" else ["--data-dir", tmp_path, "--output", tmp_path / "e.json"]
    code, out, err = cli(capsys, mode, "--checkpoint", tmp_path / "no_such_run", *extra)
    assert_error(code, out, err, "no_such_run", "does not exist")
    (tmp_path / "empty_run").mkdir()
    code, out, err = cli(capsys, mode, "--checkpoint", tmp_path / "empty_run", *extra)
    assert_error(code, out, err, "holds no checkpoint")


def copy_run(out, dst):
    shutil.copytree(out, dst, ignore=shutil.ignore_patterns("teacher_logits"))
    return dst


@pytest.mark.parametrize("mode", ["predict", "eval"])
def test_corrupt_adapter(full_run, tmp_path, capsys, mode):
    run_dir = copy_run(full_run[0], tmp_path / "run")
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file at all")
    extra = ["a sentence."] if mode == "predict" else ["--data-dir", cola_dir(), "--output", tmp_path / "e.json"]
    code, out, err = cli(capsys, mode, "--checkpoint", run_dir, *extra)
    assert_error(code, out, err, "adapter_model.safetensors", "corrupt")
    # a corrupt config, too
    (run_dir / "adapter" / "adapter_config.json").write_text("{not json")
    code, out, err = cli(capsys, mode, "--checkpoint", run_dir, *extra)
    assert_error(code, out, err, "adapter_config.json", "corrupt")


def test_adapter_on_a_base_of_another_shape(full_run, narrow_ckpt, tmp_path, capsys):
    out, _ = full_run
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, "--weights", narrow_ckpt, "a sentence.")
    line = assert_error(code, stdout, err, "shape")
    assert "(4, 64)" in line and "(4, 32)" in line
    code, stdout, err = cli(capsys, "eval", "--checkpoint", out, "--weights", narrow_ckpt, "--data-dir", cola_dir(),
                            "--output", tmp_path / "e.json")
    assert_error(code, stdout, err, "shape")
    # the right base passed explicitly works
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, "--weights", full_run_base(out), "a sentence.")
    assert code == 0, err


def full_run_base(out):
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        return json.load(f)["base_model_name_or_path"]


LONG_SENTENCE = " ".join(["word"] * 200) + "."  # 201 tokens: more than the tiny base's 128 positions


def test_predict_truncates_long_sentences_to_the_base_context(full_run, capsys):
    code, stdout, err = cli(capsys, "predict", "--checkpoint", full_run[0], "Short one.", LONG_SENTENCE)
    assert code == 0, err
    assert len(parse_predictions(stdout)) == 2


def test_eval_truncates_long_sentences_to_the_base_context(full_run, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "in_domain_train.tsv").write_text("s\t1\t\tA sentence.\n")
    (data / "in_domain_dev.tsv").write_text(f"s\t1\t\tA sentence.\ns\t0\t*\t{LONG_SENTENCE}\n")
    code, stdout, err = cli(capsys, "eval", "--checkpoint", full_run[0], "--data-dir", data,
                            "--output", tmp_path / "e.json")
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2


def test_lora_targets_and_layernorm_reach_the_adapter(tmp_path_factory, tmp_path, tiny_ckpt, capsys):
    data = subset_dir(tmp_path_factory)
    out = tmp_path / "LoRA"
    code, _, err = cli(capsys, "LoRA", "--weights", tiny_ckpt.path, "--data-dir", data, "--epochs", 1,
                       "--train-layernorm", "--lora-targets", "c_attn", "--lora-rank", 2, "--lora-alpha", 6,
                       "--out-dir", out, *common(tmp_path))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    # c_attn only, rank 2: 2 layers * 2 * (64 + 192) = 1,024; head 128; LayerNorms 2 * 2 * 128 + 128 = 640
    assert metrics["params"]["trainable"] == 1_024 + 128 + 640
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["r"] == 2 and config["lora_alpha"] == 6.0
    assert config["modules_to_save"] == ["score", "ln_1", "ln_2", "ln_f"]
    assert config["fan_in_fan_out"] is True and config["task_type"] == "SEQ_CLS"
    # predict rebuilds the same classifier: LayerNorms trained and loaded
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, *SENTENCES)
    assert code == 0, err
    assert len(parse_predictions(stdout)) == len(SENTENCES)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_predict_and_eval_share_one_precision(full_run, tmp_path, capsys, dtype):
    """predict's labels on the validation sentences give exactly eval's accuracy, in
    float32 and under bf16 autocast alike (--dtype; auto is bf16 on CUDA for both)."""
    out, _ = full_run
    _, val = load_cola(cola_dir(), "in")
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out, "--dtype", dtype, *val.sentences)
    assert code == 0, err
    predicted = [label for label, _, _ in parse_predictions(stdout)]
    code, _, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", cola_dir(), "--dtype", dtype,
                       "--output", tmp_path / "e.json")
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert sum(p == label for p, label in zip(predicted, val.labels)) / len(val.labels) == \
        pytest.approx(result["acc"], abs=1e-6)
    if dtype == "bfloat16":  # and the flag does change the arithmetic
        code, stdout32, err = cli(capsys, "predict", "--checkpoint", out, "--dtype", "float32", *val.sentences[:50])
        assert [p for _, p, _ in parse_predictions(stdout32)] != \
            [p for _, p, _ in parse_predictions(stdout)][:50]


def test_lora_in_bf16_records_it_and_eval_reproduces_it(tmp_path_factory, tmp_path, tiny_ckpt, capsys):
    """LoRA --dtype bfloat16 (frozen base stored in bf16): metrics.json says so, and
    eval --dtype bfloat16 on the saved adapter (float32 base, cast by autocast)
    reproduces the run's validation numbers exactly; float32's are near them."""
    data = subset_dir(tmp_path_factory)
    out = tmp_path / "LoRA"
    code, _, err = cli(capsys, "LoRA", "--weights", tiny_ckpt.path, "--data-dir", data, "--epochs", 1,
                       "--dtype", "bfloat16", "--out-dir", out, *common(tmp_path))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["dtype"] == "bfloat16" and metrics["environment"]["precision"] == "bf16-autocast"
    best = metrics["epochs"][0]
    results = {}
    for dtype in ("bfloat16", "float32"):
        code, _, err = cli(capsys, "eval", "--checkpoint", out, "--data-dir", data, "--dtype", dtype,
                           "--batch-size", 128, "--output", tmp_path / f"{dtype}.json")
        assert code == 0, err
        results[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())
    assert results["bfloat16"]["acc"] == best["val_acc"] and results["bfloat16"]["mcc"] == best["val_mcc"]
    assert results["bfloat16"]["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert results["float32"]["loss"] == pytest.approx(best["val_loss"], abs=0.02)


# ---------------------------------------------------------------------------
# The command line's manners
# ---------------------------------------------------------------------------

def test_mode_names_are_case_insensitive_and_typos_get_a_suggestion(tmp_path, capsys):
    import run
    for spelling in ("lora", "LORA", "LoRA"):
        assert run.build_parser().parse_args(run.canonical_mode([spelling])).mode == "LoRA"
    code, out, err = cli(capsys, "distill")
    assert_error(code, out, err, "invalid choice", "did you mean distil?")
    code, out, err = cli(capsys, "rnn", "--learning-rat", "0.1", "--out-dir", tmp_path / "x")
    line = assert_error(code, out, err, "unrecognized arguments")
    code, out, err = cli(capsys, "rnn", "--rnn-hiden", "16", "--out-dir", tmp_path / "x")
    assert_error(code, out, err, "did you mean --rnn-hidden?")
    # a typo with no close flag may get no suggestion, but any it gets is a flag that rnn takes
    suggestion = line.partition("did you mean ")[2].partition("?")[0]
    if suggestion:
        _, unknown = run.build_parser().parse_known_args(["rnn", suggestion, "1"])  # "1": its value, if it takes one
        assert suggestion.startswith("--") and suggestion not in unknown, line


def test_help_lists_each_flag_once_and_underscores_still_work(capsys):
    import run
    with pytest.raises(SystemExit):
        run.main(["rnn", "--help"])
    help_text = capsys.readouterr().out
    assert help_text.count("\n  --batch-size") == 1 and "--batch_size" not in help_text
    assert "else Apple's MPS, else the CPU" in " ".join(help_text.split())  # as the README says
    args = run.build_parser().parse_args(["rnn", "--batch_size", "7", "--rnn_hidden=9", "--out_dir", "x"])
    assert (args.batch_size, args.rnn_hidden, args.out_dir) == (7, 9, "x")


def test_parameter_line_of_a_model_trained_in_full(tmp_path, tmp_path_factory, capsys):
    code, _, err = cli(capsys, "rnn", "--rnn-hidden", "8", "--rnn-embd", "4", "--epochs", "1",
                       "--data-dir", subset_dir(tmp_path_factory), "--out-dir", tmp_path / "r", *common(tmp_path))
    assert code == 0, err
    # 50257 * 4 embedding + RNN layers (4*8 + 8*8 + 2*8, then 8*8 + 8*8 + 2*8) + head 8*2 + 2
    assert "parameters: 201,302, all trained" in err and "fewer" not in err


def test_fused_optimizer_step_equals_the_plain_one():
    """The fused Adam(W) kernel (the fast path) against torch's default step: the same
    updates within float32 rounding, after 20 steps of a small DistilRNN."""
    from model import DistilRNN, RNNConfig
    from train_utils import TrainConfig, make_optimizer
    for optimizer_name in ("adamw", "adam"):
        cfg = TrainConfig(lr=1e-2, optimizer=optimizer_name, embd_weight_decay=0.1)
        torch.manual_seed(0)
        fast = DistilRNN(RNNConfig(vocab_size=50, n_embd=8, hidden=8))
        plain = DistilRNN(RNNConfig(vocab_size=50, n_embd=8, hidden=8))
        plain.load_state_dict(fast.state_dict())
        initial = fast.embedding.weight.detach().clone()
        fused = make_optimizer(list(fast.named_parameters()), cfg)
        assert fused.defaults["fused"]
        groups = [{"params": [p for n, p in plain.named_parameters() if n != "embedding.weight"]},
                  {"params": [plain.embedding.weight], "weight_decay": 0.1}]
        reference = (torch.optim.AdamW(groups, lr=1e-2, weight_decay=cfg.weight_decay) if optimizer_name == "adamw"
                     else torch.optim.Adam(plain.parameters(), lr=1e-2))
        idx, lengths = torch.randint(0, 50, (4, 6)), torch.tensor([6, 3, 5, 1])
        for _ in range(20):
            for model, optimizer in ((fast, fused), (plain, reference)):
                optimizer.zero_grad()
                model(idx, lengths).pow(2).sum().backward()
                optimizer.step()
        for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        assert (fast.embedding.weight - initial).abs().max() > 1e-3  # it did train


def test_predict_names_a_file_checkpoint_and_says_it_reads_a_terminal(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.json").write_text("{}")
    code, out, err = cli(capsys, "predict", "--checkpoint", tmp_path / "metrics.json", "A sentence.")
    assert_error(code, out, err, "metrics.json is a file", "run's directory")

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal(""))
    code, out, err = cli(capsys, "predict", "--checkpoint", tmp_path)
    assert "reading sentences from stdin" in err.splitlines()[0]
    assert_error(code, out, err, "no sentences given", only_line=False)
