"""Checkpoints on the Hugging Face hub: GPT-2's presets and any classifier by its
id, from the local cache when they are there, else downloaded once; offline, a
one-line error at once instead of the hub client's half-minute of retries."""
import os

from utils import UserError, one_line

# Hugging Face hub ids of the OpenAI checkpoints.
HUB_IDS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
           "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
WEIGHTS_HINT = ("download it on a machine with internet and pass --weights DIR "
                "(a directory with config.json + model.safetensors)")


def looks_like_hub_id(name):
    """Hub ids are "name" or "owner/name"; anything else is a local path."""
    return not (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1)


def gpt2_directory(name_or_path):
    """A local directory holding the GPT-2 checkpoint name_or_path: the directory
    itself, or the hub snapshot of a preset name / hub id, from the cache if it is
    there, else downloaded (its path names the revision)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not looks_like_hub_id(name_or_path):
        raise UserError(f"weights directory {name_or_path} does not exist")
    return hub_directory(HUB_IDS.get(name_or_path, name_or_path), WEIGHTS_HINT, ("config.json", "model.safetensors"))


TEACHER_HINT = ("download it on a machine with internet (python -c \"from huggingface_hub import snapshot_download; "
                "print(snapshot_download('ID'))\") and pass that directory as --teacher DIR")
# what a classifier's snapshot needs: its config, weights and tokenizer files
HUB_CLASSIFIER_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def hub_directory(repo_id, hint, files=None):
    """The local snapshot of a hub repository: from the cache if it is there (no
    network), else downloaded; files names the files a caller needs (None: the
    classifier's config, weights and tokenizer). Offline or unreachable: a one-line
    UserError with hint, at once."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    def fetch(local_files_only):
        if files:
            return os.path.dirname([hf_hub_download(repo_id, f, local_files_only=local_files_only)
                                    for f in files][0])
        directory = snapshot_download(repo_id, allow_patterns=HUB_CLASSIFIER_FILES, local_files_only=local_files_only)
        if not any(name.endswith(".safetensors") for name in os.listdir(directory)):  # older uploads: .bin only
            directory = snapshot_download(repo_id, allow_patterns=[*HUB_CLASSIFIER_FILES, "pytorch_model.bin"],
                                          local_files_only=local_files_only)
        return directory
    try:  # the cache first: no network needed for what was downloaded before
        return fetch(local_files_only=True)
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    if not hub_reachable():
        raise UserError(f"the Hugging Face hub is not reachable and '{repo_id}' is not cached; {hint}")
    try:
        return fetch(local_files_only=False)
    except Exception as e:  # unknown repo, network trouble, no such file: all end the same way for the user
        raise UserError(f"could not get '{repo_id}' from the Hugging Face hub ({one_line(e)[:160]}); {hint}") from None


def hub_reachable():
    """Whether the hub's host resolves: fail in a moment, not after the hub
    client's half-minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False
