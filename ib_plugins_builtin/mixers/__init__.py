"""Built-in mixers (registered on import; torch is imported by the factories).

Each mixer draws ONE lambda and ONE pairing per batch and uses them for both the inputs (or
hidden activations) and the label weights, from the trainer's generator only. Every mixer takes
``prob`` (the fraction of batches it mixes; the others get an identity plan) and
``disable_last_epochs`` (no mixing in the last N epochs: "fine-tuning without mixup").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from ibcore import BuildContext, ConfigError, ConfigIssue, Params, register_mixer

if TYPE_CHECKING:
    from ib_plugins_builtin.mixers._impl import CutMix, InputMixup, ManifoldMixup, Remix


class MixerParams(Params):
    """Params every built-in mixer takes."""

    prob: float = Field(
        1.0, ge=0.0, le=1.0, description="probability that a batch is mixed; other batches pass unchanged"
    )
    disable_last_epochs: int = Field(
        0, ge=0, description="switch mixing off for the last N epochs (fine-tuning without mixup)"
    )


class InputMixupParams(MixerParams):
    """Params of input mixup."""

    alpha: float = Field(1.0, gt=0.0, description="lambda ~ Beta(alpha, alpha)")


class ManifoldMixupParams(MixerParams):
    """Params of manifold mixup."""

    alpha: float = Field(2.0, gt=0.0, description="lambda ~ Beta(alpha, alpha); Verma et al. use 2.0")
    layers: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        (0, 1, 2),
        min_length=1,
        description="layers to mix at, one drawn uniformly per batch: 0 = input, k = output of stage k",
    )


class CutMixParams(MixerParams):
    """Params of CutMix."""

    alpha: float = Field(1.0, gt=0.0, description="box area fraction ~ Beta(alpha, alpha)")


class RemixParams(MixerParams):
    """Params of Remix."""

    alpha: float = Field(1.0, gt=0.0, description="lambda ~ Beta(alpha, alpha)")
    kappa: float = Field(3.0, ge=1.0, description="class-count ratio at which a pair counts as majority/minority")
    tau: float = Field(0.5, ge=0.0, le=1.0, description="lambda threshold below which the minority label wins")


def _disable_from(component: str, params: MixerParams, context: BuildContext) -> int | None:
    """First epoch without mixing, or None; needs ``context.epochs`` only when an epoch count is given."""
    if params.disable_last_epochs == 0:
        return None
    from ib_plugins_builtin.mixers._impl import disable_from_epoch

    context.require(component, "epochs")
    return disable_from_epoch(component, params.disable_last_epochs, int(context.epochs))  # type: ignore[arg-type]


@register_mixer(
    "input_mixup", InputMixupParams, citation="Zhang et al., ICLR 2018, 'mixup: Beyond Empirical Risk Minimization'"
)
def build_input_mixup(params: InputMixupParams, context: BuildContext) -> InputMixup:
    """mixup: train on convex combinations of input pairs and of their labels, lambda ~ Beta(alpha, alpha)."""
    from ib_plugins_builtin.mixers._impl import InputMixup

    disable_from = _disable_from("mixer 'input_mixup'", params, context)
    return InputMixup(params.alpha, prob=params.prob, disable_from_epoch=disable_from)


@register_mixer(
    "manifold_mixup",
    ManifoldMixupParams,
    citation="Verma et al., ICML 2019, 'Manifold Mixup: Better Representations by Interpolating Hidden States'",
)
def build_manifold_mixup(params: ManifoldMixupParams, context: BuildContext) -> ManifoldMixup:
    """Manifold mixup: mixup of the input or of a hidden layer's activations, the layer drawn per batch."""
    from ib_plugins_builtin.mixers._impl import ManifoldMixup

    component = "mixer 'manifold_mixup'"
    backbone = context.backbone
    if backbone is not None:
        deepest = int(getattr(backbone, "num_mix_layers", 0))
        too_deep = [layer for layer in params.layers if layer > deepest]
        if too_deep:
            raise ConfigError(
                [
                    ConfigIssue(
                        "params.layers",
                        f"{component}: the backbone can mix at layers 0..{deepest} (0 = input, k = output of "
                        f"stage k); {too_deep} are out of range",
                    )
                ]
            )
    disable_from = _disable_from(component, params, context)
    return ManifoldMixup(params.alpha, params.layers, prob=params.prob, disable_from_epoch=disable_from)


@register_mixer(
    "cutmix",
    CutMixParams,
    citation="Yun et al., ICCV 2019, 'CutMix: Regularization Strategy to Train Strong Classifiers with Localizable "
    "Features'",
)
def build_cutmix(params: CutMixParams, context: BuildContext) -> CutMix:
    """CutMix: paste a random box from a partner image; labels weighted by the area each image keeps."""
    from ib_plugins_builtin.mixers._impl import CutMix

    disable_from = _disable_from("mixer 'cutmix'", params, context)
    return CutMix(params.alpha, prob=params.prob, disable_from_epoch=disable_from)


@register_mixer("remix", RemixParams, citation="Chou et al., ECCV Workshops 2020, 'Remix: Rebalanced Mixup'")
def build_remix(params: RemixParams, context: BuildContext) -> Remix:
    """Remix: mixup of inputs whose label weight moves to the minority class of an imbalanced pair."""
    from ib_plugins_builtin.mixers._impl import Remix

    component = "mixer 'remix'"
    context.require(component, "class_counts")
    disable_from = _disable_from(component, params, context)
    return Remix(
        params.alpha,
        context.class_counts,  # type: ignore[arg-type]  # require() checked it is set
        kappa=params.kappa,
        tau=params.tau,
        prob=params.prob,
        disable_from_epoch=disable_from,
    )


__all__ = [
    "CutMixParams",
    "InputMixupParams",
    "ManifoldMixupParams",
    "MixerParams",
    "RemixParams",
    "build_cutmix",
    "build_input_mixup",
    "build_manifold_mixup",
    "build_remix",
]
