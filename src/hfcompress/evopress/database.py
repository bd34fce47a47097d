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
import re
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


#: a level named by its grid: ``"w<bits>g<group_size>"``, optionally ``"-int"`` / ``"-float"`` zero points
LEVEL_NAME = re.compile(r"w(\d+)g(-1|\d+)(?:-(int|float))?")


def parse_level(level, group_size: int, zero_point: str) -> tuple[int, int, str]:
    """``(bits, group_size, zero_point)`` of an integer level: an int is a bit width at the
    config's ``group_size`` and ``zero_point``; ``"w3g64"`` names its group size (zero points the
    config's), ``"w3g64-float"`` / ``"w3g64-int"`` its zero points too."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level, group_size, zero_point
    m = LEVEL_NAME.fullmatch(level) if isinstance(level, str) else None
    if m is None:
        raise ConfigError(f"{level!r} is not a level: give a bit width (int), 'w<bits>g<group_size>' with optional "
                          "'-int' / '-float' zero points (e.g. 'w3g64-float'), or 'float'")
    return int(m.group(1)), int(m.group(2)), m.group(3) or zero_point


def level_config(level, base: str, group_size: int, damp: float, zero_point: str = "int", mse_clip: bool = False):
    """The config that produces one integer level (act-order GPTQ with static groups: no g_idx
    stored). ``zero_point`` and ``mse_clip`` (the searched grid) are EvoPressConfig's; they stay
    integer zeros and min-max grids unless set (the grids of the levels measured first), whatever
    GPTQConfig and RTNConfig default to. A level may name its own group size and zero points
    (:func:`parse_level`)."""
    bits, group_size, zero_point = parse_level(level, group_size, zero_point)
    if base == "gptq":
        return GPTQConfig(bits=bits, group_size=group_size, act_order=True, static_groups=True, damp=damp,
                          mse_clip=mse_clip, zero_point=zero_point)
    return RTNConfig(bits=bits, group_size=group_size, zero_point=zero_point, mse_clip=mse_clip)


@dataclass
class LevelDatabase:
    levels: list                                   # e.g. [2, 3, 4, 8, "float"], increasing size
    specs: list                                    # spec per level (None: float)
    shapes: dict[str, tuple[int, int]]             # module -> (in_features, out_features)
    tensors: dict[str, list[dict[str, torch.Tensor] | None]] = field(default_factory=dict)  # module -> per level
    grid: dict = field(default_factory=dict)       # how the values were fitted beyond the specs ({"mse_clip": True})

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
        if self.grid:  # written only when set: databases of min-max grids stay as they were
            meta["grid"] = self.grid
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(flat, tmp, metadata={"hfcompress.evopress_database": json.dumps(meta)})
        os.replace(tmp, path)  # a killed save never leaves a half-written database

    @classmethod
    def load(cls, path: str, levels: list, specs: list, shapes: dict[str, tuple[int, int]],
             grid: dict | None = None) -> "LevelDatabase":
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
            if meta.get("grid", {}) != (grid or {}):
                raise ConfigError(f"EvoPressConfig.database={path!r} was fitted with grid options "
                                  f"{meta.get('grid', {})}, not {grid or {}}; delete it or point database= elsewhere")
            if {k: tuple(v) for k, v in meta.get("shapes", {}).items()} != shapes:
                raise ConfigError(f"EvoPressConfig.database={path!r} was built for other layers than this model's "
                                  "(names or shapes differ); delete it or point database= elsewhere")
            db = cls(levels, specs, shapes, grid=dict(grid or {}))
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
                   device=None, progress: bool = False, grid: dict | None = None) -> LevelDatabase:
    """Compress every searched layer of ``model`` at every integer level (``configs[j]`` makes
    level ``j``; ``None`` for float), without changing ``model``. ``grid``: the configs' grid
    options beyond the specs, recorded in the database (see :meth:`LevelDatabase.load`)."""
    from ..api import quantize_weight
    from ..calibration.blocks import iterate_blocks

    shapes = searched_layers(model, skip)
    db = LevelDatabase(levels, specs, shapes, {name: [None] * len(levels) for name in shapes}, dict(grid or {}))

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
