"""Benchmarks against the reference implementations, measured in the same run.

    python bench.py gen      # greedy decoding, ours vs transformers.generate
    python bench.py lora     # one CoLA epoch of LoRA training, ours vs transformers + peft
                             # (--base DIR: on a Hugging Face encoder instead of a GPT-2 shape)
    python bench.py distil   # seconds per distil epoch (teacher cached) vs per rnn epoch
    python bench.py rnn      # one rnn epoch on CPU: ours vs torch's RNN kernel and glibc's allocation
    python bench.py predict  # the student against GPT-2 teachers at inference: sentences/s, ms, size
    python bench.py finetune-reference --base DIR --seed S --out-dir D
                             # full fine-tuning with transformers.Trainer: the reference of LoRA --base
    python bench.py gpu      # the check of the CUDA path, each step within its own timeout: runs/gpu-report.md
                             # (--quick --device cpu: the same steps tiny, on a CPU; see gpu_check.py)

Each prints what it measured on stderr-free stdout lines; the last line is JSON:
{"bench": ..., "ours": ..., "reference": ..., "ratio": ...}.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch

from utils import DEFAULT_DATA_DIR, set_process_switches



def device_name(device):
    """The device as a reader needs it to compare figures: GPU name, or the CPU's
    model, its vector/matrix units and the threads used."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    units = ", ".join(u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags) or "no avx2"
    return f"cpu: {model} ({units}), {torch.get_num_threads()} threads"


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

    from checkpoints import load_gpt
    from train_utils import autocast_for, resolve_precision, tf32_products
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as ckpt:
        # random weights of the real gpt2 shape (124M): decoding speed does not depend on their values
        GPT2LMHeadModel(GPT2Config()).save_pretrained(ckpt)
        reference = GPT2LMHeadModel.from_pretrained(ckpt).to(device).eval()
        ours = load_gpt(ckpt).to(device)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), device=device)
    new = args.new_tokens

    # both sides in one precision, named: gen's auto (bf16 autocast on CUDA, float32 on CPUs) or --dtype
    precision = resolve_precision(device, args.dtype, matrix_bound=False)

    def in_precision(fn):
        def run():
            with tf32_products(precision), autocast_for(device, precision), torch.inference_mode():
                return fn()
        return run

    @in_precision
    def run_reference():
        return reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  use_cache=True, pad_token_id=50256)

    @in_precision
    def run_ours():
        return ours.generate(prompt, new, greedy=True, stop_token=None)

    same = torch.equal(run_reference().cpu(), run_ours().cpu())  # also the warm-up of both
    t_ref = best_of(args.repeats, run_reference, device)
    t_ours = best_of(args.repeats, run_ours, device)
    ceiling = matvec_ceiling(ours, new, device)
    ceiling_out_in = matvec_ceiling(ours, new, device, layout="out,in")
    print(f"device: {device_name(device)}")
    print(f"greedy, batch 1, {args.prompt_tokens}-token prompt, {new} new tokens, gpt2 shape, best of {args.repeats}, "
          f"both sides in {precision}")
    print(f"tokens identical to transformers: {same}" + ("" if precision == "float32" else
                                                         " (rounding may part them outside float32)"))
    print(f"transformers generate: {new / t_ref:.1f} tok/s")
    print(f"ours:                  {new / t_ours:.1f} tok/s")
    print(f"ceiling, bare vector-matrix products over every weight per token: {ceiling:.1f} tok/s "
          f"(weights stored (in, out) as ours); {ceiling_out_in:.1f} tok/s stored (out, in) as nn.Linear")
    print(f"ours at {new / t_ours / ceiling:.0%} of the ceiling, transformers at {new / t_ref / ceiling:.0%}")

    # --num-samples 8: one batch of 8 sampled continuations (top-k 50, transformers' default) against
    # generate(num_return_sequences=8); tokens/s summed over the samples
    samples = 8

    @in_precision
    def sample_reference():
        return reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=50,
                                  num_return_sequences=samples, use_cache=True, pad_token_id=50256)

    @in_precision
    def sample_ours():
        return ours.generate(prompt.repeat(samples, 1), new, top_k=50, stop_token=None,
                             generator=torch.Generator(device=device).manual_seed(0))

    sample_reference(), sample_ours()  # warm-up
    t_ref8 = best_of(args.repeats, sample_reference, device)
    t_ours8 = best_of(args.repeats, sample_ours, device)
    print(f"--num-samples {samples} (top-k 50 sampling), tokens/s over all samples: transformers "
          f"{samples * new / t_ref8:.1f}, ours {samples * new / t_ours8:.1f}, ratio {t_ref8 / t_ours8:.2f}")
    return {"bench": "gen", "device": device_name(device), "precision": precision, "ours": new / t_ours, "reference": new / t_ref,
            "ratio": t_ref / t_ours, "ceiling": ceiling, "ceiling_share": new / t_ours / ceiling, "identical": same,
            "samples8_ours": samples * new / t_ours8, "samples8_reference": samples * new / t_ref8,
            "samples8_ratio": t_ref8 / t_ours8}


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


# ---------------------------------------------------------------------------
# lora
# ---------------------------------------------------------------------------

def gemm_rate(device, dtype, n_embd, tokens=384):
    """GFLOP/s of one product of a LoRA step's shape, a batch's tokens through the MLP's
    first layer ((tokens x n_embd) @ (n_embd x 4 n_embd)): what the hardware gives each
    precision, to read the bf16-over-float32 ratio by."""
    a = torch.randn(tokens, n_embd, device=device, dtype=dtype)
    w = torch.randn(n_embd, 4 * n_embd, device=device, dtype=dtype)
    a @ w
    repeats = 20
    flops = repeats * 2 * tokens * n_embd * 4 * n_embd
    return flops / best_of(1, lambda: [a @ w for _ in range(repeats)], device) / 1e9


def cola_train(args):
    from utils import TokenizedSplit, load_cola
    if not os.path.isfile(os.path.join(args.data_dir, "in_domain_train.tsv")) and \
            not os.path.isfile(os.path.join(args.data_dir, "train.tsv")):
        sys.exit(f"bench: no CoLA in {args.data_dir}; pass --data-dir DIR")
    train, val = load_cola(args.data_dir)
    return TokenizedSplit(train), TokenizedSplit(val)


def lora_step_flop(batches, cfg):
    """Model FLOPs of LoRA training steps over batches: every token slot (padding
    included, as computed) through the frozen products forward and back to its input
    (2 + 2 FLOPs per weight), and the attention scores and mixing (2 * 2 * T^2 * d per
    layer and row forward, twice that back). The adapters' and head's own products
    are under 1% and left out."""
    d, layers = cfg["n_embd"], cfg["n_layer"]
    weights = layers * 12 * d * d  # c_attn 3d^2, attn.c_proj d^2, c_fc 4d^2, mlp.c_proj 4d^2
    flop = 0
    for b in batches:
        rows, width = b.idx.shape
        flop += 4 * weights * rows * width + 3 * 4 * layers * rows * width * width * d
    return flop


def peft_batches(train_set, batch_size, steps):
    """The reference's batches as transformers + peft users make them: a random order
    (seed 0), each batch padded to its longest sentence, with its attention mask:
    (idx, mask, labels) for each of the first steps."""
    from hf_lora import attention_mask
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [train_set.make_batch(order[i:i + batch_size])
               for i in range(0, min(len(order), steps * batch_size), batch_size)]
    return [(b.idx, attention_mask(b.idx, b.lengths), b.labels) for b in batches]


def peft_steps(reference, optimizer, params, batches, device, precision, grad_clip):
    """Training steps of a peft model over (idx, mask, labels) batches: the forward
    in precision, then zero_grad, backward, clipping and the optimizer's step."""
    from train_utils import autocast_for, tf32_products
    with tf32_products(precision):
        for idx, mask, labels in batches:
            with autocast_for(device, precision):
                loss = reference(input_ids=idx.to(device), attention_mask=mask.to(device),
                                 labels=labels.to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            loss.item()


def bench_lora(args):
    """One epoch (or --max-steps batches) of CoLA, --shape (gpt2) with random weights,
    rank 4 on c_attn, attn.c_proj, c_fc, mlp.c_proj, batch 32: ours in every precision
    (and --dtype auto's pick), with torch.compile where it can pay (CUDA, or --compile),
    against transformers + peft in auto's precision, named. Model FLOP/s are given as a
    share of the bf16 product rate measured in the same run. With --base: a Hugging
    Face encoder instead (bench_lora_base)."""
    if args.base:
        return bench_lora_base(args)
    import math

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from model import GPT, LORA_TARGETS, PRESETS, GPTClassifier, GPTConfig, add_lora, set_trainable, \
        store_frozen_in_bf16
    from train_utils import (COMPILE_PAD_TO, TrainConfig, batch_shapes, compile_limits, compile_model, make_training,
                             precision_of, resolve_precision, train_epoch)
    device = torch.device(args.device)
    batch_size = args.batch_size or 32
    train_set, _ = cola_train(args)
    steps = math.ceil(len(train_set) / batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3)
    auto = resolve_precision(device, "auto")
    precisions = ["float32", "tf32", "bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"]

    def ours_batches(pad_to=1):
        generator = torch.Generator().manual_seed(0)
        return train_set.batches(batch_size, shuffle=True, generator=generator, pad_to=pad_to)[:steps]

    plain, padded = ours_batches(), ours_batches(COMPILE_PAD_TO)  # eager's batches, and --compile's

    def ours_seconds(precision, compiled=False, epochs=1):
        """Seconds of each of `epochs` passes over the same batches (a compiled model
        pays its compiling in the first)."""
        torch.manual_seed(0)
        classifier = set_trainable(GPTClassifier(add_lora(GPT(GPTConfig(**PRESETS[args.shape])), LORA_TARGETS,
                                                          rank=4, alpha=8))).to(device)
        if precision == "bfloat16":
            store_frozen_in_bf16(classifier)
        training = make_training(classifier, cfg, steps * epochs)
        model = compile_model(classifier, device) if compiled else classifier
        batches = padded if compiled else plain
        times = []
        for _ in range(epochs):
            sync(device)
            start = time.perf_counter()
            with compile_limits() if compiled else contextlib.nullcontext():
                train_epoch(model, batches, training, device, precision=precision, grad_clip=cfg.grad_clip,
                            compiled=compiled)
            sync(device)
            times.append(time.perf_counter() - start)
        return times

    n_ours = sum(len(b.labels) for b in plain)
    seconds = {precision: ours_seconds(precision)[0] for precision in precisions}
    compiled = None
    if device.type == "cuda" or args.compile:
        compiled = ours_seconds(auto, compiled=True, epochs=3)

    # reference: transformers + peft, batched as its users do (random order, padded
    # per batch to the longest sentence, attention mask), same optimiser and clipping,
    # in the precision auto gives ours
    torch.manual_seed(0)
    hf = GPT2ForSequenceClassification(GPT2Config(pad_token_id=50256, num_labels=2, **PRESETS[args.shape]))
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS), fan_in_fan_out=True)
    reference = get_peft_model(hf, peft_config).to(device)
    reference.train()
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref_optimizer = torch.optim.AdamW(ref_params, lr=1e-3, weight_decay=0.01)
    ref_batches = peft_batches(train_set, batch_size, steps)
    start = time.perf_counter()
    peft_steps(reference, ref_optimizer, ref_params, ref_batches, device, auto, cfg.grad_clip)
    sync(device)
    t_ref = time.perf_counter() - start
    n_ref = sum(len(b[2]) for b in ref_batches)

    shape = PRESETS[args.shape]
    flop = lora_step_flop(plain, shape)
    gemm = {dtype: gemm_rate(device, dtype, shape["n_embd"]) for dtype in (torch.float32, torch.bfloat16)}
    print(f"device: {device_name(device)}")
    print(f"LoRA r=4 on {','.join(LORA_TARGETS)}, {args.shape} shape, batch {batch_size}, {len(plain)} steps "
          f"({'full epoch' if len(plain) == math.ceil(len(train_set) / batch_size) else 'slice of an epoch'})")
    print(f"bare matrix product of the step's shape: float32 {gemm[torch.float32]:.0f} GFLOP/s, bfloat16 "
          f"{gemm[torch.bfloat16]:.0f} GFLOP/s")
    print(f"transformers + peft ({precision_of(device)}, as auto runs ours): {n_ref / t_ref:.1f} sentences/s "
          f"({sum(b[0].numel() for b in ref_batches)} token slots incl. padding)")
    for precision, t in seconds.items():
        print(f"ours, --dtype {precision:<8}: {n_ours / t:7.1f} sentences/s, {flop / t / 1e9:8.0f} model GFLOP/s "
              f"= {flop / t / 1e9 / gemm[torch.bfloat16]:.0%} of the bf16 product rate"
              + ("   <- auto" if precision == auto else ""))
    fastest = min(seconds, key=seconds.get)
    print(f"auto = {auto}: {seconds[fastest] / seconds[auto]:.2f}x the speed of the fastest ({fastest}); "
          f"ours (auto) over transformers + peft: {(n_ours / seconds[auto]) / (n_ref / t_ref):.2f}x")
    result = {"bench": "lora", "device": device_name(device), "ours": n_ours / seconds[auto],
              "reference": n_ref / t_ref, "ratio": (n_ours / seconds[auto]) / (n_ref / t_ref), "steps": len(plain),
              "auto": auto, "fastest": fastest, "gemm_float32": gemm[torch.float32],
              "gemm_bfloat16": gemm[torch.bfloat16], "model_gflops": {p: flop / t / 1e9 for p, t in seconds.items()},
              **{p: n_ours / t for p, t in seconds.items()}}
    if compiled:
        padded_flop = lora_step_flop(padded, shape)
        steady = min(compiled[1:])
        print(f"ours, --compile (auto, batches padded to multiples of {COMPILE_PAD_TO} tokens): first epoch "
              f"{compiled[0]:.2f} s (compiling), then {steady:.2f} s = {n_ours / steady:.1f} sentences/s, "
              f"{padded_flop / steady / 1e9:.0f} model GFLOP/s incl. the padding; eager {seconds[auto]:.2f} s; "
              f"{batch_shapes(padded)} batch shapes")
        result.update(compiled_first=compiled[0], compiled_steady=steady, compiled=n_ours / steady)
    return result


def bench_lora_base(args):
    """One CoLA epoch (or --max-steps batches) of LoRA on a Hugging Face encoder
    (--base) with run.py's recipe for it (rank, alpha, batch, lr), ours (`run.py LoRA
    --base`: length-grouped batches) against
    transformers + peft on the same base, targets, rank and head, batched as their
    users batch it (random order, padded per batch to its longest sentence, attention
    mask): same optimiser, clipping and precision (--dtype auto's)."""
    import math

    from peft import LoraConfig, TaskType, get_peft_model

    import hf_lora
    from model import LoRAConfig
    from train_utils import TrainConfig, make_training, resolve_precision, train_epoch
    from utils import TokenizedSplit, load_cola
    device = torch.device(args.device)
    batch_size = args.batch_size or hf_lora.ENCODER_RECIPE["batch_size"]
    base = hf_lora.check_base(args.base)
    if base.model_type == "gpt2":
        sys.exit(f"bench: --base {args.base} is GPT-2; bench.py lora --shape times GPT-2")
    recipe = hf_lora.ENCODER_RECIPE  # what `run.py LoRA --base` trains by default
    cfg = LoRAConfig(rank=recipe["lora_rank"], alpha=recipe["lora_alpha"], targets=base.targets,
                     train_layernorm=recipe["train_layernorm"])
    torch.manual_seed(0)
    ours, tokens = hf_lora.lora_classifier(base, cfg)
    train, _ = load_cola(args.data_dir)
    train_set = TokenizedSplit(train, ours.max_len, tokenizer=tokens)
    steps = math.ceil(len(train_set) / batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    precision = resolve_precision(device, "auto")
    train_cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=recipe["lr"])
    batches = train_set.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))[:steps]
    ours.to(device)
    training = make_training(ours, train_cfg, steps)

    torch.manual_seed(0)
    wrapped = [name for name in hf_lora.encoder_linears(ours.hf) if isinstance(ours.hf.get_submodule(name),
                                                                             hf_lora.LoRALinear)]
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=wrapped, modules_to_save=hf_lora.modules_to_save(ours, cfg.train_layernorm))
    reference = get_peft_model(hf_lora.load_model(base.directory), peft_config).to(device)
    reference.train()
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(ref_params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    ref_batches = peft_batches(train_set, batch_size, steps)

    def ours_steps(chunk):
        train_epoch(ours, chunk, training, device, precision=precision, grad_clip=train_cfg.grad_clip)

    def reference_steps(chunk):
        peft_steps(reference, optimizer, ref_params, chunk, device, precision, train_cfg.grad_clip)

    def seconds(fn, chunk):
        sync(device)
        start = time.perf_counter()
        fn(chunk)
        sync(device)
        return time.perf_counter() - start

    train_epoch(ours, batches[:2], make_training(ours, train_cfg, 2), device, precision=precision)  # warm-ups
    reference_steps(ref_batches[:2])
    t_ours = t_ref = 0.0
    for i in range(0, steps, 10):  # in turns, 10 steps each, so that drifting load hits both alike
        t_ours += seconds(ours_steps, batches[i:i + 10])
        t_ref += seconds(reference_steps, ref_batches[i:i + 10])

    n_ours, n_ref = sum(len(b.labels) for b in batches), sum(len(labels) for _, _, labels in ref_batches)
    slots_ours, slots_ref = sum(b.idx.numel() for b in batches), sum(idx.numel() for idx, _, _ in ref_batches)
    trained = {"ours": sum(p.numel() for p in ours.parameters() if p.requires_grad), "reference": sum(
        p.numel() for p in ref_params)}
    print(f"device: {device_name(device)}")
    span = "full epoch" if len(batches) == math.ceil(len(train_set) / batch_size) else "slice of an epoch"
    print(f"LoRA r={cfg.rank} on {','.join(base.targets)} of {base.source} ({base.model_type}), head"
          f"{' and LayerNorms' if cfg.train_layernorm else ''} trained, "
          f"batch {batch_size}, {len(batches)} steps ({span}), {precision}; {trained['ours']:,} parameters "
          f"trained (peft: {trained['reference']:,})")
    print(f"transformers + peft (random batches padded to their longest): {n_ref / t_ref:.1f} sentences/s, "
          f"{slots_ref} token slots")
    print(f"ours (length-grouped batches): {n_ours / t_ours:.1f} sentences/s, {slots_ours} token slots; "
          f"{(n_ours / t_ours) / (n_ref / t_ref):.2f}x transformers + peft")
    return {"bench": "lora", "base": base.source, "device": device_name(device), "ours": n_ours / t_ours,
            "reference": n_ref / t_ref, "ratio": (n_ours / t_ours) / (n_ref / t_ref), "steps": len(batches),
            "sentences": {"ours": n_ours, "reference": n_ref}, "token_slots": {"ours": slots_ours,
                                                                              "reference": slots_ref},
            "trained_parameters": trained, "precision": precision}


# ---------------------------------------------------------------------------
# distil
# ---------------------------------------------------------------------------

def interleaved_best(repeats, time_a, time_b):
    """Fastest of repeats timings of each (after a warm-up), taken in turns so that
    drifting machine load hits both alike."""
    time_a()
    a, b = [], []
    for _ in range(repeats):
        a.append(time_a())
        b.append(time_b())
    return min(a), min(b)


def rnn_epoch_seconds(train_set, batch_size, device, loss_fn=None, python_steps=True):
    """Seconds of one training epoch of the default DistilRNN, the same batches every
    call; python_steps=False runs torch's own RNN kernel instead of packed_relu_rnn."""
    from model import DistilRNN, RNNConfig
    from train_utils import TrainConfig, cross_entropy_loss, make_training, train_epoch
    torch.manual_seed(0)
    student = DistilRNN(RNNConfig()).to(device)
    student.python_steps = python_steps
    cfg = TrainConfig(epochs=1, batch_size=batch_size)
    batches = train_set.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    training = make_training(student, cfg, len(batches))
    start = time.perf_counter()
    train_epoch(student, batches, training, device, loss_fn or cross_entropy_loss)
    sync(device)
    return time.perf_counter() - start


def bench_distil(args):
    """Seconds per distil epoch (teacher logits already computed) over seconds per
    rnn epoch: the same student, data, batches and batch size."""
    from train_utils import cross_entropy_loss, distillation_loss
    device = torch.device(args.device)
    batch_size = args.batch_size or 128
    train_set, _ = cola_train(args)
    # the teacher's logits, as the cache holds them: any (N, 2) array costs the same
    teacher_logits = torch.randn(len(train_set), 2, generator=torch.Generator().manual_seed(1)).to(device)

    def kd_loss(logits, batch):
        return distillation_loss(logits, teacher_logits[batch.rows.to(device)], batch.labels, 0.5, 2.0)

    def epoch_seconds(loss_fn):
        return rnn_epoch_seconds(train_set, batch_size, device, loss_fn)

    t_rnn, t_distil = interleaved_best(args.repeats, lambda: epoch_seconds(cross_entropy_loss),
                                       lambda: epoch_seconds(kd_loss))
    print(f"device: {device_name(device)}")
    print(f"DistilRNN defaults, batch {batch_size}, one CoLA epoch, best of {args.repeats}")
    print(f"rnn epoch:    {t_rnn:.2f} s")
    print(f"distil epoch: {t_distil:.2f} s (teacher logits cached)")
    return {"bench": "distil", "device": device_name(device), "ours": t_distil, "reference": t_rnn,
            "ratio": t_distil / t_rnn}


# ---------------------------------------------------------------------------
# rnn
# ---------------------------------------------------------------------------

def bench_rnn(args):
    """Seconds per rnn epoch (defaults: 2-layer ReLU RNN, 768 wide, batch 128), as
    run.py rnn trains on CPU (the RNN stepped in Python, freed memory kept in the
    heap), against torch's RNN kernel and glibc's default
    allocation, which maps the 154 MB embedding gradient afresh every step. Same
    model, batches and fused AdamW step; the variants are timed in turns."""
    from utils import keep_freed_memory
    device = torch.device(args.device)
    batch_size = args.batch_size or 128
    train_set, _ = cola_train(args)
    on_cpu = device.type == "cpu"

    def epoch_seconds(python_steps, keep):
        if on_cpu:
            keep_freed_memory(keep)
        return rnn_epoch_seconds(train_set, batch_size, device, python_steps=python_steps)

    variants = {"before: torch's RNN kernel, default allocation": (False, False),
                "RNN stepped in Python, default allocation": (True, False),
                "torch's RNN kernel, freed memory kept": (False, True),
                "ours: RNN stepped in Python, freed memory kept": (True, True)}
    times = {name: [] for name in variants}
    epoch_seconds(True, True)  # warm-up
    for _ in range(args.repeats):
        for name, settings in variants.items():
            times[name].append(epoch_seconds(*settings))
    best = {name: min(t) for name, t in times.items()}
    before, ours = best[next(iter(variants))], best[list(variants)[-1]]
    print(f"device: {device_name(device)}")
    print(f"DistilRNN defaults, batch {batch_size}, one CoLA epoch ({len(train_set)} sentences), "
          f"best of {args.repeats}, in turns")
    for name, t in best.items():
        print(f"{name:<50} {t:6.2f} s  {before / t:.2f}x")
    return {"bench": "rnn", "device": device_name(device), "ours": ours, "reference": before,
            "ratio": before / ours, "seconds": best}


# ---------------------------------------------------------------------------
# predict: what distillation buys at inference
# ---------------------------------------------------------------------------

# VmHWM, the process's own high-water mark: ru_maxrss would carry over the parent's,
# which the child was forked from
PEAK_MEMORY_SCRIPT = """import sys
sys.path.insert(0, sys.argv[1])
sentences = open(sys.argv[3], encoding="utf-8").read().splitlines()
if sys.argv[2] == "export":
    import deploy
    deploy.load(sys.argv[4]).predict(sentences)
else:
    import modes
    modes.predict(sys.argv[4], sentences, "cpu", "float32")
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_memory_mb(kind, directory, sentences_file):
    """Peak resident memory (MB) of a fresh process that loads directory and predicts
    the sentences: kind "export" through deploy.py (no torch), "run" through predict."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, os.path.dirname(os.path.abspath(__file__)),
                           kind, sentences_file, directory], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024  # kB


def export_rows(student, split, single, repeats, tmp):
    """The student exported to ONNX (float32 and int8) and run by onnxruntime on the
    same batches, its threads as many as torch's; and the peak memory of predicting
    the sentences in a process of their own, the PyTorch student's as the reference."""
    import deploy
    import onnxruntime
    from checkpoints import save_student
    from export import export_student
    run = os.path.join(tmp, "student_run")
    save_student(student, run)
    sentences_file = os.path.join(tmp, "sentences.txt")
    with open(sentences_file, "w", encoding="utf-8") as f:
        f.write("\n".join(split.split.sentences) + "\n")
    as_numpy = lambda batches: [(b.idx.numpy(), b.lengths.numpy()) for b in batches]  # noqa: E731
    batched, one = as_numpy(split.batches(64)), as_numpy(single.batches(1))
    cpu = torch.device("cpu")
    rows = {"DistilRNN student (defaults)": {"peak_mb": peak_memory_mb("run", run, sentences_file)}}
    for quantize in (None, "int8"):
        out = os.path.join(tmp, f"export_{quantize or 'float32'}")
        export_student(run, out, quantize)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(os.path.join(out, deploy.MODEL_FILE), options,
                                               providers=["CPUExecutionProvider"])

        def logits(batches, session=session):
            return [session.run(["logits"], {"input_ids": idx, "lengths": lengths}) for idx, lengths in batches]
        logits(batched[:2])  # warm-up
        seconds_64 = best_of(repeats, lambda: logits(batched), cpu)
        seconds_1 = best_of(repeats, lambda: logits(one), cpu)
        rows[f"DistilRNN ONNX export ({quantize or 'float32'})"] = {
            "sentences_per_s": len(split) / seconds_64, "ms_batch1": 1000 * seconds_1 / len(single),
            "params": sum(p.numel() for p in student.parameters()),
            "mb": os.path.getsize(os.path.join(out, deploy.MODEL_FILE)) / 2 ** 20,
            "peak_mb": peak_memory_mb("export", out, sentences_file)}
    return rows


MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)  # all-MiniLM-L6-v2's config.json


def predict_rates(model, split, single, repeats, device):
    """predict's path (train_utils.infer over length-sorted batches) timed: sentences/s
    at batch 64 and ms per sentence at batch 1, best of repeats, and the parameters."""
    from train_utils import infer
    infer(model, split.batches(64)[:2], device)  # warm-up
    batched = best_of(repeats, lambda: infer(model, split.batches(64), device), device)
    one = best_of(repeats, lambda: infer(model, single.batches(1), device), device)
    return {"sentences_per_s": len(split) / batched, "ms_batch1": 1000 * one / len(single),
            "params": sum(p.numel() for p in model.parameters())}


def hf_teacher_row(args, sentences, device, tmp):
    """The Hugging Face teacher through transformers, as distil labels with it
    (float32, attention mask, length-sorted batches; tokenizing not timed, as for the
    other rows): --teacher DIR, or a MiniLM-shaped BERT (all-MiniLM-L6-v2's shape,
    random weights) reading each sentence's GPT-2 tokens between [CLS] and [SEP]
    (about as many as its WordPiece tokens). Size on disk: its weights in float16, as
    the shared MiniLM teacher's files hold them."""
    import types

    from transformers.utils import logging

    from distil import HFTeacher
    from hf_lora import ClassifierTokens, HFClassifier, max_len_of
    from utils import GPT2_TOKENS, Split, TokenizedSplit
    logging.disable_progress_bar()
    if args.teacher:
        teacher = HFTeacher(args.teacher)
        model, name = teacher.model, f"HF teacher ({os.path.basename(os.path.normpath(args.teacher))})"
        tokens = ClassifierTokens(teacher.tokenizer, max_len_of(teacher.tokenizer, model.config))
        ids = tokens.encode(sentences)
    else:
        from transformers import BertConfig, BertForSequenceClassification
        torch.manual_seed(0)
        model, name = BertForSequenceClassification(BertConfig(num_labels=2, **MINILM_SHAPE)), "MiniLM-shaped teacher"
        ids = [[101, *(t % MINILM_SHAPE["vocab_size"] for t in tokens), 102]
               for tokens in GPT2_TOKENS.encode(sentences)]
        tokens = types.SimpleNamespace(pad_id=0)  # BERT's [PAD]; the ids are made above
    classifier = HFClassifier(model.float(), model.config.max_position_embeddings).eval().to(device)
    n = min(args.single_sentences, len(ids))
    split, single = (TokenizedSplit(Split(list(sentences[:k]), [0] * k, "dev"), classifier.max_len, tokens=ids[:k],
                                    tokenizer=tokens) for k in (len(ids), n))
    row = predict_rates(classifier, split, single, args.repeats, device)
    saved = os.path.join(tmp, "hf_teacher")
    model.half().save_pretrained(saved)
    model.float()
    return name, {**row, "mb": sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved)
                                   if f.endswith((".safetensors", ".bin"))) / 2 ** 20}


def bench_predict(args):
    """The student against GPT-2 LoRA classifiers as predict runs them (merged
    adapters, length-sorted batches), on CoLA's in-domain dev sentences: sentences/s
    at batch 64 and at batch 1, milliseconds per sentence at batch 1, parameters and
    size on disk; then the student's ONNX exports (float32, int8) under onnxruntime,
    and peak memory of predicting in a process of its own (student and exports). The
    MiniLM teacher through transformers is a row too (hf_teacher_row: --teacher DIR,
    or its shape with random weights)."""
    from model import GPT, PRESETS, DistilRNN, GPTClassifier, GPTConfig, RNNConfig, add_lora, merge_lora
    from utils import TokenizedSplit, load_cola, save_tensors
    device = torch.device(args.device)
    if args.teacher:
        from distil import HFTeacher
        HFTeacher(args.teacher)  # a bad --teacher fails now, not after the other rows
    _, val = load_cola(args.data_dir, "in")
    split = TokenizedSplit.of_texts(val.sentences, source="dev")
    single = TokenizedSplit.of_texts(val.sentences[:args.single_sentences], source="dev")

    def teacher(preset):
        torch.manual_seed(0)
        # merged: what predict does, inference at the plain model's cost
        return merge_lora(GPTClassifier(add_lora(GPT(GPTConfig(**PRESETS[preset])), rank=4, alpha=8))).eval()

    models = {"GPT-2 LoRA teacher (gpt2 shape)": lambda: teacher("gpt2"),
              "GPT-2 LoRA teacher (gpt2-medium shape)": lambda: teacher("gpt2-medium"),
              "DistilRNN student (defaults)": lambda: DistilRNN(RNNConfig()).eval()}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in models.items():
            model = make().to(device)
            path = os.path.join(tmp, "model.safetensors")
            save_tensors(path, model.state_dict())
            rows[name] = {**predict_rates(model, split, single, args.repeats, device),
                          "mb": os.path.getsize(path) / 2 ** 20}
        hf_name, row = hf_teacher_row(args, val.sentences, device, tmp)
        rows[hf_name] = row
        if device.type == "cpu":  # onnxruntime's CPU provider: the deployment target
            torch.manual_seed(0)
            for name, row in export_rows(DistilRNN(RNNConfig()).eval(), split, single, args.repeats, tmp).items():
                rows[name] = {**rows.get(name, {}), **row}
    print(f"device: {device_name(device)}")
    print(f"{len(split)} CoLA in-domain dev sentences; batch 64 length-sorted; batch 1 over the first "
          f"{len(single)}; float32 unless named; best of {args.repeats}; peak memory: a process predicting "
          f"them all")
    print(f"{'model':<40} {'params':>12} {'MB on disk':>10} {'sent/s @64':>11} {'sent/s @1':>10} "
          f"{'ms/sent @1':>11} {'peak MB':>8}")
    for name, r in rows.items():
        peak = f"{r['peak_mb']:>8.0f}" if "peak_mb" in r else f"{'-':>8}"
        print(f"{name:<40} {r['params']:>12,} {r['mb']:>10.1f} {r['sentences_per_s']:>11.0f} "
              f"{1000 / r['ms_batch1']:>10.0f} {r['ms_batch1']:>11.2f} {peak}")
    student, teacher_row = rows["DistilRNN student (defaults)"], rows["GPT-2 LoRA teacher (gpt2 shape)"]
    hf_row = rows[hf_name]
    for student_name in [n for n in rows if n.startswith("DistilRNN")]:
        r = rows[student_name]
        print(f"{student_name} over the {hf_name}: {r['sentences_per_s'] / hf_row['sentences_per_s']:.1f}x at batch 64, "
              f"{hf_row['ms_batch1'] / r['ms_batch1']:.1f}x at batch 1; over the gpt2-shaped teacher: "
              f"{r['sentences_per_s'] / teacher_row['sentences_per_s']:.1f}x and "
              f"{teacher_row['ms_batch1'] / r['ms_batch1']:.1f}x")
    return {"bench": "predict", "device": device_name(device), "ours": student["sentences_per_s"],
            "reference": teacher_row["sentences_per_s"],
            "ratio": student["sentences_per_s"] / teacher_row["sentences_per_s"], "models": rows,
            "hf_teacher": hf_name}


def bench_finetune_reference(args):
    """Full fine-tuning with transformers.Trainer: the reference of a `run.py LoRA
    --base` run on the same base and seed (finetune_reference.py)."""
    from checkpoints import CheckpointError
    from finetune_reference import ReferenceConfig, finetune_reference
    from utils import DataConfig, UserError
    if not args.base or not args.out_dir:
        sys.exit("error: finetune-reference needs --base DIR_OR_HUB_ID and --out-dir DIR")
    cfg = ReferenceConfig(seed=args.seed, epochs=args.epochs or ReferenceConfig.epochs,
                          batch_size=args.batch_size or ReferenceConfig.batch_size)
    try:
        record = finetune_reference(args.base, args.out_dir, cfg, DataConfig(args.data_dir, "in"), args.device)
    except (UserError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    best = record["epochs"][record["best_epoch"] - 1]
    return {"bench": "finetune-reference", "device": device_name(torch.device(args.device)), "seed": args.seed,
            "best_val_mcc": best["val_mcc"], "best_epoch": best["epoch"], "seconds": record["seconds"]}


BENCHES = {"gen": bench_gen, "lora": bench_lora, "distil": bench_distil, "rnn": bench_rnn, "predict": bench_predict,
           "finetune-reference": bench_finetune_reference}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    set_process_switches()
    if argv[:1] == ["gpu"]:  # the GPU check has flags of its own
        import gpu_check
        return gpu_check.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=sorted([*BENCHES, "gpu"]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is kept (gen)")
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="real CoLA (lora, distil)")
    p.add_argument("--max-steps", type=int, default=None, help="lora: time only this many batches of the epoch")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--shape", default="gpt2", choices=("gpt2", "gpt2-medium"), help="lora: the GPT-2 shape")
    p.add_argument("--compile", action="store_true", help="lora: also time torch.compile off CUDA (on CUDA always)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "tf32", "bfloat16"),
                   help="gen: the precision of both sides (default auto: as run.py gen)")
    p.add_argument("--single-sentences", type=int, default=100, help="predict: sentences timed at batch 1")
    p.add_argument("--base", help="finetune-reference: the Hugging Face encoder to fine-tune; lora: the encoder to "
                   "time LoRA on against transformers + peft (directory or hub id)")
    p.add_argument("--teacher", help="predict: a Hugging Face classifier directory to time as the teacher row "
                   "(default: all-MiniLM-L6-v2's shape, random weights)")
    p.add_argument("--seed", type=int, default=0, help="finetune-reference: the seed (pairs with a LoRA run's)")
    p.add_argument("--out-dir", help="finetune-reference: where metrics.json and the best model go")
    p.add_argument("--epochs", type=int, default=None, help="finetune-reference: epochs (default 4)")
    args = p.parse_args(argv)
    from checkpoints import CheckpointError
    from utils import UserError
    try:
        result = BENCHES[args.bench](args)
    except (UserError, CheckpointError) as e:  # a bad --base or --teacher: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
