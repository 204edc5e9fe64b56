"""click's complaints about a command line, in our words: one sentence naming the option, its problem and where
its help is (`--dtype: 'float64' is not one of auto, float32, bfloat16, float16 (see siglip embed -h).`), the same
whichever typer (and so click, or pydantic's checks of values) is installed."""

from __future__ import annotations

import difflib
import importlib
import os
import re
from typing import Sequence

import typer

# Recent typers vendor click (`typer._click`, typer 0.29 here), older ones use the click package: click's errors
# are those of the module typer's BadParameter comes from.
click_errors = importlib.import_module(typer.BadParameter.__module__)


def parse_error_sentence(error: Exception, command: str, args: Sequence[str] = ()) -> str:
    """click's complaint about a command line, in our words, naming the option and where its help is:
    `--dtype: 'float64' is not one of auto, float32, bfloat16, float16 (see siglip embed -h).` `args`: the command
    line's words, where a file whose name starts with a dash is told apart from an option mistyped."""
    param = getattr(error, "param", None)
    if isinstance(error, click_errors.MissingParameter) and param is not None:
        said = f"missing {_param_name(param)}"
    elif isinstance(error, click_errors.BadParameter) and param is not None:
        said = f"{_param_name(param)}: {_bad_value(error)}"
    elif isinstance(error, click_errors.NoSuchOption):
        name = error.option_name
        closest = sorted(error.possibilities or (), key=lambda option: (-_likeness(name, option), option))
        said = f"no option {name}" + (f"; the closest: {', '.join(closest)}" if closest else "")
        if file := next((arg for arg in args if arg.startswith(name) and os.path.lexists(arg)), None):
            said = (f"no option {name}: {file} is read as options; to give it as a path, put -- before it, or write "
                    f"./{file}")  # fmt: skip
    else:  # "Option '-o' requires an argument.", "Got unexpected extra argument(s) (b)", "No such command 'x'."
        said = error.message
        for pattern, words in (
            (r"^Option '(.*)' requires an argument\.$", r"\1 needs a value"),
            (r"^Option '(.*)' does not take a value\.$", r"\1 takes no value"),
            (r"^Got unexpected extra argument(?:s|\(s\))? \((.*)\)$", r"unexpected argument(s): \1"),
            # "No such command 'embd'. Did you mean 'embed'?": as an option's closest names are given above
            (r"\.? \(?Did you mean (?:one of: )?(.*?)\?\)?$", lambda m: "; the closest: " + m[1].replace("'", "")),
        ):  # fmt: skip
            said = re.sub(pattern, words, said)
        said = said[:1].lower() + said[1:]
    return f"{said.rstrip('.')} (see {command} -h)."


def _likeness(typed: str, option: str) -> float:
    return difflib.SequenceMatcher(None, typed, option).ratio()


def _param_name(param) -> str:
    """An option by the name its help lists first (`-o`, `--batch-size`); an argument by its metavar (`SHARD`)."""
    if param.param_type_name == "option":
        return param.opts[0]
    return param.metavar or param.name.upper()


def _bad_value(error: Exception) -> str:
    """What is wrong with an option's value. Recent typers check values with pydantic, whose words are a
    programmer's ("Input should be a valid integer, unable to parse string as an integer"), earlier ones with
    click's types ("'abc' is not a valid int range", "0 is not in the range x>=1"): the common ones are said again
    here, in a user's words, the same whichever typer is installed."""
    problems = error.__cause__.errors() if hasattr(error.__cause__, "errors") else []
    if not problems:
        return _choices_unquoted(_click_words(error.message))
    problem, value = problems[0], problems[0].get("input")
    if problem["type"] == "int_parsing":
        return f"{value!r} is not a whole number"
    if problem["type"] == "greater_than_equal":
        return f"must be at least {problem['ctx']['ge']}, not {value}"
    if problem["type"] == "value_error":  # an enum's: "'float64' is not one of 'auto', 'float32', ..."
        return _choices_unquoted(str(problem["ctx"]["error"]))
    return error.message


def _click_words(message: str) -> str:
    """click's complaint about a value in the words of `_bad_value`'s pydantic branch."""
    for pattern, words in (
        (r"^('.*') is not a valid (?:integer|int)(?: range)?\.?$", r"\1 is not a whole number"),
        (r"^(.*) is not in the range x>=(.*?)\.?$", r"must be at least \2, not \1"),
    ):  # fmt: skip
        message = re.sub(pattern, words, message)
    return message


def _choices_unquoted(message: str) -> str:
    """"'float64' is not one of 'auto', 'float32'." → "... one of auto, float32": the choices as --help lists them."""
    given, one_of, choices = message.partition(" is not one of ")
    return given + one_of + choices.replace("'", "").rstrip(".") if one_of else message
