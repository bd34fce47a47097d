"""Glue to host libraries (transformers, PEFT, Trainer, Hub). The only place that touches
their internals; everything here is registered by :func:`register_all` (called by
``import hfcompress``) and is idempotent."""

from __future__ import annotations

_DONE = False


def register_all() -> None:
    global _DONE
    if _DONE:
        return
    from . import peft as _peft
    from . import transformers as _transformers

    _transformers.register()
    _peft.register()
    from hfcompress.prune.export import register as _register_pruned  # pruned model types, AutoModelForCausalLM

    _register_pruned()
    from . import hub as _hub  # card on every save/push of a compressed model, atomic saves

    _hub.register()
    _DONE = True
