"""Rewrite the key comments in configs/*.yaml and the key table in README.md from config.py.

    .venv/bin/python scripts/refresh_config_docs.py

The one-line meaning of every key lives in glowtrain/config.py; the tests fail when the shipped
YAML files or the README drift from it, and this script brings them back in line.
"""

import re
from pathlib import Path

from glowtrain.config import describe_keys, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line[2:] if line.startswith("# ") else line[1:])
        save_config(load_config(path), path, "\n".join(header))
    rows = ["| key | default | meaning |", "|---|---|---|"]
    # A | in a meaning (q(u|x)) would end its cell: escaped, as markdown tables need.
    rows += [f"| `{key}` | `{default}` | {meaning.replace('|', chr(92) + '|')} |"
             for key, default, meaning in describe_keys()]
    readme = ROOT / "README.md"
    text = readme.read_text()
    table = re.compile(r"^\| key \| default \| meaning \|\n(?:^\|.*\n)+", re.MULTILINE)
    readme.write_text(table.sub("\n".join(rows) + "\n", text, count=1))


if __name__ == "__main__":
    main()
