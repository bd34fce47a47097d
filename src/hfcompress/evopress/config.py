"""EvoPressConfig: compress to a size. Per-layer bit widths found by evolutionary search
(EvoPress, Sieberling et al., 2024) over a database of levels built with GPTQ (or RTN), written
as one checkpoint with a per-module format table (``module_formats`` in config.json)."""

from __future__ import annotations

import json
import os

import torch

from ..config import ConfigError, HfCompressConfig, _check_dataset, _model_tokenizer, register_algorithm
from ..formats import FormatError, get_format, stored_bits
from ..sizes import parse_size

FLOAT = "float"
LOG_FILE = "evopress_search.json"


@register_algorithm
class EvoPressConfig(HfCompressConfig):
    """Compress to a budget: ``target_bits_per_weight`` (stored bits of every searched linear
    layer, scales and zeros included, divided by their weights) or ``target_size`` (the whole
    checkpoint's tensors: embeddings, norms, biases, float layers, everything), one of the two.

    ``levels``: the per-layer choices in increasing size, each a grid of the ``base`` algorithm
    (``"gptq"``: act-order GPTQ with static groups per layer on the float model's inputs;
    ``"rtn"``: data-free): an integer bit width at ``group_size`` and ``zero_point``, or a named
    grid ``"w<bits>g<group_size>"`` (e.g. ``"w3g64"``; ``"w3g64-float"`` / ``"w3g64-int"`` name
    the zero points too), plus ``"float"`` (layer kept as it is). Every level is a per-module
    setting the checkpoint stores in its format table. ``zero_point`` (default ``"int"``, the
    grids measured first; ``"float"``: fp16 zeros, GPTQConfig's default) and ``mse_clip``
    (default off; on: GPTQ's searched grid, its default) apply to every level. The search: ``generations`` of
    ``offspring`` level-switch mutations each, multi-step ``selection`` ``[[tokens, survivors],
    ..., [tokens, 1]]`` scored by KL divergence to the float model on ``search_samples``
    calibration windows (of ``seq_len`` tokens; ``dataset``/``n_samples`` as in GPTQConfig).
    ``database``: a safetensors file caching the level database (built there if missing);
    ``resample`` (default, the paper's): fresh windows every generation; ``False``: the same windows
    per selection step in every generation, each allocation scored once (a fixed objective that
    cannot drift under small token budgets; it may fit those windows).
    ``resume``: a saved search log to continue from; ``time_limit``: seconds after which no new
    generation starts. ``init``: the starting allocation, ``"uniform"`` (the paper's: the uniform
    level nearest the budget, random layers moved to fit it) or ``"fisher"`` (the allocation that is
    optimal for an additive per-layer proxy, the Fisher-weighted squared error of each level, on
    the first ``search_samples`` windows: a warm start for short searches) or ``"kl"`` (the
    allocation that is optimal for measured single-layer scores: the KL change when one layer alone
    moves one level down or up from the uniform level nearest the budget, ``2 L + 1`` evaluations on
    the first selection step's tokens).
    """

    algorithm = "evopress"
    data_free = False
    #: the search evaluates the whole model: it runs in memory (hfcompress.quantize loads a directory)
    needs_whole_model = True
    options = {
        "target_bits_per_weight": ((float, int), True),
        "target_size": ((str, int), True),
        "levels": ((list, tuple), False),
        "base": ((str,), False),
        "damp": ((float, int), False),
        "dataset": ((str, list, tuple, object), True),
        "n_samples": ((int,), False),
        "seq_len": ((int,), False),
        "search_samples": ((int,), False),
        "generations": ((int,), False),
        "offspring": ((int,), False),
        "selection": ((list, tuple), False),
        "seed": ((int,), False),
        "database": ((str,), True),
        "search_seq_len": ((int,), True),
        "resume": ((str,), True),
        "time_limit": ((float, int), True),
        "init": ((str,), False),
        "mse_clip": ((bool,), False),
        "resample": ((bool,), False),
    }

    def __init__(self, target_bits_per_weight: float | None = None, target_size: str | int | None = None,
                 levels=(2, 3, 4, 8, FLOAT), base: str = "gptq", group_size: int = 128, damp: float = 0.01,
                 dataset=None, n_samples: int = 128, seq_len: int = 512, search_samples: int = 16,
                 generations: int = 50, offspring: int = 16, selection=((512, 4), (2048, 1)), seed: int = 0,
                 database: str | None = None, search_seq_len: int | None = None, resume: str | None = None,
                 time_limit: float | None = None, init: str = "uniform", mse_clip: bool = False,
                 resample: bool = True,
                 bits: int = 4, modules_to_not_convert: list[str] | None = None,
                 tokenizer=None, **kwargs):
        self.tokenizer = tokenizer
        kwargs.pop("act_order", None)
        kwargs.pop("sym", None)
        super().__init__(bits=bits, group_size=group_size, sym=False, act_order=False,
                         modules_to_not_convert=modules_to_not_convert, target_bits_per_weight=target_bits_per_weight,
                         target_size=target_size, levels=list(levels), base=base, damp=damp, dataset=dataset,
                         n_samples=n_samples, seq_len=seq_len, search_samples=search_samples,
                         generations=generations, offspring=offspring,
                         selection=[list(s) if isinstance(s, (list, tuple)) else s for s in selection], seed=seed,
                         database=os.fspath(database) if isinstance(database, os.PathLike) else database,
                         search_seq_len=search_seq_len,
                         resume=os.fspath(resume) if isinstance(resume, os.PathLike) else resume,
                         time_limit=time_limit, init=init, mse_clip=mse_clip, resample=resample,
                         **kwargs)
        _check_dataset(self.dataset)
        if self.base not in ("gptq", "rtn"):
            raise ConfigError(f"quantization_config.base={self.base!r}: the levels are built by 'gptq' or 'rtn'")
        if self.init not in ("uniform", "fisher", "kl"):
            raise ConfigError(f"quantization_config.init={self.init!r}: the starting allocation is 'uniform', 'fisher' "
                              "or 'kl'")
        if self.target_bits_per_weight is not None and not self.target_bits_per_weight > 0:
            raise ConfigError(f"quantization_config.target_bits_per_weight={self.target_bits_per_weight!r} must be > 0")
        if self.target_size is not None:
            parse_size(self.target_size)
        if self.target_size is not None and self.target_bits_per_weight is not None:
            raise ConfigError("quantization_config: give target_bits_per_weight or target_size, not both")
        self.level_specs()  # validates levels
        if self.search_seq_len is not None and not 1 <= self.search_seq_len <= self.seq_len:
            raise ConfigError(f"quantization_config.search_seq_len={self.search_seq_len!r} must be in [1, seq_len]")
        for name in ("n_samples", "seq_len", "search_samples", "generations", "offspring"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quantization_config.{name}={getattr(self, name)!r} must be a positive int")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"quantization_config.damp={self.damp!r} must be in [0, 1)")
        sel = self.selection
        if (not sel or any(not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s))
                           for s in sel) or sel[-1][1] != 1):
            raise ConfigError(f"quantization_config.selection={sel!r} must be [[tokens, survivors], ...] with positive "
                              "ints, the last step keeping 1 survivor (e.g. [[512, 4], [2048, 1]])")
        self.search_log: dict | None = None

    def level_configs(self) -> list:
        """The config that builds each level (``None``: float), in the order of ``levels``."""
        from .database import level_config

        return [None if lv == FLOAT else level_config(lv, self.base, self.group_size, self.damp, self.zero_point,
                                                      self.mse_clip) for lv in self.levels]

    def level_specs(self) -> list:
        """The spec of each level (``None``: float), in the order of ``levels``; validates them:
        distinct, in increasing stored size (bits per weight of a 4096 x 4096 layer), ``"float"``
        last if present."""
        levels = self.levels
        if not levels or len(set(map(str, levels))) != len(levels) or levels.count(FLOAT) > 1 \
                or levels[-1:] != [FLOAT] and FLOAT in levels:
            raise ConfigError(f"quantization_config.levels={levels!r} must be distinct levels in increasing size, "
                              "optionally followed by 'float' (e.g. [2, 3, 4, 8, 'float'] or ['w3g128', 'w3g64', "
                              "'w4g128', 'float'])")
        from .database import level_config

        specs, sizes = [], []
        for i, lv in enumerate(levels):
            if lv == FLOAT:
                specs.append(None)
                continue
            try:
                spec = level_config(lv, self.base, self.group_size, self.damp, self.zero_point, self.mse_clip).spec
            except (ConfigError, FormatError) as e:
                raise ConfigError(f"quantization_config.levels[{i}]={lv!r}: {e}") from None
            specs.append(spec)
            sizes.append((stored_bits(spec, 4096, 4096) / 4096**2, lv))
        for (a, lo), (b, hi) in zip(sizes, sizes[1:]):
            if not b > a:
                raise ConfigError(f"quantization_config.levels={levels!r} must be in increasing size: {hi!r} stores "
                                  f"{b:.4f} bits per weight, not more than {lo!r} before it ({a:.4f})")
        return specs

    @property
    def level_grid(self) -> dict:
        """Grid options of the levels beyond their specs, recorded in a level database."""
        return {"mse_clip": True} if self.mse_clip else {}

    def check_can_quantize(self) -> None:
        if (self.target_bits_per_weight is None) == (self.target_size is None):
            raise ConfigError("EvoPressConfig needs a budget: target_bits_per_weight=... (e.g. 3.0) or "
                              "target_size=... (e.g. '70MB')")

    def _jsonable(self, name: str, value):
        if name == "dataset" and value is not None and not isinstance(value, str):
            return "<in-memory dataset>"
        return value

    # -- the run ------------------------------------------------------------------------------

    def calibrate_(self, model, progress: bool = False, tokenizer=None, batches=None, device=None, **kwargs):
        """Build (or load) the level database, search the allocation, swap the chosen layers in."""
        from ..algorithms.evopress import evopress_search, proxy_allocation
        from .apply import apply_allocation_, budget_bits
        from .database import LevelDatabase, build_database, searched_layers
        from .fitness import KLFitness

        batches = self._batches(model, tokenizer, batches)
        skip = self.modules_to_not_convert or []
        specs = self.level_specs()
        shapes = searched_layers(model, skip)
        if self.database and os.path.isfile(self.database):
            db = LevelDatabase.load(self.database, self.levels, specs, shapes, grid=self.level_grid)
        else:
            db = build_database(model, self.levels, specs, self.level_configs(), self.base, batches, skip,
                                device=device, progress=progress, grid=self.level_grid)
            if self.database:
                db.save(self.database)
        float_bits = torch.finfo(next(iter(model.get_submodule(n) for n in shapes)).weight.dtype).bits
        cost = db.cost_bits(float_bits, headers=self.target_size is not None)  # a size on disk counts headers
        budget, fixed = budget_bits(self, model, db)
        pool = torch.cat(batches)
        if self.search_seq_len:  # shorter windows for the search: each window cut into pieces
            sl = self.search_seq_len
            pool = pool[:, : pool.shape[1] // sl * sl].reshape(-1, sl)
        pool = pool[: self.search_samples]
        initial = self._resume_allocation(shapes) if self.resume else None
        fitness = KLFitness(model, db, pool)
        if initial is None and self.init == "fisher":
            from .fitness import fisher_scores

            initial = proxy_allocation(fisher_scores(fitness), cost, budget)
        elif initial is None and self.init == "kl":
            from .fitness import single_layer_scores

            scores = single_layer_scores(fitness, cost, budget, self.selection[0][0], self.seed)
            initial = proxy_allocation(scores, cost, budget)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.generations, desc="evopress generations", unit="gen")

        def on_generation(record):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{record['fitness']:.4f}")

        generator = torch.Generator().manual_seed(self.seed)
        result = evopress_search(cost, budget, fitness, self.generations, self.offspring,
                                 [tuple(s) for s in self.selection], generator, initial=initial,
                                 on_generation=on_generation, time_limit=self.time_limit,
                                 resample=self.resample)
        if bar is not None:
            bar.close()
        del fitness
        apply_allocation_(self, model, db, result.allocation)
        n_weights = sum(k * n for k, n in shapes.values())
        summary = {"budget_bits": budget, "achieved_bits": result.cost, "fixed_bits": fixed,
                   "achieved_bits_per_weight": result.cost / n_weights, "final_kl": result.fitness,
                   "generations": len(result.log)}
        self.extra = {**self.extra, "evopress": summary}
        self.search_log = {**summary, "levels": self.levels, "target_bits_per_weight": self.target_bits_per_weight,
                           "target_size": self.target_size, "selection": self.selection, "offspring": self.offspring,
                           "seed": self.seed, "init": "resume" if self.resume else self.init, "log": result.log,
                           "allocation": {name: self.levels[j] for name, j in zip(shapes, result.allocation)}}
        return model

    def _resume_allocation(self, shapes) -> list[int]:
        """The allocation of a saved search log (``resume``), as level indices of ``levels``."""
        try:
            with open(self.resume, encoding="utf-8") as f:
                saved = json.load(f)["allocation"]
            return [self.levels.index(saved[name]) for name in shapes]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"quantization_config.resume={self.resume!r} is not a search log of these layers and "
                              f"levels ({type(e).__name__}: {e})") from None

    def _batches(self, model, tokenizer, batches):
        from ..calibration import get_calibration_batches
        from ..calibration.data import token_ids

        if batches is not None:
            return batches
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer is None and token_ids(self.dataset) is None:
            tokenizer = _model_tokenizer(model)
        dataset = None if self.dataset == "<in-memory dataset>" else self.dataset
        return get_calibration_batches(tokenizer, dataset, n_samples=self.n_samples, seq_len=self.seq_len)

    def save_search_log(self, path: str) -> None:
        """Write the search log (targets, budget, per-generation fitness, final allocation) as JSON."""
        if self.search_log is None:
            raise ValueError("no EvoPress search has run with this config")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.search_log, f, indent=1)

    def write_extra_files(self, directory: str) -> None:
        """Called by the writers of a checkpoint directory (CLI, hfcompress.quantize)."""
        if self.search_log is not None:
            self.save_search_log(os.path.join(directory, LOG_FILE))

    # -- CLI --------------------------------------------------------------------------------------

    @classmethod
    def add_cli_arguments(cls, group) -> None:
        group.add_argument("--target-size", default=None, metavar="SIZE",
                           help="evopress: checkpoint size budget, e.g. 70MB or 64MiB (implies --method evopress; default: none, "
                                "give this or --target-bits-per-weight)")
        group.add_argument("--target-bits-per-weight", type=float, default=None, metavar="BITS",
                           help="evopress: average stored bits per weight of the linear layers (implies --method "
                                "evopress; default: none)")
        group.add_argument("--levels", nargs="+", default=None, metavar="LEVEL",
                           help="evopress: bit widths to choose from, plus 'float' (default: 2 3 4 8 float)")
        group.add_argument("--generations", type=int, default=50, help="evopress: search generations")
        group.add_argument("--offspring", type=int, default=16, help="evopress: mutations per generation")
        group.add_argument("--database", default=None, metavar="FILE",
                           help="evopress: cache of the level database (safetensors; built there if missing; default: "
                                "no cache)")

    @classmethod
    def cli_kwargs(cls, args) -> dict:
        levels = None
        if args.levels is not None:
            levels = [lv if lv == FLOAT else int(lv) if lv.isdigit() else lv for lv in args.levels]
        out = dict(target_size=args.target_size, target_bits_per_weight=args.target_bits_per_weight,
                   generations=args.generations, offspring=args.offspring, database=args.database, damp=args.damp,
                   dataset=args.dataset, n_samples=args.n_samples, seq_len=args.seq_len)
        if levels is not None:
            out["levels"] = levels
        return out
