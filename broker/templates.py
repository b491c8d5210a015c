"""Render a user endpoint's config from the admin's Jinja template and the user's options.

The rules, each a refusal with a message when broken:
- user options are checked against the admin's JSON schema first (the seed's
  `additionalProperties: true` schemas allow extra keys; the schema decides);
- reserved names (`parent_config`, `user_runtime`, `mapped_identity`, `_GC`) cannot be
  options, and top-level option names must be identifiers (they become variables);
- every user string, and every key below the top level, reaches the template as a
  double-quoted YAML scalar, so no value or key can add or change YAML structure
  (upstream escapes values but not keys);
- the sandbox and StrictUndefined: a template that reads a missing option fails loudly;
- the result must be a YAML mapping without `high_assurance` (the MEP sets that).
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import attrs
import jinja2
import jsonschema
import yaml
from jinja2.sandbox import SandboxedEnvironment

from broker.refusal import Refused

RESERVED = ("parent_config", "user_runtime", "mapped_identity", "_GC")
OPTION_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DEBUG_BEGIN = "Begin Compute endpoint configuration ({lines:,} lines):"
DEBUG_END = "End Compute endpoint configuration"


@attrs.frozen
class Rendered:
    text: str  # the YAML document given to the UEP
    config: dict  # the same, parsed
    overrides: tuple = ()  # what the MEP changed after rendering, for the log


def _q(text: str) -> str:
    """A double-quoted YAML scalar holding exactly `text`: printable ASCII as is, every
    other character escaped (\\uXXXX, \\UXXXXXXXX), so nothing can end the scalar."""
    out = []
    for ch in text:
        o = ord(ch)
        out.append("\\" + ch if ch in '"\\' else ch if 0x20 <= o < 0x7F else
                   f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


class UserMap(dict):
    """User data: look up by the raw key; iterate, list or print with keys quoted.

    `{{ opts.partition }}` finds the option; `{% for k, v in opts.items() %}` yields
    quoted keys; `{{ opts }}` prints JSON flow style. None of them lets a key inject."""

    def __init__(self, raw: dict):
        super().__init__({k: escape_user(v) for k, v in raw.items()})
        self._raw = raw

    def keys(self):
        return [_q(k) for k in super().keys()]

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return [(_q(k), v) for k, v in super().items()]

    def __str__(self):
        return json.dumps(self._raw)

    __repr__ = __str__


class UserList(list):
    def __init__(self, raw: list):
        super().__init__(escape_user(v) for v in raw)
        self._raw = raw

    def __str__(self):
        return json.dumps(self._raw)

    __repr__ = __str__


def escape_user(value):
    """User JSON -> template values that cannot change the YAML around them."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise Refused(f"option key {key!r} is not a string")
        return UserMap(value)
    if isinstance(value, list):
        return UserList(value)
    if isinstance(value, str):
        return _q(value)
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return value
    raise Refused(f"{type(value).__name__} is not a valid user config option type")


def _shell_escape(value):
    """The seed's `shell_escape` filter: quote a (quoted) user string for a shell line."""
    if not isinstance(value, str):
        return value
    try:
        loaded = yaml.safe_load(value)  # undo _q()
    except yaml.YAMLError:
        return value
    return _q(shlex.quote(loaded)) if isinstance(loaded, str) else value


def validate_options(user_opts, schema: dict | None) -> None:
    if not isinstance(user_opts, dict):
        raise Refused(f"user_endpoint_config must be a JSON object, not {type(user_opts).__name__}")
    for name in user_opts:
        if name in RESERVED:
            raise Refused(f"'{name}' is a reserved word and cannot be passed in via user config")
        if not isinstance(name, str) or not OPTION_NAME_RE.fullmatch(name):
            raise Refused(f"user config option name {str(name)[:80]!r} is not allowed: names are letters, "
                                  "digits and '_', not starting with a digit, at most 64 characters")
    if schema is not None:
        try:
            jsonschema.validate(instance=user_opts, schema=schema)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise Refused(f"user config option {where} is invalid: {e.message}") from None


def load_schema(path: pathlib.Path) -> dict | None:
    """None if there is no schema file; an invalid one refuses every start (admin error)."""
    try:
        schema = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Refused("the endpoint's user config schema is broken; contact the endpoint administrator",
                              f"{path}: cannot load the schema: {e}") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise Refused("the endpoint's user config schema is broken; contact the endpoint administrator",
                              f"{path}: not a valid JSON schema: {e.message}") from None
    return schema


def render(template_path: pathlib.Path, schema_path: pathlib.Path, *, user_opts, user_runtime, mapped_identity: dict,
           parent_config: dict, high_assurance: bool, allowed_functions) -> Rendered:
    """Re-reads template and schema on every call: an admin's edit applies to the next start."""
    contact = "contact the endpoint administrator"
    try:
        source = template_path.read_text()
    except OSError as e:
        raise Refused(f"the endpoint's user config template cannot be read; {contact}",
                              f"{template_path}: {e.strerror}") from None
    validate_options(user_opts, load_schema(schema_path))
    if not isinstance(user_runtime, dict):
        raise Refused("user_runtime must be an object")
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, loader=jinja2.FileSystemLoader(template_path.parent),
                               autoescape=False, keep_trailing_newline=True)
    env.filters["shell_escape"] = _shell_escape
    reserved = {"parent_config": parent_config, "mapped_identity": mapped_identity,
                "user_runtime": escape_user(user_runtime)}
    variables = {k: escape_user(v) for k, v in user_opts.items()} | reserved | {"_GC": reserved}
    try:
        text = env.from_string(source).render(**variables)
    except jinja2.UndefinedError as e:
        raise Refused(f"missing required user config option: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise Refused(f"the endpoint's user config template is not allowed to do that; {contact}",
                              f"{template_path}: sandbox refused: {e}") from None
    except jinja2.TemplateError as e:
        raise Refused(f"the endpoint's user config template is broken; {contact}",
                              f"{template_path}: {type(e).__name__}: {e}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise Refused(f"the rendered user endpoint config is not valid YAML; {contact}",
                              f"{template_path}: rendered YAML does not parse: {e}") from None
    if not isinstance(config, dict):
        raise Refused(f"the rendered user endpoint config is not a mapping; {contact}",
                              f"{template_path}: rendered to a {type(config).__name__}, not a mapping")
    if "high_assurance" in config:
        raise Refused(f"error generating template; {contact}",
                              f"{template_path}: `high_assurance` may not be specified in the template")
    overrides = []
    if allowed_functions is not None and config.get("allowed_functions") != list(allowed_functions):
        if "allowed_functions" in config:
            overrides.append("allowed_functions (the MEP's list replaces the template's)")
        config["allowed_functions"] = list(allowed_functions)
        text = yaml.safe_dump(config, sort_keys=False)
    if high_assurance:
        text = f"high_assurance: true\n{text}"
        config = {"high_assurance": True, **config}
    return Rendered(text, config, tuple(overrides))


def debug_lines(text: str) -> list[str]:
    """The rendered config between the seed's sentinel lines, for `debug: true`."""
    return [DEBUG_BEGIN.format(lines=text.count("\n") + 1), *("  | " + line for line in text.split("\n")), DEBUG_END]
