"""Repo-wide pytest options (markers live in pyproject.toml)."""


def pytest_addoption(parser):
    parser.addoption(
        "--regenerate-golden",
        action="store_true",
        default=False,
        help="Rewrite the golden XML files in tests/data from the current code instead of comparing.",
    )
