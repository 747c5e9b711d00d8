"""Text that every Python installation carries, so calibration and tests need no network."""

import inspect
from pathlib import Path


def prose_text():
    """English prose: the language reference's help topics (pydoc_data)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def code_text():
    """Python source: the standard library's inspect module."""
    return Path(inspect.getsourcefile(inspect)).read_text()


def default_calibration_text():
    """Prose and code interleaved in 4k-character blocks: ordinary text of both kinds."""
    prose, code = prose_text(), code_text()
    blocks = []
    for i in range(0, max(len(prose), len(code)), 4000):
        blocks += [prose[i : i + 4000], code[i : i + 4000]]
    return "\n\n".join(b for b in blocks if b)
