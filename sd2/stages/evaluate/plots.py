"""PNG plots (matplotlib, Agg backend): MAL vs MACs (the Pareto view) and acceptance per position."""

from __future__ import annotations

from pathlib import Path


def write_plots(report, out_dir: Path) -> list[str]:
    """``report``: sd2.core.report.Report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report.results
    if not results:
        return []
    kinds = {name: d.pruning for name, d in report.drafters.items()}
    names = []
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (gamma, temp) in sorted({(r.gamma, r.temperature) for r in results}):
        rows = [r for r in results if r.gamma == gamma and r.temperature == temp]
        xs = [r.macs_per_token / 1e6 for r in rows]
        ys = [r.mal for r in rows]
        ax.scatter(xs, ys, label=f"γ={gamma}, T={temp:g}")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r.drafter, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        for kind, style in (("sparse", "-"), ("layer", "--")):   # SD²'s two curves, when the run has them
            curve = sorted((r.macs_per_token / 1e6, r.mal) for r in rows if kinds.get(r.drafter) == kind)
            if len(curve) > 1 or (curve and any(kinds.get(r.drafter) not in (kind, None) for r in rows)):
                ax.plot([c[0] for c in curve], [c[1] for c in curve], style, alpha=0.6,
                        label=f"{kind} pruned, γ={gamma}, T={temp:g}")
    ax.set_xlabel("drafter MACs per token (M, effective)")
    ax.set_ylabel("MAL (tokens per target forward)")
    ax.set_title("MAL vs drafter MACs (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "mal_vs_macs.png", dpi=120)
    plt.close(fig)
    names.append("mal_vs_macs.png")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in results:
        pos = list(range(1, len(r.acceptance_per_position) + 1))
        ax.plot(pos, r.acceptance_per_position, marker="o", label=f"{r.drafter} γ={r.gamma} T={r.temperature:g}")
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate (among rounds drafting it)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance per position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "acceptance_per_position.png", dpi=120)
    plt.close(fig)
    names.append("acceptance_per_position.png")
    return names
