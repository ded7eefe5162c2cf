"""The tensorboard logger: one event-file folder per run, written with torch's SummaryWriter."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from ibcore.protocols import LogSession


class TensorBoardLogger:
    def __init__(self, log_dir: str | None) -> None:
        self.log_dir = log_dir
        self.writers: dict[str, SummaryWriter] = {}
        self.root = Path(".")
        self.purge_step: int | None = None

    def start(self, session: LogSession) -> Mapping[str, Any]:
        self.root = Path(self.log_dir) if self.log_dir else session.run_dir / "tensorboard"
        # A resume drops what was logged after the checkpoint it continues from (TensorBoard's purge_step).
        self.purge_step = session.epoch + 1 if session.resumed else None
        for run in session.runs:
            writer = self._writer(str(run["name"]))
            if not session.resumed:
                tags = f"method {run['method']}, seed {run['seed']}, config {session.config_hash}"
                writer.add_text("run", tags, 0)
                writer.add_text("config", "```\n" + json.dumps(session.config, indent=2, default=str) + "\n```", 0)
        return {"log_dir": str(self.root)}

    def _writer(self, run: str) -> SummaryWriter:
        if run not in self.writers:
            self.writers[run] = SummaryWriter(str(self.root / run), purge_step=self.purge_step)
        return self.writers[run]

    def log(self, run: str, epoch: int, metrics: Mapping[str, float]) -> None:
        writer = self._writer(run)
        for key, value in metrics.items():
            writer.add_scalar(key, value, epoch)

    def finish(self, rows: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None:
        from torchvision.io import decode_png, read_file

        table = next((f for f in files if f.name == "results.md"), None)
        pictures = [f for f in files if f.suffix == ".png"]
        for row in rows:
            writer = self._writer(str(row["run"]))
            epoch = int(row.get("epoch", 0) or 0)
            per_class = row.get("per_class_acc")
            if isinstance(per_class, list):  # the final per-class accuracy, one scalar per class
                for index, value in enumerate(per_class):
                    if isinstance(value, (int, float)):
                        writer.add_scalar(f"final/class_acc/{index}", float(value), epoch)
            if table is not None:
                writer.add_text("results", table.read_text(encoding="utf-8"), epoch)
        if pictures and rows:
            writer = self._writer(str(rows[0]["run"]))  # the plots compare every run: attached once
            for picture in pictures:
                writer.add_image(f"plots/{picture.stem}", decode_png(read_file(str(picture)))[:3], 0)
        for writer in self.writers.values():
            writer.close()
