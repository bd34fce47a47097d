"""The Hub side of a compressed checkpoint: model cards, atomic saves, pushing folders.

* :func:`render_card` builds the README.md written next to every compressed checkpoint from
  the templates in ``model_cards/`` (shipped as package data ``hfcompress.model_cards``):
  YAML metadata the Hub understands (``base_model``, ``base_model_relation``,
  ``library_name``, ``tags``, ``license`` carried from the base card, ``model-index``) and a
  body with the method, the format, bits per weight with overhead, size vs the original,
  evaluations and a usage snippet.
* :func:`set_card_data` attaches user card data to a model; every later save/push uses it.
* :func:`atomic_save` writes a checkpoint directory so that an exception mid-write leaves
  the old checkpoint (or none), never a mix of old and new files.
* :func:`push_folder` uploads a saved directory (private / revision / create_pr pass through).

Only public huggingface_hub API is used here; the save/push hooks on transformers and PEFT
models live in ``hfcompress.integrations.hub``.
"""

from .atomic import atomic_save
from .base_model import BaseModel, base_model_info
from .card_data import CARD_DATA_ATTR, CARD_MARKER, ORIGINAL_CARD, CardError, get_card_data, set_card_data
from .cards import is_generated_card, render_adapter_card, render_card, update_card_, write_card_
from .push import fetch_previous_cards_, push_folder
from .stats import SizeStats, checkpoint_stats, size_stats

__all__ = [
    "BaseModel", "CARD_DATA_ATTR", "CARD_MARKER", "CardError", "ORIGINAL_CARD", "SizeStats", "atomic_save",
    "base_model_info", "checkpoint_stats", "fetch_previous_cards_", "get_card_data", "is_generated_card",
    "push_folder", "render_adapter_card", "render_card", "set_card_data", "size_stats", "update_card_",
    "write_card_",
]
