"""`mlxtune train -c CONFIG [--resume [PATH] | --overwrite] [--quiet] [--section.key value ...]`: arguments →
trainer.train. Exit codes: 0 done (or already finished), 2 a bad input, 130 / 143 / 129 stopped by SIGINT /
SIGTERM / SIGHUP after a checkpoint (resumable)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the `train` subcommand."""
    p = sub.add_parser(
        "train",
        help="fine-tune with LoRA from a YAML config",
        description="Fine-tune with LoRA. Any config field can be overridden: --lora.rank 32 --train.learning_rate 2e-4",
    )
    p.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the latest checkpoint in output_dir, or from PATH (a step dir or run dir); "
                        "resuming from an older checkpoint moves the newer ones to checkpoints/abandoned-<time>/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of the mlxtune run in output_dir (never a dir holding other files)")
    p.add_argument("--quiet", action="store_true", help="no per-step reports")
    p.set_defaults(func=run_train, accepts_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    """Train (as one of several processes when started by mlx.launch); print where the adapter is."""
    from ..distributed import DistributedError, is_peer_lost, maybe_init
    from ..trainer import train

    world = maybe_init()  # None unless started by mlx.launch (or mpirun) as one of several processes
    try:
        result = train(args.config, resume=args.resume, overwrite=args.overwrite, overrides=args.overrides,
                       quiet=args.quiet, world=world)
    except RuntimeError as e:
        if world is None or not is_peer_lost(e):
            raise
        raise DistributedError(f"process {world.rank()}: {e} (another process failed or was killed; see its output)") from None
    if result.already_finished:  # said in one line by the trainer
        return 0
    if world is None or world.rank() == 0:
        print(f"run dir: {result.run_dir}")
        print(f"adapter: {result.run_dir / 'adapters.safetensors'} (+ adapter_config.json)")
        if result.metrics.get("val_loss") is not None:
            print(f"final val loss {result.metrics['val_loss']:.4f} (ppl {result.metrics['val_ppl']:.3f})")
    return (128 + (result.stop_signal or 2)) if result.interrupted else 0
