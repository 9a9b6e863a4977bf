"""twistd plugin: ``twistd exmta`` builds the service tree from exmta.tap."""
from twisted.application.service import ServiceMaker

exmta = ServiceMaker(
    "exmta", "exmta.tap", "Modular mail transport server for Exchange organisations.", "exmta"
)
