"""The steps of `python bench.py gpu` (gpu_check.py runs them): each is a function of
the check's Context that runs its commands through ctx.run (subprocesses within the
step's timeout) and returns (figures, Markdown lines). Also what their children run
(python -c "import gpu_steps; gpu_steps.NAME(...)"): a random checkpoint, a tiny
BERT teacher, the count of host syncs per training step."""
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
DTYPES = ("float32", "tf32", "bfloat16", "auto")
QUICK_ROWS = {"in_domain_train.tsv": 96, "in_domain_dev.tsv": 48, "out_of_domain_dev.tsv": 48}


@dataclass
class Step:
    name: str
    title: str
    run: object            # function(Context) -> (figures dict, Markdown lines)
    timeout: float         # seconds, full run
    quick_timeout: float   # seconds, --quick


def python_call(function, *args):
    """argv that runs gpu_steps.function(*args) in a fresh interpreter."""
    return [PYTHON, "-c", f"import gpu_steps; gpu_steps.{function}({', '.join(map(repr, args))})"]


def step_tests(ctx):
    """The suite, one pytest process per test file and several files at once (the
    suite is single-threaded per process); --quick runs the file of the GPU path's
    CPU checks alone, less those that compile."""
    files = sorted(f for f in os.listdir(os.path.join(PROJECT_ROOT, "tests"))
                   if f.startswith("test_") and f.endswith(".py"))
    select = []
    if ctx.quick:
        files = [f for f in files if f == "test_gpu_path.py"] or files[:1]
        select = ["-k", "not compile and not gloo and not graph"]  # inductor costs a minute a graph on a CPU
    jobs = max(1, min(8, (os.cpu_count() or 2) // 2))
    # each file its own temporary folder: pytest's clean-up of old ones must not meet another file's
    commands = ctx.run_all([(f, [PYTHON, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                                 "--basetemp", os.path.join(ctx.tmp, f"pytest-{f[:-3]}"), os.path.join("tests", f),
                                 *select]) for f in files], jobs=jobs)
    counts, failing, rows = {}, [], []
    for command in commands:
        parsed = pytest_counts(command.output)
        for key, n in parsed.items():
            counts[key] = counts.get(key, 0) + n
        failing += pytest_failures(command.output)
        if command.status == "timed out":
            failing.append(f"tests/{command.label} (timed out)")
        elif command.status == "not run":
            failing.append(f"tests/{command.label} (not run: out of time)")
        rows.append([command.label, command.status, f"{command.seconds:.0f}",
                     ", ".join(f"{n} {k}" for k, n in parsed.items()) or "-"])
    lines = [f"{len(files)} test files, {jobs} at a time: "
             + (", ".join(f"{n} {k}" for k, n in counts.items()) or "no counts"), ""]
    lines += table(["file", "status", "s", "counts"], rows)
    if failing:
        lines += ["", "Failing:"] + [f"- `{name}`" for name in failing]
    headline = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no counts"
    return {"headline": headline, "counts": counts, "failing": failing, "files": len(files)}, lines


def step_lora(ctx):
    """run.py LoRA at its default batch size on a random gpt2-medium-shaped checkpoint
    (--quick: a tiny one and a CoLA subset): 2 eager epochs in each --dtype, then
    --compile over 5 epochs in auto's precision, against eager's 5-epoch time in the
    precision the compiled run recorded."""
    data = quick_data(ctx)
    weights = os.path.join(ctx.tmp, "random-gpt2")
    made = ctx.run("random checkpoint", python_call("save_random_gpt2", weights, ctx.quick))
    if not made.ok:
        return {}, ["no checkpoint: nothing to train"]
    runs, rows = {}, []
    plan = [(dtype, False, 2) for dtype in dtypes_for(ctx)] + [("auto", True, 5)]
    for dtype, compiled, epochs in plan:
        name = f"{dtype}{' --compile' if compiled else ''}"
        out = os.path.join(ctx.tmp, f"lora-{dtype}{'-compile' if compiled else ''}")
        command = ctx.run(f"LoRA {name}", [PYTHON, "run.py", "LoRA", "--weights", weights, "--data-dir", data,
                                           "--epochs", epochs, "--dtype", dtype, "--device", ctx.device,
                                           "--out-dir", out, "--no-plots", "--no-progress",
                                           *(["--compile"] if compiled else [])])
        figures = run_figures(out, command)
        figures["compiled_shapes"] = compiled_shapes(command.output) if compiled else None
        figures["notes"] = [line for line in command.output.splitlines() if line.startswith(("note:", "warning:"))]
        runs[name] = figures
        rows.append([f"`--dtype {name}`", command.status, figures.get("precision") or "-",
                     " ".join(f"{s:.2f}" for s in figures.get("epoch_seconds", [])) or "-", f"{command.seconds:.1f}",
                     fmt(figures.get("best_val_mcc")), yes_no(figures.get("nan")),
                     "-" if figures["compiled_shapes"] is None else str(figures["compiled_shapes"])])
    shape = "1 layer, 32 wide (--quick)" if ctx.quick else "gpt2-medium's shape (24 layers, 1024 wide)"
    lines = [f"Random GPT-2 of {shape}; CoLA {data_note(ctx)}; run.py's default batch size; each run's wall time "
             "includes its start.", ""]
    lines += table(["run", "status", "precision recorded", "epoch seconds", "wall s", "best val MCC", "NaN",
                    "compiled shapes"], rows)
    compiled = runs.get("auto --compile", {})
    # eager in the precision the compiled run recorded: auto's own run, else the one auto resolved to
    same = [name for name in ("auto", *DTYPES) if name in runs and runs[name].get("precision") is not None
            and runs[name].get("precision") == compiled.get("precision")]
    compare = compile_against_eager(runs[same[0]], compiled) if same else None
    if compare:
        compare["eager_run"] = same[0]
        lines += ["", f"5 epochs in {compiled['precision']} (eager: `--dtype {same[0]}`): --compile "
                      f"{compare['compiled']:.2f} s, eager {compare['eager']:.2f} s ({compare['eager_from']}): "
                      "eager / compiled = "
                      f"{compare['eager'] / compare['compiled']:.2f}x. Past compiling, the fastest epoch: compiled "
                      f"{compare['compiled_steady']:.2f} s, eager {compare['eager_steady']:.2f} s = "
                      f"{compare['eager_steady'] / compare['compiled_steady']:.2f}x."]
    notes = sorted({note for figures in runs.values() for note in figures["notes"]})
    if notes:
        lines += ["", "Notes printed by the runs:"] + [f"- {note}" for note in notes]
    nan = [name for name, figures in runs.items() if figures.get("nan")]
    headline = (f"NaN in {', '.join(nan)}; " if nan else "no NaN; ") + (
        f"5 epochs: --compile {compare['compiled']:.1f} s, eager {compare['eager']:.1f} s; "
        f"compiled shapes: {compiled.get('compiled_shapes')}" if compare else "no compile comparison")
    return {"headline": headline, "runs": runs, "compile_vs_eager": compare}, lines


def dtypes_for(ctx):
    """Every --dtype; on a CPU under --quick float32 and bfloat16 alone (there tf32
    runs float32, and auto one of the two)."""
    if ctx.quick and ctx.device == "cpu":
        return ["float32", "bfloat16"]
    return list(DTYPES)


def compile_against_eager(eager, compiled):
    """The 5-epoch totals of the compiled run and of eager in the same precision; eager
    ran 2 epochs, so its 5 are its first plus 4 of its second (its steady pace)."""
    eager_s, compiled_s = eager.get("epoch_seconds") or [], compiled.get("epoch_seconds") or []
    if len(compiled_s) < 5 or not eager_s:
        return None
    if len(eager_s) >= 5:
        total, source = sum(eager_s[:5]), "measured"
    elif len(eager_s) >= 2:
        total, source = eager_s[0] + 4 * eager_s[1], "epoch 1 + 4 x epoch 2 of the eager run"
    else:
        total, source = 5 * eager_s[0], "5 x its only epoch"
    return {"compiled": sum(compiled_s[:5]), "eager": total, "eager_from": source,
            "compiled_steady": min(compiled_s[1:5]), "eager_steady": min(eager_s[1:] or eager_s)}


# --quick: bench.py lora with its gpt2 preset shrunk to 2 layers, 64 wide (the bench
# builds the preset twice, ours and peft's, and bf16 products crawl on CPUs without bf16 units)
QUICK_SHAPE = dict(n_layer=2, n_head=2, n_embd=64)
QUICK_SHAPE_TEXT = "2 layers, 2 heads, 64 wide"
BENCH_LORA_QUICK = (f"import sys, bench, model; model.PRESETS['gpt2'] = {QUICK_SHAPE!r}; "
                    "sys.argv = ['bench.py'] + sys.argv[1:]; bench.main()")
# and bench.py gen with transformers' GPT2Config defaulting to that shape (the bench builds gpt2's)
BENCH_GEN_QUICK = ("import functools, sys, transformers, bench; transformers.GPT2Config = functools.partial("
                   f"transformers.GPT2Config, **{QUICK_SHAPE!r}); sys.argv = ['bench.py'] + sys.argv[1:]; bench.main()")


def step_bench_lora(ctx):
    """bench.py lora on both shapes: ours in each precision, transformers + peft in
    auto's, named (ours at auto against peft is the like-for-like ratio), 40 steps of
    batch 32; --quick: one step of 2 sentences on the gpt2 preset shrunk to QUICK_SHAPE."""
    shapes = ["gpt2"] if ctx.quick else ["gpt2", "gpt2-medium"]
    results, rows, printed = {}, [], []
    for shape in shapes:
        if ctx.quick:
            argv = [PYTHON, "-c", BENCH_LORA_QUICK, "lora", "--device", ctx.device, "--shape", shape,
                    "--max-steps", "1", "--batch-size", "2"]
        else:
            argv = [PYTHON, "bench.py", "lora", "--device", ctx.device, "--shape", shape, "--max-steps", "40"]
        command = ctx.run(f"bench lora {shape}", argv)
        result = last_json(command.output)
        printed += [f"# {shape}"] + printed_lines(command.output)
        if result is None:
            rows.append([shape, command.status] + ["-"] * 6)
            continue
        results[shape] = result
        per_precision = ", ".join(f"{p} {result[p]:.1f}" for p in DTYPES if isinstance(result.get(p), (int, float)))
        rows.append([shape, command.status, result.get("auto", "-"), fmt(result.get("ours"), 1),
                     fmt(result.get("reference"), 1), fmt(result.get("ratio")), per_precision,
                     fmt(result.get("compiled"), 1)])
    lines = [f"--quick: the gpt2 preset shrunk to {QUICK_SHAPE_TEXT} (the figures below say gpt2 shape); one step of "
             f"2 sentences." if ctx.quick else "40 steps of batch 32 (bench.py lora's), random weights.", ""]
    lines += table(["shape", "status", "auto =", "ours (auto) sent/s", "peft (same precision) sent/s",
                    "ours / peft", "ours per --dtype, sent/s", "ours --compile sent/s"], rows)
    lines += ["", "Printed:", "```"] + printed + ["```"]
    headline = "; ".join(f"{shape}: ours / peft {fmt(r.get('ratio'), 2)}x in {r.get('auto')}"
                         for shape, r in results.items()) or "no figures"
    return {"headline": headline, "shapes": results}, lines


def step_student(ctx):
    """run.py rnn and distil in each --dtype, both reading a tiny random BERT (its
    tokenizer and embeddings; distil its logits too): best val MCC, any NaN, and
    every precision metrics.json records."""
    data = quick_data(ctx)
    teacher = os.path.join(ctx.tmp, "tiny-bert")
    made = ctx.run("tiny BERT teacher", python_call("save_tiny_bert", teacher, data))
    if not made.ok:
        return {}, ["no teacher: nothing to train"]
    student = ["--rnn-hidden", "32", "--rnn-embd", "16"] if ctx.quick else []
    runs, rows = {}, []
    for mode in ("rnn", "distil"):
        for dtype in dtypes_for(ctx):
            out = os.path.join(ctx.tmp, f"{mode}-{dtype}")
            extra = ["--augment", "1", "--teacher-cache", os.path.join(ctx.tmp, "cache")] if mode == "distil" else []
            command = ctx.run(f"{mode} {dtype}", [PYTHON, "run.py", mode, *student, "--teacher", teacher,
                                                  "--data-dir", data, "--epochs", "2", "--dtype", dtype,
                                                  "--device", ctx.device, "--out-dir", out, "--no-plots",
                                                  "--no-progress", *extra])
            figures = run_figures(out, command)
            runs[f"{mode} {dtype}"] = figures
            rows.append([mode, f"`{dtype}`", command.status,
                         "; ".join(f"{k} = {v}" for k, v in figures.get("precision_fields", {}).items()) or "-",
                         fmt(figures.get("best_val_mcc")), yes_no(figures.get("nan")), f"{command.seconds:.1f}"])
    lines = [f"Student {'32 hidden, 16-wide embeddings (--quick)' if ctx.quick else 'of the defaults'}, 2 epochs, "
             f"reading the tiny BERT's tokenizer and embeddings; distil with --augment 1; CoLA {data_note(ctx)}.", ""]
    nan = [name for name, figures in runs.items() if figures.get("nan")]
    mccs = [figures["best_val_mcc"] for figures in runs.values() if figures.get("best_val_mcc") is not None]
    headline = (f"NaN in {', '.join(nan)}" if nan else "no NaN") + (
        f"; best val MCC {min(mccs):.3f} to {max(mccs):.3f}" if mccs else "")
    return {"headline": headline, "runs": runs}, lines + table(
        ["mode", "--dtype", "status", "precision in metrics.json", "best val MCC", "NaN", "wall s"], rows)


def step_gen(ctx):
    """bench.py gen: greedy batch 1 and --num-samples 8, ours against transformers in
    one precision (auto's, and float32 on a full run); --quick: 8 tokens after an
    8-token prompt, once, on a GPT-2 of QUICK_SHAPE."""
    dtypes = ["auto"] if ctx.quick else ["auto", "float32"]
    bench = [PYTHON, "-c", BENCH_GEN_QUICK] if ctx.quick else [PYTHON, "bench.py"]
    small = ["--new-tokens", "8", "--prompt-tokens", "8", "--repeats", "1"] if ctx.quick else []
    results, rows, printed = {}, [], []
    for dtype in dtypes:
        command = ctx.run(f"bench gen {dtype}", [*bench, "gen", "--device", ctx.device, "--dtype", dtype, *small])
        result = last_json(command.output)
        printed += [f"# --dtype {dtype}"] + printed_lines(command.output)
        if result is None:
            rows.append([f"`{dtype}`", command.status] + ["-"] * 6)
            continue
        results[dtype] = result
        rows.append([f"`{dtype}`", command.status, result.get("precision", "-"), fmt(result.get("ours"), 1),
                     fmt(result.get("reference"), 1), fmt(result.get("ratio")), str(result.get("identical", "-")),
                     f"{fmt(result.get('samples8_ours'), 1)} / {fmt(result.get('samples8_reference'), 1)}"])
    lines = [f"--quick: the GPT-2 shrunk to {QUICK_SHAPE_TEXT} (the figures below say gpt2 shape)." if ctx.quick else
             "Random weights of gpt2's shape (bench.py gen's).", ""]
    lines += table(["--dtype", "status", "both sides in", "ours tok/s", "transformers tok/s", "ours / transformers",
                   "greedy tokens identical", "8 samples tok/s, ours / transformers"], rows)
    lines += ["", "Printed:", "```"] + printed + ["```"]
    headline = "; ".join(f"{r.get('precision')}: ours / transformers {fmt(r.get('ratio'), 2)}x, "
                         f"8 samples {fmt(r.get('samples8_ratio'), 2)}x" for r in results.values()) or "no figures"
    return {"headline": headline, "dtypes": results}, lines


def step_sync(ctx):
    """Host syncs per training step, counted by CUDA's sync debug mode."""
    command = ctx.run("count syncs", python_call("print_sync_counts", ctx.device, quick_data(ctx), ctx.quick))
    result = last_json(command.output) or {}
    rows = []
    for part, counts in result.get("parts", {}).items():
        rows.append([part, str(counts["steps"]), " / ".join(map(str, counts["syncs"])),
                     str(counts["per_step"]), "; ".join(counts["where"]) or "-"])
    lines = [result.get("how", "")] + [""] + table(
        ["part", "steps n", "syncs in n / 2n steps", "syncs per step", "where (2n steps)"], rows)
    result["headline"] = ", ".join(f"{part} {counts['per_step']}" for part, counts in result.get("parts", {}).items())
    result["headline"] = f"syncs per step: {result['headline']}" if result["headline"] else "no counts"
    return result, lines


# (name, title, function, timeout of a full run, of --quick): a full run's sum to 540 s,
# a quick one's to 280 s; --step-timeout changes them. The whole suite took 348 s in one
# process on a 2-core AMD EPYC, its longest file 49 s; on a GPU machine 8 files run at once.
STEPS = [
    Step("tests", "The test suite", step_tests, 100, 40),
    Step("lora", "LoRA on a random gpt2-medium-shaped checkpoint", step_lora, 180, 80),
    Step("bench-lora", "bench.py lora, ours against peft", step_bench_lora, 115, 30),
    Step("student", "rnn and distil with a tiny random BERT teacher", step_student, 75, 55),
    Step("gen", "bench.py gen, ours against transformers", step_gen, 40, 45),
    Step("sync", "Host syncs per training step", step_sync, 30, 30),
]


# ---------------------------------------------------------------------------
# What the children run (python -c "import gpu_steps; gpu_steps.NAME(...)")
# ---------------------------------------------------------------------------

def save_random_gpt2(path, quick):
    """A random GPT-2 in Hugging Face form: gpt2-medium's shape, or a tiny one for --quick."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    shape = dict(n_layer=1, n_head=2, n_embd=32, n_positions=128) if quick else dict(n_layer=24, n_head=16, n_embd=1024)
    GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(path)


def save_tiny_bert(path, data_dir):
    """A random BERT classifier (2 layers, 32 wide) on a word vocabulary of the
    training sentences, saved in float16 with its tokenizer (as the MiniLM teacher is)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from utils import load_cola
    train, _ = load_cola(data_dir, "in")
    words = sorted({w for s in train.sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(5)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, initializer_range=0.5)
    BertForSequenceClassification(config).half().save_pretrained(path)


def print_sync_counts(device_name, data_dir, quick):
    """Training steps of the rnn student, of the distil student (its loss against
    teacher logits) and of a LoRA classifier, counted under the sync debug mode: n
    steps, then 2n, after a warm-up; (syncs in 2n - syncs in n) / n is what a step
    adds, whatever the epoch reads once at its end. On a CPU the same steps run, and
    the count is n/a. Prints one JSON line."""
    import torch

    from distil import DistilConfig, DistilLoss
    from model import GPT, PRESETS, DistilRNN, GPTClassifier, GPTConfig, RNNConfig, add_lora, set_trainable
    from train_utils import TrainConfig, cross_entropy_loss, make_training, train_epoch
    from utils import TokenizedSplit, load_cola
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    train, _ = load_cola(data_dir)
    split = TokenizedSplit(train)
    n = 2 if quick else 8
    batches = split.batches(16 if quick else 64, shuffle=True, generator=torch.Generator().manual_seed(0))[:2 * n]
    teacher_logits = torch.randn(len(split), 2, generator=torch.Generator().manual_seed(1)).to(device)
    student_cfg = RNNConfig(n_embd=16, hidden=32) if quick else RNNConfig()
    gpt_cfg = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32) if quick else GPTConfig(**PRESETS["gpt2"])

    def lora_classifier():
        return set_trainable(GPTClassifier(add_lora(GPT(gpt_cfg), rank=4, alpha=8)))

    parts = {"rnn": (lambda: DistilRNN(student_cfg), cross_entropy_loss),
             "distil": (lambda: DistilRNN(student_cfg), DistilLoss(teacher_logits, DistilConfig())),
             "LoRA": (lora_classifier, cross_entropy_loss)}
    results = {}
    for name, (make, loss_fn) in parts.items():
        torch.manual_seed(0)
        model = make().to(device)
        training = make_training(model, TrainConfig(epochs=1, batch_size=16), 4 * n)

        def epoch(steps):
            train_epoch(model, batches[:steps], training, device, loss_fn)

        epoch(n)  # warm-up: lazy initialisations sync once
        if not cuda:
            epoch(n), epoch(2 * n)
            results[name] = {"steps": n, "syncs": ["n/a", "n/a"], "per_step": "n/a (CPU)", "where": []}
            continue
        (few, _), (many, where) = synced(lambda: epoch(n)), synced(lambda: epoch(2 * n))
        results[name] = {"steps": n, "syncs": [few, many], "per_step": (many - few) / n,
                         "where": [f"{place} x{count}" for place, count in
                                   sorted(where.items(), key=lambda item: -item[1])][:6]}
    how = ("counted with torch.cuda.set_sync_debug_mode('warn'): each synchronizing CUDA call warns once"
           if cuda else "n/a (CPU): the same training steps ran; CUDA's sync debug mode counts only on a GPU")
    print(json.dumps({"device": device_name, "how": how, "parts": results}))


def synced(fn):
    """(number of synchronizing CUDA calls fn made, {"file:line": count}). The sync
    debug mode warns through Python's warnings on the main thread and through C++'s
    handler (stderr) on autograd's threads: both are caught, from file descriptor 2."""
    import warnings

    import torch
    torch.cuda.synchronize()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    torch.cuda.synchronize()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        places = sync_places(log.read())
    return sum(places.values()), places


def sync_places(text):
    """{"file:line": count} of the sync debug mode's warnings in text: Python's name the
    line of Python that synced; C++'s (autograd's threads) name none."""
    places = {}
    for line in text.splitlines():
        if "synchronizing CUDA operation" in line:
            match = re.match(r"(.*?):(\d+): \w*Warning", line)
            place = f"{os.path.basename(match.group(1))}:{match.group(2)}" if match else "C++ (autograd thread)"
            places[place] = places.get(place, 0) + 1
    return places


# ---------------------------------------------------------------------------
# Reading what the runs wrote and printed
# ---------------------------------------------------------------------------

def run_figures(out_dir, command):
    """From a run.py run's metrics.json: per-epoch seconds, best val MCC, whether any
    loss or metric is NaN (there or in its epoch lines), and every precision it records."""
    path = os.path.join(out_dir, "metrics.json")
    nan_printed = bool(re.search(r"\bnan\b", command.output, re.IGNORECASE))
    if not os.path.isfile(path):
        return {"nan": nan_printed or None}
    with open(path) as f:
        metrics = json.load(f)
    epochs = metrics.get("history") or metrics.get("epochs") or []
    mccs = [e["val_mcc"] for e in epochs if isinstance(e.get("val_mcc"), (int, float))]
    numbers = [v for e in epochs for v in e.values() if isinstance(v, float)]
    return {"epoch_seconds": [e["seconds"] for e in epochs if isinstance(e.get("seconds"), (int, float))],
            "best_val_mcc": max((m for m in mccs if not math.isnan(m)), default=None),
            "nan": nan_printed or any(math.isnan(v) for v in numbers),
            "precision": metrics.get("environment", {}).get("precision"),
            "precision_fields": precision_fields(metrics)}


def precision_fields(metrics, prefix=""):
    """Every key naming a precision or dtype in metrics.json, as dotted path -> value
    (the run's arguments left out: they say what was asked, not what ran)."""
    found = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if path == "args":
            continue
        if isinstance(value, dict):
            found.update(precision_fields(value, path + "."))
        elif "precision" in key.lower() or "dtype" in key.lower():
            found[path] = value
    return found


def pytest_counts(output):
    """{"passed": n, "failed": n, ...} from pytest's last summary line ("3 failed, 40 passed in 9.1s")."""
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)",
                                                          line)}
    return {}


def pytest_failures(output):
    return [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


def compiled_shapes(output):
    """The shape count of a --compile run's last epoch line ("| 3 compiled shapes so far")."""
    counts = re.findall(r"(\d+) compiled shapes?", output)
    return int(counts[-1]) if counts else None


def last_json(output):
    for line in reversed(output.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def printed_lines(output):
    """A bench's figure lines: what it printed, less its closing JSON and any warnings."""
    return [line for line in output.splitlines()
            if line.strip() and not line.startswith("{") and "Warning" not in line and not line.startswith(" ")]


def data_note(ctx):
    if ctx.quick:
        train, dev = QUICK_ROWS["in_domain_train.tsv"], QUICK_ROWS["in_domain_dev.tsv"]
        return f"subset (first {train} training, {dev} dev rows)"
    return "in full"


def quick_data(ctx):
    """The shipped CoLA, or under --quick its first rows (made once per step)."""
    if not ctx.quick:
        return ctx.data_dir
    subset = os.path.join(ctx.tmp, "cola")
    if not os.path.isdir(subset):
        os.makedirs(subset)
        for name, rows in QUICK_ROWS.items():
            with open(os.path.join(ctx.data_dir, name), "rb") as src, open(os.path.join(subset, name), "wb") as dst:
                dst.writelines(line for _, line in zip(range(rows), src))
    return subset


def fmt(value, digits=3):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def yes_no(value):
    return "-" if value is None else ("yes" if value else "no")


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
