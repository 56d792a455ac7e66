"""The training loop, read top-down: metrics, losses, the precision rule, the
optimizer and schedule, one inference loop, one training epoch, fit (epochs,
validation, Ctrl-C, --compile) and the resumable state. LoRA, rnn and distil
(modes.py) differ in their model, loss and trainable parameters, never in a copy
of this loop."""
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import UserError, atomic_write, barrier, gather, info, one_line, world



# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def confusion(predictions, labels):
    """2x2 confusion matrix [[tn, fp], [fn, tp]] as plain ints."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    tp = int(((predictions == 1) & (labels == 1)).sum())
    tn = int(((predictions == 0) & (labels == 0)).sum())
    fp = int(((predictions == 1) & (labels == 0)).sum())
    fn = int(((predictions == 0) & (labels == 1)).sum())
    return [[tn, fp], [fn, tp]]


def mcc_from_confusion(matrix):
    """Matthews correlation, CoLA's official metric; 0 when undefined (as sklearn)."""
    (tn, fp), (fn, tp) = matrix
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels):
    return mcc_from_confusion(confusion(predictions, labels))


def accuracy(predictions, labels):
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def best_epoch(history):
    """The record of the first epoch with the highest validation MCC (the epoch a run keeps)."""
    return max(history, key=lambda r: (r["val_mcc"], -r["epoch"]))


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=2.0, kind="kl",
                      alpha_real=None):
    """Per row alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, label),
    averaged over the rows (Hinton et al. 2015). The T^2 keeps the soft term's
    gradients on the same scale whatever the temperature. kind="mse" matches logits
    instead (Tang et al. 2019). A row labelled -1 (a synthetic sentence: no gold
    label) gets the teacher term only. alpha_real (None: alpha) is the teacher's
    weight on the rows with a gold label, the real training sentences."""
    if alpha == 0 and not alpha_real:
        return F.cross_entropy(student_logits, labels)
    hard = F.cross_entropy(student_logits, labels, ignore_index=-1, reduction="none")
    if kind == "mse":
        soft = (student_logits - teacher_logits).pow(2).mean(-1)
    else:
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                        F.log_softmax(teacher_logits / temperature, dim=-1),
                        reduction="none", log_target=True).sum(-1) * temperature ** 2
    if alpha_real is not None and alpha_real != alpha:
        alpha = torch.full_like(soft, alpha).masked_fill(labels >= 0, alpha_real)
    return (alpha * soft + (1 - alpha) * hard).mean()


def cross_entropy_loss(logits, batch):
    return F.cross_entropy(logits, batch.labels)


# ---------------------------------------------------------------------------
# Precision: the one rule, measured
# ---------------------------------------------------------------------------

DTYPES = ("auto", "float32", "tf32", "bfloat16")


def has_amx():
    """Intel's AMX matrix units: bf16 matrix products at many times the float32 rate."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_precision(device, dtype="auto", matrix_bound=True):
    """The precision of training, eval, predict, the teacher and gen:
    - "float32": IEEE float32 for every product on every device, cuDNN's RNNs
      included (tf32_products switches TF32 off, whatever torch's defaults);
    - "tf32" (CUDA; float32 elsewhere): float32 numbers, the matrix products and
      cuDNN's RNNs on TF32 tensor cores (10-bit mantissa inputs, float32 sums);
    - "bfloat16": autocast, products in bf16 with float32's range, no loss scaling;
      weights and optimizer state stay float32. The student's RNN keeps to bf16
      only where autocast gives it bf16 (DistilRNN.rnn_runs_in: the ReLU RNN on a
      CPU); elsewhere it runs in float32 outside autocast, never in float16.
    "auto" picks the faster, as measured (docs/benchmarks.md, Precision):
    - CUDA, work made of batched products (training, classifying, labelling): tf32;
    - CUDA, gen (batch-1 decoding, bound by reading the weights): bf16;
    - a CPU with AMX, batched products: bf16;
    - other CPUs, and gen on any CPU: float32.
    metrics.json records the result (precision_of) and what the student's RNN ran in."""
    if dtype == "tf32":
        return "tf32" if device.type == "cuda" else "float32"
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "tf32" if matrix_bound else "bfloat16"
    return "bfloat16" if matrix_bound and device.type == "cpu" and has_amx() else "float32"


def precision_name(precision):
    """A precision as metrics.json and the teacher cache keys name it."""
    return "bf16-autocast" if precision == "bfloat16" else precision


def precision_of(device, dtype="auto", matrix_bound=True):
    """The precision's name in metrics.json (environment.precision, teacher.precision)
    and in every teacher cache key."""
    return precision_name(resolve_precision(device, dtype, matrix_bound))


def precision_parts(model, device, dtype="auto"):
    """What each part of model computes in, for metrics.json: the whole model's
    precision, and the RNN's where a student's differs (DistilRNN.rnn_runs_in)."""
    precision = resolve_precision(device, dtype)
    parts = {"model": precision_name(precision)}
    if hasattr(model, "rnn_runs_in"):
        parts["rnn"] = precision_name(model.rnn_runs_in(device.type, precision))
    return parts


def autocast_for(device, precision):
    """Around a forward pass (the backward follows the forward's casts by itself)."""
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def tf32_products(precision):
    """Around a whole pass (forward and backward): TF32 for cuBLAS's matrix products
    and cuDNN's (RNNs included) while precision is "tf32", IEEE float32 otherwise,
    set explicitly either way (torch's own default lets cuDNN use TF32), and the
    previous settings restored after. The switches are set through torch's
    allow_tf32 flags, which keep both of torch's ways of reading them in step:
    torch.get_float32_matmul_precision(), which torch.compile's inductor reads,
    and the per-backend fp32_precision (setting the latter alone leaves the former
    raising "mix of the legacy and new APIs")."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = previous


# ---------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"       # adam | adamw
    weight_decay: float = 0.01     # adamw only
    warmup_ratio: float = 0.06     # share of all steps spent warming the lr up linearly
    grad_clip: float = 1.0         # max gradient norm; 0 turns clipping off
    seed: int = 0
    embd_weight_decay: float = None  # adamw's weight decay on a student's token embedding; None: weight_decay
    dtype: str = "auto"            # auto | float32 | tf32 | bfloat16, see resolve_precision

    def steps_per_epoch(self, sentences):
        return math.ceil(sentences / self.batch_size)


def make_optimizer(named_params, cfg: TrainConfig):
    """Adam or AdamW over (name, parameter) pairs, those that require grad
    (make_training leaves out a frozen embedding: --embd-channels frozen or both).
    The fused kernel updates each tensor in one pass over memory: the DistilRNN's
    50257x768 embedding makes the step memory-bound, and the fused step is many
    times faster on CPU than the default (docs/benchmarks.md)."""
    named_params = list(named_params)
    device_type = named_params[0][1].device.type
    fused = dict(fused=True) if device_type in ("cpu", "cuda") else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam([p for _, p in named_params], lr=cfg.lr, **fused)
    embedding = [p for n, p in named_params if n == "embedding.weight"]
    others = [p for n, p in named_params if n != "embedding.weight"]
    embd_decay = cfg.weight_decay if cfg.embd_weight_decay is None else cfg.embd_weight_decay
    groups = [{"params": others}] + ([{"params": embedding, "weight_decay": embd_decay}] if embedding else [])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def make_scheduler(optimizer, total_steps, warmup_ratio):
    """Linear warm-up to the full lr, then linear decay to zero."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Training(NamedTuple):
    """What one epoch after another optimises with: the trainable parameters, their
    optimizer and its learning-rate schedule."""
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def make_training(model, cfg: TrainConfig, batches_per_epoch):
    """The Training of model's parameters that require grad, for cfg.epochs epochs."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(named, cfg)
    return Training([p for _, p in named], optimizer,
                    make_scheduler(optimizer, batches_per_epoch * cfg.epochs, cfg.warmup_ratio))


# ---------------------------------------------------------------------------
# Inference: one loop for eval, predict, validation and the teacher
# ---------------------------------------------------------------------------

def unwrapped(model):
    """The module inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def forward(model, batch, compiled=False):
    """model's float32 logits for a batch already on the device. A model that
    plans on the host (a student packing its sequences) is also handed the lengths
    kept there, so nothing is read back from the device; a compiled one never is
    (a host tensor would keep CUDA graphs from recording, and its padded steps need
    none)."""
    if not compiled and getattr(unwrapped(model), "reads_host_lengths", False):
        return model(batch.idx, batch.lengths, batch.host_lengths).float()
    return model(batch.idx, batch.lengths).float()


@torch.no_grad()
def infer(model, batches, device, precision="float32"):
    """(logits, labels, rows) of every row of batches, sorted by row (the split's
    order), computed by this process alone (no collectives: safe on one rank of
    several). The logits stay on the device until the end: one copy, no sync per batch."""
    model.eval()
    logits, labels, rows = [], [], []
    with tf32_products(precision):
        for batch in batches:
            with autocast_for(device, precision):
                logits.append(forward(model, batch.to(device)))
            labels.append(batch.labels)
            rows.append(batch.rows)
    if not logits:
        return torch.empty(0, 2), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    logits, labels, rows = torch.cat(logits).cpu(), torch.cat(labels), torch.cat(rows)
    order = rows.argsort()
    return logits[order], labels[order], rows[order]


def evaluate(model, batches, device, precision="float32"):
    """Cross-entropy against the gold labels, accuracy, MCC, confusion matrix and
    per-row logits over batches. Under torchrun each rank evaluates its share of
    the batches and the results are gathered, so every sentence counts exactly once."""
    rank, size = world()
    parts = gather(infer(model, batches[rank::size], device, precision))
    logits, labels, rows = (torch.cat([part[i] for part in parts]) for i in range(3))
    order = rows.argsort()  # back to the split's row order
    logits, labels = logits[order], labels[order]
    predictions = logits.argmax(-1)
    matrix = confusion(predictions, labels)
    loss = float(F.cross_entropy(logits, labels)) if len(labels) else 0.0
    return {"loss": loss, "acc": accuracy(predictions, labels), "mcc": mcc_from_confusion(matrix),
            "confusion": matrix, "n": len(labels), "logits": logits}


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def replays_cuda_graphs(device, compiled):
    """Whether a compiled model's steps replay as CUDA graphs (compile_model's mode)."""
    return compiled and device.type == "cuda"


@dataclass
class EpochWatch:
    """What an epoch shows and records besides its result."""
    bar: object = None            # a tqdm bar: updated every step, its loss every show_loss_every steps
    show_loss_every: int = 25
    steps: list = None            # receives each step's (loss on the device, learning rate)
    shapes: set = None            # receives the shape of every batch the model received on this rank


def train_epoch(model, batches, training: Training, device, loss_fn=cross_entropy_loss, precision="float32",
                grad_clip=1.0, compiled=False, watch=None):
    """One pass of optimisation over batches; returns (mean loss, predictions, labels)
    over the epoch's real sentences (gathered from every rank under torchrun).

    Nothing in the loop waits for the device: the loss and the predictions pile up
    there and are read once, at the end; the lengths a student packs by come from
    the host (forward). Only the progress bar's running loss is read, every
    watch.show_loss_every steps. compiled: model is torch.compile's (on CUDA its
    steps replay as CUDA graphs)."""
    watch = watch or EpochWatch()
    params, optimizer, scheduler = training
    bar, steps, shapes = watch.bar, watch.steps, watch.shapes
    rank, size = world()
    model.train()
    loss_sum, rows, predictions, labels = torch.zeros((), device=device), 0, [], []
    show_loss = bar is not None and not bar.disable
    graphs = replays_cuda_graphs(device, compiled)
    with tf32_products(precision):
        for step, batch in enumerate(batches, start=1):
            local = batch.shard(rank, size)
            if len(local.labels) == 0:  # fewer sentences than ranks: join in with a zero-weight row
                local, weight = batch.shard(0, size), 0.0
            else:
                # DDP averages gradients over ranks: weigh this rank's mean loss by its share
                # of the global batch so the result is the global batch's mean
                weight = size * len(local.labels) / len(batch.labels)
            on_device = local.to(device)
            if shapes is not None:
                shapes.add(tuple(on_device.idx.shape))
            # before the forward: the backward's graph then writes fresh gradients, which the
            # optimizer reads before the next replay reuses their memory
            optimizer.zero_grad(set_to_none=True)
            if graphs:  # a new iteration: the previous replay's outputs may now be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with autocast_for(device, precision):
                logits = forward(model, on_device, compiled)
            loss = loss_fn(logits, on_device)  # computed outside the graph: a tensor of its own
            if steps is not None:
                steps.append((loss.detach(), scheduler.get_last_lr()[0]))
            (loss * weight if size > 1 else loss).backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            if weight:
                loss_sum += loss.detach() * len(local.labels)
                rows += len(local.labels)
                # argmax makes a new tensor: what piles up over the epoch is never a replay's
                # output, which the next replay overwrites
                predictions.append(logits.detach().argmax(-1))
                labels.append(local.labels)
            if bar is not None:
                bar.update()
                if show_loss and (step % watch.show_loss_every == 0 or step == len(batches)):
                    bar.set_postfix(loss=f"{loss.item():.4f}")
    predictions, labels = torch.cat(predictions).cpu(), torch.cat(labels)
    real = labels >= 0  # synthetic sentences (label -1) have no accuracy to count
    parts = gather((float(loss_sum), rows, predictions[real], labels[real]))
    predictions = torch.cat([p[2] for p in parts])
    labels = torch.cat([p[3] for p in parts])
    return sum(p[0] for p in parts) / sum(p[1] for p in parts), predictions, labels


class Interrupted(Exception):
    """Training stopped early (Ctrl-C); everything up to the last full epoch is saved."""


# Under --compile every batch is padded to a multiple of this many tokens: with CoLA's
# lengths (up to ~50 tokens) a compiled model meets a handful of shapes, one graph each.
COMPILE_PAD_TO = 16


# Graphs a compiled model may build, one per batch shape it meets: CoLA's padded widths
# times a few batch sizes (the last batch of an epoch, each rank's share) stay well within.
COMPILE_GRAPH_LIMIT = 64


class CompileError(UserError):
    """torch.compile cannot compile the model as asked (a graph break, too many shapes)."""


def compile_model(model, device, one_graph=True):
    """torch.compile for a training run: static shapes (the batches come in a few
    padded lengths), and on CUDA the graphs replayed as CUDA graphs
    (mode="reduce-overhead"), so a step's hundreds of small kernels launch at once.
    one_graph: the whole forward in one graph or an error (fullgraph), never a
    silent break back to eager code; DDP's own graph splitting needs it off."""
    return torch.compile(model, dynamic=False, fullgraph=one_graph,
                         mode="reduce-overhead" if device.type == "cuda" else None)


@contextmanager
def compile_limits():
    """While a compiled model trains: up to COMPILE_GRAPH_LIMIT graphs, and past
    that an error instead of torch's silent fall-back to eager code. A
    CompileError names what went wrong in one line."""
    import torch._dynamo
    settings = dict(recompile_limit=COMPILE_GRAPH_LIMIT, fail_on_recompile_limit_hit=True,
                    # the student's RNN module is only read for its weights (rnn_steps.padded_rnn
                    # steps it), which dynamo refuses for nn.RNN/GRU/LSTM unless allowed
                    allow_rnn=True)
    with torch._dynamo.config.patch(**{k: v for k, v in settings.items() if hasattr(torch._dynamo.config, k)}):
        try:
            yield
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise CompileError(f"--compile: the model met more than {COMPILE_GRAPH_LIMIT} batch shapes, one graph "
                               "each; drop --compile for this data") from None
        except torch._dynamo.exc.Unsupported as e:
            raise CompileError(f"--compile: torch cannot compile this model in one graph "
                               f"({one_line(e)[:160]}); drop --compile") from None


def compile_note(device, steps, shapes):
    """One line before a --compile run that cannot pay off, else None."""
    if device.type != "cuda":
        return (f"note: --compile on {device.type.upper()}: each of the {shapes} batch shapes compiles for a minute "
                "or more before its first step; only a long run earns that back (docs/benchmarks.md)")
    if steps < 200:
        return (f"note: --compile: this run has only {steps} steps; compiling its {shapes} batch shapes may take "
                "longer than it saves")
    return None


def batch_shapes(batches):
    return len({tuple(b.idx.shape) for b in batches})


@dataclass
class Loop:
    """How fit drives the epochs, none of which changes what a run learns (but for
    --compile's rounding). rundir.RunConfig, a run of the command line, has the
    same fields and stands in for it."""
    progress: bool = True          # progress bars (rank 0)
    state_path: str = None         # the resumable state, written after each epoch
    resume: bool = False           # continue from state_path
    signature: dict = None         # the settings a resume must find unchanged
    signature_defaults: dict = None  # what a state saved before a setting existed ran as
    stop_after: int = None         # end this call after this many epochs, as if killed there
    compile: bool = False          # train through torch.compile


def fit(model, data, cfg: TrainConfig, device, loss_fn=cross_entropy_loss, loop=Loop(), on_epoch_end=None,
        on_steps=None):
    """Train the parameters of model that require grad on data's training split;
    evaluate on its validation split after each epoch. Returns the epoch records.

    loop (a Loop, or a RunConfig): with a state_path, everything needed to continue
    (trainable weights, optimiser, scheduler, RNG states, history) is saved there
    after each epoch, and resume continues from it if the signature matches the
    saved one. on_epoch_end(history, is_best, val) runs on rank 0 after every epoch
    (to save metrics and the best weights); on_steps(epoch, losses, lrs) receives
    every step's loss and learning rate once the epoch is over (rank 0)."""
    train_set, val_set = data
    state_path, compile, stop_after = loop.state_path, loop.compile, loop.stop_after
    rank, size = world()
    precision = resolve_precision(device, cfg.dtype)
    steps_per_epoch = cfg.steps_per_epoch(len(train_set))
    training = make_training(model, cfg, steps_per_epoch)
    optimizer, scheduler = training.optimizer, training.scheduler
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    if loop.resume:
        history = load_training_state(state_path, model, optimizer, scheduler, generator, loop.signature,
                                      loop.signature_defaults)
        info(f"resuming after epoch {len(history)} of {cfg.epochs} from {state_path}")
    # model itself keeps its parameter names for the saved state; only the training
    # forward goes through the DDP and compiled wrappers, so --compile may change on --resume
    trained = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel
        # device_ids=None: DDP then leaves the inputs where they are, the host lengths on the host
        trained = DistributedDataParallel(model, device_ids=None)
    pad_to = COMPILE_PAD_TO if compile else 1
    shapes = set()  # the batch shapes the (compiled) model received on this rank
    if compile:
        trained = compile_model(trained, device, one_graph=size == 1)
    val_batches = val_set.batches(cfg.batch_size)
    epochs_this_call = 0
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if stop_after is not None and epochs_this_call >= stop_after:
            break
        start = time.time()
        batches = train_set.batches(cfg.batch_size, shuffle=True, generator=generator, pad_to=pad_to)
        if compile and epochs_this_call == 0:  # before the first compiled step: a run that cannot pay says so
            note = compile_note(device, steps_per_epoch * (cfg.epochs - len(history)), batch_shapes(batches))
            if note:
                info(note)
        steps = [] if on_steps is not None else None
        try:
            with tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, unit="batch",
                      disable=not loop.progress or rank != 0) as bar, (compile_limits() if compile else nullcontext()):
                train_loss, predictions, labels = train_epoch(trained, batches, training, device, loss_fn,
                                                              precision, cfg.grad_clip, compiled=compile,
                                                              watch=EpochWatch(bar, steps=steps, shapes=shapes))
        except KeyboardInterrupt:
            if epoch == 1:
                raise Interrupted("interrupted in epoch 1, before any epoch finished; nothing was saved") from None
            saved = "epoch 1 is saved" if epoch == 2 else f"epochs 1-{epoch - 1} are saved"
            raise Interrupted(f"interrupted in epoch {epoch}; {saved}"
                              + (" and --resume continues from there" if state_path else "")) from None
        val = evaluate(model, val_batches, device, precision)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": accuracy(predictions, labels),
                  "train_mcc": matthews_corrcoef(predictions, labels), "val_loss": val["loss"],
                  "val_acc": val["acc"], "val_mcc": val["mcc"], "val_n": val["n"], "seconds": time.time() - start}
        is_best = all(val["mcc"] > r["val_mcc"] for r in history)
        history.append(record)
        epochs_this_call += 1
        info(f"epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
             f"val loss {val['loss']:.4f} acc {val['acc']:.4f} mcc {val['mcc']:.4f} | "
             f"{record['seconds']:.1f}s{' (best)' if is_best else ''}"
             + (f" | {len(shapes)} compiled shapes so far" if compile else ""))
        if rank == 0:
            # a Ctrl-C now must not leave half the epoch's files written
            with defer_interrupts():
                if on_steps is not None:
                    losses = torch.stack([loss for loss, _ in steps]).cpu().tolist() if steps else []
                    on_steps(epoch, losses, [lr for _, lr in steps])
                if on_epoch_end is not None:
                    on_epoch_end(history, is_best, val)
                if state_path is not None:
                    save_training_state(state_path, model, optimizer, scheduler, generator, history,
                                        loop.signature)
        barrier()
    return history


class defer_interrupts:
    """Hold a Ctrl-C until the block is done, then raise it."""

    def __enter__(self):
        self.received = False
        try:
            self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "received", True))
        except ValueError:  # not the main thread: nothing to defer
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.received:
            raise Interrupted("interrupted; every finished epoch is saved")
        return False


# ---------------------------------------------------------------------------
# Resumable state
# ---------------------------------------------------------------------------

class ResumeError(ValueError):
    """--resume cannot continue: no state, a corrupt one, or other settings."""


def save_training_state(path, model, optimizer, scheduler, generator, history, signature):
    numpy_state = np.random.get_state()
    state = {
        "epoch": len(history), "history": history, "signature": signature,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "data_generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
        # plain types only, so the file loads with weights_only=True
        "numpy_rng": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path, model, optimizer, scheduler, generator, signature, signature_defaults=None):
    """Restore what save_training_state wrote; returns the history so far."""
    if not os.path.isfile(path):
        raise ResumeError(f"--resume: {path} does not exist; nothing to resume (drop --resume to start anew)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"--resume: {path} is corrupt ({one_line(e)[:120]}); drop --resume to start anew") from None
    saved, now = state.get("signature") or {}, signature or {}
    for key, value in (signature_defaults or {}).items():  # a run saved before a setting existed ran as its default
        if key in now:
            saved.setdefault(key, value)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed[:4])
        raise ResumeError(f"--resume: the saved run used other settings ({details}); "
                          "resume with the same settings or start a new --out-dir")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["data_generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    return state["history"]
