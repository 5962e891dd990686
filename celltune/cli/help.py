"""One help style for every command: plain usage names, no ``<bool>``, "(default X)".

typer renders required arguments as ``{data}`` in the usage line, a ``<bool>`` type next to
every flag and defaults as ``[default: 64]`` while celltune's own help texts say
"(default 64)". :class:`CelltuneGroup` (the root group's class) walks every command once,
after typer has built them, and puts them into one style:

* arguments are named in capitals (``celltune integrate [OPTIONS] DATA``);
* flags show no type;
* a default is written into the help text as ``(default X)``, unless the text names its
  default already, and typer's ``[default: X]`` is switched off.

Examples in help texts are literal: each paragraph that starts with ``\\b`` keeps its line
breaks, and :data:`EXAMPLE_WIDTH` keeps every example line inside an 80-column terminal.
"""

from __future__ import annotations

import inspect
from typing import Any

from typer.core import TyperArgument, TyperGroup

#: longest example line (the help text is indented by one column and rich pads one more)
EXAMPLE_WIDTH = 76


def _usage_name(param: TyperArgument) -> Any:
    """Usage-line name of an argument: ``DATA`` (required) or ``[DATA]``."""

    def name() -> str:
        text = param.display_name_raw
        text = text if param.required else f"[{text}]"
        return text + ("..." if param.nargs != 1 else "")

    return name


def _with_default(help_text: str, default: Any) -> str:
    """``help_text`` with " (default X)" before its final full stop."""
    if isinstance(default, (list, tuple)):
        default = ",".join(str(d) for d in default)
    text = help_text.rstrip()
    end = "." if text.endswith(".") else ""
    return f"{text[: len(text) - len(end)]} (default {default}){end}"


def polish_param(param: Any) -> None:
    """Put one parameter into the celltune help style (in place)."""
    if isinstance(param, TyperArgument):
        if param.metavar is None:
            param.metavar = (param.name or "arg").upper()
        param._usage_display_name = _usage_name(param)  # instance override of typer's {name}
        return
    if not hasattr(param, "is_flag"):
        return
    if param.is_flag:
        param.metavar = param.metavar or ""  # no "<bool>" type column
        param.show_default = False
        return
    default = param.default
    help_text = param.help or ""
    if default not in (None, "", [], ()) and "default" not in help_text.lower():
        param.help = _with_default(help_text, default)
    param.show_default = False


def unwrap_prose(text: str) -> str:
    """``text`` with the line breaks inside prose paragraphs removed.

    A paragraph is literal (kept line by line) when it starts with ``\\b`` or any of its
    lines is indented (examples, lists); otherwise rich wraps it to the terminal width, so
    hard breaks from the source would leave orphan words.
    """
    paragraphs = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        literal = para.startswith("\b") or any(line.startswith(" ") for line in lines)
        paragraphs.append(para if literal else " ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def _polished_help_option(command: Any) -> Any:
    original = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = original(ctx)
        if option is not None:
            polish_param(option)
        return option

    return get_help_option


def polish(command: Any) -> None:
    """Polish ``command``, its parameters and (for a group) every subcommand."""
    if command.help:
        command.help = unwrap_prose(inspect.cleandoc(command.help))
    for param in getattr(command, "params", []):
        polish_param(param)
    command.get_help_option = _polished_help_option(command)  # --help: no "<bool>" either
    for sub in getattr(command, "commands", {}).values():
        polish(sub)


class CelltuneGroup(TyperGroup):
    """The root group: typer's, with every command polished once it is built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        polish(self)

    def get_params(self, ctx: Any) -> list[Any]:
        """Parameters, including the completion options typer adds after ``__init__``."""
        params = super().get_params(ctx)
        for param in params:
            polish_param(param)
        return params


__all__ = ["EXAMPLE_WIDTH", "CelltuneGroup", "polish", "polish_param", "unwrap_prose"]
