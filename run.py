"""Command line: python run.py gen|LoRA|rnn|distil|predict|eval|export|tune-report|compare|teacher-curve ...

The only place that sees the flags: it parses them, validates every one before any
file is read, turns them into typed configs (each default set once, in its
dataclass), and dispatches to modes.py (training, predict, eval; gen's model is
model.py's GPT) and tune.py (sweeps and comparisons). Every known problem becomes a
one-line error (exit status 2).
"""
import argparse
import os
import re
import signal
import sys

import torch

import deploy
import export
import hf_lora
import modes
import tune
from checkpoints import CheckpointError
from distil import AugmentConfig, DistilConfig
from flags import Parser, check_path, given_flags, seed_value
from model import EMBD_CHANNELS, POOLS, PRESETS, LoRAConfig, RNNConfig, WeightsError, lora_targets
from rundir import RunConfig, claim_out_dir, read_metrics, what_is_kept
from train_utils import DTYPES, Interrupted, ResumeError, TrainConfig, autocast_for, resolve_precision, tf32_products
from utils import (DEFAULT_DATA_DIR, EOT_TOKEN, VOCAB_SIZE, DataConfig, SaveError, UserError, encode, info,
                   is_main_process, keep_freed_memory, lock_dir, one_line, print_samples, resolve_device,
                   seed_everything, set_process_switches)

# Flags that steer a run without changing what it computes: they may differ on --resume.
RUN_CONTROL = ("resume", "stop_after", "no_progress", "device", "out_dir", "plots_dir", "no_plots", "tune",
               "tuning_dir", "compile", "overwrite", "keep_resume_state", "log_dir")
# Settings added to the flags after runs were already being saved, with the value such
# a run behaved as: it resumes under that value instead of being refused as changed.
ADDED_SETTINGS = {"dtype": "auto", "embd_dropout": 0.0, "head_dropout": 0.0, "embd_weight_decay": None,
                  "pool": "last", "rnn_mlp": 0, "embd_channels": "trained", "teacher": None, "kd_alpha_real": None,
                  "base": None}
TRAIN, STUDENT, LORA, DISTIL, AUGMENT = TrainConfig(), RNNConfig(), LoRAConfig(), DistilConfig(), DistilConfig().augment

# User work goes under runs/ (ignored by git); the repository's own tuning/ and plots/
# hold the tables and figures of the docs (docs/results.md), written only when named.
TUNING_DIR = "runs/tuning"
COMPARE_PLOTS_DIR = "runs/compare"


def canonical_mode(argv):
    """Mode names are case-insensitive: lora, LoRA and LORA are one mode."""
    modes = {name.lower(): name for name in RUNNERS}
    if argv and argv[0].lower() in modes:
        return [modes[argv[0].lower()], *argv[1:]]
    return argv


def add_common(p):
    p.add_argument("--seed", type=seed_value, default=0, help="random seed, 0 to 2**32-1 (default 0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: CUDA if present, else Apple's MPS, else the CPU)")


def add_dtype(p, auto="tf32 products on CUDA, bfloat16 autocast on CPUs with AMX, float32 elsewhere"):
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help=f"compute precision: auto = the faster, as measured: {auto}; float32 = IEEE float32 for "
                        f"every product on every device (TF32 off, cuDNN's RNNs included); tf32 = TF32 products on "
                        f"CUDA, float32 elsewhere; bfloat16 = bf16 autocast (a student's RNN stays float32 on CUDA); "
                        f"metrics.json records what ran (default auto)")


WEIGHTS_DIR = "a local Hugging Face GPT-2 directory (config.json + model.safetensors)"


def add_gpt_source(p):
    p.add_argument("--gpt-variant", default=modes.GPTSource.variant, metavar="{" + ",".join(PRESETS) + "}",
                   help=f"pretrained GPT-2 to download from the Hugging Face hub (default {modes.GPTSource.variant})")
    p.add_argument("--weights", metavar="DIR",
                   help="local Hugging Face GPT-2 directory (config.json + model.safetensors); wins over --gpt-variant")


def build_parser():
    parser = Parser(prog="run.py", description="GPT-2 generation, LoRA fine-tuning on CoLA, distillation into an RNN")
    modes_ = parser.add_subparsers(dest="mode", metavar="MODE", parser_class=Parser)
    modes_.required = True

    gen = modes_.add_parser("gen", help="generate text from a prompt with pretrained GPT-2")
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

    lora = modes_.add_parser("LoRA", help="fine-tune GPT-2, or any Hugging Face encoder, on CoLA with LoRA adapters")
    add_gpt_source(lora)
    lora.add_argument("--base", metavar="DIR_OR_HUB_ID",
                      help="any Hugging Face encoder or classifier that AutoModelForSequenceClassification loads "
                           "(BERT, MiniLM, RoBERTa, DistilBERT, ...): a directory with its tokenizer, or a hub id "
                           "(the cache first); its head is trained whole. A GPT-2 directory goes the --weights way")
    add_training(lora, out_dir="runs/LoRA")
    lora.number("--lora-rank", LORA.rank, "rank r of the adapters")
    lora.number("--lora-alpha", LORA.alpha, "scaling numerator: update * alpha/r")
    lora.number("--lora-dropout", LORA.dropout, "dropout on the adapters' input")
    lora.add_argument("--lora-targets", default=None,
                      help=f"comma list of layers to adapt in every block, as the base names them (default for "
                           f"GPT-2: {','.join(LORA.targets)}; for --base, per model type: " +
                           "; ".join(f"{t}: {','.join(v)}" for t, v in hf_lora.DEFAULT_TARGETS.items()) + ")")
    lora.add_argument("--train-layernorm", action=argparse.BooleanOptionalAction,
                      help="also train the LayerNorms (--no-train-layernorm: keep them frozen)")
    defaults_by_base(lora)

    for mode, help_text in (("rnn", "train the DistilRNN on CoLA labels alone (the baseline)"),
                            ("distil", "distil a fine-tuned GPT-2 teacher into the DistilRNN")):
        p = modes_.add_parser(mode, help=help_text)
        add_training(p, out_dir=f"runs/{mode}")
        add_student(p)
        add_gpt_source(p)  # GPT-2 for --init-embeddings gpt2, and the teacher's base in distil
        if mode == "rnn":  # so that rnn can build distil's student: same tokenizer, same first embeddings
            p.add_argument("--teacher", default=None, metavar="DIR",
                           help="the teacher (as distil's --teacher) whose tokenizer and input embeddings the "
                                "student starts from (--init-embeddings teacher, the default once it is given); "
                                f"rnn never runs it (default {DISTIL.teacher} with --init-embeddings teacher)")
        if mode == "distil":
            source = p.add_mutually_exclusive_group()
            source.add_argument("--teacher", default=None, metavar="DIR",
                                help="a LoRA run's out dir, or a Hugging Face sequence-classification directory "
                                     "with 2 labels, or the hub id (owner/name) of one, downloaded once "
                                     f"(default {DISTIL.teacher})")
            source.add_argument("--teacher-logits", metavar="FILE",
                                help="distil from any teacher: .npy of shape (training sentences, 2)")
            p.add_argument("--kd-alpha-real", type=float, default=DISTIL.alpha_real, metavar="A",
                           help="the teacher term's weight on the real training sentences, which the teacher has "
                                "nearly memorised (default: --kd-alpha's); synthetic ones keep --kd-alpha")
            p.number("--kd-temperature", DISTIL.temperature, "softmax temperature T of --kd-loss kl")
            p.number("--kd-alpha", DISTIL.alpha, "weight of the teacher term; 0 = labels only, i.e. rnn")
            p.add_argument("--kd-loss", choices=("kl", "mse"), default=DISTIL.loss,
                           help=f"kl on softened probabilities (Hinton) or mse on logits (Tang) "
                                f"(default {DISTIL.loss})")
            p.add_argument("--augment", type=int, default=None, metavar="N",
                           help=f"N synthetic sentences per training sentence, labelled by the teacher "
                                f"(Tang et al. 2019); 0 = the training sentences only (default {AUGMENT.copies}; "
                                f"0 with --teacher-logits)")
            p.number("--mask-prob", AUGMENT.mask_prob, "augment: mask a word")
            p.number("--swap-prob", AUGMENT.swap_prob, "augment: swap a word for one of the same kind")
            p.number("--ngram-prob", AUGMENT.ngram_prob, "augment: keep only an n-gram of the sentence")
            p.number("--max-ngram", AUGMENT.max_ngram, "augment: longest n-gram kept")
            p.add_argument("--teacher-cache", metavar="DIR",
                           help="where the teacher's logits are cached (default: a folder per teacher under "
                                "$XDG_CACHE_HOME or ~/.cache, in gpt2-lora-distil/teacher_logits/; the teacher's "
                                "directory is never written)")

    predict = modes_.add_parser("predict", help="classify sentences with a trained checkpoint")
    predict.add_argument("--checkpoint", required=True, metavar="OUT",
                         help="a LoRA, rnn or distil out dir, or an export's directory (run.py export)")
    predict.add_argument("--weights", metavar="DIR", help="local base GPT-2 of a LoRA checkpoint")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences (default: one per line on stdin)")
    add_dtype(predict)
    add_common(predict)

    evaluate = modes_.add_parser("eval", help="evaluate a trained checkpoint on CoLA's validation data")
    evaluate.add_argument("--checkpoint", required=True, metavar="OUT",
                          help="a LoRA, rnn or distil out dir, or an export's directory (run.py export)")
    evaluate.add_argument("--weights", metavar="DIR", help="local base GPT-2 of a LoRA checkpoint")
    evaluate.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="CoLA directory (default data/cola, shipped)")
    evaluate.add_argument("--val-split", default="in", choices=("in", "out", "all"))
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--output", metavar="FILE", help="JSON results (default OUT/eval_<split>.json)")
    add_dtype(evaluate)
    add_common(evaluate)

    onnx = modes_.add_parser("export", help="an rnn/distil student as ONNX for onnxruntime (deploy.py, no PyTorch)")
    onnx.add_argument("--checkpoint", required=True, metavar="RUN", help="an rnn or distil out dir")
    onnx.add_argument("--out", required=True, metavar="DIR",
                      help="the export's directory: student.onnx, the tokenizer's files, export.json")
    onnx.add_argument("--quantize", choices=export.QUANTIZE, default=None,
                      help="int8: the embedding and weight matrices in int8 (default: float32)")
    onnx.add_argument("--overwrite", action="store_true", help="replace the export already in --out")

    report = modes_.add_parser("tune-report", help="a --tune table, rows differing only in seed grouped "
                                                   "(n, mean ± std), sorted by validation MCC, and its plot")
    report.add_argument("table", help="e.g. runs/tuning/LoRA.tsv")
    report.add_argument("--plots-dir", default=None, help="where its plot goes (default: the table's directory)")

    compare = modes_.add_parser("compare", help="two runs or two seed sweeps: per-seed best validation MCC, "
                                                "paired difference with 95%% CI, share of the teacher's MCC")
    compare.add_argument("run_a", metavar="DIR_A", help="a run's out dir, or a sweep's (--tune \"seed=0,1,2\")")
    compare.add_argument("run_b", metavar="DIR_B", help="the same for the other side; B - A is reported")
    compare.add_argument("--plots-dir", default=COMPARE_PLOTS_DIR,
                         help=f"where its plot goes (default {COMPARE_PLOTS_DIR})")
    curve = modes_.add_parser("teacher-curve", help="the student's best validation MCC against its teacher's: "
                                                    "one point per distil seed sweep, its share and the slope")
    curve.add_argument("sweeps", nargs="+", metavar="DIR",
                       help="a seed sweep of distil --teacher X (--tune \"seed=0,1,2\"), one per teacher")
    curve.add_argument("--plots-dir", default=COMPARE_PLOTS_DIR,
                       help=f"where teacher_curve.png goes (default {COMPARE_PLOTS_DIR})")
    return parser


# LoRA's flags whose default depends on the base: GPT-2's are the study's; a --base
# encoder's (BERT, MiniLM, RoBERTa, DistilBERT) are hf_lora.ENCODER_RECIPE.
GPT2_RECIPE = {"epochs": TRAIN.epochs, "batch_size": TRAIN.batch_size, "lr": TRAIN.lr, "lora_rank": LORA.rank,
               "lora_alpha": LORA.alpha, "train_layernorm": LORA.train_layernorm}


def defaults_by_base(lora):
    """The recipe's flags default to None (lora_recipe fills them in once the base is
    known); their help names both defaults."""
    def spoken(value):  # a switch as on/off, a number as itself
        return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"

    for dest, encoder in hf_lora.ENCODER_RECIPE.items():
        action = lora._option_string_actions["--" + dest.replace("_", "-")]
        action.default = None
        what = re.sub(r" ?\(?default [^)]*\)?$", "", action.help or "")
        shown = f"default {spoken(GPT2_RECIPE[dest])} for GPT-2, {spoken(encoder)} for a --base encoder"
        action.help = f"{what} ({shown})" if what else shown


def lora_recipe(args):
    """LoRA's epochs, batch size, lr, rank, alpha and LayerNorms as given, else the base's
    defaults: GPT-2's, or hf_lora.ENCODER_RECIPE for a --base encoder."""
    missing = [name for name in GPT2_RECIPE if getattr(args, name, None) is None]
    if args.mode != "LoRA" or not missing:
        return
    base = lora_base(args)
    recipe = hf_lora.ENCODER_RECIPE if base is not None and base.model_type != "gpt2" else GPT2_RECIPE
    for name in missing:
        setattr(args, name, recipe[name])


def add_training(p, out_dir):
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="CoLA: release or GLUE .tsv files (default data/cola, "
                                                        "shipped; a directory without them: the nyu-mll/glue hub copy)")
    p.add_argument("--val-split", default=DataConfig.val_split, choices=("in", "out", "all"),
                   help=f"validation set (default {DataConfig.val_split})")
    p.add_argument("--out-dir", default=out_dir, help=f"where metrics and weights go (default {out_dir})")
    p.add_argument("--plots-dir", default=None, help="where the PNG plots go (default OUT/plots)")
    p.add_argument("--no-plots", action="store_true",
                   help="draw no plot of the run (metrics.json holds every number it shows)")
    p.number("--epochs", TRAIN.epochs)
    p.number("--batch-size", TRAIN.batch_size)
    p.number("--lr", TRAIN.lr, "peak learning rate")
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=TRAIN.optimizer, help=f"default {TRAIN.optimizer}")
    p.number("--weight-decay", TRAIN.weight_decay, "adamw's decoupled weight decay")
    p.number("--warmup-ratio", TRAIN.warmup_ratio, "share of steps warming up")
    p.number("--grad-clip", TRAIN.grad_clip, "max gradient norm, 0 = off")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-dir", metavar="DIR", help="write every step's loss and learning rate and every epoch's "
                                                    "metrics to DIR: CSV files, and TensorBoard's when tensorboard "
                                                    "is installed")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last full epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir")
    p.add_argument("--keep-resume-state", action="store_true",
                   help="keep OUT/resume_state.pt after the run completes (by default removed: it is only "
                        "there to resume an interrupted run)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this call, resumable later (as if killed there)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step, the whole model in one graph per batch shape (the "
                        "student's RNN stepped over padded batches; CUDA graphs on GPUs; batches padded to "
                        "multiples of 16 tokens so a few graphs serve the run; an error, never a silent fall-back "
                        "to eager, if it cannot): pays off in long GPU runs only")
    p.add_argument("--tune", metavar="GRID", help='sweep: "lr=1e-3,3e-4 lora_rank=4,8" runs every combination '
                                                  "and appends a row per run to TUNING_DIR/<mode>.tsv")
    p.add_argument("--tuning-dir", default=TUNING_DIR, help=f"where --tune writes its table (default {TUNING_DIR})")
    add_dtype(p)
    add_common(p)


def add_student(p):
    p.add_argument("--rnn-type", choices=("rnn", "gru", "lstm"), default=STUDENT.rnn_type,
                   help=f"default {STUDENT.rnn_type} (rnn: ReLU)")
    p.number("--rnn-layers", STUDENT.n_layers)
    p.number("--rnn-hidden", STUDENT.hidden)
    p.add_argument("--rnn-embd", type=int, default=None, metavar="N",
                   help="token embedding size (default: the width of the embeddings the student starts from, "
                        f"at most {STUDENT.n_embd}, else {STUDENT.n_embd})")
    p.add_argument("--bidirectional", action="store_true", default=STUDENT.bidirectional)
    p.number("--rnn-dropout", STUDENT.dropout, "dropout between RNN layers")
    p.number("--embd-dropout", STUDENT.embd_dropout, "dropout on the token embeddings")
    p.number("--head-dropout", STUDENT.head_dropout, "dropout on the sentence's features, before the classifier")
    p.add_argument("--pool", choices=POOLS, default=STUDENT.pool,
                   help="the sentence's features: last = the final states (both directions' with --bidirectional); "
                        "max or mean = the top layer's outputs pooled over the real tokens "
                        f"(default {STUDENT.pool})")
    p.add_argument("--rnn-mlp", type=int, default=STUDENT.mlp_hidden, metavar="N",
                   help="a ReLU layer of N units between the features and the classifier (Tang et al. 2019: 200); "
                        f"0 = none (default {STUDENT.mlp_hidden})")
    p.add_argument("--embd-weight-decay", type=float, default=TRAIN.embd_weight_decay,
                   help="adamw's weight decay on the token embedding (default: --weight-decay's)")
    p.add_argument("--init-embeddings", choices=("random", "gpt2", "teacher"), default=None,
                   help="gpt2: start from GPT-2's token embeddings (--weights / --gpt-variant); teacher: read the "
                        "teacher's tokenizer (no special tokens added; saved under OUT/tokenizer/) and start from its "
                        "input embeddings (a LoRA teacher: its base GPT-2's, and GPT-2's tokenizer); both reduced by "
                        "PCA to --rnn-embd, which must not be wider (default: teacher when there is a teacher to "
                        "read, distil's --teacher or rnn's, else random)")
    p.add_argument("--embd-channels", choices=EMBD_CHANNELS, default=STUDENT.embd_channels,
                   help="trained: the embedding learns; frozen: it stays as initialised; both: a frozen and a "
                        "trained copy side by side, the RNN's input twice as wide (Tang et al. 2019) "
                        f"(default {STUDENT.embd_channels})")


# --- validation --------------------------------------------------------------

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


# --- gen ---------------------------------------------------------------------

def validate_gen(args):
    in_range(args, "[1, inf)", "--max-new-tokens", "--top-k", "--num-samples")
    in_range(args, "(0, 1]", "--top-p")
    if not args.greedy and not 0 < args.temperature < float("inf"):  # also catches nan
        raise UserError(f"--temperature must be > 0 and finite (got {args.temperature}); for deterministic output "
                        "use --greedy")
    check_path("--weights", args.weights, "dir", exists=True, what=WEIGHTS_DIR)


def run_gen(args):
    validate_gen(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT (or --prompt - and text on stdin)")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = modes.GPTSource(args.weights, args.gpt_variant).load(device)
    prompt_ids = encode(prompt)
    if len(prompt_ids) > model.config.block_size:
        info(f"note: the prompt has {len(prompt_ids)} tokens; only its last {model.config.block_size} are used")
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    stream = model.generate_stream(idx, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, generator=generator,
                                   stop_token=EOT_TOKEN, use_cache=not args.no_cache)
    # bf16 on CUDA: tensor cores and half the bytes per weight read. It changes the
    # numerics, so a greedy continuation can differ from float32's: --dtype float32.
    precision = resolve_precision(device, args.dtype, matrix_bound=False)
    with tf32_products(precision), autocast_for(device, precision):
        print_samples(prompt, stream, args.num_samples)


# --- Training modes: LoRA, rnn, distil ---------------------------------------

def augment_copies(args):
    """--augment as given, else its default: none from a logits file (nothing can label them)."""
    if args.augment is not None:
        return args.augment
    return 0 if args.teacher_logits else AUGMENT.copies


def init_embeddings(args):
    """--init-embeddings as given, else its default: the teacher's vectors wherever a
    teacher is named (distil always has one, its default included, unless it reads
    --teacher-logits; rnn when given --teacher), random otherwise. With MiniLM's vectors
    and 7 copies the student keeps 82% of the teacher's MCC (docs/results.md)."""
    if args.init_embeddings is not None:
        return args.init_embeddings
    if args.mode == "distil":
        return "random" if args.teacher_logits else "teacher"
    return "teacher" if args.teacher is not None else "random"


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
    check_path("--log-dir", args.log_dir, "dir", write=True)
    if args.tune:
        check_path("--tuning-dir", args.tuning_dir, "dir", write=True)
    check_path("--data-dir", args.data_dir, "dir", what="the directory of the CoLA .tsv files")
    check_path("--weights", args.weights, "dir", exists=True, what=WEIGHTS_DIR)
    if args.mode == "LoRA":
        lora_target_names(args)  # with --base: its files, its model type and its layers
        return
    check_path("--teacher", args.teacher, "dir", what="the teacher's directory (a LoRA run's --out-dir, or a "
                                                      "Hugging Face classifier's directory)")
    if args.mode != "distil":
        return
    check_path("--teacher-logits", args.teacher_logits, "file", exists=True,
               what="a .npy file of the teacher's logits, shape (training sentences, 2)")
    check_path("--teacher-cache", args.teacher_cache, "dir", write=True)


def validate_training_flags(args):
    """The values of a training mode's flags and their combinations."""
    if args.mode == "LoRA":
        if args.base is not None and args.weights is not None:
            raise UserError("--base and --weights both name the model to adapt; pass one (--base takes a Hugging "
                            "Face encoder or a GPT-2 directory, --weights a GPT-2 directory)")
        if args.base is not None and args.gpt_variant != modes.GPTSource.variant:
            raise UserError("--base and --gpt-variant both name the model to adapt; pass one")
        lora_recipe(args)
    in_range(args, "[1, inf)", "--epochs", "--batch-size", "--stop-after")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it; pass one of them")
    in_range(args, "(0, inf)", "--lr")
    in_range(args, "[0, 1)", "--warmup-ratio")
    in_range(args, "[0, inf)", "--grad-clip", "--weight-decay")
    if args.mode == "LoRA":
        if args.base is None:
            lora_target_names(args)
        in_range(args, "[1, inf)", "--lora-rank")
        in_range(args, "(0, inf)", "--lora-alpha")
        in_range(args, "[0, 1)", "--lora-dropout")
        return
    in_range(args, "[1, inf)", "--rnn-layers", "--rnn-hidden", "--rnn-embd")
    in_range(args, "[0, 1)", "--rnn-dropout", "--embd-dropout", "--head-dropout")
    in_range(args, "[0, inf)", "--embd-weight-decay", "--rnn-mlp")
    if args.mode == "rnn" and args.teacher is not None and init_embeddings(args) != "teacher":
        raise UserError("rnn reads --teacher only for --init-embeddings teacher (the teacher's tokenizer and "
                        "embeddings; it never runs it): add --init-embeddings teacher or drop --teacher")
    if args.mode != "distil":
        return
    if init_embeddings(args) == "teacher" and args.teacher_logits:
        raise UserError("--init-embeddings teacher reads the teacher's tokenizer and embeddings, and --teacher-logits "
                        "gives no teacher to read: pass --teacher DIR, or --init-embeddings random or gpt2")
    in_range(args, "(0, inf)", "--kd-temperature")
    in_range(args, "[0, 1]", "--kd-alpha", "--kd-alpha-real", "--mask-prob", "--swap-prob", "--ngram-prob")
    in_range(args, "[0, inf)", "--augment")
    in_range(args, "[1, inf)", "--max-ngram")
    if args.mask_prob + args.swap_prob > 1:
        raise UserError("--mask-prob + --swap-prob must be <= 1: a word is masked or swapped, not both")
    if augment_copies(args) and args.teacher_logits:
        raise UserError("--augment needs a teacher to label the synthetic sentences; --teacher-logits gives only "
                        "the training sentences' logits: pass --teacher DIR, or --augment 0")
    if augment_copies(args) and args.kd_alpha == 0:
        raise UserError("--augment with --kd-alpha 0: synthetic sentences have no gold label, so they would teach "
                        "nothing; raise --kd-alpha or pass --augment 0")


# --- flags -> typed configs (each default lives in its dataclass) ------------

def settings_of(args):
    """The flags as they ran (metrics.json's "args"), defaults resolved."""
    settings = {k: v for k, v in vars(args).items() if k != "mode"}
    if args.mode in ("rnn", "distil"):
        settings["init_embeddings"] = init_embeddings(args)
    if args.mode == "distil":
        settings["augment"] = augment_copies(args)
    if args.mode == "LoRA":
        settings["lora_targets"] = ",".join(lora_target_names(args))
    return settings


def lora_base(args):
    """--base checked (hf_lora.check_base: read once), None without one."""
    return None if args.base is None else hf_lora.check_base(args.base, args.lora_targets)


def lora_target_names(args):
    """--lora-targets as given, else the base's default: GPT-2's, or its model type's
    (hf_lora.DEFAULT_TARGETS); checked against the base's layers."""
    base = lora_base(args)
    if base is not None and base.model_type != "gpt2":
        return base.targets
    try:
        return lora_targets(args.lora_targets or ",".join(LORA.targets))
    except ValueError as e:
        raise UserError(f"--lora-targets: {e}") from None


def run_config(args):
    settings = settings_of(args)
    return RunConfig(out_dir=args.out_dir, plots_dir=args.plots_dir, plot=not args.no_plots, resume=args.resume,
                     overwrite=args.overwrite,
                     stop_after=args.stop_after, compile=args.compile, keep_resume_state=args.keep_resume_state,
                     progress=not args.no_progress, log_dir=args.log_dir, settings=settings,
                     signature={"mode": args.mode, **{k: v for k, v in settings.items() if k not in RUN_CONTROL}},
                     signature_defaults=ADDED_SETTINGS)


def train_config(args):
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, grad_clip=args.grad_clip,
                       seed=args.seed, embd_weight_decay=getattr(args, "embd_weight_decay", None), dtype=args.dtype)


def lora_config(args):
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=lora_target_names(args), train_layernorm=args.train_layernorm)


def student_config(args):
    return RNNConfig(vocab_size=VOCAB_SIZE, n_embd=args.rnn_embd, rnn_type=args.rnn_type, n_layers=args.rnn_layers,
                     hidden=args.rnn_hidden, bidirectional=args.bidirectional, dropout=args.rnn_dropout,
                     embd_dropout=args.embd_dropout, head_dropout=args.head_dropout, pool=args.pool,
                     mlp_hidden=args.rnn_mlp, embd_channels=args.embd_channels)


def distil_config(args):
    augment = AugmentConfig(copies=augment_copies(args), mask_prob=args.mask_prob, swap_prob=args.swap_prob,
                            ngram_prob=args.ngram_prob, max_ngram=args.max_ngram, seed=args.seed)
    teacher = args.teacher or (None if args.teacher_logits else DISTIL.teacher)
    return DistilConfig(teacher=teacher, teacher_logits=args.teacher_logits, teacher_cache=args.teacher_cache,
                        alpha=args.kd_alpha, alpha_real=args.kd_alpha_real, temperature=args.kd_temperature, loss=args.kd_loss, augment=augment)


def run_training(args):
    """A training mode: check every flag, claim and lock --out-dir, then build the
    mode's task from its configs and train it."""
    validate_training(args)
    run = run_config(args)
    if not is_main_process():  # rank 0 claims the directory for every rank
        return train_mode(args, run)
    with lock_dir(args.out_dir):
        claim_out_dir(run)
        return train_mode(args, run)


def train_mode(args, run):
    device = modes.prepare(args.device, args.seed)
    if args.mode in ("rnn", "distil") and device.type == "cpu":
        keep_freed_memory()  # a student's steps then reuse its embedding's gradient (utils)
    gpt, data = modes.GPTSource(args.weights, args.gpt_variant), DataConfig(args.data_dir, args.val_split)
    base = lora_base(args) if args.mode == "LoRA" else None
    if base is not None and base.model_type != "gpt2":
        task = modes.lora_hf(base, lora_config(args), data, device, args.dtype)
    elif args.mode == "LoRA":
        gpt = modes.GPTSource(base.directory) if base is not None else gpt  # a GPT-2 --base is --weights
        task = modes.lora(gpt, lora_config(args), data, device, args.dtype)
    elif args.mode == "rnn":
        task = modes.rnn(student_config(args), data, device, args.seed, gpt, init_embeddings(args),
                         args.teacher or DISTIL.teacher)
    else:
        task = modes.distil(distil_config(args), student_config(args), data, device, args.seed, args.dtype, gpt,
                            init_embeddings(args), run.progress)
    try:
        return modes.train(args.mode, task, run, train_config(args), device)
    except SaveError as e:  # a full disk mid-run: say what of the run is kept
        raise e.kept(what_is_kept(run)) from None
    except OSError as e:  # the same from a file appended to (--log-dir's)
        if e.filename is None or isinstance(e, BrokenPipeError):
            raise
        raise SaveError(e.filename, e.strerror or one_line(e), what_is_kept(run)) from None


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
    if deploy.is_export(args.checkpoint):  # an export: onnxruntime on the CPU, as deployed
        student = deploy.load(args.checkpoint)
        info(f"classifier: {student.description}")
        probabilities = [p for _, p in student.predict(sentences, args.batch_size)]
    else:
        probabilities = modes.predict(args.checkpoint, sentences, args.device, args.dtype, args.weights,
                                      args.batch_size)
    for sentence, p in zip(sentences, probabilities):
        print(f"{int(p >= 0.5)}\t{p:.4f}\t{sentence}")


def run_eval(args):
    validate_checkpoint_use(args)
    modes.evaluate_checkpoint(args.checkpoint, DataConfig(args.data_dir, args.val_split), args.output, args.device,
                              args.dtype, args.weights, args.batch_size)


def run_export(args):
    check_path("--checkpoint", args.checkpoint, "dir", exists=True, what="an rnn or distil run's out dir")
    check_path("--out", args.out, "dir", write=True)
    settings = export.export_student(args.checkpoint, args.out, args.quantize, args.overwrite)
    info(export.describe(settings, args.out))


# --- tune-report and compare -------------------------------------------------

def run_tune_report(args):
    if args.plots_dir is None:  # next to its table: a sweep's plot stays with the sweep
        args.plots_dir = os.path.dirname(args.table) or "."
    check_path("--plots-dir", args.plots_dir, "dir", write=True)
    return tune.run_tune_report(args)


def run_compare(args):
    check_path("--plots-dir", args.plots_dir, "dir", write=True)
    return tune.run_compare(args)


def run_teacher_curve(args):
    check_path("--plots-dir", args.plots_dir, "dir", write=True)
    return tune.run_teacher_curve(args)


RUNNERS = {"gen": run_gen, "predict": run_predict, "eval": run_eval, "export": run_export, "LoRA": run_training,
           "rnn": run_training, "distil": run_training, "tune-report": run_tune_report, "compare": run_compare,
           "teacher-curve": run_teacher_curve}
TRAINING_MODES = ("LoRA", "rnn", "distil")


def settings_from_the_run(args, parser, argv):
    """--resume takes the run's settings from its own metrics.json: a flag not written
    on the command line gets the value the run was started with (one written there
    must agree with it, or the resume is refused)."""
    if not (args.mode in TRAINING_MODES and args.resume and not args.tune):
        return
    if not os.path.isfile(os.path.join(args.out_dir, "metrics.json")):
        return  # nothing finished yet: claim_out_dir says what is wrong
    metrics = read_metrics(args.out_dir)
    mode = metrics.get("mode") if isinstance(metrics, dict) else None
    if mode and mode != args.mode:  # before any data or teacher is read for a run that cannot resume
        article = {"rnn": "an"}.get(mode, "a")
        raise UserError(f"--resume: {args.out_dir} holds {article} {mode} run, not {args.mode}; continue it with "
                        f"`run.py {mode} --out-dir {args.out_dir} --resume`, or pass another --out-dir")
    saved = metrics.get("args") or {}
    given = given_flags(parser, args.mode, argv)
    for name, value in saved.items():
        restored = name not in RUN_CONTROL or name in ("plots_dir", "no_plots", "log_dir")  # its outputs stay as they were
        if restored and name not in given and hasattr(args, name):
            setattr(args, name, value)


def main(argv=None):
    set_process_switches()
    try:
        argv = canonical_mode(sys.argv[1:] if argv is None else list(argv))
        parser = build_parser()
        args = parser.parse_args(argv)
        settings_from_the_run(args, parser, argv[1:])
        if args.mode in TRAINING_MODES and args.tune:
            validate_training(args)
            tune.run_tune(args, argv, build_parser(), run_training, RUN_CONTROL)
        else:
            RUNNERS[args.mode](args)
    except (UserError, WeightsError, CheckpointError, ResumeError, deploy.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"error: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python run.py gen | head`
        return 0
    except OSError as e:  # a file written outside atomic_write (a log, the lock): the path and the reason
        print(f"error: {e.filename or 'a file'}: {e.strerror or one_line(e)}; free some space or write elsewhere, "
              "then run it again", file=sys.stderr)
        return 2
    return 0


def sigterm_as_ctrl_c():
    """SIGTERM (kill, a scheduler's time limit, torchrun ending its workers) ends a run
    as Ctrl-C does: its finished epochs kept, its lock and a directory it made and
    left empty removed. It goes to SIGINT's handler of the moment, so a save that
    holds back a Ctrl-C holds back a SIGTERM too."""
    def handler(signum, frame):
        if importing(frame):  # an exception raised inside an import can be lost there: again in a moment
            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        current = signal.getsignal(signal.SIGINT)
        if not callable(current):  # SIGINT ignored (a background job): SIGTERM still ends the run
            raise KeyboardInterrupt
        current(signal.SIGINT, frame)
    signal.signal(signal.SIGTERM, handler)


def importing(frame):
    """Whether frame runs inside an import (whose extension modules may swallow an exception)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


if __name__ == "__main__":
    sigterm_as_ctrl_c()
    sys.exit(main())
