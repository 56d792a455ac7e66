"""Command line: python run.py gen|LoRA|rnn|distil|predict|eval|tune-report|compare ...

Parses, validates every flag once, dispatches to train_utils.py (training modes),
tune.py (sweeps and comparisons) and model.py (gen), and turns every known problem
into a one-line error (exit status 2).
"""
import argparse
import os
import sys
import tempfile

from model import LORA_TARGETS, PRESETS, WeightsError
import train_utils
from train_utils import RUN_CONTROL, CheckpointError, Interrupted
import tune
from utils import DEFAULT_DATA_DIR, UserError, info

# The student's recipe: chosen over 5 seeds with the shared MiniLM teacher (README, Results)
EMBD_DROPOUT = 0.0
HEAD_DROPOUT = 0.0
EMBD_WEIGHT_DECAY = None
AUGMENT = 3

# User work goes under runs/ (ignored by git); the repository's own tuning/ and plots/
# hold the README's tables and figures, written only when named (README, Results).
TUNING_DIR = "runs/tuning"
COMPARE_PLOTS_DIR = "runs/compare"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, with a "did you mean" for
    a misspelt mode or flag, and accepts every --dashed-flag also as
    --underscored_flag (e.g. --gpt_variant) without listing it twice in --help."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = [dashed(a) for a in args]
        self.seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        import re
        hint = ""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"[\w-]+", choice.group(2))
            hint = close_match(choice.group(1), options)
        elif message.startswith("unrecognized arguments:"):
            flags = {f for p in self.all_parsers() for f in p._option_string_actions}
            # a flag suggested by meaning must be one of the mode's own
            modes = {name: p for action in self._actions if isinstance(action, argparse._SubParsersAction)
                     for name, p in action.choices.items()}
            mode = modes.get(next(iter(getattr(self, "seen", [])), None))
            aliases = {typed: meant for typed, meant in FLAG_ALIASES.items()
                       if mode is None or meant in mode._option_string_actions}
            for unknown in message.split(":", 1)[1].split():
                if unknown.startswith("--"):
                    hint = hint or close_match(unknown.split("=")[0], flags, aliases)
        raise UserError(f"{message}{hint} (see python {self.prog} --help)")

    def all_parsers(self):
        yield self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from sub.all_parsers()


# Flags as other tools spell them, by meaning: spelling alone would suggest another
# flag (--learning-rate -> --rnn-type). Keys as dashed() writes them.
FLAG_ALIASES = {"--learning-rate": "--lr", "--bs": "--batch-size", "--batch": "--batch-size",
                "--num-epochs": "--epochs", "--n-epochs": "--epochs", "--max-epochs": "--epochs"}


def close_match(word, options, aliases=None):
    """"; did you mean X?" for word: its meaning from aliases first (when X is one of
    options), else the closest spelling among options and the aliases (a misspelt
    alias, --learning-rat, means what the alias means); "" when nothing is close."""
    import difflib
    aliases = {typed: meant for typed, meant in (aliases or {}).items() if meant in options}
    word = dashed(word)
    if word in aliases:
        return f"; did you mean {aliases[word]}?"
    best = difflib.get_close_matches(word, [*options, *aliases], n=1, cutoff=0.6)
    return f"; did you mean {aliases.get(best[0], best[0])}?" if best else ""


def dashed(arg):
    """--some_flag[=value] -> --some-flag[=value]: underscores are accepted in flag names."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def canonical_mode(argv):
    """Mode names are case-insensitive: lora, LoRA and LORA are one mode."""
    modes = {name.lower(): name for name in RUNNERS}
    if argv and argv[0].lower() in modes:
        return [modes[argv[0].lower()], *argv[1:]]
    return argv


def seed_value(text):
    value = int(text)
    if not 0 <= value < 2 ** 32:  # NumPy's seed range
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def in_range(args, interval, *flags):
    """Raise a UserError unless each flag's value (None: not given) lies in interval,
    written as in maths: "[0, 1)", "(0, inf)". Comparisons are written so that nan fails."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):
            bounds = f"in {interval}" if high < float("inf") else f"{'>=' if interval[0] == '[' else '>'} {low:g}"
            raise UserError(f"{flag} must be {bounds}, got {value}")


def check_path(flag, path, kind="dir", exists=False, write=False, what=None):
    """Raise a one-line UserError unless the path given for flag (None: not given)
    will do, checked before any work: a path that exists is a `kind` ("dir" or
    "file"); with exists=True it must exist; with write=True it can be written: the
    directory that must take a new entry (the directory itself, else the parent of
    the file or of what is to be created, else the first ancestor that exists) is a
    directory in which one can be created. That is tried (an empty directory made
    and removed), not judged from mode bits, which do not stop root and do not know
    read-only or virtual file systems."""
    if path is None:
        return
    path = str(path)
    what = what or ("a directory" if kind == "dir" else "a file path")
    if not path.strip():
        raise UserError(f"{flag} is empty; pass {what}")
    if os.path.lexists(path) and not os.path.exists(path):
        raise UserError(f"{flag} {path} is a broken symbolic link; pass {what}")
    if os.path.exists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file; pass {what}")
        if kind == "file" and not os.path.isfile(path):
            found = "a directory" if os.path.isdir(path) else "not a regular file"
            raise UserError(f"{flag} {path} is {found}; pass {what}")
    elif exists:
        raise UserError(f"{flag} {path} does not exist; pass {what}")
    if not write:
        return
    target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        found = "a file" if os.path.isfile(target) else "not a directory"
        raise UserError(f"{flag} {path} cannot be created: {target} is {found}; pass another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=target))
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {target} is not writable ({e.strerror}); "
                        f"pass another {flag}") from None


def add_common(p):
    p.add_argument("--seed", type=seed_value, default=0, help="random seed, 0 to 2**32-1 (default 0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: CUDA if present, else Apple's MPS, else the CPU)")


def add_dtype(p, auto="bfloat16 autocast on CUDA and on CPUs with AMX, float32 elsewhere"):
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help=f"compute precision: auto = {auto}; float32 gives exactly the reference "
                        f"implementation's numbers (default auto)")


WEIGHTS_DIR = "a local Hugging Face GPT-2 directory (config.json + model.safetensors)"


def add_gpt_source(p):
    p.add_argument("--gpt-variant", default="gpt2", metavar="{" + ",".join(PRESETS) + "}",
                   help="pretrained GPT-2 to download from the Hugging Face hub (default gpt2)")
    p.add_argument("--weights", metavar="DIR",
                   help="local Hugging Face GPT-2 directory (config.json + model.safetensors); wins over --gpt-variant")


def build_parser():
    parser = Parser(prog="run.py", description="GPT-2 generation, LoRA fine-tuning on CoLA, distillation into an RNN")
    modes = parser.add_subparsers(dest="mode", metavar="MODE", parser_class=Parser)
    modes.required = True

    gen = modes.add_parser("gen", help="generate text from a prompt with pretrained GPT-2")
    add_gpt_source(gen)
    gen.add_argument("--prompt", default="Hello, I'm a language model,",
                     help="text to continue; '-' reads it from stdin")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    gen.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= P")
    gen.add_argument("--num-samples", type=int, default=1, help="samples to generate, as one batch (default 1)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole context every step (slow)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the forward pass (pays off on GPUs)")
    add_dtype(gen, auto="bfloat16 autocast on CUDA, float32 on CPU (where decoding is bound by memory)")
    add_common(gen)

    lora = modes.add_parser("LoRA", help="fine-tune GPT-2 on CoLA with LoRA adapters")
    add_gpt_source(lora)
    add_training(lora, out_dir="runs/LoRA", lr=1e-3)
    lora.add_argument("--lora-rank", type=int, default=4, help="rank r of the adapters (default 4)")
    lora.add_argument("--lora-alpha", type=float, default=8.0, help="scaling numerator: update * alpha/r (default 8)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    lora.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                      help=f"comma list of layers to adapt in every block (default {','.join(LORA_TARGETS)})")
    lora.add_argument("--train-layernorm", action="store_true", help="also train the LayerNorms")

    for mode, help_text in (("rnn", "train the DistilRNN on CoLA labels alone (the baseline)"),
                            ("distil", "distil a fine-tuned GPT-2 teacher into the DistilRNN")):
        p = modes.add_parser(mode, help=help_text)
        add_training(p, out_dir=f"runs/{mode}", lr=1e-3)
        add_student(p)
        add_gpt_source(p)  # GPT-2 for --init-embeddings gpt2, and the teacher's base in distil
        if mode == "distil":
            source = p.add_mutually_exclusive_group()
            source.add_argument("--teacher", default=None, metavar="DIR",
                                help="a LoRA run's out dir, or a Hugging Face sequence-classification "
                                     "directory with 2 labels (default runs/LoRA)")
            source.add_argument("--teacher-logits", metavar="FILE",
                                help="distil from any teacher: .npy of shape (training sentences, 2)")
            p.add_argument("--kd-temperature", type=float, default=2.0, help="softmax temperature T (default 2)")
            p.add_argument("--kd-alpha", type=float, default=0.5,
                           help="weight of the teacher term; 0 = labels only, i.e. rnn (default 0.5)")
            p.add_argument("--kd-loss", choices=("kl", "mse"), default="kl",
                           help="kl on softened probabilities (Hinton) or mse on logits (Tang) (default kl)")
            p.add_argument("--augment", type=int, default=None, metavar="N",
                           help=f"N synthetic sentences per training sentence, labelled by the teacher "
                                f"(Tang et al. 2019); 0 = the training sentences only (default {AUGMENT}; "
                                f"0 with --teacher-logits)")
            p.add_argument("--mask-prob", type=float, default=0.1, help="augment: mask a word (default 0.1)")
            p.add_argument("--swap-prob", type=float, default=0.1,
                           help="augment: swap a word for one of the same kind (default 0.1)")
            p.add_argument("--ngram-prob", type=float, default=0.25,
                           help="augment: keep only an n-gram of the sentence (default 0.25)")
            p.add_argument("--max-ngram", type=int, default=5, help="augment: longest n-gram kept (default 5)")
            p.add_argument("--teacher-cache", metavar="DIR",
                           help="where the teacher's logits are cached (default TEACHER/teacher_logits, or "
                                "~/.cache/gpt2-lora-distil/ for a read-only teacher)")

    predict = modes.add_parser("predict", help="classify sentences with a trained checkpoint")
    predict.add_argument("--checkpoint", required=True, metavar="OUT", help="a LoRA, rnn or distil out dir")
    predict.add_argument("--weights", metavar="DIR", help="local base GPT-2 of a LoRA checkpoint")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences (default: one per line on stdin)")
    add_dtype(predict)
    add_common(predict)

    evaluate = modes.add_parser("eval", help="evaluate a trained checkpoint on CoLA's validation data")
    evaluate.add_argument("--checkpoint", required=True, metavar="OUT", help="a LoRA, rnn or distil out dir")
    evaluate.add_argument("--weights", metavar="DIR", help="local base GPT-2 of a LoRA checkpoint")
    evaluate.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="CoLA directory (default data/cola, shipped)")
    evaluate.add_argument("--val-split", default="in", choices=("in", "out", "all"))
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--output", metavar="FILE", help="JSON results (default OUT/eval_<split>.json)")
    add_dtype(evaluate)
    add_common(evaluate)

    report = modes.add_parser("tune-report", help="a --tune table, rows differing only in seed grouped "
                                                  "(n, mean ± std), sorted by validation MCC, and its plot")
    report.add_argument("table", help="e.g. runs/tuning/LoRA.tsv")
    report.add_argument("--plots-dir", default=None, help="where its plot goes (default: the table's directory)")

    compare = modes.add_parser("compare", help="two runs or two seed sweeps: per-seed best validation MCC, "
                                               "paired difference with 95%% CI, share of the teacher's MCC")
    compare.add_argument("run_a", metavar="DIR_A", help="a run's out dir, or a sweep's (--tune \"seed=0,1,2\")")
    compare.add_argument("run_b", metavar="DIR_B", help="the same for the other side; B - A is reported")
    compare.add_argument("--plots-dir", default=COMPARE_PLOTS_DIR,
                         help=f"where its plot goes (default {COMPARE_PLOTS_DIR})")
    return parser


def add_training(p, out_dir, lr):
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="CoLA: release or GLUE .tsv files (default data/cola, "
                                                        "shipped; a directory without them: the nyu-mll/glue hub copy)")
    p.add_argument("--val-split", default="in", choices=("in", "out", "all"), help="validation set (default in)")
    p.add_argument("--out-dir", default=out_dir, help=f"where metrics and weights go (default {out_dir})")
    p.add_argument("--plots-dir", default=None, help="where the PNG plots go (default OUT/plots)")
    p.add_argument("--epochs", type=int, default=5, help="default 5")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--optimizer", choices=("adam", "adamw"), default="adamw", help="default adamw")
    p.add_argument("--weight-decay", type=float, default=0.01, help="adamw's decoupled weight decay (default 0.01)")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps warming up (default 0.06)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last full epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir")
    p.add_argument("--keep-resume-state", action="store_true",
                   help="keep OUT/resume_state.pt after the run completes (by default removed: it is only "
                        "there to resume an interrupted run)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this call, resumable later (as if killed there)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: minutes of compiling first, so only for long GPU runs")
    p.add_argument("--tune", metavar="GRID", help='sweep: "lr=1e-3,3e-4 lora_rank=4,8" runs every combination '
                                                  "and appends a row per run to TUNING_DIR/<mode>.tsv")
    p.add_argument("--tuning-dir", default=TUNING_DIR, help=f"where --tune writes its table (default {TUNING_DIR})")
    add_dtype(p)
    add_common(p)


def add_student(p):
    p.add_argument("--rnn-type", choices=("rnn", "gru", "lstm"), default="rnn", help="default rnn (ReLU)")
    p.add_argument("--rnn-layers", type=int, default=2, help="default 2")
    p.add_argument("--rnn-hidden", type=int, default=768, help="default 768")
    p.add_argument("--rnn-embd", type=int, default=768, help="token embedding size (default 768)")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--rnn-dropout", type=float, default=0.0, help="dropout between RNN layers (default 0)")
    p.add_argument("--embd-dropout", type=float, default=EMBD_DROPOUT,
                   help=f"dropout on the token embeddings (default {EMBD_DROPOUT})")
    p.add_argument("--head-dropout", type=float, default=HEAD_DROPOUT,
                   help=f"dropout on the final state, before the classifier (default {HEAD_DROPOUT})")
    p.add_argument("--embd-weight-decay", type=float, default=EMBD_WEIGHT_DECAY,
                   help="adamw's weight decay on the token embedding (default: --weight-decay's)"
                   if EMBD_WEIGHT_DECAY is None else f"adamw's weight decay on the token embedding "
                                                     f"(default {EMBD_WEIGHT_DECAY})")
    p.add_argument("--init-embeddings", choices=("random", "gpt2"), default="random",
                   help="gpt2: start from GPT-2's token embeddings (--weights / --gpt-variant), "
                        "projected if sizes differ")


# --- gen ---------------------------------------------------------------------

def validate_gen(args):
    in_range(args, "[1, inf)", "--max-new-tokens", "--top-k", "--num-samples")
    in_range(args, "(0, 1]", "--top-p")
    if not args.greedy and not 0 < args.temperature < float("inf"):  # also catches nan
        raise UserError(f"--temperature must be > 0 and finite (got {args.temperature}); for deterministic output "
                        "use --greedy")
    check_path("--weights", args.weights, "dir", exists=True, what=WEIGHTS_DIR)
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    if not args.prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT (or --prompt - and text on stdin)")


def run_gen(args):
    import torch
    from utils import encode, print_samples, resolve_device, seed_everything
    validate_gen(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = train_utils.load_gpt(args, device)
    prompt_ids = encode(args.prompt)
    if len(prompt_ids) > model.config.block_size:
        info(f"note: the prompt has {len(prompt_ids)} tokens; only its last {model.config.block_size} are used")
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    stream = model.generate_stream(idx, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, generator=generator,
                                   use_cache=not args.no_cache)
    # bf16 on CUDA: tensor cores and half the bytes per activation. It changes the
    # numerics, so a greedy continuation can differ from float32's: --dtype float32.
    with train_utils.autocast_for(device, args.dtype, matrix_bound=False):
        print_samples(args.prompt, stream, args.num_samples)


# --- Training modes: LoRA, rnn, distil ---------------------------------------

def validate_training(args):
    """Check the flags of a training mode: all of them, before any file is read; the
    values and their combinations first, then the paths."""
    validate_training_flags(args)
    check_training_paths(args)


def check_training_paths(args):
    """Every path of a training mode, so that a bad one fails now, not as a traceback
    after the training it was to hold."""
    check_path("--out-dir", args.out_dir, "dir", write=True)
    check_path("--plots-dir", args.plots_dir, "dir", write=True)
    if args.tune:
        check_path("--tuning-dir", args.tuning_dir, "dir", write=True)
    check_path("--data-dir", args.data_dir, "dir", what="the directory of the CoLA .tsv files")
    check_path("--weights", args.weights, "dir", exists=True, what=WEIGHTS_DIR)
    if args.mode != "distil":
        return
    check_path("--teacher", args.teacher, "dir", what="the teacher's directory (a LoRA run's --out-dir, or a "
                                                      "Hugging Face classifier's directory)")
    check_path("--teacher-logits", args.teacher_logits, "file", exists=True,
               what="a .npy file of the teacher's logits, shape (training sentences, 2)")
    check_path("--teacher-cache", args.teacher_cache, "dir", write=True)


def validate_training_flags(args):
    """The values of a training mode's flags and their combinations."""
    in_range(args, "[1, inf)", "--epochs", "--batch-size", "--stop-after")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it; pass one of them")
    in_range(args, "(0, inf)", "--lr")
    in_range(args, "[0, 1)", "--warmup-ratio")
    in_range(args, "[0, inf)", "--grad-clip", "--weight-decay")
    if args.mode == "LoRA":
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise UserError(f"unknown --lora-targets {','.join(bad) or '(empty)'}; "
                            f"choose from {','.join(LORA_TARGETS)}")
        in_range(args, "[1, inf)", "--lora-rank")
        in_range(args, "(0, inf)", "--lora-alpha")
        in_range(args, "[0, 1)", "--lora-dropout")
        return
    in_range(args, "[1, inf)", "--rnn-layers", "--rnn-hidden", "--rnn-embd")
    in_range(args, "[0, 1)", "--rnn-dropout", "--embd-dropout", "--head-dropout")
    in_range(args, "[0, inf)", "--embd-weight-decay")
    if args.mode != "distil":
        return
    if args.augment is None:
        args.augment = 0 if args.teacher_logits else AUGMENT
    in_range(args, "(0, inf)", "--kd-temperature")
    in_range(args, "[0, 1]", "--kd-alpha", "--mask-prob", "--swap-prob", "--ngram-prob")
    in_range(args, "[0, inf)", "--augment")
    in_range(args, "[1, inf)", "--max-ngram")
    if args.mask_prob + args.swap_prob > 1:
        raise UserError("--mask-prob + --swap-prob must be <= 1: a word is masked or swapped, not both")
    if args.augment and args.teacher_logits:
        raise UserError("--augment needs a teacher to label the synthetic sentences; --teacher-logits gives only "
                        "the training sentences' logits: pass --teacher DIR, or --augment 0")
    if args.augment and args.kd_alpha == 0:
        raise UserError("--augment with --kd-alpha 0: synthetic sentences have no gold label, so they would teach "
                        "nothing; raise --kd-alpha or pass --augment 0")


def run_training(args):
    """A training mode: check every flag, claim and lock --out-dir, then run."""
    from utils import is_main_process, lock_dir
    validate_training(args)
    if not is_main_process():  # rank 0 claims the directory for every rank
        return RUNNERS[args.mode](args)
    from train_utils import claim_out_dir
    with lock_dir(args.out_dir):
        claim_out_dir(args)
        return RUNNERS[args.mode](args)


# --- predict and eval --------------------------------------------------------

def read_sentences(args):
    """The sentences to classify: the arguments, else stdin one per line. A blank
    line is an error: dropping it would shift every later answer by one."""
    if args.sentences:
        sentences, where = args.sentences, "argument"
    else:
        if sys.stdin.isatty():
            info("reading sentences from stdin, one per line (end with Ctrl-D)")
        sentences, where = [line.rstrip("\r\n") for line in sys.stdin], "line"
    if not sentences:
        raise UserError("no sentences given; pass them as arguments or one per line on stdin")
    for number, sentence in enumerate(sentences, start=1):
        if not sentence.strip():
            raise UserError(f"{where} {number} of the input is blank; give one sentence per {where}")
    return sentences


def validate_checkpoint_use(args):
    """predict's and eval's flags, before the checkpoint is loaded (and, for eval,
    before its results are printed: an --output that cannot be written fails first)."""
    in_range(args, "[1, inf)", "--batch-size")
    check_path("--weights", args.weights, "dir", exists=True, what=WEIGHTS_DIR)
    if args.mode != "eval":
        return
    check_path("--data-dir", args.data_dir, "dir", what="the directory of the CoLA .tsv files")
    output = args.output
    if output is None and os.path.isdir(args.checkpoint):  # the default (a missing checkpoint: the loader says so)
        output = os.path.join(args.checkpoint, f"eval_{args.val_split}.json")
    check_path("--output", output, "file", write=True, what="a file path for the JSON results")


def run_predict(args):
    validate_checkpoint_use(args)
    sentences = read_sentences(args)
    for sentence, p in zip(sentences, train_utils.predict(args, sentences)):
        print(f"{int(p >= 0.5)}\t{p:.4f}\t{sentence}")


def run_eval(args):
    validate_checkpoint_use(args)
    return train_utils.evaluate_checkpoint(args)


# --- tune-report and compare -------------------------------------------------

def run_tune_report(args):
    if args.plots_dir is None:  # next to its table: a sweep's plot stays with the sweep
        args.plots_dir = os.path.dirname(args.table) or "."
    check_path("--plots-dir", args.plots_dir, "dir", write=True)
    return tune.run_tune_report(args)


def run_compare(args):
    check_path("--plots-dir", args.plots_dir, "dir", write=True)
    return tune.run_compare(args)


RUNNERS = {"gen": run_gen, "predict": run_predict, "eval": run_eval,
           "LoRA": train_utils.train_lora, "rnn": train_utils.train_rnn, "distil": train_utils.train_distil,
           "tune-report": run_tune_report, "compare": run_compare}
TRAINING_MODES = ("LoRA", "rnn", "distil")


def main(argv=None):
    try:
        argv = canonical_mode(sys.argv[1:] if argv is None else list(argv))
        args = build_parser().parse_args(argv)
        if args.mode in TRAINING_MODES and args.tune:
            validate_training(args)
            tune.run_tune(args, argv, build_parser(), run_training, RUN_CONTROL)
        elif args.mode in TRAINING_MODES:
            run_training(args)
        else:
            RUNNERS[args.mode](args)
    except (UserError, WeightsError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"error: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python run.py gen | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
