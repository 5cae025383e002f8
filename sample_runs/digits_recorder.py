"""Record an ensemble from inside the training loop with doodl3's Recorder.

    python sample_runs/digits_recorder.py runs/recorded
    cp configs/digits-mlp.toml runs/recorded/doodl3.toml
    doodl3 run runs/recorded
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from doodl3_cli import zoo
from doodl3_cli.record import Recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder to record into")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    inputs, targets = zoo.digits("train")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = zoo.mlp(64, [64, 32], 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        with Recorder(args.run, model, trajectory=f"seed{seed}", attrs={"seed": seed, "learning_rate": args.lr}) as rec:
            for step in range(args.steps):
                loss = F.cross_entropy(model(inputs), targets)
                if step % 5 == 0:
                    rec.record(step, loss=loss.item(), lr=args.lr)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    print(f"recorded {args.seeds} runs into {args.run / 'trajectory.h5'}")


if __name__ == "__main__":
    main()
