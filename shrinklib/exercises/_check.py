"""The one helper every exercise checker uses."""

from collections.abc import Callable


def not_attempted(answer, name: str | None = None) -> bool:
    """True (after saying so) when the student has not answered yet (`answer is None`)."""
    if answer is None:
        print(f"{name}: not attempted" if name else "not attempted")
        return True
    return False


def check(name: str, answer, is_right: Callable[[object], bool], hint: str) -> bool:
    """Print "not attempted" for None; raise AssertionError with a hint on a wrong answer;
    confirm a right one. Returns True when right."""
    if not_attempted(answer, name):
        return False
    try:
        right = bool(is_right(answer))
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{name}: could not check {answer!r} ({err}); hint: {hint}") from err
    if not right:
        raise AssertionError(f"{name}: {answer!r} is not right; hint: {hint}")
    print(f"{name}: correct")
    return True
