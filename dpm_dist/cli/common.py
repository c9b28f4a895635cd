"""What every command shares: the shipped configs, absolute user paths, and one-line user errors.

The YAML presets live in the repository's top-level ``configs/`` folder, which the wheel installs as the
package ``dpm_dist.configs`` (``package-dir`` in pyproject.toml), so a plain ``pip install`` finds them
exactly as an editable one does. ``--config-dir`` adds a folder of one's own in front of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

from dpm_dist.data.storage import is_remote, local_path

T = TypeVar("T")

CONFIG_MODULE = "dpm_dist.configs"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # Hydra's search-path form of the package
CONFIG_NAME = "train"


def help_config(prog: str, template: str, groups: Sequence[str]) -> dict[str, str]:
    """Hydra's help node for ``prog`` (``hydra/help=...``): ``template`` with ``{groups}`` filled by the shipped
    presets of ``groups``, one line per group."""
    from importlib.resources import files

    root = files(CONFIG_MODULE)
    lines = [
        f"{group}: "
        + ", ".join(sorted(p.name[:-5] for p in root.joinpath(group).iterdir() if p.name.endswith(".yaml")))
        for group in groups
    ]
    return {"app_name": prog, "header": "", "footer": "", "template": template.format(groups="\n".join(lines))}


def insert_override(argv: Sequence[str], override: str) -> list[str]:
    """``argv`` with ``override`` joined to the Hydra overrides it holds (before the first of them, else at the
    end): Hydra reads its overrides as one run of words, so ``--config-dir D a=1`` must not become
    ``x=y --config-dir D a=1``."""
    out = list(argv)
    first = next((i for i, a in enumerate(out) if "=" in a and not a.startswith("-")), len(out))
    out.insert(first, override)
    return out


def compose_config(overrides: Sequence[str], *, config_dir: str | None = None) -> Any:
    """``train.yaml`` + overrides, validated into a :class:`~dpm_dist.config.DPMConfig` (works under any launcher).

    A mistake in the overrides (an unknown field, with or without ``+``; a value of the wrong type; a preset that
    does not exist; bad syntax) is a one-line ValueError naming the field (:func:`config_error`)."""
    from hydra import compose, initialize_config_module

    from dpm_dist.config import register_configs, to_config

    register_configs()
    extra = [f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"] if config_dir else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            node = compose(config_name=CONFIG_NAME, overrides=[*overrides, *extra])
        except Exception as err:
            raise config_error(err) from err
    return to_config(node)


def check_overrides(argv: Sequence[str]) -> None:
    """Compose the config a Hydra command line (``dpm-train``/``dpm-tune``) asks for, so that a mistake in it is
    one line naming the field before ``hydra.main`` prints its own several lines (or its "use +key" advice).
    Command lines that only ask for help, and sweeps (``-m``), are left to Hydra."""
    words = list(argv)
    if any(
        w in ("--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m") or w.startswith("--info")
        for w in words
    ):
        return  # help, or a sweep (its comma lists are Hydra's to expand)
    config_dir, overrides, skip = None, [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word in ("--config-dir", "-cd", "--cfg", "-c", "--package", "-p", "--config-name", "-cn"):
            skip = True
            if word in ("--config-dir", "-cd") and i + 1 < len(words):
                config_dir = words[i + 1]
        elif word.startswith("--config-dir="):
            config_dir = word.split("=", 1)[1]
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
    cfg = compose_config(overrides, config_dir=config_dir)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "data.num_ids" in given and "data.global_num_ids" not in given and cfg.data.global_num_ids:
        raise ValueError(
            f"config field `data.num_ids`: not used: the preset sets data.global_num_ids={cfg.data.global_num_ids} "
            "(identities per global batch, shared by the ranks), which decides the per-rank P; set "
            "data.global_num_ids=<P × ranks> instead, or data.global_num_ids=0 to give data.num_ids per rank"
        )


def _type_name(key: str) -> str:
    """The schema's type of the dotted field ``key`` (e.g. ``int``, ``list[int]``), or "" when unknown."""
    import typing

    from dpm_dist.config import DPMConfig

    node: Any = DPMConfig
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return ""
        node = hints[part]
    return node.__name__ if isinstance(node, type) else str(node).replace("typing.", "")


def config_error(err: BaseException) -> ValueError:
    """One line, naming the field, for an error Hydra or OmegaConf raised while composing the config."""
    from dpm_dist.config import did_you_mean

    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None)
    name = type(cause).__name__
    first = (getattr(cause, "msg", None) or str(cause) or name).strip().splitlines()[0]
    if key and name in ("ConfigAttributeError", "ConfigKeyError"):
        return ValueError(
            f"unknown config field `{key}`{did_you_mean(key)}: not a field of the typed config (`--cfg job` lists them)"
        )
    if key:
        expected = _type_name(key)
        return ValueError(f"config field `{key}`{f' (expects {expected})' if expected else ''}: {first}")
    if name == "MissingConfigException":
        options = [ln.strip() for ln in str(cause).split("Available options", 1)[-1].splitlines()[1:]]
        options = [o for o in options if o and not o.startswith(("Config search path", "provider="))]
        where = first.replace("In 'train': ", "")
        return ValueError(f"{where} (available: {', '.join(options)})" if options else where)
    return ValueError(f"config overrides: {first}")


# ---- user paths: made absolute where the user typed them, before any launcher, process group or Ray --------

PATH_FIELDS = (
    "model.pretrained",
    "data.root",
    "data.eval_root",
    "data.cache_dir",
    "log.output_dir",
    "search.storage_path",
    "search.results_dir",
    "search.local_dir",
)
PATH_LIST_FIELDS = ("data.roots", "data.train_urls", "data.query_urls", "data.gallery_urls")


@overload
def absolute_path(value: str) -> str: ...
@overload
def absolute_path(value: None) -> None: ...
def absolute_path(value: str | None) -> str | None:
    """``value`` made absolute against the current folder (``~`` expanded); URLs and None unchanged."""
    if not value or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def resolve_paths(cfg: Any) -> Any:
    """A copy of the :class:`~dpm_dist.config.DPMConfig` with every local path field absolute.

    Ray workers, ``torchrun`` agents and a later ``dpm-eval`` run in other folders; a path resolved here
    means the same file wherever it is read, and it is what ``config.yaml`` and model files record.
    """
    sections: dict[str, dict[str, Any]] = {}
    for key in PATH_FIELDS + PATH_LIST_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        fixed = [absolute_path(v) for v in value] if key in PATH_LIST_FIELDS else absolute_path(value)
        sections.setdefault(section, {})[name] = fixed
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **f) for s, f in sections.items()})


def check_local_inputs(
    cfg: Any, roles: tuple[str, ...] = ("train", "query", "gallery"), remote_shards: bool = False
) -> None:
    """Fail in seconds, naming the field or the shard, when a local input the run needs is missing (before Ray or
    ranks start): the weights file, the shard folders, and every shard of ``roles`` the run will read (exists, has
    index.json's size: :func:`dpm_dist.data.manifest.check_shards`), so a bad query shard stops a run before
    training, not after. With ``remote_shards`` (where one process checks for the whole run: the launch scripts'
    preflight, a one-process run, dpm-tune's driver) remote roots are checked too: their index.json
    (:func:`check_remote_inputs`) and each shard's existence and size (a HEAD request each, nothing read)."""
    if cfg.model.pretrained and not os.path.isfile(cfg.model.pretrained):
        raise FileNotFoundError(f"config field `model.pretrained`: weights file not found: {cfg.model.pretrained}")
    roots = [
        ("data.root", cfg.data.root, not cfg.data.train_urls),
        ("data.eval_root", cfg.data.eval_root, True),
        *(("data.roots", root, True) for root in cfg.data.roots),
    ]
    for field, root, needs_index in roots:
        if not root or ("://" in root and not root.startswith("file://")):
            continue
        folder = local_path(root)  # a file:// root is a local folder too
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"config field `{field}`: no such folder: {root} "
                f"(make shards with `dpm-shards write ...` or `dpm-shards synth --out {folder}`)"
            )
        if needs_index and not os.path.isfile(os.path.join(folder, "index.json")):
            raise FileNotFoundError(
                f"config field `{field}`: {root} holds no index.json (not a shard folder; "
                f"see `dpm-shards verify {folder}`)"
            )
    d = cfg.data
    urls = [d.root, d.eval_root, *d.roots, *d.train_urls, *d.query_urls, *d.gallery_urls]
    remote = any(u and is_remote(u) for u in urls)
    if remote and remote_shards:
        check_remote_inputs(cfg)  # a remote root's index.json, naming the field
    if roles and (remote_shards or not remote):  # else remote shards are checked when read
        from dpm_dist.data.manifest import check_shards

        with _quiet_storage():
            check_shards(d, roles, remote=remote_shards)


def one_process_checks() -> bool:
    """Whether this process is the only one of its run (no torchrun ranks), so it may check remote inputs alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1


@contextlib.contextmanager
def _quiet_storage() -> Iterator[None]:
    """The storage layer's retry warnings off: a check ends in one line that says how many attempts were made."""
    storage_log = logging.getLogger("dpm_dist.data.storage")
    level = storage_log.level
    storage_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        storage_log.setLevel(level)


def check_remote_inputs(cfg: Any) -> None:
    """Fail in seconds, naming the field and the URL, when a remote root's ``index.json`` cannot be read.

    The remote twin of :func:`check_local_inputs` (before Ray starts): the read is the loader's own, with the
    bounded retries of ``data.io_retries`` / ``data.io_backoff_s`` / ``data.io_timeout_s``; each retry is not
    logged here, the error says how many attempts were made.
    """
    from dpm_dist.data.manifest import io_options
    from dpm_dist.data.shards import read_manifest

    roots = [("data.root", cfg.data.root), ("data.eval_root", cfg.data.eval_root)]
    roots += [("data.roots", root) for root in cfg.data.roots]
    with _quiet_storage():  # one line in the end, not one per retry
        for field, root in roots:
            if root and is_remote(root):
                try:
                    read_manifest(root, io_options(cfg.data))
                except (OSError, ValueError) as err:
                    kind = ValueError if isinstance(err, ValueError) else OSError
                    raise kind(f"config field `{field}`: {err}") from err


# ---- errors a person can act on ------------------------------------------------------------------------------

# User mistakes are ValueError (bad values, bad files: the house rule) and OSError (missing files, storage);
# anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
DEBUG_ENV = "HYDRA_FULL_ERROR"  # the documented switch: HYDRA_FULL_ERROR=1 shows the traceback of a user error too


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_guarded(prog: str, fn: Callable[[], T], *, on_interrupt: Callable[[], str] | None = None) -> T:
    """Run ``fn``; a user error becomes ``<prog>: error: <message>`` on stderr and exit status 2 (the
    traceback only with ``HYDRA_FULL_ERROR=1``); Ctrl-C prints one line (``on_interrupt()`` says what was
    saved and how to resume) and exits 130. Bugs propagate with their traceback."""
    try:
        return fn()
    except KeyboardInterrupt:
        hint = on_interrupt() if on_interrupt else ""
        print(f"{prog}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except USER_ERRORS as err:
        if debug_enabled():
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


_WORKER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def worker_message(text: str) -> str:
    """The original message of an exception a DataLoader worker raised (torch re-raises it in the main process as
    "Caught X in DataLoader worker process N." plus the worker's traceback); other text unchanged."""
    caught = _WORKER.match(text)
    if not caught:
        return text
    last = list(re.finditer(rf"^(?:[\w.]+\.)?{caught.group(1)}: ", text, re.MULTILINE))
    return text[last[-1].end() :].rstrip("\n") if last else text


def _one_line(err: BaseException) -> str:
    text = worker_message(str(err)) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 2:
        lines = [lines[0], f"({len(lines) - 1} more lines: {DEBUG_ENV}=1 shows them)"]
    return "\n  ".join(lines)
