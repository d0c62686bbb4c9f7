"""The attention-neuron methods are one registry (attention_neurons.METHOD_SPECS): the names, definitions
and properties every other place reads are derived from it, and the light copy of the names the command
line uses agrees with it."""
import importlib

import pytest

import attention_neurons as an


def test_the_registry_is_the_methods():
    assert tuple(an.METHOD_SPECS) == an.METHODS == ("attention_weighted", "gradient_guided", "rollout")
    assert list(an.DEFINITIONS) == list(an.METHODS)
    for name, spec in an.METHOD_SPECS.items():
        assert isinstance(spec, an.MethodSpec) and spec.name == name
        assert spec.definition == an.DEFINITIONS[name]
        assert an.method_spec(name) is spec
    assert [m for m, s in an.METHOD_SPECS.items() if s.needs_gradient] == ["gradient_guided"]
    assert [m for m, s in an.METHOD_SPECS.items() if s.reads_lower_layers] == ["rollout"]
    assert an.needs_gradient(an.METHODS) and not an.needs_gradient(("attention_weighted", "rollout"))
    assert an.lower_layer_methods(("rollout", "attention_weighted", "rollout")) == ("rollout",)


def test_a_spec_is_frozen_and_complete_for_its_kind():
    spec = an.METHOD_SPECS["attention_weighted"]
    with pytest.raises(AttributeError):
        spec.needs_gradient = True
    with pytest.raises(ValueError, match="'contribution' method gives"):
        an.MethodSpec("half", "text", "contribution", needs_gradient=False, reference=spec.reference,
                      contribution=spec.contribution)
    with pytest.raises(ValueError, match="'rollout' method none"):
        an.MethodSpec("odd", "text", "rollout", needs_gradient=False, reference=spec.reference,
                      contribution=spec.contribution, signed_rows=spec.signed_rows, shared_map=spec.shared_map)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        an.method_spec("nope")


def test_the_command_lines_light_copy_of_the_names_is_the_registrys():
    """options.py (and pipeline.py, where it still has one) names the methods without importing torch, for
    --help: every such copy equals METHODS."""
    copies = {}
    for name in ("options", "pipeline"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "ATTENTION_METHODS"):
            copies[name] = tuple(module.ATTENTION_METHODS)
    assert copies, "no ATTENTION_METHODS in options.py or pipeline.py"
    assert copies == dict.fromkeys(copies, an.METHODS)


def test_the_command_lines_light_copy_of_the_targets_is_the_gradient_passs():
    """options.py names gradient_guided's targets without importing torch: they are passes.TARGETS, and the
    default is passes.DEFAULT_TARGET."""
    import options
    import passes

    assert tuple(options.ATTENTION_TARGETS) == tuple(passes.TARGETS)
    assert options.Options().attention_target == passes.DEFAULT_TARGET
