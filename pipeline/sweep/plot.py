"""The sweep's picture: val top-1 per epoch for every trial."""
from __future__ import annotations


def plot_trials(results, rows: list[dict], path: str) -> None:
    """Val top-1 per epoch for every trial; ASHA-stopped trials dashed and marked with x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result, row in zip(results, rows):
        df = result.metrics_dataframe
        if df is None or "val_top1" not in df or "epoch" not in df:
            continue
        df = df.dropna(subset=["val_top1"])
        style = "--" if row["stopped_early"] else "-"
        label = row["id"] + (" (stopped by ASHA)" if row["stopped_early"] else "") + \
            (" (error)" if row["status"] == "ERROR" else "")
        (line,) = ax.plot(df["epoch"], df["val_top1"], style, marker="o", label=label)
        if row["stopped_early"] and len(df):
            ax.plot(df["epoch"].iloc[-1], df["val_top1"].iloc[-1], "x", color=line.get_color(),
                    markersize=12, mew=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.set_title("val top-1 per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
