"""What the daily aggregate reports (DMARC rua, TLS-RPT) share."""
