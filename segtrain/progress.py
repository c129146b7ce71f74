"""Whether to draw progress bars: every command and data tool asks here, so they all agree."""

from __future__ import annotations

import sys


def progress_enabled(requested: bool) -> bool:
    """Progress bars only on an interactive terminal; logs and CI get plain log lines."""
    return bool(requested) and sys.stderr.isatty()
