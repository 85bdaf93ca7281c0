"""Figures for the performance page, drawn from the benchmarks' saved output.

Each figure is read from the markdown tables of one saved run
(``results/bench_overhead/NAME.txt``) and nothing else, so it shows what that run printed:

- a per-step table (``model | n weights | tensors | variant | ms/iter ... | overhead``) gives
  the time per step of each variant relative to no SI, model by model, and the time SI adds
  per step against the number of weights;
- a host-cost table (``parameter tensors | ...``) gives the host time per step against the
  number of parameter tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def tables(text: str) -> list[dict]:
    """The markdown tables of a saved run: ``{"title", "header", "rows"}`` each, the title
    being the last ``# ...`` line before the table."""
    found, title, current = [], "", None
    for line in text.splitlines():
        if line.startswith("# "):
            title = line[2:]
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = {"title": title, "header": cells, "rows": []}
                found.append(current)
            elif not set("".join(cells)) <= set("-:"):
                current["rows"].append(cells)
        else:
            current = None
    return found


def number(cell: str) -> float:
    """The first number of a cell: ``5.69 (5.28-6.42)`` is 5.69, ``0.48M`` is 480000."""
    m = _NUMBER.search(cell.replace(",", ""))
    if m is None:
        return float("nan")
    scale = {"M": 1e6, "k": 1e3, "K": 1e3}.get(cell[m.end():m.end() + 1], 1.0)
    return float(m.group()) * scale


def _colours(names: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    base = sorted({n.replace(" (baseline)", "") for n in names}, key=names.index)
    return {n: cmap(k % 10) for k, n in enumerate(base)}


def per_step_figure(table: dict, heading: str, path: Path) -> Path:
    """Left: time per step relative to no SI, per model and variant (log scale; a
    ``(baseline)`` variant hatched in its variant's colour). Right: milliseconds SI adds per
    step against the number of weights, for the models with the most common tensor count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = {name: k for k, name in enumerate(table["header"])}
    ms_col = next(k for name, k in col.items() if name.startswith("ms/iter"))
    rows = [dict(model=r[col["model"]], weights=number(r[col["n weights"]]),
                 tensors=int(number(r[col["tensors"]])), variant=r[col["variant"]],
                 ms=number(r[ms_col])) for r in table["rows"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "no SI"]
    base_ms = {r["model"]: r["ms"] for r in rows if r["variant"] == "no SI"}
    at = {(r["model"], r["variant"]): r for r in rows}
    colour = _colours(variants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), width_ratios=(1.5, 1),
                                      layout="constrained")
    width = 0.8 / len(variants)
    for k, v in enumerate(variants):
        xs = [i + (k - (len(variants) - 1) / 2) * width for i, m in enumerate(models)
              if (m, v) in at]
        ys = [at[(m, v)]["ms"] / base_ms[m] for m in models if (m, v) in at]
        left.bar(xs, ys, width, color=colour[v.replace(" (baseline)", "")], label=v,
                 hatch="//" if v.endswith("(baseline)") else None, edgecolor="white",
                 linewidth=0.3)
    left.set_yscale("log")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks(range(len(models)), models, fontsize=8)
    left.set_ylabel("time per step / no SI (log scale)")
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
    top = max(at[(m, v)]["ms"] / base_ms[m] for m in models for v in variants if (m, v) in at)
    shown = (1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8) if top < 2.5 else (1.2, 1.5, 2, 3, 5)
    left.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda y, _: f"{y:g}×" if round(y, 3) in shown else ""))
    left.grid(axis="y", which="both", alpha=0.3)
    left.set_title("overhead per case", fontsize=10)
    common = max({r["tensors"] for r in rows}, key=[r["tensors"] for r in rows].count)
    sized = [m for m in models if at[(m, "no SI")]["tensors"] == common]
    sized.sort(key=lambda m: at[(m, "no SI")]["weights"])
    for v in variants:
        pts = [(at[(m, "no SI")]["weights"], at[(m, v)]["ms"] - base_ms[m])
               for m in sized if (m, v) in at]
        if pts:
            right.plot(*zip(*pts), marker="o", color=colour[v.replace(" (baseline)", "")],
                       linestyle="--" if v.endswith("(baseline)") else "-", label=v)
    right.set_xscale("log")
    ticks = sorted({at[(m, "no SI")]["weights"] for m in sized})
    right.set_xticks(ticks, [f"{w / 1e6:.2f}M" for w in ticks])
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_xlabel(f"weights (models of {common} parameter tensors)")
    right.set_ylabel("ms SI adds per step")
    right.grid(alpha=0.3)
    right.set_title("cost against model size", fontsize=10)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)),
               fontsize=8, frameon=False)
    fig.suptitle(heading, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def host_cost_figure(table: dict, heading: str, path: Path) -> Path:
    """Host microseconds per step against the number of parameter tensors, per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if re.fullmatch(r"\d+", r[0])]
    names = table["header"][1:]
    mode = {n: n.split(",")[0].replace(" (baseline)", "") for n in names}  # total, task
    colour = _colours(list(mode.values()))
    fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
    for k, name in enumerate(names):
        baseline = "(baseline)" in name
        ax.plot([int(r[0]) for r in rows], [number(r[k + 1]) for r in rows],
                marker="x" if baseline else "o", alpha=0.5 if baseline else 1.0,
                color=colour[mode[name]], linestyle="--" if "CUDA graphs" in name else "-",
                label=name)
    ax.set_xscale("log")
    ax.set_xticks([int(r[0]) for r in rows], [r[0] for r in rows])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameter tensors")
    ax.set_ylabel("host µs per step (both hooks)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, handlelength=4)  # long enough to tell dashes from a line
    ax.set_title(heading, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(saved: Path, img_dir: Path) -> list[Path]:
    """The figures of one saved run, written as ``img_dir/<run name>[-k].png``."""
    img_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for table in tables(saved.read_text()):
        head = table["header"]
        path = img_dir / f"{saved.stem}{'-' + str(len(out) + 1) if out else ''}.png"
        if {"model", "n weights", "tensors", "variant"} <= set(head) and \
                any(h.startswith("ms/iter") for h in head) and \
                any(r[head.index("variant")] == "no SI" for r in table["rows"]):  # the base
            out.append(per_step_figure(table, f"{saved.stem}: {table['title']}", path))
        elif head and head[0] == "parameter tensors":
            out.append(host_cost_figure(table, f"{saved.stem}: host time by tensor count",
                                        path))
    return out
