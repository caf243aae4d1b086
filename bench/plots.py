"""Plots of the benchmark results: ``<scenario>.png`` next to ``<scenario>.json``, linked from
``<scenario>.md``. ``bench/run.py`` calls this after every scenario; the plots can be drawn
again from saved JSON at any time (from the repository's root):

    python -m bench.plots                          # every bench/results/*.json
    python -m bench.plots bench/results/tmp        # every *.json in a directory
    python -m bench.plots bench/results/tps.json   # one file (or several)

matplotlib is an optional extra (``pip install -e '.[bench]'``; ``make bench`` installs it).
The non-interactive Agg backend is used: no display needed. What is drawn, per scenario:

* tps, churn: tps per case and target, with trioproxy's ratio to PgBouncer (for ``-M
  prepared``: to PgBouncer in session mode) above its bars; latency (average, with the
  stddev as an error bar for tps; average connection time for churn); the pooler's CPU µs per
  transaction, summed over all its processes.
* connect_latency: p50/p95/p99 per target, plain and TLS; CPU µs per connection.
* memory: the pooler's RSS in all and per idle client; CPU µs per login.
* storm: successful loops per second, latency p50/p95/p99 and the pooler's CPU µs per loop,
  per client count and target (medians over the repetitions).

A run that could not take place is drawn as a hatched outline marked "cannot run" (a
reference that cannot run the workload, such as PgBouncer in transaction mode with ``-M
prepared``) or "FAILED" (trioproxy), never as a zero.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from matplotlib.axes import Axes

RESULTS = Path(__file__).resolve().parent / "results"
SESSION = "pgbouncer session"
COLORS = {
    "direct": "#9e9e9e",
    "pgbouncer": "#1f77b4",
    SESSION: "#8fbbe0",
    "trioproxy": "#ff7f0e",
    "trioproxy w=1": "#ff7f0e",
    "trioproxy w=2": "#d62728",
    "trioproxy w=3": "#9467bd",
    "trioproxy w=4": "#8c564b",
}
LABELS = {"pgbouncer": "PgBouncer (transaction)", SESSION: "PgBouncer (session)"}

Value: TypeAlias = "Callable[[str, str], float | None]"  # (group, target) -> value


def color(target: str) -> str:
    return COLORS.get(target, "#e377c2")


def is_trioproxy(name: str) -> bool:
    return name.startswith("trioproxy")


def failure_word(target: str) -> str:
    return "cannot run" if target.startswith("pgbouncer") else "FAILED"


def in_order(targets: Sequence[str]) -> list[str]:
    """References first (direct, PgBouncer, PgBouncer in session mode), then trioproxy by
    worker count."""

    def key(name: str) -> tuple[int, int, str]:
        if name.startswith("trioproxy w="):
            digits = name.removeprefix("trioproxy w=")
            return (3, int(digits) if digits.isdigit() else 99, name)
        return ({"direct": 0, "pgbouncer": 1, SESSION: 2, "trioproxy": 3}.get(name, 4), 0, name)

    return sorted(dict.fromkeys(targets), key=key)


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def wrap(text: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


# ============================================================================================
# Drawing helpers


def grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    targets: Sequence[str],
    value: Value,
    *,
    failed: Callable[[str, str], bool] = lambda _g, _t: False,
    present: Callable[[str, str], bool] = lambda _g, _t: True,
    error: Value | None = None,
    note: Callable[[str, str], str | None] = lambda _g, _t: None,
    ylabel: str,
    title: str,
    digits: int = 0,
) -> None:
    """Bars per group (x) and target (colour); a failed run is a hatched outline with its
    word, a target absent from a group leaves a gap. ``note``: text above a bar (ratios)."""
    shown = {g: [t for t in targets if present(g, t)] for g in groups}
    width = min(0.8 / max([1, *(len(v) for v in shown.values())]), 0.3)
    heights = [
        v + ((error(g, t) or 0.0) if error else 0.0)
        for g in groups
        for t in targets
        if present(g, t) and (v := value(g, t)) is not None
    ]
    top = max(heights, default=1.0) or 1.0
    for i, group in enumerate(groups):
        for j, target in enumerate(shown[group]):  # the bars of a group are centred on it
            x = i + width * (j - (len(shown[group]) - 1) / 2)
            if failed(group, target):
                ax.bar(
                    x,
                    top * 0.3,
                    width,
                    fill=False,
                    hatch="///",
                    edgecolor=color(target),
                )
                ax.text(
                    x,
                    top * 0.02,
                    failure_word(target),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="#222222",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
                )
                continue
            height = value(group, target)
            if height is None:
                continue
            err = error(group, target) if error else None
            ax.bar(
                x,
                height,
                width,
                color=color(target),
                yerr=err,
                capsize=2 if err else 0,
                error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
            )
            text = f"{height:,.{digits}f}"
            extra = note(group, target)
            if extra:
                text += f"\n{extra}"
            ax.text(
                x,
                height + (err or 0) + top * 0.01,
                text,
                ha="center",
                va="bottom",
                fontsize=6 if len(targets) > 3 else 7,
                rotation=90 if len(targets) * len(groups) > 12 else 0,
            )
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([wrap(g) for g in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, top * (1.45 if len(targets) * len(groups) > 12 else 1.25))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def title_of(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    settings = report.get("settings", {})
    parts = [
        f"bench: {report['scenario']}",
        str(machine.get("date", "")),
        f"git {machine.get('git') or '?'}",
        f"{machine.get('nproc', '?')} CPUs",
        f"pool {settings.get('pool_size', '?')}",
        f"medians of {settings.get('repeat', 1)} repetition(s)",
    ]
    return " | ".join(p for p in parts if p)


def new_figure(panels: int, report: dict[str, Any], width: float = 14.0) -> tuple[Any, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(panels, 1, figsize=(width, 4.2 * panels), squeeze=False)
    fig.suptitle(title_of(report), fontsize=11)
    return fig, [ax for row in axes for ax in row]


def finish(
    fig: Any, axes: Sequence[Axes], path: Path, footnote: str, targets: Sequence[str]
) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    handles = [Patch(color=color(t), label=LABELS.get(t, t)) for t in targets]
    handles.append(Patch(fill=False, hatch="///", edgecolor="#666666", label="did not run"))
    labels = [str(h.get_label()) for h in handles]
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.975),
        fontsize=8,
        ncol=min(6, len(labels)),
        frameon=False,
    )
    fig.text(0.01, 0.005, textwrap.fill(footnote, 200), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================
# Case-based scenarios: tps, churn, connect_latency, memory


class Cases:
    """The report's per-case medians (``results``), looked up by case and target."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.rows: list[dict[str, Any]] = report.get("results") or []
        for row in self.rows:  # figures that reports written before they existed lack
            after, connected = row.get("rss_after_kb"), row.get("connected")
            if after is not None and row.get("rss_total_mib") is None:
                row["rss_total_mib"] = after / 1024
            if after is not None and connected and row.get("total_kb_per_client") is None:
                row["total_kb_per_client"] = after / connected
        self.by_key = {(r["case"], r["target"]): r for r in self.rows}
        self.cases = list(dict.fromkeys(r["case"] for r in self.rows))
        self.targets = in_order([r["target"] for r in self.rows])

    def get(self, case: str, target: str, key: str) -> float | None:
        row = self.by_key.get((case, target))
        if row is None or "failure" in row:
            return None
        value = row.get(key)
        return float(value) if isinstance(value, int | float) else None

    def present(self, case: str, target: str) -> bool:
        return (case, target) in self.by_key

    def failed(self, case: str, target: str) -> bool:
        row = self.by_key.get((case, target))
        return row is not None and "failure" in row

    def value(self, key: str) -> Value:
        return lambda case, target: self.get(case, target, key)

    def percentile(self, case: str) -> Value:
        """(percentile name, target) -> that percentile of ``case`` in ms."""
        return lambda p, target: self.get(case, target, f"{p}_ms")

    @staticmethod
    def for_case(test: Callable[[str, str], bool], case: str) -> Callable[[str, str], bool]:
        """(anything, target) -> ``test(case, target)``."""
        return lambda _group, target: test(case, target)

    def ratio_note(self, key: str, *, lower_is_better: bool = False) -> Callable[[str, str], str]:
        """Above a trioproxy bar: its ratio to PgBouncer (transaction mode; when that cannot
        run, session mode), and for w>1 to w=1."""

        def note(case: str, target: str) -> str:
            if not is_trioproxy(target):
                return ""
            mine = self.get(case, target, key)
            parts = []
            for ref, short in (("pgbouncer", "PgB"), (SESSION, "PgB-session")):
                theirs = self.get(case, ref, key)
                if mine is not None and theirs:
                    parts.append(f"x{mine / theirs:.2f} {short}")
                    if not lower_is_better or ref == "pgbouncer":
                        break
            if target not in ("trioproxy", "trioproxy w=1"):
                one = self.get(case, "trioproxy w=1", key)
                if mine is not None and one:
                    parts.append(f"x{mine / one:.2f} w=1")
            return "\n".join(parts)

        return note


def plot_pgbench(report: dict[str, Any], path: Path) -> None:
    """tps and churn."""
    data = Cases(report)
    churn = report["scenario"] == "churn"
    fig, axes = new_figure(3, report)
    grouped_bars(
        axes[0],
        data.cases,
        data.targets,
        data.value("tps"),
        failed=data.failed,
        present=data.present,
        note=data.ratio_note("tps"),
        ylabel="transactions per second",
        title="Throughput (pgbench tps; higher is better). Above trioproxy's bars: its ratio "
        "to PgBouncer (transaction mode, or session mode where transaction mode cannot run)",
    )
    if churn:
        grouped_bars(
            axes[1],
            data.cases,
            data.targets,
            data.value("average_connection_ms"),
            failed=data.failed,
            present=data.present,
            ylabel="ms",
            title="Average connection time (pgbench -C: startup, SCRAM, TLS if any)",
            digits=2,
        )
    else:
        grouped_bars(
            axes[1],
            data.cases,
            data.targets,
            data.value("latency_avg_ms"),
            error=data.value("latency_stddev_ms"),
            failed=data.failed,
            present=data.present,
            ylabel="ms",
            title="Latency per transaction: average, error bar = stddev (lower is better)",
            digits=2,
        )
    poolers = [t for t in data.targets if t != "direct"]
    grouped_bars(
        axes[2],
        data.cases,
        poolers,
        data.value("proxy_cpu_us_per_tx"),
        failed=data.failed,
        present=data.present,
        note=data.ratio_note("proxy_cpu_us_per_tx", lower_is_better=True),
        ylabel="CPU µs per transaction",
        title="Pooler CPU per transaction (user + system, summed over all its processes; "
        "lower is better)",
        digits=1,
    )
    note = report.get("settings", {}).get("workers_note")
    footnote = (
        "pgbench -j 2 on the same 2-CPU machine as PostgreSQL and the pooler; tps is partly "
        "whoever leaves the others more CPU, CPU per transaction is the figure that depends "
        "least on the machine."
    ) + (f" {note}" if note else "")
    finish(fig, axes, path, footnote, data.targets)


def plot_connect_latency(report: dict[str, Any], path: Path) -> None:
    data = Cases(report)
    fig, axes = new_figure(len(data.cases) + 1, report, width=11.0)
    percentiles = ("p50", "p95", "p99")
    for ax, case in zip(axes, data.cases, strict=False):
        grouped_bars(
            ax,
            list(percentiles),
            data.targets,
            data.percentile(case),
            failed=data.for_case(data.failed, case),
            present=data.for_case(data.present, case),
            ylabel="ms, connect to first row",
            title=f"Connect latency percentiles, {case} (lower is better)",
            digits=2,
        )
    grouped_bars(
        axes[-1],
        data.cases,
        [t for t in data.targets if t != "direct"],
        data.value("proxy_cpu_us_per_connect"),
        failed=data.failed,
        present=data.present,
        note=data.ratio_note("proxy_cpu_us_per_connect", lower_is_better=True),
        ylabel="CPU µs per connection",
        title="Pooler CPU per connection (lower is better)",
        digits=1,
    )
    finish(fig, axes, path, "psycopg 3, sequential connect + select 1 + close.", data.targets)


def plot_memory(report: dict[str, Any], path: Path) -> None:
    data = Cases(report)
    fig, axes = new_figure(3, report, width=11.0)
    grouped_bars(
        axes[0],
        data.cases,
        data.targets,
        data.value("rss_total_mib"),
        failed=data.failed,
        present=data.present,
        ylabel="MiB (VmRSS, all processes)",
        title="Pooler resident memory with the idle clients connected (1 GiB = 1024 MiB)",
        digits=1,
    )
    per_client = [("above idle", "kb_per_client"), ("total / clients", "total_kb_per_client")]
    groups = [f"{case}: {label}" for case in data.cases for label, _key in per_client]

    def per(group: str, target: str) -> float | None:
        case, label = group.split(": ", 1)
        key = dict(per_client)[label]
        return data.get(case, target, key)

    grouped_bars(
        axes[1],
        groups,
        data.targets,
        per,
        failed=lambda g, t: data.failed(g.split(": ", 1)[0], t),
        present=lambda g, t: data.present(g.split(": ", 1)[0], t),
        ylabel="kB per idle client",
        title="Resident memory per idle client (lower is better)",
        digits=1,
    )
    grouped_bars(
        axes[2],
        data.cases,
        data.targets,
        data.value("proxy_cpu_us_per_login"),
        failed=data.failed,
        present=data.present,
        note=data.ratio_note("proxy_cpu_us_per_login", lower_is_better=True),
        ylabel="CPU µs per login",
        title="Pooler CPU per login (SCRAM; lower is better)",
        digits=1,
    )
    footnote = "asyncpg clients, plain TCP, held idle; RSS 1 s after the last login."
    finish(fig, axes, path, footnote, data.targets)


# ============================================================================================
# storm


def plot_storm(report: dict[str, Any], path: Path) -> None:
    runs: list[dict[str, Any]] = report.get("runs") or []
    groups = [f"{c:,} clients" for c in dict.fromkeys(r["clients"] for r in runs)]
    targets = in_order([r["target"] for r in runs])

    def pick(group: str, target: str) -> list[dict[str, Any]]:
        clients = int(group.split()[0].replace(",", ""))
        return [r for r in runs if r["clients"] == clients and r["target"] == target]

    def figure(get: Callable[[dict[str, Any]], float | None]) -> Value:
        return lambda group, target: median([get(r) for r in pick(group, target)])

    fig, axes = new_figure(2 + len(groups), report, width=11.0)
    tps = figure(lambda r: r.get("tps"))

    def vs_pgbouncer(group: str, target: str) -> str:
        mine, theirs = tps(group, target), tps(group, "pgbouncer")
        return f"x{mine / theirs:.2f} PgB" if is_trioproxy(target) and mine and theirs else ""

    grouped_bars(
        axes[0],
        groups,
        targets,
        tps,
        present=lambda g, t: bool(pick(g, t)),
        note=vs_pgbouncer,
        ylabel="successful loops per second",
        title="Throughput: connect, select pg_sleep, disconnect (higher is better)",
    )
    grouped_bars(
        axes[1],
        groups,
        [t for t in targets if t != "direct"],
        figure(lambda r: r.get("proxy_cpu_us_per_success")),
        present=lambda g, t: bool(pick(g, t)),
        ylabel="CPU µs per successful loop",
        title="Pooler CPU per loop (login + query + logout; lower is better)",
    )

    def latency(group: str) -> Value:
        return lambda p, target: median(
            [(r.get("latency_ms") or {}).get(p) for r in pick(group, target)]
        )

    def ran(group: str) -> Callable[[str, str], bool]:
        return lambda _p, target: bool(pick(group, target))

    for ax, group in zip(axes[2:], groups, strict=True):
        grouped_bars(
            ax,
            ["p50", "p95", "p99"],
            targets,
            latency(group),
            present=ran(group),
            ylabel="ms, connect + query",
            title=f"Latency percentiles of successful loops, {group} (lower is better)",
        )
    footnote = "asyncpg load generator; direct PostgreSQL refuses what it cannot hold."
    finish(fig, axes, path, footnote, targets)


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "tps": plot_pgbench,
    "churn": plot_pgbench,
    "connect_latency": plot_connect_latency,
    "memory": plot_memory,
    "storm": plot_storm,
}


# ============================================================================================
# Files


def link_plot(markdown: Path, png: Path) -> bool:
    """Link ``png`` from the report, after its first paragraph, unless it already is."""
    if not markdown.exists():
        return False
    text = markdown.read_text()
    if f"]({png.name})" in text:
        return False
    lines = text.split("\n")
    # The title, a blank line, the summary paragraph, a blank line: the plot goes after.
    blanks = [i for i, line in enumerate(lines) if not line.strip()]
    at = blanks[1] + 1 if len(blanks) > 1 else len(lines)
    lines[at:at] = [f"![{markdown.stem}: plots]({png.name})", ""]
    markdown.write_text("\n".join(lines))
    return True


def plot_file(data: Path) -> Path | None:
    """Draw the plot of one ``<scenario>.json``; returns the PNG, or None (not a report)."""
    report = json.loads(data.read_text())
    plotter = PLOTTERS.get(report.get("scenario", "")) if isinstance(report, dict) else None
    if plotter is None:
        return None
    png = data.with_suffix(".png")
    plotter(report, png)
    link_plot(data.with_suffix(".md"), png)
    return png


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        import matplotlib
    except ImportError:
        print(
            "bench.plots: matplotlib is not installed: pip install -e '.[bench]' "
            "(make bench does it)",
            file=sys.stderr,
        )
        return 3
    matplotlib.use("Agg")
    paths: list[Path] = []
    for arg in args or [str(RESULTS)]:
        path = Path(arg)
        paths += sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not paths:
        print(f"bench.plots: no *.json in {' '.join(args) or RESULTS}", file=sys.stderr)
        return 1
    status = 0
    for path in paths:
        try:
            png = plot_file(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench.plots: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        if png is not None:
            print(f"plotted {png}")
    return status


if __name__ == "__main__":
    sys.exit(main())
