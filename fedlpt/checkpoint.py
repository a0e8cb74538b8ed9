"""Checkpoints: all a run needs to continue after its last completed round.

After every round the ServerApp writes ``checkpoint.pt`` into the run folder, atomically
(written beside it, then renamed over it): the global model, the state of the strategy
chain (the server EMA, the inner strategy's moments, the traffic and screen history), the
per-round results, and the random states (Flower samples nodes with Python's ``random``).
``resume-from = "<run folder>"`` continues from it, and an in-process run resumed this way
ends exactly as an uninterrupted one.

What a checkpoint cannot hold is the clients' own state: Flower keeps a node's state (here
its Adam moments) per run, so in a deployment a resumed run starts the clients' optimizer
state afresh, as the first round of any run does.

The file holds tensors, numbers and strings only, read back with ``weights_only=True``.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .results import write_atomically

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
# Keys a resumed run may change; every other run-config key must equal the checkpoint's.
RESUMABLE_CHANGES = frozenset(
    {"num-server-rounds", "resume-from", "round-timeout", "device", "max-failed-rounds"}
)


class CheckpointError(ValueError):
    """A run folder holds no usable checkpoint, or one this run config cannot continue."""


@dataclass
class Checkpoint:
    """The state of a run after round ``server_round``."""

    server_round: int
    model: dict[str, Tensor]
    strategy: dict[str, Any]
    results: dict[str, Any]
    run_config: dict[str, Any]
    python_random: tuple[Any, ...]
    torch_random: Tensor

    @classmethod
    def capture(
        cls,
        server_round: int,
        model: dict[str, Tensor],
        strategy: dict[str, Any],
        results: dict[str, Any],
        run_config: dict[str, Any],
    ) -> Checkpoint:
        """A checkpoint of the current process's random states and the given run state."""
        return cls(
            server_round,
            model,
            strategy,
            results,
            dict(run_config),
            random.getstate(),
            torch.get_rng_state(),
        )

    def restore_random(self) -> None:
        """Put Python's and torch's random states back as they were."""
        version, internal, gauss = self.python_random
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(self.torch_random)

    def save(self, folder: Path) -> Path:
        """Write ``folder/checkpoint.pt`` atomically; returns its path."""
        buffer = io.BytesIO()
        torch.save({"version": FORMAT_VERSION, **self.__dict__}, buffer)
        path = folder / CHECKPOINT_FILE
        write_atomically(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, folder: Path) -> Checkpoint:
        """Read ``folder/checkpoint.pt``; CheckpointError names what is wrong."""
        path = Path(folder).expanduser() / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"resume-from: {path} does not exist (is it a run folder?)")
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise CheckpointError(f"resume-from: {path} cannot be read: {err}") from None
        if not isinstance(saved, dict) or saved.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"resume-from: {path} is not a fedlpt checkpoint (version 1)")
        fields = set(cls.__dataclass_fields__)
        if set(saved) - {"version"} != fields:
            raise CheckpointError(f"resume-from: {path} lacks {sorted(fields - set(saved))}")
        return cls(**{name: saved[name] for name in fields})

    def check_continues(self, run_config: dict[str, Any]) -> None:
        """Raise CheckpointError unless ``run_config`` is this run's, bar resumable keys."""
        keys = (set(run_config) | set(self.run_config)) - RESUMABLE_CHANGES
        changed = sorted(k for k in keys if run_config.get(k) != self.run_config.get(k))
        if changed:
            details = ", ".join(
                f"{k}: {self.run_config.get(k)!r} -> {run_config.get(k)!r}" for k in changed
            )
            raise CheckpointError(
                f"resume-from: the run config differs from the checkpoint's in {details}; "
                f"only {sorted(RESUMABLE_CHANGES)} may change"
            )
        if run_config.get("num-server-rounds", 0) <= self.server_round:
            raise CheckpointError(
                f"resume-from: the checkpoint has completed round {self.server_round}; "
                f"num-server-rounds = {run_config.get('num-server-rounds')} leaves nothing to do"
            )
