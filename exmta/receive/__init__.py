"""The receive side: admission policy for SMTP clients (the protocol is in exmta.smtp)."""
