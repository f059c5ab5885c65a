"""Config = the script's dataclass defaults < a YAML file (--config) < command-line flags.

Every field of the dataclass becomes a flag of the same name (`--batch_size 256`), and a key of the
same name in the YAML file. YAML values go through the same per-field conversion as flags, because
PyYAML reads `1e-3` as the string '1e-3'. Unknown keys, wrong types and values outside a field's
`choices` are errors that name the field.
"""
import argparse
import dataclasses
import difflib
import sys

import yaml


class ConfigError(Exception):
    """A bad value supplied by the user: scripts print it as one line and exit with status 2."""


def arg(default, help, choices=None):
    """A Config field with its help text (and allowed values):
    `lr: float = arg(0.3, "base LR per 256 images")`."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _convert(field, value):
    """Convert a flag string or a YAML value to the field's type (the type of its default)."""
    default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
               else field.default)
    if isinstance(default, list):
        items = value if isinstance(value, list) else [value]
        kind = type(default[0]) if default else str
        return [_scalar(field.name, kind, v) for v in items]
    value = _scalar(field.name, type(default), value)
    if field.metadata.get("choices") and value not in field.metadata["choices"]:
        raise ConfigError(f"{field.name}={value!r} is not one of {list(field.metadata['choices'])}")
    return value


def _scalar(name, kind, value):
    if kind is bool:  # strict: 'true'/'false' only, so `--flag 0` or a typo is not silently truthy
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        if kind is int and (isinstance(value, bool)
                            or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(float(value)) if kind is int and isinstance(value, float) else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {kind.__name__}, got {value!r}") from None


def _read_yaml(path, fields, overridden=()):
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = (f" (did you mean {', '.join(close)}?)" if close
                    else " (see --help for the fields)")
            raise ConfigError(f"unknown key '{key}' in {path}{hint}")
    # a value that a flag replaces is not checked (a ResNet preset may run with --arch vit_debug)
    return {key: _convert(fields[key], value) for key, value in data.items()
            if key not in overridden}


def _help(field, default):
    # `choices` are checked in _convert (not by argparse), so a YAML value is checked the same way
    # as a flag
    choices = field.metadata.get("choices")
    return (field.metadata.get("help", "")
            + (f"; one of {', '.join(map(str, choices))}" if choices else "")
            + f" (default: {default})").replace("%", "%%")


def _raise(message):
    raise ConfigError(message)


def parse(config_cls, argv=None, description=None):
    """Build the frozen config: defaults < YAML < flags. Raises ConfigError on bad input."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    # allow_abbrev=False: argparse would take any unique prefix of a flag for it (`--epoch 1` as
    # --epochs), so a typo or another tool's flag could set a field: every flag is spelled out.
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    for name, f in fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        parser.add_argument(f"--{name}", type=str, nargs="+" if isinstance(default, list) else None,
                            metavar=(type(default).__name__.upper()
                                     if not isinstance(default, list) else "X"),
                            help=_help(f, default))
    # argparse would print the whole usage; one line naming the bad flag is clearer
    parser.error = _raise
    flags = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values = _read_yaml(flags["config"], fields, set(flags)) if flags.get("config") else {}
    values.update({name: _convert(fields[name], value) for name, value in flags.items()})
    return config_cls(**values)


def run(main):
    """Run a script's main(): bad input (ConfigError) or a diverged loss becomes one line on stderr
    and exit status 2, without a traceback."""
    try:
        main()
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def write_yaml(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
