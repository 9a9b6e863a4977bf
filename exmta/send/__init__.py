"""Send connectors (ISendConnector): SMTP to smart hosts or MX, LMTP to mailbox servers.

Import the connector you need from its module (:mod:`exmta.send.smtp`,
:mod:`exmta.send.lmtp`); this package imports nothing at load time so that
each connector's dependencies stay optional.
"""
