"""Each option is written once: the fields of ``PredictOptions`` and ``StageSettings`` are its name, type and default,
``scanpy_canal._option_docs.PREDICT_DOCS`` and ``model._options.STAGE_DOCS`` its documentation; every public signature
and the command line agree with them."""

import argparse
import collections.abc
import dataclasses
import inspect
import typing

import pytest

from scanpy_canal import CANAL, tl
from scanpy_canal._choices import SCORES
from scanpy_canal._option_docs import PREDICT_DOCS, documented_names
from scanpy_canal.cli import _common, _demo, _predict, _train
from scanpy_canal.model import PredictOptions, StageSettings, from_arguments
from scanpy_canal.model import _options as options_module
from scanpy_canal.model._defaults import START_DEFAULTS
from scanpy_canal.model._options import STAGE_DOCS

PREDICTING = [CANAL.predict, CANAL.get_novelty, CANAL.get_latent_representation, tl.annotate]


def fields(kind: type) -> dict[str, dataclasses.Field]:
    """The fields of `kind` a caller gives (``PredictOptions.default_score`` is derived)."""
    return {field.name: field for field in dataclasses.fields(kind) if field.init}


def default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def evaluated(annotation: str, function=None):
    """A string annotation as a type, with the names of the options module (the aliases) and of `function`'s module."""
    namespace = {**vars(typing), **vars(collections.abc), **vars(options_module)}  # the aliases, as it imports them
    return eval(annotation, {**namespace, **(function.__globals__ if function else {})})


def literal_values(annotation) -> tuple:
    """The values of a ``Literal`` annotation, also when it may be `None` (a default that depends on the start)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(
        value for member in typing.get_args(annotation) if member is not type(None) for value in literal_values(member)
    )


def option_parameters(function, kind: type) -> dict[str, inspect.Parameter]:
    names = fields(kind)
    return {name: p for name, p in inspect.signature(function).parameters.items() if name in names}


@pytest.mark.parametrize(("docs", "kind"), [(PREDICT_DOCS, PredictOptions), (STAGE_DOCS, StageSettings)])
def test_every_option_is_documented_once(docs, kind):
    names = [name for entry in docs for name in entry.split(", ")]
    assert len(names) == len(set(names))
    assert documented_names(docs) == set(fields(kind)) - {"trainer_kwargs"}  # ``**trainer_kwargs``: train's own


@pytest.mark.parametrize(
    ("function", "kind"), [*((function, PredictOptions) for function in PREDICTING), (CANAL.train, StageSettings)]
)
def test_signatures_take_the_options_default_and_type(function, kind):
    parameters = option_parameters(function, kind)
    assert parameters, function
    for name, parameter in parameters.items():
        field = fields(kind)[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert parameter.default == default(field), f"{function.__qualname__}({name}=...)"
        assert evaluated(parameter.annotation, function) == evaluated(field.type), f"{function.__qualname__}({name})"
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(
    ("function", "kind"), [(CANAL.predict, PredictOptions), (tl.annotate, PredictOptions), (CANAL.train, StageSettings)]
)
def test_signatures_take_every_option(function, kind):
    assert set(option_parameters(function, kind)) == set(fields(kind))


def test_every_option_in_a_docstring_is_the_shared_text():
    assert PREDICT_DOCS["alpha"] in inspect.cleandoc(tl.annotate.__doc__).replace("\n    ", "\n")
    for function in [*PREDICTING, CANAL.train]:
        assert "{options}" not in function.__doc__


def test_from_arguments_refuses_a_name_that_is_no_option():
    assert from_arguments(PredictOptions, {"alpha": 0.1, "adata": None}, besides=("adata",)).alpha == 0.1
    with pytest.raises(TypeError, match="no option min_overlap"):
        from_arguments(PredictOptions, {"min_overlap": 0.2})


def subparser(module) -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser().add_subparsers()
    module.add_parser(commands)
    return next(iter(commands.choices.values()))


@pytest.mark.parametrize(
    ("module", "kind", "renamed"), [(_predict, PredictOptions, {}), (_train, StageSettings, {"epochs": "max_epochs"})]
)
def test_command_line_options_have_the_defaults_and_choices(module, kind, renamed):
    checked = []
    for action in subparser(module)._actions:
        name = renamed.get(action.dest, action.dest)
        if name not in fields(kind):
            continue
        field = fields(kind)[name]
        checked.append(name)
        if name == "mod":  # None, to tell an --mod given for a file that has no modalities
            assert action.default is None and _common.DEFAULT_MOD == default(field)
            continue
        assert action.default == default(field), action.option_strings
        if name == "balance_classes":  # a bool or "auto": the command line spells the bools
            values = [_common.BALANCE_CLASSES[choice] for choice in action.choices]
            assert values == [True, False, *literal_values(evaluated(field.type))]
        elif action.choices is not None:
            values = SCORES if name == "score" else literal_values(evaluated(field.type))
            assert tuple(action.choices) == tuple(values), action.option_strings
        if "(default: " in (action.help or "") and action.default is not None:
            assert f"(default: {action.default}" in action.help, action.option_strings
    assert checked
    if module is _predict:
        assert set(checked) == {*_predict.PREDICT_OPTIONS, "mod"}


@pytest.mark.parametrize("module", [_train, _demo])
def test_command_line_help_names_each_start_default(module):
    """An option whose default differs with how the encoder starts names both, as ``START_DEFAULTS`` has them."""

    def written(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:.0e}".replace("e-0", "e-") if isinstance(value, float) else str(value)

    checked = []
    for action in subparser(module)._actions:
        name = {"epochs": "max_epochs"}.get(action.dest, action.dest)
        if name in START_DEFAULTS["random"] and START_DEFAULTS["random"][name] != START_DEFAULTS["pretrained"][name]:
            checked.append(name)
            pretrained, random = (written(START_DEFAULTS[start][name]) for start in ("pretrained", "random"))
            assert f"{pretrained} with pretrained weights" in action.help, action.option_strings
            assert f"{random} from a random start" in action.help, action.option_strings
    assert sorted(checked) == ["balance_classes", "keep_epoch", "lr", "max_epochs"]
