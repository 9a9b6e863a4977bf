"""Configuration: the frozen schema and the TOML loader that validates it."""
from exmta.config.schema import (
    AcceptedDomain, Config, QueueConfig, ReceiveConnectorConfig, RouteConfig, SendConnectorConfig, SmartHost,
)

__all__ = [
    "AcceptedDomain", "Config", "QueueConfig", "ReceiveConnectorConfig", "RouteConfig",
    "SendConnectorConfig", "SmartHost",
]
