"""LoRA on a Hugging Face encoder (hf_lora.py, `run.py LoRA --base`), checked against
PEFT on the same transformers model: the logits before and after a training step,
the exported adapter against predict, distil with such a run as the teacher, resume,
the default targets of each model type, the bad inputs; and the Trainer reference
(`bench.py finetune-reference`) that compare pairs with it."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cola import PROJECT_ROOT, STUDENT, assert_error, cli, common, once, run_ok, subset_dir
import hf_lora
from model import LORA_TARGETS, LoRAConfig, LoRALinear, lora_layers

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SENTENCES = ["the cat sat on the mat .", "who ?", "john seems to be very happy today , and so does mary .",
             "colorless green ideas sleep furiously ."]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny random BertModel (2 layers, 32 wide, no dropout), not fine-tuned (no
    head: LoRA adds a fresh one), saved with a word-level BertTokenizer whose
    vocab.txt holds the words of the CoLA subset."""
    from transformers import BertConfig, BertModel, BertTokenizer
    from utils import load_cola
    train, val = load_cola(subset_dir(tmp_path_factory), "in")
    sentences = train.sentences + val.sentences + SENTENCES
    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    path = str(tmp_path_factory.mktemp("tiny_encoder"))
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(3)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3)
    BertModel(config).save_pretrained(path)
    return path


def lora_run(tmp_path_factory, encoder, *flags, name="LoRA"):
    """`run.py LoRA --base encoder` for 2 epochs on the CoLA subset (shared: read-only)."""
    def make():
        tmp = tmp_path_factory.mktemp("hf_lora_run")
        out = os.path.join(str(tmp), name)
        run_ok("LoRA", "--base", encoder, "--data-dir", subset_dir(tmp_path_factory), "--epochs", 2, "--lr", "5e-3",
               "--out-dir", out, *flags, *common(tmp))
        return out
    return once(("hf_lora_run", encoder, name, flags), make)


def peft_model(encoder, targets, rank, alpha, train_layernorm=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    modules = ["pooler", "classifier"] + (["LayerNorm"] if train_layernorm else [])
    return get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=list(targets), modules_to_save=modules))


def encoded(encoder, sentences=SENTENCES):
    """(ids, lengths) as our classifier takes them, and the same as transformers' (ids, mask)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(sentences)  # every row padded differently
    return batch["input_ids"], lengths, batch["attention_mask"]


# ---------------------------------------------------------------------------
# Our LoRA against PEFT's
# ---------------------------------------------------------------------------

def test_lora_linear_merges_an_nn_linear_in_its_out_in_layout():
    base = torch.nn.Linear(6, 10)
    layer = LoRALinear(base, rank=3, alpha=6.0).eval()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t())
    unmerged, weight = layer(x), base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets,train_layernorm", [(("query", "value", "intermediate.dense"), False),
                                                     (hf_lora.DEFAULT_TARGETS["bert"], True)])
def test_logits_equal_peft_before_and_after_one_optimizer_step(encoder, targets, train_layernorm):
    from peft import set_peft_model_state_dict
    base = hf_lora.check_base(encoder, targets)
    ours, _ = hf_lora.lora_classifier(base, LoRAConfig(rank=4, alpha=16.0, train_layernorm=train_layernorm))
    with torch.no_grad():  # adapters away from their zero start, so that they count
        for layer in lora_layers(ours):
            layer.lora_B.normal_(std=0.3)
    theirs = peft_model(encoder, targets, 4, 16.0, train_layernorm)
    tensors = {hf_lora.peft_key(n): p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    result = set_peft_model_state_dict(theirs, tensors)
    assert not [k for k in result.unexpected_keys if "lora" in k or "modules_to_save" in k]
    ours_trained = [p for p in ours.parameters() if p.requires_grad]
    theirs_trained = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_trained) == sum(p.numel() for p in theirs_trained)
    assert len(lora_layers(ours)) == len([m for m in theirs.modules() if hasattr(m, "lora_A")]) > 0

    idx, lengths, mask = encoded(encoder)
    labels = torch.tensor([1, 0, 1, 0])
    ours.eval(), theirs.eval()
    before = ours(idx, lengths).detach()
    torch.testing.assert_close(before, theirs(input_ids=idx, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    for model, params, logits in ((ours, ours_trained, lambda: ours(idx, lengths)),
                                  (theirs, theirs_trained, lambda: theirs(input_ids=idx, attention_mask=mask).logits)):
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        torch.nn.functional.cross_entropy(logits(), labels).backward()
        optimizer.step()
        model.eval()
    after = ours(idx, lengths)
    torch.testing.assert_close(after, theirs(input_ids=idx, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)
    assert (after - before).abs().max() > 1e-3  # the step moved the logits: the comparison above can fail


def test_exported_adapter_reproduces_predict_in_peft(tmp_path_factory, encoder):
    import modes
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    run = lora_run(tmp_path_factory, encoder)
    with open(os.path.join(run, "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    assert config["base_model_name_or_path"] == os.path.abspath(encoder) and config["fan_in_fan_out"] is False
    assert config["target_modules"] == list(hf_lora.DEFAULT_TARGETS["bert"])
    ours = torch.tensor(modes.predict(run, SENTENCES, device_name="cpu"))
    base = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    theirs = PeftModel.from_pretrained(base, os.path.join(run, "adapter")).eval()
    idx, _, mask = encoded(encoder)
    with torch.no_grad():
        expected = theirs(input_ids=idx, attention_mask=mask).logits.softmax(-1)[:, 1]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-3  # the sentences get different answers: the comparison can tell models apart


def test_weights_move_an_adapters_encoder_base_but_gpt2_weights_leave_it(tmp_path_factory, encoder, tiny_ckpt):
    """predict's --weights names where the base is now; distil's --weights (GPT-2, for
    --init-embeddings gpt2) must not replace a teacher's encoder."""
    adapter = os.path.join(lora_run(tmp_path_factory, encoder), "adapter")
    moved = str(tmp_path_factory.mktemp("moved") / "base")
    shutil.copytree(encoder, moved)
    assert hf_lora.adapter_base(adapter)[0] == os.path.abspath(encoder)
    assert hf_lora.adapter_base(adapter, moved)[0] == moved
    assert hf_lora.adapter_base(adapter, tiny_ckpt.path)[0] == os.path.abspath(encoder)
    assert hf_lora.is_hf_adapter(adapter, tiny_ckpt.path) and hf_lora.is_hf_adapter(adapter)


def test_eval_of_a_run_gives_its_best_epoch(tmp_path_factory, encoder, capsys):
    run = lora_run(tmp_path_factory, encoder)
    tmp = tmp_path_factory.mktemp("hf_eval")
    code, out, err = cli(capsys, "eval", "--checkpoint", run, "--data-dir", subset_dir(tmp_path_factory),
                         "--output", tmp / "eval.json", "--device", "cpu")
    assert code == 0, err
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    with open(tmp / "eval.json") as f:
        result = json.load(f)
    assert result["acc"] == pytest.approx(best["val_acc"]) and result["mcc"] == pytest.approx(best["val_mcc"])
    assert "bert + LoRA" in out
    assert metrics["lora"]["model_type"] == "bert" and metrics["args"]["base"] == encoder
    assert metrics["lora"]["targets"] == list(hf_lora.DEFAULT_TARGETS["bert"])


def test_resume_is_exact(tmp_path_factory, encoder):
    whole = lora_run(tmp_path_factory, encoder)
    tmp = tmp_path_factory.mktemp("hf_resume")
    out = str(tmp / "LoRA")
    flags = ["--base", encoder, "--data-dir", subset_dir(tmp_path_factory), "--epochs", 2, "--lr", "5e-3",
             "--out-dir", out, *common(tmp)]
    run_ok("LoRA", *flags, "--stop-after", 1)
    assert os.path.isfile(os.path.join(out, "resume_state.pt"))
    run_ok("LoRA", "--resume", *flags)
    resumed, uninterrupted = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (out, whole))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    histories = []
    for d in (out, whole):
        with open(os.path.join(d, "metrics.json")) as f:
            histories.append([{k: v for k, v in e.items() if k != "seconds"} for e in json.load(f)["epochs"]])
    assert histories[0] == histories[1]


# ---------------------------------------------------------------------------
# A LoRA run on an encoder as distil's teacher
# ---------------------------------------------------------------------------

def test_distil_from_a_lora_run_on_an_encoder(tmp_path_factory, encoder, capsys):
    from transformers import AutoModel, AutoTokenizer
    from distil import load_teacher
    from model import RNNConfig
    from modes import student_start
    teacher = lora_run(tmp_path_factory, encoder)
    tmp = tmp_path_factory.mktemp("hf_distil")
    out = str(tmp / "distil")
    run_ok("distil", "--teacher", teacher, "--data-dir", subset_dir(tmp_path_factory), "--augment", 1,
           "--out-dir", out, *STUDENT, *common(tmp))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(teacher, "metrics.json")) as f:
        lora = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    assert metrics["student"] == {"init_embeddings": "teacher", "n_embd": 16, "vocab_size": len(tokenizer)}
    # the teacher is the LoRA run's classifier: its accuracy on the validation split is the run's best epoch's
    assert metrics["teacher"]["val_acc"] == pytest.approx(lora["epochs"][lora["best_epoch"] - 1]["val_acc"])
    assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
    code, printed, err = cli(capsys, "predict", "--checkpoint", out, "--device", "cpu", *SENTENCES[:2])
    assert code == 0 and len(printed.splitlines()) == 2, err
    # --init-embeddings teacher: the base's input embeddings, row for row of its tokenizer
    student_tokenizer, embeddings = student_start(RNNConfig(n_embd=16), "teacher", None, load_teacher(teacher))
    assert student_tokenizer.vocab_size == len(tokenizer)
    torch.testing.assert_close(embeddings, AutoModel.from_pretrained(encoder).get_input_embeddings().weight)


# ---------------------------------------------------------------------------
# The default targets of each model type, and GPT-2 keeping its own path
# ---------------------------------------------------------------------------

def tiny_configs():
    from transformers import BertConfig, DistilBertConfig, RobertaConfig
    small = dict(vocab_size=60, num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32)
    return {"bert": BertConfig(**small), "roberta": RobertaConfig(**small),
            "distilbert": DistilBertConfig(vocab_size=60, n_layers=2, n_heads=2, dim=16, hidden_dim=32)}


@pytest.mark.parametrize("model_type", sorted(tiny_configs()))
def test_default_targets_adapt_every_attention_and_mlp_layer(model_type):
    from transformers import AutoModelForSequenceClassification
    assert sorted(hf_lora.DEFAULT_TARGETS) == sorted(tiny_configs())
    model = AutoModelForSequenceClassification.from_config(tiny_configs()[model_type])
    targets = hf_lora.DEFAULT_TARGETS[model_type]
    hf_lora.check_targets(model, targets, model_type)  # each names a real layer, none in the head
    linears = set(hf_lora.encoder_linears(model))
    assert len(linears) == 2 * 6  # 4 attention and 2 MLP layers per block
    hf_lora.add_hf_lora(model, targets)
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == linears
    assert hf_lora.head_modules(model) and all(not a.startswith(tuple(hf_lora.head_modules(model))) for a in adapted)


def test_a_gpt2_base_goes_through_our_gpt(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("gpt2_base")
    out = str(tmp / "LoRA")
    run_ok("LoRA", "--base", tiny_ckpt.path, "--data-dir", subset_dir(tmp_path_factory), "--epochs", 1,
           "--batch-size", 300, "--out-dir", out, *common(tmp))
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    assert config["fan_in_fan_out"] is True and config["target_modules"] == list(LORA_TARGETS)
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["lora"]["base"] == os.path.abspath(tiny_ckpt.path)


# ---------------------------------------------------------------------------
# Bad input: one line, before any training
# ---------------------------------------------------------------------------

def lora_error(capsys, tmp, *flags):
    out = os.path.join(str(tmp), "LoRA")
    code, printed, err = cli(capsys, "LoRA", "--out-dir", out, *flags, *common(tmp))
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    return code, printed, err


def copy_without(encoder, tmp, *left_out):
    path = str(tmp / "base")
    shutil.copytree(encoder, path, ignore=lambda d, names: [n for n in names if n in left_out])
    return path


def test_a_base_without_a_classification_head_class(capsys, tmp_path):
    from transformers import ViTConfig
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    assert_error(*lora_error(capsys, tmp_path, "--base", tmp_path / "vit"), "is a vit, which has no "
                 "sequence-classification head", "AutoModelForSequenceClassification")


def test_a_target_the_architecture_lacks_names_its_layers(capsys, tmp_path, encoder):
    assert_error(*lora_error(capsys, tmp_path, "--base", encoder, "--lora-targets", "query,c_attn"),
                 "bert has no Linear layer named 'c_attn'", "its layers: attention.self.query,attention.self.key,"
                 "attention.self.value,attention.output.dense,intermediate.dense,output.dense")


def test_a_target_in_the_head_is_refused(capsys, tmp_path, encoder):
    assert_error(*lora_error(capsys, tmp_path, "--base", encoder, "--lora-targets", "dense"),
                 "'dense' also names bert.pooler.dense, in the classification head")


def test_base_with_weights(capsys, tmp_path, encoder, tiny_ckpt):
    assert_error(*lora_error(capsys, tmp_path, "--base", encoder, "--weights", tiny_ckpt.path),
                 "--base and --weights both name the model to adapt")


def test_a_base_without_its_tokenizer(capsys, tmp_path, encoder):
    base = copy_without(encoder, tmp_path, "vocab.txt", "tokenizer.json", "tokenizer_config.json")
    assert_error(*lora_error(capsys, tmp_path, "--base", base), f"--base {base} has no tokenizer files",
                 "tokenizer.save_pretrained(DIR)")


def test_a_type_without_default_targets_names_its_layers(capsys, tmp_path, encoder):
    from transformers import ElectraConfig
    base = copy_without(encoder, tmp_path, "config.json", "model.safetensors")
    ElectraConfig(vocab_size=60, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(base)
    assert_error(*lora_error(capsys, tmp_path, "--base", base), "there is no default --lora-targets for electra",
                 "its Linear layers: ", "attention.self.query")


def test_an_offline_hub_id_not_in_the_cache(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    assert_error(*lora_error(capsys, tmp_path, "--base", "nobody/no-such-encoder"),
                 "'nobody/no-such-encoder' is not in the Hugging Face cache and HF_HUB_OFFLINE is set", "--base DIR")


# ---------------------------------------------------------------------------
# The Trainer reference, paired with LoRA by compare
# ---------------------------------------------------------------------------

def test_finetune_reference_writes_metrics_that_compare_pairs(tmp_path_factory, encoder, capsys):
    lora = lora_run(tmp_path_factory, encoder)
    tmp = tmp_path_factory.mktemp("reference")
    out = str(tmp / "reference")
    command = [sys.executable, os.path.join(PROJECT_ROOT, "bench.py"), "finetune-reference", "--base", encoder,
               "--seed", "0", "--out-dir", out, "--epochs", "1", "--data-dir", subset_dir(tmp_path_factory),
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    again = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (f"error: --out-dir {out} already holds a run (metrics.json); "
                                                     "choose another --out-dir")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["args"]["seed"] == 0 and metrics["args"]["lr"] == 5e-5 and metrics["args"]["batch_size"] == 32
    assert [e["epoch"] for e in metrics["epochs"]] == [1] and metrics["best_epoch"] == 1
    assert result["best_val_mcc"] == metrics["epochs"][0]["val_mcc"]
    assert metrics["params"]["trainable"] == metrics["params"]["total"]
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    code, printed, err = cli(capsys, "compare", lora, out, "--plots-dir", tmp / "plots")
    assert code == 0, err
    row = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["0"])
    with open(os.path.join(lora, "metrics.json")) as f:
        lora_metrics = json.load(f)
    best_lora = lora_metrics["epochs"][lora_metrics["best_epoch"] - 1]["val_mcc"]
    assert float(row[1]) == pytest.approx(best_lora, abs=1e-4)
    assert float(row[2]) == pytest.approx(metrics["epochs"][0]["val_mcc"], abs=1e-4)


def test_bench_lora_on_a_base_times_like_against_peft(encoder, tmp_path_factory, capsys):
    """`bench.py lora --base DIR`: ours and transformers + peft train the same
    parameters (adapters on the same layers, the same head) over the same number of
    sentences; ours in length-grouped batches, so fewer padded token slots."""
    import bench
    bench.main(["lora", "--base", encoder, "--data-dir", str(subset_dir(tmp_path_factory)), "--max-steps", "3",
                "--batch-size", "8"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "lora" and result["base"] == os.path.abspath(encoder)
    trained = result["trained_parameters"]
    assert trained["ours"] == trained["reference"] > 0
    assert result["sentences"]["ours"] == result["sentences"]["reference"] == 24
    assert result["token_slots"]["ours"] <= result["token_slots"]["reference"]
    assert result["ratio"] == pytest.approx(result["ours"] / result["reference"])
    assert "x transformers + peft" in out and "head and LayerNorms trained" in out  # the encoder recipe


def test_the_recipe_defaults_follow_the_base(encoder, tiny_ckpt):
    """Epochs, batch size, lr, rank, alpha and the LayerNorms not given take the encoder recipe for a
    --base encoder, GPT-2's for GPT-2 (--weights or a GPT-2 --base); given ones stay."""
    import run
    parser = run.build_parser()

    def resolved(*flags):
        args = parser.parse_args(["LoRA", *flags])
        run.validate_training_flags(args)
        return {name: getattr(args, name) for name in run.GPT2_RECIPE}
    assert resolved("--base", encoder) == hf_lora.ENCODER_RECIPE
    assert resolved("--base", encoder, "--batch-size", "16", "--lora-rank", "2") == {
        **hf_lora.ENCODER_RECIPE, "batch_size": 16, "lora_rank": 2}
    assert resolved("--base", encoder, "--no-train-layernorm")["train_layernorm"] is False
    gpt2 = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "lora_rank": 4, "lora_alpha": 8.0, "train_layernorm": False}
    assert resolved() == resolved("--weights", tiny_ckpt.path) == resolved("--base", tiny_ckpt.path) == gpt2
    lora_help = " ".join(parser._subparsers._group_actions[0].choices["LoRA"].format_help().split())
    assert "rank r of the adapters (default 4 for GPT-2, 8 for a --base encoder)" in lora_help
    assert "--batch-size BATCH_SIZE default 128 for GPT-2, 32 for a --base encoder" in lora_help
    assert "keep them frozen) (default off for GPT-2, on for a --base encoder)" in lora_help
    assert resolved("--train-layernorm")["train_layernorm"] is True


def test_two_gloo_processes_train_an_encoder_as_one_does(tmp_path_factory, tmp_path, encoder):
    """torchrun (2 gloo processes on the CPU) of `LoRA --base`: DDP over the frozen
    encoder with adapters and head gives the one-process run up to rounding."""
    from test_repro import assert_same_run_up_to_rounding, torchrun, torchrun_stderr
    argv = ["LoRA", "--base", encoder, "--data-dir", subset_dir(tmp_path_factory), "--epochs", 2, "--lr", "5e-3",
            "--batch-size", 16, "--dtype", "float32", *common(tmp_path)]
    run_ok(*argv, "--out-dir", tmp_path / "one")
    err, = torchrun_stderr(torchrun([*argv, "--out-dir", tmp_path / "two"], tmp_path / "cwd"))
    assert err.count("epoch 2/2:") == 1  # rank 0 alone speaks
    assert_same_run_up_to_rounding(str(tmp_path / "one"), str(tmp_path / "two"))


def test_bench_refuses_a_bad_base_or_teacher_in_one_line_before_any_timing(tmp_path, capsys):
    import bench
    assert bench.main(["lora", "--base", str(tmp_path / "none")]) == 2
    assert bench.main(["predict", "--teacher", str(tmp_path)]) == 2  # no config.json: refused before any row
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 2 and "Traceback" not in err
    assert f"--base {tmp_path / 'none'} does not exist" in err and f"{tmp_path}/config.json is missing" in err
