"""Every config key with its type, default and the comment that explains it, read from
config.py itself: one source for `dist-train train --help`, `dist-train config --reference`
and the table in docs/config.md (a test keeps that in step with the code).

A key's comment is the one at the end of its line in config.py, or else the comment lines
just above it (a comment above a group of keys stays with the first of them).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass

from dist_train import config as config_module
from dist_train.config import Config


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted: data.batch_size
    type: str
    default: str
    comment: str


def config_keys() -> list[KeyDoc]:
    """Every key of the config tree, in the order config.py declares them."""
    comments = _field_comments()
    docs = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            comment = comments.get((cls.__name__, f.name), "").replace("see `", f"see `{section.name}.")
            docs.append(KeyDoc(f"{section.name}.{f.name}", _type_text(hints[f.name]),
                               _default_text(getattr(defaults, f.name)), comment))
    return docs


def reference_table() -> str:
    """The markdown table of every key (docs/config.md holds it between its markers)."""
    rows = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for doc in config_keys():
        rows.append(f"| `{doc.key}` | {_cell(doc.type)} | `{_cell(doc.default)}` | {_cell(doc.comment)} |")
    return "\n".join(rows) + "\n"


def help_text() -> str:
    """Every key, for `dist-train train --help`: one entry per key, its comment below it."""
    lines = ["config keys (key.sub=value overrides; docs/config.md says more):"]
    for doc in config_keys():
        lines.append(f"  {doc.key} ({doc.type}, default {doc.default})")
        if doc.comment:
            lines.append(textwrap.fill(doc.comment, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> its comment, from config.py's source."""
    found: dict[tuple[str, str], str] = {}
    cls_name, pending, group = None, [], ""  # group: the first key under the comment block above
    for line in inspect.getsource(config_module).splitlines():
        if match := re.match(r"class (\w+)\b", line):
            cls_name, pending, group = match.group(1), [], ""
        elif line and not line[0].isspace() and not line.startswith(("@", "#")):
            cls_name = None  # the class has ended
        elif cls_name is None or line.startswith(" " * 8):
            continue  # outside a class, or a field's continuation line
        elif line.strip().startswith("#"):
            pending.append(line.strip().lstrip("#").strip())
            group = ""
        elif match := re.match(r" {4}(\w+): ", line):
            name = match.group(1)
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            found[(cls_name, name)] = inline or " ".join(pending) or (f"see `{group}`" if group else "")
            # Keys right below a comment block's first key, with none of their own, share its comment.
            group = "" if inline else (group or (name if pending else ""))
            pending = []
        else:
            pending, group = [], ""
    return found


def _type_text(tp) -> str:
    text = str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
    text = text.replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"Literal\[(.*?)\]", lambda m: " | ".join(m.group(1).split(", ")), text)


def _default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
