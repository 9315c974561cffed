"""The ``visionpeft`` command line.

::

    visionpeft methods [--domain vit]
    visionpeft train CONFIG.yaml [--set key.path=value ...] [--resume]
    visionpeft eval CONFIG.yaml [--adapter DIR] [--set key.path=value ...]
    visionpeft demo [NAME] [options passed to the demo]   # --list: the installed demos
    visionpeft export lora --adapter DIR --format kohya|diffusers [--output PATH]

Errors in the user's input print one line saying what is wrong and exit with status 2 (1 when
training cannot go on). So does a file-system error (a full disk, a path under a file, permission
denied): one line naming the path and what to do, status 2 when the path itself is wrong, else 1.
Set ``VISIONPEFT_DEBUG=1`` to see the traceback instead. Any other exception is a bug: it
propagates (a traceback, status 1) with a last line asking to report it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from visionpeft._version import __version__
from visionpeft.errors import ConfigError, VisionPeftError

DEMO_ENTRY_POINT_GROUP = "visionpeft.demos"
#: the demo that ``visionpeft demo`` runs without a name (an entry point that a domain declares)
DEFAULT_DEMO = "default"
#: converters of saved adapters into other tools' formats, declared by the domains: a function that
#: takes the argument list after ``visionpeft export KIND`` and returns the exit status
EXPORT_ENTRY_POINT_GROUP = "visionpeft.exports"


#: errno -> (what could not be done with the path, what to do), for the one line an OSError prints
_OS_ERRORS = {
    errno.ENOSPC: ("cannot write", "free space or choose another output_dir"),
    getattr(errno, "EDQUOT", -1): ("cannot write", "free space (the quota is used up) or choose another output_dir"),
    errno.EFBIG: ("cannot write", "the file is too large for this file system; choose another output_dir"),
    errno.EROFS: ("cannot write", "the file system is read-only; choose another output_dir"),
    errno.EACCES: ("cannot access", "check its permissions (and its folders') or choose another path"),
    errno.EPERM: ("cannot access", "check its permissions (and its folders') or choose another path"),
    errno.ENOTDIR: ("cannot use", "a part of the path is a file, not a folder; move that file or choose another path"),
    errno.EISDIR: ("cannot use", "it is a folder, not a file; give a file path"),
    errno.ENOENT: ("cannot use", "it does not exist; check the path"),
    errno.EEXIST: ("cannot use", "something is already there; remove it or choose another path"),
    errno.ENAMETOOLONG: ("cannot use", "choose a shorter path"),
    errno.EIO: ("cannot read or write", "the disk or network file system failed; check it and try again"),
    errno.EPIPE: ("cannot write", "what read the output (a pipe) was closed"),
}
#: errors that say the path given is wrong (exit status 2, like other bad input)
_BAD_PATH = {errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG}
#: errors that say the storage is full: a failed write of an open file names no file
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG}


def _os_error_line(err: OSError) -> str:
    """The one line an ``OSError`` prints: the path (when the error names one), the reason, what to do."""
    verb, fix = _OS_ERRORS.get(err.errno, ("cannot use", "check the path and try again"))
    reason = err.strerror or (str(err).splitlines() or [""])[0] or type(err).__name__
    if err.filename is None:
        if err.errno is None:  # not from the operating system (e.g. a network library's error)
            return f"error: {type(err).__name__}: {reason}; set VISIONPEFT_DEBUG=1 to see the traceback"
        return f"error: {reason}; {fix}"
    path = os.fsdecode(err.filename) if isinstance(err.filename, bytes) else str(err.filename)
    if err.filename2 is not None:
        path += f" -> {os.fsdecode(err.filename2) if isinstance(err.filename2, bytes) else err.filename2}"
    return f"error: {verb} {path}: {reason}; {fix}"


@contextlib.contextmanager
def _writing_into(output_dir: str) -> Iterator[None]:
    """Name ``output_dir`` in a full-disk ``OSError`` that names no file (a write to an open file failed)."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno in _FULL:
            raise OSError(err.errno, err.strerror, output_dir) from err
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionpeft", description="Parameter-efficient adaptation of pretrained vision models."
    )
    parser.add_argument("--version", action="version", version=f"visionpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--domain", help="only this domain's methods (and the generic ones), e.g. vit")

    for name, help_text in (("train", "train an adapter from a run config"),
                            ("eval", "evaluate a saved adapter with a run config")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="the run config (YAML)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
            help="override a config value, e.g. --set train.lr=0.01 (repeatable)",
        )
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        else:
            p.add_argument(
                "--adapter",
                help="the adapter folder written by training; without it the method is evaluated as attached "
                "(the zero-shot baseline, or an untrained initialisation)",
            )

    # The demo parses its own options (visionpeft demo --help shows them).
    sub.add_parser(
        "demo", help="the main job on an embedded data set (CPU, minutes); demo NAME picks one, --list lists them",
        add_help=False,
    )
    # Each exporter parses its own options (visionpeft export lora --help shows them).
    p = sub.add_parser("export", help="convert a saved adapter into another tool's format", add_help=False)
    p.add_argument("kind", nargs="?", help="what to export, e.g. lora")
    return parser


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is written (notebooks and tests replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """Show visionpeft's own INFO lines on stderr; other libraries' loggers and the root logger are left alone.

    Configuring the root logger would print every library's INFO lines (open_clip's, for one).
    Under ``accelerate launch`` the processes after the first show warnings and errors only.
    """
    logger = logging.getLogger("visionpeft")
    logger.setLevel(logging.INFO)
    handler = next((h for h in logger.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def _methods(domain: str | None) -> int:
    from visionpeft.api import methods

    infos = methods(domain)
    if not infos:
        print("no methods are registered")
        return 0
    print(f"{'name':<20} {'domain':<10} description")
    for info in infos:
        print(info)
    return 0


def _train(path: str, overrides: list[str], resume: bool) -> int:
    from visionpeft.report import run_json, run_table
    from visionpeft.runconfig import load_run_config
    from visionpeft.train import Trainer

    run = load_run_config(path, overrides)
    task = run.make_task()
    model = task.build_model()
    with _writing_into(run.output_dir):
        trainer = Trainer(task, run.train, run.output_dir, model=model, run_config=run.to_dict())
        result = trainer.fit(resume=resume)
    if trainer.accelerator.is_main_process:
        # The table for people; the JSON line stays the last line of stdout for scripts.
        print(run_table(run.output_dir, result))
        print(run_json(run.output_dir, result))
    return 0


def _eval(path: str, overrides: list[str], adapter: str | None) -> int:
    from visionpeft.runconfig import load_run_config
    from visionpeft.train import Trainer

    run = load_run_config(path, overrides)
    task = run.make_task()
    # The model first: the evaluation transform may depend on it (its normalisation statistics).
    model = task.build_model(adapter=adapter)
    if adapter is not None:
        _warn_if_the_adapter_differs(run, model, adapter)
    if task.eval_dataset() is None:
        # The task says which of its keys turns an evaluation on: keys differ between tasks.
        raise ConfigError(task.no_evaluation())
    with _writing_into(run.output_dir):
        trainer = Trainer(task, run.train, run.output_dir, model=model)
        metrics = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        print(json.dumps(metrics, default=str))
    return 0


def _warn_if_the_adapter_differs(run, model, adapter: str) -> None:
    """Say so when the adapter evaluated is not the method the run config describes.

    The adapter folder carries its own method and config, and is evaluated as saved; a run config
    whose ``method`` keys say otherwise would otherwise label the result with the wrong settings.
    """
    from visionpeft.method import attached_methods

    loaded = attached_methods(model)
    if not loaded:
        return
    saved, log = loaded[-1].config, logging.getLogger("visionpeft")
    if saved.method != run.method.method:
        log.warning("--adapter %s holds a %r adapter, but the run config's method.name is %r; evaluating the adapter "
                    "as saved", adapter, saved.method, run.method.method)
        return
    differ = {k: (getattr(saved, k), getattr(run.method, k)) for k in sorted(run.method_keys)
              if hasattr(saved, k) and getattr(saved, k) != getattr(run.method, k)}
    if differ:
        shown = ", ".join(f"method.{k}: {a!r} in the adapter, {b!r} in the run config" for k, (a, b) in differ.items())
        log.warning("--adapter %s was trained with other settings (%s); evaluating the adapter as saved",
                    adapter, shown)


def _demos() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=DEMO_ENTRY_POINT_GROUP)}


def _list_demos(demos: dict[str, importlib.metadata.EntryPoint]) -> None:
    default = demos.get(DEFAULT_DEMO)
    for name, ep in sorted(demos.items()):
        if name == DEFAULT_DEMO:
            continue
        mark = " (the default)" if default is not None and default.value == ep.value else ""
        print(f"visionpeft demo {name}{mark}")


def _demo(args: Sequence[str]) -> int:
    """Run a registered demo: ``visionpeft demo [NAME] [options]``; ``--list`` lists them.

    Demos are entry points of the group ``visionpeft.demos``, declared by the domain packages; the
    one declared under the name ``default`` runs when no name is given.
    """
    demos = _demos()
    args = list(args)
    if not demos:
        print(
            f"error: no demo is installed (demos are entry points of the group {DEMO_ENTRY_POINT_GROUP!r}, declared by "
            "the domain packages); pip install 'visionpeft[all]'",
            file=sys.stderr,
        )
        return 1
    if args[:1] == ["--list"]:
        _list_demos(demos)
        return 0
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
        if name not in demos:
            print(f"error: no demo {name!r}; installed: {', '.join(n for n in sorted(demos) if n != DEFAULT_DEMO)}",
                  file=sys.stderr)
            return 2
    elif DEFAULT_DEMO in demos or len(demos) == 1:
        name = DEFAULT_DEMO if DEFAULT_DEMO in demos else next(iter(demos))
    else:
        print("error: several demos are installed and none is the default; choose one:", file=sys.stderr)
        _list_demos(demos)
        return 2
    try:
        demo = demos[name].load()
    except ImportError as err:
        raise ConfigError(f"the demo {name!r} needs libraries that are not installed ({err}); "
                          "pip install 'visionpeft[all]'") from err
    return int(demo(args) or 0)


def _export(kind: str | None, args: Sequence[str]) -> int:
    exporters = {ep.name: ep for ep in importlib.metadata.entry_points(group=EXPORT_ENTRY_POINT_GROUP)}
    if kind is None or kind.startswith("-") or kind not in exporters:
        known = ", ".join(sorted(exporters)) or "none installed"
        what = "usage: visionpeft export KIND [options]" if kind is None or kind.startswith("-") else (
            f"error: no exporter {kind!r}")
        print(f"{what}; exporters: {known} (visionpeft export KIND --help shows its options)", file=sys.stderr)
        return 0 if kind is None and any(a in ("-h", "--help") for a in args) else 2
    try:
        exporter = exporters[kind].load()
    except ImportError as err:
        raise ConfigError(
            f"the {kind!r} exporter needs libraries that are not installed ({err}); pip install 'visionpeft[all]'"
        ) from err
    return int(exporter(list(args)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("demo", "export"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _log_to_stderr()
    try:
        if args.command == "methods":
            return _methods(args.domain)
        if args.command == "train":
            return _train(args.config, args.overrides, args.resume)
        if args.command == "eval":
            return _eval(args.config, args.overrides, args.adapter)
        if args.command == "export":
            return _export(args.kind, extra)
        return _demo(extra)
    except VisionPeftError as err:
        if os.environ.get("VISIONPEFT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    except OSError as err:
        if os.environ.get("VISIONPEFT_DEBUG"):
            raise
        print(_os_error_line(err), file=sys.stderr)
        return 2 if err.errno in _BAD_PATH else 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        # Re-raised, so that callers of main() see it and the console script exits with status 1;
        # the note is the last line of the traceback Python prints.
        note = (f"error: this is a bug in visionpeft {__version__}, not in your input; please report it with this "
                "traceback and the command you ran")
        if hasattr(err, "add_note"):
            err.add_note(note)
        else:  # Python 3.10: before the traceback
            print(note, file=sys.stderr)
        raise
