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
import re
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
    """``help_text`` with "(default X)" before its final full stop, or "; default X" inside
    a closing parenthesis."""
    if isinstance(default, (list, tuple)):
        default = ",".join(str(d) for d in default)
    elif isinstance(default, float):
        default = f"{default:g}"
    text = help_text.rstrip()
    end = "." if text.endswith(".") else ""
    text = text[: len(text) - len(end)]
    if text.endswith(")"):
        return f"{text[:-1]}; default {default}){end}"
    return f"{text} (default {default}){end}".lstrip()


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


def wrap_example(line: str, width: int = EXAMPLE_WIDTH) -> list[str]:
    """An example command line cut before options into ``\\``-continued lines of at most
    ``width`` characters (a single token longer than that stays whole)."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    command, hash_, comment = line.partition("  # ")
    if hash_:  # a trailing comment goes on its own line, above the command
        return [f"{indent}# {comment.strip()}", *wrap_example(command.rstrip(), width)]
    out: list[str] = []
    current = line.rstrip()
    while len(current) > width:
        cut = current.rfind(" --", len(indent) + 1, width - 1)
        if cut <= len(indent):
            break
        out.append(current[:cut] + " \\")
        current = indent + "    " + current[cut + 1 :]
    return [*out, current]


def _split_examples(para: str) -> list[str]:
    """A prose paragraph with an inline "Example: celltune ..." as prose + a literal block."""
    text = " ".join(line.strip() for line in para.split("\n"))
    match = re.search(r"(?:^|\s)(Examples?:)\s+(celltune\s.*)$", text)
    if match is None:
        return [text]
    before = text[: match.start()].strip()
    return [p for p in (before, match.group(1), "  " + match.group(2).strip()) if p]


def unwrap_prose(text: str) -> str:
    """``text`` with the line breaks inside prose paragraphs removed.

    A paragraph is literal (kept line by line) when it starts with ``\\b`` or any of its
    lines is indented (examples, lists); otherwise rich wraps it to the terminal width, so
    hard breaks from the source would leave orphan words. An inline "Example: celltune
    ..." becomes a literal block, and a literal command line too long for an 80-column
    terminal is continued with ``\\`` before an option.
    """
    split: list[str] = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        literal = para.startswith("\b") or any(line.startswith(" ") for line in lines)
        split.extend([para] if literal else _split_examples(para))
    paragraphs = []
    for para in split:
        wrapped = []
        for line in para.split("\n"):
            is_cmd = line.startswith(" ") and line.lstrip().startswith("celltune ")
            wrapped.extend(wrap_example(line) if is_cmd else [line])
        paragraphs.append("\n".join(wrapped))
    first, rest = paragraphs[0], paragraphs[1:]
    # typer dedents the text after the first paragraph (inspect.cleandoc, which skips its
    # first line): a blank first line keeps the examples' indentation when nothing but
    # examples follows
    return first + ("\n\n\n" + "\n\n".join(rest) if rest else "")


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
    if getattr(command, "epilog", None):
        command.epilog = unwrap_prose(inspect.cleandoc(command.epilog))
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


__all__ = [
    "EXAMPLE_WIDTH",
    "CelltuneGroup",
    "polish",
    "polish_param",
    "unwrap_prose",
    "wrap_example",
]
