"""Result files: results.json, a Markdown table, training curves, and image grids."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

from .config import PROTOCOL_WORDS
from .io import atomic_path, to_uint8, write_json


def _labels(row: dict[str, Any]) -> str:
    """The labels column: the label kind, and the augmentation when it was off."""
    return row["labels"] + ("" if row.get("augment", True) else ", no augmentation")


def results_table(results: dict[str, Any]) -> str:
    """Markdown table: each student's distilled accuracy next to its baselines (and their means over repeats)."""
    # Results written before --protocol existed were all under the method's own protocol.
    protocol = results.get("protocol", "own")
    lines = [
        f"# {results['method']} on {results['dataset']}, IPC {results['ipc']}, {protocol} student protocol",
        "",
        f"Students: the {protocol} protocol ({PROTOCOL_WORDS[protocol]}).",
        "",
    ]
    if any(row["repeats"] > 1 for row in results["summary"]):
        lines += [
            "| student | training set | labels | repeats | top-1 (%) | top-5 (%) | best top-1 (%) |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for row in results["summary"]:
            lines.append(
                f"| {row['student']} | {row['train_set']} | {_labels(row)} | {row['repeats']} "
                f"| {row['top1']:.2f} ± {row['top1_std']:.2f} | {row['top5']:.2f} ± {row['top5_std']:.2f} "
                f"| {row['best_top1']:.2f} ± {row['best_top1_std']:.2f} |"
            )
        lines += ["", "Mean ± sample standard deviation over the repeats; each run:", ""]
    lines += [
        "| student | training set | labels | seed | images | epochs | top-1 (%) | top-5 (%) | best top-1 (%) "
        "| seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['student']} | {run['train_set']} | {_labels(run)} | {run['seed']} | {run['images']} "
            f"| {run['epochs']} | {run['top1']:.2f} | {run['top5']:.2f} "
            f"| {run['best_top1']:.2f} (epoch {run['best_epoch']}) | {run['seconds']:.0f} |"
        )
    lines += [
        "",
        "top-1 and top-5: after the last epoch (the headline). Best top-1: the best of the validations after "
        f"epochs {_epochs_text(results['runs'])}, as the reference reports; it picks the epoch on the "
        "validation set itself, so it is optimistic.",
    ]
    if results.get("robustness"):
        lines += ["", robustness_table(results["robustness"])]
    if "stored_labels" in results:
        stored = results["stored_labels"]
        lines += [
            "",
            f"Stored soft labels: {stored['bytes']} bytes ({stored['bytes_per_image_per_epoch']} per image per epoch).",
        ]
    return "\n".join(lines) + "\n"


def robustness_table(rows: Sequence[dict[str, Any]]) -> str:
    """The robustness scores per student (mean ± sample std over the seeds), with what they mean."""
    lines = [
        "## Robustness scores",
        "",
        "| student | seeds | HLR | IOR | LRS | ARS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [f"{row[k]:.4f} ± {row[k + '_std']:.4f}" if k in row else "-" for k in ("hlr", "ior", "lrs", "ars")]
        lines.append(f"| {row['student']} | {row['repeats']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracies as fractions, last epoch. HLR = full-data hard - distilled hard (lower is better); IOR = "
        "distilled soft - random-real soft; LRS and ARS in [0, 1], higher is better (DD-Ranking's definitions, "
        "lambda 0.5). '-': the arms it needs were not trained (--robustness trains them all).",
    ]
    return "\n".join(lines)


def _epochs_text(runs: Sequence[dict[str, Any]]) -> str:
    """The validation epochs of the runs, shortened ("1, 11, 21, ..., 291, 300")."""
    # Student runs only: the full-data arm is validated once, after the teacher recipe's epochs.
    epochs = sorted({e for run in runs if run.get("history", True) for e in run.get("evaluated_epochs", [])})
    return (
        ", ".join(map(str, epochs))
        if len(epochs) <= 6
        else f"{epochs[0]}, {epochs[1]}, {epochs[2]}, ..., {epochs[-2]}, {epochs[-1]}"
    )


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Lay ``fig`` out, write it to ``path`` as a PNG (atomically) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_curves(path: Path, runs: Sequence[dict[str, Any]]) -> bool:
    """Training loss and validation top-1 per epoch, one line per run; False when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    several_seeds = len({run["seed"] for run in runs}) > 1
    for run in (run for run in runs if run["history"]):  # the full-data arm has no student curve
        label = f"{run['student']} / {run['train_set']} / {_labels(run)}"
        label += f" / seed {run['seed']}" if several_seeds else ""
        epochs = [h["epoch"] for h in run["history"]]
        ax_loss.plot(epochs, [h["train_loss"] for h in run["history"]], label=label)
        points = [(h["epoch"], h["top1"]) for h in run["history"] if "top1" in h]
        ax_acc.plot(*zip(*points), marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    ax_acc.legend(fontsize=8)
    _save_figure(plt, fig, path)
    return True


def write_report(out: Path, results: dict[str, Any]) -> None:
    """Write results.json, results.md and curves.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_table(results))
    plot_curves(out / "curves.png", results["runs"])


def image_grid(images: torch.Tensor, columns: int, scale: int = 1) -> Image.Image:
    """Tile [0, 1] images (N, C, H, W) into one picture, ``columns`` per row, upscaled by ``scale``."""
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = image
    picture = Image.fromarray(to_uint8(canvas))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def labelled_grid(
    images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], per_class: int, scale: int = 2
) -> Image.Image:
    """A row of up to ``per_class`` images per class (uint8 (N, C, H, W) with their ``labels``), each row named
    by its class at the left."""
    rows = []
    for label, _ in enumerate(class_names):
        chosen = images[labels == label][:per_class]
        rows.append(torch.cat([chosen, torch.zeros(per_class - len(chosen), *images.shape[1:], dtype=images.dtype)]))
    tiles = image_grid(torch.cat(rows).float().div(255), per_class, scale)
    if tiles.mode != "RGB":
        tiles = tiles.convert("RGB")
    draw = ImageDraw.Draw(tiles)
    margin = max(draw.textlength(str(name)) for name in class_names) + 8
    canvas = Image.new("RGB", (tiles.width + int(margin), tiles.height), "white")
    canvas.paste(tiles, (int(margin), 0))
    draw = ImageDraw.Draw(canvas)
    row_height = tiles.height / len(class_names)
    for row, name in enumerate(class_names):
        draw.text((4, row * row_height + row_height / 2 - 5), str(name), fill="black")
    return canvas


def plot_accuracy_by_ipc(path: Path, rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> bool:
    """Top-1 against IPC, a line per method (soft labels, each student) and a dashed one per baseline arm, the
    IPCs as ticks on a log axis; False when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines: dict[tuple[str, str, str], list[tuple[int, float, float]]] = {}
    for row in rows:
        lines.setdefault((row["arm"], row["student"], row["labels"]), []).append(
            (row["ipc"], row["top1"], row["top1_std"] or 0.0)
        )
    for (arm, student, labels), points in sorted(lines.items()):
        points.sort()
        ipcs, top1, std = zip(*points)
        style = "-" if arm in methods else "--"
        ax.errorbar(ipcs, top1, yerr=std, linestyle=style, marker="o", capsize=3, label=f"{arm} ({labels}), {student}")
    ticks = sorted({row["ipc"] for row in rows})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="images per class (IPC)", ylabel="top-1 (%)", title="accuracy against IPC")
    ax.legend(fontsize=7)
    _save_figure(plt, fig, path)
    return True
