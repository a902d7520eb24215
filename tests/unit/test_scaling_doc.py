"""docs/scaling.md: every project command in it is one the project accepts (its config and
overrides load, its arguments parse) and every file it names exists."""

import re
import shlex
from pathlib import Path

from icd_dist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "scaling.md"


def shell_commands() -> list[list[str]]:
    """The commands of the doc's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                for part in line.split("&&"):
                    commands.append(shlex.split(part))
    return commands


def test_doc_commands_are_supported():
    from icd_dist.shards import _parser as shards_parser

    commands = shell_commands()
    project = 0
    for argv in commands:
        if "--" in argv:  # ray job submit ... -- python -m icd_dist...
            submit, argv = argv[:argv.index("--")], argv[argv.index("--") + 1:]
            assert submit[:3] == ["ray", "job", "submit"]
            runtime_env = submit[submit.index("--runtime-env") + 1]
            assert (ROOT / runtime_env).is_file(), runtime_env
        if argv[:2] == ["python", "-m"]:
            project += 1
            module, args = argv[2], argv[3:]
            if module in ("icd_dist.run", "icd_dist.tune"):
                assert args[0] == "--config"
                load_config(ROOT / args[1], args[2:])  # raises on a wrong key or value
            elif module == "icd_dist.shards":
                shards_parser().parse_args(args)
            else:
                raise AssertionError(f"unexpected command {argv}")
        for word in argv:  # files of the repository the commands name
            if word.startswith(("cluster/", "configs/")):
                assert (ROOT / word).is_file(), word
    assert project >= 5
