"""Command line: `python -m shrinklib compress MODEL --recipe FILE --out DIR`.

Validates everything before any work: the recipe (steps, fields, order, export names), then
the device, --out, the model's config and shapes, and the corpus (`--dry-run` stops there).
Then it applies the steps with progress bars and prints the summary table (size, perplexity,
time per step). Every error is one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrinklib", description="The shrink suite's command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="apply a YAML recipe of compression steps to a model")
    c.add_argument("model", help='model id: "smollm2-135m" (embedded), an alias, a local folder or a Hugging Face id')
    c.add_argument("--recipe", required=True, help="YAML recipe file (see shrinklib/recipes/)")
    c.add_argument("--out", required=True, help="output folder (exports and summary.json/.md)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dry-run", action="store_true", help="check the recipe, model, corpus, device and --out, then stop")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a recipe's output")
    c.add_argument("--no-progress", action="store_true")
    sub.add_parser("steps", help="list the registered recipe steps and their fields")
    args = parser.parse_args(argv)

    from .recipe import STEPS, RecipeError, load_recipe, prepare_run, run_recipe, summary_table

    if args.command == "steps":
        from dataclasses import MISSING, fields

        for name, spec in sorted(STEPS.items()):
            print(f"{name:20s} " + ", ".join(f"{f.name}={f.default!r}" for c in spec.configs for f in fields(c)
                                             if f.init and f.default is not MISSING))
        return 0
    try:
        recipe = load_recipe(args.recipe)
    except (RecipeError, OSError, UnicodeDecodeError) as err:
        print(f"error: invalid recipe {args.recipe}: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"recipe '{recipe.name}': " + " → ".join(name for name, _ in recipe.steps))
    for warning in recipe.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        if args.dry_run:
            prepare_run(recipe, args.model, args.out, args.device, args.overwrite)
            print(f"ok: the recipe, model '{args.model}', corpus, device '{args.device}' and --out {args.out} check out")
            return 0
        results = run_recipe(recipe, args.model, args.out, args.device, progress=not args.no_progress,
                             overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("error: interrupted; --out was left as it was", file=sys.stderr)
        return 130
    except Exception as err:  # the library's errors say what was wrong and what to do: one line, no traceback
        failed = Path(args.out).with_name(Path(args.out).name + ".failed")
        kept = f"; the finished steps' outputs are in {failed}" if (failed / "FAILED.txt").is_file() else ""
        print(f"error: {_one_line(err)}{kept}", file=sys.stderr)
        return 2
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
