"""imdsd: an EC2-compatible instance metadata daemon that vends rotating role credentials."""

from __future__ import annotations

__version__ = "0.1.0"
