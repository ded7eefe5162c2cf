"""The wandb logger: one W&B run per run, offline by default (the runs stay in the run directory)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wandb

from ibcore.protocols import LogSession


class WandbLogger:
    def __init__(self, mode: str, project: str, entity: str | None) -> None:
        self.mode = mode
        self.project = project
        self.entity = entity
        self.runs: dict[str, Any] = {}
        self.run_dir = Path(".")

    def start(self, session: LogSession) -> Mapping[str, Any]:
        self.run_dir = session.run_dir
        saved = session.state.get("runs", {})
        ids = {}
        for run in session.runs:
            name = str(run["name"])
            run_id = saved.get(name) if isinstance(saved, Mapping) else None
            handle = wandb.init(
                project=self.project,
                entity=self.entity,
                name=name,
                group=session.experiment,
                tags=[str(run["method"]), f"seed{run['seed']}", session.config_hash],
                config={**session.config, "ibcore": {"method": run["method"], "seed": run["seed"]}},
                dir=str(session.run_dir),
                mode=self.mode,
                id=run_id or secrets.token_hex(4),  # W&B run ids: lowercase letters and digits
                resume="allow",
                reinit="create_new",  # one process, many W&B runs at once
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.runs[name] = handle
            ids[name] = handle.id
        return {"runs": ids, "mode": self.mode}

    def log(self, run: str, epoch: int, metrics: Mapping[str, float]) -> None:
        self.runs[run].log({**metrics, "epoch": epoch}, step=epoch)

    def finish(self, rows: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None:
        for row in rows:
            handle = self.runs.get(str(row["run"]))
            if handle is None:
                continue
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    handle.summary[f"final/{key}"] = value
            handle.summary["final/status"] = str(row.get("status", "ok"))
            for path in files:
                handle.save(str(path), base_path=str(self.run_dir), policy="now")
        for handle in self.runs.values():
            handle.finish()
