"""Print a function's source in a notebook, so the algorithm is visible where it runs."""

import inspect


def show(fn) -> None:
    """Print the source of a function, class or module.

    Args:
        fn: any object `inspect.getsource` accepts.
    """
    module = inspect.getmodule(fn)
    where = f"{module.__name__}" if module else "?"
    print(f"# from {where}")
    print(inspect.getsource(fn).rstrip())
