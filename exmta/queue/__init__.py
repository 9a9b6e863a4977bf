"""The message queue: durable stores, the delivery scheduler and DSN generation."""
