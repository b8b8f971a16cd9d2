"""`sweep`: one SFT config trained at several LoRA ranks (and optionally in full), compared in one table and plot.

The usual advice as a command: start with rank 4–8; 16 is typically enough for one task or domain, 64 for several;
watch the validation loss (a larger rank that does not lower it only costs memory and time); and compare with a
full fine-tuning baseline, which tells you how much of the attainable quality the adapter reaches.

Each run is the config as given with only ``r`` changed (``lora_alpha`` scaled with it, so ``alpha / r`` and the
update's scale stay the config's) or ``method: full`` for the baseline (with its own, smaller learning rate). Runs
write into ``<output_dir>/r<rank>`` and ``<output_dir>/full``; the table goes to ``sweep.md`` and ``sweep.json``,
the plot to ``sweep.png``. Each run trains in a fresh child process, so its peak memory (resident set size of the
process: model, optimizer state, activations) is its own.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
from dataclasses import dataclass
from pathlib import Path

__all__ = ["sweep", "SweepRow", "format_table", "plot_sweep", "DEFAULT_RANKS", "DEFAULT_FULL_LR"]

#: The ranks the advice names: 4 and 8 to start, 16 for one domain, 64 for several.
DEFAULT_RANKS = (4, 8, 16, 64)
#: Learning rate of the full fine-tuning baseline: every weight moves, so far below LoRA's (2e-3 in the configs).
DEFAULT_FULL_LR = 2e-5


@dataclass(frozen=True)
class SweepRow:
    """One run of a sweep."""

    label: str
    r: int | None
    best_val_loss: float | None
    final_val_loss: float | None
    accuracy: float | None
    base_accuracy: float | None
    trainable: int
    total: int
    peak_rss_mb: float | None
    seconds: float
    output_dir: str


def _train(args):
    from . import train

    run = getattr(train, "run_sft", None) or train.train_sft  # run_sft(args): the recipe (load, data, train)
    return run(args)


def _run(args, label: str) -> SweepRow:
    result = _train(args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return SweepRow(label, args.r if args.method != "full" else None, result.best_val_loss, result.final_val_loss,
                    result.tuned_accuracy, result.base_accuracy, result.trainable.trainable, result.trainable.total,
                    rss, result.seconds, str(args.output_dir))


def _run_isolated(args, label: str) -> SweepRow:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_run, args, label).result()
        except BrokenProcessPool as err:  # the child was killed (out of memory, a signal): say which run
            raise RuntimeError(f"sweep run {label} ({args.output_dir}) died before finishing ({err}); the runs "
                               "before it are in the sweep table") from None


def sweep(args, ranks=DEFAULT_RANKS, full_baseline: bool = False, full_lr: float = DEFAULT_FULL_LR,
          output_dir: str | Path | None = None, isolate: bool = True) -> list[SweepRow]:
    """Train ``args`` (an ``SFTArgs``) at each rank of ``ranks`` and, with ``full_baseline``, in full.

    Args:
        args: the base config (``method`` lora or qlora); ``r`` and ``lora_alpha`` are replaced per run.
        ranks: LoRA ranks to try.
        full_baseline: also fine-tune every weight (``method: full``, learning rate ``full_lr``).
        output_dir: where runs, table and plot go (default: ``args.output_dir + "-sweep"``).
        isolate: train each run in a child process (peak memory per run); False runs them here (memory is then
            the process's peak so far, not per run).

    Returns:
        One :class:`SweepRow` per run, in order (ranks, then full). ``sweep.md``, ``sweep.json`` and ``sweep.png``
        are written into ``output_dir``.

    Raises:
        ValueError: for no ranks, a non-positive rank, or ``args.method == "full"``.
    """
    ranks = [int(r) for r in ranks]
    if not ranks and not full_baseline:
        raise ValueError("nothing to sweep: give ranks (e.g. 4,8,16,64) or the full baseline")
    if any(r <= 0 for r in ranks):
        raise ValueError(f"ranks={ranks}: every rank must be a positive integer")
    if args.method == "full":
        raise ValueError("the config's method is 'full'; a rank sweep needs method 'lora' or 'qlora' "
                         "(the full baseline is added with full_baseline=True / --full-baseline)")
    out = Path(output_dir) if output_dir is not None else Path(f"{args.output_dir}-sweep")
    ratio = args.lora_alpha / args.r
    runs = [(f"r={r}", dataclasses.replace(args, r=r, lora_alpha=ratio * r, output_dir=str(out / f"r{r}")))
            for r in ranks]
    if full_baseline:
        runs.append(("full", dataclasses.replace(args, method="full", lr=full_lr, output_dir=str(out / "full"))))
    from .atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, run_args in runs:
        rows.append((_run_isolated if isolate else _run)(run_args, label))
        # the table so far after each run, so a long sweep stopped midway keeps what it measured
        atomic_write_text(out / "sweep.json", json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
        atomic_write_text(out / "sweep.md", format_table(rows) + "\n")
    plot_sweep(rows, out / "sweep.png", title=f"{args.task if not args.train_file else args.train_file}, "
                                              f"{args.max_steps} steps")
    return rows


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def format_table(rows: list[SweepRow]) -> str:
    """The sweep as a Markdown table (one row per run)."""
    lines = ["| run | best val loss | final val loss | accuracy | trainable params | peak memory | time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "–" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        lines.append(f"| {r.label} | {_num(r.best_val_loss, '.4f')} | {_num(r.final_val_loss, '.4f')} | {acc} | "
                     f"{r.trainable:,} ({100 * r.trainable / max(r.total, 1):.2f}%) | "
                     f"{_num(r.peak_rss_mb, ',.0f')} MB | {r.seconds:.0f} s |")
    base = next((r.base_accuracy for r in rows if r.base_accuracy is not None), None)
    if base is not None:
        lines.append(f"\nbase model accuracy: {100 * base:.1f}%")
    return "\n".join(lines)


def plot_sweep(rows: list[SweepRow], path: Path, title: str = "") -> Path | None:
    """Five bar panels (validation loss, accuracy, trainable parameters, peak memory, time) per run; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r.label for r in rows]
    panels = [("best validation loss", [r.best_val_loss or 0 for r in rows]),
              ("accuracy (%)", [100 * (r.accuracy or 0) for r in rows]),
              ("trainable parameters (M)", [r.trainable / 1e6 for r in rows]),
              ("peak memory (MB)", [r.peak_rss_mb or 0 for r in rows]),
              ("time (s)", [r.seconds for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    colors = ["tab:blue" if r.r is not None else "tab:gray" for r in rows]
    for ax, (name, values) in zip(axes, panels):
        ax.bar(labels, values, color=colors)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
