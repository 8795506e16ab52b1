"""The one exception type the data layer raises for user-fixable problems."""


class DataError(ValueError):
    """A one-line, user-facing data problem: names the config field or source and the fix."""
