"""Built-in experiment trackers (``loggers:``), each behind its own optional extra.

``tensorboard`` (``pip install 'ibcore[tensorboard]'``), ``mlflow`` (``ibcore[mlflow]``, a local file store unless
a tracking URI is given) and ``wandb`` (``ibcore[wandb]``, offline unless asked: nothing leaves the machine). Each
run of the experiment (and each post-hoc variant) is one run in the tracker, tagged with its method, seed and the
config's hash. The trackers' packages are imported by the factories only, so ``ib list`` and ``ib validate`` stay
light; a missing package is a config error that names the extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ibcore import BuildContext, ContextError, Params, register_logger

if TYPE_CHECKING:
    from ib_plugins_builtin.loggers._mlflow import MlflowLogger
    from ib_plugins_builtin.loggers._tensorboard import TensorBoardLogger
    from ib_plugins_builtin.loggers._wandb import WandbLogger


def _require(module: str, extra: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ContextError(
            f"needs the {module!r} package, which is not installed ({exc}); install it with "
            f"pip install 'ibcore[{extra}]'"
        ) from None


class TensorBoardParams(Params):
    log_dir: str | None = Field(
        None, description="folder of the event files; default: tensorboard/ in the run directory (one folder per run)"
    )


@register_logger("tensorboard", TensorBoardParams)
def build_tensorboard(params: TensorBoardParams, context: BuildContext) -> TensorBoardLogger:
    """TensorBoard event files per run: scalars per epoch, the config, the results table and the plots."""
    _require("tensorboard", "tensorboard")
    from ib_plugins_builtin.loggers._tensorboard import TensorBoardLogger

    return TensorBoardLogger(params.log_dir)


class MlflowParams(Params):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a local file store, mlruns/ beside the run directories"
    )
    experiment: str = Field("ibcore", min_length=1, description="MLflow experiment the runs are grouped in")


@register_logger("mlflow", MlflowParams)
def build_mlflow(params: MlflowParams, context: BuildContext) -> MlflowLogger:
    """MLflow runs: the resolved config as params, metrics per epoch, tables and plots as artifacts."""
    _require("mlflow", "mlflow")
    from ib_plugins_builtin.loggers._mlflow import MlflowLogger

    return MlflowLogger(params.tracking_uri, params.experiment)


class WandbParams(Params):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline by default: the runs stay in wandb/ of the run directory until `wandb sync`"
    )
    project: str = Field("ibcore", min_length=1)
    entity: str | None = None


@register_logger("wandb", WandbParams)
def build_wandb(params: WandbParams, context: BuildContext) -> WandbLogger:
    """Weights & Biases runs (offline unless mode: online), grouped by experiment, config and metrics per epoch."""
    _require("wandb", "wandb")
    from ib_plugins_builtin.loggers._wandb import WandbLogger

    return WandbLogger(params.mode, params.project, params.entity)


__all__ = ["build_mlflow", "build_tensorboard", "build_wandb"]
