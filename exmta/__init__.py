"""exmta: a modular mail transport server for Microsoft Exchange organisations."""

__version__ = "0.1.0"
