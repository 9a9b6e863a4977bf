"""A milter client (sendmail's mail filter protocol, version 6), as Postfix speaks it to milters.

:mod:`exmta.milter.protocol` is the sans-IO codec, :mod:`exmta.milter.client`
one conversation over TCP or a Unix socket, :mod:`exmta.milter.filter` the
``milter`` filter plugin that runs a list of milters at end of data.
"""
