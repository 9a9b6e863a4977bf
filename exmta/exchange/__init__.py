"""Exchange Online and Exchange Server tooling: ``exmta exo check`` and ``exmta import exchange``.

:mod:`exmta.exchange.exo_check` checks send connectors toward Exchange Online
for tenant attribution (MC1226222); :mod:`exmta.exchange.importer` turns
``Get-ReceiveConnector`` / ``Get-SendConnector`` / ``Get-AcceptedDomain``
JSON into an exmta configuration; :mod:`exmta.exchange.commands` registers
both with the ``exmta`` command.
"""
