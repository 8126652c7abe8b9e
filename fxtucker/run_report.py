"""What `fxtucker compress` prints and writes beside its report.json: the summary table, report.md and
the gate histograms, from the JSON-ready summary the command builds."""

from __future__ import annotations

from pathlib import Path

import torch

from fxtucker.io import write_atomic
from fxtucker.latency import spread_rule
from fxtucker.report import report

__all__ = ["forms", "forms_text", "summary_text", "markdown", "histogram_pngs"]


def forms(gm: torch.nn.Module) -> dict[str, int]:
    """How many layers run in each form (``fold_or_restore(cost="latency")``'s choice), e.g. {"tucker2": 12}."""
    forms = [layer.form for layer in report(gm).layers if layer.form]
    return {f: forms.count(f) for f in sorted(set(forms))}


def forms_text(forms: dict[str, int]) -> str:
    return ", ".join(f"{f} {n}" for f, n in forms.items()) or "none timed"


def summary_text(summary: dict) -> str:
    """The table the main job prints: accuracy, MACs, params and the deployed speed at each timed batch."""
    acc_b, acc_a = summary["accuracy_before"], summary["accuracy_after"]
    rows = [("", "original", "compressed", "ratio"),
            (f"accuracy ({summary['accuracy_images']:,} test images)", f"{acc_b:.4f}", f"{acc_a:.4f}",
             f"{acc_a - acc_b:+.4f}"),
            ("MACs", f"{summary['macs_before']:,}", f"{summary['macs_after']:,}",
             f"{summary['macs_before'] / summary['macs_after']:.2f}x"),
            ("params", f"{summary['params_before']:,}", f"{summary['params_after']:,}",
             f"{summary['params_before'] / summary['params_after']:.2f}x")]
    dep = summary["deployed"]
    for key, t in summary["latency"].items():
        cells = [("unreliable" if t[k] is None else f"{t[k]:.2f}") for k in ("baseline_ms", "candidate_ms")]
        ratio = "unreliable" if t["speedup"] is None else f"{t['speedup']:.2f}x"
        rows.append((f"latency, {dep['backend']}, batch {t['batch']} (ms)", *cells, ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    e = summary["epochs"]
    base = (f"{e['baseline']} epoch(s), {e['baseline_from']}" if e["baseline"] is not None
            else e["baseline_from"])
    lines.append(f"epochs: original {base}; compressed: {e['decomposed']} decomposed + {e['regularize']} regularized "
                 f"+ {e['finetune']} fine-tuning" + (" (distilled from the original)" if e.get("finetune_distilled") else "")
                 + " on top of it" + _images(e))
    if summary.get("rank_floor"):  # reports written before the floor was stored have none
        share = summary.get("floor_share")
        lines.append(f"rank floor: {summary['rank_floor']:.3g} of every mode's rank kept whatever the budget"
                     + (f" (the largest floor within floor_share={share:g} of it)" if share is not None else ""))
    if summary["stage_accuracy_images"] != summary["accuracy_images"]:
        lines.append(f"accuracy after each stage (report.md) on {summary['stage_accuracy_images']:,} of the test images")
    t = next(iter(summary["latency"].values()), None)
    if t is not None:
        lines.append(f"latency: the original with BatchNorm folded against the deployed model "
                     f"({forms_text(dep['forms'])}; {dep['macs']:,} MACs; forms chosen at batch "
                     f"{dep['forms_chosen_at_batch']} within the compressed model's MACs), on {t['backend']}, {t['device']}, {t['threads']} thread(s); "
                     f"timed alternately over {t['rounds']} rounds of {t['repeats']} runs, the round with the median "
                     f"speed-up shown; " + spread_rule(t["rounds"], t["max_spread"], t.get("max_others"))
                     + _others(summary["latency"]))
    lines += [f"latency at batch {t['batch']}: {t['note']}" for t in summary["latency"].values() if not t["reliable"]]
    lines.append(f"deployed: {dep['file']} ({dep['format']}), reloaded and checked: max abs error "
                 f"{dep['parity']['max_abs_error']:.3g} (atol {dep['parity']['atol']:g}, rtol {dep['parity']['rtol']:g})")
    return "\n".join(lines)


def _others(latency: dict) -> str:
    """What other processes used of the CPU time while each batch was timed, where it was measured."""
    seen = [(t["batch"], t["others_cpu"]) for t in latency.values() if t.get("others_cpu") is not None]
    return ("" if not seen else " (other processes used " +
            ", ".join(f"{share:.0%} at batch {batch}" for batch, share in seen) + ")")


def _images(epochs: dict) -> str:
    """What one compression epoch trained on (reports written before this was stored say nothing)."""
    per, pool = epochs.get("images_per_epoch"), epochs.get("images_drawn_from")
    if per is None:
        return ""
    shifted = " (shifted and flipped)" if epochs.get("images_augmented") else ""
    return (f", each epoch {per:,} training images{shifted}" if per == pool
            else f", each epoch {per:,} training images{shifted} drawn afresh from {pool:,}")


def markdown(summary: dict, layers: list[dict]) -> str:
    lines = ["# fxtucker compress", "", f"`{summary['command']}`", "", "```text", summary_text(summary), "```",
             "", "## Accuracy after each stage", "",
             f"On {summary['stage_accuracy_images']:,} test images.", "", "| stage | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.4f} |" for k, v in summary["stages"].items() if v.get("accuracy") is not None]
    lines += ["", "## Layers", "", "| layer | full ranks | ranks | MACs before | MACs after | decision |", "|---|---|---|---|---|---|"]
    for l in layers:
        fmt = lambda t: "x".join(map(str, t)) or "-"  # noqa: E731
        lines.append(f"| {l['name']} | {fmt(l['full_ranks'])} | {fmt(l['ranks'])} | {l['macs_before'] or '-'} | "
                     f"{l['macs_after'] or '-'} | {l['decision']} |")
    return "\n".join(lines) + "\n"


def histogram_pngs(stages: dict, out: Path) -> list[str]:
    """One PNG of the gate histogram per stage (the paper's Figure 4), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for stage, info in stages.items():
        hist = info.get("gate_histogram")
        if not hist:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        edges = hist["log10_edges"]
        ax.bar(edges[:-1], hist["counts"], width=edges[1] - edges[0], align="edge")
        ax.set_xlabel("log10 (|gate| / mean |gate| of its vector)" if hist.get("relative") else "log10 |gate|")
        ax.set_ylabel("gates")
        ax.set_title(f"gates after stage '{stage}' ({hist['zeros']} of {hist['total']} exactly 0)")
        fig.tight_layout()
        path = out / f"gates_{stage}.png"
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        written.append(path.name)
    return written
