"""Benchmarks against the reference implementations, measured in the same run.

    python bench.py gen      # greedy decoding, ours vs transformers.generate
    python bench.py lora     # one CoLA epoch of LoRA training, ours vs transformers + peft
    python bench.py distil   # seconds per distil epoch (teacher cached) vs per rnn epoch

Each prints what it measured on stderr-free stdout lines; the last line is JSON:
{"bench": ..., "ours": ..., "reference": ..., "ratio": ...}.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_COLA = os.path.join(HERE, "..", "shared", "data", "cola")


def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(repeats, fn, device):
    """Fastest of several timed calls of fn (after it already ran once to warm up)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


# ---------------------------------------------------------------------------
# gen
# ---------------------------------------------------------------------------

def bench_gen(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from model import GPT
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as ckpt:
        # random weights of the real gpt2 shape (124M): decoding speed does not depend on their values
        GPT2LMHeadModel(GPT2Config()).save_pretrained(ckpt)
        reference = GPT2LMHeadModel.from_pretrained(ckpt).to(device).eval()
        ours = GPT.from_pretrained(ckpt).to(device)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), device=device)
    new = args.new_tokens

    def run_reference():
        with torch.inference_mode():
            return reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      use_cache=True, pad_token_id=50256)

    def run_ours():
        return ours.generate(prompt, new, greedy=True, stop_token=None)

    same = torch.equal(run_reference().cpu(), run_ours().cpu())  # also the warm-up of both
    t_ref = best_of(args.repeats, run_reference, device)
    t_ours = best_of(args.repeats, run_ours, device)
    ceiling = matvec_ceiling(ours, new, device)
    ceiling_out_in = matvec_ceiling(ours, new, device, layout="out,in")
    print(f"device: {device_name(device)}")
    print(f"greedy, batch 1, {args.prompt_tokens}-token prompt, {new} new tokens, gpt2 shape, best of {args.repeats}")
    print(f"tokens identical to transformers: {same}")
    print(f"transformers generate: {new / t_ref:.1f} tok/s")
    print(f"ours:                  {new / t_ours:.1f} tok/s")
    print(f"ceiling, bare vector-matrix products over every weight per token: {ceiling:.1f} tok/s "
          f"(weights stored (in, out) as ours); {ceiling_out_in:.1f} tok/s stored (out, in) as nn.Linear")
    return {"bench": "gen", "device": device.type, "ours": new / t_ours, "reference": new / t_ref,
            "ratio": t_ref / t_ours, "ceiling": ceiling, "identical": same}


def matvec_ceiling(model, steps, device, layout="in,out"):
    """Tokens/s if decoding did nothing but multiply one vector by every weight
    matrix (LM head included): the memory-bandwidth bound of batch-1 decoding.
    layout "in,out" is how our model stores them; "out,in" is nn.Linear's."""
    matrices = [p.detach() for p in model.parameters() if p.dim() == 2 and p is not model.transformer.wpe.weight]
    if layout == "out,in":
        matrices = [m.t().contiguous() for m in matrices]
        vectors = {m.size(1): torch.randn(m.size(1), device=device) for m in matrices}
        product = lambda m: torch.mv(m, vectors[m.size(1)])  # noqa: E731
    else:
        vectors = {m.size(0): torch.randn(1, m.size(0), device=device) for m in matrices}
        product = lambda m: vectors[m.size(0)] @ m  # noqa: E731

    def one_pass():
        with torch.inference_mode():
            for _ in range(steps):
                for m in matrices:
                    product(m)
    one_pass()
    return steps / best_of(3, one_pass, device)


BENCHES = {"gen": bench_gen}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is kept (gen)")
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--data-dir", default=DEFAULT_COLA, help="real CoLA (lora, distil)")
    p.add_argument("--max-steps", type=int, default=None, help="lora: time only this many batches of the epoch")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args()
    sys.path.insert(0, HERE)
    result = BENCHES[args.bench](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
