"""``--help`` that reads well in a terminal: plain text, short usage, no lists of subclasses.

jsonargparse builds every description from docstrings written for Sphinx (Lightning's own
Trainer among them) and lists every known subclass of a class-typed argument (all of
``nn.Module``'s for a ``str | nn.Module`` argument). :class:`TerminalHelpFormatter` keeps the
type, the default and the choices, and drops the rest:

- reStructuredText roles and literals become plain text (``:class:`~a.b.Trainer``` -> Trainer,
  ````"auto"```` -> "auto");
- a description keeps its first sentence (the docstrings and the README have the rest);
- "known subclasses" lists are dropped (``--<key>.help CLASS`` still shows a subclass's
  arguments);
- the usage line names the option groups instead of repeating every option.

Example:
    >>> plain_text("Use :class:`~lightning.pytorch.Trainer` with ``devices=1``.")
    'Use Trainer with devices=1.'
"""

from __future__ import annotations

import re
import textwrap
from argparse import SUPPRESS, Action
from typing import Any

from jsonargparse import DefaultHelpFormatter

__all__ = ["TerminalHelpFormatter", "compact_type", "first_sentence", "plain_text"]

# :role:`target`, :domain:role:`~target`, with an optional explicit title `title <target>`.
_ROLE = re.compile(r":(?:\w+:)?\w+:`(~?)([^`<]*?)\s*(?:<([^>]+)>)?`")
_LITERAL = re.compile(r"``(.+?)``")
_BACKTICKS = re.compile(r"(?<![\w`])`([^`]+)`_{0,2}")
_MARK = "\x01"  # between a description and its "(type, default)"
_SUBCLASSES = re.compile(r", known subclasses: [^)]*")


def _role(match: re.Match) -> str:
    short, title, target = match.group(1), match.group(2).strip(), match.group(3)
    if target:  # :ref:`a title <target>`
        return title
    return title.rsplit(".", 1)[-1] if short else title


def plain_text(text: str) -> str:
    """``text`` without reStructuredText roles, literals and link markup."""
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(r"\1", text)
    return _BACKTICKS.sub(r"\1", text)


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (up to ". " outside parentheses), or all of it."""
    depth = 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif (
            char == "."
            and depth == 0
            and text[i + 1 : i + 2] in (" ", "\n")
            and not re.search(r"(?:e\.g|i\.e|etc|vs|ie)$", text[:i])
        ):
            return text[: i + 1]
    return text


def compact_type(text: str) -> str:
    """``Optional[int]`` -> ``int | null``, ``Union[a, b]`` -> ``a | b``, ``Literal['x', 'y']``
    -> ``{x,y}`` (nested too)."""
    text = text.strip()
    found = re.fullmatch(r"(Optional|Union|Literal)\[(.*)\]", text, re.DOTALL)
    if found is None:
        return _compact_inner(text)
    kind, parts = found.group(1), _split_top(found.group(2))
    if kind == "Literal":
        return "{" + ", ".join(p.strip().strip("'\"") for p in parts) + "}"
    if kind == "Optional":
        parts.append("null")
    return " | ".join(_compact_inner(compact_type(p)) for p in parts)


def _compact_inner(text: str) -> str:
    """``list[Union[a, b]]`` -> ``list[a | b]``."""
    found = re.fullmatch(r"(\w+)\[(Union|Optional)\[(.*)\]\]", text, re.DOTALL)
    if found is None:
        return text
    return f"{found.group(1)}[{compact_type(f'{found.group(2)}[{found.group(3)}]')}]"


def _split_top(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "[({"
        depth -= char in "])}"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


class TerminalHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, made for reading in a terminal (see the module doc).

    Each option's type and default follow it on its line when they fit, and its description
    starts on the line below, indented by 6: most options take two lines.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 6, **kw):
        super().__init__(prog, indent_increment, max_help_position, **kw)

    def _format_action(self, action: Action) -> str:
        kind = type(action).__name__
        if kind == "_ActionHelpClassPath":  # --<key>.help CLASS: said once, in the description
            return ""
        if kind == "_ActionConfigLoad":  # --trainer CONFIG: one line per group
            invocation = self._format_action_invocation(action)
            return f"{' ' * self._current_indent}{invocation}  (a config file for this group)\n"
        if (
            not action.option_strings
            or action.help == SUPPRESS
            or hasattr(action, "_get_subactions")
        ):
            return super()._format_action(action)
        # "--key VALUE  (type, default: x)" on one line when it fits, the description below.
        description, _, meta = DefaultHelpFormatter._expand_help(self, action).partition(_MARK)
        meta = meta.strip()
        first = " " * self._current_indent + self._format_action_invocation(action)
        if meta and len(first) + 2 + len(meta) <= self._width:
            first, meta = f"{first}  {meta}", ""
        body = f"{description.strip()} {meta}".strip()
        indent = self._current_indent + 4
        lines = [
            first,
            *(" " * indent + line for line in self._split_lines(body, self._width - indent)),
        ]
        return "\n".join(lines) + "\n"

    def _get_help_string(self, action: Action) -> str:
        text = super()._get_help_string(action)
        raw = action.help or ""
        if getattr(action, "_jsonargparse_preexpanded_help", False) or not text.startswith(raw):
            return text
        tail = _SUBCLASSES.sub("", text[len(raw) :])
        type_str = self._get_type_str(action) if "%(type)s" in tail else None
        if type_str is not None:
            shows_choices = bool(action.choices) or str(action.metavar or "").startswith("{")
            shown = "" if shows_choices or type_str == "bool" else compact_type(type_str)
            tail = tail.replace("type: %(type)s", shown)
            tail = re.sub(r"\(\s*,\s*", "(", tail).replace(", , ", ", ").replace(" ()", "")
            tail = tail.replace(", )", ")")
        return first_sentence(plain_text(raw).strip()) + _MARK + tail

    def _expand_help(self, action: Action) -> str:
        return super()._expand_help(action).replace(_MARK, "")

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def start_section(self, heading: str | None) -> None:
        if heading:
            heading = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", plain_text(heading))
        super().start_section(heading)

    def add_text(self, text: str | None) -> None:
        super().add_text(plain_text(text) if text else text)

    def _format_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None) -> str:
        options = [a for a in actions if a.option_strings]
        if usage is not None or len(options) <= 12:
            return super()._format_usage(usage, actions, groups, prefix)
        tops: list[str] = []
        for action in options:
            top = action.dest.split(".")[0]
            if top not in ("help", "config", "print_config", *tops):
                tops.append(top)
        nested = {a.dest.split(".")[0] for a in options if "." in a.dest}
        shown = [f"[--{t}.*]" if t in nested else f"[--{t} ...]" for t in tops]
        words = [f"{self._prog}", "[-h]", "[-c CONFIG]", "[--print_config[=flags]]", *shown]
        prefix = "usage: " if prefix is None else prefix
        text = textwrap.fill(
            " ".join(w.replace(" ", "\0") for w in words),  # never break inside [...]
            width=max(40, self._width),
            initial_indent=prefix,
            subsequent_indent=" " * len(prefix),
            break_on_hyphens=False,
        )
        return text.replace("\0", " ") + "\n\n"
