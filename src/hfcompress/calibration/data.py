"""Text -> token batches for calibration.

Texts are joined with blank lines, tokenized once, and cut into ``n_samples`` windows of
``seq_len`` tokens at evenly spaced offsets (deterministic: the same text, tokenizer and sizes
always give the same batches). No padding, so blocks see plain causal attention.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Iterable

import torch

#: bundled texts (see hfcompress/data/SOURCES.md for where each comes from)
BUNDLED = {
    # the default calibration set (dataset=None): the mixed corpus, chosen by measurement
    # (benchmarks/calibration_sets.py: closest to the float model on the domains it does not contain)
    "calibration": "mixed_calibration.txt",
    "mixed": "mixed_calibration.txt",               # Shakespeare + Node.js docs + Rust release notes, interleaved
    "shakespeare": "shakespeare_calibration.txt",   # four Shakespeare plays (the default before the measurement)
    "eval": "shakespeare_eval.txt",                 # Hamlet: same domain, disjoint text
    "eval_technical": "sqlite_eval.txt",            # technical prose: a second, unrelated domain
    "eval_code": "python_code_eval.txt",            # Python source code (CPython standard library)
    "eval_dialogue": "dialogue_eval.txt",           # short two-speaker chat conversations
}

#: the evaluation domains every quality number is reported on (short name -> bundled text);
#: none of them is used by any default calibration
EVAL_DOMAINS = {
    "hamlet": "eval",
    "sqlite": "eval_technical",
    "code": "eval_code",
    "dialogue": "eval_dialogue",
}


def bundled_text(name: str = "calibration") -> str:
    """The text of a bundled file: a key of :data:`BUNDLED` (``"calibration"`` = ``"mixed"``,
    ``"shakespeare"``, ``"eval"``, ``"eval_technical"``, ``"eval_code"``, ``"eval_dialogue"``)."""
    if name not in BUNDLED:
        raise ValueError(f"bundled text {name!r} is unknown; choose one of {sorted(BUNDLED)}")
    return resources.files("hfcompress.data").joinpath(BUNDLED[name]).read_text(encoding="utf-8")


def eval_texts() -> dict[str, str]:
    """Every evaluation domain's text, by short name (see :data:`EVAL_DOMAINS`)."""
    return {domain: bundled_text(name) for domain, name in EVAL_DOMAINS.items()}


#: the named calibration sets of transformers' ``GPTQConfig(dataset=...)``: name -> ``datasets.load_dataset``
#: arguments (the same files optimum reads). Loaded only when ``datasets`` is installed and the set is in its
#: cache or the Hub is reachable.
_C4 = (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"})
NAMED_DATASETS = {"wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}), "c4": _C4, "c4-new": _C4}


def load_named_dataset(name: str) -> list[str]:
    """The texts of a named set of transformers' GPTQConfig (``"wikitext2"``, ``"c4"``, ``"c4-new"``)."""
    args, kwargs = NAMED_DATASETS[name]
    hint = "or pass a text file, a list of strings or a datasets.Dataset instead"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"calibration dataset {name!r} is a named set loaded with the `datasets` library, which is "
                         f"not installed: pip install datasets, {hint}") from None
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline and not cached, gated, renamed upstream ...
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f"calibration dataset {name!r} could not be loaded with datasets.load_dataset{args} "
                         f"({first}); load it once where the Hub is reachable (it is cached then), {hint}") from None
    return [t for t in ds["text"] if t.strip()]


def load_texts(dataset: Any = None) -> list[str]:
    """Normalise a calibration source to a list of strings.

    ``None`` -> the bundled default calibration text (``"mixed"``: Shakespeare, Node.js docs
    and Rust release notes, interleaved); a path to a text file -> its content; the name of a
    bundled text (a key of :data:`BUNDLED`); a named set of transformers'
    GPTQConfig (``"wikitext2"``, ``"c4"``, ``"c4-new"``: needs ``datasets``, offline only when
    cached); a list/tuple of strings; or any object with a ``"text"`` column (``datasets.Dataset``)
    or an iterable of strings.
    """
    if dataset is None:
        return [bundled_text("calibration")]
    if isinstance(dataset, (str, os.PathLike)):
        path = os.fspath(dataset)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return [f.read()]
        if path in BUNDLED:
            return [bundled_text(path)]
        if path in NAMED_DATASETS:
            return load_named_dataset(path)
        raise FileNotFoundError(f"calibration dataset {path!r} is neither a text file, a bundled text "
                                f"({sorted(BUNDLED)}) nor a named set ({sorted(NAMED_DATASETS)}); pass a file path, "
                                "a list of strings or a datasets.Dataset")
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"calibration dataset has columns {column_names}; it needs a 'text' column")
        dataset = dataset["text"]
    if isinstance(dataset, Iterable):
        texts = list(dataset)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"calibration dataset item {bad[0]} is {type(texts[bad[0]]).__name__}, expected str")
        if not texts:
            raise ValueError("calibration dataset is empty")
        return texts
    raise TypeError(f"calibration dataset must be None, a path, a list of strings or a datasets.Dataset; "
                    f"got {type(dataset).__name__}")


def tokenize_text(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts joined by blank lines -> one LongTensor ``[T]`` of token ids (no special tokens)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def token_ids(dataset: Any) -> torch.Tensor | None:
    """Pre-tokenized calibration data (an integer tensor, or a list of lists of ints) as one
    LongTensor ``[T]``; None when ``dataset`` is text."""
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point() or dataset.is_complex():
            raise TypeError(f"calibration token ids must be an integer tensor, got {dataset.dtype}")
        return dataset.reshape(-1).long().cpu()
    if isinstance(dataset, (list, tuple)) and dataset and all(
            isinstance(row, (list, tuple)) and all(isinstance(t, int) for t in row) for row in dataset):
        return torch.tensor([t for row in dataset for t in row], dtype=torch.long)
    return None


def get_calibration_batches(tokenizer, dataset: Any = None, n_samples: int = 128, seq_len: int = 512,
                            batch_size: int = 8) -> list[torch.Tensor]:
    """Token batches for calibration: a list of LongTensors ``[b, seq_len]`` (``b <= batch_size``),
    ``n_samples`` windows in all, cut at evenly spaced offsets of the tokenized ``dataset``
    (see :func:`load_texts` for what ``dataset`` may be; token ids are used as they are and need
    no tokenizer)."""
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"get_calibration_batches: {name} must be a positive int, got {v!r}")
    ids = token_ids(dataset)
    if ids is None:
        if tokenizer is None:
            raise ValueError("calibration text needs a tokenizer: pass tokenizer=..., or give token ids "
                             "(a LongTensor or lists of ints) as the dataset")
        ids = tokenize_text(tokenizer, load_texts(dataset))
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                         "give more text or a smaller seq_len")
    return list(cut_windows(ids, n_samples, seq_len).split(batch_size))  # [n_samples, seq_len] in all


def cut_windows(ids: torch.Tensor, n: int, seq: int, offset: float = 0.0) -> torch.Tensor:
    """``n`` windows ``[n, seq]`` of the token stream ``ids [T]`` at evenly spaced starts (``offset = 0``:
    the windows :func:`get_calibration_batches` calibrates on), each moved ``offset`` of a spacing (of
    the whole range when ``n = 1``) toward the end; a start past the last possible one is clamped to it
    (EoRA's held-out windows: ``EoRAConfig.window_offset``)."""
    last = ids.numel() - seq
    starts = torch.linspace(0, last, n)  # [n]
    if offset:
        starts = starts + offset * (float(starts[1] - starts[0]) if n > 1 else last)
    starts = starts.round().long().clamp_max(last)
    return torch.stack([ids[s: s + seq] for s in starts.tolist()])
