"""The built-in offline corpus: Python's own help topics (``pydoc_data.topics``).

It ships with every CPython install (~465 KB of English prose and code), so the tiny
teacher and the CPU sweep can run with no network and no downloaded data.
"""

from __future__ import annotations


def builtin_corpus() -> list[str]:
    """One document per pydoc topic, in sorted topic order so every process sees the same corpus."""
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    return [doc for doc in docs if doc]
