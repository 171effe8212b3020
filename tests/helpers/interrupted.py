"""A run that "dies" part-way: the resume tests train a few epochs by hand, stop without the trainer's end of
run, and then let ``--resume`` finish it, to compare it with an uninterrupted run."""

from __future__ import annotations

from pathlib import Path


def train_then_die(cfg, run_dir: Path, epochs: int) -> None:
    """Set up a Trainer for ``cfg`` in ``run_dir``, train its first ``epochs`` epochs (each ends with its
    checkpoint, as in a real run), close TensorBoard and drop the trainer, as a killed process would leave it."""
    from torch.utils.tensorboard import SummaryWriter

    from mnseg.engine.trainer import Trainer

    trainer = Trainer(cfg, run_dir, progress=False)
    trainer.setup()
    trainer.tb = SummaryWriter(str(Path(run_dir) / "tb"))
    for epoch in range(epochs):
        trainer._train_epoch(epoch)
    trainer.tb.close()
