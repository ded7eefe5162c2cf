"""The registry as a user sees it: decorators in their own code, clear errors, isolation, wildcards.

Every test registers its own tiny components inside ``ibcore.registry_snapshot()`` so nothing leaks
into other tests and nothing here depends on which built-ins are installed (except where stated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

import ibcore
from ibcore import (
    BuildContext,
    ConfigError,
    ContextError,
    Params,
    ProtocolError,
    RegistryError,
    register_backbone,
    register_loss,
    register_sampler,
    registry_snapshot,
)
from ibcore.registry import available, reset_discovery, resolve

LOCAL = f"local:{__name__}"


class ScaleParams(Params):
    gamma: float = Field(1.0, ge=0.0, description="A non-negative exponent.")
    scale: int = Field(2, ge=1)


class ConstantLoss:
    """A loss that returns the same number whatever it is given (enough to follow the protocol)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, logits: Any, targets: Any, sample_weight: Any = None) -> float:
        return self.value


def _register_tiny_loss(name: str = "tiny_loss") -> None:
    @register_loss(name, ScaleParams, citation="Nobody et al., Nowhere 2024, 'A tiny loss'")
    def build_tiny(params: ScaleParams, context: BuildContext) -> ConstantLoss:
        """A tiny loss for tests.

        Second paragraph, not part of the description.
        """
        return ConstantLoss(params.gamma * params.scale + (context.num_classes or 0))


# --------------------------------------------------------------------------------------------
# Registering in user code


def test_decorator_registers_a_user_component_with_a_local_provider() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        info = resolve("loss", "tiny_loss")
        assert info.provider == LOCAL
        assert info.provider_label == LOCAL
        assert info.qualified_name == f"{LOCAL}:tiny_loss"
        assert info.description == "A tiny loss for tests."
        assert info.citation == "Nobody et al., Nowhere 2024, 'A tiny loss'"
        assert info.params is ScaleParams
        assert "tiny_loss" in available("losses")

        loss = ibcore.build("loss", "tiny_loss", {"gamma": 0.5}, context=BuildContext(num_classes=10))
        assert loss(None, None) == 0.5 * 2 + 10  # validated params (with the default scale) and the context


def test_decorator_returns_the_factory_unchanged() -> None:
    with registry_snapshot():

        def build(params: Params, context: BuildContext) -> ConstantLoss:
            """Constant zero."""
            return ConstantLoss(0.0)

        assert register_loss("zero_loss")(build) is build
        assert build.__ib_component__.name == "zero_loss"  # type: ignore[attr-defined]


def test_a_provider_qualified_name_selects_the_local_component() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        assert resolve("loss", f"{LOCAL}:tiny_loss").provider == LOCAL
        with pytest.raises(RegistryError, match=r"has no provider 'somebody-else'.*providers: local:"):
            resolve("loss", "somebody-else:tiny_loss")


def test_snapshot_restores_the_registry() -> None:
    with registry_snapshot():
        _register_tiny_loss("leaky_loss")
        assert "leaky_loss" in available("loss")
    assert "leaky_loss" not in available("loss")
    with pytest.raises(RegistryError, match="Unknown loss 'leaky_loss'"):
        resolve("loss", "leaky_loss")


def test_snapshot_restores_an_installed_component_replaced_inside_it() -> None:
    before = resolve("loss", "cross_entropy", load=False).provider  # a built-in, from entry points
    with registry_snapshot():

        @register_loss("cross_entropy", replace=True)
        def build_override(params: Params, context: BuildContext) -> ConstantLoss:
            """Override for one test."""
            return ConstantLoss(42.0)

        assert resolve("loss", "cross_entropy").provider == LOCAL
        assert ibcore.build("loss", "cross_entropy")(None, None) == 42.0
    assert resolve("loss", "cross_entropy", load=False).provider == before == "ibcore"


def test_registering_a_name_twice_is_an_error_unless_replace() -> None:
    with registry_snapshot():
        _register_tiny_loss()

        def build_other(params: Params, context: BuildContext) -> ConstantLoss:
            """Another loss that wants the same name."""
            return ConstantLoss(1.0)

        with pytest.raises(
            RegistryError,
            match=r"loss 'tiny_loss' is already registered by local:\S+ "
            r"\(\S+_register_tiny_loss.<locals>.build_tiny\); "
            r"\S+build_other is another definition: choose another name, or pass replace=True",
        ):
            register_loss("tiny_loss")(build_other)

        @register_loss("tiny_loss", replace=True)
        def build_again(params: Params, context: BuildContext) -> ConstantLoss:
            """The replacement."""
            return ConstantLoss(-1.0)

        assert ibcore.build("loss", "tiny_loss")(None, None) == -1.0
        assert resolve("loss", "tiny_loss").description == "The replacement."


NOTEBOOK_CELL = """\
from ibcore import BuildContext, Params, register_loss

@register_loss("ibtest_cell_loss")
def build_cell_loss(params: Params, context: BuildContext):
    \"\"\"%s\"\"\"
    return lambda logits, targets, sample_weight=None: %s
"""


def _run_cell(source: str, module: str = "ibtest_notebook") -> None:
    """Execute ``source`` as a notebook does: in the namespace of one module, again on each run."""
    exec(compile(source, "<cell>", "exec"), {"__name__": module})


def test_re_running_a_notebook_cell_replaces_its_registration() -> None:
    with registry_snapshot():
        _run_cell(NOTEBOOK_CELL % ("First version.", "1.0"))
        _run_cell(NOTEBOOK_CELL % ("Edited and run again.", "2.0"))  # the same function, redefined: no error
        info = resolve("loss", "ibtest_cell_loss")
        assert info.provider == "local:ibtest_notebook"
        assert info.description == "Edited and run again."
        assert ibcore.build("loss", "ibtest_cell_loss")(None, None) == 2.0
        assert [i.provider for i in ibcore.list_components("loss", "ibtest_cell_loss")] == ["local:ibtest_notebook"]


def test_another_function_or_module_under_a_registered_name_still_clashes() -> None:
    with registry_snapshot():
        _run_cell(NOTEBOOK_CELL % ("First.", "1.0"))
        renamed = (NOTEBOOK_CELL % ("Another function.", "3.0")).replace("build_cell_loss", "build_other")
        with pytest.raises(
            RegistryError,
            match=r"already registered by local:ibtest_notebook \(ibtest_notebook\."
            r"build_cell_loss\); ibtest_notebook\.build_other is another definition",
        ):
            _run_cell(renamed)
        with pytest.raises(RegistryError, match=r"'ibtest_cell_loss' is already provided by local:ibtest_notebook"):
            _run_cell(NOTEBOOK_CELL % ("Same function, another module.", "4.0"), module="ibtest_elsewhere")
        # two lambdas of one module share the qualified name '<lambda>': their lines tell them apart
        register_loss("ibtest_lambda")(lambda params, context: ConstantLoss(0.0))
        with pytest.raises(RegistryError, match=r"<lambda> at line \d+ is another definition"):
            register_loss("ibtest_lambda")(lambda params, context: ConstantLoss(1.0))
        assert ibcore.build("loss", "ibtest_cell_loss")(None, None) == 1.0


def test_taking_an_installed_name_in_user_code_needs_replace() -> None:
    with registry_snapshot(), pytest.raises(RegistryError, match=r"'cross_entropy' is already provided by ibcore"):
        register_loss("cross_entropy")(lambda params, context: ConstantLoss(0.0))


def test_the_same_name_may_be_used_by_two_kinds() -> None:
    with registry_snapshot():
        _register_tiny_loss("shared_name")

        @register_sampler("shared_name")
        def build_sampler(params: Params, context: BuildContext) -> Any:
            """A sampler with a loss's name."""
            return _ListSampler([0, 1])

        assert resolve("loss", "shared_name").kind == "loss"
        assert resolve("sampler", "shared_name").kind == "sampler"


@pytest.mark.parametrize("bad_name", ["", "has space", "1starts_with_digit", "semi;colon"])
def test_invalid_names_are_refused(bad_name: str) -> None:
    with registry_snapshot(), pytest.raises(RegistryError, match="Invalid loss name"):
        register_loss(bad_name)(lambda params, context: ConstantLoss(0.0))


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(RegistryError, match=r"Unknown component kind 'lossez'; kinds are: dataset, sampler, loss"):
        ibcore.list_components("lossez")


# --------------------------------------------------------------------------------------------
# Params models


def test_params_model_must_forbid_unknown_keys() -> None:
    class LooseParams(BaseModel):
        gamma: float = 1.0

    with registry_snapshot():
        with pytest.raises(RegistryError, match=r"LooseParams must forbid unknown keys.*ibcore.Params"):
            register_loss("loose", LooseParams)(lambda params, context: ConstantLoss(0.0))

        class StrictParams(BaseModel):  # not derived from ibcore.Params, but forbids extras: accepted
            model_config = ConfigDict(extra="forbid")
            gamma: float = 1.0

        register_loss("strict", StrictParams)(lambda params, context: ConstantLoss(params.gamma))
        assert ibcore.build("loss", "strict", {"gamma": 3.0})(None, None) == 3.0


def test_params_must_be_a_pydantic_model_class() -> None:
    with registry_snapshot(), pytest.raises(RegistryError, match="params must be a pydantic model class"):
        register_loss("dict_params", dict)(lambda params, context: ConstantLoss(0.0))  # type: ignore[arg-type]


def test_params_are_frozen() -> None:
    params = ScaleParams(gamma=2.0)
    with pytest.raises(ValueError):
        params.gamma = 3.0  # type: ignore[misc]


def test_build_reports_bad_params_with_their_path() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        with pytest.raises(ConfigError) as caught:
            ibcore.build("loss", "tiny_loss", {"gamma": -1.0, "scale": "many"})
        paths = sorted(issue.path for issue in caught.value.issues)
        assert paths == ["params.gamma", "params.scale"]
        assert "greater than or equal to 0" in str(caught.value)


def test_build_names_the_unknown_param_key() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        with pytest.raises(ConfigError) as caught:
            ibcore.build("loss", "tiny_loss", {"gama": 1.0})
        [issue] = caught.value.issues
        assert issue.path == "params.gama"
        assert "unknown key 'gama'" in issue.message


def test_build_suggests_the_param_key_meant() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        with pytest.raises(ConfigError, match="did you mean 'gamma'"):
            ibcore.build("loss", "tiny_loss", {"gama": 1.0})


def test_validate_params_accepts_a_params_instance() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        params = ScaleParams(gamma=3.0)
        assert ibcore.validate_params("loss", "tiny_loss", params) is params
        assert ibcore.validate_params("loss", "tiny_loss", None) == ScaleParams()


# --------------------------------------------------------------------------------------------
# Unknown names


def test_unknown_name_error_names_kind_name_close_matches_and_every_available_name() -> None:
    with registry_snapshot():
        _register_tiny_loss("tiny_alpha")
        _register_tiny_loss("tiny_beta")
        with pytest.raises(RegistryError) as caught:
            ibcore.build("loss", "tiny_alpah")
    message = str(caught.value)
    assert message.startswith("Unknown loss 'tiny_alpah'. Did you mean: tiny_alpha")
    assert f"tiny_alpha ({LOCAL})" in message
    assert f"tiny_beta ({LOCAL})" in message
    assert "cross_entropy (ibcore 0.1.0)" in message  # installed components are listed with their provider


def test_unknown_name_with_nothing_close_has_no_suggestion() -> None:
    with registry_snapshot():
        _register_tiny_loss()
        with pytest.raises(RegistryError) as caught:
            resolve("loss", "qqqqqqqq")
    assert "Did you mean" not in str(caught.value)
    assert "Available losses:" in str(caught.value)


def _write_distribution(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """A hand-made installed distribution: ``<name>-0.1.0.dist-info`` with metadata and entry points."""
    dist_info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(entry_points, encoding="utf-8")
    for filename, source in modules.items():
        (root / filename).write_text(source, encoding="utf-8")


def test_unknown_name_error_lists_plugins_that_failed_to_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_distribution(
        tmp_path,
        "ib-test-exploding",
        "[ibcore.losses]\nexploding_loss = ib_test_exploding_mod\n",
        {"ib_test_exploding_mod.py": "raise RuntimeError('the plugin exploded at import')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with registry_snapshot():
        reset_discovery()  # rediscover with the new distribution on sys.path
        failed = [i for i in ibcore.list_components("loss") if i.provider == "ib-test-exploding"]
        assert [(i.name, i.error is not None) for i in failed] == [("exploding_loss", True)]
        with pytest.raises(RegistryError) as caught:
            resolve("loss", "no_such_loss")
        message = str(caught.value)
        assert "exploding_loss (ib-test-exploding 0.1.0)" in message
        assert "Plugins that failed to load:" in message
        assert "RuntimeError: the plugin exploded at import" in message

        # Using the broken component raises with the original exception as the cause.
        with pytest.raises(RegistryError, match="'exploding_loss' cannot be used") as used:
            ibcore.build("loss", "exploding_loss")
        assert isinstance(used.value.__cause__, RuntimeError)


def test_no_components_of_a_kind_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IB_DISABLE_PLUGINS", "ibcore")
    with registry_snapshot():
        reset_discovery()
        with pytest.raises(RegistryError, match=r"No losses are installed"):
            resolve("loss", "no_such_loss")
        # a name the disabled distribution provides says why it is missing
        with pytest.raises(RegistryError, match=r"provided by ibcore, which IB_DISABLE_PLUGINS switches off"):
            resolve("loss", "cross_entropy")


# --------------------------------------------------------------------------------------------
# Protocol check at build time


class _ListSampler:
    def __init__(self, indices: list[int]) -> None:
        self._indices = indices

    def indices(self, epoch: int) -> list[int]:
        return self._indices

    def __len__(self) -> int:
        return len(self._indices)


def test_build_checks_the_protocol_and_lists_every_missing_member() -> None:
    with registry_snapshot():

        @register_sampler("not_a_sampler")
        def build_nothing(params: Params, context: BuildContext) -> object:
            """Returns the wrong thing."""
            return object()

        with pytest.raises(ProtocolError, match=r"sampler 'not_a_sampler' .* missing: indices, __len__\."):
            ibcore.build("sampler", "not_a_sampler")

        @register_backbone("half_backbone")
        def build_half(params: Params, context: BuildContext) -> Any:
            """A callable with nothing else a backbone needs."""
            return ConstantLoss(0.0)

        with pytest.raises(ProtocolError) as caught:
            ibcore.build("backbone", "half_backbone")
        assert str(caught.value).endswith(
            "missing: features, forward_mixed, reset_classifier, num_classes, feature_dim, num_mix_layers, classifier."
        )

        @register_sampler("good_sampler")
        def build_good(params: Params, context: BuildContext) -> _ListSampler:
            """Two fixed indices."""
            return _ListSampler([1, 0])

        assert len(ibcore.build("sampler", "good_sampler")) == 2


def test_a_registered_class_is_checked_at_registration() -> None:
    class HalfSampler:
        """Has indices but no __len__."""

        def __init__(self, params: Params, context: BuildContext) -> None:
            pass

        def indices(self, epoch: int) -> list[int]:
            return []

    with registry_snapshot(), pytest.raises(RegistryError, match=r"class HalfSampler .* missing: __len__\."):
        register_sampler("half")(HalfSampler)


def test_a_component_asking_for_missing_context_gets_a_clear_error() -> None:
    with registry_snapshot():

        @register_loss("needs_counts")
        def build_needs(params: Params, context: BuildContext) -> ConstantLoss:
            """Needs class counts."""
            context.require("loss 'needs_counts'", "class_counts", "num_classes")
            return ConstantLoss(0.0)

        with pytest.raises(ContextError, match=r"loss 'needs_counts' needs class_counts, num_classes"):
            ibcore.build("loss", "needs_counts")
        context = BuildContext.from_targets([0, 0, 1], num_classes=2)
        assert context.class_counts == (2, 1)
        ibcore.build("loss", "needs_counts", context=context)


# --------------------------------------------------------------------------------------------
# Listing with wildcards


def test_list_components_filters_by_kind_and_shell_pattern() -> None:
    with registry_snapshot():
        for name in ("zz_alpha_one", "zz_alpha_two", "zz_beta"):
            _register_tiny_loss(name)

        @register_sampler("zz_alpha_sampler")
        def build_sampler(params: Params, context: BuildContext) -> _ListSampler:
            """A sampler."""
            return _ListSampler([0])

        def names(*args: Any) -> list[str]:
            return [info.name for info in ibcore.list_components(*args)]

        assert names("loss", "zz_alpha*") == ["zz_alpha_one", "zz_alpha_two"]
        assert names("losses", "zz_?eta") == ["zz_beta"]  # plural kinds are accepted, like `ib list losses`
        assert names("loss", "zz_alpha_[!o]*") == ["zz_alpha_two"]
        assert names("sampler", "zz_*") == ["zz_alpha_sampler"]
        # Without a kind: every kind, in KINDS order (sampler before loss), then by name.
        assert names(None, "zz_alpha*") == ["zz_alpha_sampler", "zz_alpha_one", "zz_alpha_two"]
        assert names("loss", "ZZ_*") == []  # patterns are case-sensitive, like names
        infos = ibcore.list_components("loss", "zz_beta")
        assert [(i.kind, i.provider, i.description) for i in infos] == [("loss", LOCAL, "A tiny loss for tests.")]


def test_list_components_finds_installed_components_by_pattern() -> None:
    resnets = [info.name for info in ibcore.list_components("backbone", "resnet*", load=False)]
    assert "resnet32" in resnets
    assert all(name.startswith("resnet") for name in resnets)
