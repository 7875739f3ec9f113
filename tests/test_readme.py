"""The README's configuration reference is a valid file with the defaults it claims."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO
from fedguard.experiment import config


def test_readme_config_block_is_valid_and_matches_defaults() -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Configuration.*?```toml\n(.*?)```", text, re.S).group(1)
    cfg = config.validate(tomllib.loads(block))
    defaults = config.validate({"server": {"clients_per_round": 10, "min_clients": 1}})
    assert cfg == defaults


def test_readme_quick_start_commands_match_ci() -> None:
    text = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    setup = re.search(r"1\. Set up.*?```bash\n\s*(.*?)\n\s*```", text, re.S).group(1).strip()
    test = re.search(r"3\. Run the tests.*?```bash\n\s*(.*?)\n\s*```", text, re.S).group(1).strip()
    assert setup in ci and test in ci
