"""Training throughput of the trainable vs a bare PyTorch loop: same model, data, batch and threads.

Both loops train the same timm model on the same digits DataLoader (same
transforms, batch and thread count) for the same number of epochs; the ratio
is images/s of ``train_classifier`` over images/s of the bare loop. Target >= 0.95.
With ``--device cuda`` (where a GPU is) both run bf16 autocast on channels_last
inputs and weights: the recipe with ``runtime.amp`` and ``runtime.channels_last``.

    python bench/throughput.py [--epochs 3] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from spaces import resolve_recipe  # noqa: E402
from trainables import LocalSession, train_classifier  # noqa: E402
from trainables.classification import build_model, build_transforms  # noqa: E402
from trainables.engine import seed_everything  # noqa: E402
from trainables.data import build_datasets  # noqa: E402

OVERRIDES = {
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "loss.name": "ce",
    "reg.mixup_alpha": 0.0,
    "reg.cutmix_alpha": 0.0,
    "schedule.warmup_epochs": 0,
}


def bare_loop(recipe, epochs: int, device: torch.device) -> float:
    """A plain PyTorch loop: SGD, cross-entropy, no schedule, no eval (on a GPU: bf16, channels_last). Returns images/s."""
    seed_everything(0)
    cuda = device.type == "cuda"
    train_tf, eval_tf = build_transforms(recipe)
    data = build_datasets(recipe.data, 0, train_tf, eval_tf)
    loader = DataLoader(data.train, batch_size=recipe.optim.batch_size, sampler=RandomSampler(data.train), drop_last=True, pin_memory=cuda)
    model = build_model(recipe, data.num_classes).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.optim.lr, momentum=0.9)
    seen, elapsed = 0, 0.0
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
        if cuda:
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - started
    return seen / elapsed


def trainable(recipe) -> float:
    session = LocalSession()
    train_classifier(recipe, session)
    return sum(r.metrics["images_per_s"] for r in session.reports) / len(session.reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/throughput.py: --device cuda needs a CUDA GPU, and this machine has none", file=sys.stderr)
        raise SystemExit(2)
    gpu = {"runtime.amp": True, "runtime.channels_last": True} if device.type == "cuda" else {}
    recipe = resolve_recipe("rsb-digits", {**OVERRIDES, **gpu, "schedule.epochs": args.epochs, "runtime.cpus_per_worker": args.threads})
    torch.set_num_threads(args.threads)
    results = {}
    for name, run in (("bare", lambda: bare_loop(recipe, args.epochs, device)), ("trainable", lambda: trainable(recipe))) * 2:
        results.setdefault(name, []).append(run())  # alternate, twice, to share machine noise
    bare, ours = max(results["bare"]), max(results["trainable"])
    where = f"{torch.cuda.get_device_name(0)}, bf16 + channels_last" if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"training throughput, {recipe.model.name} on digits {recipe.data.train_size}px, batch {recipe.optim.batch_size}, {where}")
    print(f"bare PyTorch loop      {bare:8.0f} images/s")
    print(f"train_classifier       {ours:8.0f} images/s")
    print(f"ratio trainable / bare: {ours / bare:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
