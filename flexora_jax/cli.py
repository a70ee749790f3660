"""``flexora-jax``: the command line over :mod:`flexora_jax.pipeline`.

    flexora-jax [run] [--config FILE] [--output-dir DIR] [--resume] [--section.key=value ...]
    flexora-jax run --seeds=[0,1,2] --output-dir DIR [...]     # once per seed, mean +- sd over the seeds
    flexora-jax search|finetune|evaluate|export --output-dir DIR [--merged] [--section.key=value ...]
    flexora-jax study PLAN --out DIR [--smoke] [--only EXPERIMENT]   # many runs: flexora_jax.pipeline.study

``run`` with no arguments runs the embedded default (a planted task). The stage commands continue a
run directory: its ``config.yaml`` is the config unless ``--config`` names another. A user error
(bad config key or value, missing file, NaN loss) exits with status 2 and a one-paragraph message, no
traceback; SIGTERM / SIGINT save a checkpoint and exit with 128 + the signal number.

The command keeps JAX's compiled programs between runs (a persistent compilation cache) in
``$XDG_CACHE_HOME/flexora_jax/jax`` (``~/.cache/flexora_jax/jax``), so a second run of the same shapes skips
most compiling. ``--no-compilation-cache`` or ``FLEXORA_JAX_COMPILATION_CACHE=0`` turns that off; a path in
that variable moves it; ``JAX_COMPILATION_CACHE_DIR`` (JAX's own setting) is left as JAX reads it. Only the
command does this: ``import flexora_jax`` never configures a cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import jax
import yaml

from flexora_jax import signals
from flexora_jax.errors import FlexoraError
from flexora_jax.fileio import describe_os_error
from flexora_jax.pipeline import study
from flexora_jax.pipeline.config import help_text, load_config
from flexora_jax.pipeline.registry import method_names
from flexora_jax.pipeline.report import seeds_table
from flexora_jax.pipeline.stages import run, run_stage
from flexora_jax.signals import Interrupted, stop_on_signals

COMMANDS = ("run", "search", "finetune", "evaluate", "export")
EXIT_USER_ERROR = 2
CACHE_ENV = "FLEXORA_JAX_COMPILATION_CACHE"  # 0 / false / off / no: no cache; a path: the cache directory
_OFF = ("0", "false", "off", "no")
#: What each command does (its --help).
ABOUT = {
    "run": "Run the whole job into --output-dir: search, select, fine-tune every method, evaluate, export. "
    "Without --config it runs the embedded planted demo; --resume continues an interrupted run.",
    "search": "Run the gate searches the run's methods need; writes searches/<gates>/ (a fresh run directory, "
    "or one that holds the run's config).",
    "finetune": "Fine-tune every method on its selection; reads searches/, writes methods/<method>/adapter.",
    "evaluate": "Score the base model and every method's adapter; writes eval.json and compare.json.",
    "export": "Copy the main method's adapter and selection to the top of the run directory, write gates.json, "
    "report.md and gates.png (--merged: also the merged model in merged/).",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexora-jax",
        add_help=False,
        allow_abbrev=False,  # --seed=3 is a config key, not --seeds
        description="Find which layers (Flexora) and ranks (AutoLoRA) to fine-tune with LoRA, then fine-tune there.",
        epilog="Any config key can be overridden as --section.key=value (YAML values), e.g. --seed=3 "
        "--lora.r=8 --search.hypergradient=first_order --compare=[lora,random_k]. "
        f"Methods (--method, --compare): {', '.join(method_names())}. "
        "`flexora-jax --help-config` lists every key with its type, default and meaning, and what each "
        "method does. `flexora-jax study PLAN --out DIR` runs a study plan (configs/study/*.yaml; see its "
        "--help).",
    )
    p.add_argument("command", nargs="?", default="run", choices=COMMANDS, help="what to run (default: run)")
    p.add_argument("--config", help="YAML config file (default: the embedded planted demo, or DIR/config.yaml)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="the run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoints")
    p.add_argument("--merged", action="store_true", help="export: also write the merged model (merged/)")
    p.add_argument(
        "--seeds",
        help="run: once per seed into DIR/seed<s>, then DIR/report.md and compare.json with "
        "mean +- sd over the seeds, e.g. --seeds=[0,1,2]",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache",
        action="store_false",
        help=f"do not keep compiled programs between runs (also: {CACHE_ENV}=0); default: "
        "$XDG_CACHE_HOME/flexora_jax/jax",
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    p.add_argument("--help-config", action="store_true", help="show every config key: type, default, meaning")
    return p


def _fail(message: str, status: int = EXIT_USER_ERROR) -> int:
    # a value may hold characters the terminal cannot encode (lone surrogates): show them escaped
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    # Paths and keys stay whole (no breaks at hyphens or inside long words): they are copied from here.
    print(
        "\n".join(
            textwrap.wrap(f"flexora-jax: error: {message}", width=100, break_on_hyphens=False, break_long_words=False)
        ),
        file=sys.stderr,
    )
    return status


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("absl", "orbax", "jax", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # orbax's orphaned write tasks after a failed save
    if quiet:
        os.environ["FLEXORA_PROGRESS"] = "0"


def compilation_cache_dir(enabled: bool = True, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The directory the command's persistent compilation cache goes to, or None when it is switched off
    (``enabled`` False: ``--no-compilation-cache``, or ``FLEXORA_JAX_COMPILATION_CACHE=0``)."""
    value = environ.get(CACHE_ENV, "").strip()
    if not enabled or value.lower() in _OFF:
        return None
    if value and value.lower() not in ("1", "true", "on", "yes"):
        return Path(value).expanduser()
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "flexora_jax" / "jax"


def setup_compilation_cache(enabled: bool = True) -> str | None:
    """Point JAX's persistent compilation cache at :func:`compilation_cache_dir` unless JAX already has one
    (``JAX_COMPILATION_CACHE_DIR``); returns the directory in use, or None. Programs that compile in under a
    second are not stored (JAX's default threshold). x64 mode gets no cache: jax 0.10.2 aborted writing some
    float64 programs into it."""
    directory = compilation_cache_dir(enabled)
    if directory is not None and jax.config.jax_compilation_cache_dir is None and not jax.config.jax_enable_x64:
        jax.config.update("jax_compilation_cache_dir", str(directory))
    return jax.config.jax_compilation_cache_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexora-jax`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["study"]:
        _setup_logging(quiet=False)
        setup_compilation_cache()
        with stop_on_signals():  # a signal stops the study's current run at a safe point (its message printed)
            status = study.main(argv[1:], prog="flexora-jax study")
            signum = signals.STOP.signum
        return status if signum is None else 128 + signum
    parser = _parser()
    try:
        args, overrides = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0) and EXIT_USER_ERROR
    if args.help:
        if any(a in COMMANDS for a in argv):  # `flexora-jax run --help`: that command's help
            print(f"usage: flexora-jax {args.command} [--config FILE] [--output-dir DIR] [--section.key=value ...]\n")
            print(textwrap.fill(ABOUT[args.command], width=100))
            print("\nEvery key, its type, default and meaning: flexora-jax --help-config")
        else:
            parser.print_help()
        return 0
    if args.help_config:
        print(help_text())
        return 0
    _setup_logging(args.quiet)
    setup_compilation_cache(args.compilation_cache)
    try:
        with stop_on_signals(args.output_dir or ""):  # from here on a signal is a flag, checked at safe points
            _command(args, overrides)
            signum = signals.STOP.signum
            if signum is not None:  # it came after the last safe point: the work is complete, and says so
                raise Interrupted(
                    f"stopped by signal {signum} after `flexora-jax {args.command}` finished; its files are complete",
                    signum,
                )
        return 0
    except _UserExit as exc:
        return _fail(str(exc))
    except Interrupted as exc:
        return _fail(str(exc), 128 + exc.signum)
    except FlexoraError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; continue with --resume", 130)
    except OSError as exc:  # the error boundary: a full disk, a read-only place, a file where a folder belongs
        return _fail(f"{describe_os_error(exc)}; nothing already written was removed")
    except UnicodeError as exc:
        return _fail(f"a file or argument is not valid text ({exc}); expected UTF-8")
    except (MemoryError, jax.errors.JaxRuntimeError) as exc:
        if isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in str(exc):
            return _fail(
                "out of memory: the model, batch or sequence does not fit this device; lower "
                "search.batch_size / finetune.batch_size / task.max_length, or use more devices (mesh)"
            )
        raise


def _command(args: argparse.Namespace, overrides: list[str]) -> None:
    """Load the config (the run directory's own for a stage command) and run the command."""
    config_file = args.config
    if config_file is None and args.command != "run" or (args.resume and config_file is None):
        if args.output_dir is None:
            raise_user(
                f"`flexora-jax {args.command}{' --resume' if args.resume else ''}` continues a run: "
                "pass --output-dir DIR (the run directory)"
            )
        candidate = Path(args.output_dir) / "config.yaml"
        config_file = str(candidate) if candidate.exists() else None
    if args.output_dir is not None:
        overrides = overrides + [f"--output_dir={args.output_dir}"]
    config = load_config(config_file, overrides)
    if args.seeds is not None and args.command != "run":
        raise_user("--seeds runs the whole job once per seed: use it with `flexora-jax run`")
    if args.command == "run" and args.seeds is not None:
        try:
            seeds = yaml.safe_load(args.seeds)
        except yaml.YAMLError:
            seeds = args.seeds  # run_seeds names it and shows the expected form
        result = study.run_seeds(config, [seeds] if isinstance(seeds, int) else seeds, resume=args.resume)
        print("\n".join(seeds_table(result) + [f"run directory: {Path(config.output_dir).absolute()}"]))
    elif args.command == "run":
        print(run(config, resume=args.resume).summary())
    else:
        run_stage(args.command, config, merged=args.merged)
        print(f"{args.command}: done; files in {Path(config.output_dir).absolute()}")


class _UserExit(Exception):
    pass


def raise_user(message: str) -> None:
    raise _UserExit(message)


if __name__ == "__main__":
    sys.exit(main())
