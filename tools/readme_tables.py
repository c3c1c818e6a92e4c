"""Regenerate the config and findings tables of README.md from the code (run after changing either)."""

import json
import re
from pathlib import Path

from kagglekd.config import ALIASES, describe_fields
from kagglekd.diagnose import FINDINGS

README = Path(__file__).resolve().parents[1] / "README.md"


def fields_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{json.dumps(default)}` | {text} |" for name, text, default in describe_fields()]
    lines += ["", "Aliases (the key in your script → the kit's key):", "", "| your key | kagglekd key |", "|---|---|"]
    lines += [f"| `{key}` | `{target}` |" for key, target in ALIASES.items()]
    return "\n".join(lines)


def findings_table() -> str:
    lines = ["| id | what it flags |", "|---|---|"]
    return "\n".join(lines + [f"| `{key}` | {text} |" for key, text in FINDINGS.items()])


def main() -> None:
    text = README.read_text()
    for name, table in (("fields", fields_table()), ("findings", findings_table())):
        pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
        block = f"<!-- {name}:start -->\n{table}\n<!-- {name}:end -->"
        text = pattern.sub(lambda _, block=block: block, text)
    README.write_text(text)


if __name__ == "__main__":
    main()
