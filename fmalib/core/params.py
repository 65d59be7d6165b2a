"""Load params: the defaults of ``fmalib.core.config`` (the paper's settings), then each YAML overlay, then
dotted overrides (``--set``, papermill), merged by OmegaConf and checked once.

A params file states only what differs from the defaults; ``_BASE_: other.yaml`` (relative to the file) puts
another file's keys under it first. An unknown, mistyped or out-of-range key is one error naming the file (or
the ``--set`` / ``fast:`` that gave it) and the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from . import config as C
from .errors import FmalibError

BASE_KEY = "_BASE_"

def repo_root() -> Path:
    """The checkout that holds params/ (fmalib is installed editable from it)."""
    return Path(__file__).resolve().parents[2]


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repo root when it lies inside it (what outputs record: no machine paths),
    else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(repo_root().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def default_report_dir(params: "Params") -> Path:
    """``reports/<params.name>``: where a params set's executed notebooks, figures and report go."""
    return repo_root() / "reports" / params["name"]



class Params(dict):
    """A validated params mapping with attribute access (``p.data.root``)."""

    path: Path | None = None

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def get_dotted(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def resolve_path(self, dotted: str) -> Path:
        """A path-valued key, relative paths taken from the repo root."""
        value = self.get_dotted(dotted)
        if value is None:
            raise FmalibError(f"params key {dotted} is null in {self.path}; expected a path")
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else repo_root() / p

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _wrap(node: Any) -> Any:
    if isinstance(node, Mapping):
        return Params({k: _wrap(v) for k, v in node.items()})
    if isinstance(node, list):
        return [_wrap(v) for v in node]
    return node


def check_device(device: str, where: str = "params") -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, CUDA only where torch sees it."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if not m:
        raise FmalibError(f"{where}: key device is {device!r}; expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch  # here, not at the top: the CLI's --help loads params without torch

        if not torch.cuda.is_available():
            raise FmalibError(f"{where}: key device is {device!r} but CUDA is not available here; use device: cpu "
                              f"(or --device cpu)")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise FmalibError(f"{where}: key device is {device!r} but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")




# YAML 1.1 (PyYAML) reads a float only with a dot in the mantissa and a signed exponent: 1e-3, 1.0e3 and 1E+3
# load as strings; OmegaConf converts them where the key is a float, this hint serves the other keys
_YAML11_FLOAT_STRING = re.compile(r"([-+]?)(\d*\.?\d*)[eE]([-+]?)(\d+)")


def float_string_hint(value: Any, integer: bool = False) -> str | None:
    """``write 1.0e-3 (YAML reads 1e-3 as a string)`` for a string YAML 1.1 did not read as a number."""
    if not isinstance(value, str):
        return None
    m = _YAML11_FLOAT_STRING.fullmatch(value.strip())
    if not m or not any(c.isdigit() for c in m.group(2)):
        return None
    sign, mantissa, exp_sign, exp = m.groups()
    whole, _, frac = mantissa.partition(".")
    fixed = f"{sign}{whole or '0'}.{frac or '0'}e{exp_sign or '+'}{exp}"
    if integer and float(fixed).is_integer():
        fixed = str(int(float(fixed)))
    return f"write {fixed} (YAML reads {value} as a string)"


def read_yaml(path: Path) -> dict:
    """One params YAML file as a mapping (an error naming the file otherwise)."""
    if not path.is_file():
        raise FmalibError(f"params file {path} does not exist (expected a YAML like params/toy.yaml)")
    try:
        tree = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FmalibError(f"params file {path} is not a text file (not UTF-8; an image or a binary?); expected "
                          f"a YAML like params/toy.yaml") from None
    except yaml.YAMLError as exc:
        raise FmalibError(f"params file {path} is not valid YAML: {exc}") from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise FmalibError(f"params file {path} must hold a mapping at top level")
    return tree


def find_params_file(source: str | os.PathLike) -> Path:
    path = Path(source)
    if not path.is_absolute() and not path.exists():
        path = repo_root() / path
    return path


def overlay_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(file, keys) of ``path`` and of its ``_BASE_`` files, base first."""
    path = path.resolve() if path.exists() else path
    if path in seen:
        raise FmalibError(f"params file {path}: {BASE_KEY} loops back to it ({' -> '.join(map(str, seen))})")
    tree = read_yaml(path)
    base = tree.pop(BASE_KEY, None)
    chain: list[tuple[str, dict]] = []
    if base is not None:
        if not isinstance(base, str):
            raise FmalibError(f"{path}: key {BASE_KEY} is {base!r}; expected the path of another params file")
        chain = overlay_chain(path.parent / base, (*seen, path))
    return chain + [(str(path), tree)]


def _expected(dotted: str) -> str:
    node: Any = C.Study
    for part in re.sub(r"\[\d+\]", "", dotted).split("."):
        tp = C.hints(node).get(part) if dataclasses.is_dataclass(node) else None
        if tp is None:
            return "a valid value"
        node = tp
    name = C.type_name(node)
    return name.removeprefix("a list of ") if dotted.endswith("]") else name


def _int_key(dotted: str) -> bool:
    return _expected(dotted) in ("int", "a list of int")


_UNSET = object()


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at ``a.b[1]`` in a plain tree (``_UNSET`` if it is not there)."""
    node = tree
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError):
            return _UNSET
    return node


def _omegaconf_error(exc: OmegaConfBaseException, where: str, given: Any) -> FmalibError:
    """One FmalibError naming ``where`` and the dotted key; ``given``: the tree merged or the value set."""
    dotted = str(getattr(exc, "full_key", "") or "")
    if isinstance(exc, ConfigKeyError) or ("Key" in str(exc) and "not in" in str(exc)):
        node: Any = C.Study
        for part in dotted.split(".")[:-1]:
            node = C.hints(node).get(part) if dataclasses.is_dataclass(node) else None
        allowed = (f" (allowed here: {', '.join(f.name for f in dataclasses.fields(node))})"
                   if node is not None and dataclasses.is_dataclass(node) else "")
        return FmalibError(f"{where}: unknown key {dotted}{allowed}")
    if isinstance(exc, ValidationError):
        value = given if not isinstance(given, Mapping) else _lookup(given, dotted)
        hint = float_string_hint(value, _int_key(dotted))
        if hint:
            return FmalibError(f"{where}: key {dotted} is the string {value!r}, not a number: {hint}")
        shown = "of the wrong type" if value is _UNSET else repr(value)
        return FmalibError(f"{where}: key {dotted} is {shown}; expected {_expected(dotted)}")
    return FmalibError(f"{where}: key {dotted}: {exc}")


def _merge(cfg: Any, tree: Mapping, where: str) -> Any:
    try:
        return OmegaConf.merge(cfg, tree)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, where, tree) from None


def _update(cfg: Any, dotted: str, value: Any, where: str) -> None:
    try:
        OmegaConf.update(cfg, dotted, value, merge=False)
    except OmegaConfBaseException as exc:
        # an element of a list value is named by its index: look it up in {dotted: value}
        raise _omegaconf_error(exc, where, value if str(getattr(exc, "full_key", "")) == dotted
                               else _nest(dotted, value)) from None


def _nest(dotted: str, value: Any) -> dict:
    tree: dict = {}
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _get(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def check_values(tree: Mapping, where: str = "params") -> None:
    """Every key's range as ``fmalib.core.config`` declares it, then the rules that tie keys together."""
    check_device(tree["device"], where)
    for dotted, _, f in C.leaves():
        value, meta = _get(tree, dotted), f.metadata
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if meta.get("non_empty") and not value:
            raise FmalibError(f"{where}: key {dotted} is empty; expected at least one entry")
        if meta.get("length") and len(value) != meta["length"]:
            raise FmalibError(f"{where}: key {dotted} is {value!r}; expected {meta['length']} numbers")
        if meta.get("check"):
            test, expected = meta["check"]
            for item in items:
                if not test(item):
                    raise FmalibError(f"{where}: key {dotted} is {value!r}; expected {expected}"
                                      + (" for every entry" if isinstance(value, list) else ""))
        if meta.get("pair") and value[0] > value[1]:
            raise FmalibError(f"{where}: key {dotted} is {value!r}; expected [min, max] with min <= max")
    for kind, value in tree["sams"]["bg_power"].items():
        if (isinstance(value, str) and value != "auto") or (not isinstance(value, str) and not value > 0):
            hint = float_string_hint(value)
            raise FmalibError(f"{where}: key sams.bg_power.{kind} is {value!r}; expected a number > 0 or 'auto'"
                              + (f": {hint}" if hint else ""))
    hi, lo = tree["sams"]["confident_hi"], tree["sams"]["confident_lo"]
    if not lo < hi:  # swapped keys would silently score p on the uncertain band
        raise FmalibError(f"{where}: keys sams.confident_hi = {hi!r} and sams.confident_lo = {lo!r}: expected "
                          f"0 <= confident_lo < confident_hi <= 1 (swapped?)")
    names, synonyms = tree["classes"]["names"], tree["classes"]["synonyms"]
    if names is None:
        if tree["data"]["kind"] != "tags":
            raise FmalibError(f"{where}: missing key classes.names (expected {_expected('classes.names')}; only "
                              f"data.kind tags may leave it out: its classes then come from the tags)")
        if synonyms is not None:
            raise FmalibError(f"{where}: key classes.synonyms is set but classes.names is not; expected both or "
                              f"neither (synonyms follow the names' order)")
        names = synonyms = []
    synonyms = names if synonyms is None else synonyms
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FmalibError(f"{where}: key classes.names repeats {dup!r}; class names must be unique (ids 1..C)")
    if len(synonyms) != len(names):
        raise FmalibError(f"{where}: key classes.synonyms has {len(synonyms)} entries but classes.names has "
                          f"{len(names)}; expected one synonym string per class")
    if len(names) > 254:
        raise FmalibError(f"{where}: key classes.names has {len(names)} classes; at most 254 fit a label PNG "
                          f"(ids 1..254, 255 = ignore)")
    for kind in ("cls", "seg"):
        pk, batch = tree["prompts"][kind], tree["prompts"]["batch_size"]
        if batch % pk["sub_batches"]:
            raise FmalibError(f"{where}: keys prompts.batch_size = {batch!r} and prompts.{kind}.sub_batches = "
                              f"{pk['sub_batches']!r}: expected the batch to split into equal sub-batches")
        if pk["cam_iter"] is not None and pk["cam_iter"] > pk["iters"]:
            raise FmalibError(f"{where}: keys prompts.{kind}.cam_iter = {pk['cam_iter']!r} and prompts.{kind}.iters "
                              f"= {pk['iters']!r}: expected cam_iter <= iters (or null: the last iteration)")
    for split, spec in tree["data"]["tags"].items():
        fields = set(spec) if isinstance(spec, Mapping) else None
        if fields is None or "images" not in fields or not fields <= {"images", "tags", "masks"} or not all(
                v is None or isinstance(v, str) for v in spec.values()):
            raise FmalibError(f"{where}: key data.tags.{split} is {spec!r}; expected {{images: folder, tags: .csv / "
                              f".jsonl file (or absent: one sub-folder per class), masks: optional folder}}")
    syn = tree["data"]["synthetic"]
    if syn["size_max"] < syn["size_min"]:
        raise FmalibError(f"{where}: keys data.synthetic.size_min = {syn['size_min']!r} and size_max = "
                          f"{syn['size_max']!r}: expected size_min <= size_max")


@functools.lru_cache(maxsize=1)
def _defaults_tree() -> Any:
    """OmegaConf's typed tree of the defaults, built once: building it is half of a load's time, and every
    merge below works on a copy (``OmegaConf.merge`` deep-copies its first argument)."""
    return OmegaConf.structured(C.Study)


def load_params(source: str | os.PathLike | Mapping, overrides: Mapping[str, Any] | None = None,
                origins: Mapping[str, str] | None = None, overlays: Sequence[str | os.PathLike] = ()) -> Params:
    """Params from a file (with its ``_BASE_`` chain) or a mapping, over the defaults; then the ``overlays``
    (files, e.g. the ``fast:`` one), then dotted ``overrides`` ({'prompts.cls.iters': 5}); checked.

    ``origins`` says where each override came from (``{"prompts.cls.iters": "--set"}``): an error about an
    overridden key names it instead of the file."""
    if isinstance(source, Mapping):
        path, where = None, "params"
        layers = [(where, _plain(source))]  # plain dicts: OmegaConf refuses a dict subclass
    else:
        path = find_params_file(source)
        where = str(path)
        layers = overlay_chain(path)
    for overlay in overlays:  # only the overlay's own keys: its _BASE_ makes it loadable alone
        layers.append(overlay_chain(Path(overlay))[-1])
    cfg = _defaults_tree()
    for layer_where, tree in layers:
        cfg = _merge(cfg, tree, layer_where)
    if cfg is _defaults_tree():  # no layer merged: the updates below must not touch the shared tree
        cfg = copy.deepcopy(cfg)
    for dotted, value in (overrides or {}).items():
        _update(cfg, dotted, _plain(value), f"{(origins or {}).get(dotted, 'override')} {dotted}={value!r} (over {where})")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FmalibError(f"{where}: missing key {missing[0]} (expected {_expected(missing[0])}; it has no default)")
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, where, {}) from None
    try:
        check_values(tree, where)
    except FmalibError as exc:
        culprit = next((k for k in (origins or {}) if k in (overrides or {}) and
                        (f"key {k} " in str(exc) or f"key {k}." in str(exc))), None)
        if culprit is None:
            raise
        given = f"{origins[culprit]} {culprit}={overrides[culprit]!r}"
        raise FmalibError(str(exc).replace(f"{where}:", f"{given} (over {where}):", 1)) from None
    classes = tree["classes"]
    if classes["synonyms"] is None and classes["names"] is not None:  # a class's prompt word is its name
        classes["synonyms"] = list(classes["names"])
    params = _wrap(tree)
    params.path = path
    return params


def overlay_path(params: Params, value: str, key_name: str) -> Path:
    """An overlay file named by a params key, relative to the params file (or to params/)."""
    base = params.path.parent if params.path is not None else repo_root() / "params"
    path = base / value
    if not path.is_file():
        raise FmalibError(f"{params.path or 'params'}: key {key_name} names {path}, which does not exist")
    return path


def fast_overlay(params: Params) -> list[Path]:
    """The ``fast:`` overlay file of ``params`` (empty when it has none)."""
    return [overlay_path(params, params["fast"], "fast")] if params["fast"] else []


def with_variant(params: Params, name: str) -> Params:
    """``params`` with the overlay file of ``variants.<name>`` applied (checked like any params)."""
    variants = params["variants"]
    if name not in variants:
        raise FmalibError(f"{params.path or 'params'}: no variant {name!r} under variants (defined: "
                          f"{', '.join(variants) or 'none'})")
    out = load_params(params.to_dict(), overlays=[overlay_path(params, variants[name], f"variants.{name}")])
    out.path = params.path
    return out
