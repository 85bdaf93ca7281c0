"""Tables and plots from saved run results (no training): ``python -m experiments report``."""

from __future__ import annotations

import csv
import json
import math
import re
from typing import Optional
from collections import defaultdict
from pathlib import Path

from .options import BENCHMARKS, DATA_SUFFIXES, ONLINE_METHODS, PROTOCOL_SUFFIX
from .presets import PUBLISHED

METHOD_ORDER = ("naive", "si", "si-task", "si-delta_params", "avalanche-si", "avalanche-si-fixed",
                "ewc", "joint",
                # online presets: by how much the policy knows, the boundary reference last
                *ONLINE_METHODS[1:])


class ReportError(ValueError):
    """Results that make no one report (the message says why and what to do)."""


def run_files(out: Path):
    """The run files of a results folder, in the run command's layout
    (``<out>/<benchmark>/<scenario>/<method>/seed<k>.json``): a folder is read, not the disk
    below it."""
    for b in BENCHMARKS:
        yield from sorted(Path(out).glob(f"{b}/*/*/seed*.json"))


def load_results(out: Path) -> list[dict]:
    """The runs saved in a results folder (see :func:`run_files`)."""
    return [json.loads(p.read_text()) for p in run_files(out)]


def mean_sem(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd / math.sqrt(n)


def _method_key(r: dict) -> str:
    return r["run_id"].split("/")[2]


def method_rank(results: list[dict]):
    """Sort key for the method names of a table or plot (run-id method parts): METHOD_ORDER by
    the method that was run, each variant (naive-init_glorot, si-clamp_none, ...) right after
    it, variants of one method by name."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    ran = {_method_key(r): r["config"]["method"] for r in results}
    return lambda name: (order.get(ran[name], 99), order.get(name, 99), name)


def summarize(results: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in results:
        groups[(r["config"]["benchmark"], r["config"]["scenario"], _method_key(r),
                r["config"].get("preset"))].append(r)
    rows = []
    for (bench, scen, method, preset), rs in groups.items():
        acc_m, acc_s = mean_sem([100 * r["final_average_accuracy"] for r in rs])
        fgt_m, fgt_s = mean_sem([100 * r["average_forgetting"] for r in rs])
        pub = PUBLISHED.get((preset, scen, rs[0]["config"]["method"]))  # variants: the method's
        rows.append(dict(benchmark=bench, scenario=scen, method=method, preset=preset or "",
                         seeds=len(rs), accuracy=acc_m, accuracy_sem=acc_s, forgetting=fgt_m,
                         forgetting_sem=fgt_s, si_lambda=rs[0]["config"]["si_lambda"],
                         si_eps=rs[0]["config"]["si_eps"],
                         minutes_per_run=sum(r["seconds"] for r in rs) / len(rs) / 60,
                         published=pub[0] if pub else None,
                         published_sem=pub[1] if pub else None))
    rank = method_rank(results)
    rows.sort(key=lambda r: (r["benchmark"], "tdc".index(r["scenario"][0]), rank(r["method"])))
    return rows


def _pm(m, s) -> str:
    return f"{m:.2f}" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{m:.2f} ± {s:.2f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| benchmark | scenario | method | c | seeds | accuracy % (mean ± SEM) | "
             "forgetting % | published | min/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = "" if r["published"] is None else _pm(r["published"], r["published_sem"])
        c = f"{r['si_lambda']:g}" if "si" in r["method"] else ""
        lines.append(f"| {r['benchmark']} | {r['scenario']} | {r['method']} | {c} | {r['seeds']} | "
                     f"{_pm(r['accuracy'], r['accuracy_sem'])} | "
                     f"{_pm(r['forgetting'], r['forgetting_sem'])} | {pub} | "
                     f"{_minutes(r['minutes_per_run'])} |")
    return "\n".join(lines) + "\n"


def _minutes(m: float) -> str:
    """Two significant digits, so that a run of seconds does not read 0.0."""
    return f"{m:.0f}" if m >= 10 else f"{m:.1f}" if m >= 1 else f"{m:.2f}"


def paired(results: list[dict]) -> list[dict]:
    """Differences in final accuracy on the same seeds (same data order, same task split).

    Every method against ``naive``, and every SI variant (``si-...``) and Avalanche's plugin
    with its aliasing fixed (``avalanche-si-fixed``: its λ/2 and Ω cap against ours) against
    ``si``: the mean
    ± SEM over seeds of (method − reference) in points, which is much less noisy than the
    difference of two means when seeds vary a lot (Domain-IL). A run on other tasks (a suffix
    in ``options.DATA_SUFFIXES``, e.g. ``-vdv_order``) is compared with the reference that has the
    same suffix, i.e. on the same tasks. A run with another initialisation (``-init_glorot``)
    or loss (``-loss_keras``) is compared with Naive (and SI) from the same initialisation and
    loss, and also with the same method without one of those changes, one at a time.
    """
    acc = defaultdict(dict)
    for r in results:
        key = (r["config"]["benchmark"], r["config"]["scenario"], r["config"].get("preset"))
        acc[key, _method_key(r)][r["config"]["seed"]] = 100 * r["final_average_accuracy"]
    rows = []
    for (key, method), by_seed in acc.items():
        data = "".join(s for s in DATA_SUFFIXES if s in method)
        bare = method
        for s in DATA_SUFFIXES:
            bare = bare.replace(s, "")
        against_si = bare.startswith("si-") or bare == "avalanche-si-fixed"
        changes = PROTOCOL_SUFFIX.findall(bare)  # the network start and loss, e.g. -init_glorot
        protocol = "".join(changes)
        refs = ["naive" + protocol + data] + (["si" + protocol + data] if against_si else [])
        # also against the same method without one of those changes, one at a time
        for change in changes:
            ref = method.replace(change, "", 1)
            if ref not in refs:
                refs.append(ref)
        for ref in refs:
            base = acc.get((key, ref), {})
            seeds = sorted(set(by_seed) & set(base))
            if method == ref or not seeds:
                continue
            m, sem = mean_sem([by_seed[k] - base[k] for k in seeds])
            rows.append(dict(benchmark=key[0], scenario=key[1], method=method, reference=ref,
                             seeds=len(seeds), difference=m, difference_sem=sem))
    rank = method_rank(results)
    rows.sort(key=lambda r: (r["benchmark"], "tdc".index(r["scenario"][0]),
                             not r["reference"].startswith("naive"), rank(r["method"])))
    return rows


def paired_table(rows: list[dict]) -> str:
    lines = ["| benchmark | scenario | method | minus | seeds | accuracy difference, points "
             "(mean ± SEM over seeds) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['scenario']} | {r['method']} | {r['reference']} | "
                     f"{r['seeds']} | {_pm(r['difference'], r['difference_sem'])} |")
    return "\n".join(lines) + "\n"


#: A README block that holds a copy of a results file: the opening comment names the file
#: (relative to the README's folder), the closing one ends the copy.
README_BLOCK = re.compile(r"(<!-- copy of (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end of copy -->)",
                          re.S)


def _section(text: str, name: str) -> Optional[str]:
    """The text between ``<!-- start of NAME -->`` and ``<!-- end of NAME -->``, or None."""
    m = re.search(rf"<!-- start of {re.escape(name)} -->\n(.*?)<!-- end of {re.escape(name)} -->",
                  text, re.S)
    return None if m is None else m[1]


def readme_copies(readme: Path, root: Optional[Path] = None) -> list[tuple[str, str, str]]:
    """Each ``(source, body in the page, current source text)`` of a page's copied blocks:
    ``<!-- copy of PATH -->`` (a whole file) or ``<!-- copy of PATH#NAME -->`` (its section
    NAME), PATH relative to ``root`` (default: the page's folder). The README copies result
    tables; docs pages copy the README's quick start and the changelog, so that each reads
    whole on a code host too.

    Raises ``FileNotFoundError`` (naming the block) if a block names a file or section that is
    not there.
    """
    readme = Path(readme)
    root = readme.parent if root is None else Path(root)
    blocks = []
    for m in README_BLOCK.finditer(readme.read_text()):
        path, _, name = m["path"].partition("#")
        src = root / path
        if not src.is_file():
            raise FileNotFoundError(f"{readme} copies {path}, which does not exist; run "
                                    f"`python -m experiments report` for its folder, or remove "
                                    f"the block.")
        text = src.read_text()
        if name:
            text = _section(text, name)
            if text is None:
                raise FileNotFoundError(f"{readme} copies the section {name!r} of {path}, which "
                                        f"has no '<!-- start of {name} -->' ... '<!-- end of "
                                        f"{name} -->'.")
        blocks.append((m["path"], m["body"], text))
    return blocks


def refresh_readme(readme: Path, root: Optional[Path] = None) -> list[str]:
    """Replace every ``<!-- copy of PATH -->`` block of ``readme`` by PATH's current text.

    So the README's result tables are the files ``write_report`` wrote from the runs, never
    typed by hand (a test checks they still agree). Returns the paths whose copy changed.
    """
    readme = Path(readme)
    current = {path: text for path, _, text in readme_copies(readme, root)}
    text = readme.read_text()
    changed = sorted({m["path"] for m in README_BLOCK.finditer(text)
                      if m["body"] != current[m["path"]]})
    new = README_BLOCK.sub(lambda m: m[1] + current[m["path"]] + m[4], text)
    if new != text:
        readme.write_text(new)
    return changed


def _folders_with_results(out: Path) -> str:
    """For the error on a folder without results (a mistyped --out): the folders beside it,
    and under results/, that have some."""
    near = set()
    for base in (out.parent, Path("results")):
        if base.is_dir():
            near |= {str(child) for child in base.iterdir()
                     if child.is_dir() and child != out and next(run_files(child), None)}
    return f"; folders with results: {', '.join(sorted(near))}" if near else ""


def write_report(out: Path) -> dict:
    """Write summary.csv, summary.md and the plots into ``out``; return the paths."""
    out = Path(out)
    results = load_results(out)
    if not results:
        raise FileNotFoundError(f"no results (seed*.json) under {out.resolve()}; run `python -m "
                                f"experiments run --out {out}` first{_folders_with_results(out)}.")
    kinds = defaultdict(set)  # an online stream's runs and a task stream's make no one plot
    for r in results:
        kinds[(r["config"]["benchmark"], r["config"]["scenario"])].add(
            (r["config"].get("stream", "tasks"), str(r["config"].get("preset"))))
    mixed = next((k for k, v in sorted(kinds.items()) if len({s for s, _ in v}) > 1), None)
    if mixed:  # e.g. --out results: every protocol's runs at once
        presets = sorted({p for _, p in kinds[mixed]})
        raise ReportError(f"{out} holds runs of {mixed[0]} ({mixed[1]}) on both online and "
                          f"task streams (presets {', '.join(presets)}); report each results "
                          "folder on its own (--out results/<preset>).")
    rows = summarize(results)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "summary.md").write_text(markdown_table(rows))
    pairs = paired(results)
    (out / "paired.md").write_text(paired_table(pairs))
    plots = write_plots(out, results)
    print(markdown_table(rows))
    if pairs:
        print(paired_table(pairs))
    print(f"tables: {out / 'summary.md'}, {out / 'paired.md'}, {out / 'summary.csv'}; plots: "
          f"{len(plots)} PNG in {out / 'plots'}")
    return {"summary_md": out / "summary.md", "summary_csv": out / "summary.csv",
            "paired_md": out / "paired.md", "plots": plots}


_STYLES = [dict(linestyle="-", marker="o", markersize=7, markerfacecolor="none"),
           dict(linestyle="--", marker="s", markersize=4),
           dict(linestyle=":", marker="^", markersize=5),
           dict(linestyle="-.", marker="D", markersize=3),
           dict(linestyle=(0, (5, 1)), marker="v", markersize=4),
           dict(linestyle=(0, (1, 1)), marker="x", markersize=6)]


def _style(k: int) -> dict:
    """Line styles that keep identical curves apart (Avalanche's SI equals Naive's curve
    exactly in several tables: drawn solid with hollow markers under a dashed one)."""
    return dict(_STYLES[k % len(_STYLES)], linewidth=1.6)


def _band(ax, xs, runs_values, label, k):
    stats = [mean_sem(list(v)) for v in zip(*runs_values)]
    m = [s[0] for s in stats]
    e = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
    ax.plot(xs, m, label=label, zorder=3 + k, **_style(k))
    ax.fill_between(xs, [a - b for a, b in zip(m, e)], [a + b for a, b in zip(m, e)], alpha=0.15)


def _short(layer: str, width: int = 34) -> str:
    """A parameter name that fits a panel title: its last components."""
    parts = layer.split(".")
    out = parts[-1]
    for p in reversed(parts[:-1]):
        if len(p) + 1 + len(out) > width:
            return "…" + out
        out = p + "." + out
    return out


def write_plots(out: Path, results: list[dict], *, plot_dir=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir) if plot_dir is not None else out / "plots"
    plot_dir.mkdir(exist_ok=True)
    paths = []
    by_setting = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_setting[(r["config"]["benchmark"], r["config"]["scenario"])][_method_key(r)].append(r)
    rank = method_rank(results)
    for (bench, scen), methods in sorted(by_setting.items()):
        names = sorted(methods, key=rank)
        online = any("stream_accuracy" in r for rs in methods.values() for r in rs)
        title = f"{bench}, {scen}-incremental"
        # 1. mean accuracy: on the tasks seen so far as tasks arrive, or, on an online
        # stream, on all tasks as the stream goes by
        fig, ax = plt.subplots(figsize=(8.2, 4.2))
        for k, method in enumerate(names):
            rs = methods[method]
            if online:
                xs = [it for it, _ in rs[0]["stream_accuracy"]]
                curves = [[100 * _mean([a for a in row if a is not None])
                           for _, row in r["stream_accuracy"]] for r in rs]
                style_xs = xs
            else:
                T = len(rs[0]["accuracy_matrix"])
                curves = [[100 * sum(r["accuracy_matrix"][i][: i + 1]) / (i + 1)
                           for i in range(T)] for r in rs]
                style_xs = list(range(1, T + 1))
            _band(ax, style_xs, curves, f"{method} (n={len(rs)})", k)
        if online:
            for b in methods[names[0]][0].get("boundaries", [])[:-1]:
                ax.axvline(b, color="grey", linewidth=0.6, alpha=0.5)
            ax.set(xlabel="training iteration (grey: where the task changes)",
                   ylabel="mean accuracy on all tasks (%)")
        else:
            ax.set(xlabel="tasks trained", ylabel="mean accuracy on tasks seen (%)",
                   xticks=style_xs)
        ax.set_title(f"{title}\nmean over seeds, band ± SEM", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        paths.append(_save(fig, plot_dir / f"{bench}_{scen}_average_accuracy.png"))
        # 2. accuracy matrices, mean over seeds, one panel per method, at most three to a
        # row (two for ten tasks): a page shows the figure at about 1000 px, where a row of
        # seven panels made thumbnails with illegible numbers
        n_tasks = max(len(rs[0]["accuracy_matrix"][0]) for rs in methods.values())
        ncols = min(3 if n_tasks <= 5 else 2, len(names))  # ten columns of numbers need room
        nrows = -(-len(names) // ncols)
        side = 3.1 if n_tasks <= 5 else 4.5
        fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 1.3, side * nrows + 0.5),
                                 squeeze=False, layout="constrained")
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for p_i, (ax, method) in enumerate(zip(axes.flat, names)):
            rs = methods[method]
            rows, cols = len(rs[0]["accuracy_matrix"]), len(rs[0]["accuracy_matrix"][0])
            cell_font = 9 if cols <= 5 else 8
            mat = [[float("nan") if rs[0]["accuracy_matrix"][i][j] is None else
                    100 * sum(r["accuracy_matrix"][i][j] for r in rs) / len(rs)
                    for j in range(cols)] for i in range(rows)]
            im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
            for i in range(rows):
                for j in range(cols):
                    if not math.isnan(mat[i][j]):
                        ax.text(j, i, f"{mat[i][j]:.0f}", ha="center", va="center",
                                fontsize=cell_font,
                                color="white" if mat[i][j] < 60 else "black")
            ax.set(title=_wrap_name(f"{method} (n={len(rs)})"), xlabel="evaluated on task",
                   xticks=range(cols), xticklabels=range(1, cols + 1), yticks=range(rows),
                   yticklabels=range(1, rows + 1))
            ax.title.set_fontsize(9)
            if p_i % ncols == 0:
                ax.set_ylabel("after task boundary" if online else "after training task")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8 if nrows == 1 else 0.5,
                     label="accuracy % (mean over seeds)")
        fig.suptitle(f"{title}: accuracy matrix", fontsize=10)
        paths.append(_save(fig, plot_dir / f"{bench}_{scen}_accuracy_matrix.png"))
        # 3. distribution of Ω per layer after each task (SIPlugin runs, first seed)
        for method in names:
            rs = [r for r in methods[method] if r.get("omega")]
            if not rs:
                continue
            r = min(rs, key=lambda r: r["config"]["seed"])
            layers = [k for k in r["omega"][0] if k.endswith("weight")] or list(r["omega"][0])
            fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.2),
                                     squeeze=False)
            lo, hi = r["omega"][0][layers[0]]["log10_range"]
            for ax, layer in zip(axes[0], layers):
                for t, snap in enumerate(r["omega"]):
                    if layer not in snap:
                        continue
                    h = snap[layer]["log10_hist"]
                    edges = [lo + (hi - lo) * k / len(h) for k in range(len(h) + 1)]
                    ax.stairs(h, edges, label=f"after task {t + 1}")
                ax.set(xlabel="log10 Ω", ylabel="weights")
                ax.set_title(_short(layer), fontsize=9)
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"{bench}, {scen}, {method} (seed {r['config']['seed']}): Ω per layer",
                         fontsize=10)
            fig.tight_layout()
            paths.append(_save(fig, plot_dir / f"{bench}_{scen}_{method}_omega.png"))
    return paths


def _wrap_name(name: str, width: int = 28) -> str:
    """A long run name (si-task-clamp_total-init_glorot) on lines of about ``width``
    characters, broken after a hyphen, so that panel titles side by side do not overlap."""
    lines = [""]
    for part in name.replace("-", "-\n").split("\n"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
