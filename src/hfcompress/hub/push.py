"""Uploading a saved checkpoint folder (private / revision / create_pr pass through)."""

from __future__ import annotations

import os
import shutil

from .card_data import ORIGINAL_CARD


def fetch_previous_cards_(repo_id: str, directory: str, revision: str | None = None, token=None,
                          repo_type: str = "model") -> None:
    """Download the repo's current README.md (and a kept ORIGINAL_README.md) into ``directory``
    so a save there keeps a hand-written card instead of overwriting it."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        files = set(api.list_repo_files(repo_id, revision=revision, token=token, repo_type=repo_type))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return
    for name in ("README.md", ORIGINAL_CARD):
        if name not in files:
            continue
        try:
            src = hf_hub_download(repo_id, name, revision=revision, token=token, repo_type=repo_type)
        except EntryNotFoundError:
            continue
        shutil.copyfile(src, os.path.join(directory, name))


def push_folder(folder: str, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, commit_description: str | None = None, token=None,
                create_pr: bool = False, repo_type: str = "model", create: bool = True):
    """Upload a saved checkpoint directory; returns the ``CommitInfo``.

    ``private`` applies when the repo is created; ``revision`` is a branch (created from main
    if missing). Weight shards of an earlier push that this folder does not contain are
    deleted in the same commit, so the repo never mixes two checkpoints.
    """
    from huggingface_hub import HfApi

    if not os.path.isfile(os.path.join(folder, "config.json")) and \
            not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise FileNotFoundError(f"{folder} has no config.json or adapter_config.json; is it a saved checkpoint?")
    for name in os.listdir(folder):
        if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
            raise ValueError(f"{folder}/{name}: hfcompress pushes safetensors only (pickle files can run code on "
                             "load); remove it or re-save with safetensors")
    api = HfApi()
    if create:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type=repo_type).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True, repo_type=repo_type)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, token=token, repo_type=repo_type,
        commit_message=commit_message or "Upload hfcompress checkpoint", commit_description=commit_description,
        create_pr=create_pr,
        delete_patterns=["*.safetensors", "*.safetensors.index.json"])
