"""Exercise checkers for the notebooks: `check_<name>(answer)` raises on a wrong answer."""
