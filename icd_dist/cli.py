"""The command line shared by the entry points that run a config (`icd_dist.run`,
`icd_dist.tune`): --config, key=value overrides, --print-config, and one `error: ...` line
with exit status 2 for a configuration or input error (model.pretrained is checked here,
before the command starts anything; bad shards and bad samples are input errors), 1 for a
step that failed otherwise (its traceback in the run folder's run.log)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from icd_dist.config import Config, ConfigError, dump_config, load_config
from icd_dist.data.errors import BadSampleError, BadShardError


def run_config_command(prog: str, doc: str, config_help: str, override_example: str,
                       action: Callable[[Config, argparse.Namespace], dict],
                       argv: list[str] | None = None,
                       add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                       ) -> int:
    """Parse the arguments (`add_arguments` adds the command's own), load the config and run
    `action(config, arguments)`, printing the dict it returns as one JSON line; the exit
    status: 0 done, 2 configuration or input error."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    if add_arguments:
        add_arguments(p)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {override_example}")
    p.add_argument("--print-config", action="store_true", help="print the resolved config "
                   "and exit")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print_to_pipe(dump_config(cfg))
        return 0
    from icd_dist.train.console import StepFailedError

    try:
        # before anything starts (Ray included): VOC/ADE20K need ImageNet weights
        from icd_dist.models.pretrained import check_pretrained

        check_pretrained(cfg)
        result = action(cfg, args)
    except (ConfigError, FileNotFoundError, BadShardError, BadSampleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StepFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result))
    return 0


def print_to_pipe(text: str) -> None:
    """Print `text` on stdout; a reader that stops early (`| head`) ends the output quietly
    instead of with a BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that fails quietly too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
