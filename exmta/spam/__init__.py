"""Spam verdicts: rspamd over its HTTP protocol, and Exchange's SCL from the combined verdict (issue 15)."""
