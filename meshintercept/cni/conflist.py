"""Minimal, reversible edits of a CNI network config file's JSON text.

The primary conflist belongs to the cluster's network plugin; we only append our plugin
object to its ``plugins`` array and take it out again. Re-dumping the JSON would reorder
keys, change indentation and number formats, and start rewrite wars with the primary CNI's
own installer (cilium#26760, istio/cni#85), so edits are made on the text itself: the new
object is inserted after the last element with the same separator and indentation the file
already uses, and removal cuts exactly that span again, so install + uninstall gives the
original bytes back.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
WS = " \t\r\n"


class ConflistError(ValueError):
    """The file is not a network config we can edit; the message says which and why."""


@dataclass(frozen=True)
class Element:
    start: int
    end: int
    value: object


@dataclass(frozen=True)
class PluginsArray:
    open: int  # index of "["
    close: int  # index of "]"
    elements: Tuple[Element, ...]


# --- a scanner for positions (json.loads has already said the text is valid) -----------
def _ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int:
    i += 1
    while text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _value_end(text: str, i: int) -> int:
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "[{":
        depth = 0
        while True:
            c = text[i]
            if c == '"':
                i = _string_end(text, i)
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
    while i < len(text) and text[i] not in ",]}" + WS:
        i += 1
    return i


def _members(text: str, i: int) -> List[Tuple[str, int, int]]:
    """(key, value start, value end) of the object starting at text[i] == '{'."""
    out = []
    i = _ws(text, i + 1)
    while text[i] != "}":
        key_end = _string_end(text, i)
        key = json.loads(text[i:key_end])
        i = _ws(text, key_end)  # at ':'
        start = _ws(text, i + 1)
        end = _value_end(text, start)
        out.append((key, start, end))
        i = _ws(text, end)
        if text[i] == ",":
            i = _ws(text, i + 1)
    return out


def _json_object(text: str, key: str, kind: type, what: str) -> dict:
    """The document as a JSON object whose ``key`` is a ``kind``, else ConflistError saying ``what``."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConflistError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), kind):
        raise ConflistError(what)
    return doc


def plugins_array(text: str) -> PluginsArray:
    _json_object(text, "plugins", list, 'not a conflist (no "plugins" array)')  # validates; the text is edited as text
    top = _ws(text, 0)
    spans = [(s, e) for key, s, e in _members(text, top) if key == "plugins"]
    start, end = spans[-1]  # json.loads keeps the last of duplicate keys; so do we
    elements = []
    i = _ws(text, start + 1)
    while text[i] != "]":
        e = _value_end(text, i)
        elements.append(Element(i, e, json.loads(text[i:e])))
        i = _ws(text, e)
        if text[i] == ",":
            i = _ws(text, i + 1)
    return PluginsArray(start, end - 1, tuple(elements))


# --- rendering in the file's own style --------------------------------------------------
def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _line_indent(text: str, pos: int) -> Optional[str]:
    """Whitespace before ``pos`` on its line, or None when something else precedes it."""
    line_start = text.rfind("\n", 0, pos) + 1
    prefix = text[line_start:pos]
    return prefix if prefix.strip(WS) == "" else None


def render(block: dict, like: Element, text: str) -> str:
    """Our object formatted like the neighbouring element ``like``."""
    sample = text[like.start:like.end]
    key_sep = ": " if '": ' in sample or '" : ' in sample else ":"
    if "\n" not in sample:
        return json.dumps(block, separators=(_item_sep(sample, key_sep), key_sep))
    base = _line_indent(text, like.start) or ""
    inner = sample.split("\n")[1]
    inner_ws = inner[: len(inner) - len(inner.lstrip(WS))].rstrip("\r")
    step = inner_ws[len(base):] if inner_ws.startswith(base) and len(inner_ws) > len(base) else "  "
    body = json.dumps(block, indent=step, separators=(",", key_sep))
    nl = _newline(text)
    return nl.join(line if n == 0 else base + line for n, line in enumerate(body.split("\n")))


def _item_sep(sample: str, key_sep: str) -> str:
    """", " or "," as used between members in a one-line JSON text."""
    i = 0
    while i < len(sample):
        if sample[i] == '"':
            i = _string_end(sample, i)
            continue
        if sample[i] == ",":
            return ", " if sample[i + 1:i + 2] == " " else ","
        i += 1
    return ", " if key_sep == ": " else ","


# --- edits ------------------------------------------------------------------------------
def append_plugin(text: str, block: dict) -> str:
    arr = plugins_array(text)
    if not arr.elements:
        raise ConflistError("its plugins array is empty")
    last = arr.elements[-1]
    if len(arr.elements) >= 2:
        sep = text[arr.elements[-2].end:last.start]
    else:
        sep = "," + text[arr.open + 1:last.start]  # "[\n    {" -> ",\n    "; "[{" -> ","
    return text[:last.end] + sep + render(block, last, text) + text[last.end:]


def replace_plugin(text: str, element: Element, block: dict) -> str:
    arr = plugins_array(text)
    neighbours = [e for e in arr.elements if e != element] or [element]
    return text[:element.start] + render(block, neighbours[-1], text) + text[element.end:]


def remove_plugins(text: str, match: Callable[[object], bool]) -> str:
    """Cut every matching element with the separator that joined it to its predecessor."""
    while True:
        arr = plugins_array(text)
        hits = [n for n, e in enumerate(arr.elements) if match(e.value)]
        if not hits:
            return text
        n = hits[-1]
        el = arr.elements[n]
        if n > 0:
            text = text[:arr.elements[n - 1].end] + text[el.end:]
        elif len(arr.elements) > 1:
            text = text[:el.start] + text[arr.elements[1].start:]
        else:
            text = text[:el.start] + text[el.end:]


def conf_to_conflist(text: str, block: dict) -> str:
    """A single-plugin .conf becomes a conflist of that plugin followed by ours (as libcni's
    ConfListFromConf would: name and cniVersion lifted to the list, the object kept whole)."""
    conf = _json_object(text, "type", str, 'not a network config (no "type")')
    doc = {"cniVersion": conf.get("cniVersion", "1.0.0"), "name": conf.get("name", ""), "plugins": [conf, block]}
    return json.dumps(doc, indent=2) + "\n"


def is_conflist_text(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("plugins"), list)


def config_files(conf_dir: str) -> List[str]:
    """Network config files in the order runtimes (libcni ConfFiles + sort) consider them."""
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return []
    return [os.path.join(conf_dir, n) for n in names
            if os.path.splitext(n)[1] in CONFIG_EXTENSIONS and os.path.isfile(os.path.join(conf_dir, n))]


def atomic_write(path: str, text: str, like: Optional[str] = None, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory and rename, keeping mode and owner of ``like``.

    The temp name has no config extension, so a runtime listing the directory meanwhile
    never loads a half-written file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        src = like if like and os.path.exists(like) else None
        if src:
            st = os.stat(src)
            os.chmod(tmp, st.st_mode & 0o7777)
            os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
