"""Render docs/effectiveness.md from template.md and the study JSONs next to this file.

    python docs/effectiveness/build.py [--planted STUDY_DIR] [--real STUDY_DIR]

With a study output directory (``python -m flexora_jax.pipeline.study PLAN --out STUDY_DIR``), its experiments are
aggregated and merged into ``planted.json`` / ``real.json`` first (experiments not in the directory are
kept). Every ``{TABLE:experiment}`` of the template becomes ``flexora_jax.pipeline.study.render_markdown``'s
table of that experiment, so every number in the write-up comes from a JSON file here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from flexora_jax.pipeline.study import aggregate, render_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planted", help="study output directory of configs/study/planted.yaml")
    parser.add_argument("--real", help="study output directory of configs/study/real.yaml")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; fail if effectiveness.md differs from what the JSONs render",
    )
    args = parser.parse_args(argv)
    results = {}
    for part in ("planted", "real"):
        path = HERE / f"{part}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        if getattr(args, part) and not args.check:
            data.update(aggregate(getattr(args, part)))
            path.write_text(json.dumps(data, indent=2) + "\n")
        results.update(data)

    def table(match: re.Match) -> str:
        name = match.group(1)
        if name not in results:
            raise SystemExit(f"template.md asks for experiment {name!r}, which no JSON here has")
        return "\n".join(render_markdown({name: results[name]}).splitlines()[2:]).strip()

    text = re.sub(r"\{TABLE:(\w+)\}", table, (HERE / "template.md").read_text())
    doc = HERE.parent / "effectiveness.md"
    if args.check:
        same = doc.exists() and doc.read_text() == text
        print(f"{doc}: " + ("matches the JSONs" if same else "differs from what the JSONs render; rebuild it"))
        return 0 if same else 1
    doc.write_text(text)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
