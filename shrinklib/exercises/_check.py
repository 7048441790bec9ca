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


def check_function(name: str, fn, cases: list[tuple[tuple, object]], hint: str, tol: float = 1e-4) -> bool:
    """For an exercise that asks for code: call the student's `fn(*args)` on each hand-computed case
    and compare with the expected value (numbers, nested lists or tensors, to `tol`). None, or a
    function that raises NotImplementedError (the stub), is "not attempted"; a wrong value or an
    error raises AssertionError naming the case and the hint. Returns True when every case is right."""
    if not_attempted(fn, name):
        return False
    if not callable(fn):
        raise AssertionError(f"{name}: pass your function itself (not its result), got {type(fn).__name__}")
    for i, (args, expected) in enumerate(cases, 1):
        try:
            got = fn(*args)
        except NotImplementedError:  # the stub as given
            not_attempted(None, name)
            return False
        except Exception as err:  # the student's code failed: report which case and why
            raise AssertionError(f"{name}: case {i} {_show(args)} raised {type(err).__name__}: {err}; hint: {hint}") from err
        if not _close(got, expected, tol):
            raise AssertionError(f"{name}: case {i} {_show(args)} returned {_show(got)}, expected {_show(expected)}; "
                                 f"hint: {hint}")
    print(f"{name}: correct on all {len(cases)} cases")
    return True


def _plain(v):
    """Tensors and numpy arrays as nested lists; integers stay integers, other numbers become floats."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if isinstance(v, int) and not isinstance(v, bool) else float(v)


def _close(got, expected, tol: float) -> bool:
    try:
        g, e = _plain(got), _plain(expected)
    except (TypeError, ValueError):
        return False

    def same(a, b):
        if isinstance(b, list):
            return isinstance(a, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return not isinstance(a, list) and abs(a - b) <= tol * max(1.0, abs(b))

    return same(g, e)


def _show(v) -> str:
    try:
        text = repr(_plain(v)) if not isinstance(v, tuple) else "(" + ", ".join(_show(x) for x in v) + ")"
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."
