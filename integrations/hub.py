"""Save and push hooks: every save/push of an hfcompress-compressed model writes its card.

transformers' ``push_to_hub`` saves into a temporary folder and then *replaces* README.md
with a generic card (PeftModel inherits the same method), so a hook inside
``save_pretrained`` alone cannot give pushed models their card. ``register`` therefore wraps,
once and at class level:

* ``PreTrainedModel.save_pretrained`` / ``push_to_hub`` — for models whose ``hf_quantizer`` is
  hfcompress's (loaded with ``from_pretrained``, or quantized with ``hfcompress.quantize_``);
* ``PeftModel.save_pretrained`` / ``push_to_hub`` — for adapters on such a base.

Every other model goes straight to the original methods. For ours: the save is atomic
(:func:`hfcompress.hub.atomic_save`), README.md is rendered by :mod:`hfcompress.hub`
(``card_data=`` adds user data), and a push saves that folder and uploads it with
``private`` / ``revision`` / ``create_pr`` passed through; a hand-written card already in the
repo is kept as ORIGINAL_README.md.
"""

from __future__ import annotations

import contextvars
import functools
import os

from hfcompress import hub, integrity
from hfcompress.config import HfCompressConfig

#: identity of the save in progress in this context: every shard transformers writes meanwhile
#: carries it (and its tensors' digests) in its safetensors metadata
_SAVE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("hfcompress_save_id", default=None)

_ORIGINAL: dict[str, object] = {}
_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "token", "revision")


def is_compressed(model) -> bool:
    from .transformers import HfCompressQuantizer

    if isinstance(getattr(model, "hf_quantizer", None), HfCompressQuantizer):
        return True
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    return isinstance(q, HfCompressConfig)


def _is_adapter_on_compressed(peft_model) -> bool:
    get_base = getattr(peft_model, "get_base_model", None)
    return get_base is not None and is_compressed(get_base())


def _check_safe(kwargs: dict, where: str) -> None:
    if kwargs.get("safe_serialization") is False:
        raise ValueError(f"{where}(safe_serialization=False): hfcompress checkpoints are safetensors only "
                         "(pickle can run code on load); drop the argument")


def _save(self, save_directory, *args, card_data=None, push_to_hub=False, adapter=False, original=None, **kwargs):
    _check_safe(kwargs, "save_pretrained")
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    card_data = dict(card_data or {})

    qconfig = getattr(getattr(self, "config", None), "quantization_config", None)
    save_id = integrity.new_save_id() if isinstance(qconfig, HfCompressConfig) else None

    def write(tmp):
        if save_id is None:
            original(self, tmp, *args, **kwargs)
        else:  # config.json and every shard record the same identity
            previous, qconfig.save_id = qconfig.save_id, save_id
            token = _SAVE_ID.set(save_id)
            try:
                original(self, tmp, *args, **kwargs)
            finally:
                _SAVE_ID.reset(token)
                qconfig.save_id = previous
        if adapter:  # PEFT's generic card; ours replaces it (a user's card in the old directory is kept)
            generated = os.path.join(tmp, "README.md")
            if os.path.isfile(generated):
                os.remove(generated)

    def finish(tmp):
        hub.write_card_(tmp, self, card_data, adapter=adapter)

    hub.atomic_save(save_directory, write, finish)
    if push_to_hub:
        repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(os.fspath(save_directory))))
        return hub.push_folder(os.fspath(save_directory), repo_id, **hub_kwargs)
    return None


def _push(self, repo_id, *, commit_message=None, commit_description=None, private=None, token=None, revision=None,
          create_pr=False, max_shard_size="50GB", tags=None, card_data=None, adapter=False, **kwargs):
    from huggingface_hub import HfApi

    _check_safe(kwargs, "push_to_hub")
    repo_id = HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card_data = dict(card_data or {})
    card_data.setdefault("repo_id", repo_id)
    if tags:
        card_data["tags"] = list(card_data.get("tags") or []) + ([tags] if isinstance(tags, str) else list(tags))
    from hfcompress.hub.scratch import scratch_dir

    with scratch_dir("push") as tmp:  # a push killed midway leaves nothing here for long (#20)
        folder = os.path.join(tmp, "checkpoint")
        os.makedirs(folder)
        hub.fetch_previous_cards_(repo_id, folder, revision=revision if revision and
                                  not revision.startswith("refs/pr/") else None, token=token)
        save_kwargs = {} if adapter else {"max_shard_size": max_shard_size}
        self.save_pretrained(folder, card_data=card_data, **save_kwargs, **kwargs)
        return hub.push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                               commit_description=commit_description, token=token, create_pr=create_pr,
                               create=False)


def _wrap_save(original, test, adapter: bool):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, card_data=None, **kwargs):
        if adapter:
            _lora_storage_dtype(self, kwargs)
        if not test(self):
            if card_data is not None:
                raise TypeError("save_pretrained(card_data=...) is only for hfcompress-compressed models")
            return original(self, save_directory, *args, **kwargs)
        return _save(self, save_directory, *args, card_data=card_data, adapter=adapter, original=original, **kwargs)

    save_pretrained.__hfcompress_original__ = original
    return save_pretrained


def _lora_storage_dtype(peft_model, kwargs: dict) -> None:
    """An adapter from ``hfcompress.compensate`` saves its LoRA weights in the storage dtype it
    chose (fp16 by default; PEFT loads them back into fp32 parameters)."""
    from hfcompress.adapters.eora import SAVE_DTYPE_ATTR

    dtype = getattr(peft_model, SAVE_DTYPE_ATTR, None)
    if dtype is None or "state_dict" in kwargs:
        return
    kwargs["state_dict"] = {k: v.to(dtype) if "lora_" in k and v.is_floating_point() else v
                            for k, v in peft_model.state_dict().items()}


def _wrap_push(original, test, adapter: bool):
    @functools.wraps(original)
    def push_to_hub(self, repo_id, *args, card_data=None, **kwargs):
        if not test(self):
            if card_data is not None:
                raise TypeError("push_to_hub(card_data=...) is only for hfcompress-compressed models")
            return original(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub of an hfcompress model takes its options by keyword (private=, revision=...)")
        return _push(self, repo_id, card_data=card_data, adapter=adapter, **kwargs)

    push_to_hub.__hfcompress_original__ = original
    return push_to_hub


def _install(cls, test, adapter: bool) -> None:
    for name, wrap in (("save_pretrained", _wrap_save), ("push_to_hub", _wrap_push)):
        current = cls.__dict__.get(name) or getattr(cls, name)
        if getattr(current, "__hfcompress_original__", None) is not None:
            continue  # already wrapped
        setattr(cls, name, wrap(current, test, adapter))


def _wrap_safe_save_file(original):
    @functools.wraps(original)
    def safe_save_file(tensors, filename, metadata=None):
        save_id = _SAVE_ID.get()
        if save_id is not None:
            metadata = {**(metadata or {}), **integrity.identity_metadata(tensors, save_id)}
        return original(tensors, filename, metadata=metadata)

    safe_save_file.__hfcompress_original__ = original
    return safe_save_file


def register() -> None:
    from peft import PeftModel
    from transformers import PreTrainedModel, modeling_utils

    if getattr(modeling_utils.safe_save_file, "__hfcompress_original__", None) is None:
        modeling_utils.safe_save_file = _wrap_safe_save_file(modeling_utils.safe_save_file)

    _install(PreTrainedModel, is_compressed, adapter=False)
    _install(PeftModel, _is_adapter_on_compressed, adapter=True)
