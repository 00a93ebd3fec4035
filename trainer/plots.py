"""PNG plots of a training run, drawn from its metrics.jsonl records (matplotlib, headless)."""

from pathlib import Path

import matplotlib

from cache_format.storage import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_run(run: Path, records: list[dict]) -> None:
    """A run's PNGs from its metrics.jsonl records: loss.png, domain_loss.png, domain_weights.png (+ adakd.png)."""
    if not records:
        return
    plot_losses(records, run / "loss.png")
    plot_domain_losses(records, run / "domain_loss.png")
    plot_domain_weights(records, run / "domain_weights.png")
    if "focus_ratio" in records[0]:
        plot_adakd(records, run / "adakd.png")


def plot_losses(records: list[dict], path: Path) -> None:
    """Total, KD and CE loss per step (left) and the learning rate (right)."""
    steps = [r["step"] for r in records]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    for key in ("loss", "kd_loss", "ce_loss"):
        if any(r[key] for r in records):
            ax.plot(steps, [r[key] for r in records], label=key, lw=1)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], color="gray")
    ax_lr.set(xlabel="step", title="learning rate")
    ax_lr.grid(alpha=0.3)
    save_figure(fig, path)


def plot_domain_weights(records: list[dict], path: Path) -> None:
    """The domain sampling weights over steps (stacked: they sum to 1)."""
    steps = [r["step"] for r in records]
    domains = list(records[0]["domain_weights"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(steps, [[r["domain_weights"][d] for r in records] for d in domains], labels=domains, alpha=0.85)
    ax.set(xlabel="step", ylabel="sampling weight", ylim=(0, 1), title="domain weights")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    save_figure(fig, path)


def plot_domain_losses(records: list[dict], path: Path, window: int = 20) -> None:
    """Each domain's training loss per token, a moving average over `window` steps where the domain was drawn."""
    fig, ax = plt.subplots(figsize=(8, 4))
    domains = sorted({d for r in records for d in r["domain_loss"]})
    for d in domains:
        points = [(r["step"], r["domain_loss"][d]) for r in records if d in r["domain_loss"]]
        ys = [sum(y for _, y in points[max(0, i - window + 1):i + 1]) / min(window, i + 1) for i in range(len(points))]
        ax.plot([s for s, _ in points], ys, label=d, lw=1)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"per-domain training loss ({window}-step average)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    save_figure(fig, path)


def plot_adakd(records: list[dict], path: Path) -> None:
    """AdaKD over steps: LATF's focus ratio (share of tokens distilled) and IDTS's temperatures (mean, min, max)."""
    steps = [r["step"] for r in records]
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot(steps, [r["focus_ratio"] for r in records], color="tab:purple")
    ax_r.set(xlabel="step", ylabel="ratio of tokens distilled", ylim=(0, 1.05), title="LATF focus")
    ax_t.plot(steps, [r["tau_mean"] for r in records], label="mean", color="tab:red")
    ax_t.fill_between(steps, [r["tau_min"] for r in records], [r["tau_max"] for r in records], alpha=0.2,
                      color="tab:red", label="min-max")
    ax_t.set(xlabel="step", ylabel="temperature", title="IDTS temperatures (distilled tokens)")
    for ax in (ax_r, ax_t):
        ax.grid(alpha=0.3)
    ax_t.legend()
    save_figure(fig, path)
