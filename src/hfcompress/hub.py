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

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import string
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .nn import QuantLinear

#: first line of the body of every generated card; a README.md without it is someone else's card
CARD_MARKER = "<!-- hfcompress:model-card -->"
#: where a card that was in the target directory / repo before is kept (never overwritten)
ORIGINAL_CARD = "ORIGINAL_README.md"
CARD_DATA_ATTR = "_hfcompress_card_data"

#: keys of user card data with a meaning of their own; everything else goes to the YAML metadata
_BODY_KEYS = ("evaluations", "description", "calibration", "repo_id", "title")
_WEIGHT_FILE = re.compile(
    r"^(model|pytorch_model|tf_model|flax_model|adapter_model)(-\d{5}-of-\d{5})?"
    r"\.(safetensors|bin|h5|msgpack|pt)(\.index\.json)?$|\.(safetensors|bin)\.index\.json$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_AUTO_CLASS = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
               ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForSequenceClassification",
                                                         "AutoModelForSequenceClassification"),
               ("ForTokenClassification", "AutoModelForTokenClassification"),
               ("ForQuestionAnswering", "AutoModelForQuestionAnswering"))


class CardError(ValueError):
    """Card data that cannot be rendered; the message names the field."""


# -- card data -----------------------------------------------------------------------------------
def set_card_data(model: nn.Module, **fields: Any) -> nn.Module:
    """Attach card data to ``model`` (merged into every card its saves and pushes write).

    Metadata fields go to the YAML header as the Hub defines them (``license``, ``language``,
    ``datasets``, ``base_model``, ``tags`` (added to the defaults), ``model_name`` ...); these
    keys have their own meaning:

    * ``evaluations``: list of ``{"metric": "perplexity", "dataset_name": ..., "dataset_type":
      ..., "value": <compressed>, "base": <uncompressed>, "dataset_split": ..., "dataset_config": ...}``
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


# -- statistics ----------------------------------------------------------------------------------
@dataclass
class SizeStats:
    quantized_layers: int
    quantized_weights: int  # number of weights held by QuantLinear layers
    stored_bits: int  # bits of their packed codes + scales + zeros + g_idx
    checkpoint_bytes: int  # every tensor of the model as saved
    original_bytes: int  # the same model with the quantized layers back in their float dtype
    original_dtype: str

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def ratio(self) -> float:
        return self.checkpoint_bytes / self.original_bytes


def size_stats(model: nn.Module) -> SizeStats:
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():  # persistent tensors: what a save writes
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    n_layers = n_weights = bits = 0
    float_bytes = 0
    dtypes = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n_layers += 1
            n = m.in_features * m.out_features
            n_weights += n
            stored = sum(b.numel() * b.element_size() for b in m._buffers.values() if b is not None)
            bits += 8 * stored
            float_bytes += n * torch.empty(0, dtype=m.compute_dtype).element_size() - stored
            dtypes.add(str(m.compute_dtype).removeprefix("torch."))
    return SizeStats(n_layers, n_weights, bits, total, total + float_bytes, "/".join(sorted(dtypes)) or "n/a")


# -- base model ----------------------------------------------------------------------------------
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


# -- rendering -----------------------------------------------------------------------------------
def _template(name: str) -> str:
    """A template from the package data (installed) or the source tree's model_cards/."""
    try:
        from importlib.resources import files

        return files("hfcompress.model_cards").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, os.pardir, os.pardir, "model_cards", name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model card template {name!r} is neither installed (hfcompress.model_cards) "
                                    f"nor in the source tree ({os.path.normpath(path)}); reinstall hfcompress")
        with open(path, encoding="utf-8") as f:
            return f.read()


def _fill(name: str, fields: dict) -> str:
    text = string.Template(_template(name)).substitute(fields)
    return re.sub(r"\n{3,}", "\n\n", text)


def _auto_class(model) -> str:
    """The Auto class for the usage snippet, from a model or a config.json dict."""
    if isinstance(model, dict):
        archs = model.get("architectures") or ["Model"]
    else:
        archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    for suffix, auto in _AUTO_CLASS:
        if archs[0].endswith(suffix):
            return auto
    return "AutoModel"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _quant_config(model: nn.Module):
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None:
        raise CardError("the model has no hfcompress quantization_config; quantize it with hfcompress first")
    return q.to_dict() if hasattr(q, "to_dict") else dict(q)


def checkpoint_stats(path: str) -> tuple[dict, SizeStats]:
    """``(config.json, SizeStats)`` of a saved checkpoint, from its safetensors headers only
    (for checkpoints written without a model in memory, e.g. streamed quantization)."""
    import json

    from .inspect import summarize

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    summary = summarize(path)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    fp_bytes = torch.empty(0, dtype=dtype).element_size()
    n = sum(lay.in_features * lay.out_features for lay in summary.layers)
    stored = sum(lay.stored_bits for lay in summary.layers)
    total = summary.total_params_bits // 8
    stats = SizeStats(len(summary.layers), n, stored, total, total + n * fp_bytes - stored // 8,
                      str(dtype).removeprefix("torch."))
    return config, stats


def render_card(model, card_data: dict | None = None, has_original_card: bool = False, source: str | None = None):
    """The model card (a ``huggingface_hub.ModelCard``) of an hfcompress-quantized ``model``
    (an ``nn.Module``, or the path of a saved checkpoint: statistics from its headers).
    ``source``: what the model was quantized from (Hub id or directory), when the model does
    not say (``config._name_or_path``)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if isinstance(model, (str, os.PathLike)):
        hf_config, stats = checkpoint_stats(os.fspath(model))
        q = hf_config.get("quantization_config") or {}
        if q.get("quant_method") != "hfcompress":
            raise CardError(f"{model}/config.json has no hfcompress quantization_config; it is not an hfcompress "
                            "checkpoint")
        data = dict(card_data or {})
        _check_card_data(data)
        name_or_path, model = source, hf_config
    else:
        data = get_card_data(model, card_data)
        q = _quant_config(model)
        stats = size_stats(model)
        name_or_path = source or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    base = base_model_info(name_or_path, data.get("base_model"))
    method, bits, group = q.get("algorithm", "?"), q.get("bits"), q.get("group_size")
    title = data.get("title") or (f"{base.repo_id} — hfcompress {method.upper()} {bits}-bit" if base.repo_id
                                  else f"hfcompress {method.upper()} {bits}-bit model")

    meta = {k: v for k, v in data.items() if k not in _BODY_KEYS}
    tags = ["hfcompress", method, f"{bits}-bit", "quantized"] + list(meta.pop("tags", None) or [])
    if base.repo_id:
        meta.setdefault("base_model", base.repo_id)
        meta.setdefault("base_model_relation", "quantized")
    if base.license and "license" not in meta:
        meta["license"] = base.license
    if base.language and "language" not in meta:
        meta["language"] = base.language
    meta.setdefault("library_name", "transformers")
    if _auto_class(model) == "AutoModelForCausalLM":
        meta.setdefault("pipeline_tag", "text-generation")
    evals = list(data.get("evaluations") or [])
    eval_results = []
    model_name = meta.pop("model_name", None) or title
    for ev in evals:
        common = dict(task_type=ev.get("task_type", "text-generation"), dataset_type=ev.get("dataset_type")
                      or ev["dataset_name"], dataset_name=ev["dataset_name"], metric_type=ev["metric"],
                      dataset_split=ev.get("dataset_split"), dataset_config=ev.get("dataset_config"))
        eval_results.append(EvalResult(metric_value=float(ev["value"]),
                                       metric_name=f"{ev['metric']} ({method} {bits}-bit)", **common))
        if ev.get("base") is not None:
            eval_results.append(EvalResult(metric_value=float(ev["base"]),
                                           metric_name=f"{ev['metric']} (base model)", **common))
    card_meta = ModelCardData(tags=tags, eval_results=eval_results or None,
                              model_name=model_name if eval_results else None, **meta)

    fields = {
        "metadata": card_meta.to_yaml(),
        "marker": CARD_MARKER,
        "title": title,
        "description": data.get("description") or "",
        "base_section": _base_section(base, has_original_card),
        "method": method,
        "method_table": _method_table(q, stats),
        "size_section": _size_section(stats),
        "evaluation_section": _evaluation_section(evals, method, bits),
        "calibration": data.get("calibration") or ("none (data-free)" if method == "rtn" else "not recorded"),
        "auto_class": _auto_class(model),
        "repo_id": data.get("repo_id") or "path/to/this/checkpoint",
        "group_size": "per output channel" if group == -1 else str(group),
    }
    return ModelCard(_fill("quantized.md", fields))


def render_adapter_card(peft_model: nn.Module, card_data: dict | None = None, adapter_name: str | None = None,
                        has_original_card: bool = False):
    """The model card of an adapter (LoRA, EoRA ...) on an hfcompress-quantized base."""
    from huggingface_hub import ModelCard, ModelCardData

    data = get_card_data(peft_model, card_data)
    adapter_name = adapter_name or getattr(peft_model, "active_adapter", None) or "default"
    pcfg = peft_model.peft_config[adapter_name]
    base_model = peft_model.get_base_model()
    q = _quant_config(base_model)
    stats = size_stats(base_model)
    base_path = getattr(pcfg, "base_model_name_or_path", None) or \
        getattr(getattr(base_model, "config", None), "_name_or_path", None)
    base = base_model_info(base_path, data.get("base_model"))
    peft_type = str(getattr(getattr(pcfg, "peft_type", None), "value", getattr(pcfg, "peft_type", "adapter")))
    method, bits = q.get("algorithm", "?"), q.get("bits")
    title = data.get("title") or f"{peft_type} adapter for {base.repo_id or base.name or 'an hfcompress model'}"

    meta = {k: v for k, v in data.items() if k not in _BODY_KEYS}
    tags = ["hfcompress", peft_type.lower(), method, f"{bits}-bit", "adapter"] + list(meta.pop("tags", None) or [])
    if base.repo_id:
        meta.setdefault("base_model", base.repo_id)
        meta.setdefault("base_model_relation", "adapter")
    if base.license and "license" not in meta:
        meta["license"] = base.license
    meta.setdefault("library_name", "peft")
    meta.pop("model_name", None)
    card_meta = ModelCardData(tags=tags, **meta)
    targets = getattr(pcfg, "target_modules", None)
    rows = [("type", peft_type), ("rank r", getattr(pcfg, "r", "n/a")), ("alpha", getattr(pcfg, "lora_alpha", "n/a")),
            ("target modules", ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else targets),
            ("trainable / adapter parameters",
             sum(p.numel() for n, p in peft_model.named_parameters() if adapter_name in n))]
    adapter_table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    base_id = base.repo_id or base.name or "path/to/quantized/base"
    fields = {
        "metadata": card_meta.to_yaml(),
        "marker": CARD_MARKER,
        "title": title,
        "description": data.get("description") or "",
        "adapter_type": peft_type,
        "base_link": f"[{base.repo_id}](https://huggingface.co/{base.repo_id})" if base.repo_id else f"`{base_id}`",
        "adapter_table": adapter_table,
        "base_table": _method_table(q, stats) + (
            f"\n\nThe card that was here before is kept unchanged in [{ORIGINAL_CARD}]({ORIGINAL_CARD})."
            if has_original_card else ""),
        "evaluation_section": _evaluation_section(list(data.get("evaluations") or []), f"{method} + {peft_type}",
                                                  bits),
        "auto_class": _auto_class(base_model),
        "base_id": base_id,
        "repo_id": data.get("repo_id") or "path/to/this/adapter",
    }
    return ModelCard(_fill("adapter.md", fields))


def _base_section(base: BaseModel, has_original_card: bool) -> str:
    lines = []
    if base.repo_id:
        lines.append(f"Quantized from [{base.repo_id}](https://huggingface.co/{base.repo_id}); its model card "
                     "(intended use, training data, limitations) applies to this model and is not repeated here.")
    elif base.name:
        lines.append(f"Quantized from `{base.name}` (a local model; pass `card_data={{'base_model': '<hub id>'}}` "
                     "to link its Hub page).")
    if base.license:
        lines.append(f"License carried from the base model's card: `{base.license}`.")
    if has_original_card:
        lines.append(f"The card that was here before is kept unchanged in [{ORIGINAL_CARD}]({ORIGINAL_CARD}).")
    return "\n\n".join(lines) or "Base model unknown."


def _method_table(q: dict, stats: SizeStats) -> str:
    group = q.get("group_size")
    rows = [("algorithm", q.get("algorithm")), ("format", f"{q.get('format')} v{q.get('format_version')}"),
            ("bits", q.get("bits")), ("group size", "per output channel" if group == -1 else group),
            ("symmetric", q.get("sym")), ("act-order", q.get("act_order")),
            ("bits per weight (scales, zeros, g_idx included)", f"{stats.bits_per_weight:.3f}"),
            ("quantized linear layers", stats.quantized_layers),
            ("kept in float", ", ".join(q.get("modules_to_not_convert") or []) or "none")]
    extra = {k: v for k, v in q.items() if k not in ("quant_method", "format", "format_version", "algorithm", "bits",
                                                     "group_size", "sym", "act_order", "modules_to_not_convert")}
    rows += [(k, v) for k, v in sorted(extra.items())]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _size_section(stats: SizeStats) -> str:
    return "\n".join([
        "| | size |", "|---|---|",
        f"| original ({stats.original_dtype} linear layers) | {_fmt_bytes(stats.original_bytes)} |",
        f"| this checkpoint | {_fmt_bytes(stats.checkpoint_bytes)} ({stats.ratio:.1%} of the original) |"])


def _evaluation_section(evals: list[dict], method: str, bits) -> str:
    if not evals:
        return "No evaluation recorded for this checkpoint (pass `card_data={'evaluations': [...]}`)."
    lines = [f"| dataset | metric | base model | {method} {bits}-bit | change |", "|---|---|---|---|---|"]
    for ev in evals:
        base, value = ev.get("base"), float(ev["value"])
        change = f"{(value - base) / base:+.2%}" if base else "n/a"
        split = f" ({ev['dataset_split']})" if ev.get("dataset_split") else ""
        lines.append(f"| {ev['dataset_name']}{split} | {ev['metric']} | "
                     f"{'n/a' if base is None else f'{base:.3f}'} | {value:.3f} | {change} |")
    return "\n".join(lines)


def is_generated_card(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return CARD_MARKER in f.read()
    except OSError:
        return False


def write_card_(directory: str, model, card_data: dict | None = None, adapter: bool = False,
                source: str | None = None) -> str:
    """Write README.md for ``model`` (a quantized model, the ``directory`` path itself for a
    checkpoint saved without a model in memory, or with ``adapter=True`` a PeftModel on a
    quantized model) into ``directory``. A README.md there that hfcompress did not write is moved to
    ORIGINAL_README.md (kept, referenced by the new card)."""
    path = os.path.join(directory, "README.md")
    original = os.path.join(directory, ORIGINAL_CARD)
    if os.path.isfile(path) and not is_generated_card(path) and not os.path.exists(original):
        os.replace(path, original)
    if adapter:
        card = render_adapter_card(model, card_data, has_original_card=os.path.isfile(original))
    else:
        card = render_card(model, card_data, has_original_card=os.path.isfile(original), source=source)
    card.save(path)
    return path


# -- atomic saves --------------------------------------------------------------------------------
def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _carry_over_(old: str, new: str) -> None:
    """Keep what the previous directory held besides the checkpoint itself (tokenizer, notes,
    a hand-written card) unless the new save wrote a file of the same name."""
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if name.startswith(".") and name.endswith(".tmp") or _WEIGHT_FILE.search(name):
            continue
        if name == "README.md":
            if is_generated_card(src):
                continue
            dst = os.path.join(new, ORIGINAL_CARD)
        if os.path.lexists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def atomic_save(directory: str | os.PathLike, write: Callable[[str], None],
                finish: Callable[[str], None] | None = None) -> str:
    """Run ``write(tmp_dir)`` in a fresh sibling directory, then put it in place of ``directory``.

    ``finish(tmp_dir)`` runs after the files of the old directory were carried over (the
    card is written there, so it can see a kept ORIGINAL_README.md).
    An exception inside ``write`` leaves ``directory`` exactly as it was (or absent, if it did
    not exist) and removes the temporary directory. Files of the old directory that are not
    part of a checkpoint (tokenizer, other notes) are carried over; stale weight shards are not.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(directory):
        raise NotADirectoryError(f"save directory {directory} is a file; pass a directory path")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(directory):
            _carry_over_(directory, tmp)
        if finish is not None:
            finish(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return directory
    cwd = os.getcwd()
    if _exchange(tmp, directory):  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = tempfile.mkdtemp(prefix=f".{name}.old.", suffix=".tmp", dir=parent)
        os.rmdir(old)
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    if cwd == directory or cwd.startswith(directory + os.sep):
        os.chdir(cwd)  # the process was inside the replaced directory: enter the new one
    return directory


# -- pushing -------------------------------------------------------------------------------------
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
