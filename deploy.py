"""Classify sentences with an exported student (`python run.py export`) using
onnxruntime, numpy and a tokenizer package: no PyTorch. A deployment copies the
export's directory and this file:

    import deploy
    student = deploy.load("runs/distil-onnx")
    student.predict(["The cat sat on the mat."])   # [(label, p_acceptable)]

or runs `python deploy.py DIR SENTENCE...` (predict's output: label, p_acceptable and
the sentence, tab-separated). The directory holds student.onnx, the tokenizer's
files and export.json, which lists each file's sha256: a file changed or swapped
since the export is refused, so the numbers are always those of the export."""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

EXPORT_FILE = "export.json"
MODEL_FILE = "student.onnx"
FORMAT = 1  # export.json's layout; a reader refuses another


class ExportError(Exception):
    """An export directory that cannot be used, as one line naming the fix."""


def is_export(path):
    """Whether path is an export's directory (it holds export.json)."""
    return os.path.isfile(os.path.join(str(path), EXPORT_FILE))


# utils.sha256_of_file's twin: deploy reads nothing of the project that imports torch
def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_settings(directory):
    """export.json, with every file it lists present and matching its sha256."""
    path = os.path.join(directory, EXPORT_FILE)
    again = f"export it again (python run.py export --checkpoint RUN --out {directory} --overwrite)"
    try:
        with open(path) as f:
            settings = json.load(f)
        files = dict(settings["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]}); {again}") from None
    if settings.get("format") != FORMAT:
        raise ExportError(f"{path} has format {settings.get('format')!r}, this deploy.py reads {FORMAT}; {again}")
    if MODEL_FILE not in files:
        raise ExportError(f"{path} lists no {MODEL_FILE}; {again}")
    for name, digest in files.items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ExportError(f"{file} is missing (listed in {EXPORT_FILE}); {again}")
        if sha256_of_file(file) != digest:
            raise ExportError(f"{file} does not match {EXPORT_FILE} (sha256 differs): the file was changed or "
                              f"replaced since the export; {again}")
    return settings


class GPT2BPE:
    """GPT-2's byte-level BPE from the export's encoder.json and vocab.bpe, with
    tiktoken (as the project's own tokenizer), its special tokens spelled in the
    text read as such."""

    def __init__(self, directory, settings):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(directory, "vocab.bpe"),
                                                encoder_json_file=os.path.join(directory, "encoder.json"))
        self.encoding = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                          special_tokens=settings["special_tokens"],
                                          explicit_n_vocab=settings["vocab_size"])

    def encode(self, texts):
        return self.encoding.encode_batch(list(texts), allowed_special="all")


class TokenizerJSON:
    """A Hugging Face tokenizer's tokenizer.json, with the `tokenizers` package: a
    sentence's own tokens, no special tokens around it, never truncated (as the
    student was trained)."""

    def __init__(self, directory, settings):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, settings["file"]))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def encode(self, texts):
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


TOKENIZERS = {"gpt2-bpe": GPT2BPE, "tokenizers": TokenizerJSON}


class ExportedStudent:
    """An export, ready to classify: its onnxruntime session and tokenizer."""

    def __init__(self, directory, settings, session, tokenizer):
        self.directory, self.settings, self.session, self.tokenizer = directory, settings, session, tokenizer
        self.pad_id, self.unk_id = settings["pad_id"], settings["unk_id"]
        self.labels = settings["labels"]

    @property
    def description(self):
        return f"DistilRNN ONNX export, {self.settings['quantized'] or 'float32'}"

    def encode(self, sentences):
        # a sentence of nothing the tokenizer keeps reads as the unknown token: an RNN cannot read nothing
        return [ids or [self.unk_id] for ids in self.tokenizer.encode(sentences)]

    def logits(self, sentences, batch_size=64):
        """(sentences, classes) float32 logits, in the sentences' order, computed in
        batches of similar lengths (sorted by length, padded to each batch's longest),
        as run.py predict batches them."""
        tokens = self.encode(sentences)
        order = sorted(range(len(tokens)), key=lambda row: len(tokens[row]))
        logits = np.zeros((len(tokens), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            lengths = np.array([len(tokens[row]) for row in rows], dtype=np.int64)
            input_ids = np.full((len(rows), int(lengths.max())), self.pad_id, dtype=np.int64)
            for i, row in enumerate(rows):
                input_ids[i, :lengths[i]] = tokens[row]
            logits[rows] = self.session.run(["logits"], {"input_ids": input_ids, "lengths": lengths})[0]
        return logits

    def probabilities(self, sentences, batch_size=64):
        """The probability of "acceptable" (label 1) for each sentence."""
        logits = self.logits(sentences, batch_size)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True))[:, 1]

    def predict(self, sentences, batch_size=64):
        """(label, p_acceptable) for each sentence: label 1 (acceptable) when p >= 0.5."""
        return [(int(p >= 0.5), float(p)) for p in self.probabilities(sentences, batch_size)]


def load(directory, threads=None):
    """The export in directory, its files checked against export.json. threads:
    onnxruntime's intra-op threads (default: its own choice, the machine's cores)."""
    directory = str(directory)
    if not os.path.isdir(directory):
        raise ExportError(f"export directory {directory} does not exist; write one with python run.py export")
    if not is_export(directory):
        raise ExportError(f"{directory} holds no {EXPORT_FILE}: it is not an export (python run.py export)")
    settings = read_settings(directory)
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(os.path.join(directory, MODEL_FILE), options,
                                               providers=["CPUExecutionProvider"])
        tokenizer_settings = settings["tokenizer"]
        tokenizer = TOKENIZERS[tokenizer_settings["kind"]](directory, tokenizer_settings)
    except ImportError as e:
        raise ExportError(f"{e}; a deployment needs onnxruntime, numpy and the tokenizer's package "
                          f"(tiktoken or tokenizers)") from None
    except Exception as e:  # onnxruntime's and the tokenizers' own errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"{directory} does not load ({first})") from None
    return ExportedStudent(directory, settings, session, tokenizer)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python deploy.py --help)\n")


def main(argv=None):
    parser = OneLineParser(description="classify sentences with an export of run.py export (onnxruntime, no PyTorch)")
    parser.add_argument("export", metavar="DIR", help="the directory run.py export wrote")
    parser.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences (default: one per line on stdin)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_intermixed_args(argv)
    sentences = args.sentences or [line.rstrip("\r\n") for line in sys.stdin]
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not sentences:
            raise ExportError("no sentences given; pass them as arguments or one per line on stdin")
        blank = next((number for number, sentence in enumerate(sentences, 1) if not sentence.strip()), None)
        if blank is not None:  # dropping it would shift every later answer by one
            raise ExportError(f"sentence {blank} of the input is blank; give one sentence per line")
        student = load(args.export)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for sentence, (label, p) in zip(sentences, student.predict(sentences, args.batch_size)):
        print(f"{label}\t{p:.4f}\t{sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
