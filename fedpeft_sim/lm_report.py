"""The results report's language-model section: the personalization runs recorded under results/runs/lm/."""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft_sim.personalization import SETTINGS

FOLDER = "lm"
"""Beside the grid's records: one `<run>.json` (a `fedpeft-sim personalize` summary.json) per recorded run."""
BASE_REDUCTION_TARGET = 0.20
PERSONAL_SHARE_TARGET = 0.80
LABELS = {"base": "base model", "global": "federated global", "personalized": "personalized global",
          "local_only": "local-only"}


def load(store: Path) -> dict[str, dict]:
    """Recorded personalization summaries by run name."""
    folder = store / FOLDER
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def section(store: Path) -> list[str]:
    """Markdown for every recorded run: per-user perplexity four ways, the targets, the curve and the samples."""
    runs = load(store)
    lines = ["## Personalized text generation (causal LM, per-writer federation)", ""]
    if not runs:
        return lines + ["No run is recorded yet (`fedpeft-sim personalize`, see docs/experiments.md).", ""]
    for name, summary in runs.items():
        lines += _run(name, summary)
    return lines


def _run(name: str, s: dict) -> list[str]:
    c = s["config"]
    participation = c["rounds"] * c["clients_per_round"] / s["users"]
    lines = [
        f"### {name}", "",
        f"`{Path(c['bundle']).name}` bundle, tiers r={', '.join(map(str, s['ranks']))} in turn over {s['users']} users "
        f"(the characters with the most speeches; the last {c['held_out']:.0%} of each one's speeches held out, at most "
        f"{c['max_eval_texts']} scored), {c['strategy']}, {c['rounds']} rounds of {c['clients_per_round']} clients, "
        f"{c['steps']} local AdamW steps of {c['batch_size']} speeches at lr {c['lr']:g} (about "
        f"{participation:.1f} rounds a user); personalization: {c['personal_steps']} steps on the user's own "
        f"speeches from the final global; local-only: {c['local_steps']} steps from the bundle's initial adapter. "
        f"Personalization lr {c['personal_lr'] or c['lr']:g}. One seed ({c['seed']}); "
        + (f"{s['wall_seconds'] / 60:.0f} min of scoring on a resumed finished federation." if c.get("reuse")
           else f"{s['wall_seconds'] / 60:.0f} min on this machine."), "",
        "| held-out perplexity | " + " | ".join(LABELS[k] for k in SETTINGS) + " |",
        "|---|" + "---:|" * len(SETTINGS),
        "| mean over users | " + " | ".join(f"{s['mean_perplexity'][k]:.1f}" for k in SETTINGS) + " |",
        "| worst user | " + " | ".join(f"{s['worst_perplexity'][k]:.1f}" for k in SETTINGS) + " |", "",
    ]
    reduction, share = s["global_vs_base_mean_reduction"], s["personalized_below_global_share"]
    lines += [
        "| target | measured | met |", "|---|---:|---|",
        f"| global below base, mean over users ≥ {BASE_REDUCTION_TARGET:.0%} | {reduction:.1%} | "
        f"{'yes' if reduction >= BASE_REDUCTION_TARGET else 'no'} |",
        f"| personalized below global on ≥ {PERSONAL_SHARE_TARGET:.0%} of users | {share:.0%} | "
        f"{'yes' if share >= PERSONAL_SHARE_TARGET else 'no'} |",
        f"| personalized below local-only | {s['personalized_below_local_only_share']:.0%} of users | — |", "",
        "Pooled held-out perplexity of the global (top tier) by round: "
        + ", ".join(f"{r['round']}: {r['pooled_perplexity']:.1f}" for r in s["rounds"]) + ".", "",
    ]
    for sample in s["samples"]:
        lines += [f"Greedy continuations for {sample['user']} (r={sample['rank']}), prompt \"{sample['prompt']}\":", ""]
        lines += [f"- {LABELS[k]}: \"{' '.join(sample[k].split())}\"" for k in ("base", "global", "personalized")]
        lines.append("")
    return lines
