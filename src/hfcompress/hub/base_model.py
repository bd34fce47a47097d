"""The base model a checkpoint was compressed from: its Hub id and the metadata worth carrying
from its card (license, language). The base card itself is only read, never written."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SNAPSHOT = re.compile(r"/models--([\w.-]+?)--([\w.-]+)/snapshots/[0-9a-f]+/?$")

@dataclass
class BaseModel:
    name: str | None  # what the model was loaded from (Hub id or local path)
    repo_id: str | None  # a Hub id when known
    license: str | None = None
    language: Any = None
    card_found: bool = False


def base_model_info(name_or_path: str | None, repo_id: str | None = None) -> BaseModel:
    """Find the base model's card (a local directory's README.md, or the Hub repo's) and read
    the metadata worth carrying (license, language). Never raises: no card, no carried data."""
    if not repo_id and name_or_path and _HUB_ID.match(name_or_path) and not os.path.exists(name_or_path):
        repo_id = name_or_path
    if not repo_id and name_or_path:  # a snapshot in the Hub cache: .../models--org--name/snapshots/<sha>
        m = _SNAPSHOT.search(os.path.abspath(name_or_path).replace(os.sep, "/"))
        repo_id = f"{m.group(1)}/{m.group(2)}" if m else None
    info = BaseModel(name_or_path, repo_id)
    card = None
    try:
        from huggingface_hub import ModelCard

        local = os.path.join(name_or_path, "README.md") if name_or_path else None
        if local and os.path.isfile(local):
            card = ModelCard.load(local, ignore_metadata_errors=True)
        elif repo_id:
            card = _hub_card(repo_id)
    except Exception:  # unreadable card metadata: the card is optional
        card = None
    if card is not None:
        info.card_found = True
        info.license = card.data.get("license")
        info.language = card.data.get("language")
    return info


def _hub_card(repo_id: str, timeout: float = 10.0):
    """The base repo's card from the local cache, else one request (no retries: a missing
    network must not stall a save); None when unavailable."""
    from huggingface_hub import ModelCard, get_session, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.utils import build_hf_headers

    cached = try_to_load_from_cache(repo_id, "README.md")
    if isinstance(cached, str):
        return ModelCard.load(cached, ignore_metadata_errors=True)
    if is_offline_mode():
        return None
    try:
        r = get_session().get(hf_hub_url(repo_id, "README.md"), headers=build_hf_headers(), timeout=timeout,
                              follow_redirects=True)
    except Exception:  # no network, DNS, TLS ...
        return None
    if r.status_code != 200:
        return None
    return ModelCard(r.text, ignore_metadata_errors=True)
