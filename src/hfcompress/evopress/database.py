"""EvoPress's level database: every searched linear layer compressed at every level, once.

Levels are the config's ``levels`` in increasing size: integer bit widths (the base
algorithm's format at that width, ``group_size`` of the config) and ``"float"`` (the layer
kept as it is). With ``base="gptq"`` every layer is quantized by GPTQ on the Hessian of its
*float* model inputs (one pass over the float model collects them), so the levels of different
layers can be combined freely; ``base="rtn"`` rounds data-free.

A database can be saved to and loaded from one safetensors file (``path``): tensors named
``"<level>:<module>.<tensor>"`` plus JSON metadata (levels, their specs, layer shapes); loading
refuses a file built for other levels or another model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError, GPTQConfig, RTNConfig
from ..formats import get_format, stored_bits
from ..modules import linear_modules, linear_shape, linear_weight

FLOAT = "float"
DB_VERSION = 1


def header_bytes(key: str) -> int:
    """Bytes one tensor adds to a saved shard's header: its safetensors entry (name, dtype,
    shape, offsets) and its digest in the metadata (hfcompress.integrity); a close upper bound."""
    return 2 * len(key) + 150


def level_config(level, base: str, group_size: int, damp: float):
    """The config that produces one integer level (act-order GPTQ with static groups: no g_idx
    stored). Levels keep integer zero points (the grids EvoPress's sizes and searches were
    measured with; also what compressed-tensors export reads), not the float zeros that GPTQConfig
    and RTNConfig default to."""
    if base == "gptq":
        return GPTQConfig(bits=level, group_size=group_size, act_order=True, static_groups=True, damp=damp,
                          mse_clip=False, zero_point="int")
    return RTNConfig(bits=level, group_size=group_size, zero_point="int")


@dataclass
class LevelDatabase:
    levels: list                                   # e.g. [2, 3, 4, 8, "float"], increasing size
    specs: list                                    # spec per level (None: float)
    shapes: dict[str, tuple[int, int]]             # module -> (in_features, out_features)
    tensors: dict[str, list[dict[str, torch.Tensor] | None]] = field(default_factory=dict)  # module -> per level

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def cost_bits(self, float_bits: int, headers: bool = False) -> list[list[float]]:
        """``[layer][level]`` stored bits (bias excluded: it is the same at every level);
        the float level costs ``float_bits`` per weight. ``headers``: add each tensor's entry in
        the safetensors header (a checkpoint's size on disk counts everything)."""
        out = []
        for name, (k, n) in self.shapes.items():
            row = []
            for s in self.specs:
                bits = float(n * k * float_bits) if s is None else float(stored_bits(s, n, k))
                if headers:
                    names = ["weight"] if s is None else list(s.tensors(n, k))
                    bits += 8 * sum(header_bytes(f"{name}.{t}") for t in names)
                row.append(bits)
            out.append(row)
        return out

    def layer(self, name: str, level: int, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        """The compressed layer of ``name`` at integer level index ``level``."""
        spec = self.specs[level]
        k, n = self.shapes[name]
        layer = get_format(spec).layer_cls(k, n, bias is not None, spec, compute_dtype=compute_dtype)
        layer.load_packed(**self.tensors[name][level])
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(compute_dtype))
        return layer

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        flat = {f"{j}:{name}.{t}": v.contiguous() for name, per in self.tensors.items()
                for j, d in enumerate(per) if d is not None for t, v in d.items()}
        meta = {"version": DB_VERSION, "levels": self.levels,
                "specs": [None if s is None else {"format": get_format(s).name, **s.to_dict()} for s in self.specs],
                "shapes": {k: list(v) for k, v in self.shapes.items()}}
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(flat, tmp, metadata={"hfcompress.evopress_database": json.dumps(meta)})
        os.replace(tmp, path)  # a killed save never leaves a half-written database

    @classmethod
    def load(cls, path: str, levels: list, specs: list, shapes: dict[str, tuple[int, int]]) -> "LevelDatabase":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get("hfcompress.evopress_database")
            if raw is None:
                raise ConfigError(f"EvoPressConfig.database={path!r} is not an EvoPress level database")
            meta = json.loads(raw)
            want = [None if s is None else {"format": get_format(s).name, **s.to_dict()} for s in specs]
            if meta.get("levels") != levels or meta.get("specs") != want:
                raise ConfigError(f"EvoPressConfig.database={path!r} holds levels {meta.get('levels')} "
                                  f"({meta.get('specs')}), not {levels} ({want}); delete it or point database= "
                                  "elsewhere to build a new one")
            if {k: tuple(v) for k, v in meta.get("shapes", {}).items()} != shapes:
                raise ConfigError(f"EvoPressConfig.database={path!r} was built for other layers than this model's "
                                  "(names or shapes differ); delete it or point database= elsewhere")
            db = cls(levels, specs, shapes)
            per: dict[str, list] = {name: [None if s is None else {} for s in specs] for name in shapes}
            for key in f.keys():
                j, _, rest = key.partition(":")
                name, _, t = rest.rpartition(".")
                per[name][int(j)][t] = f.get_tensor(key)
            db.tensors = per
        return db


def searched_layers(model: nn.Module, skip: list[str]) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the layers the search allocates."""
    return {name: linear_shape(m) for name, m in linear_modules(model, skip)}


@torch.no_grad()
def build_database(model: nn.Module, levels: list, specs: list, configs: list, base: str, batches, skip: list[str],
                   device=None, progress: bool = False) -> LevelDatabase:
    """Compress every searched layer of ``model`` at every integer level (``configs[j]`` makes
    level ``j``; ``None`` for float), without changing ``model``."""
    from ..api import quantize_weight
    from ..calibration.blocks import iterate_blocks

    shapes = searched_layers(model, skip)
    db = LevelDatabase(levels, specs, shapes, {name: [None] * len(levels) for name in shapes})

    def store(name: str, j: int, layer) -> None:
        db.tensors[name][j] = {t: v.detach().cpu().clone() for t, v in layer.stored_tensors().items()}

    done: set[str] = set()
    if base == "gptq":
        for step in iterate_blocks(model, batches, skip=skip, device=device, progress=progress,
                                   desc="evopress level database"):
            stats = step.collect_input_stats()  # inputs of the float model: nothing is swapped
            by_input: dict[int, list[str]] = {}
            for rel in step.linear_names:
                by_input.setdefault(id(stats[rel]), []).append(rel)
            for rels in by_input.values():
                H = stats[rels[0]].hessian()
                for j, cfg in enumerate(configs):
                    if cfg is None:
                        continue
                    qs = cfg.quantize_group({f"{step.name}.{r}": step.module(r) for r in rels}, H,
                                            where=f"{step.name}.{'/'.join(rels)}")
                    for full, q in qs.items():
                        store(full, j, q)
            done |= {f"{step.name}.{r}" for r in step.linear_names}
            del stats
    for name, module in linear_modules(model, skip):
        if name in done:
            continue  # layers outside the blocks (or every layer with base="rtn"): data-free
        for j, cfg in enumerate(configs):
            if cfg is not None:
                store(name, j, cfg.fallback_layer(module, name) if base == "gptq"
                      else quantize_weight(linear_weight(module), None, cfg, spec=cfg.spec))
    return db
