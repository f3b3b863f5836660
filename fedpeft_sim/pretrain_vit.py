"""A small ViT pretrained on Fashion-MNIST classes 0–4: the base model of the report's image task.

No pretrained image transformer is available offline as a Hugging Face folder here, so the image
task is a transfer task built from real data: the base learns T-shirt/top, Trouser, Pullover,
Dress and Coat centrally (this script), and the federation fine-tunes LoRA + a head on the other
five classes (Sandal, Shirt, Sneaker, Bag, Ankle boot), which the base has never seen.

Usage: .venv/bin/python -m fedpeft_sim.pretrain_vit --out runs/vit-fmnist-0-4 (torch, transformers).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from edge_sdk.datasets import fashion_mnist

BASE_CLASSES = (0, 1, 2, 3, 4)
PRETRAINING_FILE = "pretraining.json"


def pretrain(out: Path, epochs: int = 3, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train the ViT on the base classes of the train split and save it (atomically) as a HF folder."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    images, labels = _base_split("train")
    test_images, test_labels = _base_split("test")
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=256, num_labels=len(BASE_CLASSES))
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * (len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = model(pixel_values=images[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(pixel_values=test_images[i:i + 1000]).logits.argmax(-1)
                               for i in range(0, len(test_images), 1000)])
    result = {"base_accuracy": float((predicted == test_labels).float().mean()), "epochs": epochs,
              "seconds": round(time.perf_counter() - started, 1), "samples": len(images)}
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(work)
        ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]).save_pretrained(work)
        (work / PRETRAINING_FILE).write_text(json.dumps(result, indent=1))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


def _base_split(split: str):
    """Images of the base classes as normalized (N, 1, 28, 28) float tensors, labels 0–4."""
    import torch

    examples = [e for e in fashion_mnist(split) if e.label in BASE_CLASSES]
    images = np.stack([e.x for e in examples]).astype(np.float32) / 255.0
    images = (images - 0.5) / 0.5
    labels = np.array([BASE_CLASSES.index(e.label) for e in examples])
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels)


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Hugging Face model folder to write.")
@click.option("--epochs", default=3, show_default=True)
def main(out: Path, epochs: int) -> None:
    """Pretrain the image task's base model and report its accuracy on the base classes' test images."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = pretrain(out, epochs=epochs)
    click.echo(f"wrote {out}: accuracy {result['base_accuracy']:.3f} on the base classes' test images "
               f"({result['samples']} training images, {result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
