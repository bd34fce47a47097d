"""Card data a user attaches to a model, merged into every card its saves and pushes write."""

from __future__ import annotations

from typing import Any

from torch import nn

#: first line of the body of every generated card; a README.md without it is someone else's card
CARD_MARKER = "<!-- hfcompress:model-card -->"
#: where a card that was in the target directory / repo before is kept (never overwritten)
ORIGINAL_CARD = "ORIGINAL_README.md"
CARD_DATA_ATTR = "_hfcompress_card_data"

#: keys of user card data with a meaning of their own; everything else goes to the YAML metadata
_BODY_KEYS = ("evaluations", "description", "calibration", "repo_id", "title")
class CardError(ValueError):
    """Card data that cannot be rendered; the message names the field."""


# -- card data -----------------------------------------------------------------------------------
def set_card_data(model: nn.Module, **fields: Any) -> nn.Module:
    """Attach card data to ``model`` (merged into every card its saves and pushes write).

    Metadata fields go to the YAML header as the Hub defines them (``license``, ``language``,
    ``datasets``, ``base_model``, ``tags`` (added to the defaults), ``model_name`` ...); these
    keys have their own meaning:

    * ``evaluations``: list of ``{"metric": "perplexity", "dataset_name": ..., "dataset_type":
      ..., "value": <compressed>, "base": <uncompressed>, "dataset_split": ..., "dataset_config": ...}``;
      all go to the card's table; those with a ``dataset_type`` (a Hub dataset id, e.g.
      ``"wikitext"``) also go to ``model-index`` (this model's value only).
    * ``description`` (markdown paragraph), ``calibration`` (what data calibrated the method),
      ``repo_id`` (for the usage snippet), ``title``.
    """
    data = dict(getattr(model, CARD_DATA_ATTR, None) or {})
    data.update(fields)
    _check_card_data(data)
    setattr(model, CARD_DATA_ATTR, data)
    return model


def get_card_data(model: nn.Module, extra: dict | None = None) -> dict:
    data = dict(getattr(model, CARD_DATA_ATTR, None) or {})
    if extra:
        data.update(extra)
    _check_card_data(data)
    return data


def _check_card_data(data: dict) -> None:
    if not isinstance(data, dict):
        raise CardError(f"card_data must be a dict, got {type(data).__name__}")
    evals = data.get("evaluations") or []
    if not isinstance(evals, (list, tuple)):
        raise CardError(f"card_data['evaluations'] must be a list of dicts, got {type(evals).__name__}")
    for i, ev in enumerate(evals):
        if not isinstance(ev, dict):
            raise CardError(f"card_data['evaluations'][{i}] must be a dict, got {type(ev).__name__}")
        for key in ("metric", "dataset_name", "value"):
            if key not in ev:
                raise CardError(f"card_data['evaluations'][{i}] lacks {key!r} (needs metric, dataset_name, value; "
                                "optional base, dataset_type, dataset_split, dataset_config)")
        for key in ("value", "base"):
            if key in ev and ev[key] is not None and not isinstance(ev[key], (int, float)):
                raise CardError(f"card_data['evaluations'][{i}][{key!r}] must be a number, got {ev[key]!r}")
    if "tags" in data and not isinstance(data["tags"], (list, tuple)):
        raise CardError(f"card_data['tags'] must be a list of strings, got {data['tags']!r}")
