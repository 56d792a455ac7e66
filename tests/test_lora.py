"""LoRA in model.py (LoRALinear, add_lora, GPTClassifier) and train_utils.py
(trainable parameters, training, PEFT-format adapters), checked against the
formula, against the frozen base and against PEFT on transformers' GPT-2."""

import pytest
import torch

from conftest import EOT, TINY
from checkpoints import load_gpt, save_lora_adapter
from model import (GPT, LORA_TARGETS, PRESETS, GPTClassifier, GPTConfig, Linear, LoRAConfig, LoRALinear, add_lora,
                   lora_layers, set_trainable)
from train_utils import Loop, TrainConfig, fit
from utils import Split, TokenizedSplit, encode

# transformers 5 warns about its own deprecated name when PEFT wraps a model
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SENTENCES = ["The cat sat on the mat.", "Colorless green ideas sleep furiously tonight in the garden.",
             "Who?", "John seems to be very happy today, and so does Mary."]


def fresh_classifier(path, targets=LORA_TARGETS, rank=4, alpha=8.0, train_layernorm=False):
    gpt = add_lora(load_gpt(path), targets, rank, alpha)
    classifier = GPTClassifier(gpt)
    set_trainable(classifier, train_layernorm)
    return classifier.eval()


def padded(sentences=SENTENCES):
    """Right-padded token ids, lengths and the attention mask transformers wants."""
    tokens = [encode(s) for s in sentences]
    lengths = torch.tensor([len(t) for t in tokens])
    idx = torch.full((len(tokens), int(lengths.max())), EOT, dtype=torch.long)
    for i, t in enumerate(tokens):
        idx[i, :len(t)] = torch.tensor(t)
    mask = (torch.arange(idx.size(1))[None, :] < lengths[:, None]).long()
    assert len(set(lengths.tolist())) == len(sentences)  # every row padded differently
    return idx, lengths, mask


def randomize(classifier, layernorms=False, std=0.2):
    """Non-trivial adapter values (B is zero at init) and, if asked, LayerNorms."""
    with torch.no_grad():
        for layer in lora_layers(classifier):
            layer.lora_A.normal_(std=std)
            layer.lora_B.normal_(std=std)
        classifier.score.weight.normal_(std=0.5)
        if layernorms:
            for name, p in classifier.named_parameters():
                if any(f".{ln}." in name for ln in ("ln_1", "ln_2", "ln_f")):
                    p.add_(torch.randn_like(p) * 0.2)


# ---------------------------------------------------------------------------
# LoRALinear and add_lora
# ---------------------------------------------------------------------------

def test_lora_linear_formula():
    """y = x W + b + (alpha / r) * x A^T B^T, with A (r, in) and B (out, r) as PEFT stores them."""
    base = Linear(6, 10)
    torch.nn.init.normal_(base.bias)
    layer = LoRALinear(base, rank=3, alpha=4.5)
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (10, 3)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) == 18
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 6)
    expected = x @ base.weight + base.bias + 1.5 * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 1.5 * layer.lora_A.t() @ layer.lora_B.t())
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("rank,alpha", [(0, 8.0), (-1, 8.0), (4, 0.0), (4, -2.0)])
def test_lora_linear_rejects_bad_rank_or_alpha(rank, alpha):
    import re
    message = f"LoRA rank must be >= 1, got {rank}" if rank < 1 else f"LoRA alpha must be > 0, got {alpha}"
    with pytest.raises(ValueError, match=re.escape(message)):
        LoRALinear(Linear(4, 4), rank=rank, alpha=alpha)


def test_add_lora_rejects_unknown_targets(tiny_ckpt):
    gpt = load_gpt(tiny_ckpt.path)
    for targets in (["c_attn", "foo"], [], ["c_proj"]):
        with pytest.raises(ValueError, match="unknown LoRA target"):
            add_lora(gpt, targets)


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("c_attn",), ("attn.c_proj", "mlp.c_proj")])
def test_add_lora_wraps_exactly_the_targets(tiny_ckpt, targets):
    gpt = add_lora(load_gpt(tiny_ckpt.path), targets)
    wrapped = sorted(name for name, m in gpt.named_modules() if isinstance(m, LoRALinear))
    paths = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
    assert wrapped == sorted(f"transformer.h.{i}.{paths[t]}" for i in range(TINY["n_layer"]) for t in targets)
    assert [name for name, p in gpt.named_parameters() if p.requires_grad] == \
        [name for name, _ in gpt.named_parameters() if ".lora_" in name]


def test_lora_at_init_equals_the_base_model(tiny_ckpt):
    idx, lengths, _ = padded()
    gpt = load_gpt(tiny_ckpt.path)
    classifier = GPTClassifier(gpt).eval()
    with torch.no_grad():
        logits_before = gpt(idx)
        hidden_before = gpt.hidden_states(idx)
        scores_before = classifier(idx, lengths)
    add_lora(gpt)  # in place: the classifier now runs through the adapters
    assert len(lora_layers(classifier)) == 4 * TINY["n_layer"]
    with torch.no_grad():
        assert torch.equal(gpt(idx), logits_before)
        assert torch.equal(gpt.hidden_states(idx), hidden_before)
        assert torch.equal(classifier(idx, lengths), scores_before)


def test_merge_equals_unmerged_and_unmerge_restores(tiny_ckpt):
    idx, lengths, _ = padded()
    classifier = fresh_classifier(tiny_ckpt.path)
    original = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    randomize(classifier)
    with torch.no_grad():
        base_only = GPTClassifier(load_gpt(tiny_ckpt.path))
        base_only.score.weight.copy_(classifier.score.weight)
        unmerged = classifier(idx, lengths)
        assert (unmerged - base_only(idx, lengths)).abs().max() > 1e-2  # the adapters do change the output
        for layer in lora_layers(classifier):
            layer.merge()
            layer.merge()  # a second merge must not add the update twice
            assert layer.merged
        merged = classifier(idx, lengths)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        for layer in lora_layers(classifier):
            assert (layer.base.weight - original_weight(original, classifier, layer)).abs().max() > 1e-3
            layer.unmerge()
            layer.unmerge()
            assert not layer.merged
            torch.testing.assert_close(layer.base.weight, original_weight(original, classifier, layer),
                                       atol=1e-6, rtol=0)
        # (W + dW) - dW is W only up to float rounding, hence the output's looser tolerance
        torch.testing.assert_close(classifier(idx, lengths), unmerged, atol=1e-5, rtol=1e-5)


def original_weight(original, classifier, layer):
    name = next(n for n, m in classifier.named_modules() if m is layer)
    return original[f"{name}.base.weight"]


# ---------------------------------------------------------------------------
# Trainable parameters and training
# ---------------------------------------------------------------------------

LAYERNORM_PARAMS = {f"gpt.transformer.h.{i}.{ln}.{p}" for i in range(TINY["n_layer"]) for ln in ("ln_1", "ln_2")
                    for p in ("weight", "bias")} | {"gpt.transformer.ln_f.weight", "gpt.transformer.ln_f.bias"}


@pytest.mark.parametrize("train_layernorm", [False, True])
def test_only_lora_and_head_require_grad(tiny_ckpt, train_layernorm):
    classifier = fresh_classifier(tiny_ckpt.path, train_layernorm=train_layernorm)
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    lora = {name for name, _ in classifier.named_parameters() if name.endswith((".lora_A", ".lora_B"))}
    assert len(lora) == 2 * 4 * TINY["n_layer"]
    expected = lora | {"score.weight"} | (LAYERNORM_PARAMS if train_layernorm else set())
    assert trainable == expected
    # tiny: r * (in + out) summed over the four targets, per layer, plus the head (and LNs)
    d, r = TINY["n_embd"], 4
    per_layer = r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    count = TINY["n_layer"] * per_layer + 2 * d + ((2 * TINY["n_layer"] + 1) * 2 * d if train_layernorm else 0)
    assert sum(p.numel() for p in classifier.parameters() if p.requires_grad) == count


def trainable_count(preset, train_layernorm):
    with torch.device("meta"):  # shapes only: no memory, no init
        classifier = GPTClassifier(add_lora(GPT(GPTConfig(**PRESETS[preset])), LORA_TARGETS, rank=4, alpha=8.0))
    set_trainable(classifier, train_layernorm)
    return sum(p.numel() for p in classifier.parameters() if p.requires_grad)


def test_trainable_count_of_real_gpt2_shapes():
    # gpt2, rank 4, all four targets, n_embd 768, 12 layers:
    #   per layer 4 * [(768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)] = 4 * 12288 = 49,152
    #   12 layers: 589,824; head 2 * 768 = 1,536                                   -> 591,360
    #   LayerNorms: 12 * 2 * (768 + 768) + (768 + 768) = 36,864 + 1,536 = 38,400  -> 629,760
    assert trainable_count("gpt2", train_layernorm=False) == 591_360
    assert trainable_count("gpt2", train_layernorm=True) == 629_760  # the original study's 0.63M
    # gpt2-medium, n_embd 1024, 24 layers:
    #   per layer 4 * [(1024 + 3072) + (1024 + 1024) + (1024 + 4096) + (4096 + 1024)] = 4 * 16384 = 65,536
    #   24 layers: 1,572,864; head 2 * 1024 = 2,048
    #   LayerNorms: 24 * 2 * 2048 + 2048 = 100,352            -> 1,572,864 + 2,048 + 100,352 = 1,675,264 (1.68M)
    assert trainable_count("gpt2-medium", train_layernorm=True) == 1_675_264


def tiny_task(n=24):
    """A few short sentences with labels: enough for a handful of optimiser steps."""
    sentences = [f"Sentence number {i} is {'fine' if i % 2 else 'bad bad'}." for i in range(n)]
    return TokenizedSplit(Split(sentences, [i % 2 for i in range(n)], "tiny task"))


@pytest.mark.parametrize("train_layernorm", [False, True])
def test_training_changes_only_trainable_parameters(tiny_ckpt, train_layernorm):
    classifier = fresh_classifier(tiny_ckpt.path, train_layernorm=train_layernorm)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    data = tiny_task()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_ratio=0.0, seed=0)
    history = fit(classifier, (data, data), cfg, torch.device("cpu"), loop=Loop(progress=False))
    assert [r["epoch"] for r in history] == [1, 2]
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert any(".lora_A" in n for n in trainable) and "score.weight" in trainable
    for name, p in classifier.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not learn"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert (LAYERNORM_PARAMS <= trainable) == train_layernorm


# ---------------------------------------------------------------------------
# Against PEFT on transformers' GPT2ForSequenceClassification
# ---------------------------------------------------------------------------

def hf_classifier(path):
    from transformers import GPT2ForSequenceClassification
    return GPT2ForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=EOT).eval()


def peft_param_name(ours):
    """Our parameter name -> the name of the same parameter inside a PeftModel
    (adapter "default"; modules_to_save keep their trained copy in modules_to_save)."""
    name = ours.removeprefix("gpt.")
    if name.endswith((".lora_A", ".lora_B")):
        return f"base_model.model.{name}.default.weight"
    module, _, leaf = name.rpartition(".")
    return f"base_model.model.{module}.modules_to_save.default.{leaf}"


CASES = {"all targets, r4 a8": (LORA_TARGETS, 4, 8.0, False),
         "two targets, r2 a5, LNs": (("c_attn", "mlp.c_proj"), 2, 5.0, True),
         "all targets, r4 a8, LNs": (LORA_TARGETS, 4, 8.0, True)}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_peft(tiny_ckpt, tmp_path, case):
    import peft
    from safetensors.torch import load_file
    targets, rank, alpha, train_layernorm = CASES[case]
    ours = fresh_classifier(tiny_ckpt.path, targets, rank, alpha, train_layernorm)
    randomize(ours, layernorms=train_layernorm)
    idx, lengths, mask = padded()
    with torch.no_grad():
        expected = ours(idx, lengths)
        # the case is sensitive: without the adapter update the logits are clearly different
        saved_b = [layer.lora_B.clone() for layer in lora_layers(ours)]
        for layer in lora_layers(ours):
            layer.lora_B.zero_()
        assert (ours(idx, lengths) - expected).abs().max() > 1e-2
        for layer, b in zip(lora_layers(ours), saved_b):
            layer.lora_B.copy_(b)

    modules_to_save = ["score"] + (["ln_1", "ln_2", "ln_f"] if train_layernorm else [])
    config = peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=list(targets), fan_in_fan_out=True, modules_to_save=modules_to_save)

    # 1. copy our values into a fresh PEFT model, parameter by parameter
    wrapped = peft.get_peft_model(hf_classifier(tiny_ckpt.path), config).eval()
    peft_params = dict(wrapped.named_parameters())
    ours_trainable = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    assert {peft_param_name(n) for n in ours_trainable} == {n for n, p in peft_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, p in ours_trainable.items():
            peft_params[peft_param_name(name)].copy_(p)
        logits = wrapped(input_ids=idx, attention_mask=mask).logits
    assert (logits - expected).abs().max() < 1e-4

    # 2. our export, in PEFT's own file format, loaded by PEFT
    save_lora_adapter(ours, str(tmp_path / "adapter"), tiny_ckpt.path,
                      LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, targets=tuple(targets),
                                 train_layernorm=train_layernorm))
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    reference = peft.get_peft_model_state_dict(wrapped)
    assert set(exported) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(exported[key], tensor), key
    loaded = peft.PeftModel.from_pretrained(hf_classifier(tiny_ckpt.path), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits = loaded(input_ids=idx, attention_mask=mask).logits
    assert (logits - expected).abs().max() < 1e-4

    # 3. and back: our loader rebuilds the same classifier from the adapter directory
    from checkpoints import load_lora_classifier
    rebuilt, base = load_lora_classifier(str(tmp_path / "adapter"))
    assert base == tiny_ckpt.path
    with torch.no_grad():
        assert torch.equal(rebuilt(idx, lengths), expected)


def test_merged_layer_refuses_training_and_loading(tiny_ckpt):
    """A merged layer skips the adapter path (no gradient for A and B), and loading new
    A/B into it would make unmerge() subtract an update the base never got."""
    from checkpoints import CheckpointError, load_into
    classifier = fresh_classifier(tiny_ckpt.path)
    randomize(classifier)
    layer = lora_layers(classifier)[0]
    x = torch.randn(3, layer.base.in_features)
    layer.merge()
    with torch.no_grad():
        layer.train()(x)  # inference with a merged layer is what merging is for
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(state)
    tensors = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
    with pytest.raises(CheckpointError, match="merged"):
        load_into(classifier, {n: n for n in tensors}, tensors, "adapter")
    layer.unmerge()
    layer.load_state_dict(state)  # unmerged, both work again
    layer.train()(x).sum().backward()
    assert layer.lora_A.grad is not None


# ---------------------------------------------------------------------------
# bf16 training: frozen base stored in bf16, trained parameters in float32
# ---------------------------------------------------------------------------

def test_frozen_base_stored_in_bf16_equals_autocast_casting_it(tiny_ckpt):
    """Storing the frozen weights in bf16 once gives exactly what autocast computes
    when it casts the float32 weights at every product, and leaves what is trained
    (and so the optimizer's state) in float32."""
    from model import store_frozen_in_bf16
    cast_each_time = fresh_classifier(tiny_ckpt.path)
    randomize(cast_each_time)
    stored = fresh_classifier(tiny_ckpt.path)
    stored.load_state_dict(cast_each_time.state_dict())
    store_frozen_in_bf16(stored)
    for name, p in stored.named_parameters():
        frozen_linear = not p.requires_grad and p.dim() == 2 and "wte" not in name and "wpe" not in name
        assert p.dtype == (torch.bfloat16 if frozen_linear else torch.float32), name
    idx, lengths, _ = padded()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(stored(idx, lengths), cast_each_time(idx, lengths))


def test_bf16_training_stays_close_to_float32(tiny_ckpt):
    """Two epochs with --dtype bfloat16 (stored base, autocast) track float32's:
    same trained parameters in float32, losses within bf16's rounding."""
    from model import store_frozen_in_bf16
    data, histories, trained = tiny_task(), {}, {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        classifier = fresh_classifier(tiny_ckpt.path)
        if dtype == "bfloat16":
            store_frozen_in_bf16(classifier)
        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_ratio=0.0, seed=0, dtype=dtype)
        histories[dtype] = fit(classifier, (data, data), cfg, torch.device("cpu"), loop=Loop(progress=False))
        trained[dtype] = {n: p.detach() for n, p in classifier.named_parameters() if p.requires_grad}
    for a, b in zip(histories["float32"], histories["bfloat16"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.03 and abs(a["val_loss"] - b["val_loss"]) < 0.03
    for name, p in trained["bfloat16"].items():
        assert p.dtype == torch.float32
        assert (p - trained["float32"][name]).norm() <= 0.1 * trained["float32"][name].norm(), name


def test_precision_policy(monkeypatch):
    """auto: TF32 products on CUDA for batched work and bf16 for gen's decoding; on a
    CPU bf16 with AMX for batched work only (never gen's decoding), float32 without;
    float32/tf32/bfloat16 force one, and tf32 is float32 off CUDA."""
    import train_utils
    resolve = train_utils.resolve_precision
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx in (False, True):
        monkeypatch.setattr(train_utils, "has_amx", lambda: amx)
        assert resolve(cpu) == ("bfloat16" if amx else "float32")
        assert resolve(cpu, matrix_bound=False) == "float32"
        assert resolve(cuda) == "tf32" and resolve(cuda, matrix_bound=False) == "bfloat16"
        for device in (cpu, cuda):
            for forced in ("float32", "bfloat16"):
                assert resolve(device, forced) == resolve(device, forced, matrix_bound=False) == forced
        assert resolve(cuda, "tf32") == "tf32" and resolve(cpu, "tf32") == "float32"
    assert train_utils.precision_of(cpu, "bfloat16") == "bf16-autocast"
    assert train_utils.precision_of(cuda, "auto") == "tf32"


def test_tf32_switch_is_set_for_the_pass_and_restored():
    """tf32 is a global cuBLAS switch, not a cast: on inside the pass, as it was after."""
    import train_utils
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with train_utils.tf32_products("tf32"):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with train_utils.tf32_products("float32"):
        assert matmul.fp32_precision == before
