"""Command line: `python -m shrinklib compress MODEL --recipe FILE --out DIR`.

Validates the whole recipe (steps, fields, order) before loading anything heavy, then applies
the steps with progress bars and prints the summary table (size, perplexity, time per step).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrinklib", description="The shrink suite's command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="apply a YAML recipe of compression steps to a model")
    c.add_argument("model", help='model id: "smollm2-135m" (embedded), an alias, a local folder or a Hugging Face id')
    c.add_argument("--recipe", required=True, help="YAML recipe file (see shrinklib/recipes/)")
    c.add_argument("--out", required=True, help="output folder (exports and summary.json/.md)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dry-run", action="store_true", help="validate the recipe and stop")
    c.add_argument("--no-progress", action="store_true")
    sub.add_parser("steps", help="list the registered recipe steps and their fields")
    args = parser.parse_args(argv)

    from .recipe import STEPS, RecipeError, load_recipe, run_recipe, summary_table

    if args.command == "steps":
        from dataclasses import fields

        for name, spec in sorted(STEPS.items()):
            print(f"{name:20s} " + ", ".join(f"{f.name}={f.default!r}" for f in fields(spec.config)))
        return 0
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as err:
        print(f"error: invalid recipe {args.recipe}: {err}", file=sys.stderr)
        return 2
    print(f"recipe '{recipe.name}': " + " → ".join(name for name, _ in recipe.steps))
    if args.dry_run:
        return 0
    try:
        results = run_recipe(recipe, args.model, args.out, args.device, progress=not args.no_progress)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
