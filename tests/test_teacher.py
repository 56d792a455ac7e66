"""A Hugging Face classifier as the teacher of distil: a tiny, randomly
initialised BERT that the tests save themselves (conftest's tiny_bert, stored as
float16, as the shared MiniLM teacher is), end to end on the real CoLA files, its
logits cache with the augmented transfer set (duplicates dropped), and every bad
teacher's one-line error."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from cola import STUDENT, assert_error, cli, cola_dir, common, subset_dir
from distil import AugmentConfig, augment, drop_duplicates, teacher_cache_dir
from utils import load_cola

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def teacher_copy(tiny_bert, tmp_path):
    return shutil.copytree(tiny_bert, tmp_path / "teacher")


def reference_logits(teacher_dir, texts):
    """The teacher's logits as transformers computes them, in float32, one sentence at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])


def cache_names(cache):
    return sorted(os.listdir(cache))


def test_hf_teacher_end_to_end_on_real_cola(tiny_bert, tmp_path, tmp_path_factory, capsys):
    teacher = teacher_copy(tiny_bert, tmp_path)
    data = cola_dir()
    # float32, pinned: the cached logits are compared with transformers' float32 ones below
    argv = ["distil", *STUDENT, "--epochs", "1", "--data-dir", data, "--teacher", teacher, "--augment", "1",
            "--dtype", "float32", "--out-dir", tmp_path / "distil", *common(tmp_path)]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert err.count("running the teacher") == 3  # train, val and the synthetic sentences, once each
    with open(tmp_path / "distil" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["teacher"]["source"] == os.path.abspath(teacher)
    # the seed's synthetic sentences, less those that repeat one another or a training sentence
    train, val = load_cola(data, "in")
    synthetic, dropped = drop_duplicates(augment(train.sentences, AugmentConfig(copies=1, seed=0)), train.sentences)
    assert 0 < dropped < 8551 // 2 and len(synthetic) == 8551 - dropped
    assert metrics["distillation"]["augment"] == 1 and metrics["distillation"]["duplicates_dropped"] == dropped
    assert metrics["distillation"]["transfer_sentences"] == 8551 + len(synthetic)
    assert f"{dropped} duplicates dropped" in err
    assert all("val_agreement" in e for e in metrics["epochs"])

    assert sorted(os.listdir(teacher)) == sorted(os.listdir(tiny_bert))  # the teacher's directory as it was
    cache = teacher_cache_dir(teacher)
    names = cache_names(cache)
    assert [n.split("-")[0] for n in names] == ["augment", "train", "val"]
    logits = {n.split("-")[0]: np.load(os.path.join(cache, n)) for n in names}
    assert logits["train"].shape == (8551, 2) and logits["val"].shape == (527, 2)
    assert logits["augment"].shape == (len(synthetic), 2)
    # the teacher's own float32 logits, with its own tokenizer and attention mask, batched by length or not
    rows = [0, 1, 4000, 8550]
    torch.testing.assert_close(torch.from_numpy(logits["train"][rows]),
                               reference_logits(teacher, [train.sentences[r] for r in rows]), atol=1e-4, rtol=1e-4)
    # the teacher's validation metrics, as metrics.json records them
    from train_utils import matthews_corrcoef
    assert metrics["teacher"]["val_mcc"] == pytest.approx(matthews_corrcoef(logits["val"].argmax(-1), val.labels))
    # synthetic sentences: the seed's augmentation, masks rendered as the teacher's [MASK]
    rows[-1] = len(synthetic) - 1
    texts = [synthetic[r].render("[MASK]") for r in rows]
    assert any("[MASK]" in s.render("[MASK]") for s in synthetic[:50])
    torch.testing.assert_close(torch.from_numpy(logits["augment"][rows]), reference_logits(teacher, texts),
                               atol=1e-4, rtol=1e-4)

    # The cache's reuse needs no 8551 sentences: these runs take the first 300 training and 100
    # validation rows of the same files (the later --data-dir wins), whose files join the cache.
    argv = [*argv, "--data-dir", subset_dir(tmp_path_factory)]
    code, _, err = cli(capsys, *argv, "--out-dir", tmp_path / "subset")
    assert code == 0, err
    assert err.count("running the teacher") == 3 and re.search(r"over \d+ augment sentences", err)
    subset_names = cache_names(cache)
    assert set(names) < set(subset_names) and len(subset_names) == 6
    # again: every logit from the cache
    code, _, err = cli(capsys, *argv, "--out-dir", tmp_path / "again")
    assert code == 0, err
    assert "running the teacher" not in err and err.count("from cache") == 3
    # other augmentation settings, or another seed: only the synthetic sentences are labelled anew,
    # and the caches of the first augmentation stay
    for extra in (["--mask-prob", "0.3"], ["--seed", "1"]):
        code, _, err = cli(capsys, *argv, *extra, "--out-dir", tmp_path / "other")
        assert code == 0, err
        assert err.count("running the teacher") == 1 and re.search(r"over \d+ augment sentences", err)
        assert err.count("from cache") == 2  # train and val
        shutil.rmtree(tmp_path / "other")
    assert set(subset_names) < set(cache_names(cache)) and len(cache_names(cache)) == 8

    # predict needs no teacher: the student stands alone, even with the teacher gone
    shutil.rmtree(teacher)
    code, stdout, err = cli(capsys, "predict", "--checkpoint", tmp_path / "distil", "The cat sat.")
    assert code == 0, err
    assert stdout.count("\n") == 1 and stdout.endswith("\tThe cat sat.\n"), stdout  # one line: label, p, sentence


def test_teacher_cache_flag_and_changed_teacher(tiny_bert, tmp_path, tmp_path_factory, capsys):
    teacher = teacher_copy(tiny_bert, tmp_path)
    data = subset_dir(tmp_path_factory)
    argv = ["distil", *STUDENT, "--epochs", "1", "--data-dir", data, "--teacher", teacher,
            "--teacher-cache", tmp_path / "cache", "--out-dir", tmp_path / "distil", *common(tmp_path)]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    first = cache_names(tmp_path / "cache")  # train, val and the default --augment's synthetic sentences
    assert len(first) == 3 and not os.path.exists(os.path.join(teacher, "teacher_logits"))
    # new weights: a new teacher key, and the old teacher's files are removed
    from safetensors.torch import load_file, save_file
    weights = os.path.join(teacher, "model.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if "classifier.weight" in k)
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    code, _, err = cli(capsys, *argv, "--out-dir", tmp_path / "again")
    assert code == 0, err
    assert err.count("running the teacher") == 3
    second = cache_names(tmp_path / "cache")
    assert len(second) == 3 and not set(first) & set(second)


def write_config(directory, **changes):
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("breakage,fragment", [
    ("three labels", "has 3 labels"),
    ("no head", "without a classification head"),
    ("no tokenizer", "no tokenizer files"),
    ("empty", "neither a LoRA run"),
    ("missing", "does not exist"),
])
def test_bad_teachers(tiny_bert, tmp_path, capsys, breakage, fragment):
    teacher = teacher_copy(tiny_bert, tmp_path)
    if breakage == "three labels":
        write_config(teacher, id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    elif breakage == "no head":
        write_config(teacher, architectures=["BertModel"])
    elif breakage == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(teacher, name))
    elif breakage == "empty":
        shutil.rmtree(teacher)
        os.mkdir(teacher)
    else:
        shutil.rmtree(teacher)
    # the teacher is checked before the data: --data-dir points nowhere
    code, out, err = cli(capsys, "distil", "--teacher", teacher, "--data-dir", tmp_path / "nodata",
                         "--out-dir", tmp_path / "out", *common(tmp_path))
    assert_error(code, out, err, fragment, str(teacher))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flags,fragment", [
    (["--teacher-logits", "x.npy", "--augment", "2"], "--augment needs a teacher"),
    (["--kd-alpha", "0", "--augment", "2"], "--kd-alpha 0"),
    (["--augment", "-1"], "--augment must be >= 0"),
    (["--mask-prob", "1.5"], "--mask-prob must be in [0, 1]"),
    (["--mask-prob", "0.6", "--swap-prob", "0.6"], "--mask-prob + --swap-prob"),
    (["--max-ngram", "0"], "--max-ngram must be >= 1"),
    (["--embd-dropout", "1"], "--embd-dropout must be in [0, 1)"),
    (["--head-dropout", "-0.1"], "--head-dropout must be in [0, 1)"),
    (["--embd-weight-decay", "-1"], "--embd-weight-decay must be >= 0"),
])
def test_bad_augment_and_student_flags(tmp_path, capsys, flags, fragment):
    code, out, err = cli(capsys, "distil", "--data-dir", tmp_path / "nodata", "--out-dir", tmp_path / "out",
                         *common(tmp_path), *flags)
    assert_error(code, out, err, fragment)
    assert not os.path.exists(tmp_path / "out")


def test_read_only_teacher_caches_in_the_users_cache(tiny_bert, tmp_path, tmp_path_factory, capsys, monkeypatch):
    """A shared teacher's directory is never written to, even by root (whom os.access
    lets write anywhere): its logits go to XDG_CACHE_HOME/gpt2-lora-distil/."""
    teacher = teacher_copy(tiny_bert, tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    os.chmod(teacher, 0o555)
    try:
        code, _, err = cli(capsys, "distil", *STUDENT, "--epochs", "1", "--data-dir", subset_dir(tmp_path_factory),
                           "--teacher", teacher, "--augment", "0", "--out-dir", tmp_path / "distil",
                           *common(tmp_path))
    finally:
        os.chmod(teacher, 0o755)
    assert code == 0, err
    assert sorted(os.listdir(teacher)) == sorted(os.listdir(tiny_bert))  # nothing added
    (cache,) = os.listdir(tmp_path / "xdg" / "gpt2-lora-distil" / "teacher_logits")
    assert len(os.listdir(tmp_path / "xdg" / "gpt2-lora-distil" / "teacher_logits" / cache)) == 2


def test_teacher_by_hub_id_from_the_local_cache(tiny_bert, tmp_path, tmp_path_factory, capsys, monkeypatch):
    """--teacher owner/name: the hub snapshot, taken from the Hugging Face cache with no
    network (laid out here as huggingface_hub lays it out); its logits are cached in the
    user's cache, not inside the Hugging Face one. Not cached and offline: one line."""
    from huggingface_hub import constants
    hub_cache, user_cache = tmp_path / "hub", tmp_path / "user_cache"
    repo = hub_cache / "models--someone--tiny-cola-bert"
    shutil.copytree(tiny_bert, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_cache))
    argv = ["distil", *STUDENT, "--epochs", "1", "--data-dir", subset_dir(tmp_path_factory), "--augment", "0",
            "--out-dir", tmp_path / "distil", *common(tmp_path)]
    code, _, err = cli(capsys, *argv, "--teacher", "someone/tiny-cola-bert")
    assert code == 0, err
    assert "from the hub (someone/tiny-cola-bert)" in err
    with open(tmp_path / "distil" / "metrics.json") as f:
        assert json.load(f)["teacher"]["source"] == "someone/tiny-cola-bert"
    assert not (repo / "snapshots" / "0123abc" / "teacher_logits").exists()
    assert len(os.listdir(user_cache / "gpt2-lora-distil" / "teacher_logits")) == 1
    code, stdout, err = cli(capsys, *argv, "--teacher", "someone/not-cached", "--overwrite")
    assert_error(code, stdout, err, "someone/not-cached", "HF_HUB_OFFLINE", "--teacher DIR")


def test_bench_predict_times_a_hugging_face_teacher_with_its_own_tokenizer(tiny_bert, tmp_path):
    """bench.py predict's teacher row with --teacher DIR: the teacher's parameters,
    its weights' float16 bytes, and rates from timing every sentence."""
    import argparse

    import bench
    from distil import HFTeacher
    from transformers import AutoModelForSequenceClassification
    args = argparse.Namespace(teacher=tiny_bert, repeats=1, single_sentences=3)
    sentences = ["the cat sat on the mat .", "who ?", "john seems happy .", "colorless green ideas sleep ."]
    name, row = bench.hf_teacher_row(args, sentences, torch.device("cpu"), str(tmp_path))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert name == f"HF teacher ({os.path.basename(tiny_bert)})"
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["mb"] == pytest.approx(2 * row["params"] / 2 ** 20, rel=0.05)  # float16, as its files hold it
    assert row["sentences_per_s"] > 0 and row["ms_batch1"] > 0
    assert HFTeacher(tiny_bert).model.dtype == torch.float32  # timed as distil runs it


def test_bench_predict_without_a_teacher_times_the_minilm_shape(tmp_path, monkeypatch):
    import argparse

    import bench
    from transformers import BertForSequenceClassification
    built = []
    original = BertForSequenceClassification.__init__

    def spy(self, config, *a, **k):
        built.append(config)
        original(self, config, *a, **k)
    monkeypatch.setattr(BertForSequenceClassification, "__init__", spy)
    args = argparse.Namespace(teacher=None, repeats=1, single_sentences=1)
    name, row = bench.hf_teacher_row(args, ["who ?", "the cat sat ."], torch.device("cpu"), str(tmp_path))
    assert name == "MiniLM-shaped teacher" and len(built) == 1
    assert {k: getattr(built[0], k) for k in bench.MINILM_SHAPE} == bench.MINILM_SHAPE
    assert 22_000_000 < row["params"] < 23_000_000  # all-MiniLM-L6-v2 with a 2-label head: 22.7M
