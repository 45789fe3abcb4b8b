"""Keep the README's generated tables (passes, presets) in step with the registry.

``python -m onnxcompress.docs README.md`` rewrites the parts between the ``<!-- passes:begin -->``
/ ``<!-- passes:end -->`` and ``<!-- presets:begin -->`` / ``<!-- presets:end -->`` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from onnxcompress import registry
from onnxcompress.cli import passes_markdown


def presets_markdown() -> str:
    lines = ["| preset | pipeline | what it is for |", "|---|---|---|"]
    for name, (text, about) in registry.PRESETS.items():
        lines.append(f"| `{name}` | `{text}` | {about} |")
    return "\n".join(lines)


def render(text: str) -> str:
    for key, table in (("passes", passes_markdown()), ("presets", presets_markdown())):
        pattern = re.compile(rf"(<!-- {key}:begin -->\n).*?(<!-- {key}:end -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:] or ["README.md"])[0])
    path.write_text(render(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
