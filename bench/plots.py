"""PNG plots of the transfer benchmark (matplotlib, Agg backend: no display needed).

- ``goodput.png``: one panel per dataset kind, grouped bars (systems within each profile) of the
  median goodput with min–max error bars, on a log scale (loopback and 10 Mbit/s differ 100x);
- ``progress.png``: the fraction of the study transferred over time, one curve per system (the
  run of median wall time), for one profile and dataset.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["available", "plot_goodput", "plot_progress"]


def available() -> str | None:
    """None when matplotlib can be imported, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plots"
    return None


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_goodput(results: dict, path: Path) -> Path:
    plt = _plt()
    kinds: dict[str, list[dict]] = {}
    for e in results["summary"]:
        kinds.setdefault(results["datasets"][e["dataset"]]["kind"], []).append(e)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 4.2 * len(kinds)), squeeze=False)
    for ax, (kind, entries) in zip(axes[:, 0], kinds.items()):
        profiles = list(dict.fromkeys(e["profile"] for e in entries))
        systems = list(dict.fromkeys(e["system"] for e in entries))
        width = 0.8 / max(1, len(systems))
        cmap = plt.get_cmap("tab10")
        for j, system in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for i, profile in enumerate(profiles):
                e = next((e for e in entries if e["profile"] == profile and e["system"] == system), None)
                g = e and e["metrics"]["goodput_mb_s"]
                if not g:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(g["median"])
                lo.append(g["median"] - g["min"])
                hi.append(g["max"] - g["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=system, color=cmap(j % 10))
        ax.set_xticks(range(len(profiles)))
        ax.set_xticklabels(profiles)
        ax.set_yscale("log")
        ax.set_ylabel("goodput MB/s (verified DICOM bytes)")
        ax.set_title(f"{kind}: goodput per system and link profile (median, min–max)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pick_progress(results: dict) -> tuple[str, str] | None:
    """(profile, dataset) to draw: the first emulated profile that ran, else the first one."""
    ok = [r for r in results["runs"] if r["ok"] and r.get("progress")]
    if not ok:
        return None
    emulated = [r for r in ok if results["profiles"].get(r["profile"], {}).get("link")]
    r = (emulated or ok)[0]
    return r["profile"], r["dataset"]


def plot_progress(results: dict, path: Path) -> Path | None:
    choice = pick_progress(results)
    if choice is None:
        return None
    profile, dataset = choice
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5))
    runs = [r for r in results["runs"] if r["ok"] and r["profile"] == profile and r["dataset"] == dataset]
    systems = list(dict.fromkeys(r["system"] for r in runs))
    cmap = plt.get_cmap("tab10")
    for j, system in enumerate(systems):
        mine = sorted((r for r in runs if r["system"] == system), key=lambda r: r["wall_s"])
        r = mine[len(mine) // 2]
        pts = r["progress"]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], drawstyle="steps-post",
                label=f"{system} ({r['wall_s']:.1f} s)", color=cmap(j % 10))
    d = results["datasets"][dataset]
    ax.set_xlabel("seconds since the transfer started")
    ax.set_ylabel("% of the study transferred")
    ax.set_title(f"Progress over time: {profile}, {d['kind']} ({d['instances']} instances, "
                 f"{d['bytes'] / 1e6:.0f} MB); median run per system")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
