"""Command line: python run.py gen|LoRA|rnn|distil|predict|eval ...

Parses and validates arguments, calls into model.py / train_utils.py / utils.py,
and turns every known problem into a one-line error (exit status 2).
"""
import argparse
import codecs
import os
import sys

from model import EOT_TOKEN, PRESETS, WeightsError
from utils import UserError, info

MODES = ("gen", "LoRA", "rnn", "distil", "predict", "eval")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and accepts every
    --dashed-flag also as --underscored_flag (e.g. --gpt_variant)."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")

    def add_argument(self, *names, **kwargs):
        aliases = [n.replace("-", "_").replace("__", "--", 1) for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*names, *aliases, **kwargs)


def add_common(p):
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: CUDA if present, else CPU)")


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
    add_common(gen)
    return parser


# ---------------------------------------------------------------------------
# gen
# ---------------------------------------------------------------------------

def validate_gen(args):
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.greedy and args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {args.temperature}); for deterministic output use --greedy")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    if not args.prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT (or --prompt - and text on stdin)")


def load_gpt(args, device):
    from model import GPT
    if args.weights:
        source = args.weights
        if not os.path.isdir(source):
            raise UserError(f"--weights {source}: no such directory (expected config.json + model.safetensors)")
    else:
        if args.gpt_variant not in PRESETS:
            raise UserError(f"unknown --gpt-variant {args.gpt_variant!r}; choose from {', '.join(PRESETS)}")
        source = args.gpt_variant
    info(f"loading GPT-2 weights from {source}")
    return GPT.from_pretrained(source).to(device)


def run_gen(args):
    import torch
    from utils import decode, encode, get_tokenizer, resolve_device, seed_everything
    validate_gen(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = load_gpt(args, device)
    prompt_ids = encode(args.prompt)
    if len(prompt_ids) > model.config.block_size:
        info(f"note: the prompt has {len(prompt_ids)} tokens; only its last {model.config.block_size} are used")
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = model.generate_stream(idx, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, generator=generator,
                                   use_cache=not args.no_cache)
    tokenizer = get_tokenizer()
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    # Tokens are byte pieces: decode incrementally so a character split across two
    # tokens is printed once it is complete.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated = [[] for _ in range(args.num_samples)]
    done = [False] * args.num_samples
    for tokens in stream:
        for i, token in enumerate(tokens.tolist()):
            if done[i] or token == EOT_TOKEN:
                done[i] = True
                continue
            generated[i].append(token)
            if i == 0:  # the first sample streams live, the others follow when it is done
                out.write(utf8.decode(tokenizer.decode_single_token_bytes(token)))
                out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    for i in range(1, args.num_samples):
        out.write(f"----- sample {i + 1}/{args.num_samples} -----\n")
        out.write(args.prompt + decode(generated[i]) + "\n")
    out.flush()


RUNNERS = {"gen": run_gen}


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        RUNNERS[args.mode](args)
    except (UserError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python run.py gen | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
