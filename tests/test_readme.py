"""The README's first commands are what CI runs, and every command it shows parses."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    commands = first_commands()
    install = [c for c in commands if c.startswith("pip install")]
    tests = [c for c in commands if "pytest" in c]
    assert len(install) == 1 and len(tests) == 1
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install[0] in ci
    assert tests[0] in ci
