"""Size vs perplexity on SmolLM2-135M-Instruct: every measured entry of benchmarks/results/
evopress.json (EvoPress, uniform GPTQ), bitstack.json (BitStack under each budget) and
quality.json (the other methods with a geometric-mean perplexity), one point each.

    python benchmarks/pareto.py            # -> benchmarks/results/pareto.png

x: stored bits per weight of the linear layers (everything counted); y: geometric mean of the
perplexities over the evaluation domains (log scale); the float model as a horizontal line.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RES = os.path.join(HERE, "results")
CLIP = 1000.0  # perplexities above this are named, not drawn


def points() -> dict[str, list[tuple[float, float, str]]]:
    """method -> [(bits per weight, geomean perplexity, label)]."""
    out: dict[str, list] = {}

    def load(name):
        p = os.path.join(RES, name)
        return json.load(open(p)) if os.path.isfile(p) else {}

    evo = load("evopress.json").get("entries", {})
    for name, r in evo.items():
        if name == "fp32" or "ppl_geomean" not in r:
            continue
        fz = "-fz" in name  # float zero points and the searched grid (GPTQ's defaults since 4271a02)
        if name.startswith("evopress"):
            parts = name.split("-")[1:-1]
            init = ([p for p in parts if p in ("fisher", "kl")] or ["uniform"])[0]
            method = {"uniform": "EvoPress", "fisher": "EvoPress, Fisher warm start",
                      "kl": "EvoPress, KL-score warm start"}.get(init, f"EvoPress ({init})")
            budget = {"s2048": ", selection on 2048 tokens", "f2048": ", fixed 2048-token windows"}
            method += " (float-zero levels" + "".join(budget.get(p, "") for p in parts) + ")" if fz \
                else " (integer-zero GPTQ levels)"
        else:
            method = "uniform GPTQ (database levels)" if name.startswith("db-") else "uniform GPTQ"
            method += ", float zeros" if fz else ""
        out.setdefault(method, []).append((r["bits_per_weight"], r["ppl_geomean"], name))
    for r in load("bitstack.json").get("budgets", {}).values():
        if "ppl_geomean" in r:
            out.setdefault("BitStack", []).append((r["bits_per_weight"], r["ppl_geomean"], ""))
    for r in load("quality.json").get("entries", []):
        if r.get("ppl_geomean") and r.get("bits_per_weight") and r["bits_per_weight"] < 16 and "+" not in r["entry"]:
            out.setdefault("quality.py entries (fp32 compute)", []).append((r["bits_per_weight"], r["ppl_geomean"], r["entry"]))
    return out


def main() -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    off = []  # beyond the chart (e.g. uniform 2-bit): named in a note instead
    groups = {}
    for method, pts in points().items():
        off += [f"{label or method} ({x:.2f} bits: {y:.0f})" for x, y, label in pts if y > CLIP]
        if any(y <= CLIP for _, y, _ in pts):
            groups[method] = [p for p in pts if p[1] <= CLIP]
    if off:
        ax.text(0.01, 0.01, "off the chart: " + "; ".join(off), transform=ax.transAxes, fontsize=6)
    for method, pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                linestyle="-" if method == "BitStack" else "none")
        for x, y, label in pts:
            if label:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    fp = json.load(open(os.path.join(RES, "evopress.json"))).get("entries", {}).get("fp32") \
        if os.path.isfile(os.path.join(RES, "evopress.json")) else None
    if fp:
        ax.axhline(fp["ppl_geomean"], color="gray", linestyle="--", linewidth=1, label="float (bf16)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("stored bits per weight of the linear layers (everything counted)")
    ax.set_ylabel("perplexity, geometric mean of 4 domains")
    ax.set_title("SmolLM2-135M-Instruct: size vs perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(RES, "pareto.png")
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
