"""What the benchmark scripts share: their model options (--weights, --threads)."""
from __future__ import annotations

import argparse

import torch

import trex2


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--weights", default=None, help="model weights (default: the shipped ones)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def load_model(args: argparse.Namespace):
    """Sets the thread count, then loads the weights the options name."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return trex2.load_model(args.weights)
