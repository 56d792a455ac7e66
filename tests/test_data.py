"""utils.py's CoLA loading (release and GLUE forms, validation splits, bad
files) and batching (every row once, right padding, reproducible shuffles),
plus the classifier's invariance to padding."""
import os
import shutil

import pytest
import torch

from cola import COLA_FILES, COLA_ROWS, assert_error, cli, cola_dir, read_rows, write_subset
from conftest import EOT
from utils import Split, TokenizedSplit, UserError, encode, load_cola, read_cola_tsv


def write_tsv(path, lines):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def row(label, sentence, source="src1", annotation=""):
    return f"{source}\t{label}\t{annotation}\t{sentence}"


GOOD = [row(1, "The cat sat."), row(0, "Cat the sat.", annotation="*"), row(1, "Dogs bark loudly.")]


def release_dir(path, train=GOOD, dev=GOOD[:2], out=GOOD[1:]):
    os.makedirs(path, exist_ok=True)
    for name, lines in (("in_domain_train.tsv", train), ("in_domain_dev.tsv", dev), ("out_of_domain_dev.tsv", out)):
        if lines is not None:
            write_tsv(os.path.join(path, name), lines)
    return str(path)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def test_read_release_file(tmp_path):
    path = write_tsv(tmp_path / "in_domain_train.tsv", GOOD + ["", row(0, 'He said "hi\' to me.')])
    split = read_cola_tsv(path)
    # the blank line is skipped; quotes are plain characters (no CSV quoting in CoLA)
    assert split.sentences == ["The cat sat.", "Cat the sat.", "Dogs bark loudly.", 'He said "hi\' to me.']
    assert split.labels == [1, 0, 1, 0]
    assert split.source == path
    assert len(split) == 4


def test_release_form_train_and_validation_splits(tmp_path):
    data = release_dir(tmp_path, train=GOOD, dev=[row(0, "In one."), row(1, "In two.")],
                       out=[row(1, "Out one.")])
    train, val = load_cola(data, "in")
    assert train.sentences == [r.split("\t")[3] for r in GOOD]
    assert val.sentences == ["In one.", "In two."] and val.labels == [0, 1]
    _, val = load_cola(data, "out")
    assert val.sentences == ["Out one."] and val.labels == [1]
    _, val = load_cola(data, "all")
    assert val.sentences == ["In one.", "In two.", "Out one."] and val.labels == [0, 1, 1]


def test_real_data_validation_split_sizes():
    data = cola_dir()
    expected = {"in": 527, "out": 516, "all": 1043}
    for val_split, n in expected.items():
        train, val = load_cola(data, val_split)
        assert len(train) == COLA_ROWS["train"]
        assert len(val) == n, val_split
    # the same rows, in the files' order, as a naive parse of the files
    _, val = load_cola(data, "all")
    naive = read_rows(os.path.join(data, COLA_FILES["in"])) + read_rows(os.path.join(data, COLA_FILES["out"]))
    assert list(zip(val.labels, val.sentences)) == naive


def test_glue_form(tmp_path):
    """GLUE's CoLA: train.tsv, and dev.tsv = in-domain dev (527) + out-of-domain dev (516)."""
    data = cola_dir()
    glue = tmp_path / "glue"
    glue.mkdir()
    write_subset(tmp_path / "sub", rows={"train": 50})
    shutil.copy(tmp_path / "sub" / COLA_FILES["train"], glue / "train.tsv")
    with open(glue / "dev.tsv", "wb") as f:
        for name in (COLA_FILES["in"], COLA_FILES["out"]):
            with open(os.path.join(data, name), "rb") as part:
                f.write(part.read())
    release_in, release_out = (read_rows(os.path.join(data, COLA_FILES[s])) for s in ("in", "out"))
    for val_split, expected in (("in", release_in), ("out", release_out), ("all", release_in + release_out)):
        train, val = load_cola(str(glue), val_split)
        assert len(train) == 50
        assert list(zip(val.labels, val.sentences)) == expected, val_split
    assert [len(load_cola(str(glue), s)[1]) for s in ("in", "out", "all")] == [527, 516, 1043]


def test_glue_form_with_other_dev_size(tmp_path):
    (tmp_path / "train.tsv").write_text("\n".join(GOOD) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(GOOD) + "\n")
    _, val = load_cola(str(tmp_path), "all")
    assert len(val) == 3
    with pytest.raises(UserError, match="--val-split all"):
        load_cola(str(tmp_path), "in")


@pytest.mark.parametrize("line_no,bad,expected", [
    (3, "src1\t1\tThree columns only.", "expected 4 tab-separated columns"),
    (2, "src1\t1\t\tToo\tmany", "expected 4 tab-separated columns"),
    (2, row(2, "Label two."), "label must be 0 or 1"),
    (3, row("x", "Label x."), "label must be 0 or 1"),
    (1, row("", "No label."), "label must be 0 or 1"),
    (3, row(1, ""), "empty sentence"),
    (2, row(0, "   "), "empty sentence"),
])
def test_malformed_line_names_file_and_line(tmp_path, line_no, bad, expected):
    lines = list(GOOD)
    lines.insert(line_no - 1, bad)
    data = release_dir(tmp_path, train=lines)
    path = os.path.join(data, "in_domain_train.tsv")
    with pytest.raises(UserError) as caught:
        read_cola_tsv(path)
    assert f"{path}:{line_no}:" in str(caught.value)
    assert expected in str(caught.value)
    with pytest.raises(UserError, match=f"in_domain_train.tsv:{line_no}:"):
        load_cola(data, "in")


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_tsv(tmp_path / "in_domain_dev.tsv", [GOOD[0], "", GOOD[1], row(7, "Bad label on line four.")])
    with pytest.raises(UserError, match=f"{path}:4:"):
        read_cola_tsv(path)


def test_malformed_dev_file_is_reported_too(tmp_path):
    data = release_dir(tmp_path, dev=[GOOD[0], "only one column"])
    with pytest.raises(UserError, match="in_domain_dev.tsv:2:"):
        load_cola(data, "in")


def test_empty_file(tmp_path):
    data = release_dir(tmp_path, train=[])
    with pytest.raises(UserError, match="in_domain_train.tsv holds no sentences"):
        load_cola(data, "in")
    data = release_dir(tmp_path / "blank", dev=["", ""])
    with pytest.raises(UserError, match="in_domain_dev.tsv holds no sentences"):
        load_cola(data, "in")


def test_not_utf8_names_the_line(tmp_path):
    data = release_dir(tmp_path)
    with open(os.path.join(data, "in_domain_train.tsv"), "wb") as f:
        f.write(("".join(line + "\n" for line in GOOD * 3000)).encode() + b"src\t1\t\tCaf\xe9 au lait.\n")
    with pytest.raises(UserError, match=r"in_domain_train\.tsv:9001: not UTF-8"):
        load_cola(data, "in")


def test_missing_files(tmp_path):
    data = release_dir(tmp_path / "no_dev", dev=None)
    with pytest.raises(UserError, match="in_domain_dev.tsv is missing"):
        load_cola(data, "in")
    data = release_dir(tmp_path / "no_train", train=None)
    with pytest.raises(UserError, match="in_domain_train.tsv is missing"):
        load_cola(data, "in")
    data = release_dir(tmp_path / "no_out", out=None)
    assert len(load_cola(data, "in")[1]) == 2  # the out-of-domain file is only needed when asked for
    for val_split in ("out", "all"):
        with pytest.raises(UserError, match="out_of_domain_dev.tsv"):
            load_cola(data, val_split)
    glue = tmp_path / "glue"
    glue.mkdir()
    (glue / "train.tsv").write_text("\n".join(GOOD) + "\n")
    with pytest.raises(UserError, match="dev.tsv is missing"):
        load_cola(str(glue), "all")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no CoLA files in"):
        load_cola(str(empty), "in")
    with pytest.raises(UserError, match="--val-split"):
        load_cola(str(tmp_path / "no_out"), "both")


def test_bad_data_through_the_cli(tmp_path, capsys):
    lines = list(GOOD)
    lines.insert(1, row(3, "Label three."))
    data = release_dir(tmp_path / "data", train=lines)
    code, out, err = cli(capsys, "rnn", "--data-dir", data, "--out-dir", tmp_path / "out",
                         "--plots-dir", tmp_path / "plots", "--no-progress")
    assert_error(code, out, err, f"{os.path.join(data, 'in_domain_train.tsv')}:2:", "label must be 0 or 1")
    assert not os.path.exists(tmp_path / "out" / "metrics.json")
    code, out, err = cli(capsys, "rnn", "--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "out",
                         "--plots-dir", tmp_path / "plots", "--no-progress")
    assert_error(code, out, err, "no CoLA files in")


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

def synthetic_split(n=37):
    """Sentences of 1 to ~20 tokens in no particular length order, labels alternating."""
    words = "the quick brown fox jumps over a lazy dog while birds sing".split()
    sentences = [" ".join(words[(i * 7) % len(words):][:1 + (i * 5) % 13]) + (" again" * (i % 4)) + "."
                 for i in range(n)]
    return TokenizedSplit(Split(sentences, [i % 2 for i in range(n)], "synthetic"))


def check_batch(split, batch):
    """Right padding with EOT, padded to the batch's longest row, lengths and labels right."""
    rows = batch.rows.tolist()
    lengths = [len(split.tokens[r]) for r in rows]
    assert batch.lengths.tolist() == lengths
    assert batch.idx.shape == (len(rows), max(lengths))
    assert batch.idx.dtype == torch.long
    for i, r in enumerate(rows):
        assert batch.idx[i, :lengths[i]].tolist() == split.tokens[r]
        assert (batch.idx[i, lengths[i]:] == EOT).all()
    assert batch.labels.tolist() == [split.labels[r].item() for r in rows]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 37, 100])
def test_every_row_once_and_right_padded(shuffle, batch_size):
    split = synthetic_split()
    generator = torch.Generator().manual_seed(3)
    for _epoch in range(2):
        batches = split.batches(batch_size, shuffle=shuffle, generator=generator, bucket_batches=2)
        rows = [r for b in batches for r in b.rows.tolist()]
        assert sorted(rows) == list(range(len(split)))
        assert all(0 < len(b.labels) <= batch_size for b in batches)
        for batch in batches:
            check_batch(split, batch)


def test_tokens_and_sentences():
    split = synthetic_split()
    assert split.tokens == [encode(s) for s in split.split.sentences]
    lengths = sorted({len(t) for t in split.tokens})
    assert len(lengths) > 5 and lengths[0] < lengths[-1]  # a real mix of lengths to pad


def test_unshuffled_batches_in_length_order():
    split = synthetic_split()
    batches = split.batches(4)
    lengths = [n for b in batches for n in b.lengths.tolist()]
    assert lengths == sorted(lengths)
    # grouping similar lengths keeps padding small: less than padding to the global max
    padded = sum(b.idx.numel() for b in batches)
    assert padded < len(split) * max(lengths)


def epoch_orders(split, seed, epochs=3, batch_size=4):
    generator = torch.Generator().manual_seed(seed)
    return [[b.rows.tolist() for b in split.batches(batch_size, shuffle=True, generator=generator,
                                                         bucket_batches=2)]
            for _ in range(epochs)]


def test_shuffling_differs_across_epochs_and_is_reproducible():
    split = synthetic_split()
    first = epoch_orders(split, seed=0)
    assert first[0] != first[1] and first[1] != first[2]
    assert epoch_orders(split, seed=0) == first  # same seed, same batches, epoch by epoch
    assert epoch_orders(split, seed=1) != first
    # the global RNG plays no part when a generator is given
    torch.manual_seed(123)
    again = epoch_orders(split, seed=0)
    assert again == first


def test_truncation_keeps_the_last_tokens():
    sentence = "one two three four five six seven eight nine ten."
    full = encode(sentence)
    split = TokenizedSplit(Split([sentence, "Hi."], [1, 0], "x"), max_len=4)
    assert split.tokens[0] == full[-4:]
    assert split.tokens[1] == encode("Hi.")


# ---------------------------------------------------------------------------
# Padding invariance of the GPT-2 classifier
# ---------------------------------------------------------------------------

def test_classifier_output_alone_equals_in_padded_batch(tiny_ckpt):
    from checkpoints import load_gpt
    from model import GPTClassifier, add_lora, lora_layers
    gpt = add_lora(load_gpt(tiny_ckpt.path))
    for layer in lora_layers(gpt):  # a non-zero update, so the LoRA path is exercised too
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    classifier = GPTClassifier(gpt).eval()
    split = synthetic_split(12)
    batches = split.batches(6, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert any(len(set(b.lengths.tolist())) > 1 for b in batches)  # some rows really are padded
    with torch.no_grad():
        for batch in batches:
            together = classifier(batch.idx, batch.lengths)
            for i, r in enumerate(batch.rows.tolist()):
                alone = classifier(torch.tensor([split.tokens[r]]), torch.tensor([len(split.tokens[r])]))
                torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)
            # and the padding token's value does not matter either
            other = batch.idx.clone()
            for i, n in enumerate(batch.lengths.tolist()):
                other[i, n:] = 13
            torch.testing.assert_close(classifier(other, batch.lengths), together, atol=1e-5, rtol=0)


def test_shipped_cola_is_the_default_and_matches_its_readme():
    """data/cola ships CoLA 1.1: the default --data-dir, rows and sha256 as its README states."""
    import hashlib
    import re

    import run
    from utils import DEFAULT_DATA_DIR
    for mode in ("rnn", "distil", "LoRA", "eval"):
        args = run.build_parser().parse_args([mode] + (["--checkpoint", "x"] if mode == "eval" else []))
        assert args.data_dir == DEFAULT_DATA_DIR == cola_dir()
    with open(os.path.join(cola_dir(), "README.md")) as f:
        readme = f.read()
    for split, name in COLA_FILES.items():
        row = re.search(rf"\| {re.escape(name)} \| (\d+) \| .* \| ([0-9a-f]{{64}}) \|", readme)
        assert row, name
        with open(os.path.join(cola_dir(), name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == row.group(2), name
        assert int(row.group(1)) == COLA_ROWS[split]
    train, val = load_cola(val_split="in")
    assert (len(train), len(val)) == (COLA_ROWS["train"], COLA_ROWS["in"])
