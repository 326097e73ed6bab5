"""``python -m stages.publish.rollback``: move the champion alias back to the version it replaced.

The serving image of every version stays in the registry (``serving.image`` tag of the version),
so rolling back the alias is what deployments that follow ``champion`` need.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from docpipe.config import load_pipeline_config
from docpipe.contract import EXIT_BAD_INPUT
from docpipe.loader import ConfigError
from docpipe.registry import Registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.publish.rollback", description=__doc__)
    parser.add_argument("--config", type=Path, action="append", help="pipeline YAML (+ overlays)")
    args = parser.parse_args(argv)
    try:
        config = load_pipeline_config(args.config)
    except ConfigError as exc:
        print(f"rollback: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    registry = Registry(config.tracking.tracking_uri, config.publish.registered_model)
    try:
        was, now = registry.rollback()
    except LookupError as exc:
        print(f"rollback: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    image = registry.client.get_model_version(registry.name, now).tags.get("serving.image", "no image recorded")
    print(f"{registry.name}: champion {was} -> {now} ({image})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
