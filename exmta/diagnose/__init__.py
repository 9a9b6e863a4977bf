"""Troubleshooting from the outside: ``exmta explain`` and ``exmta diagnose`` (issue 18)."""
