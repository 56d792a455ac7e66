"""Shared fixtures: randomly initialised GPT-2 checkpoints in Hugging Face format.

Every checkpoint is built with transformers' own GPT2LMHeadModel and written with
its save_pretrained (or torch.save for the legacy .bin form), so the tests check
model.py against the reference implementation, never against itself.
"""
import os
import re
import shutil
import sys
from dataclasses import dataclass

# Quiet, offline and deterministic before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on a small shared CPU, torch's OpenMP threads spin against any other
# busy process and tiny models run ~30x slower. Subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Hugging Face's cache stays where the user keeps it when XDG_CACHE_HOME moves to a
# temporary folder for the tests' own cache (user_cache, below).
os.environ.setdefault("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME")
                                              or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"))

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_ROOT not in sys.path:
    sys.path.insert(0, PROJECT_ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from utils import seed_everything, set_process_switches  # noqa: E402

torch.set_num_threads(1)
set_process_switches()  # as run.py and bench.py do

EOT = 50256
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257,
            # wider than GPT-2's 0.02 so that logits are spread out (std ~0.8) and greedy
            # choices are never decided by float noise between two implementations
            initializer_range=0.1)


@dataclass
class Checkpoint:
    path: str     # directory with config.json + weights
    hf: object    # the transformers GPT2LMHeadModel that was saved there (eval mode)


def _hf_model(seed, **config):
    from transformers import GPT2Config, GPT2LMHeadModel
    seed_everything(seed)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def _save(hf, path):
    hf.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors")), os.listdir(path)
    assert os.path.isfile(os.path.join(path, "config.json"))
    return Checkpoint(str(path), hf)


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """XDG_CACHE_HOME for the tests' runs: the teachers' logits they cache go to a
    temporary folder, never into the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user_cache"))
    yield os.environ["XDG_CACHE_HOME"]
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def _seed_each_test():
    """Every test starts from the same global RNG state, whatever ran before it."""
    seed_everything(0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Tiny GPT-2 (2 layers, 64 wide, 128 positions, full 50257 vocabulary)."""
    return _save(_hf_model(1234, **TINY), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def gpt2_ckpt(tmp_path_factory):
    """The real gpt2 (124M) shape, random weights: GPT2Config() defaults. Its ~500 MB
    are removed when the test run ends, whether it passed or not."""
    path = tmp_path_factory.mktemp("gpt2shape")
    yield _save(_hf_model(4321), path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_bin_ckpt(tmp_path_factory):
    """Tiny checkpoint as a legacy pytorch_model.bin, in the layout of the original
    OpenAI upload on the hub: GPT2Model keys (no "transformer." prefix, no lm_head)
    plus the attn.bias / attn.masked_bias buffers that old transformers saved."""
    from transformers import GPT2Config
    hf = _hf_model(99, **TINY)
    path = tmp_path_factory.mktemp("tiny_bin")
    n = TINY["n_positions"]
    state = {}
    for key, tensor in hf.state_dict().items():
        if key.startswith("transformer."):
            state[key[len("transformer."):]] = tensor.clone()
    for layer in range(TINY["n_layer"]):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    GPT2Config(**TINY).save_pretrained(path)
    assert sorted(os.listdir(path)) == ["config.json", "pytorch_model.bin"]
    return Checkpoint(str(path), hf)


@pytest.fixture(scope="session")
def eot_ckpt(tmp_path_factory):
    """Tiny checkpoint whose every next-token prediction is <|endoftext|>: ln_f
    outputs its bias b whatever the input, and wte's row 50256 is 100 * b, so the
    logit of 50256 is 100 |b|^2 against roughly N(0, |b| * 0.1) for the others."""
    hf = _hf_model(7, **TINY)
    with torch.no_grad():
        b = torch.randn(TINY["n_embd"])
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(b)
        hf.transformer.wte.weight[EOT] = 100 * b
    return _save(hf, tmp_path_factory.mktemp("tiny_eot"))


@pytest.fixture(scope="session")
def tiny_gpt(tiny_ckpt):
    """Our GPT loaded from tiny_ckpt. Shared: tests must not modify it."""
    from checkpoints import load_gpt
    return load_gpt(tiny_ckpt.path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """BertForSequenceClassification (2 layers, 32 wide) with a word-level vocabulary
    of CoLA's training sentences, saved in float16 with its tokenizer (as the shared
    MiniLM teacher is): the Hugging Face teacher of test_teacher.py and test_student.py."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    from cola import cola_dir
    from utils import load_cola
    train, _ = load_cola(cola_dir(), "in")
    words = sorted({w for s in train.sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    path = tmp_path_factory.mktemp("tiny_bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(5)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, initializer_range=0.5)
    BertForSequenceClassification(config).half().save_pretrained(path)
    return str(path)
