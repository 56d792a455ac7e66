"""The reference LoRA is measured against: full fine-tuning of a Hugging Face encoder
with transformers.Trainer, as its users run it (`python bench.py finetune-reference
--base DIR --seed S --out-dir D`): AdamW at 5e-5, batch 32, linear decay after a
10% warm-up, 4 epochs, every epoch evaluated on CoLA's validation split and the best
one kept (the model in D/model). It writes the project's metrics.json (args with the
seed, per-epoch val_mcc and val_acc, best_epoch), so `run.py compare` pairs it with
LoRA runs seed by seed."""
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import hf_lora
from train_utils import accuracy, best_epoch, matthews_corrcoef
from utils import DataConfig, UserError, atomic_dir, info, load_cola, save_json


@dataclass(frozen=True)
class ReferenceConfig:
    epochs: int = 4
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0   # Trainer's default
    seed: int = 0


def features(tokenizer, split, max_len):
    """A split as Trainer's collator takes it: one dict of token ids and label per sentence."""
    encoded = tokenizer(list(split.sentences), truncation=True, max_length=max_len)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], split.labels)]


def class_metrics(prediction):
    logits, labels = (torch.as_tensor(a) for a in (prediction.predictions, prediction.label_ids))
    predictions = logits.argmax(-1)
    return {"acc": accuracy(predictions, labels), "mcc": matthews_corrcoef(predictions, labels)}


def save_model(model, tokenizer, final):
    """model + tokenizer save_pretrained'd beside final and renamed in."""
    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    atomic_dir(final, write)


def finetune_reference(base, out_dir, cfg: ReferenceConfig, data: DataConfig = DataConfig(), device="cpu",
                       progress=False):
    """Fine-tune every weight of base on CoLA; returns the metrics record written to out_dir/metrics.json."""
    from transformers import (DataCollatorWithPadding, PrinterCallback, Trainer, TrainerCallback, TrainingArguments,
                              set_seed)
    from transformers import __version__ as transformers_version
    found = hf_lora.classifier_base(base)
    if found.model_type == "gpt2":
        raise UserError(f"--base {base} is GPT-2; the reference fine-tunes an encoder (BERT, RoBERTa, ...)")
    if os.path.isfile(os.path.join(out_dir, "metrics.json")):
        raise UserError(f"--out-dir {out_dir} already holds a run (metrics.json); choose another --out-dir")
    os.makedirs(out_dir, exist_ok=True)
    train, val = load_cola(data.data_dir, data.val_split)
    set_seed(cfg.seed)  # the fresh head's initial weights, then Trainer's own seeding
    tokenizer = hf_lora.load_tokenizer(found.directory)
    model = hf_lora.load_model(found.directory)
    max_len = hf_lora.max_len_of(tokenizer, model.config)
    record = {"mode": "finetune-reference",
              "args": {"base": found.source, **asdict(cfg), "data_dir": data.data_dir, "val_split": data.val_split,
                       "out_dir": out_dir},
              "params": {"total": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters())},
              "environment": {"seed": cfg.seed, "device": device, "python": platform.python_version(),
                              "torch": torch.__version__, "transformers": transformers_version},
              "epochs": [], "best_epoch": None}
    metrics_path = os.path.join(out_dir, "metrics.json")

    class KeepBest(TrainerCallback):
        """After each epoch's evaluation: its record, the model when it is the best so far, metrics.json."""
        started = time.perf_counter()

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            losses = [log["loss"] for log in state.log_history if "loss" in log]
            history = record["epochs"]
            history.append({"epoch": len(history) + 1, "train_loss": losses[-1] if losses else None,
                            "val_loss": metrics["eval_loss"], "val_acc": metrics["eval_acc"],
                            "val_mcc": metrics["eval_mcc"], "seconds": time.perf_counter() - self.started})
            record["best_epoch"] = best_epoch(history)["epoch"]
            if record["best_epoch"] == len(history):
                save_model(kwargs["model"], tokenizer, os.path.join(out_dir, "model"))
            save_json(metrics_path, record)
            info(f"epoch {len(history)}/{cfg.epochs}: val acc {metrics['eval_acc']:.4f} "
                 f"mcc {metrics['eval_mcc']:.4f} | {history[-1]['seconds']:.1f}s")

    with tempfile.TemporaryDirectory(prefix="trainer.") as scratch:
        args = TrainingArguments(scratch, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
                                 per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=128,
                                 warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed,
                                 eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
                                 report_to=[], disable_tqdm=not progress, use_cpu=device == "cpu")
        trainer = Trainer(model, args, train_dataset=features(tokenizer, train, max_len),
                          eval_dataset=features(tokenizer, val, max_len),
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=class_metrics,
                          callbacks=[KeepBest()])
        trainer.remove_callback(PrinterCallback)  # KeepBest says what an epoch did, in one line
        started = time.perf_counter()
        trainer.train()
    record["seconds"] = time.perf_counter() - started
    save_json(metrics_path, record)
    best = record["epochs"][record["best_epoch"] - 1]
    info(f"best epoch {best['epoch']}: val acc {best['val_acc']:.4f}, val MCC {best['val_mcc']:.4f}; "
         f"wrote {metrics_path} and {os.path.join(out_dir, 'model')}")
    return record
