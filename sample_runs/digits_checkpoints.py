"""Train an MLP on the bundled digits and save a state_dict every few steps.

Then record the folder and analyse it:

    python sample_runs/digits_checkpoints.py ckpts/seed0 --seed 0
    mkdir -p runs/digits && cp configs/digits-mlp.toml runs/digits/doodl3.toml
    doodl3 record runs/digits --from ckpts/seed0 --attr seed=0 --attr lr=0.3
    doodl3 run runs/digits
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from doodl3_cli import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write step-N.pt files into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    inputs, targets = zoo.digits("train")
    model = zoo.mlp(64, [64, 32], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            torch.save(model.state_dict(), args.out / f"step-{step}.pt")
        if step == args.steps:
            break
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final train loss {loss.item():.4f}; checkpoints in {args.out}")


if __name__ == "__main__":
    main()
