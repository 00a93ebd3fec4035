"""Command-line options <-> the frozen config dataclasses of the stages (one source for names and defaults)."""

import dataclasses

import click

from cache_format import KdcacheError

from .corpus import read_yaml


def config_option(config, name: str, type_=None, help_: str | None = None, **kw):
    """A click option for field `name` of the config dataclass `config`, with the field's default (a field without
    one has none here either: it must come from the command line or --config); bool fields become --name/--no-name
    flags."""
    flag = "--" + name.replace("_", "-")
    if type_ is bool:
        flag = f"{flag}/--no-{name.replace('_', '-')}"
    default = config.__dataclass_fields__[name].default
    if default is not dataclasses.MISSING:
        kw.update(default=default, show_default=default is not None)
    return click.option(flag, name, type=None if type_ is bool else type_, help=help_, **kw)


def option_args(options: dict) -> list[str]:
    """{config field: value} -> the command line's options (True -> --flag, False -> --no-flag, None -> omitted)."""
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


def merge_config_file(ctx: click.Context, path: str | None, options: dict, extra: tuple[str, ...] = ()) -> dict:
    """Fill the options the command line left at their default from a --config YAML file (read once); returns the
    file's keys in `extra` (e.g. capture's `data`), which are not options. KdcacheError for an unknown key."""
    if path is None:
        return {}
    doc = {str(k).replace("-", "_"): v for k, v in read_yaml(path).items()}
    for name, value in doc.items():
        if name in extra:
            continue
        if name not in options:
            raise KdcacheError(f"{path}: unknown option {name!r}")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            options[name] = _typed(ctx, name, value, path)
    return {k: doc[k] for k in extra if k in doc}


# the YAML values each click type takes (a string is parsed as the command line would parse it)
_YAML_TYPES = {click.types.IntParamType: (int, str), click.types.FloatParamType: (int, float, str),
               click.types.BoolParamType: (bool,), click.types.StringParamType: (str,),
               click.types.Choice: (str,), click.types.Path: (str,)}


def _typed(ctx: click.Context, name: str, value, path: str):
    """A --config value converted by its option's click type, as if given on the command line; KdcacheError naming
    the file, the option and the value when it is not one (a float or a bool for an integer, a list for a
    number, ...)."""
    param = next(p for p in ctx.command.params if p.name == name)
    if value is None:
        return None
    items = value if param.multiple and isinstance(value, list) else [value]
    allowed = next((a for t, a in _YAML_TYPES.items() if isinstance(param.type, t)), None)
    flag = "--" + name.replace("_", "-")
    for v in items:
        if allowed is not None and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
            raise KdcacheError(f"{path}: {name}: {v!r} is not a valid {param.type.name} for {flag}")
    try:
        return param.type_cast_value(ctx, items if param.multiple else value)
    except click.BadParameter as e:
        raise KdcacheError(f"{path}: {name}: {' '.join(e.format_message().split())}") from None


def require(options: dict, *names: str) -> None:
    """click.UsageError for the first option in `names` given neither on the command line nor in --config."""
    for name in names:
        if options[name] in (None, ""):
            raise click.UsageError(f"Missing option '--{name.replace('_', '-')}'.")

