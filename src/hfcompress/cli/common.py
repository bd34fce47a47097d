"""What every command checks the same way: model and tokenizer arguments (a local directory or a
Hub id), loaded with errors that fit on one line and say what to do."""

from __future__ import annotations

import os
import re

#: a Hub repo id: "name" or "namespace/name"
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def model_source(value: str, what: str = "MODEL") -> str:
    """``value`` if it is a directory or could be a Hub id; otherwise a one-line error naming
    ``what`` (the argument) and what to pass instead."""
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise ValueError(f"{what} {value!r} is a file; pass the directory that save_pretrained wrote")
    local = value.startswith((".", "/", "~")) or value.endswith(("/", os.sep)) or not _HUB_ID.match(value)
    if local:
        raise FileNotFoundError(f"{what} {value!r}: no such directory; pass a model directory (written by "
                                "save_pretrained) or a Hub repo id")
    return value


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def load_model(value: str, what: str = "MODEL", **kwargs):
    """``AutoModelForCausalLM.from_pretrained(value, **kwargs)`` with one-line errors."""
    from transformers import AutoModelForCausalLM

    import hfcompress  # noqa: F401  (registers the quantizer: compressed checkpoints load)

    src = model_source(value, what)
    local = os.path.isdir(src)
    if local and not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{what} {src!r} has no config.json; pass the directory that save_pretrained wrote")
    try:
        return AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        if local:
            raise OSError(f"{what} {src!r} does not load as a model ({_first_line(e)})") from None
        raise OSError(f"{what} {src!r} is neither a local directory nor a Hub repo that can be reached from here "
                      f"({_first_line(e)}); pass a model directory or check the name and the network") from None


def load_tokenizer(value: str | None, model: str, what: str = "--tokenizer"):
    """The tokenizer at ``value`` (``--tokenizer``), else the one saved with ``model``; a model
    without one gets an error that says to pass ``--tokenizer``."""
    from transformers import AutoTokenizer

    if value is not None:
        src = model_source(value, what)
        try:
            return AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise OSError(f"{what} {src!r} does not load a tokenizer ({_first_line(e)})") from None
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError):
        raise FileNotFoundError(f"{model!r} has no tokenizer; pass --tokenizer DIR_OR_HUB_ID (e.g. the directory "
                                "of the model it came from)") from None


def check_dataset_arg(value: str | None, what: str = "--dataset") -> None:
    """A calibration ``--dataset``: a text file, a bundled text or a named set (checked before any
    model is loaded)."""
    from hfcompress.calibration.data import BUNDLED, NAMED_DATASETS

    if value is None or os.path.isfile(value) or value in BUNDLED or value in NAMED_DATASETS:
        return
    raise FileNotFoundError(f"{what} {value!r} is not a file; pass a text file, one of {sorted(NAMED_DATASETS)} "
                            "(needs the datasets library), or nothing for the bundled calibration text")
