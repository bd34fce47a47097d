"""Rendering README.md from the templates in ``model_cards/`` (package data
``hfcompress.model_cards``) for quantized models and adapters on them."""

from __future__ import annotations

import os
import re
import string

from torch import nn

from ..adapters.eora import RECORD_KEY as COMPENSATION_KEY  # EoRA / SVD record in adapter_config.json
from .base_model import BaseModel, base_model_info
from .card_data import CARD_MARKER, ORIGINAL_CARD, CardError, _BODY_KEYS, _check_card_data, get_card_data
from .stats import SizeStats, checkpoint_stats, size_stats

_AUTO_CLASS = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
               ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForSequenceClassification",
                                                         "AutoModelForSequenceClassification"),
               ("ForTokenClassification", "AutoModelForTokenClassification"),
               ("ForQuestionAnswering", "AutoModelForQuestionAnswering"))

#: the usage snippet's placeholders, until the repo id is known
_PLACEHOLDERS = ("path/to/this/checkpoint", "path/to/this/adapter")
#: where the usage snippets (model_cards/*.md) name this repo
_USAGE_REPO = (r'(model = \w+\.from_pretrained\(")[^"]*("\))', r'(PeftModel\.from_pretrained\(base, ")[^"]*("\))')


def _template(name: str) -> str:
    """A template from the package data (installed) or the source tree's model_cards/."""
    try:
        from importlib.resources import files

        return files("hfcompress.model_cards").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, os.pardir, os.pardir, os.pardir, "model_cards", name)
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


def _group_stats(q: dict) -> str:
    """What each group stores beside its codes, as the quantization config says."""
    if q.get("sym", False):
        return "one fp16 scale"
    zero = "one fp16 zero point" if q.get("zero_point", "int") == "float" else "one integer zero point"
    return f"one fp16 scale and {zero}"


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
        # model-index: this model's own results on Hub datasets (dataset_type is a Hub dataset id, never
        # made up from a name); the base model's figures and other texts are in the body's table
        if not ev.get("dataset_type"):
            continue
        eval_results.append(EvalResult(
            metric_value=float(ev["value"]), metric_name=f"{ev['metric']} ({method} {bits}-bit)",
            task_type=ev.get("task_type", "text-generation"), dataset_type=ev["dataset_type"],
            dataset_name=ev["dataset_name"], metric_type=ev["metric"], dataset_split=ev.get("dataset_split"),
            dataset_config=ev.get("dataset_config")))
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
        "repo_id": data.get("repo_id") or _PLACEHOLDERS[0],
        "group_size": "per output channel" if group == -1 else str(group),
        "group_stats": _group_stats(q),
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
    # a compensation adapter (EoRA / SVD) records its method in adapter_config.json's auto_mapping
    record = (getattr(pcfg, "auto_mapping", None) or {}).get(COMPENSATION_KEY) or {}
    compensation = record.get("method") if isinstance(record, dict) else None
    method, bits = q.get("algorithm", "?"), q.get("bits")
    title = data.get("title") or f"{peft_type} adapter for {base.repo_id or base.name or 'an hfcompress model'}"

    meta = {k: v for k, v in data.items() if k not in _BODY_KEYS}
    tags = ["hfcompress", peft_type.lower(), method, f"{bits}-bit", "adapter"] + ([compensation] if compensation
                                                                                   else [])
    tags += list(meta.pop("tags", None) or [])
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
            ("compensation", f"{compensation} (computed from the quantization error, no training)"
             if compensation else "none (a trained adapter)"),
            ("adapter parameters",
             sum(p.numel() for n, p in peft_model.named_parameters() if adapter_name in n))]
    adapter_table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    base_id = base.repo_id or base.name or "path/to/quantized/base"
    fields = {
        "metadata": card_meta.to_yaml(),
        "marker": CARD_MARKER,
        "title": title,
        "description": data.get("description") or "",
        "adapter_type": f"{peft_type}, {compensation} compensation" if compensation else peft_type,
        "base_link": f"[{base.repo_id}](https://huggingface.co/{base.repo_id})" if base.repo_id else f"`{base_id}`",
        "adapter_table": adapter_table,
        "base_table": _method_table(q, stats) + (
            f"\n\nThe card that was here before is kept unchanged in [{ORIGINAL_CARD}]({ORIGINAL_CARD})."
            if has_original_card else ""),
        "evaluation_section": _evaluation_section(list(data.get("evaluations") or []), f"{method} + {peft_type}",
                                                  bits),
        "auto_class": _auto_class(base_model),
        "base_id": base_id,
        "repo_id": data.get("repo_id") or _PLACEHOLDERS[1],
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
    # (save_id names the save that wrote the checkpoint: not a setting)
    extra = {k: v for k, v in q.items() if k not in ("quant_method", "format", "format_version", "algorithm", "bits",
                                                     "group_size", "sym", "act_order", "modules_to_not_convert",
                                                     "module_formats", "save_id")}
    rows += [(k, v) for k, v in sorted(extra.items())]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]) + _allocation_table(q)


def _allocation_table(q: dict) -> str:
    """The per-module format table (mixed precision) as a small summary plus the full list."""
    table = q.get("module_formats") or {}
    if not table:
        return ""

    def setting(e: dict) -> str:
        rest = ", ".join(f"{k}={v}" for k, v in sorted(e.items()) if k not in ("format", "bits", "group_size"))
        return f"{e.get('format')} {e.get('bits')}-bit, group {e.get('group_size')}" + (f" ({rest})" if rest else "")

    counts: dict[str, int] = {}
    for e in table.values():
        counts[setting(e)] = counts.get(setting(e), 0) + 1
    kept = q.get("modules_to_not_convert") or []
    lines = ["", "", "Per-layer allocation (`module_formats` in config.json):", "",
             "| setting | layers |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in sorted(counts.items())]
    lines += [f"| {q.get('format')} {q.get('bits')}-bit, group {q.get('group_size')} | every other quantized layer |"]
    lines += [f"| kept in float | {len(kept)} |"] if kept else []
    lines += ["", "<details><summary>every layer</summary>", "", "| layer | format | bits | group |", "|---|---|---|---|"]
    lines += [f"| {name} | {e.get('format')} | {e.get('bits')} | {e.get('group_size')} |" for name, e in table.items()]
    lines += ["", "</details>"]
    return "\n".join(lines)


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


def update_card_(path: str, repo_id: str | None = None, **metadata) -> None:
    """Edit a card hfcompress wrote (README.md at ``path``) in place: set YAML ``metadata`` fields
    (``base_model``, ``license`` ...; a new ``base_model`` gets its ``base_model_relation``) and name
    ``repo_id`` in the usage snippet. The rest of the card (evaluations ...) is kept."""
    from huggingface_hub import ModelCard

    if not is_generated_card(path):
        raise CardError(f"{path} was not written by hfcompress; it is left as it is")
    card = ModelCard.load(path)
    for key, value in metadata.items():
        setattr(card.data, key, value)
    if metadata.get("base_model") and not getattr(card.data, "base_model_relation", None):
        card.data.base_model_relation = "adapter" if card.data.library_name == "peft" else "quantized"
    if repo_id:  # the usage snippet's own repo (a placeholder, or the repo of an earlier push)
        head, sep, usage = card.text.partition("## Usage")
        for pattern in _USAGE_REPO:
            usage = re.sub(pattern, lambda m: f"{m.group(1)}{repo_id}{m.group(2)}", usage)
        card.text = head + sep + usage
    card.save(path)


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
