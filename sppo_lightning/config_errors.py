"""A LightningCLI config error in one line: jsonargparse's multi-line message condensed, naming the
config file and key, with a close match for a misspelt key."""

from __future__ import annotations

from typing import Optional


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Given value:", "Expected a <class 'NoneType'>", "Problem with given class_path",
          "Not a valid subclass of", "Subclass types expect one of", "a class path", "a dict with", "a class name")


def condense(message: str) -> str:
    """jsonargparse's multi-line report of a bad config as one line: the key path and the reason,
    e.g. ``model.eta: Expected a <class 'float'>. Got value: abc``."""
    import re

    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(_NOISE) and not line.startswith("Parser key")]
    reason = "; ".join(dict.fromkeys(reasons)) or message.strip().splitlines()[0]
    where = ".".join(keys)
    return f"{where + ': ' if where else ''}{' '.join(reason.split())}"


def config_error_line(message: str, argv: list[str]) -> str:
    """``condense`` plus where to look up the keys, the config file a YAML error is in, and, for an
    unknown key, where it was given and the closest key the class takes."""
    import re

    command = argv[0] if argv and not argv[0].startswith("-") else "fit"
    line = condense(message)
    configs = _config_files(argv)
    empty = _empty(configs)
    if empty and line.startswith("Unexpected config"):  # jsonargparse's whole report for an empty file
        return (f"{empty} is empty (or only comments): a config sets at least model: and data: "
                f"(see configs/quickstart.yaml, or `sppo-lightning {command} --help`)")
    if '"<unicode string>"' in line:  # a YAML syntax error: name the file it is in
        line = line.replace('"<unicode string>"', _unparsable(configs) or "a --config file")
    unknown = re.match(r"^([\w.]+): Option '(\w+)' is not accepted", line)
    if unknown:
        line += _unknown_key_hint(unknown.group(1), unknown.group(2), configs)
    return f"{line} (see `sppo-lightning {command} --help`)"


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _empty(configs: list[str]) -> Optional[str]:
    import yaml

    for path in configs:
        try:
            if yaml.safe_load(open(path, encoding="utf-8")) is None:
                return path
        except (OSError, yaml.YAMLError):
            continue
    return None


def _unparsable(configs: list[str]) -> Optional[str]:
    import yaml

    for path in configs:
        try:
            yaml.safe_load(open(path, encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return path
    return None


def _section(data, dotted: str):
    """The ``init_args`` node of ``dotted`` (``model``, ``data.method``) in a loaded config, or None."""
    node = data
    for name in dotted.split("."):
        node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get("init_args"), dict) and "class_path" in node:
            node = {"class_path": node["class_path"], **node["init_args"]}
    return node if isinstance(node, dict) else None


def _unknown_key_hint(section: str, key: str, configs: list[str]) -> str:
    """``; in <file>`` (or on the command line) and ``; did you mean `x`?`` for an unknown key."""
    import difflib
    import inspect
    from importlib import import_module

    import yaml

    where, class_path = "on the command line", None
    for path in configs:
        try:
            node = _section(yaml.safe_load(open(path, encoding="utf-8")), section)
        except (OSError, yaml.YAMLError):
            continue
        if node is not None:
            class_path = node.get("class_path", class_path)
            if key in node:
                where = f"in {path}"
    hint = f" ({where})"
    try:
        module, _, name = class_path.rpartition(".")
        params = [p for p in inspect.signature(getattr(import_module(module), name)).parameters if p != "self"]
    except (AttributeError, ImportError, ValueError, TypeError):
        return hint
    close = difflib.get_close_matches(key, params, n=1)
    return hint + (f"; did you mean `{close[0]}`?" if close else "")
