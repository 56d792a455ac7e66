"""Distillation, read top-down: its settings, the loss against the teacher's logits,
the teachers (a LoRA run, or any Hugging Face classifier with its own tokenizer),
their logits cache, and the transfer set (the training sentences, then synthetic
ones labelled by the teacher; Tang et al. 2019)."""
import hashlib
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from checkpoints import (TOKENIZER_FILES, CheckpointError, HFTokens, find_adapter_dir, gpt2_files,
                         load_lora_classifier, read_json)
import hf_lora
from hub import TEACHER_HINT, gpt2_directory, hub_directory, looks_like_hub_id
from model import merge_lora
from train_utils import (accuracy, autocast_for, distillation_loss, infer, matthews_corrcoef, precision_of,
                         resolve_precision, tf32_products)
from utils import (EOT_TEXT, GPT2_TOKENS, Split, TokenizedSplit, atomic_write, barrier, info, is_main_process, one_line,
                   sha256_of_file)


@dataclass(frozen=True)
class AugmentConfig:
    copies: int = 0             # synthetic sentences per training sentence (--augment)
    mask_prob: float = 0.1      # a word becomes the mask token
    swap_prob: float = 0.1      # a word becomes another word of the same kind
    ngram_prob: float = 0.25    # the sentence is cut to one of its n-grams...
    max_ngram: int = 5          # ...of 1 to max_ngram words
    seed: int = 0


@dataclass
class DistilConfig:
    teacher: str = "runs/LoRA"     # a LoRA run's out dir or a Hugging Face classifier directory
    teacher_logits: str = None     # or a .npy of the training sentences' logits (then no teacher, no augmentation)
    teacher_cache: str = None      # default: the user's cache (teacher_cache_dir), never the teacher's directory
    alpha: float = 0.5             # weight of the teacher term; 0 = labels only, i.e. rnn
    alpha_real: float = None       # the teacher's weight on the real training sentences (None: alpha)
    temperature: float = 2.0
    loss: str = "mse"              # mse on logits (Tang; chosen over kl on 5 seeds, README) | kl at T (Hinton)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(copies=7))


class DistilLoss:
    """The loss of distil: distillation_loss against the teacher's logits of each
    batch row. Rows of the transfer set past the real sentences are synthetic
    (label -1): they get the teacher term only."""

    def __init__(self, teacher_logits, cfg: DistilConfig):
        self.teacher_logits, self.cfg = teacher_logits, cfg

    def __call__(self, student_logits, batch):
        rows = batch.rows.to(self.teacher_logits.device, non_blocking=True)
        return distillation_loss(student_logits, self.teacher_logits[rows].to(student_logits.device), batch.labels,
                                 self.cfg.alpha, self.cfg.temperature, self.cfg.loss, self.cfg.alpha_real)


# ---------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------

class LoRATeacher:
    """A LoRA run's GPT-2 classifier as the teacher. A student that starts from it
    (--init-embeddings teacher) reads GPT-2's tokenizer and starts from the base's
    token embeddings, as --init-embeddings gpt2 with that base."""
    mask_token = EOT_TEXT

    def __init__(self, run_dir, weights=None):
        self.directory, self.weights = run_dir, weights
        self.adapter_dir = find_adapter_dir(run_dir)
        self.base = weights or read_json(os.path.join(self.adapter_dir, "adapter_config.json"),
                                         "a LoRA adapter").get("base_model_name_or_path", "")
        self.description = f"GPT-2 + LoRA from {run_dir}"
        self.source = os.path.abspath(run_dir)
        self._model = None

    def key(self):
        """Digest of everything the outputs depend on: the adapter files and the base
        weights (its resolved file: for a hub id that names the revision; path, size
        and modification time, since hashing GBs each run would cost more than the
        cache saves)."""
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = os.path.join(self.adapter_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"teacher checkpoint file {path} is missing; re-run LoRA training")
            digest.update(sha256_of_file(path).encode())
        for path in gpt2_files(gpt2_directory(self.base)):
            status = os.stat(path)
            digest.update(f"{os.path.realpath(path)}:{status.st_size}:{status.st_mtime_ns}".encode())
        return digest.hexdigest()

    def student_tokenizer(self):
        return GPT2_TOKENS

    @property
    def model(self):
        """The classifier, loaded once: it gives both the student's first embeddings and the logits."""
        if self._model is None:
            self._model, _ = load_lora_classifier(self.adapter_dir, self.weights)
        return self._model

    def input_embeddings(self):
        """The base GPT-2's token embeddings, (vocab, width) (the adapters leave them as they are)."""
        return self.model.gpt.transformer.wte.weight.detach().t()

    def logits(self, texts, device, precision):
        model = self.model.to(device)
        return infer(model, TokenizedSplit.of_texts(texts, model.max_len).batches(128), device, precision)[0]


class HFTeacher:
    """Any local Hugging Face sequence classifier with 2 labels (BERT, MiniLM,
    RoBERTa, a fine-tuned GPT-2, ...) as the teacher, with its own tokenizer."""

    def __init__(self, directory):
        self.directory = directory
        config = read_json(os.path.join(directory, "config.json"), "a Hugging Face model directory")
        architectures = config.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise CheckpointError(f"teacher {directory} is a {'/'.join(architectures) or 'model'} without a "
                                  "classification head; the teacher must be a LoRA run or a "
                                  "*ForSequenceClassification directory")
        labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
        if labels != 2:
            raise CheckpointError(f"teacher {directory} has {labels} labels; CoLA needs a classifier with 2 "
                                  "(label 1 = acceptable)")
        if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
            raise CheckpointError(f"teacher {directory} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)});"
                                  " save the tokenizer next to the model: tokenizer.save_pretrained(DIR)")
        self.architecture = architectures[0]
        self.description = f"{self.architecture} from {directory}"
        self.source = os.path.abspath(directory)  # a hub id for a teacher from the hub
        self._tokenizer = self._model = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.directory)
            except Exception as e:
                raise CheckpointError(f"teacher {self.directory}: its tokenizer does not load "
                                      f"({one_line(e)})") from None
        return self._tokenizer

    @property
    def mask_token(self):
        return self.tokenizer.mask_token or self.tokenizer.unk_token or ""

    def student_tokenizer(self):
        """The teacher's tokenizer, as a student reads it (--init-embeddings teacher)."""
        return HFTokens(self.tokenizer)

    def input_embeddings(self):
        """The teacher's input (token) embeddings, (vocab, width) in float32, row i
        token i's; a CheckpointError when its model has none."""
        try:
            layer = self.model.get_input_embeddings()
        except Exception:  # NotImplementedError in models that do not expose one
            layer = None
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise CheckpointError(f"teacher {self.directory} ({self.architecture}) has no input embeddings to start "
                                  "the student from; pass --init-embeddings random or gpt2")
        return weight.detach().float()

    def key(self):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                digest.update(f"{name}:{sha256_of_file(path)}".encode())
        return digest.hexdigest()

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForSequenceClassification
            from transformers.utils import logging
            logging.disable_progress_bar()
            try:  # float32 whatever the files hold: float16 matmuls are slow or missing on CPUs
                self._model = AutoModelForSequenceClassification.from_pretrained(self.directory, dtype=torch.float32)
            except Exception as e:
                raise CheckpointError(f"teacher {self.directory} does not load ({one_line(e)})") from None
            if self.tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with end-of-text, masked anyway
                self.tokenizer.pad_token = self.tokenizer.eos_token
                self._model.config.pad_token_id = self.tokenizer.pad_token_id
        return self._model

    @torch.no_grad()
    def logits(self, texts, device, precision, batch_size=128):
        tokenizer, model = self.tokenizer, self.model.to(device).eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length
        parts = []
        with tf32_products(precision):
            for start in range(0, len(order), batch_size):
                encoded = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True,
                                    truncation=True, return_tensors="pt")
                with autocast_for(device, precision):
                    parts.append(model(**encoded.to(device)).logits.float())
        out = torch.empty(len(texts), model.config.num_labels)
        out[order] = torch.cat(parts).cpu()
        return out


class HFLoRATeacher(HFTeacher):
    """A LoRA run on a Hugging Face encoder (run.py LoRA --base) as the teacher: its
    base with the adapters merged, read with the base's tokenizer, as any Hugging
    Face teacher (--init-embeddings teacher: the base's input embeddings)."""

    def __init__(self, run_dir, weights=None):
        self.directory, self.weights = run_dir, weights
        self.adapter_dir = find_adapter_dir(run_dir)
        self.base = hf_lora.adapter_hf_base(self.adapter_dir, weights)
        self.architecture = f"{self.base.model_type} + LoRA"
        self.description = f"{self.architecture} from {run_dir}"
        self.source = os.path.abspath(run_dir)
        self._tokenizer = self._model = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = hf_lora.load_tokenizer(self.base.directory)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._model = merge_lora(hf_lora.load_adapter_classifier(self.adapter_dir, self.weights)[0]).hf
        return self._model

    def key(self):
        """Digest of the adapter files and the base's (path, size and modification time, as LoRATeacher's)."""
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update(sha256_of_file(os.path.join(self.adapter_dir, name)).encode())
        for name in sorted(os.listdir(self.base.directory)):
            path = os.path.join(self.base.directory, name)
            if os.path.isfile(path):
                status = os.stat(path)
                digest.update(f"{os.path.realpath(path)}:{status.st_size}:{status.st_mtime_ns}".encode())
        return digest.hexdigest()


def run_of_adapter(directory):
    """A LoRA run's adapter/ named as the teacher stands for the run itself: the same
    teacher, so the same logits cache and the same record."""
    parent = os.path.dirname(os.path.normpath(directory)) or "."
    if os.path.basename(os.path.normpath(directory)) == "adapter" and \
            find_adapter_dir(parent) == os.path.join(parent, "adapter"):
        info(f"note: --teacher {directory} is the adapter of the LoRA run {parent}: taken as that run")
        return parent
    return directory


def load_teacher(directory, weights=None):
    """The teacher in directory: a LoRA run, or a Hugging Face classifier; or the hub
    id of a classifier ("owner/name"), downloaded once into the Hugging Face cache."""
    if not os.path.exists(directory) and "/" in directory and looks_like_hub_id(directory):
        hub_id = directory
        teacher = HFTeacher(hub_directory(hub_id, TEACHER_HINT.replace("ID", hub_id)))
        teacher.source = hub_id
        teacher.description = f"{teacher.architecture} from the hub ({hub_id})"
        return teacher
    if os.path.isfile(directory):
        raise CheckpointError(f"--teacher {directory} is a file; pass the teacher's directory (a LoRA run's "
                              "--out-dir or a Hugging Face classifier saved with save_pretrained)")
    if not os.path.isdir(directory):
        raise CheckpointError(f"teacher {directory} does not exist; train one with `python run.py LoRA`, or "
                              "pass --teacher DIR (a LoRA run or a Hugging Face classifier) or --teacher-logits FILE")
    directory = run_of_adapter(directory)
    if find_adapter_dir(directory) is not None:
        if hf_lora.is_hf_adapter(find_adapter_dir(directory), weights):
            return HFLoRATeacher(directory, weights)
        return LoRATeacher(directory, weights)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return HFTeacher(directory)
    raise CheckpointError(f"teacher {directory} is neither a LoRA run (no adapter/) nor a Hugging Face classifier "
                          "(no config.json)")


# ---------------------------------------------------------------------------
# The teacher's logits, cached
# ---------------------------------------------------------------------------

def teacher_cache_dir(teacher_dir):
    """Where a teacher's logits are cached unless --teacher-cache says: in the user's
    cache, one folder per teacher directory. Never inside the teacher's directory,
    which may be shared, or the Hugging Face cache's snapshot."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.path.realpath(teacher_dir).encode()).hexdigest()[:16]
    return os.path.join(base, "gpt2-lora-distil", "teacher_logits", name)


# the teacher labels this many sentences at a time: the progress bar's step, and what
# a Ctrl-C keeps (a partial cache the next run continues from)
LABEL_CHUNK = 2048


def label(teacher, texts, device, precision, partial_path, progress=True):
    """The teacher's logits of texts, chunk by chunk under a progress bar. On Ctrl-C
    the chunks done so far are kept in partial_path, and the next call continues
    after them."""
    done = []
    if os.path.isfile(partial_path):
        try:
            done = [torch.from_numpy(np.load(partial_path, allow_pickle=False))]
        except (OSError, ValueError):
            done = []
    start = sum(len(d) for d in done)
    if start:
        info(f"continuing the teacher's labelling after {start} of {len(texts)} sentences ({partial_path})")
    try:
        with tqdm(total=len(texts), initial=start, desc="teacher", unit="sentence", leave=False,
                  disable=not progress or not is_main_process()) as bar:
            for begin in range(start, len(texts), LABEL_CHUNK):
                chunk = texts[begin:begin + LABEL_CHUNK]
                done.append(teacher.logits(chunk, device, precision))
                bar.update(len(chunk))
    except KeyboardInterrupt:
        if done:
            save_logits(partial_path, torch.cat(done))
        raise KeyboardInterrupt(f"interrupted while the teacher labelled ({sum(len(d) for d in done)} of "
                                f"{len(texts)} sentences kept; the same command continues from there)") from None
    logits = torch.cat(done) if done else torch.empty(0, 2)
    if os.path.isfile(partial_path):
        os.remove(partial_path)
    return logits


def cached_teacher_logits(teacher, texts_by_name, cache_dir, device, dtype="auto", progress=True):
    """{name: logits} of the teacher for each list of texts, computed once and
    cached as cache_dir/<name>-<teacher key>-<input key>.npy. The teacher key
    covers its files and the precision it ran in; the input key the texts, so
    other data or another augmentation get files of their own. Caches of an
    earlier version of this teacher are removed; other splits are kept."""
    teacher_key = hashlib.sha256(f"{teacher.key()}|{precision_of(device, dtype)}".encode()).hexdigest()[:16]
    precision = resolve_precision(device, dtype)
    logits, paths = {}, {}
    for name, texts in texts_by_name.items():
        input_key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        paths[name] = os.path.join(cache_dir, f"{name}-{teacher_key}-{input_key}.npy")
        if os.path.isfile(paths[name]):
            try:
                logits[name] = read_logits(paths[name], len(texts))
                info(f"teacher logits ({name}) from cache {paths[name]}")
            except CheckpointError as e:
                info(f"warning: {e}; recomputing it")
    for name, texts in texts_by_name.items():
        if name not in logits:
            info(f"running the teacher ({teacher.description}) over {len(texts)} {name} sentences, once")
            logits[name] = label(teacher, texts, device, precision, paths[name][:-len(".npy")] + ".partial.npy",
                                 progress)
            save_logits(paths[name], logits[name])
    for name in os.listdir(cache_dir):
        parts = name.split("-")
        if name.endswith(".npy") and len(parts) == 3 and parts[1] != teacher_key:
            os.remove(os.path.join(cache_dir, name))
    return logits


def read_logits(path, rows):
    """A (rows, 2) float array of teacher logits from a .npy file."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"teacher logits file {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"teacher logits file {path} is not a readable .npy array ({e})") from None
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] != rows:
        raise CheckpointError(f"teacher logits {path} have shape {array.shape}, expected ({rows}, 2): "
                              "one row of 2 logits per training sentence, in the training file's order")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise CheckpointError(f"teacher logits {path} must be finite floating-point numbers")
    return torch.from_numpy(array.astype(np.float32))


def save_logits(path, logits):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, logits.float().numpy())
    atomic_write(path, write)


# ---------------------------------------------------------------------------
# Transfer-set augmentation (Tang et al. 2019, "Distilling task-specific
# knowledge from BERT into simple neural networks", section 3.2)
# ---------------------------------------------------------------------------

_WORD_OR_MARK = re.compile(r"(\s*)(\w+(?:['’]\w+)*|[^\w\s])")


class Synthetic:
    """A synthetic sentence: pieces (space before, word); word None is masked.
    Each model renders the mask as its own: BERT's [MASK], the unknown word
    for the others (GPT-2 has neither, so the end-of-text token stands in)."""

    def __init__(self, pieces):
        self.pieces = tuple(pieces)

    def render(self, mask):
        text = "".join(space + (mask if word is None else word) for space, word in self.pieces)
        return text.strip()


def split_words(sentence):
    """(space before, word or punctuation mark) pieces that join back into sentence."""
    return [(m.group(1), m.group(2)) for m in _WORD_OR_MARK.finditer(sentence)]


class WordSwapper:
    """Tang et al. replace a word by another of the same part of speech, drawn by
    frequency. No English tagger here works offline, so "same kind" is found the
    way distributional linguistics finds word classes: words that fill the same
    slot. A word is swapped for one seen elsewhere in the training sentences
    between the same left and right neighbours; failing that, after the same left
    neighbour; failing that, before the same right neighbour."""

    def __init__(self, sentences):
        slots = defaultdict(Counter)
        for sentence in sentences:
            words = [w for _, w in split_words(sentence)]
            for i, word in enumerate(words):
                if word[0].isalnum():  # punctuation is never swapped
                    for key in self._slots(words, i):
                        slots[key][word.lower()] += 1
        # sorted, so sampling depends on the seed only, not on dict order
        self.choices = {}
        for key, counts in slots.items():
            words = sorted(counts)
            self.choices[key] = (words, [counts[w] for w in words])

    @staticmethod
    def _slots(words, i):
        """The slots of words[i], most specific first: between its two neighbours,
        after its left one, before its right one."""
        left = words[i - 1].lower() if i > 0 else "<s>"
        right = words[i + 1].lower() if i + 1 < len(words) else "</s>"
        return ("both", left, right), ("left", left), ("right", right)

    def swap(self, words, i, rng):
        """A word of the same kind as words[i] in its slot, or words[i] if none is known."""
        word = words[i]
        for key in self._slots(words, i):
            candidates, counts = self.choices.get(key, ((), ()))
            options = [(c, n) for c, n in zip(candidates, counts) if c != word.lower()]
            if options:
                new = rng.choices([c for c, _ in options], [n for _, n in options])[0]
                return new[0].upper() + new[1:] if word[0].isupper() else new
        return word


def augment(sentences, cfg: AugmentConfig):
    """cfg.copies synthetic sentences per sentence, all of one sentence's copies
    together, reproducible for cfg.seed: each word is masked with mask_prob, else
    swapped for a word of the same kind with swap_prob; then with ngram_prob only
    a random n-gram of 1 to max_ngram words is kept."""
    rng = random.Random(cfg.seed)
    swapper = WordSwapper(sentences)
    out = []
    for sentence in sentences:
        pieces = split_words(sentence)
        words = [w for _, w in pieces]
        for _ in range(cfg.copies):
            new = []
            for i, (space, word) in enumerate(pieces):
                if word[0].isalnum():
                    u = rng.random()
                    if u < cfg.mask_prob:
                        word = None
                    elif u < cfg.mask_prob + cfg.swap_prob:
                        word = swapper.swap(words, i, rng)
                new.append((space, word))
            if len(new) > 1 and rng.random() < cfg.ngram_prob:
                n = rng.randint(1, min(cfg.max_ngram, len(new)))
                start = rng.randint(0, len(new) - n)
                new = [("", new[start][1])] + new[start + 1:start + n]
            out.append(Synthetic(new))
    return out


def drop_duplicates(synthetic, sentences):
    """The synthetic sentences that neither repeat an earlier synthetic one nor equal
    one of sentences (the training sentences), in order: Tang et al. drop duplicates,
    whose copies would only weigh a sentence more, and a training sentence already
    has its teacher logits and its label. Returns (kept, how many were dropped)."""
    seen = {sentence.strip() for sentence in sentences}
    kept = []
    for s in synthetic:
        text = s.render(MASK_KEY)
        if text not in seen:
            seen.add(text)
            kept.append(s)
    return kept, len(synthetic) - len(kept)


# stands for a masked word when sentences are compared: a character no sentence holds
MASK_KEY = "\x00"


# ---------------------------------------------------------------------------
# The transfer set
# ---------------------------------------------------------------------------

@dataclass
class TeacherTargets:
    """What distil learns from: the transfer set (the training sentences, then the
    synthetic ones), the teacher's logits for each of its rows, the teacher's
    predictions on the validation set (None from a logits file) and its record."""
    transfer: TokenizedSplit
    logits: torch.Tensor
    val_predictions: torch.Tensor
    record: dict
    duplicates: int = 0    # synthetic sentences dropped as duplicates


def teacher_from_file(path, train_set):
    """--teacher-logits FILE: one row of logits per training sentence, nothing else."""
    return TeacherTargets(train_set, read_logits(path, len(train_set)), None,
                          {"source": os.path.abspath(path), "val_acc": None, "val_mcc": None})


def teacher_targets(teacher, train_set, val_set, device, cfg: DistilConfig, dtype="auto", progress=True):
    """Run the teacher (or read its cache) over the training and validation sentences
    and cfg.augment.copies synthetic sentences per training sentence, less the
    duplicates, in the run's precision (dtype). The student reads the synthetic
    sentences with train_set's tokenizer, a masked word as that tokenizer's mask.
    Under torchrun rank 0 fills the cache, with no collectives inside, and the
    others read it."""
    synthetic = augment(train_set.split.sentences, cfg.augment) if cfg.augment.copies else []
    synthetic, duplicates = drop_duplicates(synthetic, train_set.split.sentences)
    texts = {"train": train_set.split.sentences, "val": val_set.split.sentences}
    if synthetic:
        texts["augment"] = [s.render(teacher.mask_token) for s in synthetic]
    cache_dir = cfg.teacher_cache or teacher_cache_dir(teacher.directory)
    start = time.time()
    if is_main_process():
        logits = cached_teacher_logits(teacher, texts, cache_dir, device, dtype, progress)
    barrier()
    if not is_main_process():
        logits = cached_teacher_logits(teacher, texts, cache_dir, device, dtype, progress)
    val_predictions = logits["val"].argmax(-1)
    record = {"source": teacher.source, "val_acc": accuracy(val_predictions, val_set.labels),
              "val_mcc": matthews_corrcoef(val_predictions, val_set.labels),
              "precision": precision_of(device, dtype),
              "seconds": time.time() - start}  # for the teacher's logits: seconds when it ran, ~0 from the cache
    info(f"teacher ({teacher.description}) on validation: acc {record['val_acc']:.4f} MCC {record['val_mcc']:.4f}")
    if not synthetic:
        return TeacherTargets(train_set, logits["train"], val_predictions, record, duplicates)
    tokenizer = train_set.tokenizer
    student_texts = [s.render(tokenizer.mask_token) for s in synthetic]
    transfer = TokenizedSplit(Split(train_set.split.sentences + student_texts,
                                    train_set.split.labels + [-1] * len(synthetic), train_set.split.source),
                              train_set.max_len, tokens=train_set.tokens + tokenizer.encode(student_texts),
                              tokenizer=tokenizer)
    info(f"transfer set: {len(train_set)} training sentences + {len(synthetic)} synthetic "
         f"({cfg.augment.copies} each, {duplicates} duplicates dropped)")
    return TeacherTargets(transfer, torch.cat([logits["train"], logits["augment"]]), val_predictions, record,
                          duplicates)
