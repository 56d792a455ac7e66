"""Trained classifiers on disk: LoRA adapters in PEFT's format (peft loads them
onto transformers' GPT2ForSequenceClassification), students as safetensors with a
JSON of their settings and the tokenizer they read, and one loader for a run
directory of any mode."""
import json
import os
from dataclasses import asdict

import torch
from safetensors.torch import load_file

from hub import gpt2_directory, looks_like_hub_id
from model import (LAYERNORMS, GPT, DistilRNN, GPTClassifier, GPTConfig, LoRAConfig, RNNConfig, WeightsError, add_lora,
                   lora_layers, merge_lora, set_trainable)
from utils import GPT2_TOKENS, atomic_dir, one_line, save_json, save_tensors

PEFT_PREFIX = "base_model.model."   # PEFT's name for the wrapped transformers model
# files a Hugging Face tokenizer directory may carry its vocabulary in
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the model it is loaded into."""


def trainable_state(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def peft_name(name):
    """Our GPTClassifier parameter name -> the key PEFT saves for the same tensor
    when it wraps transformers.GPT2ForSequenceClassification."""
    name = name.removeprefix("gpt.")
    if name.endswith((".lora_A", ".lora_B")):
        name += ".weight"
    return PEFT_PREFIX + name


def save_lora_adapter(classifier, adapter_dir, base, lora: LoRAConfig):
    """Write adapter_config.json + adapter_model.safetensors as PEFT does, so that
    peft.PeftModel.from_pretrained(GPT2ForSequenceClassification(base), adapter_dir)
    reproduces our classifier."""
    tensors = {peft_name(name): p for name, p in trainable_state(classifier).items()}
    modules_to_save = ["score"] + (list(LAYERNORMS) if lora.train_layernorm else [])
    # GPT-2's checkpoints store these layers as Conv1D, (in, out)
    write_peft_adapter(adapter_dir, tensors, base, lora, modules_to_save, fan_in_fan_out=True)


def write_peft_adapter(adapter_dir, tensors, base, lora: LoRAConfig, modules_to_save, fan_in_fan_out):
    """adapter_model.safetensors (tensors, keyed as PEFT saves them) and adapter_config.json."""
    save_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    save_json(os.path.join(adapter_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets), "modules_to_save": list(modules_to_save),
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    })


def find_adapter_dir(checkpoint):
    for candidate in (os.path.join(checkpoint, "adapter"), checkpoint):
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            return candidate
    return None


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is this {what}?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-run training to write it again") from None


def read_tensors(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; re-run training to write it")
    try:
        return load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt ({one_line(e)[:120]}); "
                              "re-run training to write it again") from None


# ---------------------------------------------------------------------------
# Pretrained GPT-2 in Hugging Face's format
# ---------------------------------------------------------------------------

def gpt2_files(directory):
    """(config.json path, weights path) of a local Hugging Face GPT-2 directory
    (hub.gpt2_directory has checked that it exists)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{directory} has no config.json; expected a Hugging Face GPT-2 directory "
                           "(config.json + model.safetensors or pytorch_model.bin)")
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        weights_path = os.path.join(directory, weights_name)
        if os.path.isfile(weights_path):
            return config_path, weights_path
    raise WeightsError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def load_gpt(name_or_path, dropout=0.0):
    """GPT-2 from a local Hugging Face directory (config.json and model.safetensors
    or pytorch_model.bin) or a hub id, which hub.gpt2_directory finds in the
    cache or downloads."""
    config_path, weights_path = gpt2_files(gpt2_directory(name_or_path))
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {config_path}: {e}") from None
    try:
        config = GPTConfig(block_size=int(hf["n_positions"]), vocab_size=int(hf["vocab_size"]),
                           n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(hf["n_embd"]),
                           layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), dropout=dropout)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{config_path} is not a GPT-2 config (missing or bad {e})") from None
    if config.n_embd % config.n_head:
        raise WeightsError(f"{config_path}: n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    try:
        # never unpickle arbitrary objects from a file someone handed us
        state = load_file(weights_path) if weights_path.endswith(".safetensors") else \
            torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights {weights_path}: {one_line(e)[:200]}") from None
    return GPT.from_hf_state(config, state, weights_path)


# ---------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------

def load_lora_classifier(adapter_dir, weights=None):
    """Rebuild a LoRA classifier from a PEFT adapter dir; the base comes from
    weights (a local directory) or else from the adapter's base_model_name_or_path."""
    config = read_json(os.path.join(adapter_dir, "adapter_config.json"), "a LoRA adapter directory")
    if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{adapter_dir}: only plain LoRA adapters (one rank, one alpha) are supported")
    base = weights or config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json names no base model; pass --weights DIR")
    if not weights and not os.path.isdir(base) and not looks_like_hub_id(base):
        raise CheckpointError(f"{adapter_dir}: its base GPT-2 {base} (adapter_config.json's base_model_name_or_path) "
                              "does not exist, moved or removed; pass --weights DIR, the base it was trained on")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    gpt = load_gpt(base)
    try:
        add_lora(gpt, targets, rank=int(config["r"]), alpha=float(config["lora_alpha"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json: {e}") from None
    classifier = set_trainable(GPTClassifier(gpt), train_layernorm="ln_1" in (config.get("modules_to_save") or []))
    tensors = read_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    load_into(classifier, {peft_name(n): n for n in trainable_state(classifier)}, tensors, adapter_dir, base)
    return classifier.eval(), base


def load_into(model, key_to_param, tensors, source, base=None):
    """Copy tensors (keyed as saved) into model's parameters, with clear errors."""
    if any(layer.merged for layer in lora_layers(model)):
        raise CheckpointError(f"cannot load {source} into merged LoRA layers; unmerge them first")
    params = dict(model.named_parameters())
    missing = [k for k in key_to_param if k not in tensors]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the model needs (first: {missing[0]})")
    with torch.no_grad():
        for key, name in key_to_param.items():
            if tensors[key].shape != params[name].shape:
                hint = f"; it was trained on another base than {base}: pass the --weights it was trained with" \
                    if base else ""
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                      f"{tuple(params[name].shape)}{hint}")
            params[name].copy_(tensors[key])


# ---------------------------------------------------------------------------
# Students: their weights, settings and tokenizer
# ---------------------------------------------------------------------------

TOKENIZER_DIR = "tokenizer"  # a student's Hugging Face tokenizer, under its out dir


class HFTokens:
    """A Hugging Face tokenizer (a teacher's) as a student reads it, like GPT2Tokens:
    a sentence's own tokens, with no special tokens around it. [CLS] ... [SEP] serve
    a transformer's attention; for the RNN they would be the same first and last
    token of every sentence, and without them the GPT-2 and the teacher's
    vocabularies are compared on the words alone. A masked word of augmentation is
    the tokenizer's mask token, else its unknown one: what the teacher reads too.
    student.json names it "tokenizer/", the files saved there by save()."""
    name = TOKENIZER_DIR + "/"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, 0)
        self.pad_id = next(i for i in ids if i is not None)  # never read: any id of the vocabulary does
        self.unk_id = next(i for i in (tokenizer.unk_token_id, self.pad_id) if i is not None)
        self.mask_token = tokenizer.mask_token or tokenizer.unk_token or ""

    def encode(self, texts):
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        # a text of nothing the tokenizer keeps reads as the unknown token: an RNN cannot read nothing
        return [row or [self.unk_id] for row in ids]

    def save(self, out_dir):
        """tokenizer.save_pretrained(OUT/tokenizer), written beside, synced and renamed
        in (a SaveError when it cannot be written)."""
        atomic_dir(os.path.join(out_dir, TOKENIZER_DIR), self.tokenizer.save_pretrained)


def save_student(student, out_dir, tokenizer=GPT2_TOKENS, extra=None):
    """OUT/student.safetensors (both embedding channels with --embd-channels both),
    the tokenizer's files if it has any, and OUT/student.json: the config and the
    tokenizer's name, written last."""
    save_tensors(os.path.join(out_dir, "student.safetensors"), student.state_dict())
    tokenizer.save(out_dir)
    save_json(os.path.join(out_dir, "student.json"), {"kind": "DistilRNN", "config": asdict(student.config),
                                                      "tokenizer": tokenizer.name, **(extra or {})})


def load_student(out_dir):
    """(student, its tokenizer) of an rnn/distil run directory."""
    settings = read_json(os.path.join(out_dir, "student.json"), "an rnn/distil run directory")
    try:
        student = DistilRNN(RNNConfig.from_dict(settings["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{out_dir}/student.json is corrupt ({e})") from None
    tensors = read_tensors(os.path.join(out_dir, "student.safetensors"))
    load_into(student, {n: n for n in student.state_dict()}, tensors, os.path.join(out_dir, "student.safetensors"))
    return student.eval(), student_tokenizer(out_dir, settings.get("tokenizer", "gpt2"), student.config.vocab_size)


def student_tokenizer(out_dir, name, vocab_size):
    """The tokenizer student.json names ("gpt2" when it predates the field), which
    must have exactly the student's vocab_size tokens."""
    if name == GPT2_TOKENS.name:
        tokenizer = GPT2_TOKENS
    else:
        path = os.path.join(out_dir, name.rstrip("/"))
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is missing: the student reads the tokenizer saved there "
                                  f"(student.json: \"tokenizer\": \"{name}\"); re-run training to write it")
        from transformers import AutoTokenizer
        try:
            tokenizer = HFTokens(AutoTokenizer.from_pretrained(path))
        except Exception as e:
            raise CheckpointError(f"the student's tokenizer {path} does not load ({one_line(e)[:200]})") from None
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(f"{out_dir}: the student's tokenizer ({name}) has {tokenizer.vocab_size} tokens but "
                              f"its embedding {vocab_size} rows; the tokenizer is not the one it was trained with")
    return tokenizer


def load_classifier(checkpoint, weights=None, merge=False):
    """A trained classifier from a run directory of any mode (or an adapter dir),
    with the tokenizer it reads: the student's own (checked against its
    vocabulary), GPT-2's for LoRA. merge=True folds LoRA adapters into the base
    weights: inference at the cost of the plain model. Returns (model, tokenizer,
    description)."""
    if os.path.isfile(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint} is a file; pass the run's directory (its --out-dir)")
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    adapter_dir = find_adapter_dir(checkpoint)
    if adapter_dir is not None:
        import hf_lora  # LoRA on a Hugging Face encoder; it builds on this file's readers
        if hf_lora.is_hf_adapter(adapter_dir, weights):
            model, tokenizer, base = hf_lora.load_adapter_classifier(adapter_dir, weights)
            if merge:
                merge_lora(model)
            return model, tokenizer, f"{base.model_type} + LoRA ({base.source}{', merged' if merge else ''})"
        model, base = load_lora_classifier(adapter_dir, weights)
        if merge:
            merge_lora(model)
        return model, GPT2_TOKENS, f"GPT-2 + LoRA ({base}{', merged' if merge else ''})"
    if os.path.isfile(os.path.join(checkpoint, "student.json")):
        return *load_student(checkpoint), "DistilRNN"
    raise CheckpointError(f"{checkpoint} holds no checkpoint (neither adapter/adapter_config.json from LoRA "
                          "nor student.json from rnn/distil)")
